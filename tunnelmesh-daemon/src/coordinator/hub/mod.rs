//! The coordinator's live state: who is connected, admission decisions, and fan-out of changes.
//!
//! One [`Hub`] per coordinator, behind a mutex (control plane only; nothing here is per packet).
//! It owns the store, the address allocator and the admitted-keys list, and keeps one bounded
//! queue per connected peer. A peer whose queue overflows is disconnected (it reconnects and
//! gets a fresh welcome) so one slow peer never stalls the others.
//!
//! By concern: [`admit`] (hello → enrolled node), [`welcome`] (rendering it), [`policy`]
//! (compiling and pushing each node's rules), [`rendezvous`] (candidates and punches); here the
//! state, the store mirror, sessions and fan-out, and reconciling with the store.

mod admit;
mod policy;
mod rendezvous;
mod welcome;

pub use policy::{CompiledPolicies, PolicyJob, members, push_policies};
pub use rendezvous::{CANDIDATES_INTERVAL, MessageError, PUNCH_INTERVAL};

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Instant};

use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use super::{
    admission::AuthorizedKey,
    ipam::Ipam,
    store::{Admission, NodeRecord, Store, StoreError},
};
use crate::{
    control::{
        proto::{PeerInfo, ServerMsg},
        unix_now,
    },
    policy::{NodePolicy, PolicyFile},
    protocol::discovery::NatKind,
};

/// Messages queued per connected peer before it is considered too slow.
pub const PEER_QUEUE: usize = 1024;
/// How long the previous mesh key stays valid after a rotation.
pub const MESH_KEY_OVERLAP_SECS: i64 = 600;

/// Why a hello was refused; the message goes to the peer verbatim.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("malformed hello: {0}")]
    Malformed(String),
    #[error("the signature does not prove possession of {0}")]
    BadSignature(String),
    #[error("key {0} was revoked by the coordinator operator; it cannot rejoin")]
    Revoked(String),
    #[error(
        "key {0} is not authorized: add it to the coordinator's authorized_keys, or join with a token (token_file in [coordinator], or --token-file)"
    )]
    NotAuthorized(String),
    #[error(
        "the enrollment token is invalid, used up or expired; create one with `tunnelmesh coordinator token create`"
    )]
    BadToken,
    #[error("the name {0:?} belongs to another key; choose another with --name")]
    NameTaken(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NameNotAllowed(String),
    #[error("coordinator error: {0}")]
    Internal(String),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(n) => Refusal::NameTaken(n),
            other => Refusal::Internal(other.to_string()),
        }
    }
}

/// An admitted peer connection.
pub struct Admitted {
    pub fingerprint: String,
    /// Identifies this connection among the node's reconnections.
    pub connection: u64,
    /// The rendered welcome: a `welcome` message and the `peers` messages that complete it.
    pub welcome: Vec<String>,
    /// Updates to push to it.
    pub updates: mpsc::Receiver<Arc<ServerMsg>>,
}

struct Connection {
    id: u64,
    tx: mpsc::Sender<Arc<ServerMsg>>,
}

pub struct Hub {
    store: Box<dyn Store>,
    /// Every node record, mirrored from the store (the store stays the source of truth; every
    /// change is written there first).
    nodes: HashMap<String, NodeRecord>,
    /// Rendered `PeerInfo` JSON of each member, so a welcome is assembled, not re-serialized.
    peer_json: HashMap<String, String>,
    ipam: Ipam,
    authorized: HashMap<String, AuthorizedKey>,
    connections: HashMap<String, Connection>,
    next_connection: u64,
    pub coordinator_key: String,
    /// The fingerprint of the TLS certificate served (nodes pin it; join signatures cover it).
    pub certificate_fingerprint: String,
    /// Mesh keys as last pushed (base64, current first).
    pushed_mesh_keys: Vec<String>,
    /// The policy file in force (`None`: no file given, nothing is allowed).
    policy: Option<Arc<PolicyFile>>,
    /// Compiled policy as last sent to each connected node.
    pushed_policy: HashMap<String, NodePolicy>,
    /// Bumped by every change the connected nodes' rules may depend on; the generation last
    /// taken into a compile job and the newest one whose result was pushed.
    policy_generation: u64,
    policy_taken: u64,
    policy_applied: u64,
    policy_wake: Arc<Notify>,
    /// Revoked or removed fingerprints as last seen in the store.
    gone: std::collections::HashSet<String>,
    data_version: i64,
    /// UDP port of the first STUN target, told to peers in the welcome (0: none).
    pub stun_port: u16,
    /// Per node: the NAT kind it reported, and the UDP address its connection came from
    /// (`remote ip:listen port`, the guess used while it knows no better).
    nat: HashMap<String, NatKind>,
    observed: HashMap<String, SocketAddr>,
    /// When each pair (ordered by fingerprint) was last asked to punch.
    last_punch: HashMap<(String, String), Instant>,
    /// Per node: when its punch-budget window started, and the requests charged in it.
    punch_budget: HashMap<String, (Instant, u32)>,
    /// Per node: the pace of its peer entry's pushes (see [`rendezvous`]).
    paced: HashMap<String, rendezvous::Paced>,
}

