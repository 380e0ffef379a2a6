//! PCP (RFC 6887) MAP messages: the 60-byte request and its answer, matched by the nonce.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{MapError, Protocol};

/// A PCP MAP request (RFC 6887 §11) for UDP from `client:internal`.
pub(super) fn map_request(client: Ipv4Addr, nonce: [u8; 12], internal: u16, external: u16, lifetime: u32) -> [u8; 60] {
    let mut m = [0u8; 60];
    m[0] = 2; // version
    m[1] = 1; // request, opcode MAP
    m[4..8].copy_from_slice(&lifetime.to_be_bytes());
    m[8..24].copy_from_slice(&client.to_ipv6_mapped().octets());
    m[24..36].copy_from_slice(&nonce);
    m[36] = 17; // UDP
    m[40..42].copy_from_slice(&internal.to_be_bytes());
    m[42..44].copy_from_slice(&external.to_be_bytes());
    m[44..60].copy_from_slice(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    m
}

/// (external address, lifetime) from a PCP MAP response to our `nonce`.
pub(crate) fn parse_map(m: &[u8], nonce: &[u8; 12]) -> Result<(SocketAddr, u32), MapError> {
    if m.len() < 60 || m[0] != 2 || m[1] != 0x81 {
        return Err(MapError::Unexpected(Protocol::Pcp, "not a MAP response"));
    }
    if m[3] != 0 {
        return Err(MapError::Refused(Protocol::Pcp, m[3].into()));
    }
    if &m[24..36] != nonce {
        return Err(MapError::Unexpected(Protocol::Pcp, "an answer to another request"));
    }
    let lifetime = u32::from_be_bytes([m[4], m[5], m[6], m[7]]);
    let port = u16::from_be_bytes([m[42], m[43]]);
    let octets: [u8; 16] = m[44..60].try_into().expect("16 bytes");
    let ip = Ipv6Addr::from(octets).to_canonical();
    Ok((SocketAddr::new(ip, port), lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcp_map_round_trips_and_checks_the_nonce_and_result() {
        let nonce = [7u8; 12];
        let request = map_request(Ipv4Addr::new(198, 19, 1, 2), nonce, 51820, 51820, 120);
        assert_eq!(&request[..2], &[2, 1]);
        assert_eq!(&request[8..24], &Ipv4Addr::new(198, 19, 1, 2).to_ipv6_mapped().octets());
        // A server's answer: the request with R set, a result, the lifetime, the assignment.
        let mut answer = request;
        answer[1] = 0x81;
        answer[3] = 0;
        answer[8..24].fill(0);
        answer[42..44].copy_from_slice(&40000u16.to_be_bytes());
        answer[44..60].copy_from_slice(&Ipv4Addr::new(198, 18, 0, 9).to_ipv6_mapped().octets());
        assert_eq!(
            parse_map(&answer, &nonce).ok(),
            Some(("198.18.0.9:40000".parse().unwrap(), 120))
        );
        assert!(parse_map(&answer, &[8; 12]).is_err(), "another nonce");
        answer[3] = 8; // NO_RESOURCES
        assert!(matches!(
            parse_map(&answer, &nonce),
            Err(MapError::Refused(Protocol::Pcp, 8))
        ));
    }
}
