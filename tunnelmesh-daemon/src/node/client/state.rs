//! The mesh as the coordinator last described it to this node, cached on disk so a restart
//! while the coordinator is down still brings the mesh up.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::Path,
};

use anyhow::{Result, anyhow, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Refusal;
use crate::{
    control::proto::{MeshInfo, PeerInfo, ServerMsg},
    device::PeerSpec,
    identity::PublicIdentity,
    protocol::discovery::NatKind,
    protocol::noise::MeshKey,
};

/// What the coordinator told us, as cached on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshState {
    #[serde(flatten)]
    pub mesh: MeshInfo,
    /// By fingerprint.
    pub peers: BTreeMap<String, PeerInfo>,
}

impl MeshState {
    pub(crate) fn apply(&mut self, msg: ServerMsg) -> Result<bool> {
        match msg {
            ServerMsg::PeerUpsert { peer } => {
                self.peers.insert(peer.fingerprint.clone(), peer);
            }
            ServerMsg::PeerRemoved { fingerprint } => {
                self.peers.remove(&fingerprint);
            }
            ServerMsg::MeshKeys { mesh_keys } => self.mesh.mesh_keys = mesh_keys,
            ServerMsg::Policy { policy } => self.mesh.policy = policy,
            ServerMsg::Revoked { message } => return Err(Refusal::Revoked(message).into()),
            ServerMsg::Error { message } => bail!("coordinator error: {message}"),
            ServerMsg::Challenge { .. }
            | ServerMsg::Welcome { .. }
            | ServerMsg::Peers { .. }
            | ServerMsg::Punch { .. } => return Ok(false),
        }
        Ok(true)
    }

    pub(crate) fn mesh_keys(&self) -> Result<Vec<MeshKey>> {
        self.mesh
            .mesh_keys
            .iter()
            .map(|k| {
                let bytes = BASE64
                    .decode(k)
                    .map_err(|_| anyhow!("the coordinator sent a mesh key that is not base64"))?;
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| anyhow!("the coordinator sent a mesh key that is not 32 bytes"))?;
                Ok(Zeroizing::new(key))
            })
            .collect()
    }

    pub(crate) fn peer_specs(&self) -> Vec<PeerSpec> {
        self.peers
            .values()
            .filter_map(|p| {
                let identity = PublicIdentity::from_ssh_line(&p.ssh_key).ok()?;
                let allowed_ips = vec![
                    format!("{}/32", p.ipv4).parse().ok()?,
                    format!("{}/128", p.ipv6).parse().ok()?,
                ];
                let candidates = udp_endpoints(&p.endpoints);
                Some(PeerSpec {
                    name: p.name.clone(),
                    identity,
                    allowed_ips,
                    // Only a peer not behind NAT may be sent to unprompted: a datagram reaching a
                    // NAT before the peer has sent through it can spoil the mapping (see `nat`).
                    endpoint: candidates.first().copied().filter(|_| p.nat == NatKind::None),
                    candidates,
                    nat: p.nat,
                    // The address a NAT'd peer's connection came from takes no connections.
                    ssh_endpoint: p
                        .endpoints
                        .iter()
                        .find_map(|e| e.strip_prefix("ssh://")?.parse::<SocketAddr>().ok())
                        .filter(|_| p.nat == NatKind::None),
                    persistent_keepalive: None,
                })
            })
            .collect()
    }

    pub(crate) fn addresses(&self) -> Result<Vec<IpNet>> {
        let v4_len = self.mesh.ipv4_prefix.parse::<IpNet>()?.prefix_len();
        let v6_len = self.mesh.ipv6_prefix.parse::<IpNet>()?.prefix_len();
        Ok(vec![
            format!("{}/{v4_len}", self.mesh.node.ipv4).parse()?,
            format!("{}/{v6_len}", self.mesh.node.ipv6).parse()?,
        ])
    }

    pub(super) fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }

    /// Write atomically, readable by root only (it holds the mesh key).
    pub(super) fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut file, &serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// The `ip:port` entries of a peer's endpoint list.
pub(crate) fn udp_endpoints(endpoints: &[String]) -> Vec<SocketAddr> {
    endpoints.iter().filter_map(|e| e.parse::<SocketAddr>().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_written_before_mesh_info_existed_still_loads_and_writes_the_same_fields() {
        let old = r#"{"node":{"name":"web","fingerprint":"SHA256:x","ipv4":"100.64.0.2","ipv6":"fd7a::2","tags":[]},
            "mesh_keys":["AAAA"],"ipv4_prefix":"100.64.0.0/10","ipv6_prefix":"fd7a::/48","peers":{},
            "policy":{"rules":[]},"stun_port":3478}"#;
        let state: MeshState = serde_json::from_str(old).expect("the old cache parses");
        assert_eq!((state.mesh.node.name.as_str(), state.mesh.stun_port), ("web", 3478));
        let again: serde_json::Value = serde_json::to_value(&state).unwrap();
        let mut before: serde_json::Value = serde_json::from_str(old).unwrap();
        // Policies now also carry their destinations (security issue); nothing else changed.
        before["policy"]["destinations"] = serde_json::json!([]);
        assert_eq!(again, before, "the same document, field for field");
    }
}
