//! The handshake thread: answers and starts handshakes, runs every peer's timers, installs keys.
//!
//! It is the only writer of peers' keys and of the session index table, so none of that needs a
//! lock. It wakes on an [`Event`] from a worker or the control plane, or every [`TICK`] to poll
//! the timers. Under load (a long event queue) it answers initiations with cookie replies
//! instead of doing DH. When a peer leaves the table (removed, revoked), its keys and index
//! entries are dropped here, so its sessions end at once.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rand::Rng;
use tracing::{debug, info, warn};

use super::{
    ActivityStamps, Counters, Device, Event, IndexEntry, IndexMirror, KeySet, Peer, PingReport, Via,
    path::{PathAction, PathKind, PathManager},
    probe,
};
use crate::{
    coordinator::proto::ClientMsg,
    nat::{self, Candidates, Discovery, NatKind},
    noise::{CookieChecker, CookieJar, InitiatorHandshake, LocalStatic, MacVerdict, Tai64n, consume_initiation},
    session::{Keypair, REKEY_TIMEOUT, TimerAction, Timers, sealed_len, timers::CurrentKey},
    wire::{self, Kind},
};

/// How often timers are polled.
pub const TICK: Duration = Duration::from_millis(100);
/// Queued events beyond which we consider ourselves under load and demand cookies.
const UNDER_LOAD_QUEUE: usize = 64;
/// At most one accepted initiation per peer per this interval (WireGuard: 50 per second).
const MIN_INITIATION_INTERVAL: Duration = Duration::from_millis(20);
/// We count as sending on a path if data went out within this.
const SENDING_WINDOW: Duration = Duration::from_secs(3);
/// How long `tunnelmesh ping` waits for answers.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Nonces of `tunnelmesh ping` probes have this bit set; the path manager's never do.
const PING_NONCE: u64 = 1 << 63;
/// Offsets from a punch's start at which a handshake initiation goes to every candidate. The
/// first datagrams die at the other side's NAT until that side's own have gone out through it;
/// several rounds cover the skew between the two sides receiving the coordinator's word.
const PUNCH_ROUNDS: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];
/// A punch that has not proven UDP this long after it started has failed.
const PUNCH_GRACE: Duration = Duration::from_secs(3);
/// Wait before asking for another punch: doubling from the first, up to the second, or up to
/// the third when either side is behind a hard NAT (its punches spray ports).
const PUNCH_RETRY: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(30),
    Duration::from_secs(300),
];
/// Port prediction towards a hard NAT: the ports this far either side of each public candidate
/// are tried too, in every round. A punch thus sends at most 6 × (8 + 2 × 16 × 8) datagrams.
const HARD_NAT_SPREAD: u16 = 16;
/// After a network change, wait this long for the burst of notifications to settle.
const NETWORK_SETTLE: Duration = Duration::from_millis(200);

/// One peer's hole punching.
#[derive(Default)]
struct Punch {
    /// Where the punch in progress sends, and when it started.
    targets: Vec<SocketAddr>,
    started: Option<Instant>,
    rounds_sent: usize,
    /// No new punch is asked for before this.
    next_request: Option<Instant>,
    failures: u32,
}

impl Punch {
    fn backoff(&self, hard: bool) -> Duration {
        let cap = if hard { PUNCH_RETRY[2] } else { PUNCH_RETRY[1] };
        PUNCH_RETRY[0].saturating_mul(1 << self.failures.min(16)).min(cap)
    }
}

/// Where to send a punch towards a peer with `candidates` behind a `nat`: every candidate, and
/// towards a hard NAT the ports near each public one (port prediction).
fn punch_targets(candidates: &[SocketAddr], nat: NatKind) -> Vec<SocketAddr> {
    let mut out = candidates.to_vec();
    if nat == NatKind::Hard {
        for c in candidates.iter().filter(|c| is_public(c.ip())) {
            for d in 1..=HARD_NAT_SPREAD {
                for port in [c.port().checked_add(d), c.port().checked_sub(d)].into_iter().flatten() {
                    out.push(SocketAddr::new(c.ip(), port));
                }
            }
        }
    }
    out
}

/// Not a private, loopback or link-local address: one a NAT could be mapping.
fn is_public(ip: std::net::IpAddr) -> bool {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => !(v4.is_private() || v4.is_loopback() || v4.is_link_local()),
        std::net::IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local()),
    }
}

/// Per-peer handshake state, owned by this thread.
struct PeerHandshake {
    timers: Timers,
    pending: Option<InitiatorHandshake>,
    jar: CookieJar,
    greatest_timestamp: Tai64n,
    last_initiation_accepted: Option<Instant>,
    last_initiation_sent: Option<Instant>,
    /// Initiations sent in this round; alternates the mesh keys during a rotation.
    attempts: usize,
    paths: PathManager,
    /// The path our last handshake response went out on (its key's confirmation proves it).
    responded_via: Option<PathKind>,
    punch: Punch,
}

