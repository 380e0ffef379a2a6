//! A peer as the data plane and the slow path see it: its keys, endpoint, activity stamps,
//! chosen path and counters — lock-free for the workers (snapshots and atomics).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use ipnet::IpNet;

use super::{Clock, PathKind};
use crate::{
    identity::PublicIdentity,
    protocol::{
        discovery::NatKind,
        path::PathReport,
        session::{Activity, Keypair},
    },
    sync::lock,
};

/// Packets queued per peer while its handshake completes.
pub const MAX_STAGED: usize = 128;

/// The keys of one peer: `current` sends; `previous` still receives; `next` is a responder key
/// awaiting the peer's first data packet (key confirmation).
#[derive(Default, Clone)]
pub struct KeySet {
    pub current: Option<Arc<Keypair>>,
    pub previous: Option<Arc<Keypair>>,
    pub next: Option<Arc<Keypair>>,
}

/// Latest activity times of a peer, written by workers (relaxed atomics, `Clock` stamps).
#[derive(Default)]
pub struct ActivityStamps {
    pub data_sent: AtomicU64,
    pub data_received: AtomicU64,
    pub any_sent: AtomicU64,
    pub any_received: AtomicU64,
}

impl ActivityStamps {
    /// Store `stamp` unless a later one is there already (avoids needless cache-line writes).
    #[inline]
    pub fn touch(slot: &AtomicU64, stamp: u64) {
        if slot.load(Ordering::Relaxed) < stamp {
            slot.store(stamp, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self, clock: &Clock) -> Activity {
        let get = |a: &AtomicU64| clock.instant(a.load(Ordering::Relaxed));
        Activity {
            data_sent: get(&self.data_sent),
            data_received: get(&self.data_received),
            any_sent: get(&self.any_sent),
            any_received: get(&self.any_received),
        }
    }
}

/// One configured peer.
pub struct Peer {
    pub name: String,
    pub identity: PublicIdentity,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<Duration>,
    pub endpoint: ArcSwapOption<SocketAddr>,
    pub keys: ArcSwap<KeySet>,
    pub activity: ActivityStamps,
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Unix time (seconds) of the last completed handshake; 0 if none.
    pub last_handshake_unix: AtomicU64,
    /// Packets waiting for a session (slow path only).
    pub staged: Mutex<VecDeque<Vec<u8>>>,
    /// Set by a worker that asked the slow path for a session; cleared when served.
    pub session_requested: AtomicBool,
    /// The path traffic goes on ([`PathKind`] as `u8`), chosen by the slow path.
    pub path: AtomicU8,
    /// Last authenticated message received on each path ([`Clock`] stamps, by [`PathKind`]).
    pub rx_via: [AtomicU64; 3],
    /// The peer's SSH transport (`ip:port`), if it runs one.
    pub ssh_endpoint: Option<SocketAddr>,
    /// Messages to send on the SSH connection with this peer, while one is up.
    pub ssh_tx: ArcSwapOption<tokio::sync::mpsc::Sender<Vec<u8>>>,
    /// The path manager wants an SSH connection (UDP is not working).
    pub want_ssh: AtomicBool,
    /// The path manager's view, refreshed by the slow path for `tunnelmesh status`.
    pub paths: ArcSwap<Vec<PathReport>>,
    /// Where the peer says it may be reached over UDP, and the NAT in front of it.
    pub remote: ArcSwap<RemoteCandidates>,
    /// Data-plane workers that opened data from this peer (bit `i`: worker `i`, up to 64).
    pub rx_workers: AtomicU64,
    /// Punches started (asked for by either side), and punches that ended in a direct path.
    pub punches_started: AtomicU64,
    pub punches_succeeded: AtomicU64,
}

/// A peer's UDP candidates, best first, and its NAT kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteCandidates {
    pub endpoints: Vec<SocketAddr>,
    pub nat: NatKind,
}

impl Peer {
    pub fn new(spec: PeerSpec) -> Self {
        Peer {
            name: spec.name,
            identity: spec.identity,
            allowed_ips: spec.allowed_ips,
            persistent_keepalive: spec.persistent_keepalive,
            endpoint: ArcSwapOption::from(spec.endpoint.map(Arc::new)),
            keys: ArcSwap::from_pointee(KeySet::default()),
            activity: ActivityStamps::default(),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            last_handshake_unix: AtomicU64::new(0),
            staged: Mutex::new(VecDeque::new()),
            session_requested: AtomicBool::new(false),
            path: AtomicU8::new(PathKind::Udp as u8),
            rx_via: Default::default(),
            ssh_endpoint: spec.ssh_endpoint,
            ssh_tx: ArcSwapOption::empty(),
            want_ssh: AtomicBool::new(false),
            paths: ArcSwap::from_pointee(Vec::new()),
            remote: ArcSwap::from_pointee(RemoteCandidates {
                endpoints: spec.candidates,
                nat: spec.nat,
            }),
            rx_workers: AtomicU64::new(0),
            punches_started: AtomicU64::new(0),
            punches_succeeded: AtomicU64::new(0),
        }
    }

    /// The path traffic to this peer goes on.
    #[inline]
    pub fn path(&self) -> PathKind {
        PathKind::from_u8(self.path.load(Ordering::Relaxed))
    }

    /// Take the packets that waited for a session.
    pub fn take_staged(&self) -> Vec<Vec<u8>> {
        lock(&self.staged).drain(..).collect()
    }

    /// Take an endpoint from configuration or the coordinator, unless the peer has proven a
    /// different one recently (authenticated roaming wins over hearsay).
    pub fn suggest_endpoint(&self, endpoint: SocketAddr) {
        let current = self.endpoint.load();
        if current.as_deref() == Some(&endpoint) {
            return;
        }
        let heard_recently = self
            .keys
            .load()
            .current
            .as_ref()
            .is_some_and(|k| k.created.elapsed() < crate::protocol::session::REJECT_AFTER_TIME);
        if current.is_none() || !heard_recently {
            self.endpoint.store(Some(Arc::new(endpoint)));
        }
    }
}

/// What a peer is, as configuration or the coordinator describes it.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub identity: PublicIdentity,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    /// Where the peer's SSH transport listens, if it runs one.
    pub ssh_endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<Duration>,
    /// Every UDP endpoint the peer may be reached at (`endpoint` is the one to send to
    /// unprompted, if any); tried all at once when punching.
    pub candidates: Vec<SocketAddr>,
    pub nat: NatKind,
}
