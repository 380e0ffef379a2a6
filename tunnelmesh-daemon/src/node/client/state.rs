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

/// What a pushed message changed in the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing (a repeated update, a removal of a peer we do not know, …).
    Nothing,
    /// A peer's entry was added or changed.
    Peer,
    PeerRemoved,
    MeshKeys,
    Policy,
}

impl Change {
    /// Whether the cache must be written now: a removal, keys or rules must survive a restart;
    /// a peer's new endpoints may wait for the next write (a rejoin brings them again).
    pub(crate) fn urgent(self) -> bool {
        !matches!(self, Change::Nothing | Change::Peer)
    }
}

impl MeshState {
    pub(crate) fn apply(&mut self, msg: ServerMsg) -> Result<Change> {
        let changed = |yes: bool, change: Change| if yes { change } else { Change::Nothing };
        Ok(match msg {
            ServerMsg::PeerUpsert { peer } => {
                let same = self.peers.get(&peer.fingerprint) == Some(&peer);
                if !same {
                    self.peers.insert(peer.fingerprint.clone(), peer);
                }
                changed(!same, Change::Peer)
            }
            ServerMsg::PeerRemoved { fingerprint } => {
                changed(self.peers.remove(&fingerprint).is_some(), Change::PeerRemoved)
            }
            ServerMsg::MeshKeys { mesh_keys } => {
                let new = self.mesh.mesh_keys != mesh_keys;
                self.mesh.mesh_keys = mesh_keys;
                changed(new, Change::MeshKeys)
            }
            ServerMsg::Policy { policy } => {
                let new = self.mesh.policy != policy;
                self.mesh.policy = policy;
                changed(new, Change::Policy)
            }
            ServerMsg::Revoked { message } => return Err(Refusal::Revoked(message).into()),
            ServerMsg::Error { message } => bail!("coordinator error: {message}"),
            ServerMsg::Challenge { .. }
            | ServerMsg::Welcome { .. }
            | ServerMsg::Peers { .. }
            | ServerMsg::Punch { .. } => Change::Nothing,
        })
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

/// The on-disk cache of a [`MeshState`], written at most every [`CacheFile::PACE`] unless a
/// change is [urgent](Change::urgent): a peer alternating its endpoints does not keep this node
/// fsyncing.
pub(crate) struct CacheFile {
    path: std::path::PathBuf,
    dirty: bool,
    written: Option<std::time::Instant>,
}

impl CacheFile {
    pub(crate) const PACE: std::time::Duration = std::time::Duration::from_secs(2);

    pub(crate) fn new(path: std::path::PathBuf) -> Self {
        CacheFile {
            path,
            dirty: false,
            written: None,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `state` changed by `change`: write it now, or mark it for [`CacheFile::flush`].
    pub(crate) fn changed(&mut self, state: &MeshState, change: Change) -> Result<()> {
        if change == Change::Nothing {
            return Ok(());
        }
        self.dirty = true;
        let due = self.written.is_none_or(|t| t.elapsed() >= Self::PACE);
        if change.urgent() || due {
            self.write(state)
        } else {
            Ok(())
        }
    }

    /// Write what is marked, once the pace allows.
    pub(crate) fn flush_due(&mut self, state: &MeshState) -> Result<()> {
        if self.written.is_none_or(|t| t.elapsed() >= Self::PACE) {
            self.flush_now(state)
        } else {
            Ok(())
        }
    }

    /// Write what is marked, pace or not (the connection ends, the node stops).
    pub(crate) fn flush_now(&mut self, state: &MeshState) -> Result<()> {
        if self.dirty { self.write(state) } else { Ok(()) }
    }

    pub(crate) fn write(&mut self, state: &MeshState) -> Result<()> {
        state.save(&self.path)?;
        self.dirty = false;
        self.written = Some(std::time::Instant::now());
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

    /// Security item 6: every push made this node rebuild its peer table and fsync its cache,
    /// also when it changed nothing; a peer alternating endpoints kept every node fsyncing.
    /// Now a repeated update changes nothing, and a peer's new endpoints are written at most
    /// every `CacheFile::PACE` (a removal, keys or rules at once).
    #[test]
    fn a_repeated_update_changes_nothing_and_endpoint_changes_are_written_at_a_pace() {
        let old = r#"{"node":{"name":"web","fingerprint":"SHA256:x","ipv4":"100.64.0.2","ipv6":"fd7a::2","tags":[]},
            "mesh_keys":["AAAA"],"ipv4_prefix":"100.64.0.0/10","ipv6_prefix":"fd7a::/48","peers":{},
            "policy":{"rules":[]},"stun_port":3478}"#;
        let mut state: MeshState = serde_json::from_str(old).unwrap();
        let peer = |port: u16| PeerInfo {
            name: "db".into(),
            fingerprint: "SHA256:db".into(),
            ssh_key: "ssh-ed25519 AAAA db".into(),
            ipv4: "100.64.0.3".into(),
            ipv6: "fd7a::3".into(),
            endpoints: vec![format!("198.18.0.3:{port}")],
            tags: vec![],
            nat: NatKind::None,
        };
        let upsert = |port| ServerMsg::PeerUpsert { peer: peer(port) };
        assert_eq!(state.apply(upsert(1)).unwrap(), Change::Peer);
        assert_eq!(state.apply(upsert(1)).unwrap(), Change::Nothing, "the same entry again");
        let gone = ServerMsg::PeerRemoved {
            fingerprint: "SHA256:nobody".into(),
        };
        assert_eq!(state.apply(gone).unwrap(), Change::Nothing);
        let keys = ServerMsg::MeshKeys {
            mesh_keys: vec!["AAAA".into()],
        };
        assert_eq!(state.apply(keys).unwrap(), Change::Nothing);

        let dir = tempfile::tempdir().unwrap();
        let mut cache = CacheFile::new(dir.path().join("state.json"));
        let on_disk =
            || MeshState::load(&dir.path().join("state.json")).map(|s| s.peers["SHA256:db"].endpoints.clone());
        cache.changed(&state, Change::Peer).unwrap();
        assert_eq!(on_disk().unwrap(), ["198.18.0.3:1"], "the first change is written");
        for port in 2..1_000 {
            let change = state.apply(upsert(port)).unwrap();
            cache.changed(&state, change).unwrap();
        }
        assert_eq!(
            on_disk().unwrap(),
            ["198.18.0.3:1"],
            "998 endpoint changes wait for the pace"
        );
        cache.flush_due(&state).unwrap();
        assert_eq!(
            on_disk().unwrap(),
            ["198.18.0.3:1"],
            "a tick inside the pace writes nothing"
        );
        let removed = state
            .apply(ServerMsg::PeerRemoved {
                fingerprint: "SHA256:db".into(),
            })
            .unwrap();
        cache.changed(&state, removed).unwrap();
        assert!(
            MeshState::load(&dir.path().join("state.json"))
                .unwrap()
                .peers
                .is_empty(),
            "a removal is written at once"
        );
        state.apply(upsert(7)).unwrap();
        cache.changed(&state, Change::Peer).unwrap();
        cache.flush_now(&state).unwrap();
        assert_eq!(
            on_disk().unwrap(),
            ["198.18.0.3:7"],
            "what waits is written when the connection ends"
        );
    }
}
