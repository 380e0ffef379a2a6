//! The handshake thread: answers and starts handshakes, runs every peer's timers, installs keys.
//!
//! It is the only writer of peers' keys and of the session index table, so none of that needs a
//! lock. It wakes on an [`Event`] from a worker or every [`TICK`] to poll the timers. Under load
//! (a long event queue) it answers initiations with cookie replies instead of doing DH.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rand::Rng;
use tracing::{debug, info, warn};

use super::{Counters, Device, Event, IndexEntry, KeySet};
use crate::{
    noise::{
        CookieChecker, CookieJar, InitiatorHandshake, LocalStatic, MacVerdict, SessionKeys, Tai64n, consume_initiation,
    },
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
}

pub struct Handshaker {
    dev: Arc<Device>,
    local: LocalStatic,
    socket: UdpSocket,
    events: Receiver<Event>,
    checker: CookieChecker,
    peers: Vec<PeerHandshake>,
    scratch: Vec<u8>,
}

/// The dual-stack sockets take IPv4 destinations as v4-mapped IPv6.
fn dual_stack(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        v6 => v6,
    }
}

impl Handshaker {
    pub fn new(dev: Arc<Device>, local: LocalStatic, socket: UdpSocket, events: Receiver<Event>) -> Self {
        let now = Instant::now();
        let peers = dev
            .peers
            .iter()
            .map(|p| PeerHandshake {
                timers: Timers::new(p.persistent_keepalive),
                pending: None,
                jar: CookieJar::new(p.identity.noise_public()),
                greatest_timestamp: Tai64n::default(),
                last_initiation_accepted: None,
                last_initiation_sent: None,
            })
            .collect();
        let checker = CookieChecker::new(&local.public, now);
        let scratch = vec![0u8; dev.mtu + 64];
        Handshaker {
            dev,
            local,
            socket,
            events,
            checker,
            peers,
            scratch,
        }
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
                for p in 0..self.peers.len() {
                    self.poll_timers(p, now);
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
            Event::NeedSession(p) => {
                self.peers[p].timers.want_session();
                self.poll_timers(p, now);
            }
            Event::KeyConfirmed(p) => {
                self.session_established(p, now);
                self.prune_indices(p);
                self.flush_staged(p, now);
            }
            Event::StaleSession(src) => {
                let Some(p) = self
                    .dev
                    .peers
                    .iter()
                    .position(|peer| peer.endpoint.load().as_deref() == Some(&src))
                else {
                    return;
                };
                let st = &self.peers[p];
                let recently = st
                    .last_initiation_sent
                    .is_some_and(|t| now.duration_since(t) < REKEY_TIMEOUT);
                if !st.timers.handshaking() && !recently {
                    debug!(peer = %self.dev.peers[p].name, "peer uses a session we do not have; re-handshaking");
                    self.initiate(p, now);
                }
            }
        }
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
        let counters = &self.dev.counters;
        let received = match consume_initiation(&self.local, msg) {
            Ok(r) => r,
            Err(_) => return Counters::bump(&counters.handshake_rejected),
        };
        let Some(&p) = self.dev.by_key.get(&received.remote_public) else {
            // Not a member: ignore silently (no response, no cookie).
            return Counters::bump(&counters.handshake_rejected);
        };
        let st = &mut self.peers[p];
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
        let (mut response, keys) = received.respond(index);
        self.peers[p].jar.stamp(&mut response, now);
        if self.socket.send_to(&response, dual_stack(src)).is_err() {
            return;
        }
        let dev = self.dev.clone();
        let peer = &dev.peers[p];
        peer.endpoint.store(Some(Arc::new(src)));
        let stamp = dev.clock.stamp(now);
        peer.activity.any_received.store(stamp, Ordering::Relaxed);
        peer.activity.any_sent.store(stamp, Ordering::Relaxed);
        // The key waits as `next` until the initiator's first data message confirms it.
        let keypair = Arc::new(Keypair::new(&keys, now));
        self.install(p, keypair, |ks, kp| KeySet {
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
        let Some(p) = self
            .peers
            .iter()
            .position(|s| s.pending.as_ref().is_some_and(|h| h.local_index() == receiver))
        else {
            return Counters::bump(&self.dev.counters.handshake_rejected);
        };
        let handshake = self.peers[p].pending.take().expect("found by its pending handshake");
        let keys: SessionKeys = match handshake.finish(msg) {
            Ok(k) => k,
            Err(_) => return Counters::bump(&self.dev.counters.handshake_rejected),
        };
        let peer = &self.dev.peers[p];
        peer.endpoint.store(Some(Arc::new(src)));
        peer.activity
            .any_received
            .store(self.dev.clock.stamp(now), Ordering::Relaxed);
        let keypair = Arc::new(Keypair::new(&keys, now));
        self.install(p, keypair, |ks, kp| KeySet {
            current: Some(kp),
            previous: ks.current.clone(),
            next: ks.next.clone(),
        });
        info!(peer = %self.dev.peers[p].name, %src, "session established (initiator)");
        self.session_established(p, now);
        if !self.flush_staged(p, now) {
            // Nothing queued: confirm the key to the responder with a keepalive.
            self.send_keepalive(p, now);
        }
    }

    fn on_cookie_reply(&mut self, msg: &[u8], now: Instant) {
        let receiver = wire::receiver_index(msg);
        let pending = self
            .peers
            .iter_mut()
            .find(|s| s.pending.as_ref().is_some_and(|h| h.local_index() == receiver));
        if !pending.is_some_and(|st| st.jar.consume_reply(msg, now)) {
            Counters::bump(&self.dev.counters.handshake_rejected);
        }
    }

    /// Replace peer `p`'s key set with `update(old, keypair)` and index the new key.
    fn install(&mut self, p: usize, keypair: Arc<Keypair>, update: impl Fn(&KeySet, Arc<Keypair>) -> KeySet) {
        let peer = &self.dev.peers[p];
        let index = keypair.local_index;
        peer.keys.store(Arc::new(update(&peer.keys.load(), keypair.clone())));
        let mut table: HashMap<u32, Arc<IndexEntry>> = (**self.dev.sessions.load()).clone();
        table.insert(index, Arc::new(IndexEntry { peer: p, keypair }));
        self.dev.sessions.store(Arc::new(table));
        self.prune_indices(p);
    }

    /// Drop index-table entries of peer `p` whose keys it no longer holds.
    fn prune_indices(&self, p: usize) {
        let keys = self.dev.peers[p].keys.load();
        let live: Vec<u32> = [&keys.current, &keys.previous, &keys.next]
            .into_iter()
            .flatten()
            .map(|k| k.local_index)
            .collect();
        let table = self.dev.sessions.load();
        if table.iter().any(|(i, e)| e.peer == p && !live.contains(i)) {
            let pruned = table
                .iter()
                .filter(|(i, e)| e.peer != p || live.contains(i))
                .map(|(i, e)| (*i, e.clone()))
                .collect();
            self.dev.sessions.store(Arc::new(pruned));
        }
    }

    fn session_established(&mut self, p: usize, now: Instant) {
        self.peers[p].timers.session_established(now);
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let peer = &self.dev.peers[p];
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
                .peers
                .iter()
                .any(|s| s.pending.as_ref().is_some_and(|h| h.local_index() == i));
            if !table.contains_key(&i) && !pending {
                return i;
            }
        }
    }

    fn initiate(&mut self, p: usize, now: Instant) {
        let peer = &self.dev.peers[p];
        let Some(endpoint) = peer.endpoint.load_full() else {
            debug!(peer = %peer.name, "no endpoint known; waiting for the peer to reach us");
            return;
        };
        let index = self.new_index();
        let (handshake, mut msg) =
            InitiatorHandshake::start(&self.local, peer.identity.noise_public(), index, Tai64n::now());
        let st = &mut self.peers[p];
        st.jar.stamp(&mut msg, now);
        st.pending = Some(handshake);
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

    fn poll_timers(&mut self, p: usize, now: Instant) {
        let peer = &self.dev.peers[p];
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
        match self.peers[p].timers.poll(now, seen, current) {
            None => {}
            Some(TimerAction::SendInitiation) => self.initiate(p, now),
            Some(TimerAction::SendKeepalive) => self.send_keepalive(p, now),
            Some(TimerAction::GiveUp) => {
                warn!(peer = %peer.name, "handshake did not complete within 90 s; dropping queued packets");
                let dropped = peer.staged.lock().map(|mut q| q.drain(..).count()).unwrap_or(0);
                self.dev
                    .counters
                    .tx_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                self.peers[p].pending = None;
                peer.session_requested.store(false, Ordering::Release);
            }
            Some(TimerAction::EraseKeys) => {
                peer.keys.store(Arc::new(KeySet::default()));
                self.prune_indices(p);
            }
        }
    }

    /// Seal `len` bytes already in `scratch[16..]` on the current key and send them.
    fn send_sealed(&mut self, p: usize, len: usize, now: Instant) -> bool {
        let peer = &self.dev.peers[p];
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

    fn send_keepalive(&mut self, p: usize, now: Instant) {
        self.send_sealed(p, 0, now);
    }

    /// Send packets queued while the session was missing; false if there were none.
    fn flush_staged(&mut self, p: usize, now: Instant) -> bool {
        let queued: Vec<Vec<u8>> = self.dev.peers[p]
            .staged
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default();
        for packet in &queued {
            if sealed_len(packet.len()) > self.scratch.len() {
                continue;
            }
            self.scratch[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + packet.len()].copy_from_slice(packet);
            self.send_sealed(p, packet.len(), now);
        }
        !queued.is_empty()
    }
}
