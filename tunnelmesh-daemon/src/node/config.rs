//! The configuration file of an interface, `tunnelmesh up --config FILE`
//! (`/etc/tunnelmesh/INTERFACE.toml` under systemd).
//!
//! TOML with an `[interface]` table, then either `[[peer]]` entries (a static mesh) or one
//! `[coordinator]` table (a coordinated mesh). Every value is validated while it is parsed, so an
//! error names the file, the line and column, and the field, and says what a valid value looks
//! like; unknown keys are named. Nothing is applied until the whole file is valid.
//!
//! ```toml
//! [interface]
//! name = "tm0"                        # TUN device
//! identity = "/etc/ssh/ssh_host_ed25519_key"
//! listen_port = 51820
//! mtu = 1420
//! mesh_key = "base64 of 32 bytes"     # static only: the WireGuard PresharedKey of the mesh
//! addresses = ["10.99.0.1/24", "fd99::1/64"]   # static only
//!
//! [[peer]]                            # static
//! public_key = "ssh-ed25519 AAAA... name"
//! endpoint = "198.18.0.2:51820"
//! allowed_ips = ["10.99.0.2/32", "fd99::2/128"]
//! persistent_keepalive = 25
//!
//! [coordinator]                       # coordinated, instead of [[peer]]
//! url = "https://coordinator.example:8443"
//! fingerprint = "SHA256:…"
//! token_file = "/etc/tunnelmesh/token"
//! ```

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use zeroize::Zeroizing;

use crate::{fastpath::HookChoice, identity::PublicIdentity};

/// Default MTU of the mesh interface: 1500 minus the IPv6 + UDP + WireGuard overhead (80).
pub const DEFAULT_MTU: u16 = 1420;
/// Default UDP port.
pub const DEFAULT_PORT: u16 = 51820;

/// A config file that failed to load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read it: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {problem}")]
    Invalid { path: PathBuf, problem: ConfigProblem },
}

/// What is wrong in a config file's text; each names the line (TOML's own errors name the line
/// and column, and the field).
#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("line {line}: mtu = {mtu} is out of range; use 1280..=65000 (default {DEFAULT_MTU})")]
    MtuOutOfRange { line: usize, mtu: u16 },
    #[error("[interface] addresses is empty; give the node's mesh address, e.g. addresses = [\"10.99.0.1/24\"]")]
    NoAddresses,
    #[error(
        "[interface] has no mesh_key: a static mesh needs one (the same on every node; make it with \
         `head -c32 /dev/urandom | base64`), or add a [coordinator] table to join a coordinated mesh"
    )]
    NoMeshKey,
    #[error(
        "line {line}: [[peer]] tables and [coordinator] exclude each other: a coordinated node takes its peers from the coordinator; remove one"
    )]
    PeersWithCoordinator { line: usize },
    #[error("line {line}: {field} is for static meshes; with [coordinator] the coordinator assigns it: remove it")]
    StaticFieldWithCoordinator { line: usize, field: &'static str },
    #[error(
        "[interface] listen_port = 0: a coordinated node needs a fixed port its peers are told; pick one (default 51820)"
    )]
    NoListenPort,
    #[error("line {line}: port_mapping_lifetime = {secs} is out of range; use 2..=86400 seconds")]
    PortMappingLifetime { line: usize, secs: u64 },
    #[error("line {line}: public_key appears in two [[peer]] entries; merge them")]
    DuplicatePeer { line: usize },
    #[error("line {line}: this [[peer]] has no allowed_ips; it could never receive traffic")]
    NoAllowedIps { line: usize },
    #[error(
        "line {line}: allowed_ips {net} is a default route; it would send all of this host's traffic, the \
         tunnel's own UDP included, into the tunnel (exit nodes are not supported yet): list the peer's \
         mesh addresses and the subnets behind it instead"
    )]
    DefaultRoute { line: usize, net: IpNet },
    #[error(
        "line {line}: allowed_ips {net} contains {endpoint}, the endpoint of a peer: the tunnel would carry its \
         own UDP into itself; narrow allowed_ips so it leaves out every peer's endpoint"
    )]
    CoversEndpoint {
        line: usize,
        net: IpNet,
        endpoint: SocketAddr,
    },
}

/// The mesh key: 32 bytes, written as WireGuard writes a PresharedKey (base64).
#[derive(Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct MeshKey(pub Zeroizing<[u8; 32]>);

