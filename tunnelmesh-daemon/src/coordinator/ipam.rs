//! IP address management: one host number per node, the same in the IPv4 and the IPv6 prefix.
//!
//! Invariants: a host number is never handed to two nodes (the store's unique index enforces it
//! too); numbers stay with their key across restarts (they are persisted, and revoked nodes keep
//! theirs so an address is never reused by a different key); exhaustion is an error, never a wrap.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("the mesh prefix {0} is full ({1} nodes); choose a larger --ipv4-prefix")]
    Exhausted(Ipv4Net, u32),
    #[error("prefix {0} is too small: it needs room for at least one host")]
    TooSmall(String),
}

/// Allocator over an IPv4 and an IPv6 prefix.
#[derive(Debug, Clone)]
pub struct Ipam {
    v4: Ipv4Net,
    v6: Ipv6Net,
    used: BTreeSet<u32>,
    /// Lowest number that may be free.
    cursor: u32,
}

impl Ipam {
    pub fn new(v4: Ipv4Net, v6: Ipv6Net, used: impl IntoIterator<Item = u32>) -> Result<Self, IpamError> {
        if v4.prefix_len() > 30 {
            return Err(IpamError::TooSmall(v4.to_string()));
        }
        if v6.prefix_len() > 126 {
            return Err(IpamError::TooSmall(v6.to_string()));
        }
        Ok(Ipam {
            v4: v4.trunc(),
            v6: v6.trunc(),
            used: used.into_iter().collect(),
            cursor: 1,
        })
    }

    /// Largest usable host number (the IPv4 broadcast address is excluded, and so is 0).
    pub fn max_host(&self) -> u32 {
        let v4_hosts = (1u64 << (32 - self.v4.prefix_len())) - 2;
        let v6_bits = 128 - self.v6.prefix_len() as u32;
        let v6_hosts = if v6_bits >= 32 {
            u32::MAX as u64
        } else {
            (1u64 << v6_bits) - 1
        };
        v4_hosts.min(v6_hosts) as u32
    }

    /// Take the lowest free host number.
    pub fn allocate(&mut self) -> Result<u32, IpamError> {
        let max = self.max_host();
        let mut candidate = self.cursor.max(1);
        while candidate <= max && self.used.contains(&candidate) {
            candidate += 1;
        }
        if candidate > max {
            return Err(IpamError::Exhausted(self.v4, max));
        }
        self.used.insert(candidate);
        self.cursor = candidate + 1;
        Ok(candidate)
    }

    /// The addresses of host number `host`.
    pub fn addresses(&self, host: u32) -> (Ipv4Addr, Ipv6Addr) {
        let v4 = Ipv4Addr::from(u32::from(self.v4.network()) + host);
        let v6 = Ipv6Addr::from(u128::from(self.v6.network()) + host as u128);
        (v4, v6)
    }

    pub fn v4(&self) -> Ipv4Net {
        self.v4
    }

    pub fn v6(&self) -> Ipv6Net {
        self.v6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(v4: &str, used: &[u32]) -> Ipam {
        Ipam::new(
            v4.parse().unwrap(),
            "fd00:1:2:3::/64".parse().unwrap(),
            used.iter().copied(),
        )
        .unwrap()
    }

    #[test]
    fn hosts_are_unique_lowest_first_and_skip_taken_numbers() {
        let mut a = ipam("100.64.0.0/24", &[1, 2, 4]);
        assert_eq!(a.allocate(), Ok(3));
        assert_eq!(a.allocate(), Ok(5));
        assert_eq!(
            a.addresses(5),
            ("100.64.0.5".parse().unwrap(), "fd00:1:2:3::5".parse().unwrap())
        );
    }

    #[test]
    fn a_full_prefix_is_a_clear_error_and_never_reuses_the_broadcast_address() {
        let mut a = ipam("10.0.0.0/30", &[]);
        assert_eq!(a.allocate(), Ok(1));
        assert_eq!(a.allocate(), Ok(2));
        let err = a.allocate().unwrap_err();
        assert!(
            err.to_string().contains("full") && err.to_string().contains("--ipv4-prefix"),
            "{err}"
        );
        assert!(Ipam::new("10.0.0.0/31".parse().unwrap(), "fd00::/64".parse().unwrap(), []).is_err());
    }

    #[test]
    fn allocation_is_deterministic_from_the_persisted_set() {
        let mut first = ipam("100.64.0.0/10", &[]);
        let taken: Vec<u32> = (0..100).map(|_| first.allocate().unwrap()).collect();
        let mut restarted = ipam("100.64.0.0/10", &taken);
        assert_eq!(restarted.allocate(), Ok(101));
        assert_eq!(restarted.max_host(), (1 << 22) - 2);
    }
}
