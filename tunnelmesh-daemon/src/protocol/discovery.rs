//! What this node looks like from outside: its candidate UDP endpoints and the kind of NAT in
//! front of it, learned from the tunnel socket itself.
//!
//! Sans-I/O: [`Discovery`] says which STUN Binding requests to send (to the coordinator's two
//! targets) and takes the answers the workers hand over; the slow path does the I/O on
//! the tunnel socket, so the mapping learned is the one peers must punch towards.
//!
//! - **host** candidates: this machine's global addresses with the listen port (what a peer on
//!   the same LAN, or behind the same NAT, reaches us at);
//! - **reflexive**: the address the first STUN target saw;
//! - **port-mapped**: an address the gateway forwards to us (UPnP-IGD / NAT-PMP / PCP).
//!
//! The NAT kind: `none` (the reflexive address is one of ours), `easy` (both STUN targets saw
//! the same address: endpoint-independent mapping, punchable), `hard` (each target saw another
//! port: endpoint-dependent, "symmetric"), `unknown` (no STUN answer: UDP may be blocked).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::stun;

/// The NAT in front of a node, as its STUN answers show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatKind {
    /// Publicly reachable at a host address: peers may send to it unprompted.
    None,
    /// Endpoint-independent mapping: coordinated hole punching works.
    Easy,
    /// Endpoint-dependent mapping: a new public port per destination.
    Hard,
    /// Not known (yet): no STUN answer.
    #[default]
    Unknown,
}

impl NatKind {
    pub fn name(self) -> &'static str {
        match self {
            NatKind::None => "none",
            NatKind::Easy => "easy",
            NatKind::Hard => "hard",
            NatKind::Unknown => "unknown",
        }
    }
}

/// At most this many candidates are published (the coordinator accepts 8 UDP endpoints).
pub const MAX_CANDIDATES: usize = 8;

/// This node's candidates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    pub host: Vec<SocketAddr>,
    pub reflexive: Option<SocketAddr>,
    pub port_mapped: Option<SocketAddr>,
    pub nat: NatKind,
    /// Round trip to the first STUN target.
    #[serde(default)]
    pub stun_rtt_ms: Option<f64>,
}

impl Candidates {
    /// The endpoints peers should try, best first: host (same LAN), port-mapped, reflexive.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for e in self.host.iter().chain(&self.port_mapped).chain(&self.reflexive) {
            if !out.contains(e) {
                out.push(*e);
            }
        }
        out.truncate(MAX_CANDIDATES);
        out
    }

    /// What peers need to know (everything but the measurement).
    pub fn same_published(&self, other: &Candidates) -> bool {
        self.endpoints() == other.endpoints() && self.nat == other.nat
    }
}

/// The NAT kind shown by the answers of the two targets, given our host candidates.
pub fn classify(host: &[SocketAddr], first: Option<SocketAddr>, second: Option<SocketAddr>) -> NatKind {
    match (first, second) {
        (None, None) => NatKind::Unknown,
        (Some(a), Some(b)) if a != b => NatKind::Hard,
        (Some(a), _) | (None, Some(a)) if host.iter().any(|h| same_endpoint(*h, a)) => NatKind::None,
        _ => NatKind::Easy,
    }
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    stun::canonical(a) == stun::canonical(b)
}

/// Time between discovery rounds while nothing changes (well within the 30 s a Linux NAT
/// keeps an unanswered UDP mapping, so the reflexive address stays the one peers punch to).
pub const ROUND_INTERVAL: Duration = Duration::from_secs(25);
/// Requests of one round go out at these offsets (lost datagrams are retried).
const RETRIES: [Duration; 3] = [Duration::ZERO, Duration::from_millis(300), Duration::from_millis(900)];
/// A round ends this long after it started, answered or not.
const ROUND_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Round {
    started: Instant,
    transactions: [[u8; 12]; 2],
    answers: [Option<(SocketAddr, Duration)>; 2],
    sent: usize,
}

