//! Feeding each peer's [`PathManager`](crate::protocol::path::PathManager) what the device
//! shows (which transports exist, when authenticated traffic last arrived on each, whether we
//! are sending), carrying out its probes, and publishing its choice to the workers (the peer's
//! `path`) and its report to `status`. While UDP does not work and the peer runs an SSH
//! transport, the SSH client is asked to connect (`want_ssh`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{debug, info};

use super::{SlowPath, ping::PING_NONCE};
use crate::{
    device::{Peer, Via},
    protocol::path::{PathAction, PathKind},
};

/// We count as sending on a path if data went out within this.
const SENDING_WINDOW: Duration = Duration::from_secs(3);
/// The path report for `status` is refreshed every this many ticks.
const REPORT_EVERY_TICKS: u64 = 10;

impl SlowPath {
    /// Tell the path manager what exists, let it decide, carry out its probes, publish the path.
    pub(super) fn poll_paths(&mut self, peer: &Arc<Peer>, now: Instant) {
        let available = [
            peer.endpoint.load().is_some(),
            peer.ssh_tx.load().is_some(),
            self.dev.coordinator.relay.load().is_some(),
        ];
        let seen = |stamp: &AtomicU64| self.dev.clock.instant(stamp.load(Ordering::Relaxed));
        let rx: [Option<Instant>; 3] = std::array::from_fn(|i| seen(&peer.rx_via[i]));
        let data_sent = seen(&peer.activity.data_sent);
        let has_key = peer.keys.load().current.is_some();
        let state = self.peer_state(peer);
        for kind in PathKind::ALL {
            state.paths.set_available(kind, available[kind as usize], now);
            if let Some(at) = rx[kind as usize] {
                state.paths.received(kind, at);
            }
        }
        let current = state.paths.current();
        let sending = data_sent.is_some_and(|t| now.saturating_duration_since(t) < SENDING_WINDOW);
        let quiet = current
            .and_then(|c| rx[c as usize])
            .map(|t| now.saturating_duration_since(t));
        let actions = if has_key {
            state.paths.poll(now, sending, quiet)
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
        if self.ticks.is_multiple_of(REPORT_EVERY_TICKS) {
            let report = self.peer_state(peer).paths.report(now);
            peer.paths.store(Arc::new(report));
        }
    }

    /// Publish the path manager's choice to the workers; ask for SSH while UDP does not work.
    pub(super) fn sync_path(&mut self, peer: &Peer) {
        let udp_known = peer.endpoint.load().is_some();
        let relay_up = self.dev.coordinator.relay.load().is_some();
        let state = self.peer_state(peer);
        let kind = state.paths.current().unwrap_or(if udp_known || !relay_up {
            PathKind::Udp
        } else {
            PathKind::Relay
        });
        if peer.path() != kind {
            peer.path.store(kind as u8, Ordering::Relaxed);
        }
        let want_ssh = peer.ssh_endpoint.is_some() && state.paths.current() != Some(PathKind::Udp);
        peer.want_ssh.store(want_ssh, Ordering::Relaxed);
    }

    /// A probe from `peer` came `via` a path: answer a request on the path it came on (that is
    /// the path it tests); hand a reply to `tunnelmesh ping` or to the path manager.
    pub(super) fn on_probe(&mut self, peer: &Arc<Peer>, via: Via, reply: bool, nonce: u64, now: Instant) {
        if !reply {
            self.send_probe(peer, via, true, nonce, now);
        } else if nonce & PING_NONCE != 0 {
            self.ping_answered(peer, via.kind(), nonce, now);
        } else if let Some(rtt) = self.peer_state(peer).paths.probe_answered(via.kind(), nonce, now) {
            debug!(peer = %peer.name, path = via.kind().name(), ?rtt, "probe answered");
        }
    }
}
