//! STUN Binding (RFC 8489), the part TunnelMesh needs: a peer asks "what address do you see me
//! at?" and the coordinator answers with XOR-MAPPED-ADDRESS.
//!
//! Sans-I/O: encoding and decoding only. The coordinator answers on two UDP ports (see
//! [`serve`]) so a client can tell endpoint-independent mapping (both see the same address) from
//! endpoint-dependent, "symmetric", mapping (each sees another port).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tunnelmesh_common::wire::{STUN_HEADER_LEN as HEADER_LEN, STUN_MAGIC_COOKIE, is_stun_response};

/// The magic cookie every RFC 5389/8489 message carries at bytes 4..8 (the kernel's copy is the
/// one in `tunnelmesh_common::wire`).
pub const MAGIC_COOKIE: u32 = u32::from_be_bytes(STUN_MAGIC_COOKIE);
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_SOFTWARE: u16 = 0x8022;
/// Default port of the coordinator's first STUN target (the second is the next port).
pub const DEFAULT_PORT: u16 = 3478;

/// `addr` with an IPv4 address as itself rather than v4-mapped IPv6 (as dual-stack sockets
/// report it), so addresses compare and print alike whichever socket saw them.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether `msg` looks like a STUN message (the first two bits zero and the magic cookie), so
/// it can share a port with other protocols.
pub fn is_stun(msg: &[u8]) -> bool {
    msg.len() >= HEADER_LEN && msg[0] & 0xc0 == 0 && msg[4..8] == STUN_MAGIC_COOKIE
}

/// A Binding request with `transaction` as its id.
pub fn binding_request(transaction: [u8; 12]) -> [u8; HEADER_LEN] {
    let mut m = [0u8; HEADER_LEN];
    m[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[8..20].copy_from_slice(&transaction);
    m
}

/// The transaction id of a Binding request, if `msg` is one.
pub fn parse_binding_request(msg: &[u8]) -> Option<[u8; 12]> {
    if !is_stun(msg) || u16::from_be_bytes([msg[0], msg[1]]) != BINDING_REQUEST {
        return None;
    }
    let declared = u16::from_be_bytes([msg[2], msg[3]]) as usize;
    if !declared.is_multiple_of(4) || HEADER_LEN + declared > msg.len() {
        return None;
    }
    msg[8..20].try_into().ok()
}

/// A Binding success response telling the client it was seen at `seen`.
pub fn binding_response(transaction: [u8; 12], seen: SocketAddr) -> Vec<u8> {
    let mut value = vec![0u8, if seen.is_ipv4() { 1 } else { 2 }];
    value.extend_from_slice(&(seen.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match seen.ip() {
        IpAddr::V4(ip) => value.extend_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes()),
        IpAddr::V6(ip) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(&transaction);
            value.extend(ip.octets().iter().zip(key).map(|(a, k)| a ^ k));
        }
    }
    let software = b"tunnelmesh";
    let mut attrs = Vec::new();
    for (kind, v) in [(ATTR_XOR_MAPPED_ADDRESS, &value[..]), (ATTR_SOFTWARE, &software[..])] {
        attrs.extend_from_slice(&kind.to_be_bytes());
        attrs.extend_from_slice(&(v.len() as u16).to_be_bytes());
        attrs.extend_from_slice(v);
        attrs.resize(attrs.len().next_multiple_of(4), 0);
    }
    let mut m = Vec::with_capacity(HEADER_LEN + attrs.len());
    m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(&transaction);
    m.extend_from_slice(&attrs);
    m
}

/// The mapped address in a Binding success response for `transaction` (XOR-MAPPED-ADDRESS, or
/// the legacy MAPPED-ADDRESS).
pub fn parse_binding_response(msg: &[u8], transaction: &[u8; 12]) -> Option<SocketAddr> {
    // The same predicate the XDP shield and the classifier apply, then the exact type and id.
    let is_response = msg
        .first_chunk::<8>()
        .is_some_and(|head| is_stun_response(*head, msg.len()));
    if !is_response || u16::from_be_bytes([msg[0], msg[1]]) != BINDING_SUCCESS || &msg[8..20] != transaction {
        return None;
    }
    let declared = u16::from_be_bytes([msg[2], msg[3]]) as usize;
    let body = msg.get(HEADER_LEN..HEADER_LEN + declared)?;
    let mut rest = body;
    let mut legacy = None;
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let value = rest.get(4..4 + len)?;
        match kind {
            ATTR_XOR_MAPPED_ADDRESS => return decode_address(value, Some(transaction)),
            ATTR_MAPPED_ADDRESS => legacy = decode_address(value, None),
            _ => {}
        }
        rest = rest.get((4 + len).next_multiple_of(4)..).unwrap_or(&[]);
    }
    legacy
}

fn decode_address(v: &[u8], xor: Option<&[u8; 12]>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match family {
        1 => {
            let raw = u32::from_be_bytes(v.get(4..8)?.try_into().ok()?);
            IpAddr::V4(Ipv4Addr::from(if xor.is_some() { raw ^ MAGIC_COOKIE } else { raw }))
        }
        2 => {
            let mut octets: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            if let Some(transaction) = xor {
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                key[4..].copy_from_slice(transaction);
                for (o, k) in octets.iter_mut().zip(key) {
                    *o ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Answer Binding requests on `socket` until the task is dropped.
pub async fn serve(socket: tokio::net::UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(transaction) = parse_binding_request(&buf[..n]) {
            let seen = canonical(from);
            let _ = socket.send_to(&binding_response(transaction, seen), from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5769 §2.2 and §2.3: the sample responses (with MESSAGE-INTEGRITY and FINGERPRINT,
    /// which a Binding client may ignore) carry 192.0.2.1:32853 and
    /// [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    #[test]
    fn the_rfc_5769_sample_responses_decode() {
        let v4 = hex("0101 003c 2112a442 b7e7a701 bc34d686 fa87dfae
             8022 000b 74657374 20766563 746f7220
             0020 0008 0001 a147 e112a643
             0008 0014 2b91f599 fd9e9000 3d6d4e51 8a2a2d5f 4c8bc8be
             8028 0004 c07d4c96");
        let t: [u8; 12] = v4[8..20].try_into().unwrap();
        assert_eq!(
            parse_binding_response(&v4, &t),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        let v6 = hex("0101 0048 2112a442 b7e7a701 bc34d686 fa87dfae
             8022 000b 74657374 20766563 746f7220
             0020 0014 0002 a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
             0008 0014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
             8028 0004 c8fb0b4c");
        let t: [u8; 12] = v6[8..20].try_into().unwrap();
        assert_eq!(
            parse_binding_response(&v6, &t),
            Some("[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap())
        );
        assert_eq!(parse_binding_response(&v4, &[0; 12]), None, "another transaction");
    }

    #[test]
    fn requests_and_responses_round_trip_and_junk_is_not_stun() {
        let t = [7u8; 12];
        let request = binding_request(t);
        assert!(is_stun(&request));
        assert_eq!(parse_binding_request(&request), Some(t));
        for seen in ["198.18.0.7:40000", "[fd00::7]:51820"] {
            let seen: SocketAddr = seen.parse().unwrap();
            let response = binding_response(t, seen);
            assert_eq!(parse_binding_response(&response, &t), Some(seen));
            assert_eq!(parse_binding_request(&response), None);
        }
        // WireGuard messages never look like STUN: type 1-4 then three zero bytes, no cookie.
        let mut initiation = vec![0u8; 148];
        initiation[0] = 1;
        assert!(!is_stun(&initiation));
        assert_eq!(parse_binding_request(&request[..19]), None);
    }
}
