//! Connection tracking for the stateful part of the policy: replies to flows a node opened pass.
//!
//! Sans-I/O: the caller records outbound flows and asks about inbound packets, passing `now`.
//! Entries expire after a per-protocol idle time; the table is bounded (the least recently used
//! flow is evicted first, as in the kernel's LRU hash).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::ports::Proto;

/// A flow as seen from this node: (protocol, local address and port, remote address and port).
/// For ICMP echo the "ports" are the echo identifier on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: Proto,
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
}

/// Idle time after which a flow is forgotten.
pub fn idle_timeout(proto: Proto) -> Duration {
    match proto {
        Proto::Tcp => Duration::from_secs(300),
        Proto::Udp => Duration::from_secs(60),
        Proto::Icmp | Proto::Any => Duration::from_secs(30),
    }
}

/// The flow table of one node: least recently used first out, as the kernel's LRU hash.
///
/// `order` lists (flow, use number) in the order of use; a flow used again is pushed anew, and
/// its older entries are skipped when they reach the front (their number is no longer the
/// flow's).
pub struct Conntrack {
    /// Flow → (last packet, number of its last use).
    flows: HashMap<FlowKey, (Instant, u64)>,
    order: VecDeque<(FlowKey, u64)>,
    uses: u64,
    capacity: usize,
}

impl Conntrack {
    pub fn new(capacity: usize) -> Self {
        Conntrack {
            flows: HashMap::new(),
            order: VecDeque::new(),
            uses: 0,
            capacity,
        }
    }

    /// Record an outbound packet of `flow` at `now`.
    pub fn outbound(&mut self, flow: FlowKey, now: Instant) {
        self.used(flow, now);
        while self.flows.len() > self.capacity {
            let Some((old, number)) = self.order.pop_front() else {
                break;
            };
            if self.flows.get(&old).is_some_and(|&(_, n)| n == number) {
                self.flows.remove(&old);
            }
        }
    }

    /// Refresh `flow` if the table holds it (live or not yet evicted); whether it did.
    pub fn refresh(&mut self, flow: FlowKey, now: Instant) -> bool {
        if !self.flows.contains_key(&flow) {
            return false;
        }
        self.used(flow, now);
        true
    }

    /// `flow` was used at `now`: stamp it and move it to the back of the eviction order.
    fn used(&mut self, flow: FlowKey, now: Instant) {
        self.uses += 1;
        self.flows.insert(flow, (now, self.uses));
        self.order.push_back((flow, self.uses));
        // Entries of flows used again (or expired) stay until they reach the front; compact
        // when they outnumber the live ones, so the queue stays within 2 × capacity + 1.
        if self.order.len() > 2 * self.capacity.max(self.flows.len()) {
            let flows = &self.flows;
            self.order
                .retain(|(k, n)| flows.get(k).is_some_and(|&(_, live)| live == *n));
        }
    }

    /// Whether an inbound packet belongs to a live flow this node opened; refreshes it.
    pub fn is_reply(&mut self, flow: FlowKey, now: Instant) -> bool {
        match self.flows.get(&flow) {
            Some(&(seen, _)) if now.saturating_duration_since(seen) < idle_timeout(flow.proto) => {
                self.used(flow, now);
                true
            }
            Some(_) => {
                self.flows.remove(&flow);
                false
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}