/// STUN discovery rounds against the coordinator's two targets.
#[derive(Debug)]
pub struct Discovery {
    targets: Option<[SocketAddr; 2]>,
    round: Option<Round>,
    next_round: Instant,
    host: Vec<SocketAddr>,
    port_mapped: Option<SocketAddr>,
    last: Candidates,
    /// What each target saw in the last finished round, and its round trip.
    last_answers: [Option<(SocketAddr, Duration)>; 2],
    finished_rounds: u64,
}

impl Discovery {
    pub fn new(now: Instant) -> Self {
        Discovery {
            targets: None,
            round: None,
            next_round: now,
            host: Vec::new(),
            port_mapped: None,
            last: Candidates::default(),
            last_answers: [None, None],
            finished_rounds: 0,
        }
    }

    /// The coordinator's STUN targets (None: it runs none).
    pub fn set_targets(&mut self, targets: Option<[SocketAddr; 2]>, now: Instant) {
        if self.targets != targets {
            self.targets = targets;
            self.round = None;
            self.next_round = now;
        }
    }

    /// This machine's addresses changed: new host candidates, and ask again at once.
    pub fn network_changed(&mut self, host: Vec<SocketAddr>, now: Instant) {
        self.host = host;
        self.round = None;
        self.next_round = now;
    }

    pub fn set_port_mapped(&mut self, mapped: Option<SocketAddr>) {
        self.port_mapped = mapped;
    }

    /// Whether a round finished: what we know is worth publishing (before that, the hello's
    /// host candidates stand).
    pub fn settled(&self) -> bool {
        self.finished_rounds > 0
    }

    /// The candidates as of the last finished round (host and port-mapped always current).
    pub fn candidates(&self) -> Candidates {
        Candidates {
            host: self.host.clone(),
            port_mapped: self.port_mapped,
            ..self.last.clone()
        }
    }

    /// A transaction id off-path attackers cannot guess (a forged answer would plant a wrong
    /// public address).
    fn transaction() -> [u8; 12] {
        rand::random()
    }

    /// Requests to send now, as (target, message). Finishes a round that timed out.
    pub fn poll(&mut self, now: Instant) -> Vec<(SocketAddr, [u8; 20])> {
        let Some(targets) = self.targets else {
            return Vec::new();
        };
        if self.round.is_none() && now >= self.next_round {
            let transactions = [Self::transaction(), Self::transaction()];
            self.round = Some(Round {
                started: now,
                transactions,
                answers: [None, None],
                sent: 0,
            });
        }
        let Some(round) = &mut self.round else {
            return Vec::new();
        };
        let elapsed = now.saturating_duration_since(round.started);
        if elapsed >= ROUND_TIMEOUT {
            self.finish(now);
            return Vec::new();
        }
        let mut out = Vec::new();
        while round.sent < RETRIES.len() && elapsed >= RETRIES[round.sent] {
            round.sent += 1;
            for ((target, transaction), answer) in targets.iter().zip(&round.transactions).zip(&round.answers) {
                if answer.is_none() {
                    out.push((*target, stun::binding_request(*transaction)));
                }
            }
        }
        out
    }

    /// A STUN response arrived from `from`; true if it completed a round.
    pub fn on_response(&mut self, msg: &[u8], from: SocketAddr, now: Instant) -> bool {
        let (Some(targets), Some(round)) = (self.targets, &mut self.round) else {
            return false;
        };
        let from = stun::canonical(from);
        for ((target, transaction), answer) in targets.iter().zip(&round.transactions).zip(&mut round.answers) {
            if *target == from
                && answer.is_none()
                && let Some(mapped) = stun::parse_binding_response(msg, transaction)
            {
                *answer = Some((stun::canonical(mapped), now.saturating_duration_since(round.started)));
            }
        }
        if round.answers.iter().all(Option::is_some) {
            self.finish(now);
            return true;
        }
        false
    }

