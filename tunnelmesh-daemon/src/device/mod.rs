//! The shared state of a running mesh interface: peers, their keys and endpoints, the session
//! index table, counters.
//!
//! Two kinds of thread touch it. Data-plane workers read it on every packet without locks
//! (`ArcSwap` snapshots, atomics) and only write atomics, plus the rare endpoint change on
//! roaming and the promotion of a confirmed responder key. The slow path
//! ([`crate::slowpath`]) owns everything else: handshake state, timers, cookies, and it is the
//! only writer of keys and of the index table. Workers reach it through a bounded channel of
//! [`Event`]s.

pub mod policy;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use ipnet::IpNet;
use serde::Serialize;
use zeroize::Zeroizing;

pub use crate::protocol::path::PathKind;
use crate::{
    identity::PublicIdentity,
    protocol::{
        discovery::{Candidates, NatKind},
        path::PathReport,
        routing::AllowedIps,
        session::{Activity, Keypair},
    },
    sync::lock,
};

/// Packets queued per peer while its handshake completes.
pub const MAX_STAGED: usize = 128;

/// Monotonic milliseconds since the device started; 0 means "never".
#[derive(Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new(epoch: Instant) -> Self {
        Clock { epoch }
    }
    /// Milliseconds since the epoch, plus one so that 0 stays "never".
    pub fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }
    pub fn instant(&self, stamp: u64) -> Option<Instant> {
        (stamp != 0).then(|| self.epoch + Duration::from_millis(stamp - 1))
    }
}

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
    /// Set by a worker that asked the handshake thread for a session; cleared when served.
    pub session_requested: AtomicBool,
    /// The path traffic goes on ([`PathKind`] as `u8`), chosen by the handshake thread.
    pub path: AtomicU8,
    /// Last authenticated message received on each path ([`Clock`] stamps, by [`PathKind`]).
    pub rx_via: [AtomicU64; 3],
    /// The peer's SSH transport (`ip:port`), if it runs one.
    pub ssh_endpoint: Option<SocketAddr>,
    /// Messages to send on the SSH connection with this peer, while one is up.
    pub ssh_tx: ArcSwapOption<tokio::sync::mpsc::Sender<Vec<u8>>>,
    /// The path manager wants an SSH connection (UDP is not working).
    pub want_ssh: AtomicBool,
    /// The path manager's view, refreshed by the handshake thread for `tunnelmesh status`.
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

/// A receive key and the peer it belongs to, found by the index in a message.
pub struct IndexEntry {
    pub peer: Arc<Peer>,
    pub keypair: Arc<Keypair>,
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

/// Something that must know the live receiver indices (the XDP shield). The handshake thread
/// adds an index before a message naming it can arrive, and removes it when the key goes.
pub trait IndexMirror: Send {
    fn insert(&self, index: u32);
    fn remove(&self, index: u32);
}

/// What workers tell the handshake thread.
pub enum Event {
    /// A handshake message (initiation, response or cookie reply) that came `via` a path.
    Handshake { msg: Vec<u8>, via: Via },
    /// The peer has packets to send but no usable key.
    NeedSession(Arc<Peer>),
    /// The peer confirmed its `next` key by sending data on it.
    KeyConfirmed(Arc<Peer>),
    /// The peer table or the mesh keys changed.
    PeersChanged,
    /// A data message for an index we do not know came `via` a path: the sender has a session
    /// we lost (we restarted). If it is a peer's, re-handshake at once.
    StaleSession(Via),
    /// A path probe (request or reply) from `peer`, authenticated by its session key.
    Probe {
        peer: Arc<Peer>,
        via: Via,
        reply: bool,
        nonce: u64,
    },
    /// `tunnelmesh ping`: probe every available path to the peer named `peer`.
    Ping {
        peer: String,
        answer: crossbeam_channel::Sender<Result<PingReport, String>>,
    },
    /// A STUN response on the tunnel port.
    Stun { msg: Vec<u8>, from: SocketAddr },
    /// The coordinator asks us to punch towards the peer with this Noise key, now.
    Punch {
        key: [u8; 32],
        candidates: Vec<SocketAddr>,
        nat: NatKind,
    },
    /// This machine's addresses or routes changed (netlink).
    NetworkChanged,
}

/// What the slow path asks of the coordinator; the coordinator client turns it into a protocol
/// message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordinatorRequest {
    /// Publish this node's candidates (best first) and its NAT kind.
    Candidates { endpoints: Vec<SocketAddr>, nat: NatKind },
    /// Have both sides punch towards the peer with this fingerprint.
    Punch { peer: String },
}

/// Where a message came from, or goes to: a UDP address, or a peer's SSH connection or relay
/// channel (named by the peer's Noise key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Udp(SocketAddr),
    Ssh([u8; 32]),
    Relay([u8; 32]),
}