/// A key in the config that is not one.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("mesh_key is not valid base64; generate one with `wg genpsk` or `head -c32 /dev/urandom | base64`")]
    NotBase64,
    #[error("mesh_key must decode to 32 bytes, not {0}; generate one with `head -c32 /dev/urandom | base64`")]
    MeshKeyLength(usize),
    #[error(transparent)]
    PeerKey(#[from] crate::identity::IdentityError),
}

impl TryFrom<String> for MeshKey {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        let bytes = BASE64.decode(s.trim()).map_err(|_| KeyError::NotBase64)?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| KeyError::MeshKeyLength(b.len()))?;
        Ok(MeshKey(Zeroizing::new(key)))
    }
}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

/// A peer's public key: its OpenSSH ed25519 public key line.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct PeerKey(pub PublicIdentity);

impl TryFrom<String> for PeerKey {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        Ok(PeerKey(PublicIdentity::from_ssh_line(&s)?))
    }
}

/// `[interface]`: the device and its sockets, in both modes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// TUN device name.
    #[serde(default = "default_name")]
    pub name: String,
    /// OpenSSH ed25519 private key; `--identity` and a systemd credential override it.
    pub identity: Option<PathBuf>,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default = "default_mtu")]
    pub mtu: Spanned<u16>,
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Underlay interfaces the shield guards; empty means every interface that is up, except
    /// loopback.
    #[serde(default)]
    pub xdp_interfaces: Vec<String>,
    /// Where the shield runs: `auto` (XDP in the driver; TC ingress on veth and where the driver
    /// has no native XDP), `xdp` or `tc`.
    #[serde(default)]
    pub shield_hook: HookChoice,
    /// Disable the eBPF fast path (the daemon's own checks still apply).
    #[serde(default)]
    pub no_ebpf: bool,
    /// Disable TUN offloads (TSO/USO super-packets and GRO): one packet per TUN read and write.
    #[serde(default)]
    pub no_offload: bool,
    /// Serve the node's metrics (Prometheus text) at `http://ADDR/metrics`; off by default.
    pub metrics_listen: Option<SocketAddr>,
    /// Static mode only: the mesh key, and our mesh addresses with their prefix (the prefix also
    /// routes to the interface). A coordinator sends both.
    mesh_key: Option<Spanned<MeshKey>>,
    addresses: Option<Spanned<Vec<IpNet>>>,
}

/// `[coordinator]`: join a coordinated mesh (instead of listing `[[peer]]`s).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// `https://HOST:PORT`.
    pub url: String,
    /// The coordinator's TLS fingerprint (`SHA256:…`), as `tunnelmesh coordinator` prints it.
    pub fingerprint: String,
    /// A file holding the enrollment token, for a key not in the coordinator's authorized_keys
    /// (mode 0600 or stricter; `-` reads it from stdin). Never on the command line.
    pub token_file: Option<PathBuf>,
    /// The node name to ask for.
    pub name: Option<String>,
    /// TCP port of the SSH transport (default: listen_port; 0 turns it off).
    pub ssh_port: Option<u16>,
    /// auto, pcp, nat-pmp, upnp or off.
    #[serde(default = "default_port_mapping")]
    pub port_mapping: crate::nat::portmap::Mode,
    /// Seconds.
    #[serde(default = "default_port_mapping_lifetime")]
    pub port_mapping_lifetime: u64,
    /// Where the last coordinator state is cached (default: `$STATE_DIRECTORY` under systemd,
    /// else /var/lib/tunnelmesh/INTERFACE).
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Display name; defaults to the key's comment.
    pub name: Option<String>,
    pub public_key: Spanned<PeerKey>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives, for peers behind NAT; 0 or absent disables it.
    #[serde(default)]
    pub persistent_keepalive: u16,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: InterfaceConfig,
    coordinator: Option<Spanned<CoordinatorConfig>>,
    #[serde(default, rename = "peer")]
    peers: Vec<PeerConfig>,
}

/// A valid interface config: the device, and where its peers come from.
#[derive(Debug, Clone)]
pub struct Config {
    pub interface: InterfaceConfig,
    pub mode: Mode,
}

/// Where an interface's peers come from.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Listed in the file.
    Static(StaticMesh),
    /// Sent by a coordinator.
    Coordinated(CoordinatorConfig),
}

#[derive(Debug, Clone)]
pub struct StaticMesh {
    pub mesh_key: MeshKey,
    pub addresses: Vec<IpNet>,
    pub peers: Vec<PeerConfig>,
}

