//! Discovery on the tunnel socket and publishing what it learns.
//!
//! STUN requests go out from the tunnel socket itself (as [`Output::Transmit`] on UDP), so the
//! mapping learned is the one peers must punch towards; the answers come back through the
//! workers. After a network change (netlink) we wait [`NETWORK_SETTLE`] for the burst of
//! notifications to end, ask the driver to read this machine's addresses again, and start a new
//! round. The coordinator hears our candidates when a round has finished and what peers need
//! (endpoints, NAT kind) differs from what it last heard.

use std::{net::SocketAddr, sync::Arc, time::Duration, time::Instant};

use tracing::{debug, info};

use super::{Output, SlowPath};
use crate::{
    device::{CoordinatorRequest, Via},
    protocol::discovery::{Candidates, Discovery, NatKind},
};

/// After a network change, wait this long for the burst of notifications to settle.
pub(super) const NETWORK_SETTLE: Duration = Duration::from_millis(200);

/// Discovery rounds and what the coordinator last heard.
pub(super) struct Publisher {
    discovery: Discovery,
    /// Candidates as the coordinator last heard them from us.
    published: Option<Candidates>,
    /// Re-read this machine's addresses at this time.
    network_changed: Option<Instant>,
}

impl Publisher {
    pub(super) fn new(now: Instant) -> Self {
        Publisher {
            discovery: Discovery::new(now),
            published: None,
            // Read the addresses at the first tick.
            network_changed: Some(now),
        }
    }

    /// This machine's addresses or routes changed.
    pub(super) fn network_changed(&mut self, now: Instant) {
        self.network_changed.get_or_insert(now + NETWORK_SETTLE);
    }

    /// The coordinator did not get what we published: publish again.
    pub(super) fn not_published(&mut self) {
        self.published = None;
    }
}

impl SlowPath {
    /// Send what discovery asks, publish what it learned.
    pub(super) fn poll_discovery(&mut self, now: Instant) {
        if self.discovery.network_changed.is_some_and(|t| now >= t) {
            self.discovery.network_changed = None;
            // The round starts when the addresses are back (the driver answers at once).
            self.out.push(Output::ReadHostCandidates);
            return;
        }
        let targets = self.dev.coordinator.stun_targets.load().as_deref().copied();
        let d = &mut self.discovery.discovery;
        d.set_targets(targets, now);
        d.set_port_mapped(self.dev.reach.port_mapping.load().as_ref().map(|m| m.external));
        for (target, request) in d.poll(now) {
            self.out.push(Output::Transmit {
                via: Via::Udp(target),
                msg: request.to_vec(),
            });
        }
        self.publish_candidates();
    }

    /// The driver read this machine's addresses: new host candidates, and ask STUN again now.
    pub(super) fn on_host_candidates(&mut self, host: Vec<SocketAddr>, now: Instant) {
        debug!(?host, "network changed; asking STUN again");
        self.discovery.discovery.network_changed(host, now);
        self.poll_discovery(now);
    }

    /// A STUN answer on the tunnel port.
    pub(super) fn on_stun(&mut self, msg: &[u8], from: SocketAddr, now: Instant) {
        if self.discovery.discovery.on_response(msg, from, now) {
            self.publish_candidates();
        }
    }

    /// Tell the coordinator our candidates when what peers need differs from what it has.
    fn publish_candidates(&mut self) {
        let candidates = self.discovery.discovery.candidates();
        if **self.dev.reach.candidates.load() != candidates {
            self.dev.reach.candidates.store(Arc::new(candidates.clone()));
        }
        let p = &self.discovery;
        if !p.discovery.settled() || p.published.as_ref().is_some_and(|c| c.same_published(&candidates)) {
            return;
        }
        if self.dev.coordinator.requests.load().is_none() {
            return;
        }
        info!(host = ?candidates.host, reflexive = ?candidates.reflexive, port_mapped = ?candidates.port_mapped,
            nat = candidates.nat.name(), "candidates published");
        self.out.push(Output::Coordinator(CoordinatorRequest::Candidates {
            endpoints: candidates.endpoints(),
            nat: candidates.nat,
        }));
        self.discovery.published = Some(candidates);
    }

    /// Whether we or a peer behind `nat` sit behind a hard NAT.
    pub(super) fn hard_nat_involved(&self, nat: NatKind) -> bool {
        nat == NatKind::Hard || self.dev.reach.candidates.load().nat == NatKind::Hard
    }
}
