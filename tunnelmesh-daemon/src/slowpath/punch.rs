//! Hole punching towards each peer: the coordinator's word starts a punch
//! ([`crate::protocol::punch`] plans its rounds and backoff); its rounds go out as handshake
//! initiations to every target; a punch is asked for when the rules there allow.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Instant};

use tracing::{debug, info};

use super::{Output, SlowPath};
use crate::{
    device::{CoordinatorRequest, Peer, Via},
    protocol::{
        discovery::NatKind,
        path::PathKind,
        punch::{self, PunchAction, PunchConditions},
    },
};

impl SlowPath {
    /// The coordinator says both sides punch towards each other now.
    pub(super) fn on_punch_request(&mut self, key: [u8; 32], candidates: &[SocketAddr], nat: NatKind, now: Instant) {
        let table = self.dev.peers.load_full();
        let Some(peer) = table.get(&key) else {
            return;
        };
        let hard_nat = self.hard_nat_involved(nat);
        let targets = punch::targets(candidates, nat);
        let count = targets.len();
        if self.peer_state(peer).punch.start(targets, hard_nat, now) {
            debug!(peer = %peer.name, targets = count, "punching");
            peer.punches_started.fetch_add(1, Ordering::Relaxed);
            self.poll_punch(peer, now);
        }
    }

    /// Carry on a punch in progress, or ask for one.
    pub(super) fn poll_punch(&mut self, peer: &Arc<Peer>, now: Instant) {
        let remote = peer.remote.load_full();
        let hard_nat = self.hard_nat_involved(remote.nat);
        let connected = self.dev.coordinator.requests.load().is_some();
        let has_key = peer.keys.load().current.is_some();
        let state = self.peer_state(peer);
        let wanted = has_key || state.timers.handshaking();
        let conditions = PunchConditions {
            udp_works: state.paths.proven_now(PathKind::Udp, now),
            hard_nat,
            may_request: remote.nat != NatKind::None && !remote.endpoints.is_empty() && connected && wanted,
        };
        match state.punch.poll(now, conditions) {
            None => {}
            Some(PunchAction::SendRound(targets)) => {
                let vias: Vec<Via> = targets.into_iter().map(Via::Udp).collect();
                self.send_initiation(peer, &vias, now);
            }
            Some(PunchAction::Request) => self.out.push(Output::Coordinator(CoordinatorRequest::Punch {
                peer: peer.identity.fingerprint(),
            })),
            Some(PunchAction::Succeeded(after)) => {
                peer.punches_succeeded.fetch_add(1, Ordering::Relaxed);
                info!(peer = %peer.name, ?after, "hole punched");
            }
            Some(PunchAction::Failed(retry_in)) => debug!(peer = %peer.name, ?retry_in, "punch failed"),
        }
    }
}
