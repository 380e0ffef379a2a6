//! The WireGuard timer state machine of one peer, driven by a virtual clock.
//!
//! Inputs: `now`, the peer's observed [`Activity`] (timestamps the data plane records), and
//! handshake events. Output: at most one [`TimerAction`] per poll. Nothing here sleeps or does
//! I/O, so every rule is tested by stepping a fake clock.
//!
//! Rules (WireGuard paper §6): retransmit an unanswered initiation every REKEY_TIMEOUT (with
//! jitter) and give up after REKEY_ATTEMPT_TIME; the initiator rekeys after REKEY_AFTER_TIME, or
//! when its key nears REJECT_AFTER_TIME while still receiving; data sent but nothing received for
//! KEEPALIVE_TIMEOUT + REKEY_TIMEOUT starts a new handshake; data received and nothing sent back
//! for KEEPALIVE_TIMEOUT sends a keepalive; an optional persistent keepalive; all keys are erased
//! after 3 × REJECT_AFTER_TIME without a new session.

use std::time::{Duration, Instant};

use super::{
    KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT,
};

/// What the data plane observed for a peer (latest times of each kind of packet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    pub data_sent: Option<Instant>,
    pub data_received: Option<Instant>,
    /// Any authenticated packet sent (data, keepalive or handshake).
    pub any_sent: Option<Instant>,
    /// Any authenticated packet received (data, keepalive or handshake).
    pub any_received: Option<Instant>,
}

/// What the caller must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerAction {
    /// Send a (new or retransmitted) handshake initiation.
    SendInitiation,
    /// Send an empty data message on the current key.
    SendKeepalive,
    /// Handshake attempts exhausted: drop queued packets.
    GiveUp,
    /// Erase all keys of the peer.
    EraseKeys,
}

/// The current session as the timers need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentKey {
    pub created: Instant,
    pub is_initiator: bool,
    pub sent: u64,
}

/// Timer state of one peer.
#[derive(Debug, Default)]
pub struct Timers {
    /// When the current handshake round started, and when its last initiation went out.
    attempt: Option<(Instant, Instant)>,
    /// Jitter added to the next retransmission (0..=333 ms), chosen by the caller.
    jitter: Duration,
    /// Earliest data send not yet followed by any received packet.
    unanswered_since: Option<Instant>,
    /// Data sends up to this time have been dealt with (a handshake was started or given up).
    sends_settled: Option<Instant>,
    /// When the last session was established; keys are erased 3 × REJECT_AFTER_TIME later.
    last_session: Option<Instant>,
    keys_erased: bool,
    /// Someone needs a session (packets are queued).
    wanted: bool,
    persistent_keepalive: Option<Duration>,
}

impl Timers {
    pub fn new(persistent_keepalive: Option<Duration>) -> Self {
        Timers {
            persistent_keepalive,
            ..Default::default()
        }
    }

    /// A packet is waiting for a session.
    pub fn want_session(&mut self) {
        self.wanted = true;
    }

    /// An initiation was sent at `now`; `jitter` delays the next retransmission.
    pub fn initiation_sent(&mut self, now: Instant, jitter: Duration) {
        let started = self.attempt.map_or(now, |(s, _)| s);
        self.attempt = Some((started, now));
        self.jitter = jitter;
    }

    /// Whether a handshake round is in progress.
    pub fn handshaking(&self) -> bool {
        self.attempt.is_some()
    }

    /// A session was established (our initiation answered, or a response confirmed).
    pub fn session_established(&mut self, now: Instant) {
        self.attempt = None;
        self.wanted = false;
        self.unanswered_since = None;
        self.last_session = Some(now);
        self.keys_erased = false;
    }

    /// We derived keys as the responder (not confirmed until the initiator's first data): they
    /// are erased 3 × REJECT_AFTER_TIME from now unless a session follows, as WireGuard starts
    /// its zero-key-material timer whenever keys are derived. Nothing else restarts: no session
    /// is up yet.
    pub fn keys_derived(&mut self, now: Instant) {
        self.last_session = Some(now);
        self.keys_erased = false;
    }

