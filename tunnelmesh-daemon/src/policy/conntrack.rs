//! Connection tracking for the stateful part of the policy: replies to flows a node opened pass.
//!
//! Sans-I/O: the caller records outbound flows and asks about inbound packets, passing `now`.
//! Entries expire after a per-protocol idle time; the table is bounded (oldest evicted first).

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

/// The flow table of one node.
pub struct Conntrack {
    flows: HashMap<FlowKey, Instant>,
    order: VecDeque<FlowKey>,
    capacity: usize,
}

impl Conntrack {
    pub fn new(capacity: usize) -> Self {
        Conntrack {
            flows: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Record an outbound packet of `flow` at `now`.
    pub fn outbound(&mut self, flow: FlowKey, now: Instant) {
        if self.flows.insert(flow, now).is_none() {
            self.order.push_back(flow);
            // Keys of flows that expired stay in `order` until evicted; keep it bounded.
            if self.order.len() > 2 * self.capacity {
                self.order.retain(|k| self.flows.contains_key(k));
            }
            while self.flows.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.flows.remove(&old);
                }
            }
        }
    }

    /// Whether an inbound packet belongs to a live flow this node opened; refreshes it.
    pub fn is_reply(&mut self, flow: FlowKey, now: Instant) -> bool {
        match self.flows.get_mut(&flow) {
            Some(seen) if now.saturating_duration_since(*seen) < idle_timeout(flow.proto) => {
                *seen = now;
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
