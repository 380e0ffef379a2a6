//! Hole punching towards one peer, planned without I/O.
//!
//! The coordinator tells both sides to punch at once (rendezvous). Each side then sends a
//! handshake initiation to every candidate of the other in [`ROUNDS`]: the first datagrams die
//! at the other side's NAT until that side's own have gone out through it, and several rounds
//! cover the skew between the two sides hearing the coordinator. A punch has succeeded when UDP
//! is proven within [`GRACE`]; otherwise it failed, and the next one is asked for only after a
//! backoff that doubles from [`RETRY`]`[0]` up to `[1]`, or up to `[2]` when either side is
//! behind a hard NAT (its punches spray ports).
//!
//! Rules for asking the coordinator for a punch: the peer is behind NAT and published
//! candidates, we are connected, we want traffic with it, UDP does not work, and no punch is in
//! progress or waiting out its backoff.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use super::discovery::NatKind;

/// Offsets from a punch's start at which an initiation goes to every target.
pub const ROUNDS: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];
/// A punch that has not proven UDP this long after it started has failed.
pub const GRACE: Duration = Duration::from_secs(3);
/// Wait before asking for another punch: doubling from the first, up to the second, or up to
/// the third when a hard NAT is involved.
pub const RETRY: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(30),
    Duration::from_secs(300),
];
/// Port prediction towards a hard NAT: the ports this far either side of each public candidate
/// are tried too, in every round. A punch thus sends at most 6 × (8 + 2 × 16 × 8) datagrams.
pub const HARD_NAT_SPREAD: u16 = 16;

/// Whether `addr` can be a peer's UDP endpoint at all: not loopback, unspecified, multicast,
/// broadcast or link-local, and not port 0. Punches never go anywhere else (a member must not be
/// able to aim the mesh at the peers' own loopback or at link-local neighbours).
pub fn reachable_endpoint(addr: SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    addr.port() != 0
        && !ip.is_loopback()
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && match ip {
            IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        }
}

/// Where to send a punch towards a peer with `candidates` behind a `nat`: every reachable
/// candidate, and towards a hard NAT the ports near each public one (port prediction).
pub fn targets(candidates: &[SocketAddr], nat: NatKind) -> Vec<SocketAddr> {
    let candidates: Vec<SocketAddr> = candidates.iter().copied().filter(|c| reachable_endpoint(*c)).collect();
    let candidates = candidates.as_slice();
    let mut out = candidates.to_vec();
    if nat == NatKind::Hard {
        for c in candidates.iter().filter(|c| is_public(c.ip())) {
            for d in 1..=HARD_NAT_SPREAD {
                for port in [c.port().checked_add(d), c.port().checked_sub(d)].into_iter().flatten() {
                    out.push(SocketAddr::new(c.ip(), port));
                }
            }
        }
    }
    out
}

/// Not a private, loopback or link-local address: one a NAT could be mapping.
fn is_public(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => !(v4.is_private() || v4.is_loopback() || v4.is_link_local()),
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local()),
    }
}

/// What the caller knows at a poll.
#[derive(Clone, Copy, Debug, Default)]
pub struct PunchConditions {
    /// UDP to the peer is proven right now.
    pub udp_works: bool,
    /// We or the peer sit behind a hard NAT.
    pub hard_nat: bool,
    /// Asking would make sense: the peer is behind NAT with candidates, we are connected to the
    /// coordinator and want traffic with the peer.
    pub may_request: bool,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PunchAction {
    /// Send a handshake initiation to each of these.
    SendRound(Vec<SocketAddr>),
    /// Ask the coordinator to have both sides punch.
    Request,
    /// UDP was proven this long after the punch started.
    Succeeded(Duration),
    /// The punch failed; the next request waits this long.
    Failed(Duration),
}

/// One peer's hole punching.
#[derive(Debug, Default)]
pub struct Punch {
    targets: Vec<SocketAddr>,
    started: Option<Instant>,
    rounds_sent: usize,
    /// No new punch is asked for before this.
    next_request: Option<Instant>,
    failures: u32,
}

impl Punch {
    fn backoff(&self, hard_nat: bool) -> Duration {
        let cap = if hard_nat { RETRY[2] } else { RETRY[1] };
        RETRY[0].saturating_mul(1 << self.failures.min(16)).min(cap)
    }

