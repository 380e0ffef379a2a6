//! Discovery I/O: what the host itself says about its addresses, probing of the gateway
//! ([`netcheck`]) and port mapping on it ([`portmap`]). The discovery logic itself — STUN rounds,
//! candidates, the NAT kind — is sans-I/O in [`crate::protocol::discovery`].

pub mod netcheck;
pub mod portmap;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::protocol::discovery::MAX_CANDIDATES;

/// This machine's global addresses (not on loopback, not on `mesh_interface`) with `port`.
pub fn host_candidates(mesh_interface: &str, port: u16) -> Vec<SocketAddr> {
    match crate::netconf::ip_output(&["-o", "addr", "show", "up", "scope", "global"]) {
        Ok(listing) => parse_ip_addr(&listing, mesh_interface, port),
        Err(e) => {
            tracing::warn!("no host candidates: {e}");
            Vec::new()
        }
    }
}

/// Addresses from `ip -o addr` lines: `N: IFACE    inet A/LEN ... scope global ...`.
fn parse_ip_addr(listing: &str, mesh_interface: &str, port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(iface), Some(family), Some(addr)) = (fields.get(1), fields.get(2), fields.get(3)) else {
            continue;
        };
        if *iface == "lo" || *iface == mesh_interface || !matches!(*family, "inet" | "inet6") {
            continue;
        }
        let Some(ip) = addr.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()) else {
            continue;
        };
        let candidate = SocketAddr::new(ip, port);
        if !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    // IPv4 first: the common case for LAN peers.
    out.sort_by_key(|a| a.is_ipv6());
    out.truncate(MAX_CANDIDATES - 2);
    out
}

/// The IPv4 default gateway from `/proc/net/route`.
pub fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"00000000")).then(|| {
            u32::from_str_radix(f.get(2)?, 16)
                .ok()
                .map(|g| Ipv4Addr::from(g.swap_bytes()))
        })?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_candidates_skip_loopback_the_mesh_and_repeat_addresses() {
        let listing = "1: lo    inet 127.0.0.1/8 scope host lo\n\
            2: eth0    inet 10.0.0.2/24 brd 10.0.0.255 scope global eth0\n\
            2: eth0    inet6 2001:db8::2/64 scope global\n\
            5: tm0    inet 100.64.0.1/10 scope global tm0\n\
            6: wlan0    inet 192.168.1.7/24 scope global dynamic wlan0\n";
        assert_eq!(
            parse_ip_addr(listing, "tm0", 51820),
            vec![sa("10.0.0.2:51820"), sa("192.168.1.7:51820"), sa("[2001:db8::2]:51820")]
        );
    }
}
