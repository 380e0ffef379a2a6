//! The slow path: every decision about a peer that is not a data packet — handshakes, session
//! timers, the session index table, path choice and probes, `tunnelmesh ping`, STUN discovery
//! and hole punching.
//!
//! [`SlowPath`] is a sans-I/O state machine in the manner of boringtun's `noise::Tunn` and
//! quinn-proto: [`SlowPath::handle`] takes an [`Input`] (a worker's or the control plane's
//! [`Event`], a timer tick, this machine's addresses) and the time, and returns [`Output`]s —
//! bytes to transmit on a path, a request for the coordinator, an index for the XDP shield, a
//! ping report. It opens no socket, sends on no channel and calls no syscall; [`thread`] is the
//! thin loop that does that I/O. Tests drive two machines against each other with a virtual
//! clock.
//!
//! Invariant: the slow path is the **only writer of peers' keys and of the session index
//! table** ([`index`]), so neither needs a lock: workers read both as `ArcSwap` snapshots. It
//! also publishes, for the workers, each peer's path choice ([`paths`]) and, for `status`, its
//! path report and this node's candidates. Everything else it reads of the [`Device`] it reads
//! only. When a peer leaves the table (removed, revoked), its keys and index entries are
//! dropped here, so its sessions end at once.
//!
//! One file per concern: [`accept`] (mac gate, cookies under load, accepting initiations and
//! responses), [`limit`] (budgets of proven sources under load), [`index`] (keys and the index table), [`timers`] (starting handshakes when the
//! session timers say so), [`send`] (sealed sends on the current key), [`paths`], [`ping`],
//! [`discovery`] (STUN on the tunnel socket, publishing candidates), [`punch`].

#![forbid(unsafe_code)]

mod accept;
mod discovery;
mod index;
mod limit;
mod paths;
mod ping;
mod punch;
mod send;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testbed;
#[cfg(test)]
mod tests;
pub mod thread;
mod timers;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use rand::Rng;

use crate::{
    device::{CoordinatorRequest, Counters, Device, Event, PingAnswer, Via},
    protocol::{
        noise::{CookieChecker, CookieJar, InitiatorHandshake, LocalStatic, Tai64n},
        path::{PathKind, PathManager},
        punch::Punch,
        session::{Timers, sealed_len},
        wire::{self, Kind},
    },
};

/// How often the driver ticks the timers.
pub const TICK: Duration = Duration::from_millis(100);
/// Queued events beyond which we consider ourselves under load and demand cookies.
pub const UNDER_LOAD_QUEUE: usize = 64;

/// What the slow path is told.
pub enum Input {
    /// A worker, the control plane or the status socket reports something.
    Event(Event),
    /// Time passed: poll every peer's timers, paths and punches, and discovery.
    Tick,
    /// This machine's host candidates, read because of [`Output::ReadHostCandidates`].
    HostCandidates(Vec<SocketAddr>),
}

/// What the slow path asks the driver to do, in order.
#[derive(Debug)]
pub enum Output {
    /// Send a wire message on a path.
    Transmit { via: Via, msg: Vec<u8> },
    /// The XDP shield must know (`live`) or forget a receiver index. An index is always shown
    /// before any message naming it can be sent.
    ShieldIndex { index: u32, live: bool },
    /// The XDP shield must drop initiations from `source` for `period` (it overspent its
    /// budget after proving its address).
    ShieldBlock { source: std::net::IpAddr, period: Duration },
    /// Hand a request to the coordinator client (dropped when not connected).
    Coordinator(CoordinatorRequest),
    /// Answer a `tunnelmesh ping`.
    PingDone {
        to: crossbeam_channel::Sender<PingAnswer>,
        report: PingAnswer,
    },
    /// Read this machine's addresses and hand them back as [`Input::HostCandidates`].
    ReadHostCandidates,
}

/// Per-peer state, owned by the slow path.
struct PeerState {
    timers: Timers,
    pending: Option<InitiatorHandshake>,
    jar: CookieJar,
    greatest_timestamp: Tai64n,
    last_initiation_accepted: Option<Instant>,
    last_initiation_sent: Option<Instant>,
    /// Initiations sent in this round; alternates the mesh keys during a rotation.
    attempts: usize,
    paths: PathManager,
    /// A response did not decrypt under the mesh key we used (a rotation): initiate under the
    /// other one at this time — not at once, or the responder's per-peer flood limit drops it.
    other_key_at: Option<Instant>,
    /// The path our last handshake response went out on (its key's confirmation proves it).
    responded_via: Option<PathKind>,
    punch: Punch,
}

