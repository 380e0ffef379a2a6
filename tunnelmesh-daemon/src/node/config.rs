//! The static configuration file of `tunnelmesh up --config FILE`.
//!
//! TOML with an `[interface]` table and `[[peer]]` entries. Every value is validated while it is
//! parsed, so an error names the file, the line and column, and the field, and says what a valid
//! value looks like. Nothing is applied until the whole file is valid.
//!
//! ```toml
//! [interface]
//! name = "tm0"                        # TUN device
//! identity = "/etc/ssh/ssh_host_ed25519_key"
//! mesh_key = "base64 of 32 bytes"     # the WireGuard PresharedKey of the mesh
//! addresses = ["10.99.0.1/24", "fd99::1/64"]
//! listen_port = 51820
//! mtu = 1420
//!
//! [[peer]]
//! public_key = "ssh-ed25519 AAAA... name"
//! endpoint = "198.18.0.2:51820"
//! allowed_ips = ["10.99.0.2/32", "fd99::2/128"]
//! persistent_keepalive = 25
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

use crate::identity::PublicIdentity;

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
    #[error("line {line}: public_key appears in two [[peer]] entries; merge them")]
    DuplicatePeer { line: usize },
    #[error("line {line}: this [[peer]] has no allowed_ips; it could never receive traffic")]
    NoAllowedIps { line: usize },
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// TUN device name.
    #[serde(default = "default_name")]
    pub name: String,
    /// OpenSSH ed25519 private key; `--identity` overrides it.
    pub identity: Option<PathBuf>,
    pub mesh_key: MeshKey,
    /// Our mesh addresses with their prefix (the prefix also routes to the interface).
    pub addresses: Vec<IpNet>,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default = "default_mtu")]
    pub mtu: Spanned<u16>,
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Underlay interfaces to attach the XDP shield to; empty means every non-loopback interface.
    #[serde(default)]
    pub xdp_interfaces: Vec<String>,
    /// Disable the eBPF fast path (the daemon's own checks still apply).
    #[serde(default)]
    pub no_ebpf: bool,
    /// Disable TUN offloads (TSO/USO super-packets and GRO): one packet per TUN read and write.
    #[serde(default)]
    pub no_offload: bool,
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub interface: InterfaceConfig,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
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

impl Config {
    /// Read and validate `path`.
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
        let config: Config = toml::from_str(text)?;
        let line_of = |span: std::ops::Range<usize>| text[..span.start.min(text.len())].lines().count().max(1);
        let mtu = config.interface.mtu.clone();
        if !(1280..=65_000).contains(mtu.get_ref()) {
            return Err(ConfigProblem::MtuOutOfRange {
                line: line_of(mtu.span()),
                mtu: *mtu.get_ref(),
            });
        }
        if config.interface.addresses.is_empty() {
            return Err(ConfigProblem::NoAddresses);
        }
        let mut seen = std::collections::HashSet::new();
        for peer in &config.peers {
            let key = peer.public_key.get_ref().0.noise_public();
            let line = line_of(peer.public_key.span());
            if !seen.insert(*key) {
                return Err(ConfigProblem::DuplicatePeer { line });
            }
            if peer.allowed_ips.is_empty() {
                return Err(ConfigProblem::NoAllowedIps { line });
            }
        }
        Ok(config)
    }

    /// The MTU of the mesh interface.
    pub fn mtu(&self) -> u16 {
        *self.interface.mtu.get_ref()
    }
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
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].public_key.get_ref().0.comment(), "peer@test");
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
}
