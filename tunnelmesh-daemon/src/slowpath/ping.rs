//! `tunnelmesh ping`: one probe on every available path to the peer, answered with the round
//! trip of each (or none) once all replied or [`PING_TIMEOUT`] passed. Ping probes carry nonces
//! with [`PING_NONCE`] set, the path manager's never do, so the two cannot steal each other's
//! replies.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;

use super::{Output, SlowPath};
use crate::{
    device::{Peer, PingAnswer, PingReport, Via},
    protocol::path::PathKind,
};

/// How long `tunnelmesh ping` waits for answers.
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Nonces of `tunnelmesh ping` probes have this bit set.
pub(super) const PING_NONCE: u64 = 1 << 63;

/// One probe of a ping: its nonce, the path, where it went, its round trip once answered.
struct Probe {
    nonce: u64,
    kind: PathKind,
    to: String,
    rtt: Option<Duration>,
}

/// A `tunnelmesh ping` waiting for probe replies.
struct PendingPing {
    peer: Arc<Peer>,
    sent: Instant,
    probes: Vec<Probe>,
    answer: Sender<PingAnswer>,
}

/// The pings in flight.
#[derive(Default)]
pub(super) struct Pings {
    pending: Vec<PendingPing>,
    last_nonce: u64,
}

impl Pings {
    fn next_nonce(&mut self) -> u64 {
        self.last_nonce = self.last_nonce.wrapping_add(1) | PING_NONCE;
        self.last_nonce
    }
}

impl SlowPath {
    pub(super) fn start_ping(&mut self, name: &str, answer: Sender<PingAnswer>, now: Instant) {
        let table = self.dev.peers.load_full();
        let Some(peer) = table
            .peers
            .iter()
            .find(|p| p.name == name || p.identity.fingerprint() == name)
        else {
            self.out.push(Output::PingDone {
                to: answer,
                report: Err(format!("no peer named {name:?}")),
            });
            return;
        };
        if peer.keys.load().current.is_none() {
            // Probes ride on the session: start one, and ask again.
            self.peer_state(peer).timers.want_session();
            self.poll_timers(peer, now);
            self.out.push(Output::PingDone {
                to: answer,
                report: Err(format!("no session with {name} yet (handshake started); try again")),
            });
            return;
        }
        let mut probes = Vec::new();
        for kind in PathKind::ALL {
            if !self.peer_state(peer).paths.is_available(kind) {
                continue;
            }
            let Some(via) = Via::to_peer(peer, kind) else {
                continue;
            };
            let nonce = self.pings.next_nonce();
            self.send_probe(peer, via, false, nonce, now);
            probes.push(Probe {
                nonce,
                kind,
                to: via.to_string(),
                rtt: None,
            });
        }
        self.pings.pending.push(PendingPing {
            peer: peer.clone(),
            sent: now,
            probes,
            answer,
        });
        // No path available at all: answer at once.
        self.finish_pings(now);
    }

    pub(super) fn ping_answered(&mut self, peer: &Arc<Peer>, kind: PathKind, nonce: u64, now: Instant) {
        for ping in self.pings.pending.iter_mut().filter(|p| Arc::ptr_eq(&p.peer, peer)) {
            for probe in ping.probes.iter_mut().filter(|p| p.nonce == nonce && p.kind == kind) {
                probe.rtt.get_or_insert(now.saturating_duration_since(ping.sent));
            }
        }
        self.finish_pings(now);
    }

    /// Answer the pings that are complete (or timed out).
    pub(super) fn finish_pings(&mut self, now: Instant) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pings.pending).into_iter().partition(|p| {
            p.probes.iter().all(|x| x.rtt.is_some()) || now.saturating_duration_since(p.sent) >= PING_TIMEOUT
        });
        self.pings.pending = waiting;
        for ping in done {
            let current = self.peer_state(&ping.peer).paths.current();
            let report = PingReport {
                peer: ping.peer.name.clone(),
                current,
                paths: ping
                    .probes
                    .into_iter()
                    .map(|p| (p.kind, p.to, p.rtt.map(|d| d.as_secs_f64() * 1e3)))
                    .collect(),
            };
            self.out.push(Output::PingDone {
                to: ping.answer,
                report: Ok(report),
            });
        }
    }
}
