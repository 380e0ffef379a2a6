//! Discovery I/O: what the host itself says about its addresses, probing of the gateway
//! ([`netcheck`]) and port mapping on it ([`portmap`]). The discovery logic itself — STUN rounds,
//! candidates, the NAT kind — is sans-I/O in [`crate::protocol::discovery`].

pub mod netcheck;
pub mod portmap;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::protocol::discovery::MAX_CANDIDATES;

/// This machine's global addresses (not on loopback, not on `mesh_interface`) with `port`.
pub fn host_candidates(mesh_interface: &str, port: u16) -> Vec<SocketAddr> {
    match crate::netconf::global_addresses(mesh_interface) {
        Ok(addresses) => candidates_from(&addresses, port),
        Err(e) => {
            tracing::warn!("no host candidates: {e}");
            Vec::new()
        }
    }
}

/// Each address once, with `port`, IPv4 first (the common case for LAN peers), as many as a
/// candidate list leaves room for beside the reflexive and mapped ones.
fn candidates_from(addresses: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for ip in addresses {
        let candidate = SocketAddr::new(*ip, port);
        if !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out.sort_by_key(|a| a.is_ipv6());
    out.truncate(MAX_CANDIDATES - 2);
    out
}

/// The IPv4 default gateway, if there is one (and route netlink answers).
pub fn default_gateway() -> Option<Ipv4Addr> {
    crate::netconf::default_gateways().ok()?.v4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_candidates_come_once_each_ipv4_first_and_leave_room_for_the_reflexive_ones() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let listed = [ip("2001:db8::2"), ip("10.0.0.2"), ip("192.168.1.7"), ip("10.0.0.2")];
        assert_eq!(
            candidates_from(&listed, 51820),
            vec![sa("10.0.0.2:51820"), sa("192.168.1.7:51820"), sa("[2001:db8::2]:51820")]
        );
        let many: Vec<IpAddr> = (1..=40).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        assert_eq!(candidates_from(&many, 1).len(), MAX_CANDIDATES - 2);
    }
}
