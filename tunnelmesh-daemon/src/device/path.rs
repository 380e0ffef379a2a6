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

    /// Authenticated traffic arrived on `kind`: if it is the path we send on, that is proof.
    pub fn received(&mut self, kind: PathKind, now: Instant) {
        if self.current == Some(kind) {
            let p = self.path(kind);
            p.proven_at = Some(now);
            p.lost_in_row = 0;
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
