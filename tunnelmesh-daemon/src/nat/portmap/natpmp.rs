//! NAT-PMP (RFC 6886) messages: the 12-byte "map UDP" request and the answers to it and to the
//! external-address request.

use std::net::Ipv4Addr;

use super::{MapError, Protocol};

/// NAT-PMP "map UDP" request (opcode 1): internal port, suggested external port, lifetime.
pub(super) fn map_request(internal: u16, external: u16, lifetime: u32) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[1] = 1;
    m[4..6].copy_from_slice(&internal.to_be_bytes());
    m[6..8].copy_from_slice(&external.to_be_bytes());
    m[8..12].copy_from_slice(&lifetime.to_be_bytes());
    m
}

/// (external port, lifetime) from a NAT-PMP map response to `internal`.
pub(crate) fn parse_map(m: &[u8], internal: u16) -> Result<(u16, u32), MapError> {
    if m.len() < 16 || m[0] != 0 || m[1] != 129 {
        return Err(MapError::Unexpected(Protocol::NatPmp, "not a map response"));
    }
    let result = u16::from_be_bytes([m[2], m[3]]);
    if result != 0 {
        return Err(MapError::Refused(Protocol::NatPmp, result));
    }
    if u16::from_be_bytes([m[8], m[9]]) != internal {
        return Err(MapError::Unexpected(Protocol::NatPmp, "an answer for another port"));
    }
    Ok((
        u16::from_be_bytes([m[10], m[11]]),
        u32::from_be_bytes([m[12], m[13], m[14], m[15]]),
    ))
}

/// The external address from a NAT-PMP opcode-0 response.
pub(crate) fn parse_address(m: &[u8]) -> Result<Ipv4Addr, MapError> {
    if m.len() < 12 || m[0] != 0 || m[1] != 128 {
        return Err(MapError::Unexpected(Protocol::NatPmp, "not an address response"));
    }
    match u16::from_be_bytes([m[2], m[3]]) {
        0 => Ok(Ipv4Addr::new(m[8], m[9], m[10], m[11])),
        code => Err(MapError::Refused(Protocol::NatPmp, code)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_pmp_messages_follow_rfc_6886() {
        assert_eq!(
            map_request(51820, 51820, 7200),
            [0, 1, 0, 0, 0xca, 0x6c, 0xca, 0x6c, 0, 0, 0x1c, 0x20]
        );
        let mut answer = vec![0, 129, 0, 0, 0, 0, 0, 9, 0xca, 0x6c, 0xd4, 0x31, 0, 0, 0x1c, 0x20];
        assert_eq!(parse_map(&answer, 51820).ok(), Some((54321, 7200)));
        assert!(parse_map(&answer, 4000).is_err(), "another internal port");
        answer[3] = 3;
        assert!(matches!(
            parse_map(&answer, 51820),
            Err(MapError::Refused(Protocol::NatPmp, 3))
        ));
        assert_eq!(
            parse_map(&answer, 51820).unwrap_err().to_string(),
            "nat-pmp refused the mapping with result code 3"
        );
        assert_eq!(
            parse_address(&[0, 128, 0, 0, 0, 0, 0, 9, 198, 18, 0, 1]).ok(),
            Some(Ipv4Addr::new(198, 18, 0, 1))
        );
        assert!(parse_address(&[0, 128, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0]).is_err());
    }
}