impl Hub {
    pub fn new(
        store: Box<dyn Store>,
        ipam: Ipam,
        coordinator_key: String,
        certificate_fingerprint: String,
    ) -> Result<Self, StoreError> {
        let records = store.nodes()?;
        let gone = records
            .iter()
            .filter(|n| n.revoked || n.removed)
            .map(|n| n.fingerprint.clone())
            .collect();
        let data_version = store.data_version()?;
        let mut hub = Hub {
            store,
            nodes: HashMap::new(),
            peer_json: HashMap::new(),
            ipam,
            authorized: HashMap::new(),
            connections: HashMap::new(),
            next_connection: 0,
            coordinator_key,
            certificate_fingerprint,
            pushed_mesh_keys: Vec::new(),
            policy: None,
            pushed_policy: HashMap::new(),
            policy_generation: 0,
            policy_taken: 0,
            policy_applied: 0,
            policy_wake: Arc::new(Notify::new()),
            gone,
            data_version,
            stun_port: 0,
            nat: HashMap::new(),
            observed: HashMap::new(),
            last_punch: HashMap::new(),
            punch_budget: HashMap::new(),
            paced: HashMap::new(),
        };
        hub.pushed_mesh_keys = hub.effective_mesh_keys()?;
        for record in records {
            hub.remember(record);
        }
        Ok(hub)
    }