impl PeerHandshake {
    fn new(peer: &Peer) -> Self {
        PeerHandshake {
            timers: Timers::new(peer.persistent_keepalive),
            pending: None,
            jar: CookieJar::new(peer.identity.noise_public()),
            greatest_timestamp: Tai64n::default(),
            last_initiation_accepted: None,
            last_initiation_sent: None,
            attempts: 0,
            paths: PathManager::new(rand::thread_rng().r#gen::<u64>() >> 1),
            responded_via: None,
            punch: Punch::default(),
        }
    }
}

/// A `tunnelmesh ping` waiting for probe replies.
struct PendingPing {
    peer: Arc<Peer>,
    sent: Instant,
    /// (nonce, path, where, round trip).
    probes: Vec<(u64, PathKind, String, Option<Duration>)>,
    answer: crossbeam_channel::Sender<Result<PingReport, String>>,
}

pub struct Handshaker {
    dev: Arc<Device>,
    /// Data-plane workers: each session's receiver index names the one that owns it.
    workers: u32,
    mirror: Box<dyn IndexMirror>,
    local: LocalStatic,
    socket: UdpSocket,
    events: Receiver<Event>,
    checker: CookieChecker,
    states: HashMap<[u8; 32], PeerHandshake>,
    scratch: Vec<u8>,
    pings: Vec<PendingPing>,
    ping_nonce: u64,
    ticks: u64,
    discovery: Discovery,
    /// Candidates as the coordinator last heard them from us.
    published: Option<Candidates>,
    /// Re-read this machine's addresses at this time (after a netlink notification).
    network_changed: Option<Instant>,
}

/// The dual-stack sockets take IPv4 destinations as v4-mapped IPv6.
fn dual_stack(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        v6 => v6,
    }
}

fn key_of(peer: &Peer) -> [u8; 32] {
    *peer.identity.noise_public()
}

impl Handshaker {
    pub fn new(
        dev: Arc<Device>,
        mirror: Box<dyn IndexMirror>,
        local: LocalStatic,
        socket: UdpSocket,
        events: Receiver<Event>,
        workers: usize,
    ) -> Self {
        let checker = CookieChecker::new(&local.public, Instant::now());
        let scratch = vec![0u8; sealed_len(dev.mtu) + 64];
        let now = Instant::now();
        Handshaker {
            discovery: Discovery::new(now),
            published: None,
            network_changed: Some(now),
            workers: (workers as u32).clamp(1, tunnelmesh_common::steer::MAX_WORKERS),
            dev,
            mirror,
            local,
            socket,
            events,
            checker,
            states: HashMap::new(),
            scratch,
            pings: Vec::new(),
            ping_nonce: PING_NONCE,
            ticks: 0,
        }
    }

    fn state(&mut self, peer: &Peer) -> &mut PeerHandshake {
        self.states
            .entry(key_of(peer))
            .or_insert_with(|| PeerHandshake::new(peer))
    }

