//! Choosing the path to each peer: direct UDP, the SSH transport, or the coordinator's relay.
//!
//! Sans-I/O: [`PathManager`] is told what happened (a path became available or went away, a
//! probe was answered, authenticated traffic arrived) and, polled with the current time, says
//! what to do (send a probe on a path, switch the sending path). The same Noise session and the
//! same encrypted wire messages travel on every path, so switching never touches keys.
//!
//! Rules:
//! - A path is *proven* by a round trip on it: a probe answered, a handshake response received,
//!   or authenticated traffic received on the path we send on. Proof lasts [`PROOF_TTL`].
//! - Traffic goes on the best proven path (UDP > SSH > relay). With nothing proven, the caller
//!   sends handshakes on every available path at once and the first answer decides — traffic
//!   never waits for a slow probe.
//! - Paths better than the current one are probed with exponential backoff ([`UP_PROBE_MIN`] to
//!   [`UP_PROBE_MAX`]); moving up needs [`UP_AFTER`] answered probes in a row (hysteresis).
//! - The current path is probed when it has been quiet while we send; [`DEAD_AFTER`] unanswered
//!   probes in a row declare it dead and traffic moves to the next proven path.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Kinds of path, best first.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Udp = 0,
    Ssh = 1,
    Relay = 2,
}

impl PathKind {
    pub const ALL: [PathKind; 3] = [PathKind::Udp, PathKind::Ssh, PathKind::Relay];

    pub fn from_u8(v: u8) -> PathKind {
        match v {
            1 => PathKind::Ssh,
            2 => PathKind::Relay,
            _ => PathKind::Udp,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Udp => "udp",
            PathKind::Ssh => "ssh",
            PathKind::Relay => "relay",
        }
    }
}

/// How long a round trip keeps a path proven.
pub const PROOF_TTL: Duration = Duration::from_secs(25);
/// A probe not answered within this is lost.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Lost probes in a row that declare the current path dead.
pub const DEAD_AFTER: u32 = 3;
/// Answered probes in a row needed to move up to a better path.
pub const UP_AFTER: u32 = 2;
/// First and longest wait between probes of a better path.
pub const UP_PROBE_MIN: Duration = Duration::from_secs(2);
pub const UP_PROBE_MAX: Duration = Duration::from_secs(30);
/// The current path is probed after this long without authenticated traffic on it while we
/// send (a healthy busy path is never probed).
pub const QUIET_BEFORE_PROBE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Default)]
struct PathState {
    available: bool,
    proven_at: Option<Instant>,
    rtt: Option<Duration>,
    outstanding: Option<(u64, Instant)>,
    lost_in_row: u32,
    answered_in_row: u32,
    next_probe: Option<Instant>,
    backoff: Duration,
    dead_since: Option<Instant>,
}

impl PathState {
    fn proven(&self, now: Instant) -> bool {
        self.available
            && self
                .proven_at
                .is_some_and(|t| now.saturating_duration_since(t) < PROOF_TTL)
    }
}

/// What the caller must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Send a probe with this nonce on the path.
    Probe(PathKind, u64),
    /// Send traffic on this path from now on.
    Switch(PathKind),
}

/// One path's state, for `tunnelmesh status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathReport {
    pub kind: PathKind,
    pub available: bool,
    pub proven: bool,
    pub rtt_ms: Option<f64>,
    pub lost_in_row: u32,
}

/// The paths to one peer.
#[derive(Debug)]
pub struct PathManager {
    paths: [PathState; 3],
    current: Option<PathKind>,
    nonce: u64,
}

impl PathManager {
    pub fn new(seed: u64) -> Self {
        PathManager {
            paths: Default::default(),
            current: None,
            nonce: seed,
        }
    }

    fn path(&mut self, kind: PathKind) -> &mut PathState {
        &mut self.paths[kind as usize]
    }

