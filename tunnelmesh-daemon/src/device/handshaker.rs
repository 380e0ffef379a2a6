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

use super::{Counters, Device, Event, IndexEntry, IndexMirror, KeySet, Peer};
use crate::{
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
        }
    }
}

pub struct Handshaker {
    dev: Arc<Device>,
    mirror: Box<dyn IndexMirror>,
    local: LocalStatic,
    socket: UdpSocket,
    events: Receiver<Event>,
    checker: CookieChecker,
    states: HashMap<[u8; 32], PeerHandshake>,
    scratch: Vec<u8>,
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
    ) -> Self {
        let checker = CookieChecker::new(&local.public, Instant::now());
        let scratch = vec![0u8; sealed_len(dev.mtu) + 64];
        Handshaker {
            dev,
            mirror,
            local,
            socket,
            events,
            checker,
            states: HashMap::new(),
            scratch,
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
                for peer in &table.peers {
                    self.poll_timers(peer, now);
                }
                next_tick = now + TICK;
            }
        }
    }

    fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Handshake { msg, src } => match wire::classify(&msg) {
                Ok(Kind::Initiation) => self.on_initiation(&msg, src, now),
                Ok(Kind::Response) => self.on_response(&msg, src, now),
                Ok(Kind::CookieReply) => self.on_cookie_reply(&msg, now),
                _ => Counters::bump(&self.dev.counters.rx_malformed),
            },
            Event::NeedSession(peer) => {
                self.state(&peer).timers.want_session();
                self.poll_timers(&peer, now);
            }
            Event::KeyConfirmed(peer) => {
                self.session_established(&peer, now);
                self.prune_indices();
                self.flush_staged(&peer, now);
            }
            Event::StaleSession(src) => {
                let table = self.dev.peers.load_full();
                let Some(peer) = table.peers.iter().find(|p| p.endpoint.load().as_deref() == Some(&src)) else {
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
        }
    }

    /// Forget peers that left the table: their keys, index entries and handshake state.
    fn peers_changed(&mut self) {
        let table = self.dev.peers.load_full();
        self.states.retain(|key, _| table.by_key.contains_key(key));
        self.prune_indices();
    }

    /// mac1/mac2 gate shared by initiations and responses; true if the message may be processed.
    fn macs_ok(&mut self, msg: &[u8], src: SocketAddr, now: Instant) -> bool {
        let under_load = self.events.len() >= UNDER_LOAD_QUEUE;
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

    fn on_initiation(&mut self, msg: &[u8], src: SocketAddr, now: Instant) {
        if !self.macs_ok(msg, src, now) {
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
        if self.socket.send_to(&response, dual_stack(src)).is_err() {
            return;
        }
        peer.endpoint.store(Some(Arc::new(src)));
        let stamp = dev.clock.stamp(now);
        peer.activity.any_received.store(stamp, Ordering::Relaxed);
        peer.activity.any_sent.store(stamp, Ordering::Relaxed);
        // The key waits as `next` until the initiator's first data message confirms it.
        let keypair = Arc::new(Keypair::new(&keys, now));
        self.install(peer, keypair, |ks, kp| KeySet {
            next: Some(kp),
            ..ks.clone()
        });
        debug!(peer = %peer.name, %src, "answered handshake initiation");
    }

    fn on_response(&mut self, msg: &[u8], src: SocketAddr, now: Instant) {
        if !self.macs_ok(msg, src, now) {
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
        peer.endpoint.store(Some(Arc::new(src)));
        peer.activity
            .any_received
            .store(self.dev.clock.stamp(now), Ordering::Relaxed);
        let keypair = Arc::new(Keypair::new(&keys, now));
        self.install(peer, keypair, |ks, kp| KeySet {
            current: Some(kp),
            previous: ks.current.clone(),
            next: ks.next.clone(),
        });
        info!(peer = %peer.name, %src, "session established (initiator)");
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

    /// A fresh random index not in use.
    fn new_index(&self) -> u32 {
        let table = self.dev.sessions.load();
        let mut rng = rand::thread_rng();
        loop {
            let i: u32 = rng.r#gen();
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
        let Some(endpoint) = peer.endpoint.load_full() else {
            debug!(peer = %peer.name, "no endpoint known; waiting for the peer to reach us");
            return;
        };
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
        if let Err(e) = self.socket.send_to(&msg, dual_stack(*endpoint)) {
            debug!(peer = %peer.name, %endpoint, "sending initiation failed: {e}");
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

    /// Seal `len` bytes already in `scratch[16..]` on the current key and send them.
    fn send_sealed(&mut self, peer: &Peer, len: usize, now: Instant) -> bool {
        let (Some(key), Some(endpoint)) = (peer.keys.load().current.clone(), peer.endpoint.load_full()) else {
            return false;
        };
        let Ok(total) = key.seal(&mut self.scratch, len, now) else {
            return false;
        };
        if self
            .socket
            .send_to(&self.scratch[..total], dual_stack(*endpoint))
            .is_err()
        {
            return false;
        }
        let stamp = self.dev.clock.stamp(now);
        peer.activity.any_sent.store(stamp, Ordering::Relaxed);
        if len > 0 {
            peer.activity.data_sent.store(stamp, Ordering::Relaxed);
            peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
        true
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
