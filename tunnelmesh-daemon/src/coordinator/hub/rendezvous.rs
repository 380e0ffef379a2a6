//! Rendezvous: nodes report their UDP candidates and NAT kind; the coordinator checks and keeps
//! them, pushes them to the others, and when a node asks to punch towards another, tells both
//! at once (each then sends to the other's candidates).
//!
//! A node's entry reaches its peers at most once per [`CANDIDATES_INTERVAL`] on average, after a
//! burst of [`CANDIDATES_BURST`]: a change beyond that is held (the newest replaces an older
//! one) and taken when the pace allows ([`Hub::flush_paced`], every tick of the coordinator). A
//! member alternating its endpoints a thousand times a second costs every peer one update a
//! second, and the store one write.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use super::Hub;
use crate::{
    control::proto::{ClientMsg, ServerMsg},
    coordinator::store::{NodeRecord, StoreError},
    protocol::{
        discovery::{MAX_CANDIDATES, NatKind},
        punch::reachable_endpoint,
    },
};

/// Why a message from a connected node was not applied. It is ignored, not fatal: a newer node
/// may speak messages this coordinator lacks.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("unreadable message: {0}")]
    Unreadable(#[from] serde_json::Error),
    #[error("already joined; a hello is only valid first")]
    HelloAgain,
    #[error("unknown node")]
    UnknownNode,
    #[error("the node was revoked or removed")]
    Gone,
    #[error("a newer connection of the node replaced this one")]
    Superseded,
    #[error("a node cannot punch to itself")]
    PunchToSelf,
    #[error("the policy lets this node and {0} talk in neither direction: no punch")]
    PunchNotAllowed(String),
    #[error("more than {PUNCH_BUDGET} punch requests in {PUNCH_BUDGET_WINDOW:?}")]
    PunchBudget,
    #[error("no member {0}")]
    NoMember(String),
    #[error("{0} endpoints reported; at most {MAX_CANDIDATES} are accepted")]
    TooManyEndpoints(usize),
    #[error("endpoint {0:?} is not ip:port")]
    BadEndpoint(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A pair of nodes is asked to punch at most this often.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(500);
/// Punch requests one node may make per [`PUNCH_BUDGET_WINDOW`] (a node asks at most once per
/// peer per backoff, 2 s at the least: this is far above what a real node needs).
pub const PUNCH_BUDGET: u32 = 128;
pub const PUNCH_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// A node's peer entry is pushed to its peers at most this often on average…
pub const CANDIDATES_INTERVAL: Duration = Duration::from_secs(1);
/// …after a burst of this many (a join, its STUN answer and a roam in quick succession).
pub const CANDIDATES_BURST: f64 = 4.0;

/// The pace of one node's peer-entry pushes: a token bucket.
pub(super) struct Paced {
    tokens: f64,
    refilled: Instant,
    /// Candidates it reported while out of tokens, the newest (checked, not yet taken).
    held: Option<(Vec<SocketAddr>, NatKind)>,
    /// Its entry changed while out of tokens (at a rejoin) and is to be pushed.
    due: bool,
}

impl Paced {
    fn new(now: Instant) -> Self {
        Paced {
            tokens: CANDIDATES_BURST,
            refilled: now,
            held: None,
            due: false,
        }
    }

    /// Whether a push now must wait for the bucket to refill.
    fn waiting(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() / CANDIDATES_INTERVAL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(CANDIDATES_BURST);
        self.refilled = now;
        self.tokens < 1.0
    }
}

impl Hub {
    /// A message that `connection` of node `fingerprint` sent after its welcome. It is judged
    /// against the node's state now, under the hub lock, not when it was read: a node revoked
    /// or removed since, or a connection a newer one replaced, is heard no more (a revoked node's
    /// late candidates would otherwise be pushed to every peer, which would take it back).
    pub fn on_message(&mut self, fingerprint: &str, connection: u64, msg: ClientMsg) -> Result<(), MessageError> {
        match self.nodes.get(fingerprint) {
            None => return Err(MessageError::UnknownNode),
            Some(n) if n.revoked || n.removed => return Err(MessageError::Gone),
            Some(_) => {}
        }
        if !self.connections.get(fingerprint).is_some_and(|c| c.id == connection) {
            return Err(MessageError::Superseded);
        }
        match msg {
            ClientMsg::Hello { .. } => Err(MessageError::HelloAgain),
            ClientMsg::Candidates { endpoints, nat } => self.candidates(fingerprint, &endpoints, nat),
            ClientMsg::Punch { peer } => self.punch(fingerprint, &peer),
        }
    }

    /// New UDP candidates of `fingerprint`: checked now, taken now or, beyond its pace, held.
    fn candidates(&mut self, fingerprint: &str, endpoints: &[String], nat: NatKind) -> Result<(), MessageError> {
        let candidates = parse_endpoints(endpoints)?;
        let now = Instant::now();
        let paced = self.pace(fingerprint, now);
        if paced.waiting(now) {
            paced.held = Some((candidates, nat));
            return Ok(());
        }
        paced.held = None;
        if self.take_candidates(fingerprint, &candidates, nat)? {
            self.push_entry(fingerprint, now);
        }
        Ok(())
    }

    /// Keep `candidates` (and the SSH endpoint it had) as `fingerprint`'s; whether its entry changed.
    fn take_candidates(
        &mut self,
        fingerprint: &str,
        candidates: &[SocketAddr],
        nat: NatKind,
    ) -> Result<bool, MessageError> {
        let Some(record) = self.nodes.get(fingerprint).cloned() else {
            return Err(MessageError::UnknownNode);
        };
        let Some(observed) = self.observed.get(fingerprint).copied() else {
            return Err(MessageError::UnknownNode);
        };
        let nat = nat_of(nat, candidates, observed);
        let mut reported = published_endpoints(candidates, observed, nat);
        reported.extend(record.endpoints.iter().filter(|e| e.starts_with("ssh://")).cloned());
        if reported == record.endpoints && self.nat.get(fingerprint) == Some(&nat) {
            return Ok(false);
        }
        if reported != record.endpoints {
            self.store.set_endpoints(fingerprint, &reported)?;
        }
        self.nat.insert(fingerprint.to_string(), nat);
        debug!(%fingerprint, endpoints = ?reported, nat = nat.name(), "candidates changed");
        self.remember(NodeRecord {
            endpoints: reported,
            ..record
        });
        Ok(true)
    }

    /// A rejoin's hello carries `fingerprint`'s candidates, newer than any its old connection
    /// had held.
    pub(super) fn drop_held(&mut self, fingerprint: &str) {
        if let Some(paced) = self.paced.get_mut(fingerprint) {
            paced.held = None;
        }
    }

    /// `fingerprint`'s entry changed: push it to every peer now, or once its pace allows.
    pub(super) fn announce(&mut self, fingerprint: &str, now: Instant) {
        let paced = self.pace(fingerprint, now);
        if paced.waiting(now) {
            paced.due = true;
        } else {
            self.push_entry(fingerprint, now);
        }
    }

    /// `fingerprint`'s pace (a fresh one the first time).
    fn pace(&mut self, fingerprint: &str, now: Instant) -> &mut Paced {
        self.paced
            .entry(fingerprint.to_string())
            .or_insert_with(|| Paced::new(now))
    }

    fn push_entry(&mut self, fingerprint: &str, now: Instant) {
        let Some(record) = self.nodes.get(fingerprint) else {
            return;
        };
        let peer = self.peer_info(record);
        let paced = self.pace(fingerprint, now);
        paced.tokens -= 1.0;
        paced.due = false;
        self.broadcast(Some(fingerprint), ServerMsg::PeerUpsert { peer });
    }

    /// Take what was held for nodes whose pace allows a push now, and push their entries. A node
    /// revoked or removed meanwhile has nothing taken.
    pub fn flush_paced(&mut self, now: Instant) {
        let ready: Vec<String> = self
            .paced
            .iter_mut()
            .filter(|(_, p)| p.held.is_some() || p.due)
            .filter_map(|(fp, p)| (!p.waiting(now)).then(|| fp.clone()))
            .collect();
        for fp in ready {
            let Some(paced) = self.paced.get_mut(&fp) else { continue };
            let (held, due) = (paced.held.take(), std::mem::take(&mut paced.due));
            if !self.nodes.get(&fp).is_some_and(|n| !n.revoked && !n.removed) {
                continue;
            }
            let changed = match held {
                Some((candidates, nat)) => self.take_candidates(&fp, &candidates, nat).unwrap_or_else(|e| {
                    warn!(fingerprint = %fp, "held candidates not taken: {e}");
                    false
                }),
                None => false,
            };
            if changed || due {
                self.push_entry(&fp, now);
            }
        }
    }

    /// `from` wants a direct path to `to`: tell both, at once, to send to each other.
    fn punch(&mut self, from: &str, to: &str) -> Result<(), MessageError> {
        if from == to {
            return Err(MessageError::PunchToSelf);
        }
        if !self.punch_budget_allows(from, Instant::now()) {
            return Err(MessageError::PunchBudget);
        }
        let (Some(a), Some(b)) = (self.nodes.get(from), self.nodes.get(to)) else {
            return Err(MessageError::NoMember(to.to_string()));
        };
        if b.revoked || b.removed || !self.connections.contains_key(to) {
            return Ok(()); // not connected: the relay will carry traffic until it is
        }
        if !self.policy_lets_talk(from, to) {
            return Err(MessageError::PunchNotAllowed(to.to_string()));
        }
        let pair = if from < to {
            (from.to_string(), to.to_string())
        } else {
            (to.to_string(), from.to_string())
        };
        let now = Instant::now();
        if self
            .last_punch
            .get(&pair)
            .is_some_and(|t| now.duration_since(*t) < PUNCH_INTERVAL)
        {
            return Ok(());
        }
        self.last_punch.retain(|_, t| now.duration_since(*t) < PUNCH_INTERVAL);
        self.last_punch.insert(pair, now);
        // Only endpoints this coordinator can vouch for are punched towards: the public address
        // the node's connection came from (any port: its NAT's mappings), and, when both nodes'
        // connections come from the same address (behind one NAT), all of its candidates (their
        // LAN). A member reporting someone else's address as its candidate cannot aim the mesh
        // at it; at most at its own NAT's LAN, and only towards peers behind that same NAT.
        let observed = |fp: &str| self.observed.get(fp).map(|o| o.ip());
        let about = |n: &NodeRecord, asker: &str| {
            let (seen, asker_seen) = (observed(&n.fingerprint), observed(asker));
            let vouched = |e: &SocketAddr| Some(e.ip()) == seen || (seen.is_some() && seen == asker_seen);
            ServerMsg::Punch {
                peer: n.fingerprint.clone(),
                endpoints: n
                    .endpoints
                    .iter()
                    .filter_map(|e| e.parse::<SocketAddr>().ok())
                    .filter(vouched)
                    .map(|e| e.to_string())
                    .collect(),
                nat: self.nat.get(&n.fingerprint).copied().unwrap_or_default(),
            }
        };
        let (to_b, to_a) = (about(a, to), about(b, from));
        for (fp, msg) in [(to, to_b), (from, to_a)] {
            if let Some(s) = self.connections.get(fp) {
                let _ = s.tx.try_send(Arc::new(msg));
            }
        }
        debug!(%from, %to, "asked a pair to punch");
        Ok(())
    }
}

impl Hub {
    /// Whether the policy in force lets `a` reach `b` or `b` reach `a` (by the rules compiled for
    /// each, as last pushed).
    fn policy_lets_talk(&self, a: &str, b: &str) -> bool {
        let reaches = |from: &str, to: &str| {
            let (Some(node), Some(rules)) = (self.nodes.get(from), self.pushed_policy.get(to)) else {
                return false;
            };
            let (v4, v6) = self.ipam.addresses(node.host);
            rules.rules.iter().any(|r| {
                r.sources
                    .iter()
                    .any(|s| s.contains(&std::net::IpAddr::V4(v4)) || s.contains(&std::net::IpAddr::V6(v6)))
            })
        };
        reaches(a, b) || reaches(b, a)
    }

    /// Charge one punch request to `from`; false when its budget for this window is spent.
    fn punch_budget_allows(&mut self, from: &str, now: Instant) -> bool {
        let (start, used) = self.punch_budget.entry(from.to_string()).or_insert((now, 0));
        if now.duration_since(*start) >= PUNCH_BUDGET_WINDOW {
            (*start, *used) = (now, 0);
        }
        *used += 1;
        *used <= PUNCH_BUDGET
    }
}

/// UDP endpoints a node reported: at most [`MAX_CANDIDATES`], each `ip:port`. Addresses no peer
/// could reach it at (loopback, link-local, multicast, unspecified) are dropped: they are never
/// published, so no peer ever punches towards them.
pub(super) fn parse_endpoints(endpoints: &[String]) -> Result<Vec<SocketAddr>, MessageError> {
    if endpoints.len() > MAX_CANDIDATES {
        return Err(MessageError::TooManyEndpoints(endpoints.len()));
    }
    let parsed = endpoints
        .iter()
        .map(|e| {
            e.parse::<SocketAddr>()
                .map(crate::protocol::stun::canonical)
                .map_err(|_| MessageError::BadEndpoint(e.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(parsed.into_iter().filter(|e| reachable_endpoint(*e)).collect())
}

/// A node's NAT kind: what its STUN answers showed; without any, `none` if its connection came
/// from one of its own (host) addresses.
pub(super) fn nat_of(reported: NatKind, candidates: &[SocketAddr], observed: SocketAddr) -> NatKind {
    match reported {
        NatKind::Unknown if candidates.iter().any(|c| c.ip() == observed.ip()) => NatKind::None,
        known => known,
    }
}

/// The UDP endpoints to publish: the node's own candidates, then the address its connection came
/// from with its listen port (a guess, right for nodes not behind NAT and for NATs that keep
/// the port) unless STUN told it better.
pub(super) fn published_endpoints(candidates: &[SocketAddr], observed: SocketAddr, nat: NatKind) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let guess = (nat == NatKind::Unknown).then_some(observed);
    let public_first = (nat == NatKind::None).then_some(observed);
    for e in public_first.iter().chain(candidates).chain(guess.iter()) {
        let e = e.to_string();
        if !out.contains(&e) {
            out.push(e);
        }
    }
    out
}