impl PeerState {
    fn new(peer: &crate::device::Peer) -> Self {
        PeerState {
            timers: Timers::new(peer.persistent_keepalive),
            pending: None,
            jar: CookieJar::new(peer.identity.noise_public()),
            greatest_timestamp: Tai64n::default(),
            last_initiation_accepted: None,
            last_initiation_sent: None,
            attempts: 0,
            other_key_at: None,
            paths: PathManager::new(rand::thread_rng().r#gen::<u64>() >> 1),
            responded_via: None,
            punch: Punch::default(),
        }
    }
}

/// The slow path of one interface.
pub struct SlowPath {
    dev: Arc<Device>,
    /// Data-plane workers: each session's receiver index names the one that owns it.
    workers: u32,
    local: LocalStatic,
    checker: CookieChecker,
    limiter: limit::Limiter,
    peers: HashMap<[u8; 32], PeerState>,
    /// Plaintext of a sealed send at `[16..]`, sealed in place.
    scratch: Vec<u8>,
    pings: ping::Pings,
    discovery: discovery::Publisher,
    ticks: u64,
    /// The wall clock at an instant: handshake timestamps and `last_handshake` follow `now`,
    /// so the machine is deterministic under a virtual clock.
    wall_epoch: (Instant, SystemTime),
    /// Events waiting behind the one being handled (set by the driver): under load, cookies.
    backlog: usize,
    out: Vec<Output>,
}

fn key_of(peer: &crate::device::Peer) -> [u8; 32] {
    *peer.identity.noise_public()
}

impl SlowPath {
    pub fn new(dev: Arc<Device>, local: LocalStatic, workers: usize, now: Instant) -> Self {
        let checker = CookieChecker::new(&local.public, now);
        let scratch = vec![0u8; sealed_len(dev.info.mtu) + 64];
        SlowPath {
            discovery: discovery::Publisher::new(now),
            workers: (workers as u32).clamp(1, tunnelmesh_common::steer::MAX_WORKERS),
            dev,
            local,
            checker,
            limiter: limit::Limiter::new(now),
            peers: HashMap::new(),
            scratch,
            pings: ping::Pings::default(),
            ticks: 0,
            wall_epoch: (now, SystemTime::now()),
            backlog: 0,
            out: Vec::new(),
        }
    }

    /// How many events wait behind the next one (the driver's queue length).
    pub fn set_backlog(&mut self, queued: usize) {
        self.backlog = queued;
    }

    /// Take `input` at `now`; return what to do, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Output> {
        match input {
            Input::Event(event) => self.on_event(event, now),
            Input::Tick => self.tick(now),
            Input::HostCandidates(host) => self.on_host_candidates(host, now),
        }
        std::mem::take(&mut self.out)
    }

    /// The coordinator client could not take `request` (its queue was full, or it went away).
    pub fn coordinator_refused(&mut self, request: &CoordinatorRequest) {
        if let CoordinatorRequest::Candidates { .. } = request {
            self.discovery.not_published();
        }
    }

    /// Wall-clock time at `now`.
    fn wall_clock(&self, now: Instant) -> SystemTime {
        let (instant, wall) = self.wall_epoch;
        wall + now.saturating_duration_since(instant)
    }

    fn peer_state(&mut self, peer: &crate::device::Peer) -> &mut PeerState {
        self.peers.entry(key_of(peer)).or_insert_with(|| PeerState::new(peer))
    }

    fn tick(&mut self, now: Instant) {
        let table = self.dev.peers.load_full();
        self.ticks += 1;
        self.poll_discovery(now);
        for peer in &table.peers {
            self.poll_paths(peer, now);
            self.poll_timers(peer, now);
            self.poll_punch(peer, now);
        }
        self.finish_pings(now);
    }

    fn on_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Handshake { msg, via } => match wire::classify(&msg) {
                Ok(Kind::Initiation) => self.on_initiation(&msg, via, now),
                Ok(Kind::Response) => self.on_response(&msg, via, now),
                Ok(Kind::CookieReply) => self.on_cookie_reply(&msg, now),
                _ => Counters::bump(&self.dev.counters.rx_malformed),
            },
            Event::NeedSession(peer) => {
                self.peer_state(&peer).timers.want_session();
                self.poll_timers(&peer, now);
            }
            Event::KeyConfirmed(peer) => self.on_key_confirmed(&peer, now),
            Event::StaleSession(via) => self.on_stale_session(via, now),
            Event::PeersChanged => self.peers_changed(),
            Event::Probe {
                peer,
                via,
                reply,
                nonce,
            } => self.on_probe(&peer, via, reply, nonce, now),
            Event::Ping { peer, answer } => self.start_ping(&peer, answer, now),
            Event::Stun { msg, from } => self.on_stun(&msg, from, now),
            Event::NetworkChanged => self.discovery.network_changed(now),
            Event::Punch { key, candidates, nat } => self.on_punch_request(key, &candidates, nat, now),
        }
    }

    /// Forget peers that left the table: their keys, index entries and handshake state.
    fn peers_changed(&mut self) {
        let table = self.dev.peers.load_full();
        self.peers.retain(|key, _| table.by_key.contains_key(key));
        self.prune_indices();
    }
}
