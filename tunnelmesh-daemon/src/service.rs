//! Telling the service manager how we are: systemd's notify protocol (`sd-notify`).
//!
//! `READY=1` once the service does its job, `STATUS=` lines for `systemctl status`, `WATCHDOG=1`
//! only while the threads that do the work are seen to move, `STOPPING=1` on the way out and
//! `EXTEND_TIMEOUT_USEC=` while a start waits on something outside (a first join). Outside
//! systemd (`NOTIFY_SOCKET` unset) every call does nothing.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!("cannot notify the service manager: {e}");
    }
}

/// The service is up; `status` says how.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A `STATUS=` line for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Still starting: push the start timeout `by` further, and say why.
pub fn extend_timeout(by: Duration, why: &str) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec), NotifyState::Status(why)]);
}

/// All is well: reset the watchdog timer.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to check liveness and ping the watchdog: half its timeout (`WatchdogSec=`), or `None`
/// without one.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| (timeout / 2).max(Duration::from_millis(500)))
}

/// The first directory systemd gives the service in `var` (`STATE_DIRECTORY`,
/// `RUNTIME_DIRECTORY`, `CREDENTIALS_DIRECTORY`: colon-separated when the unit names several).
pub fn directory(var: &str) -> Option<std::path::PathBuf> {
    let dirs = std::env::var_os(var)?;
    let first = dirs.to_string_lossy().split(':').next().unwrap_or_default().to_string();
    (!first.is_empty()).then(|| first.into())
}

/// One counter per long-lived loop, bumped each time round: the watchdog pings only while every
/// one of them moves, so a thread that died, hung or deadlocked stops the pings and systemd
/// restarts the service. Each counter sits on its own cache line (its loop is the only writer).
pub struct Heartbeats {
    beats: Box<[Beat]>,
}

#[repr(align(64))]
#[derive(Default)]
struct Beat(AtomicU64);

impl Heartbeats {
    pub fn new(loops: usize) -> Self {
        Heartbeats {
            beats: (0..loops).map(|_| Beat::default()).collect(),
        }
    }

    /// Loop `which` went round once more.
    #[inline]
    pub fn beat(&self, which: usize) {
        if let Some(b) = self.beats.get(which) {
            b.0.store(b.0.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.beats.iter().map(|b| b.0.load(Ordering::Relaxed)).collect()
    }
}

/// Which loops did not move between two snapshots.
pub fn stalled(before: &[u64], now: &[u64]) -> Vec<usize> {
    before
        .iter()
        .zip(now)
        .enumerate()
        .filter(|(_, (a, b))| a == b)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_named_stalled() {
        let h = Heartbeats::new(3);
        let first = h.snapshot();
        h.beat(0);
        h.beat(2);
        h.beat(7); // out of range: ignored, not a panic
        let second = h.snapshot();
        assert_eq!(stalled(&first, &second), vec![1]);
        h.beat(1);
        assert_eq!(stalled(&second, &h.snapshot()), vec![0, 2]);
        assert!(stalled(&h.snapshot(), &h.snapshot()).len() == 3);
    }
}