    /// Run until the device shuts down.
    pub fn run(mut self) {
        let mut next_tick = Instant::now();
        while !self.dev.shutdown.load(Ordering::Relaxed) {
            match self
                .events
                .recv_timeout(next_tick.saturating_duration_since(Instant::now()))
            {
                Ok(event) => self.handle(event, Instant::now()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                let table = self.dev.peers.load_full();
                self.ticks += 1;
                self.poll_discovery(now);
                for peer in &table.peers {
                    self.poll_paths(peer, now);
                    self.poll_timers(peer, now);
                    self.poll_punch(peer, now);
                }
                self.finish_pings(now);
                next_tick = now + TICK;
            }
        }
    }

    fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Handshake { msg, via } => match wire::classify(&msg) {
                Ok(Kind::Initiation) => self.on_initiation(&msg, via, now),
                Ok(Kind::Response) => self.on_response(&msg, via, now),
                Ok(Kind::CookieReply) => self.on_cookie_reply(&msg, now),
                _ => Counters::bump(&self.dev.counters.rx_malformed),
            },
            Event::NeedSession(peer) => {
                self.state(&peer).timers.want_session();
                self.poll_timers(&peer, now);
            }
            Event::KeyConfirmed(peer) => {
                let st = self.state(&peer);
                if let Some(kind) = st.responded_via.take() {
                    st.paths.proven(kind, now);
                }
                self.sync_path(&peer);
                self.session_established(&peer, now);
                self.prune_indices();
                self.flush_staged(&peer, now);
            }
            Event::StaleSession(via) => {
                let table = self.dev.peers.load_full();
                let peer = match via {
                    Via::Udp(src) => table.peers.iter().find(|p| p.endpoint.load().as_deref() == Some(&src)),
                    Via::Ssh(key) | Via::Relay(key) => table.get(&key),
                };
                let Some(peer) = peer else {
                    return;
                };
                let st = self.state(peer);
                let recently = st
                    .last_initiation_sent
                    .is_some_and(|t| now.duration_since(t) < REKEY_TIMEOUT);
                if !st.timers.handshaking() && !recently {
                    debug!(peer = %peer.name, "peer uses a session we do not have; re-handshaking");
                    self.initiate(peer, now);
                }
            }
            Event::PeersChanged => self.peers_changed(),
            Event::Probe {
                peer,
                via,
                reply: false,
                nonce,
            } => {
                // Answer on the path the request came on: that is the path it tests.
                self.send_probe(&peer, via, true, nonce, now);
            }
            Event::Probe {
                peer,
                via,
                reply: true,
                nonce,
            } => {
                if nonce & PING_NONCE != 0 {
                    self.ping_answered(&peer, via.kind(), nonce, now);
                } else {
                    let st = self.state(&peer);
                    if let Some(rtt) = st.paths.probe_answered(via.kind(), nonce, now) {
                        debug!(peer = %peer.name, path = via.kind().name(), ?rtt, "probe answered");
                    }
                }
            }
            Event::Ping { peer, answer } => self.start_ping(&peer, answer, now),
            Event::Stun { msg, from } => {
                if self.discovery.on_response(&msg, from, now) {
                    self.publish_candidates();
                }
            }
            Event::NetworkChanged => {
                self.network_changed.get_or_insert(now + NETWORK_SETTLE);
            }
            Event::Punch { key, candidates, nat } => {
                let table = self.dev.peers.load_full();
                if let Some(peer) = table.get(&key) {
                    self.start_punch(peer, punch_targets(&candidates, nat), nat, now);
                }
            }
        }
    }

    /// STUN from the tunnel socket: send what discovery asks, publish what it learned.
    fn poll_discovery(&mut self, now: Instant) {
        if self.network_changed.is_some_and(|t| now >= t) {
            self.network_changed = None;
            let host = nat::host_candidates(&self.dev.interface, self.dev.listen_port);
            debug!(?host, "network changed; asking STUN again");
            self.discovery.network_changed(host, now);
        }
        let targets = self.dev.stun_targets.load().as_deref().copied();
        self.discovery.set_targets(targets, now);
        self.discovery
            .set_port_mapped(self.dev.port_mapping.load().as_ref().map(|m| m.external));
        for (target, request) in self.discovery.poll(now) {
            let _ = self.socket.send_to(&request, dual_stack(target));
        }
        self.publish_candidates();
    }

    /// Tell the coordinator our candidates when they differ from what it has.
    fn publish_candidates(&mut self) {
        let candidates = self.discovery.candidates();
        if **self.dev.candidates.load() != candidates {
            self.dev.candidates.store(Arc::new(candidates.clone()));
        }
        if !self.discovery.settled() || self.published.as_ref().is_some_and(|p| p.same_published(&candidates)) {
            return;
        }
        let Some(tx) = self.dev.coordinator_tx.load_full() else {
            return;
        };
        let endpoints: Vec<String> = candidates.endpoints().iter().map(|e| e.to_string()).collect();
        let msg = ClientMsg::Candidates {
            endpoints,
            nat: candidates.nat,
        };
        if tx.try_send(msg).is_ok() {
            info!(host = ?candidates.host, reflexive = ?candidates.reflexive, port_mapped = ?candidates.port_mapped,
                nat = candidates.nat.name(), "candidates published");
            self.published = Some(candidates);
        }
    }

    /// Whether we or a peer behind `nat` sit behind a hard NAT (punches spray ports: retry rarely).
    fn hard_nat_involved(&self, nat: NatKind) -> bool {
        nat == NatKind::Hard || self.dev.candidates.load().nat == NatKind::Hard
    }

    /// Start punching towards `peer` (the coordinator said both sides do it now).
    fn start_punch(&mut self, peer: &Arc<Peer>, targets: Vec<SocketAddr>, nat: NatKind, now: Instant) {
        if targets.is_empty() {
            return;
        }
        let hard = self.hard_nat_involved(nat);
        let st = self.state(peer);
        if st.punch.started.is_some() {
            return;
        }
        debug!(peer = %peer.name, targets = targets.len(), "punching");
        st.punch.targets = targets;
        st.punch.started = Some(now);
        st.punch.rounds_sent = 0;
        let wait = st.punch.backoff(hard);
        st.punch.next_request = Some(now + wait);
        peer.punches.fetch_add(1, Ordering::Relaxed);
        self.poll_punch(peer, now);
    }

    /// Carry on a punch in progress; ask the coordinator for one when the peer is behind NAT,
    /// we want traffic with it, and UDP does not work.
    fn poll_punch(&mut self, peer: &Arc<Peer>, now: Instant) {
        let remote = peer.remote.load_full();
        let hard = self.hard_nat_involved(remote.nat);
        let wanted = peer.keys.load().current.is_some();
        let connected = self.dev.coordinator_tx.load().is_some();
        let st = self.state(peer);
        let udp_works = st.paths.proven_now(PathKind::Udp, now);
        if let Some(started) = st.punch.started {
            let elapsed = now.saturating_duration_since(started);
            if udp_works {
                st.punch.started = None;
                st.punch.failures = 0;
                peer.punched.fetch_add(1, Ordering::Relaxed);
                info!(peer = %peer.name, after = ?elapsed, "hole punched");
            } else if elapsed >= PUNCH_GRACE {
                st.punch.started = None;
                st.punch.failures += 1;
                let wait = st.punch.backoff(hard);
                st.punch.next_request = Some(now + wait);
                debug!(peer = %peer.name, retry_in = ?wait, "punch failed");
            } else if PUNCH_ROUNDS.get(st.punch.rounds_sent).is_some_and(|at| elapsed >= *at) {
                st.punch.rounds_sent += 1;
                let vias: Vec<Via> = st.punch.targets.iter().map(|t| Via::Udp(*t)).collect();
                self.send_initiation(peer, &vias, now);
            }
            return;
        }
        if udp_works {
            st.punch.failures = 0;
            return;
        }
        let wanted = wanted || st.timers.handshaking();
        if remote.nat == NatKind::None
            || remote.endpoints.is_empty()
            || !connected
            || !wanted
            || st.punch.next_request.is_some_and(|t| now < t)
        {
            return;
        }
        st.punch.next_request = Some(now + st.punch.backoff(hard));
        let msg = ClientMsg::Punch {
            peer: peer.identity.fingerprint(),
        };
        if let Some(tx) = self.dev.coordinator_tx.load_full() {
            let _ = tx.try_send(msg);
        }
    }

    /// Tell the path manager what exists, let it decide, carry out its probes, publish the path.
    fn poll_paths(&mut self, peer: &Arc<Peer>, now: Instant) {
        let available = [
            peer.endpoint.load().is_some(),
            peer.ssh_tx.load().is_some(),
            self.dev.relay_tx.load().is_some(),
        ];
        let seen = |stamp: &std::sync::atomic::AtomicU64| self.dev.clock.instant(stamp.load(Ordering::Relaxed));
        let rx: [Option<Instant>; 3] = std::array::from_fn(|i| seen(&peer.rx_via[i]));
        let data_sent = seen(&peer.activity.data_sent);
        let has_key = peer.keys.load().current.is_some();
        let st = self.state(peer);
        for kind in PathKind::ALL {
            st.paths.set_available(kind, available[kind as usize], now);
            if let Some(at) = rx[kind as usize] {
                st.paths.received(kind, at);
            }
        }
        let current = st.paths.current();
        let sending = data_sent.is_some_and(|t| now.saturating_duration_since(t) < SENDING_WINDOW);
        let quiet = current
            .and_then(|c| rx[c as usize])
            .map(|t| now.saturating_duration_since(t));
        let actions = if has_key {
            st.paths.poll(now, sending, quiet)
        } else {
            Vec::new()
        };
        for action in actions {
            match action {
                PathAction::Probe(kind, nonce) => {
                    debug!(peer = %peer.name, path = kind.name(), nonce, "probing");
                    if let Some(via) = Via::to_peer(peer, kind) {
                        self.send_probe(peer, via, false, nonce, now);
                    }
                }
                PathAction::Switch(kind) => {
                    info!(peer = %peer.name, path = kind.name(), "traffic moves to another path")
                }
            }
        }
        self.sync_path(peer);
        if self.ticks.is_multiple_of(10) {
            let report = self.state(peer).paths.report(now);
            peer.paths.store(Arc::new(report));
        }
    }

    /// Publish the path manager's choice to the workers; ask for SSH while UDP does not work.
    fn sync_path(&mut self, peer: &Peer) {
        let udp_known = peer.endpoint.load().is_some();
        let relay_up = self.dev.relay_tx.load().is_some();
        let st = self.state(peer);
        let kind = st.paths.current().unwrap_or(if udp_known || !relay_up {
            PathKind::Udp
        } else {
            PathKind::Relay
        });
        if peer.path() != kind {
            peer.path.store(kind as u8, Ordering::Relaxed);
        }
        let want_ssh = peer.ssh_endpoint.is_some() && st.paths.current() != Some(PathKind::Udp);
        peer.want_ssh.store(want_ssh, Ordering::Relaxed);
    }

    /// Send a wire message on `via`.
    fn send_via(&self, via: Via, msg: &[u8]) -> bool {
        match via {
            Via::Udp(addr) => self.socket.send_to(msg, dual_stack(addr)).is_ok(),
            Via::Ssh(key) | Via::Relay(key) => {
                let table = self.dev.peers.load();
                table
                    .get(&key)
                    .is_some_and(|p| self.dev.send_overlay(p, via.kind(), msg))
            }
        }
    }

    fn start_ping(&mut self, name: &str, answer: crossbeam_channel::Sender<Result<PingReport, String>>, now: Instant) {
        let table = self.dev.peers.load_full();
        let Some(peer) = table
            .peers
            .iter()
            .find(|p| p.name == name || p.identity.fingerprint() == name)
        else {
            let _ = answer.send(Err(format!("no peer named {name:?}")));
            return;
        };
        if peer.keys.load().current.is_none() {
            // Probes ride on the session: start one, and ask again.
            self.state(peer).timers.want_session();
            self.poll_timers(peer, now);
            let _ = answer.send(Err(format!(
                "no session with {name} yet (handshake started); try again"
            )));
            return;
        }
        let mut probes = Vec::new();
        for kind in PathKind::ALL {
            if !self.state(peer).paths.is_available(kind) {
                continue;
            }
            let Some(via) = Via::to_peer(peer, kind) else {
                continue;
            };
            self.ping_nonce = self.ping_nonce.wrapping_add(1) | PING_NONCE;
            let nonce = self.ping_nonce;
            self.send_probe(peer, via, false, nonce, now);
            probes.push((nonce, kind, via.to_string(), None));
        }
        self.pings.push(PendingPing {
            peer: peer.clone(),
            sent: now,
            probes,
            answer,
        });
    }

    fn ping_answered(&mut self, peer: &Arc<Peer>, kind: PathKind, nonce: u64, now: Instant) {
        for ping in self.pings.iter_mut().filter(|p| Arc::ptr_eq(&p.peer, peer)) {
            for probe in ping.probes.iter_mut().filter(|p| p.0 == nonce && p.1 == kind) {
                probe.3.get_or_insert(now.saturating_duration_since(ping.sent));
            }
        }
        self.finish_pings(now);
    }

    /// Answer the pings that are complete (or timed out).
    fn finish_pings(&mut self, now: Instant) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pings).into_iter().partition(|p| {
            p.probes.iter().all(|x| x.3.is_some()) || now.saturating_duration_since(p.sent) >= PING_TIMEOUT
        });
        self.pings = waiting;
        for ping in done {
            let current = self.state(&ping.peer).paths.current();
            let _ = ping.answer.send(Ok(PingReport {
                peer: ping.peer.name.clone(),
                current,
                paths: ping
                    .probes
                    .into_iter()
                    .map(|(_, kind, at, rtt)| (kind, at, rtt.map(|d| d.as_secs_f64() * 1e3)))
                    .collect(),
            }));
        }
    }

    /// Forget peers that left the table: their keys, index entries and handshake state.
    fn peers_changed(&mut self) {
        let table = self.dev.peers.load_full();
        self.states.retain(|key, _| table.by_key.contains_key(key));
        self.prune_indices();
    }

    /// mac1/mac2 gate shared by initiations and responses; true if the message may be processed.
    /// Cookies (proof of a return address) only make sense for UDP; SSH and relay messages come
    /// from authenticated members over TCP.
    fn macs_ok(&mut self, msg: &[u8], via: Via, now: Instant) -> bool {
        let (src, under_load) = match via {
            Via::Udp(src) => (src, self.events.len() >= UNDER_LOAD_QUEUE),
            _ => ((std::net::Ipv6Addr::UNSPECIFIED, 0).into(), false),
        };
        match self.checker.verify(msg, src, under_load, now) {
            MacVerdict::Accept => true,
            MacVerdict::NeedCookie => {
                let reply = self.checker.cookie_reply(msg, src, now);
                let _ = self.socket.send_to(&reply, dual_stack(src));
                Counters::bump(&self.dev.counters.cookie_replies_sent);
                false
            }
            MacVerdict::Reject => {
                Counters::bump(&self.dev.counters.handshake_rejected);
                false
            }
        }
    }

    fn on_initiation(&mut self, msg: &[u8], via: Via, now: Instant) {
        if !self.macs_ok(msg, via, now) {
            return;
        }
        let dev = self.dev.clone();
        let counters = &dev.counters;
        // PSK enters only in the response, so the initiation reads the same under any mesh key.
        let mesh_keys = dev.mesh_keys.load();
        let received = match consume_initiation(&self.local, &mesh_keys[0], msg) {
            Ok(r) => r,
            Err(_) => return Counters::bump(&counters.handshake_rejected),
        };
        let table = dev.peers.load_full();
        let Some(peer) = table.get(&received.remote_public) else {
            // Not a member: ignore silently (no response, no cookie).
            return Counters::bump(&counters.handshake_rejected);
        };
        let st = self.state(peer);
        if received.timestamp <= st.greatest_timestamp {
            return Counters::bump(&counters.handshake_replayed);
        }
        if st
            .last_initiation_accepted
            .is_some_and(|t| now.duration_since(t) < MIN_INITIATION_INTERVAL)
        {
            return Counters::bump(&counters.handshake_rejected);
        }
        st.greatest_timestamp = received.timestamp;
        st.last_initiation_accepted = Some(now);
        let index = self.new_index();
        // The initiator's first data message names this index: the shield must know it first.
        self.mirror.insert(index);
        let (mut response, keys) = received.respond(index);
        self.state(peer).jar.stamp(&mut response, now);
        if !self.send_via(via, &response) {
            return;
        }
        if let Via::Udp(src) = via {
            peer.endpoint.store(Some(Arc::new(src)));
        }
        self.state(peer).responded_via = Some(via.kind());
        let stamp = dev.clock.stamp(now);
        peer.activity.any_received.store(stamp, Ordering::Relaxed);
        peer.activity.any_sent.store(stamp, Ordering::Relaxed);
        // The key waits as `next` until the initiator's first data message confirms it.
        let keypair = Arc::new(Keypair::new(&keys, now));
        self.install(peer, keypair, |ks, kp| KeySet {
            next: Some(kp),
            ..ks.clone()
        });
        debug!(peer = %peer.name, %via, "answered handshake initiation");
    }

    fn on_response(&mut self, msg: &[u8], via: Via, now: Instant) {
        if !self.macs_ok(msg, via, now) {
            return;
        }
        let receiver = wire::receiver_index(msg);
        let Some(key) = self
            .states
            .iter()
            .find(|(_, s)| s.pending.as_ref().is_some_and(|h| h.local_index() == receiver))
            .map(|(k, _)| *k)
        else {
            return Counters::bump(&self.dev.counters.handshake_rejected);
        };
        let table = self.dev.peers.load_full();
        let Some(peer) = table.get(&key) else {
            return;
        };
        let handshake = self.state(peer).pending.take().expect("found by its pending handshake");
        let keys = match handshake.finish(msg) {
            Ok(k) => k,
            Err(_) => {
                Counters::bump(&self.dev.counters.handshake_rejected);
                // During a mesh-key rotation the peer may answer under the other key: try it now
                // rather than after REKEY_TIMEOUT.
                if self.dev.mesh_keys.load().len() > self.state(peer).attempts {
                    self.initiate(peer, now);
                }
                return;
            }
        };
        if let Via::Udp(src) = via {
            peer.endpoint.store(Some(Arc::new(src)));
        }
        let stamp = self.dev.clock.stamp(now);
        peer.activity.any_received.store(stamp, Ordering::Relaxed);
        ActivityStamps::touch(&peer.rx_via[via.kind() as usize], stamp);
        self.state(peer).paths.proven(via.kind(), now);
        self.sync_path(peer);
        let keypair = Arc::new(Keypair::new(&keys, now));
        self.install(peer, keypair, |ks, kp| KeySet {
            current: Some(kp),
            previous: ks.current.clone(),
            next: ks.next.clone(),
        });
        info!(peer = %peer.name, %via, "session established (initiator)");
        self.session_established(peer, now);
        if !self.flush_staged(peer, now) {
            // Nothing queued: confirm the key to the responder with a keepalive.
            self.send_sealed(peer, 0, now);
        }
    }

    fn on_cookie_reply(&mut self, msg: &[u8], now: Instant) {
        let receiver = wire::receiver_index(msg);
        let pending = self
            .states
            .values_mut()
            .find(|s| s.pending.as_ref().is_some_and(|h| h.local_index() == receiver));
        if !pending.is_some_and(|st| st.jar.consume_reply(msg, now)) {
            Counters::bump(&self.dev.counters.handshake_rejected);
        }
    }

    /// Replace `peer`'s key set with `update(old, keypair)` and index the new key.
    fn install(&mut self, peer: &Arc<Peer>, keypair: Arc<Keypair>, update: impl Fn(&KeySet, Arc<Keypair>) -> KeySet) {
        let index = keypair.local_index;
        self.mirror.insert(index);
        peer.keys.store(Arc::new(update(&peer.keys.load(), keypair.clone())));
        let mut table: HashMap<u32, Arc<IndexEntry>> = (**self.dev.sessions.load()).clone();
        table.insert(
            index,
            Arc::new(IndexEntry {
                peer: peer.clone(),
                keypair,
            }),
        );
        self.dev.sessions.store(Arc::new(table));
        self.prune_indices();
    }

    /// Drop index-table entries whose key their peer no longer holds, or whose peer left.
    fn prune_indices(&self) {
        let peers = self.dev.peers.load();
        let live = |entry: &IndexEntry| {
            let in_table = peers
                .get(&key_of(&entry.peer))
                .is_some_and(|p| Arc::ptr_eq(p, &entry.peer));
            let keys = entry.peer.keys.load();
            in_table
                && [&keys.current, &keys.previous, &keys.next]
                    .into_iter()
                    .flatten()
                    .any(|k| Arc::ptr_eq(k, &entry.keypair))
        };
        let table = self.dev.sessions.load();
        if table.values().any(|e| !live(e)) {
            // Peers that left lose their keys too, so nothing can send on them.
            for entry in table
                .values()
                .filter(|e| !peers.get(&key_of(&e.peer)).is_some_and(|p| Arc::ptr_eq(p, &e.peer)))
            {
                entry.peer.keys.store(Arc::new(KeySet::default()));
            }
            for (index, _) in table.iter().filter(|(_, e)| !live(e)) {
                self.mirror.remove(*index);
            }
            let pruned = table
                .iter()
                .filter(|(_, e)| live(e))
                .map(|(i, e)| (*i, e.clone()))
                .collect();
            self.dev.sessions.store(Arc::new(pruned));
        }
    }

    fn session_established(&mut self, peer: &Peer, now: Instant) {
        let st = self.state(peer);
        st.timers.session_established(now);
        st.attempts = 0;
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        peer.last_handshake_unix.store(unix, Ordering::Relaxed);
        peer.session_requested.store(false, Ordering::Release);
    }

    /// A fresh random index not in use, naming the worker that owns the fewest sessions (the
    /// steering program delivers the session's data to it; without steering it is only a
    /// number).
    fn new_index(&self) -> u32 {
        use tunnelmesh_common::steer::{index_for, worker_of};
        let table = self.dev.sessions.load();
        let pending = self
            .states
            .values()
            .filter_map(|s| s.pending.as_ref().map(|h| h.local_index()));
        let mut load = [0usize; tunnelmesh_common::steer::MAX_WORKERS as usize];
        for index in table.keys().copied().chain(pending) {
            load[worker_of(index) as usize] += 1;
        }
        let worker = (0..self.workers).min_by_key(|&w| load[w as usize]).unwrap_or(0);
        let mut rng = rand::thread_rng();
        loop {
            let i = index_for(worker, rng.r#gen());
            let pending = self
                .states
                .values()
                .any(|s| s.pending.as_ref().is_some_and(|h| h.local_index() == i));
            if !table.contains_key(&i) && !pending {
                return i;
            }
        }
    }

    fn initiate(&mut self, peer: &Peer, now: Instant) {
        // On the path in use if it works; with none proven, on every path at once — the first
        // answer decides, so traffic never waits for a slow path.
        let st = self.state(peer);
        let vias: Vec<Via> = match st.paths.current() {
            Some(kind) => Via::to_peer(peer, kind).into_iter().collect(),
            None => {
                let kinds: Vec<PathKind> = st.paths.available().collect();
                kinds.into_iter().filter_map(|k| Via::to_peer(peer, k)).collect()
            }
        };
        let vias = if vias.is_empty() {
            // Before the first poll: UDP if an endpoint is known.
            Via::to_peer(peer, PathKind::Udp).into_iter().collect()
        } else {
            vias
        };
        if vias.is_empty() {
            debug!(peer = %peer.name, "no path known; waiting for the peer to reach us");
            return;
        }
        self.send_initiation(peer, &vias, now);
    }

    /// Start a handshake: one initiation, sent on each of `vias` (the first answer wins).
    fn send_initiation(&mut self, peer: &Peer, vias: &[Via], now: Instant) {
        debug!(peer = %peer.name, ?vias, "initiating");
        let index = self.new_index();
        // During a mesh-key rotation, alternate the keys: a peer that has not switched yet
        // answers under the previous one.
        let mesh_keys = self.dev.mesh_keys.load();
        let attempts = self.state(peer).attempts;
        let psk = &mesh_keys[attempts % mesh_keys.len()];
        let (handshake, mut msg) =
            InitiatorHandshake::start(&self.local, psk, peer.identity.noise_public(), index, Tai64n::now());
        let st = self.state(peer);
        st.jar.stamp(&mut msg, now);
        st.pending = Some(handshake);
        st.attempts += 1;
        st.last_initiation_sent = Some(now);
        st.timers
            .initiation_sent(now, Duration::from_millis(rand::thread_rng().gen_range(0..=333)));
        for &via in vias {
            if !self.send_via(via, &msg) {
                debug!(peer = %peer.name, %via, "sending the initiation failed");
            }
        }
        peer.activity
            .any_sent
            .store(self.dev.clock.stamp(now), Ordering::Relaxed);
    }

    fn poll_timers(&mut self, peer: &Arc<Peer>, now: Instant) {
        let keys = peer.keys.load();
        if keys.current.is_none()
            && keys
                .next
                .as_ref()
                .is_some_and(|k| now.duration_since(k.created) < REKEY_TIMEOUT)
        {
            // We just answered an initiation; its confirmation is on the way.
            return;
        }
        let current = keys.current.as_ref().map(|k| CurrentKey {
            created: k.created,
            is_initiator: k.is_initiator,
            sent: k.sent(),
        });
        let seen = peer.activity.snapshot(&self.dev.clock);
        match self.state(peer).timers.poll(now, seen, current) {
            None => {}
            Some(TimerAction::SendInitiation) => self.initiate(peer, now),
            Some(TimerAction::SendKeepalive) => {
                self.send_sealed(peer, 0, now);
            }
            Some(TimerAction::GiveUp) => {
                warn!(peer = %peer.name, "handshake did not complete within 90 s; dropping queued packets");
                let dropped = peer.staged.lock().map(|mut q| q.drain(..).count()).unwrap_or(0);
                self.dev
                    .counters
                    .tx_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                let st = self.state(peer);
                st.pending = None;
                st.attempts = 0;
                peer.session_requested.store(false, Ordering::Release);
            }
            Some(TimerAction::EraseKeys) => {
                peer.keys.store(Arc::new(KeySet::default()));
                self.prune_indices();
            }
        }
    }

    /// Seal `len` bytes already in `scratch[16..]` on the current key and send them on the
    /// path in use; the session's timers count it.
    fn send_sealed(&mut self, peer: &Peer, len: usize, now: Instant) -> bool {
        let sent = Via::to_peer(peer, peer.path()).is_some_and(|via| self.seal_via(peer, len, via, now));
        if sent {
            let stamp = self.dev.clock.stamp(now);
            peer.activity.any_sent.store(stamp, Ordering::Relaxed);
            if len > 0 {
                peer.activity.data_sent.store(stamp, Ordering::Relaxed);
                peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
        }
        sent
    }

    /// Send a path probe on `via`. Probes are path-layer traffic: the session's timers do not
    /// count them.
    fn send_probe(&mut self, peer: &Peer, via: Via, reply: bool, nonce: u64, now: Instant) -> bool {
        self.scratch[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + probe::LEN]
            .copy_from_slice(&probe::encode(reply, nonce));
        self.seal_via(peer, probe::LEN, via, now)
    }

    /// Seal `len` bytes already in `scratch[16..]` on the current key and send them on `via`.
    fn seal_via(&mut self, peer: &Peer, len: usize, via: Via, now: Instant) -> bool {
        let Some(key) = peer.keys.load().current.clone() else {
            return false;
        };
        let Ok(total) = key.seal(&mut self.scratch, len, now) else {
            return false;
        };
        let msg = std::mem::take(&mut self.scratch);
        let sent = self.send_via(via, &msg[..total]);
        self.scratch = msg;
        sent
    }

    /// Send packets queued while the session was missing; false if there were none.
    fn flush_staged(&mut self, peer: &Peer, now: Instant) -> bool {
        let queued: Vec<Vec<u8>> = peer
            .staged
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default();
        for packet in &queued {
            if sealed_len(packet.len()) > self.scratch.len() {
                continue;
            }
            self.scratch[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + packet.len()].copy_from_slice(packet);
            self.send_sealed(peer, packet.len(), now);
        }
        !queued.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punches_spray_ports_only_around_a_hard_nats_public_candidates_and_back_off_to_a_cap() {
        let candidates: Vec<SocketAddr> = vec!["10.0.0.2:51820".parse().unwrap(), "198.18.0.9:40000".parse().unwrap()];
        assert_eq!(punch_targets(&candidates, NatKind::Easy), candidates);
        let hard = punch_targets(&candidates, NatKind::Hard);
        assert_eq!(hard.len(), 2 + 2 * HARD_NAT_SPREAD as usize);
        assert!(hard[2..].iter().all(|t| t.ip() == candidates[1].ip()));
        let ports: Vec<u16> = hard[2..].iter().map(|t| t.port()).collect();
        assert!(ports.contains(&40001) && ports.contains(&39984) && !ports.contains(&40000));
        // No port beyond the ends of the range.
        let edge = punch_targets(&["198.18.0.9:65530".parse().unwrap()], NatKind::Hard);
        assert!(edge.iter().all(|t| t.port() >= 65514) && edge.len() == 1 + 16 + 5);

        let mut p = Punch::default();
        let waits: Vec<u64> = (0..8)
            .map(|f| {
                p.failures = f;
                p.backoff(false).as_secs()
            })
            .collect();
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30, 30]);
        p.failures = 40;
        assert_eq!(p.backoff(true), PUNCH_RETRY[2]);
    }
}
