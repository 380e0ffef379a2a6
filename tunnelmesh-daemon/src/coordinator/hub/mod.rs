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

pub use policy::members;
pub use rendezvous::{MessageError, PUNCH_INTERVAL};

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Instant};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    admission::AuthorizedKey,
    ipam::Ipam,
    store::{NodeRecord, Store, StoreError},
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
    #[error("key {0} is not authorized: add it to the coordinator's authorized_keys, or join with --token")]
    NotAuthorized(String),
    #[error(
        "the enrollment token is invalid, used up or expired; create one with `tunnelmesh coordinator token create`"
    )]
    BadToken,
    #[error("the name {0:?} belongs to another key; choose another with --name")]
    NameTaken(String),
    #[error("{0}")]
    Invalid(String),
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
    /// Mesh keys as last pushed (base64, current first).
    pushed_mesh_keys: Vec<String>,
    /// The policy file in force (`None`: no file given, nothing is allowed).
    policy: Option<PolicyFile>,
    /// Compiled policy as last sent to each connected node.
    pushed_policy: HashMap<String, NodePolicy>,
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
}

impl Hub {
    pub fn new(store: Box<dyn Store>, ipam: Ipam, coordinator_key: String) -> Result<Self, StoreError> {
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
            pushed_mesh_keys: Vec::new(),
            policy: None,
            pushed_policy: HashMap::new(),
            gone,
            data_version,
            stun_port: 0,
            nat: HashMap::new(),
            observed: HashMap::new(),
            last_punch: HashMap::new(),
        };
        hub.pushed_mesh_keys = hub.effective_mesh_keys()?;
        for record in records {
            hub.remember(record);
        }
        Ok(hub)
    }

    pub fn set_authorized(&mut self, keys: HashMap<String, AuthorizedKey>) {
        self.authorized = keys;
    }

    pub fn connected(&self) -> usize {
        self.connections.len()
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
            if self.gone.insert(node.fingerprint.clone()) {
                let what = if node.revoked {
                    "revoked"
                } else {
                    "removed from the mesh"
                };
                info!(name = %node.name, fingerprint = %node.fingerprint, "node {what}; telling every peer");
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
        self.push_policies();
        Ok(())
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

/// Base64 of a new random mesh key.
pub fn new_mesh_key() -> String {
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    BASE64.encode(key)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::coordinator::store::{MeshKeyRecord, SqliteStore, TokenRecord};
    use crate::{
        control::proto::{ClientMsg, JOIN_NAMESPACE, WELCOME_CHUNK},
        coordinator::admission,
    };

    fn hub() -> Hub {
        let store = SqliteStore::in_memory().unwrap();
        store
            .add_mesh_key(&MeshKeyRecord {
                key: new_mesh_key(),
                created: unix_now(),
            })
            .unwrap();
        let hash = admission::token_hash("tmtok_test");
        store
            .insert_token(&TokenRecord {
                hash,
                uses_left: 10_000,
                expires: unix_now() + 60,
                tags: vec!["t".into()],
            })
            .unwrap();
        let ipam = Ipam::new("100.64.0.0/10".parse().unwrap(), "fd00::/64".parse().unwrap(), []).unwrap();
        Hub::new(Box::new(store), ipam, "ssh-ed25519 AAAA coordinator".into()).unwrap()
    }

    fn hello(id: &crate::identity::Identity, nonce: &[u8], token: Option<&str>) -> ClientMsg {
        ClientMsg::Hello {
            ssh_key: id.public().ssh_line_with_comment(),
            signature: id.sign(JOIN_NAMESPACE, nonce),
            token: token.map(str::to_string),
            name: None,
            listen_port: 51820,
            endpoints: vec![],
            ssh_port: None,
            nat: NatKind::Unknown,
        }
    }

    #[test]
    fn a_large_welcome_comes_in_bounded_parts_that_add_up_to_every_peer() {
        let mut hub = hub();
        let remote: IpAddr = "198.18.0.9".parse().unwrap();
        for i in 0..600 {
            let (id, _) = crate::identity::Identity::generate(&format!("root@n{i}"));
            hub.admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote).unwrap();
        }
        let (id, _) = crate::identity::Identity::generate("root@last");
        let admitted = hub.admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote).unwrap();
        assert_eq!(admitted.welcome.len(), 3, "600 peers in parts of {WELCOME_CHUNK}");
        let mut peers = 0;
        for (i, part) in admitted.welcome.iter().enumerate() {
            let more = i + 1 < admitted.welcome.len();
            match serde_json::from_str::<ServerMsg>(part).unwrap() {
                ServerMsg::Welcome {
                    peers: p,
                    more: m,
                    node,
                    ..
                } if i == 0 => {
                    assert_eq!((m, node.name.as_str()), (more, "last"));
                    peers += p.len();
                }
                ServerMsg::Peers { peers: p, more: m } if i > 0 => {
                    assert_eq!(m, more);
                    peers += p.len();
                }
                other => panic!("unexpected part {i}: {other:?}"),
            }
        }
        assert_eq!(peers, 600);
    }

    /// Every message queued for a connected node so far.
    fn drain(rx: &mut mpsc::Receiver<Arc<ServerMsg>>) -> Vec<ServerMsg> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| (*m).clone())
            .collect()
    }

    #[test]
    fn candidates_are_checked_kept_and_pushed_and_a_punch_reaches_both_sides_at_once() {
        let mut hub = hub();
        let nat_d: IpAddr = "198.18.0.9".parse().unwrap();
        let (a, _) = crate::identity::Identity::generate("root@a");
        let (b, _) = crate::identity::Identity::generate("root@b");
        // a says it has host address 10.0.0.2: its connection from 198.18.0.9 went through NAT.
        let mut hello_a = hello(&a, b"n", Some("tmtok_test"));
        if let ClientMsg::Hello { endpoints, .. } = &mut hello_a {
            endpoints.push("10.0.0.2:51820".into());
        }
        let mut a_conn = hub.admit(hello_a, b"n", nat_d).unwrap();
        // b's connection comes from its own address: not behind NAT.
        let mut hello_b = hello(&b, b"n", Some("tmtok_test"));
        if let ClientMsg::Hello { endpoints, .. } = &mut hello_b {
            endpoints.push("198.18.0.20:51820".into());
        }
        let mut b_conn = hub.admit(hello_b, b"n", "198.18.0.20".parse().unwrap()).unwrap();
        let info = |hub: &Hub, fp: &str| hub.peer_info(&hub.nodes[fp]);
        assert_eq!(info(&hub, &b_conn.fingerprint).nat, NatKind::None);
        let a_info = info(&hub, &a_conn.fingerprint);
        assert_eq!(a_info.nat, NatKind::Unknown);
        assert_eq!(
            a_info.endpoints,
            ["10.0.0.2:51820", "198.18.0.9:51820"],
            "until STUN says better, the connection's address with the listen port is a guess"
        );
        drain(&mut b_conn.updates);

        // STUN told a its public address: kept, the guess dropped, and b is told.
        let stun = ClientMsg::Candidates {
            endpoints: vec!["10.0.0.2:51820".into(), "198.18.0.9:40000".into()],
            nat: NatKind::Hard,
        };
        hub.on_message(&a_conn.fingerprint, stun.clone()).unwrap();
        let a_info = info(&hub, &a_conn.fingerprint);
        assert_eq!(
            (a_info.endpoints.as_slice(), a_info.nat),
            (
                &["10.0.0.2:51820".to_string(), "198.18.0.9:40000".into()][..],
                NatKind::Hard
            )
        );
        match drain(&mut b_conn.updates).as_slice() {
            [ServerMsg::PeerUpsert { peer }] => assert_eq!(peer, &a_info),
            other => panic!("b should get one upsert: {other:?}"),
        }
        hub.on_message(&a_conn.fingerprint, stun).unwrap();
        assert!(drain(&mut b_conn.updates).is_empty(), "no change, no push");

        // Bad input is refused with a reason, and changes nothing.
        let nine = (0..9).map(|i| format!("10.0.0.{i}:1")).collect();
        for (bad, why) in [(vec!["10.0.0.2".to_string()], "is not ip:port"), (nine, "at most 8")] {
            let err = hub
                .on_message(
                    &a_conn.fingerprint,
                    ClientMsg::Candidates {
                        endpoints: bad,
                        nat: NatKind::Easy,
                    },
                )
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{err}");
        }
        assert_eq!(info(&hub, &a_conn.fingerprint), a_info);

        // A punch: both sides hear about the other, with its candidates, in one go.
        drain(&mut a_conn.updates);
        hub.on_message(
            &a_conn.fingerprint,
            ClientMsg::Punch {
                peer: b_conn.fingerprint.clone(),
            },
        )
        .unwrap();
        let to_a = drain(&mut a_conn.updates);
        let to_b = drain(&mut b_conn.updates);
        assert!(
            matches!(to_a.as_slice(), [ServerMsg::Punch { peer, endpoints, nat: NatKind::None }]
            if *peer == b_conn.fingerprint && endpoints == &["198.18.0.20:51820"]),
            "{to_a:?}"
        );
        assert!(
            matches!(to_b.as_slice(), [ServerMsg::Punch { peer, endpoints, nat: NatKind::Hard }]
            if *peer == a_conn.fingerprint && endpoints.len() == 2),
            "{to_b:?}"
        );
        // The pair is asked at most every PUNCH_INTERVAL, whoever asks.
        hub.on_message(
            &b_conn.fingerprint,
            ClientMsg::Punch {
                peer: a_conn.fingerprint.clone(),
            },
        )
        .unwrap();
        assert!(drain(&mut a_conn.updates).is_empty() && drain(&mut b_conn.updates).is_empty());
        assert!(
            hub.on_message(
                &a_conn.fingerprint,
                ClientMsg::Punch {
                    peer: a_conn.fingerprint.clone()
                }
            )
            .is_err()
        );
        assert!(
            hub.on_message(
                &a_conn.fingerprint,
                ClientMsg::Punch {
                    peer: "SHA256:nobody".into()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn admission_checks_the_signature_the_token_and_revocation() {
        let mut hub = hub();
        let remote: IpAddr = "198.18.0.9".parse().unwrap();
        let (id, _) = crate::identity::Identity::generate("root@web");
        // A signature over another nonce proves nothing.
        let err = hub
            .admit(hello(&id, b"old nonce", Some("tmtok_test")), b"fresh", remote)
            .err()
            .unwrap();
        assert!(matches!(err, Refusal::BadSignature(_)), "{err}");
        let err = hub.admit(hello(&id, b"n", None), b"n", remote).err().unwrap();
        assert!(matches!(err, Refusal::NotAuthorized(_)), "{err}");
        let err = hub
            .admit(hello(&id, b"n", Some("tmtok_forged")), b"n", remote)
            .err()
            .unwrap();
        assert!(matches!(err, Refusal::BadToken), "{err}");
        let first = hub.admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote).unwrap();
        // The same key again gets the same address, without a token.
        let again = hub.admit(hello(&id, b"n", None), b"n", remote).unwrap();
        assert_eq!(
            first.welcome[0].split("\"peers\"").next(),
            again.welcome[0].split("\"peers\"").next()
        );
        // The operator revokes from another process (another connection to the store).
        hub.store.revoke("web").unwrap();
        hub.data_version -= 1;
        hub.reconcile().unwrap();
        let err = hub
            .admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote)
            .err()
            .unwrap();
        assert!(matches!(err, Refusal::Revoked(_)), "{err}");
    }
}