    /// The path traffic goes on (None: nothing proven yet).
    pub fn current(&self) -> Option<PathKind> {
        self.current
    }

    /// Whether a round trip on `kind` happened within [`PROOF_TTL`].
    pub fn proven_now(&self, kind: PathKind, now: Instant) -> bool {
        self.paths[kind as usize].proven(now)
    }

    pub fn is_available(&self, kind: PathKind) -> bool {
        self.paths[kind as usize].available
    }

    /// Paths that exist right now (an endpoint known, a connection up).
    pub fn available(&self) -> impl Iterator<Item = PathKind> + '_ {
        PathKind::ALL.into_iter().filter(|k| self.paths[*k as usize].available)
    }

    pub fn set_available(&mut self, kind: PathKind, available: bool, now: Instant) {
        let p = self.path(kind);
        if p.available == available {
            return;
        }
        *p = PathState {
            available,
            ..Default::default()
        };
        if available {
            p.next_probe = Some(now);
            p.backoff = UP_PROBE_MIN;
        }
    }

    /// A round trip completed on `kind` (a handshake response, or a confirmed key, on it). With
    /// no live path in use, traffic moves there at once.
    pub fn proven(&mut self, kind: PathKind, now: Instant) {
        let p = self.path(kind);
        if !p.available {
            return;
        }
        p.proven_at = Some(now);
        p.lost_in_row = 0;
        p.dead_since = None;
        if !self.current.is_some_and(|c| self.paths[c as usize].proven(now)) {
            self.current = Some(kind);
        }
    }

    /// Authenticated traffic arrived on `kind` at `at`: if it is the path we send on, that is
    /// proof. Traffic from before the path was declared dead proves nothing.
    pub fn received(&mut self, kind: PathKind, at: Instant) {
        if self.current != Some(kind) {
            return;
        }
        let p = self.path(kind);
        let newer = p.proven_at.is_none_or(|t| at > t) && p.dead_since.is_none_or(|d| at > d);
        if newer {
            p.proven_at = Some(at);
            p.lost_in_row = 0;
            p.dead_since = None;
        }
    }

    /// A probe reply arrived on `kind`.
    pub fn probe_answered(&mut self, kind: PathKind, nonce: u64, now: Instant) -> Option<Duration> {
        let p = self.path(kind);
        let (expected, sent) = p.outstanding?;
        if expected != nonce {
            return None;
        }
        let rtt = now.saturating_duration_since(sent);
        p.outstanding = None;
        p.rtt = Some(rtt);
        p.proven_at = Some(now);
        p.lost_in_row = 0;
        p.dead_since = None;
        p.answered_in_row += 1;
        p.backoff = UP_PROBE_MIN;
        // Confirm quickly: the next probe of a better path follows at once.
        p.next_probe = Some(now);
        Some(rtt)
    }

    /// Decide what to do at `now`. `sending`: we sent on the current path recently and expect
    /// answers; `quiet_since_rx`: time since authenticated traffic last arrived on it.
    pub fn poll(&mut self, now: Instant, sending: bool, quiet_since_rx: Option<Duration>) -> Vec<PathAction> {
        let mut actions = Vec::new();
        // Lost probes.
        for kind in PathKind::ALL {
            let p = self.path(kind);
            if let Some((_, sent)) = p.outstanding
                && now.saturating_duration_since(sent) >= PROBE_TIMEOUT
            {
                p.outstanding = None;
                p.lost_in_row += 1;
                p.answered_in_row = 0;
                if p.lost_in_row >= DEAD_AFTER {
                    p.proven_at = None;
                    p.dead_since.get_or_insert(now);
                }
            }
        }
        // Move down if the current path died; up if a better one is confirmed.
        let proven = |k: PathKind| self.paths[k as usize].proven(now);
        let target = match self.current.filter(|c| proven(*c)) {
            Some(c) => PathKind::ALL
                .into_iter()
                .find(|k| *k < c && proven(*k) && self.paths[*k as usize].answered_in_row >= UP_AFTER)
                .or(Some(c)),
            None => PathKind::ALL.into_iter().find(|k| proven(*k)),
        };
        if target != self.current {
            self.current = target;
            if let Some(t) = target {
                actions.push(PathAction::Switch(t));
            }
        }
        // Probes.
        for kind in PathKind::ALL {
            let current = self.current;
            let p = &self.paths[kind as usize];
            if !p.available || p.outstanding.is_some() {
                continue;
            }
            let due = p.next_probe.is_none_or(|t| now >= t);
            let wanted = match current {
                // Better than what we use: probe on its schedule.
                Some(c) if kind < c => due,
                // What we use: probe when it went quiet while we send.
                Some(c) if kind == c => sending && quiet_since_rx.is_none_or(|q| q >= QUIET_BEFORE_PROBE) && due,
                // Worse: only while nothing works.
                Some(_) => false,
                None => due,
            };
            if wanted {
                self.nonce = self.nonce.wrapping_add(1);
                let nonce = self.nonce;
                let p = self.path(kind);
                p.outstanding = Some((nonce, now));
                let wait = if Some(kind) == current {
                    PROBE_TIMEOUT
                } else if p.answered_in_row > 0 {
                    Duration::ZERO
                } else {
                    let wait = p.backoff;
                    p.backoff = (p.backoff * 2).min(UP_PROBE_MAX);
                    wait
                };
                p.next_probe = Some(now + wait);
                actions.push(PathAction::Probe(kind, nonce));
            }
        }
        actions
    }

    pub fn report(&self, now: Instant) -> Vec<PathReport> {
        PathKind::ALL
            .into_iter()
            .map(|kind| {
                let p = &self.paths[kind as usize];
                PathReport {
                    kind,
                    available: p.available,
                    proven: p.proven(now),
                    rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1e3),
                    lost_in_row: p.lost_in_row,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(actions: &[PathAction]) -> Vec<(PathKind, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                PathAction::Probe(k, n) => Some((*k, *n)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_first_path_to_complete_a_handshake_carries_traffic_at_once() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(0);
        pm.set_available(PathKind::Udp, true, t0);
        pm.set_available(PathKind::Relay, true, t0);
        assert_eq!(pm.current(), None);
        pm.proven(PathKind::Relay, t0);
        assert_eq!(pm.current(), Some(PathKind::Relay), "no waiting for UDP");
        // A later proof of a worse path does not move traffic off a live one.
        pm.set_available(PathKind::Ssh, true, t0);
        pm.proven(PathKind::Ssh, t0);
        assert_eq!(pm.current(), Some(PathKind::Relay));
    }

    #[test]
    fn a_better_path_is_probed_with_backoff_and_taken_after_two_answers() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(0);
        pm.set_available(PathKind::Udp, true, t0);
        pm.set_available(PathKind::Relay, true, t0);
        pm.proven(PathKind::Relay, t0);
        // UDP blocked: probes go unanswered, each wait longer than the last.
        let mut sent_at = Vec::new();
        let mut t = t0;
        while t < t0 + Duration::from_secs(70) {
            pm.received(PathKind::Relay, t);
            if probes(&pm.poll(t, true, Some(Duration::ZERO)))
                .iter()
                .any(|(k, _)| *k == PathKind::Udp)
            {
                sent_at.push(t.duration_since(t0).as_secs());
            }
            t += Duration::from_millis(100);
        }
        assert_eq!(sent_at, [0, 2, 6, 14, 30, 60], "exponential backoff capped at 30 s");
        assert_eq!(pm.current(), Some(PathKind::Relay));
        // Unblocked: one answer is not enough (hysteresis), the second moves traffic up.
        let mut t = t0 + Duration::from_secs(90);
        let (_, nonce) = probes(&pm.poll(t, true, Some(Duration::ZERO)))[0];
        t += Duration::from_millis(5);
        assert!(pm.probe_answered(PathKind::Udp, nonce, t).is_some());
        assert!(
            pm.probe_answered(PathKind::Udp, nonce, t).is_none(),
            "a reply counts once"
        );
        t += Duration::from_millis(100);
        let actions = pm.poll(t, true, Some(Duration::ZERO));
        assert_eq!(pm.current(), Some(PathKind::Relay), "one answer is not enough");
        let (_, nonce) = probes(&actions)[0];
        pm.probe_answered(PathKind::Udp, nonce, t + Duration::from_millis(5));
        let actions = pm.poll(t + Duration::from_millis(100), true, Some(Duration::ZERO));
        assert!(actions.contains(&PathAction::Switch(PathKind::Udp)), "{actions:?}");
        assert_eq!(pm.current(), Some(PathKind::Udp));
    }

    #[test]
    fn a_dead_current_path_is_left_for_the_next_proven_one() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(0);
        for k in [PathKind::Udp, PathKind::Relay] {
            pm.set_available(k, true, t0);
        }
        pm.proven(PathKind::Udp, t0);
        pm.proven(PathKind::Relay, t0);
        assert_eq!(pm.current(), Some(PathKind::Udp));
        // Busy and answered: the current path is never probed.
        for i in 0..30 {
            let t = t0 + Duration::from_millis(100 * i);
            pm.received(PathKind::Udp, t);
            assert!(probes(&pm.poll(t, true, Some(Duration::ZERO))).is_empty());
        }
        // We keep sending, nothing comes back: probes, three lost, traffic moves to the relay.
        let mut t = t0 + Duration::from_secs(3);
        let mut switched = None;
        while t < t0 + Duration::from_secs(15) {
            pm.received(PathKind::Relay, t); // the relay's own proof stays fresh
            // The caller reports the last UDP receipt on every poll: stale, it must not count.
            pm.received(PathKind::Udp, t0 + Duration::from_millis(2900));
            let quiet = t.duration_since(t0 + Duration::from_secs(3)) + QUIET_BEFORE_PROBE;
            for a in pm.poll(t, true, Some(quiet)) {
                match a {
                    PathAction::Switch(k) => switched = Some((k, t.duration_since(t0))),
                    PathAction::Probe(PathKind::Relay, n) => {
                        pm.probe_answered(PathKind::Relay, n, t);
                    }
                    _ => {}
                }
            }
            if switched.is_some() {
                break;
            }
            t += Duration::from_millis(100);
        }
        let (to, at) = switched.expect("moved off the dead path");
        assert_eq!(to, PathKind::Relay);
        assert!(at < Duration::from_secs(8), "detected in {at:?}");
        // The last traffic seen on UDP (before it died) does not bring it back.
        pm.received(PathKind::Udp, t0 + Duration::from_secs(3));
        pm.poll(t + Duration::from_millis(100), true, Some(Duration::ZERO));
        assert_eq!(pm.current(), Some(PathKind::Relay));
        // An idle path (we send nothing) is not probed: no traffic, no verdict.
        let mut idle = PathManager::new(0);
        idle.set_available(PathKind::Udp, true, t0);
        idle.proven(PathKind::Udp, t0);
        assert!(probes(&idle.poll(t0 + Duration::from_secs(5), false, Some(Duration::from_secs(5)))).is_empty());
    }

    #[test]
    fn a_path_that_goes_away_loses_its_state() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(0);
        pm.set_available(PathKind::Ssh, true, t0);
        pm.proven(PathKind::Ssh, t0);
        assert_eq!(pm.current(), Some(PathKind::Ssh));
        pm.set_available(PathKind::Ssh, false, t0);
        pm.poll(t0, true, None);
        assert_eq!(pm.current(), None, "nothing left: the caller handshakes on every path");
        assert!(!pm.report(t0)[PathKind::Ssh as usize].proven);
    }
}