impl Via {
    pub fn kind(&self) -> PathKind {
        match self {
            Via::Udp(_) => PathKind::Udp,
            Via::Ssh(_) => PathKind::Ssh,
            Via::Relay(_) => PathKind::Relay,
        }
    }

    /// `peer` reached on path `kind` (`None` for UDP without a known endpoint).
    pub fn to_peer(peer: &Peer, kind: PathKind) -> Option<Via> {
        let key = *peer.identity.noise_public();
        match kind {
            PathKind::Udp => peer.endpoint.load().as_deref().map(|e| Via::Udp(*e)),
            PathKind::Ssh => Some(Via::Ssh(key)),
            PathKind::Relay => Some(Via::Relay(key)),
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Udp(a) => write!(f, "udp {a}"),
            Via::Ssh(_) => f.write_str("ssh"),
            Via::Relay(_) => f.write_str("relay"),
        }
    }
}

/// Answers of `tunnelmesh ping`: the path in use and each path's round trip.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PingReport {
    pub peer: String,
    pub current: Option<PathKind>,
    /// (path, where, round trip in ms or None if unanswered).
    pub paths: Vec<(PathKind, String, Option<f64>)>,
}

/// Drop and error counters of the interface, as shown by `tunnelmesh status`.
#[derive(Default, Serialize)]
pub struct Counters {
    /// Datagrams that are not a valid message (bad type/length).
    pub rx_malformed: AtomicU64,
    /// Data messages naming no session we have.
    pub rx_unknown_index: AtomicU64,
    /// Data messages that did not authenticate.
    pub rx_auth_failed: AtomicU64,
    /// Replayed or too-old data messages.
    pub rx_replayed: AtomicU64,
    /// Decrypted packets whose inner source is not an allowed IP of the sender.
    pub rx_spoofed_source: AtomicU64,
    /// Decrypted packets that are not IPv4/IPv6.
    pub rx_bad_inner: AtomicU64,
    /// Handshake messages with a bad mac1, from an unknown key, or that do not decrypt.
    pub handshake_rejected: AtomicU64,
    /// Initiations whose timestamp was not newer than the last (replays).
    pub handshake_replayed: AtomicU64,
    /// Cookie replies sent because we were under load.
    pub cookie_replies_sent: AtomicU64,
    /// Handshake messages dropped because the handshake queue was full.
    pub handshake_queue_full: AtomicU64,
    /// Outbound packets to an address no peer owns.
    pub tx_no_route: AtomicU64,
    /// Outbound packets dropped: peer has no endpoint, or its queue overflowed.
    pub tx_dropped: AtomicU64,
    /// Datagrams the kernel refused to send (no route to the endpoint, …).
    pub tx_send_failed: AtomicU64,
    /// Messages for the SSH or relay path dropped: no connection, or its queue was full.
    pub tx_overlay_dropped: AtomicU64,
    /// Messages from the SSH or relay path dropped because the data plane's inbox was full.
    pub rx_overlay_dropped: AtomicU64,
    /// SSH servers that presented a host key other than the peer's mesh key (refused).
    pub ssh_host_key_mismatch: AtomicU64,
    /// TUN reads with a malformed virtio header or super-packet (dropped).
    pub tun_bad_offload: AtomicU64,
    /// Packets the TUN device refused to take.
    pub tun_write_failed: AtomicU64,
    /// Received TCP segments coalesced into a super-packet before the previous one (GRO).
    pub rx_coalesced: AtomicU64,
    /// Times a worker's socket fell back from UDP GSO to one datagram per message.
    pub udp_gso_refused: AtomicU64,
}

impl Counters {
    #[inline]
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where the coordinator connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// Started from the cached state; joining.
    Connecting,
    Connected,
    /// Lost; tunnels keep running on the last state while we reconnect.
    Disconnected,
    /// The coordinator will not have this node (certificate mismatch, refused hello): the
    /// operator must act.
    Refused,
    /// Revoked while connected: every peer was dropped.
    Revoked,
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Refused => "refused",
            ConnectionState::Revoked => "revoked",
        })
    }
}

/// The coordinator connection, as `tunnelmesh status` reports it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ControlState {
    pub url: String,
    pub state: ConnectionState,
    pub last_error: Option<String>,
    /// Unix time of the last update received.
    pub last_update_unix: Option<u64>,
}