impl CoordinatorConfig {
    /// Joining `url`, pinned to `fingerprint`, everything else as the defaults.
    pub fn new(url: String, fingerprint: String) -> Self {
        CoordinatorConfig {
            url,
            fingerprint,
            token_file: None,
            name: None,
            ssh_port: None,
            port_mapping: default_port_mapping(),
            port_mapping_lifetime: default_port_mapping_lifetime(),
            state_dir: None,
        }
    }
}

impl Default for InterfaceConfig {
    fn default() -> Self {
        InterfaceConfig {
            name: default_name(),
            identity: None,
            listen_port: default_port(),
            mtu: default_mtu(),
            workers: 0,
            xdp_interfaces: Vec::new(),
            shield_hook: HookChoice::Auto,
            no_ebpf: false,
            no_offload: false,
            metrics_listen: None,
            mesh_key: None,
            addresses: None,
        }
    }
}

fn default_name() -> String {
    "tunnelmesh0".into()
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_mtu() -> Spanned<u16> {
    Spanned::new(0..0, DEFAULT_MTU)
}
fn default_port_mapping() -> crate::nat::portmap::Mode {
    crate::nat::portmap::Mode::Auto
}
fn default_port_mapping_lifetime() -> u64 {
    crate::nat::portmap::DEFAULT_LIFETIME.as_secs()
}

impl Config {
    /// A coordinated interface with the default device settings.
    pub fn coordinated(coordinator: CoordinatorConfig) -> Self {
        Config {
            interface: InterfaceConfig::default(),
            mode: Mode::Coordinated(coordinator),
        }
    }

    /// Load and validate `path`; nothing is applied by loading.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Self, ConfigProblem> {
        let raw: RawConfig = toml::from_str(text)?;
        let line_of = |span: std::ops::Range<usize>| text[..span.start.min(text.len())].lines().count().max(1);
        let mtu = raw.interface.mtu.clone();
        if !(1280..=65_000).contains(mtu.get_ref()) {
            return Err(ConfigProblem::MtuOutOfRange {
                line: line_of(mtu.span()),
                mtu: *mtu.get_ref(),
            });
        }
        let RawConfig {
            mut interface,
            coordinator,
            peers,
        } = raw;
        let (mesh_key, addresses) = (interface.mesh_key.take(), interface.addresses.take());
        let mode = match coordinator {
            Some(coordinator) => {
                let line = line_of(coordinator.span());
                if let Some(peer) = peers.first() {
                    return Err(ConfigProblem::PeersWithCoordinator {
                        line: line_of(peer.public_key.span()),
                    });
                }
                if let Some(key) = &mesh_key {
                    return Err(ConfigProblem::StaticFieldWithCoordinator {
                        line: line_of(key.span()),
                        field: "mesh_key",
                    });
                }
                if let Some(addresses) = &addresses {
                    return Err(ConfigProblem::StaticFieldWithCoordinator {
                        line: line_of(addresses.span()),
                        field: "addresses",
                    });
                }
                let coordinator = coordinator.into_inner();
                if !(1..=65_535).contains(&interface.listen_port) {
                    return Err(ConfigProblem::NoListenPort);
                }
                if !(2..=86_400).contains(&coordinator.port_mapping_lifetime) {
                    return Err(ConfigProblem::PortMappingLifetime {
                        line,
                        secs: coordinator.port_mapping_lifetime,
                    });
                }
                Mode::Coordinated(coordinator)
            }
            None => {
                let mesh_key = mesh_key.ok_or(ConfigProblem::NoMeshKey)?.into_inner();
                let addresses = addresses.map(Spanned::into_inner).unwrap_or_default();
                if addresses.is_empty() {
                    return Err(ConfigProblem::NoAddresses);
                }
                check_peers(&peers, &line_of)?;
                Mode::Static(StaticMesh {
                    mesh_key,
                    addresses,
                    peers,
                })
            }
        };
        Ok(Config { interface, mode })
    }

    /// The MTU of the mesh interface.
    pub fn mtu(&self) -> u16 {
        *self.interface.mtu.get_ref()
    }

    /// The settings that differ between `self` and `new` and take a restart to change: every
    /// `[interface]` field but the mesh key (the device, sockets and programs are built from
    /// them), the addresses, and the mode and its coordinator.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.interface, &new.interface);
        let addresses = match (&self.mode, &new.mode) {
            (Mode::Static(x), Mode::Static(y)) => x.addresses != y.addresses,
            _ => false,
        };
        let coordinator = match (&self.mode, &new.mode) {
            (Mode::Static(_), Mode::Static(_)) => false,
            (Mode::Coordinated(x), Mode::Coordinated(y)) => format!("{x:?}") != format!("{y:?}"),
            _ => true,
        };
        [
            ("name", a.name != b.name),
            ("identity", a.identity != b.identity),
            ("addresses", addresses),
            ("listen_port", a.listen_port != b.listen_port),
            ("mtu", a.mtu.get_ref() != b.mtu.get_ref()),
            ("workers", a.workers != b.workers),
            ("xdp_interfaces", a.xdp_interfaces != b.xdp_interfaces),
            ("shield_hook", a.shield_hook != b.shield_hook),
            ("no_ebpf", a.no_ebpf != b.no_ebpf),
            ("no_offload", a.no_offload != b.no_offload),
            ("metrics_listen", a.metrics_listen != b.metrics_listen),
            ("[coordinator]", coordinator),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
    }
}