    fn finish(&mut self, now: Instant) {
        let Some(round) = self.round.take() else {
            return;
        };
        let [first, second] = round.answers.map(|a| a.map(|(m, _)| m));
        self.last = Candidates {
            host: self.host.clone(),
            reflexive: first.or(second),
            port_mapped: self.port_mapped,
            nat: classify(&self.host, first, second),
            stun_rtt_ms: round.answers[0].map(|(_, rtt)| rtt.as_secs_f64() * 1e3),
        };
        self.last_answers = round.answers;
        self.finished_rounds += 1;
        self.next_round = now + ROUND_INTERVAL;
    }

    /// What each target saw us at in the last finished round, with the round trip.
    pub fn answers(&self) -> [Option<(SocketAddr, Duration)>; 2] {
        self.last_answers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nat_kind_follows_the_two_answers() {
        let host = [sa("10.0.0.2:51820")];
        assert_eq!(classify(&host, None, None), NatKind::Unknown);
        assert_eq!(
            classify(&host, Some(sa("198.18.1.1:51820")), Some(sa("198.18.1.1:51820"))),
            NatKind::Easy
        );
        assert_eq!(
            classify(&host, Some(sa("198.18.1.1:40000")), Some(sa("198.18.1.1:40001"))),
            NatKind::Hard
        );
        assert_eq!(
            classify(&host, Some(sa("10.0.0.2:51820")), Some(sa("10.0.0.2:51820"))),
            NatKind::None
        );
        // Same address, other port: a NAT on our own address (port not preserved).
        assert_eq!(
            classify(&host, Some(sa("10.0.0.2:40000")), Some(sa("10.0.0.2:40000"))),
            NatKind::Easy
        );
        assert_eq!(classify(&host, None, Some(sa("198.18.1.1:51820"))), NatKind::Easy);
    }

    #[test]
    fn a_round_asks_both_targets_retries_the_silent_one_and_classifies() {
        let t0 = Instant::now();
        let targets = [sa("198.18.0.1:3478"), sa("198.18.0.1:3479")];
        let mut d = Discovery::new(t0);
        assert!(d.poll(t0).is_empty(), "no targets, no requests");
        d.network_changed(vec![sa("10.0.0.2:51820")], t0);
        d.set_targets(Some(targets), t0);
        let first = d.poll(t0);
        assert_eq!(first.iter().map(|r| r.0).collect::<Vec<_>>(), targets);
        assert!(d.poll(t0 + Duration::from_millis(100)).is_empty());
        let transaction = |m: &[u8; 20]| -> [u8; 12] { m[8..20].try_into().unwrap() };
        let answer = stun::binding_response(transaction(&first[0].1), sa("198.18.5.5:51820"));
        // From the wrong target: ignored.
        assert!(!d.on_response(&answer, targets[1], t0 + Duration::from_millis(5)));
        assert!(!d.on_response(&answer, targets[0], t0 + Duration::from_millis(5)));
        let retry = d.poll(t0 + Duration::from_millis(300));
        assert_eq!(
            retry.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![targets[1]],
            "only the silent one"
        );
        let second = stun::binding_response(transaction(&retry[0].1), sa("198.18.5.5:51820"));
        assert!(d.on_response(&second, targets[1], t0 + Duration::from_millis(310)));
        let c = d.candidates();
        assert_eq!(c.nat, NatKind::Easy);
        assert_eq!(c.reflexive, Some(sa("198.18.5.5:51820")));
        assert_eq!(c.stun_rtt_ms, Some(5.0));
        assert_eq!(c.endpoints(), vec![sa("10.0.0.2:51820"), sa("198.18.5.5:51820")]);
        // Next round only after the interval, or at once after a network change.
        assert!(d.poll(t0 + Duration::from_secs(10)).is_empty());
        d.network_changed(vec![sa("10.0.1.2:51820")], t0 + Duration::from_secs(11));
        assert_eq!(d.poll(t0 + Duration::from_secs(11)).len(), 2);
        // Nobody answers: the round ends unknown.
        d.poll(t0 + Duration::from_secs(14));
        assert_eq!(d.candidates().nat, NatKind::Unknown);
        assert_eq!(d.candidates().endpoints(), vec![sa("10.0.1.2:51820")]);
    }
}
