//! The eBPF fast path: loads the embedded kernel programs, attaches them, pins their maps.
//!
//! - [`shield`]: XDP (or TC ingress, where XDP costs more) on the underlay interfaces drops what
//!   cannot be a mesh message.
//! - [`acl`]: TC ingress/egress on the mesh TUN device enforces the node's inbound policy with
//!   connection tracking.
//! - [`steer`]: `SK_REUSEPORT` on the workers' sockets delivers each session's data to the worker
//!   that owns it.
//!
//! Each component loads its own copy of the one embedded object with the other components' maps
//! shrunk to a single entry, so each works alone (a static mesh has no policy; `xdp_interfaces`
//! may be empty). Maps are pinned under `/sys/fs/bpf/tunnelmesh/<interface>/` with BTF and
//! unpinned when the component drops.

pub mod acl;
pub mod kernel_log;
pub mod shield;
pub mod steer;

use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader};
use tunnelmesh_common::events::{LOG_RING_BYTES, LOG_RING_BYTES_UNUSED, LOG_RING_MAP};

pub use acl::KernelAcl;
pub use shield::{Hook, HookChoice, SharedShield, Shield};
pub use steer::Steering;

/// The kernel programs, built by `cargo xtask build-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TUNNELMESH_EBPF_OBJECT"));

/// The BPF filesystem; mounted by the daemon if the system has not.
const BPFFS: &str = "/sys/fs/bpf";
/// Where TunnelMesh pins its maps.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tunnelmesh";

#[derive(Debug, thiserror::Error)]
pub enum FastpathError {
    #[error(
        "loading the eBPF object failed: {0} (needs root or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, and a kernel with BTF)"
    )]
    Load(#[from] aya::EbpfError),
    #[error(
        "the {program} program failed to load or attach on {interface} (loading needs CAP_BPF and CAP_PERFMON, attaching CAP_NET_ADMIN): {source}"
    )]
    Program {
        program: &'static str,
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("pinning the eBPF maps at {path} failed: {reason} (is bpffs mounted at /sys/fs/bpf?)")]
    Pin { path: String, reason: String },
    #[error("eBPF map access failed: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error(
        "this node's policy compiles to {rules} rules; the kernel ACL holds {max}, so it is enforced in userspace",
        max = tunnelmesh_common::acl::ACL_MAX_RULES
    )]
    PolicyTooLarge { rules: usize },
    #[error(
        "the policy allows {destinations} destination prefixes; the kernel ACL holds {max}, so the daemon enforces it",
        max = tunnelmesh_common::acl::ACL_MAX_DESTINATIONS / 2
    )]
    TooManyDestinations { destinations: usize },
    #[error("the kernel programs' log: {0}")]
    Log(String),
    #[error("cannot count the CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("steering addresses 1 to {max} workers, not {0}", max = tunnelmesh_common::steer::MAX_WORKERS)]
    Workers(usize),
}

/// The maps of each component (the log ring: of those that log).
const SHIELD_MAPS: [&str; 5] = [
    LOG_RING_MAP,
    tunnelmesh_common::shield::SHIELD_COUNTERS_MAP,
    tunnelmesh_common::shield::KNOWN_INDICES_MAP,
    tunnelmesh_common::shield::SOURCE_BUDGETS_MAP,
    tunnelmesh_common::shield::BLOCKED_SOURCES_MAP,
];
const ACL_MAPS: [&str; 8] = [
    LOG_RING_MAP,
    tunnelmesh_common::acl::ACL_CONFIG_MAP,
    tunnelmesh_common::acl::ACL_SOURCES_MAP,
    tunnelmesh_common::acl::ACL_DESTINATIONS_MAP,
    tunnelmesh_common::acl::ACL_RULES_MAP,
    tunnelmesh_common::acl::ACL_CONNTRACK_MAP,
    tunnelmesh_common::acl::ACL_COUNTERS_MAP,
    tunnelmesh_common::acl::ACL_RULE_HITS_MAP,
];
const STEER_MAPS: [&str; 1] = [tunnelmesh_common::steer::WORKER_SOCKETS_MAP];

/// A loader for the embedded object with every map but the component's `own` shrunk to one
/// entry, and the log ring to what its events need (the smallest ring if it logs nothing).
fn loader(own: &[&'static str]) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    for map in SHIELD_MAPS.iter().chain(&ACL_MAPS).chain(&STEER_MAPS) {
        if !own.contains(map) && *map != LOG_RING_MAP {
            loader.map_max_entries(map, 1);
        }
    }
    let ring = if own.contains(&LOG_RING_MAP) {
        LOG_RING_BYTES
    } else {
        LOG_RING_BYTES_UNUSED
    };
    loader.map_max_entries(LOG_RING_MAP, ring);
    loader
}

/// Maps pinned under `PIN_ROOT/<interface>/`; the pins (and the folders, once empty) are removed
/// on drop.
struct Pins {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl Pins {
    /// Pin each `(map name, file name)` of `ebpf`, replacing stale pins of a daemon that died.
    fn create(ebpf: &Ebpf, mesh_interface: &str, maps: &[(&str, &str)]) -> Result<Pins, FastpathError> {
        let dir = Path::new(PIN_ROOT).join(mesh_interface);
        let pin_err = |path: &Path, reason: String| FastpathError::Pin {
            path: path.display().to_string(),
            reason,
        };
        crate::sys::bpffs::ensure_mounted(Path::new(BPFFS))
            .map_err(|e| pin_err(Path::new(BPFFS), format!("mounting bpffs: {e}")))?;
        std::fs::create_dir_all(&dir).map_err(|e| pin_err(&dir, e.to_string()))?;
        let mut pins = Pins { dir, files: Vec::new() };
        for (map, file) in maps {
            let pin = pins.dir.join(file);
            let _ = std::fs::remove_file(&pin);
            ebpf.map(map)
                .expect("the embedded object has every map it names")
                .pin(&pin)
                .map_err(|e| pin_err(&pin, e.to_string()))?;
            pins.files.push(pin);
        }
        Ok(pins)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        for pin in &self.files {
            let _ = std::fs::remove_file(pin);
        }
        // Both only succeed once empty (the other component may still hold pins there).
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(PIN_ROOT);
    }
}
