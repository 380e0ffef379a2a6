//! The peer table (replaced whole on membership changes; peers that stay are carried over) and
//! the session index entries the workers find a message's key by.

use std::{collections::HashMap, sync::Arc};

use super::{Peer, PeerSpec, RemoteCandidates};
use crate::protocol::{routing::AllowedIps, session::Keypair};

/// A receive key and the peer it belongs to, found by the index in a message.
pub struct IndexEntry {
    pub peer: Arc<Peer>,
    pub keypair: Arc<Keypair>,
}

/// The current set of peers, replaced as a whole when membership changes. `Peer` objects of keys
/// that stay are carried over, so their sessions, endpoints and counters survive an update.
#[derive(Default)]
pub struct PeerTable {
    pub peers: Vec<Arc<Peer>>,
    pub by_key: HashMap<[u8; 32], usize>,
    pub routes: AllowedIps<usize>,
}

impl PeerTable {
    /// Build a table from `specs`, reusing peers of `previous` with the same key.
    pub fn build(specs: Vec<PeerSpec>, previous: &PeerTable) -> Self {
        let mut table = PeerTable::default();
        for spec in specs {
            let key = *spec.identity.noise_public();
            if table.by_key.contains_key(&key) {
                continue;
            }
            let peer = match previous.get(&key) {
                Some(old) if old.allowed_ips == spec.allowed_ips && old.ssh_endpoint == spec.ssh_endpoint => {
                    if let Some(endpoint) = spec.endpoint {
                        old.suggest_endpoint(endpoint);
                    }
                    let remote = RemoteCandidates {
                        endpoints: spec.candidates,
                        nat: spec.nat,
                    };
                    if **old.remote.load() != remote {
                        old.remote.store(Arc::new(remote));
                    }
                    old.clone()
                }
                _ => Arc::new(Peer::new(spec)),
            };
            let i = table.peers.len();
            for net in &peer.allowed_ips {
                table.routes.insert(*net, i);
            }
            table.by_key.insert(key, i);
            table.peers.push(peer);
        }
        table
    }

    /// The peer with Noise public key `key`.
    pub fn get(&self, key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(key).map(|&i| &self.peers[i])
    }

    /// The peer owning inner address `ip` (cryptokey routing).
    #[inline]
    pub fn route(&self, ip: std::net::IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(ip).map(|i| &self.peers[i])
    }
}