/// Each `[[peer]]` once, with allowed IPs that are neither a default route nor over a peer's
/// endpoint (until exit nodes exist, either would carry the tunnel's own UDP into itself).
fn check_peers(peers: &[PeerConfig], line_of: &dyn Fn(std::ops::Range<usize>) -> usize) -> Result<(), ConfigProblem> {
    let mut seen = std::collections::HashSet::new();
    for peer in peers {
        let key = peer.public_key.get_ref().0.noise_public();
        let line = line_of(peer.public_key.span());
        if !seen.insert(*key) {
            return Err(ConfigProblem::DuplicatePeer { line });
        }
        if peer.allowed_ips.is_empty() {
            return Err(ConfigProblem::NoAllowedIps { line });
        }
        for &net in &peer.allowed_ips {
            if net.prefix_len() == 0 {
                return Err(ConfigProblem::DefaultRoute { line, net });
            }
            if let Some(endpoint) = peers.iter().filter_map(|p| p.endpoint).find(|e| net.contains(&e.ip())) {
                return Err(ConfigProblem::CoversEndpoint { line, net, endpoint });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHIharsaew3kq9pJB0LJAOc0Sg5CPOkGdMBJ2l7MEmRG peer@test";
    const PSK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn config(interface_extra: &str, peer: &str) -> String {
        format!(
            "[interface]\nmesh_key = \"{PSK}\"\naddresses = [\"10.99.0.1/24\"]\n{interface_extra}\n[[peer]]\n{peer}\n"
        )
    }

    #[test]
    fn a_valid_file_parses_with_defaults() {
        let c = Config::parse(&config(
            "",
            &format!("public_key = \"{KEY}\"\nallowed_ips = [\"10.99.0.2/32\"]"),
        ))
        .unwrap();
        assert_eq!(c.mtu(), DEFAULT_MTU);
        assert_eq!(c.interface.listen_port, DEFAULT_PORT);
        let Mode::Static(mesh) = &c.mode else { panic!("static") };
        assert_eq!(mesh.peers.len(), 1);
        assert_eq!(mesh.peers[0].public_key.get_ref().0.comment(), "peer@test");
    }

    #[test]
    fn the_shield_hook_is_auto_unless_chosen_and_a_wrong_one_is_named_with_its_line() {
        let peer = format!("public_key = \"{KEY}\"\nallowed_ips = [\"10.99.0.2/32\"]");
        assert_eq!(
            Config::parse(&config("", &peer)).unwrap().interface.shield_hook,
            HookChoice::Auto
        );
        for (written, chosen) in [("xdp", HookChoice::Xdp), ("tc", HookChoice::Tc)] {
            let c = Config::parse(&config(&format!("shield_hook = \"{written}\""), &peer)).unwrap();
            assert_eq!(c.interface.shield_hook, chosen);
        }
        let e = Config::parse(&config("shield_hook = \"generic\"", &peer))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("line 4") && e.contains("`auto`, `xdp`") && e.contains("`tc`"),
            "{e}"
        );
    }

    #[test]
    fn a_coordinated_file_takes_no_peers_mesh_key_or_addresses_and_a_static_one_needs_a_key() {
        let coordinated = "[interface]\nname = \"tm0\"\n\n[coordinator]\nurl = \"https://c.example:8443\"\nfingerprint = \"SHA256:x\"\ntoken_file = \"/etc/tunnelmesh/token\"\nport_mapping = \"off\"\n";
        let c = Config::parse(coordinated).unwrap();
        let Mode::Coordinated(k) = &c.mode else {
            panic!("coordinated")
        };
        assert_eq!(k.port_mapping, crate::nat::portmap::Mode::Off);
        assert_eq!(k.token_file.as_deref(), Some(Path::new("/etc/tunnelmesh/token")));
        let with_peer = format!("{coordinated}\n[[peer]]\npublic_key = \"{KEY}\"\nallowed_ips = [\"10.99.0.2/32\"]\n");
        let e = Config::parse(&with_peer).err().unwrap().to_string();
        assert!(e.contains("line 11") && e.contains("exclude each other"), "{e}");
        let with_key = coordinated.replace("name = \"tm0\"", &format!("mesh_key = \"{PSK}\""));
        let e = Config::parse(&with_key).err().unwrap().to_string();
        assert!(
            e.contains("line 2") && e.contains("mesh_key is for static meshes"),
            "{e}"
        );
        let e = Config::parse(&coordinated.replace("\"off\"", "\"sometimes\""))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("line 8") && e.contains("not a port-mapping mode"), "{e}");
        let e = Config::parse(&coordinated.replace("url", "uri"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("uri"), "unknown keys are named: {e}");
        let e = Config::parse("[interface]\naddresses = [\"10.99.0.1/24\"]\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no mesh_key") && e.contains("[coordinator]"), "{e}");
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let bad_psk = config("", "").replace(PSK, "c2hvcnQ=");
        let e = Config::parse(&bad_psk).err().unwrap().to_string();
        assert!(
            e.contains("line 2") && e.contains("mesh_key") && e.contains("32 bytes"),
            "{e}"
        );
        let e = Config::parse(&config("", "public_key = \"ssh-rsa AAAA\"\nallowed_ips = []"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("line 6") && e.contains("ed25519"), "{e}");
        let e = Config::parse(&config(
            "mtu = 100",
            &format!("public_key = \"{KEY}\"\nallowed_ips = [\"10.0.0.2/32\"]"),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("line 4") && e.contains("mtu"), "{e}");
        let e = Config::parse(&config(
            "",
            &format!("public_key = \"{KEY}\"\nallowed_ips = [\"10.0.0.300/32\"]"),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("line 7") && e.contains("allowed_ips"), "{e}");
        let e = Config::parse(&config("listen_prot = 1", "")).err().unwrap().to_string();
        assert!(e.contains("listen_prot"), "{e}");
        let dup = config(
            "",
            &format!(
                "public_key = \"{KEY}\"\nallowed_ips = [\"10.0.0.2/32\"]\n[[peer]]\npublic_key = \"{KEY}\"\nallowed_ips = [\"10.0.0.3/32\"]"
            ),
        );
        let e = Config::parse(&dup).err().unwrap().to_string();
        assert!(e.contains("line 9") && e.contains("two [[peer]]"), "{e}");
    }

    #[test]
    fn a_default_route_or_a_route_over_a_peers_endpoint_is_refused_with_the_reason() {
        let peer =
            |ips: &str| format!("public_key = \"{KEY}\"\nendpoint = \"198.18.5.2:51820\"\nallowed_ips = [{ips}]");
        for net in ["0.0.0.0/0", "::/0"] {
            let e = Config::parse(&config("", &peer(&format!("\"{net}\""))))
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("line 6") && e.contains(net) && e.contains("default route"),
                "{e}"
            );
        }
        let e = Config::parse(&config("", &peer("\"10.99.0.2/32\", \"198.18.0.0/16\"")))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("198.18.0.0/16 contains 198.18.5.2:51820"), "{e}");
        assert!(Config::parse(&config("", &peer("\"10.99.0.2/32\", \"198.19.0.0/16\""))).is_ok());
    }

    #[test]
    fn a_reload_names_each_interface_field_that_needs_a_restart_and_nothing_else() {
        let peer = format!("public_key = \"{KEY}\"\nallowed_ips = [\"10.99.0.2/32\"]");
        let old = Config::parse(&config("", &peer)).unwrap();
        let same_interface = Config::parse(&config("", &peer.replace("10.99.0.2/32", "10.99.0.3/32"))).unwrap();
        assert!(old.restart_needed(&same_interface).is_empty());
        let other_key = config("", &peer).replace(PSK, "AQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        assert!(
            old.restart_needed(&Config::parse(&other_key).unwrap()).is_empty(),
            "mesh_key is live"
        );
        let moved = Config::parse(&config("listen_port = 51821\nmtu = 1400", &peer)).unwrap();
        assert_eq!(old.restart_needed(&moved), ["listen_port", "mtu"]);
    }
}