/// A running mesh interface.
pub struct Device {
    pub interface: String,
    pub mtu: usize,
    /// What the TUN device offloads (fixed when its queues open).
    pub offloads: crate::sys::tun::Offloads,
    pub listen_port: u16,
    pub local: PublicIdentity,
    /// Our own mesh addresses.
    pub addresses: Vec<IpNet>,
    /// Coordinator connection, when the mesh is coordinated.
    pub control: ArcSwapOption<ControlState>,
    /// Inbound rules from the coordinator (default deny) and their enforcer; none in a static
    /// mesh, where every configured peer may reach this node.
    pub policy: policy::PolicyEnforcer,
    pub peers: ArcSwap<PeerTable>,
    /// Mesh keys (the Noise PSK), current first; during a rotation the previous one follows.
    pub mesh_keys: ArcSwap<Vec<Zeroizing<[u8; 32]>>>,
    pub sessions: ArcSwap<HashMap<u32, Arc<IndexEntry>>>,
    pub counters: Counters,
    pub clock: Clock,
    pub events: crossbeam_channel::Sender<Event>,
    pub shutdown: Arc<AtomicBool>,
    pub started: Instant,
    /// The relay channel through the coordinator, while connected: (peer's Noise key, message).
    pub relay_tx: ArcSwapOption<tokio::sync::mpsc::Sender<([u8; 32], Vec<u8>)>>,
    /// Requests for the coordinator (candidates, punches), while connected.
    pub coordinator_tx: ArcSwapOption<tokio::sync::mpsc::Sender<CoordinatorRequest>>,
    /// The coordinator's two STUN targets.
    pub stun_targets: ArcSwapOption<[SocketAddr; 2]>,
    /// This node's candidates as last learned (for the coordinator and `status`).
    pub candidates: ArcSwap<Candidates>,
    /// The port mapping the gateway granted, while it holds.
    pub port_mapping: Arc<ArcSwapOption<crate::nat::portmap::Mapping>>,
    /// Bumped on every change of this machine's addresses or routes.
    pub network_generation: Arc<AtomicU64>,
    /// Messages received on SSH or relay paths go to the data plane through here.
    pub overlay_inbox: std::os::unix::net::UnixDatagram,
}

/// Header of a message in the overlay inbox: path kind, then the sending peer's Noise key.
pub const INBOX_HEADER: usize = 33;

impl Device {
    /// Send a wire message to `peer` on its SSH connection or the relay; false if dropped.
    pub fn send_overlay(&self, peer: &Peer, kind: PathKind, msg: &[u8]) -> bool {
        let sent = match kind {
            PathKind::Ssh => peer
                .ssh_tx
                .load()
                .as_ref()
                .is_some_and(|tx| tx.try_send(msg.to_vec()).is_ok()),
            PathKind::Relay => self
                .relay_tx
                .load()
                .as_ref()
                .is_some_and(|tx| tx.try_send((*peer.identity.noise_public(), msg.to_vec())).is_ok()),
            PathKind::Udp => false,
        };
        if !sent {
            Counters::bump(&self.counters.tx_overlay_dropped);
        }
        sent
    }

    /// Hand a wire message received on an SSH connection or the relay to the data plane.
    pub fn deliver_overlay(&self, via: Via, msg: &[u8]) {
        let (kind, key) = match via {
            Via::Ssh(k) => (PathKind::Ssh, k),
            Via::Relay(k) => (PathKind::Relay, k),
            Via::Udp(_) => return,
        };
        let mut datagram = Vec::with_capacity(INBOX_HEADER + msg.len());
        datagram.push(kind as u8);
        datagram.extend_from_slice(&key);
        datagram.extend_from_slice(msg);
        if self.overlay_inbox.send(&datagram).is_err() {
            Counters::bump(&self.counters.rx_overlay_dropped);
        }
    }

    /// Ask the handshake thread for a session with `peer`, once until it is served.
    pub fn request_session(&self, peer: &Arc<Peer>) {
        if !peer.session_requested.swap(true, Ordering::AcqRel) {
            let _ = self.events.try_send(Event::NeedSession(peer.clone()));
        }
    }

    /// Replace the peer set (keys that stay keep their sessions) and the mesh keys.
    pub fn update(&self, specs: Vec<PeerSpec>, mesh_keys: Vec<Zeroizing<[u8; 32]>>) {
        let table = PeerTable::build(specs, &self.peers.load());
        self.peers.store(Arc::new(table));
        if !mesh_keys.is_empty() {
            self.mesh_keys.store(Arc::new(mesh_keys));
        }
        // The handshake thread drops the sessions of peers that left.
        let _ = self.events.send(Event::PeersChanged);
    }

    /// Queue a packet for `peer` until its handshake completes (slow path).
    pub fn stage(&self, peer: &Peer, packet: &[u8]) {
        let mut staged = lock(&peer.staged);
        if staged.len() >= MAX_STAGED {
            staged.pop_front();
            Counters::bump(&self.counters.tx_dropped);
        }
        staged.push_back(packet.to_vec());
    }
}
