//! Cryptokey routing: which peer owns an inner IP address.
//!
//! Outbound, the destination address picks the peer whose key encrypts the packet; inbound, the
//! source address of a decrypted packet must belong to the peer whose key decrypted it. Longest
//! prefix wins. Lookups hash the address masked to each prefix length in use, longest first, so a
//! lookup costs one hash probe per distinct prefix length (usually one or two) and never allocates.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

/// Longest-prefix-match table from IP prefixes to values.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    if len == 0 { 0 } else { addr & (u32::MAX << (32 - len)) }
}

fn mask6(addr: u128, len: u8) -> u128 {
    if len == 0 { 0 } else { addr & (u128::MAX << (128 - len)) }
}

impl<T: Copy> AllowedIps<T> {
    /// Map `net` to `value`, replacing a previous owner of exactly that prefix.
    pub fn insert(&mut self, net: IpNet, value: T) {
        let len = net.prefix_len();
        match net.addr() {
            IpAddr::V4(a) => Self::insert_in(&mut self.v4, len, mask4(a.into(), len), value),
            IpAddr::V6(a) => Self::insert_in(&mut self.v6, len, mask6(a.into(), len), value),
        }
    }

    fn insert_in<K: std::hash::Hash + Eq>(table: &mut Vec<(u8, HashMap<K, T>)>, len: u8, key: K, value: T) {
        match table.iter_mut().find(|(l, _)| *l == len) {
            Some((_, map)) => {
                map.insert(key, value);
            }
            None => {
                table.push((len, HashMap::from([(key, value)])));
                table.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
            }
        }
    }

    /// The value of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<T> {
        match ip {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    pub fn lookup_v4(&self, ip: Ipv4Addr) -> Option<T> {
        let a = u32::from(ip);
        self.v4.iter().find_map(|(len, map)| map.get(&mask4(a, *len)).copied())
    }

    pub fn lookup_v6(&self, ip: Ipv6Addr) -> Option<T> {
        let a = u128::from(ip);
        self.v6.iter().find_map(|(len, map)| map.get(&mask6(a, *len)).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_for_both_families() {
        let mut t = AllowedIps::default();
        t.insert("10.0.0.0/8".parse().unwrap(), 1);
        t.insert("10.1.0.0/16".parse().unwrap(), 2);
        t.insert("10.1.2.3/32".parse().unwrap(), 3);
        t.insert("fd00::/8".parse().unwrap(), 4);
        t.insert("fd00::5/128".parse().unwrap(), 5);
        t.insert("0.0.0.0/0".parse().unwrap(), 6);
        let q = |s: &str| t.lookup(s.parse().unwrap());
        assert_eq!(q("10.1.2.3"), Some(3));
        assert_eq!(q("10.1.9.9"), Some(2));
        assert_eq!(q("10.200.0.1"), Some(1));
        assert_eq!(q("192.0.2.1"), Some(6));
        assert_eq!(q("fd00::5"), Some(5));
        assert_eq!(q("fd00::6"), Some(4));
        assert_eq!(q("2001:db8::1"), None);
    }
}