    /// Put the `authorized_keys` entries `keys` in force. A member admitted by its line that is
    /// no longer listed is removed from the mesh at once (its peers drop it; it may rejoin with
    /// a token); a member whose line's tags changed takes them (peers and policies follow).
    pub fn set_authorized(&mut self, keys: HashMap<String, AuthorizedKey>) -> Result<(), StoreError> {
        self.authorized = keys;
        let mut changed = false;
        let members: Vec<NodeRecord> = self
            .nodes
            .values()
            .filter(|n| !n.revoked && !n.removed)
            .cloned()
            .collect();
        for node in members {
            match (self.authorized.get(&node.fingerprint), node.admitted_by) {
                (None, Admission::Key) => {
                    self.store.set_removed(&node.fingerprint, true)?;
                    let node = NodeRecord { removed: true, ..node };
                    self.remember(node.clone());
                    self.drop_member(node, "removed from the mesh (its authorized_keys line is gone)");
                    changed = true;
                }
                (Some(a), by) if a.tags != node.tags || by != Admission::Key => {
                    self.store.set_admission(&node.fingerprint, Admission::Key, &a.tags)?;
                    let node = NodeRecord {
                        tags: a.tags.clone(),
                        admitted_by: Admission::Key,
                        ..node
                    };
                    info!(name = %node.name, tags = ?node.tags, "tags follow the node's authorized_keys line");
                    self.remember(node.clone());
                    self.broadcast(
                        Some(&node.fingerprint),
                        ServerMsg::PeerUpsert {
                            peer: self.peer_info(&node),
                        },
                    );
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            self.policies_changed();
        }
        Ok(())
    }

    pub fn connected(&self) -> usize {
        self.connections.len()
    }

    /// Member nodes: admitted, neither revoked nor removed.
    pub fn member_count(&self) -> usize {
        self.nodes.values().filter(|n| !n.revoked && !n.removed).count()
    }

    /// Mesh keys peers should hold now: the newest, plus the previous one during the overlap.
    fn effective_mesh_keys(&self) -> Result<Vec<String>, StoreError> {
        let keys = self.store.mesh_keys()?;
        let mut out: Vec<String> = keys.first().map(|k| k.key.clone()).into_iter().collect();
        if let (Some(newest), Some(previous)) = (keys.first(), keys.get(1))
            && unix_now() - newest.created < MESH_KEY_OVERLAP_SECS
        {
            out.push(previous.key.clone());
        }
        Ok(out)
    }

    /// Mirror `record` (and its rendered peer entry while it is a member).
    fn remember(&mut self, record: NodeRecord) {
        if record.revoked || record.removed {
            self.peer_json.remove(&record.fingerprint);
        } else {
            let json = to_json(&self.peer_info(&record));
            self.peer_json.insert(record.fingerprint.clone(), json);
        }
        self.nodes.insert(record.fingerprint.clone(), record);
    }

    fn peer_info(&self, n: &NodeRecord) -> PeerInfo {
        let (v4, v6) = self.ipam.addresses(n.host);
        PeerInfo {
            name: n.name.clone(),
            fingerprint: n.fingerprint.clone(),
            ssh_key: n.public_key.clone(),
            ipv4: v4.to_string(),
            ipv6: v6.to_string(),
            endpoints: n.endpoints.clone(),
            tags: n.tags.clone(),
            nat: self.nat.get(&n.fingerprint).copied().unwrap_or_default(),
        }
    }

    /// The connection `id` of `fingerprint` ended.
    pub fn disconnect(&mut self, fingerprint: &str, id: u64) {
        if self.connections.get(fingerprint).is_some_and(|s| s.id == id) {
            self.connections.remove(fingerprint);
            self.pushed_policy.remove(fingerprint);
        }
    }

    /// Queue `msg` for every connected peer except `except`; drop peers that cannot keep up.
    pub fn broadcast(&mut self, except: Option<&str>, msg: ServerMsg) {
        let msg = Arc::new(msg);
        let mut slow = Vec::new();
        for (fp, s) in &self.connections {
            if Some(fp.as_str()) != except && s.tx.try_send(msg.clone()).is_err() {
                slow.push(fp.clone());
            }
        }
        for fp in slow {
            warn!(fingerprint = %fp, "peer cannot keep up with updates; disconnecting it (it will resync)");
            self.connections.remove(&fp);
        }
    }

    /// The operator revokes `fingerprint` (in the store) and the hub notices, for the fuzz
    /// targets (the store is the hub's own).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn revoke_now(&mut self, fingerprint: &str) -> Result<(), StoreError> {
        self.store.revoke(fingerprint)?;
        self.reconcile()
    }

    /// Pick up changes made by the CLI (revocations, mesh-key rotation) and the end of a
    /// mesh-key overlap, and push them.
    pub fn reconcile(&mut self) -> Result<(), StoreError> {
        let version = self.store.data_version()?;
        let keys = self.effective_mesh_keys()?;
        if keys != self.pushed_mesh_keys {
            info!(keys = keys.len(), "mesh keys changed; pushing");
            self.pushed_mesh_keys = keys.clone();
            self.broadcast(None, ServerMsg::MeshKeys { mesh_keys: keys });
        }
        if version == self.data_version {
            return Ok(());
        }
        self.data_version = version;
        let records = self.store.nodes()?;
        for record in &records {
            self.remember(record.clone());
        }
        for node in records.into_iter().filter(|n| n.revoked || n.removed) {
            let what = if node.revoked {
                "revoked"
            } else {
                "removed from the mesh"
            };
            self.drop_member(node, what);
        }
        self.policies_changed();
        Ok(())
    }

    /// Tell `node`'s connection why it ends and every peer that it is gone (once).
    fn drop_member(&mut self, node: NodeRecord, what: &str) {
        if !self.gone.insert(node.fingerprint.clone()) {
            return;
        }
        info!(name = %node.name, fingerprint = %node.fingerprint, "node {what}; telling every peer");
        self.paced.remove(&node.fingerprint);
        if let Some(s) = self.connections.remove(&node.fingerprint) {
            let _ = s.tx.try_send(Arc::new(ServerMsg::Revoked {
                message: format!("key {} was {what} by the coordinator operator", node.fingerprint),
            }));
        }
        self.broadcast(
            None,
            ServerMsg::PeerRemoved {
                fingerprint: node.fingerprint,
            },
        );
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

#[cfg(test)]
mod tests;
