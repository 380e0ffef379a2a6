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
    control::proto::{NodeInfo, PeerInfo, ServerMsg},
    device::PeerSpec,
    identity::PublicIdentity,
    policy::NodePolicy,
    protocol::discovery::NatKind,
    protocol::noise::MeshKey,
};

/// What the coordinator told us, as cached on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshState {
    pub node: NodeInfo,
    pub mesh_keys: Vec<String>,
    pub ipv4_prefix: String,
    pub ipv6_prefix: String,
    pub peers: BTreeMap<String, PeerInfo>,
    /// This node's inbound rules (default deny).
    #[serde(default)]
    pub policy: NodePolicy,
    /// The coordinator's first STUN port (0: it runs none).
    #[serde(default)]
    pub stun_port: u16,
}

impl MeshState {
    pub(super) fn apply(&mut self, msg: ServerMsg) -> Result<bool> {
        match msg {
            ServerMsg::PeerUpsert { peer } => {
                self.peers.insert(peer.fingerprint.clone(), peer);
            }
            ServerMsg::PeerRemoved { fingerprint } => {
                self.peers.remove(&fingerprint);
            }
            ServerMsg::MeshKeys { mesh_keys } => self.mesh_keys = mesh_keys,
            ServerMsg::Policy { policy } => self.policy = policy,
            ServerMsg::Revoked { message } => return Err(Refusal::Revoked(message).into()),
            ServerMsg::Error { message } => bail!("coordinator error: {message}"),
            ServerMsg::Challenge { .. }
            | ServerMsg::Welcome { .. }
            | ServerMsg::Peers { .. }
            | ServerMsg::Punch { .. } => return Ok(false),
        }
        Ok(true)
    }

    pub(super) fn mesh_keys(&self) -> Result<Vec<MeshKey>> {
        self.mesh_keys
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

    pub(super) fn peer_specs(&self) -> Vec<PeerSpec> {
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

    pub(super) fn addresses(&self) -> Result<Vec<IpNet>> {
        let v4_len = self.ipv4_prefix.parse::<IpNet>()?.prefix_len();
        let v6_len = self.ipv6_prefix.parse::<IpNet>()?.prefix_len();
        Ok(vec![
            format!("{}/{v4_len}", self.node.ipv4).parse()?,
            format!("{}/{v6_len}", self.node.ipv6).parse()?,
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
pub(super) fn udp_endpoints(endpoints: &[String]) -> Vec<SocketAddr> {
    endpoints.iter().filter_map(|e| e.parse::<SocketAddr>().ok()).collect()
}
