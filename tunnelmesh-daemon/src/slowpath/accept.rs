//! Accepting handshake messages, in the order that keeps an attacker's cost above ours.
//!
//! 1. **mac1** (and, under load, **mac2**) before any DH: a message that does not carry our
//!    public key's MAC costs a hash. Under load (a long event queue) an initiation from UDP
//!    without a valid cookie gets a cookie reply instead of DH. SSH and relay messages come from
//!    authenticated members over TCP: no cookies there.
//!    Under load, too, an initiation is charged to its proven source ([`super::limit`]): the
//!    address that answered the cookie, or the member an SSH or relay carrier authenticated; a
//!    source beyond its budget is dropped before DH (and blocked in the XDP shield a while).
//! 2. The initiation is decrypted; a key that is not a member's is dropped silently.
//! 3. Its TAI64N timestamp must be newer than the greatest accepted from that peer (replays),
//!    and at most one initiation per peer is accepted per [`MIN_INITIATION_INTERVAL`].
//! 4. The response's key waits as `next` until the initiator's first data message confirms
//!    it. A response is matched to our pending initiation by its receiver index; one that does
//!    not decrypt leaves that initiation pending (a forged response must not destroy it), and
//!    during a mesh-key rotation makes us retry soon under the other key.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tracing::{debug, info};

use super::{
    Output, SlowPath, UNDER_LOAD_QUEUE,
    limit::{self, Source},
};
use crate::{
    device::{ActivityStamps, Counters, KeySet, Peer, Via},
    protocol::{
        noise::{MacVerdict, consume_initiation},
        session::{Keypair, REKEY_TIMEOUT},
        wire,
    },
};

/// At most one accepted initiation per peer per this interval (WireGuard: 50 per second).
pub(super) const MIN_INITIATION_INTERVAL: Duration = Duration::from_millis(20);

impl SlowPath {
    /// The mac1/mac2 gate shared by initiations and responses; true if the message may be
    /// processed.
    fn macs_ok(&mut self, msg: &[u8], via: Via, now: Instant) -> bool {
        let (src, under_load) = match via {
            Via::Udp(src) => (src, self.backlog >= UNDER_LOAD_QUEUE),
            _ => (SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)), false),
        };
        match self.checker.verify(msg, src, under_load, now) {
            MacVerdict::Accept => true,
            MacVerdict::NeedCookie => {
                let reply = self.checker.cookie_reply(msg, src, now);
                self.out.push(Output::Transmit {
                    via,
                    msg: reply.to_vec(),
                });
                Counters::bump(&self.dev.counters.cookie_replies_sent);
                false
            }
            MacVerdict::Reject => {
                Counters::bump(&self.dev.counters.handshake_rejected);
                false
            }
        }
    }

    pub(super) fn on_initiation(&mut self, msg: &[u8], via: Via, now: Instant) {
        if !self.macs_ok(msg, via, now) {
            return;
        }
        if self.backlog >= UNDER_LOAD_QUEUE && !self.limiter.charge(Source::of(via), now) {
            Counters::bump(&self.dev.counters.handshake_rate_limited);
            if let Via::Udp(src) = via {
                self.out.push(Output::ShieldBlock {
                    source: src.ip(),
                    period: limit::BLOCK_FOR,
                });
            }
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
        let state = self.peer_state(peer);
        if received.timestamp <= state.greatest_timestamp {
            return Counters::bump(&counters.handshake_replayed);
        }
        if state
            .last_initiation_accepted
            .is_some_and(|t| now.duration_since(t) < MIN_INITIATION_INTERVAL)
        {
            return Counters::bump(&counters.handshake_rejected);
        }
        state.greatest_timestamp = received.timestamp;
        state.last_initiation_accepted = Some(now);
        let index = self.new_index();
        let (mut response, keys) = received.respond(index);
        // The key waits as `next` until the initiator's first data message confirms it. It is
        // installed (and the shield learns its index) before the response goes out: the
        // initiator's first data message names it.
        let keypair = Arc::new(Keypair::new(&keys, now));
        self.install(peer, keypair, |ks, kp| KeySet {
            next: Some(kp),
            ..ks.clone()
        });
        // If the response is lost (or never sent), the key and its shield index still end.
        self.peer_state(peer).timers.keys_derived(now);
        self.peer_state(peer).jar.stamp(&mut response, now);
        self.transmit(via, response.to_vec());
        if let Via::Udp(src) = via {
            peer.endpoint.store(Some(Arc::new(src)));
        }
        self.peer_state(peer).responded_via = Some(via.kind());
        let stamp = dev.clock.stamp(now);
        peer.activity.any_received.store(stamp, Ordering::Relaxed);
        peer.activity.any_sent.store(stamp, Ordering::Relaxed);
        debug!(peer = %peer.name, %via, "answered handshake initiation");
    }

    pub(super) fn on_response(&mut self, msg: &[u8], via: Via, now: Instant) {
        if !self.macs_ok(msg, via, now) {
            return;
        }
        let receiver = wire::receiver_index(msg);
        let Some(key) = self
            .peers
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
        let Some(handshake) = self.peer_state(peer).pending.as_mut() else {
            return;
        };
        let keys = match handshake.finish(msg) {
            Ok(k) => {
                self.peer_state(peer).pending = None;
                k
            }
            Err(_) => {
                Counters::bump(&self.dev.counters.handshake_rejected);
                // During a mesh-key rotation the peer may answer under the other key: try it
                // soon rather than after REKEY_TIMEOUT, but after the responder's flood limit.
                if self.dev.mesh_keys.load().len() > self.peer_state(peer).attempts {
                    self.peer_state(peer).other_key_at = Some(now + MIN_INITIATION_INTERVAL);
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
        self.peer_state(peer).paths.proven(via.kind(), now);
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

    pub(super) fn on_cookie_reply(&mut self, msg: &[u8], now: Instant) {
        let receiver = wire::receiver_index(msg);
        let pending = self
            .peers
            .values_mut()
            .find(|s| s.pending.as_ref().is_some_and(|h| h.local_index() == receiver));
        if !pending.is_some_and(|state| state.jar.consume_reply(msg, now)) {
            Counters::bump(&self.dev.counters.handshake_rejected);
        }
    }

    /// The peer sent data on the key we answered with (a worker promoted it to `current`).
    pub(super) fn on_key_confirmed(&mut self, peer: &Arc<Peer>, now: Instant) {
        let state = self.peer_state(peer);
        if let Some(kind) = state.responded_via.take() {
            state.paths.proven(kind, now);
        }
        self.sync_path(peer);
        self.session_established(peer, now);
        self.prune_indices();
        self.flush_staged(peer, now);
    }

    /// A data message named an index we do not know: the sender has a session we lost (we
    /// restarted). If it is a peer's and we are not handshaking already, re-handshake at once.
    pub(super) fn on_stale_session(&mut self, via: Via, now: Instant) {
        let table = self.dev.peers.load_full();
        let peer = match via {
            Via::Udp(src) => table.peers.iter().find(|p| p.endpoint.load().as_deref() == Some(&src)),
            Via::Ssh(key) | Via::Relay(key) => table.get(&key),
        };
        let Some(peer) = peer else {
            return;
        };
        let state = self.peer_state(peer);
        let recently = state
            .last_initiation_sent
            .is_some_and(|t| now.duration_since(t) < REKEY_TIMEOUT);
        if !state.timers.handshaking() && !recently {
            debug!(peer = %peer.name, "peer uses a session we do not have; re-handshaking");
            self.initiate(peer, now);
        }
    }
}
