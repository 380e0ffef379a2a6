//! Budgets of handshake initiations per proven source, applied only under load.
//!
//! Under load an initiation over UDP is processed only with a valid cookie (mac2), which proves
//! its source address; one over SSH or the relay comes from the member its carrier
//! authenticated. Only such a source is charged: 5 initiations a second, bursts of 20 (the
//! shared [`Budget`]; IPv6 addresses by /64, as the XDP shield keys them). A source that
//! overspends has its initiations dropped before any Diffie-Hellman and, over UDP, in the XDP
//! shield for [`BLOCK_FOR`]. Nothing that failed a mac is charged and nothing is charged while
//! the queue is short, so a spoofer cannot spend a peer's budget (WireGuard's rule).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use tunnelmesh_common::shield::{BUDGET_INITIATIONS, Budget, budget_params};

use crate::device::Via;

/// How long the XDP shield drops the initiations of a source that overspent.
pub const BLOCK_FOR: Duration = Duration::from_secs(1);
/// Sources tracked at once; beyond it, budgets idle long enough to be full again are dropped
/// (they are worth a fresh one), and if none is, a new source goes untracked.
const MAX_SOURCES: usize = 65_536;

/// Who is charged for an initiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// An underlay address (IPv6 by /64), proven by a cookie.
    Address([u8; 16]),
    /// A member, authenticated by the SSH or relay carrier.
    Member([u8; 32]),
}

impl Source {
    pub fn of(via: Via) -> Source {
        match via {
            Via::Udp(src) => Source::Address(crate::protocol::ip::budget_key(src.ip())),
            Via::Ssh(key) | Via::Relay(key) => Source::Member(key),
        }
    }
}

/// The per-source budgets.
pub struct Limiter {
    epoch: Instant,
    budgets: HashMap<Source, Budget>,
}

impl Limiter {
    pub fn new(now: Instant) -> Self {
        Limiter {
            epoch: now,
            budgets: HashMap::new(),
        }
    }

    /// Charge one initiation from `source` at `now`; false if its budget is spent.
    pub fn charge(&mut self, source: Source, now: Instant) -> bool {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        if let Some(budget) = self.budgets.get_mut(&source) {
            return budget.spend(BUDGET_INITIATIONS, now_ns);
        }
        if self.budgets.len() >= MAX_SOURCES {
            let (interval, burst) = budget_params(BUDGET_INITIATIONS);
            let refill = interval * burst;
            self.budgets.retain(|_, b| now_ns.saturating_sub(b.last_ns) < refill);
            if self.budgets.len() >= MAX_SOURCES {
                return true;
            }
        }
        self.budgets.insert(source, Budget::fresh(BUDGET_INITIATIONS, now_ns));
        true
    }

    /// How many sources are tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.budgets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_a_burst_then_five_a_second_and_ipv6_is_kept_by_its_64() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(t0);
        let a = Source::of(Via::Udp("[2001:db8:0:1::5]:51820".parse().unwrap()));
        let same_64 = Source::of(Via::Udp("[2001:db8:0:1::9]:1".parse().unwrap()));
        assert_eq!(a, same_64);
        let passed = (0..40).filter(|_| limiter.charge(a, t0)).count();
        assert_eq!(passed, 20);
        assert!(
            !limiter.charge(same_64, t0),
            "another address of the /64 shares the budget"
        );
        assert!(limiter.charge(Source::of(Via::Udp("[2001:db8:0:2::5]:1".parse().unwrap())), t0));
        assert!(
            limiter.charge(a, t0 + Duration::from_millis(200)),
            "one more every 200 ms"
        );
        assert!(!limiter.charge(a, t0 + Duration::from_millis(250)));
        let member = Source::of(Via::Relay([7; 32]));
        assert_ne!(member, Source::of(Via::Ssh([8; 32])));
        assert_eq!(
            member,
            Source::of(Via::Ssh([7; 32])),
            "a member is one source on any carrier"
        );
    }

    #[test]
    fn the_table_is_bounded_and_only_full_budgets_make_room() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(t0);
        let source = |i: u32| {
            Source::Member({
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_le_bytes());
                k
            })
        };
        for i in 0..MAX_SOURCES as u32 {
            assert!(limiter.charge(source(i), t0));
        }
        // Full of fresh budgets: a new source goes untracked (allowed, not remembered).
        assert!(limiter.charge(source(u32::MAX), t0 + Duration::from_secs(1)));
        assert_eq!(limiter.tracked(), MAX_SOURCES);
        // Once they have refilled, they make room.
        assert!(limiter.charge(source(u32::MAX), t0 + Duration::from_secs(5)));
        assert_eq!(limiter.tracked(), 1);
    }
}