    /// Decide what to do at `now`. Call at least every few hundred milliseconds.
    pub fn poll(&mut self, now: Instant, seen: Activity, current: Option<CurrentKey>) -> Option<TimerAction> {
        let elapsed = |t: Instant| now.saturating_duration_since(t);

        // Track the first data send that nothing has answered yet.
        if self
            .unanswered_since
            .is_some_and(|since| seen.any_received.is_some_and(|r| r >= since))
        {
            self.unanswered_since = None;
        }
        if self.unanswered_since.is_none() {
            self.unanswered_since = seen
                .data_sent
                .filter(|&s| seen.any_received.is_none_or(|r| r < s) && self.sends_settled.is_none_or(|t| s > t));
        }

        if let Some((started, last)) = self.attempt {
            if elapsed(started) >= REKEY_ATTEMPT_TIME {
                self.attempt = None;
                self.wanted = false;
                self.unanswered_since = None;
                self.sends_settled = Some(now);
                return Some(TimerAction::GiveUp);
            }
            if elapsed(last) >= REKEY_TIMEOUT + self.jitter {
                return Some(TimerAction::SendInitiation);
            }
        } else {
            let usable = current.filter(|k| elapsed(k.created) < REJECT_AFTER_TIME);
            let needs_rekey = match usable {
                None => self.wanted,
                Some(k) => {
                    let age = elapsed(k.created);
                    let sending = seen.data_sent.is_some_and(|t| t >= k.created);
                    let receiving = seen.data_received.is_some_and(|t| elapsed(t) < KEEPALIVE_TIMEOUT);
                    k.is_initiator
                        && ((sending && (age >= REKEY_AFTER_TIME || k.sent >= REKEY_AFTER_MESSAGES))
                            || (receiving && age >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT))
                }
            };
            let unanswered = self
                .unanswered_since
                .is_some_and(|t| elapsed(t) >= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
            if needs_rekey || unanswered {
                self.unanswered_since = None;
                self.sends_settled = Some(now);
                return Some(TimerAction::SendInitiation);
            }
            if usable.is_some() {
                let owe_reply = match (seen.data_received, seen.any_sent) {
                    (Some(r), Some(s)) => r > s,
                    (Some(_), None) => true,
                    _ => false,
                };
                if owe_reply && seen.data_received.is_some_and(|r| elapsed(r) >= KEEPALIVE_TIMEOUT) {
                    return Some(TimerAction::SendKeepalive);
                }
                if self
                    .persistent_keepalive
                    .is_some_and(|i| seen.any_sent.is_none_or(|s| elapsed(s) >= i))
                {
                    return Some(TimerAction::SendKeepalive);
                }
            }
        }

        if !self.keys_erased && self.last_session.is_some_and(|t| elapsed(t) >= 3 * REJECT_AFTER_TIME) {
            self.keys_erased = true;
            return Some(TimerAction::EraseKeys);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn key(created: Instant, is_initiator: bool) -> Option<CurrentKey> {
        Some(CurrentKey {
            created,
            is_initiator,
            sent: 0,
        })
    }

    #[test]
    fn an_unanswered_initiation_is_retried_every_rekey_timeout_then_abandoned() {
        let t0 = Instant::now();
        let mut t = Timers::new(None);
        t.want_session();
        assert_eq!(t.poll(t0, Activity::default(), None), Some(TimerAction::SendInitiation));
        t.initiation_sent(t0, Duration::ZERO);
        assert_eq!(t.poll(t0 + 4 * S, Activity::default(), None), None);
        let mut now = t0 + REKEY_TIMEOUT;
        let mut retries = 0;
        loop {
            match t.poll(now, Activity::default(), None) {
                Some(TimerAction::SendInitiation) => {
                    retries += 1;
                    t.initiation_sent(now, Duration::from_millis(100));
                }
                Some(TimerAction::GiveUp) => break,
                other => assert_eq!(other, None),
            }
            now += Duration::from_millis(250);
        }
        assert!(now >= t0 + REKEY_ATTEMPT_TIME);
        assert!((16..=18).contains(&retries), "{retries} retries");
        assert!(!t.handshaking());
    }

    #[test]
    fn the_initiator_rekeys_after_rekey_after_time_only_when_sending() {
        let t0 = Instant::now();
        let mut t = Timers::new(None);
        t.session_established(t0);
        let quiet = Activity::default();
        assert_eq!(t.poll(t0 + REKEY_AFTER_TIME, quiet, key(t0, true)), None);
        let sending = Activity {
            data_sent: Some(t0 + REKEY_AFTER_TIME),
            any_sent: Some(t0 + REKEY_AFTER_TIME),
            any_received: Some(t0 + REKEY_AFTER_TIME),
            ..Default::default()
        };
        assert_eq!(
            t.poll(t0 + REKEY_AFTER_TIME, sending, key(t0, false)),
            None,
            "responders never rekey on age"
        );
        assert_eq!(
            t.poll(t0 + REKEY_AFTER_TIME, sending, key(t0, true)),
            Some(TimerAction::SendInitiation)
        );
    }

    #[test]
    fn data_sent_without_any_answer_starts_a_new_handshake_after_fifteen_seconds() {
        let t0 = Instant::now();
        let mut t = Timers::new(None);
        t.session_established(t0);
        let seen = Activity {
            data_sent: Some(t0 + S),
            any_sent: Some(t0 + S),
            ..Default::default()
        };
        assert_eq!(t.poll(t0 + S, seen, key(t0, false)), None);
        assert_eq!(t.poll(t0 + 15 * S, seen, key(t0, false)), None);
        assert_eq!(
            t.poll(t0 + 16 * S, seen, key(t0, false)),
            Some(TimerAction::SendInitiation)
        );
        // An answer in time cancels it.
        let mut t = Timers::new(None);
        t.session_established(t0);
        assert_eq!(t.poll(t0 + S, seen, key(t0, false)), None);
        let answered = Activity {
            any_received: Some(t0 + 2 * S),
            ..seen
        };
        assert_eq!(t.poll(t0 + 20 * S, answered, key(t0, false)), None);
    }

    #[test]
    fn received_data_is_acknowledged_by_a_keepalive_after_ten_quiet_seconds() {
        let t0 = Instant::now();
        let mut t = Timers::new(None);
        t.session_established(t0);
        let seen = Activity {
            data_received: Some(t0 + S),
            any_received: Some(t0 + S),
            any_sent: Some(t0),
            ..Default::default()
        };
        assert_eq!(t.poll(t0 + 10 * S, seen, key(t0, false)), None);
        assert_eq!(
            t.poll(t0 + 11 * S, seen, key(t0, false)),
            Some(TimerAction::SendKeepalive)
        );
        let replied = Activity {
            any_sent: Some(t0 + 11 * S),
            ..seen
        };
        assert_eq!(t.poll(t0 + 12 * S, replied, key(t0, false)), None);
    }

    #[test]
    fn persistent_keepalive_and_key_erasure() {
        let t0 = Instant::now();
        let mut t = Timers::new(Some(25 * S));
        t.session_established(t0);
        let seen = Activity {
            any_sent: Some(t0),
            ..Default::default()
        };
        assert_eq!(t.poll(t0 + 24 * S, seen, key(t0, false)), None);
        assert_eq!(
            t.poll(t0 + 25 * S, seen, key(t0, false)),
            Some(TimerAction::SendKeepalive)
        );
        let mut t = Timers::new(None);
        t.session_established(t0);
        assert_eq!(
            t.poll(t0 + 3 * REJECT_AFTER_TIME, Activity::default(), None),
            Some(TimerAction::EraseKeys)
        );
        assert_eq!(t.poll(t0 + 3 * REJECT_AFTER_TIME + S, Activity::default(), None), None);
    }
}
