//! The eBPF fast path: loads the embedded kernel programs, attaches them, pins their maps.
//!
//! - [`shield`]: XDP on the underlay interfaces drops what cannot be a mesh message.
//! - [`acl`]: TC ingress/egress on the mesh TUN device enforces the node's inbound policy with
//!   connection tracking.
//!
//! Each component loads its own copy of the one embedded object with the other component's maps
//! shrunk to a single entry, so either works alone (a static mesh has no policy; `xdp_interfaces`
//! may be empty). Maps are pinned under `/sys/fs/bpf/tunnelmesh/<interface>/` with BTF and
//! unpinned when the component drops.

pub mod acl;
pub mod shield;

use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader};

pub use acl::KernelAcl;
pub use shield::{SharedShield, Shield};

/// The kernel programs, built by `cargo xtask build-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TUNNELMESH_EBPF_OBJECT"));

/// The BPF filesystem; mounted by the daemon if the system has not.
const BPFFS: &str = "/sys/fs/bpf";
/// Where TunnelMesh pins its maps.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tunnelmesh";

#[derive(Debug, thiserror::Error)]
pub enum FastpathError {
    #[error("loading the eBPF object failed: {0} (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BTF)")]
    Load(#[from] aya::EbpfError),
    #[error("the {program} program failed to load or attach on {interface}: {source}")]
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
    #[error("cannot count the CPUs: {0}")]
    Cpus(std::io::Error),
}

/// A loader for the embedded object with `unused` maps shrunk to one entry.
fn loader(unused: &[&'static str]) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    for map in unused {
        loader.map_max_entries(map, 1);
    }
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
