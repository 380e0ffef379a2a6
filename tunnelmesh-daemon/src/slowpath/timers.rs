//! Starting handshakes: when the session timers ([`crate::protocol::session::Timers`]) say so,
//! when a worker needs a session, and on which paths the initiation goes.
//!
//! An initiation goes on the path in use if one is proven; with none proven, on every available
//! path at once — the first answer decides, so traffic never waits for a slow path. During a
//! mesh-key rotation successive initiations alternate the mesh keys, so a peer that has not
//! switched yet answers under the previous one.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, UNIX_EPOCH},
};

use rand::Rng;
use tracing::{debug, warn};

use super::SlowPath;
use crate::{
    device::{Peer, Via},
    protocol::{
        noise::{InitiatorHandshake, Tai64n},
        path::PathKind,
        session::{REKEY_TIMEOUT, TimerAction, timers::CurrentKey},
    },
};

impl SlowPath {
    /// Start a handshake with `peer` on the paths the rules above choose.
    pub(super) fn initiate(&mut self, peer: &Peer, now: Instant) {
        let state = self.peer_state(peer);
        let vias: Vec<Via> = match state.paths.current() {
            Some(kind) => Via::to_peer(peer, kind).into_iter().collect(),
            None => {
                let kinds: Vec<PathKind> = state.paths.available().collect();
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

    /// One initiation, sent on each of `vias` (the first answer wins).
    pub(super) fn send_initiation(&mut self, peer: &Peer, vias: &[Via], now: Instant) {
        debug!(peer = %peer.name, ?vias, "initiating");
        let index = self.new_index();
        let mesh_keys = self.dev.mesh_keys.load();
        let attempts = self.peer_state(peer).attempts;
        let psk = &mesh_keys[attempts % mesh_keys.len()];
        let since_epoch = self.wall_clock(now).duration_since(UNIX_EPOCH).unwrap_or_default();
        let (handshake, mut msg) = InitiatorHandshake::start(
            &self.local,
            psk,
            peer.identity.noise_public(),
            index,
            Tai64n::from_unix(since_epoch),
        );
        let state = self.peer_state(peer);
        state.jar.stamp(&mut msg, now);
        state.pending = Some(handshake);
        state.attempts += 1;
        state.last_initiation_sent = Some(now);
        state
            .timers
            .initiation_sent(now, Duration::from_millis(rand::thread_rng().gen_range(0..=333)));
        for &via in vias {
            self.transmit(via, msg.to_vec());
        }
        peer.activity
            .any_sent
            .store(self.dev.clock.stamp(now), Ordering::Relaxed);
    }

    /// A session is up (either role): the timers restart, the round's attempts reset.
    pub(super) fn session_established(&mut self, peer: &Peer, now: Instant) {
        let state = self.peer_state(peer);
        state.timers.session_established(now);
        state.attempts = 0;
        state.other_key_at = None;
        let unix = self
            .wall_clock(now)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        peer.last_handshake_unix.store(unix, Ordering::Relaxed);
        peer.session_requested.store(false, Ordering::Release);
    }

    pub(super) fn poll_timers(&mut self, peer: &Arc<Peer>, now: Instant) {
        let state = self.peer_state(peer);
        if state.other_key_at.is_some_and(|t| now >= t) {
            state.other_key_at = None;
            return self.initiate(peer, now);
        }
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
        match self.peer_state(peer).timers.poll(now, seen, current) {
            None => {}
            Some(TimerAction::SendInitiation) => self.initiate(peer, now),
            Some(TimerAction::SendKeepalive) => {
                self.send_sealed(peer, 0, now);
            }
            Some(TimerAction::GiveUp) => {
                warn!(peer = %peer.name, "handshake did not complete within 90 s; dropping queued packets");
                let dropped = peer.take_staged().len();
                self.dev
                    .counters
                    .tx_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                let state = self.peer_state(peer);
                state.pending = None;
                state.attempts = 0;
                state.other_key_at = None;
                peer.session_requested.store(false, Ordering::Release);
            }
            Some(TimerAction::EraseKeys) => self.erase_keys(peer),
        }
    }
}