    /// Whether a punch is in progress.
    pub fn in_progress(&self) -> bool {
        self.started.is_some()
    }

    /// The coordinator said punch now, towards `targets`. False (nothing starts) when there is
    /// nowhere to send or a punch is already in progress.
    pub fn start(&mut self, targets: Vec<SocketAddr>, hard_nat: bool, now: Instant) -> bool {
        if targets.is_empty() || self.started.is_some() {
            return false;
        }
        self.targets = targets;
        self.started = Some(now);
        self.rounds_sent = 0;
        self.next_request = Some(now + self.backoff(hard_nat));
        true
    }

    /// Carry on the punch in progress, or ask for one when the rules allow.
    pub fn poll(&mut self, now: Instant, c: PunchConditions) -> Option<PunchAction> {
        if let Some(started) = self.started {
            let elapsed = now.saturating_duration_since(started);
            if c.udp_works {
                self.started = None;
                self.failures = 0;
                return Some(PunchAction::Succeeded(elapsed));
            }
            if elapsed >= GRACE {
                self.started = None;
                self.failures += 1;
                let wait = self.backoff(c.hard_nat);
                self.next_request = Some(now + wait);
                return Some(PunchAction::Failed(wait));
            }
            if ROUNDS.get(self.rounds_sent).is_some_and(|at| elapsed >= *at) {
                self.rounds_sent += 1;
                return Some(PunchAction::SendRound(self.targets.clone()));
            }
            return None;
        }
        if c.udp_works {
            self.failures = 0;
            return None;
        }
        if !c.may_request || self.next_request.is_some_and(|t| now < t) {
            return None;
        }
        self.next_request = Some(now + self.backoff(c.hard_nat));
        Some(PunchAction::Request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: PunchConditions = PunchConditions {
        udp_works: false,
        hard_nat: false,
        may_request: true,
    };

    #[test]
    fn punches_spray_ports_only_around_a_hard_nats_public_candidates() {
        let candidates: Vec<SocketAddr> = vec!["10.0.0.2:51820".parse().unwrap(), "198.18.0.9:40000".parse().unwrap()];
        assert_eq!(targets(&candidates, NatKind::Easy), candidates);
        let hard = targets(&candidates, NatKind::Hard);
        assert_eq!(hard.len(), 2 + 2 * HARD_NAT_SPREAD as usize);
        assert!(hard[2..].iter().all(|t| t.ip() == candidates[1].ip()));
        let ports: Vec<u16> = hard[2..].iter().map(|t| t.port()).collect();
        assert!(ports.contains(&40001) && ports.contains(&39984) && !ports.contains(&40000));
        // No port beyond the ends of the range.
        let edge = targets(&["198.18.0.9:65530".parse().unwrap()], NatKind::Hard);
        assert!(edge.iter().all(|t| t.port() >= 65514) && edge.len() == 1 + 16 + 5);
    }

    #[test]
    fn punches_never_go_to_loopback_link_local_multicast_or_unspecified_addresses() {
        let candidates: Vec<SocketAddr> = [
            "127.0.0.1:22",
            "[::1]:22",
            "169.254.1.1:51820",
            "[fe80::1]:51820",
            "224.0.0.1:51820",
            "0.0.0.0:51820",
            "255.255.255.255:51820",
            "198.18.0.9:0",
            "[::ffff:127.0.0.1]:22",
            "198.18.0.9:40000",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(
            targets(&candidates, NatKind::Easy),
            ["198.18.0.9:40000".parse().unwrap()]
        );
        assert_eq!(
            targets(&candidates, NatKind::Hard).len(),
            1 + 2 * HARD_NAT_SPREAD as usize
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_cap_that_is_higher_with_a_hard_nat() {
        let mut p = Punch::default();
        let waits: Vec<u64> = (0..8)
            .map(|f| {
                p.failures = f;
                p.backoff(false).as_secs()
            })
            .collect();
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30, 30]);
        p.failures = 40;
        assert_eq!(p.backoff(true), RETRY[2]);
    }

    #[test]
    fn a_punch_sends_its_rounds_at_their_offsets_and_succeeds_when_udp_is_proven() {
        let t0 = Instant::now();
        let target: SocketAddr = "198.18.0.9:40000".parse().unwrap();
        let mut p = Punch::default();
        assert!(!p.start(Vec::new(), false, t0), "nowhere to send: no punch");
        assert!(p.start(vec![target], false, t0));
        assert!(!p.start(vec![target], false, t0), "one punch at a time");
        let mut sent_at = Vec::new();
        for ms in (0..1500).step_by(10) {
            let now = t0 + Duration::from_millis(ms);
            while let Some(action) = p.poll(now, WANTED) {
                assert_eq!(action, PunchAction::SendRound(vec![target]));
                sent_at.push(ms);
            }
        }
        assert_eq!(sent_at, [0, 100, 250, 500, 1000]);
        let done = p.poll(
            t0 + Duration::from_millis(1600),
            PunchConditions {
                udp_works: true,
                ..WANTED
            },
        );
        assert_eq!(done, Some(PunchAction::Succeeded(Duration::from_millis(1600))));
        assert!(!p.in_progress());
        assert_eq!(p.failures, 0);
    }

    #[test]
    fn failed_punches_back_off_before_asking_again_and_success_resets_the_backoff() {
        let t0 = Instant::now();
        let target: SocketAddr = "198.18.0.9:40000".parse().unwrap();
        let mut p = Punch::default();
        // First request at once; then nothing until the backoff has passed.
        assert_eq!(p.poll(t0, WANTED), Some(PunchAction::Request));
        assert_eq!(p.poll(t0 + Duration::from_secs(1), WANTED), None);
        assert_eq!(p.poll(t0 + RETRY[0], WANTED), Some(PunchAction::Request));
        // The coordinator answers; every round goes out, UDP never works.
        let start = t0 + RETRY[0];
        assert!(p.start(vec![target], false, start));
        let mut now = start;
        let mut failed = None;
        while failed.is_none() {
            now += Duration::from_millis(50);
            if let Some(PunchAction::Failed(wait)) = p.poll(now, WANTED) {
                failed = Some(wait);
            }
        }
        assert_eq!(now - start, GRACE);
        assert_eq!(failed, Some(Duration::from_secs(4)), "one failure: 2 s doubled");
        assert_eq!(p.poll(now + Duration::from_secs(3), WANTED), None);
        assert_eq!(p.poll(now + Duration::from_secs(4), WANTED), Some(PunchAction::Request));
        // Not asked for when it would make no sense, however long we wait.
        let later = now + Duration::from_secs(3600);
        let idle = PunchConditions {
            may_request: false,
            ..WANTED
        };
        assert_eq!(p.poll(later, idle), None);
        // UDP working (through the other side's punch) resets the failures.
        assert_eq!(
            p.poll(
                later,
                PunchConditions {
                    udp_works: true,
                    ..WANTED
                }
            ),
            None
        );
        assert_eq!(p.failures, 0);
    }

    #[test]
    fn a_hard_nat_caps_the_backoff_at_five_minutes() {
        let t0 = Instant::now();
        let hard = PunchConditions {
            hard_nat: true,
            ..WANTED
        };
        let mut p = Punch::default();
        let mut now = t0;
        let mut last_wait = Duration::ZERO;
        for _ in 0..12 {
            assert!(p.start(vec!["198.18.0.9:1".parse().unwrap()], true, now));
            now += GRACE;
            while let Some(action) = p.poll(now, hard) {
                if let PunchAction::Failed(wait) = action {
                    last_wait = wait;
                    break;
                }
            }
        }
        assert_eq!(last_wait, RETRY[2]);
    }
}
