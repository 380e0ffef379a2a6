//! The one parser of inner IP headers: every packet the data plane routes, checks or hands to
//! policy is parsed here once, and routing, the inner-source check and the userspace policy all
//! read the same [`IpHeader`]. (The kernel programs parse in eBPF; the shared policy table proves
//! the two agree.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tunnelmesh_common::ip::PROTO_IPV6_FRAGMENT;

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const IPV6_FRAGMENT_HEADER: usize = 8;

/// What the header of an inner IPv4/IPv6 packet says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The packet's real length (the rest of the buffer is padding).
    pub len: usize,
    /// The transport protocol (after an IPv6 fragment header, the one it names).
    pub proto: u8,
    /// Where the transport header starts; `None` when the IP header itself is malformed beyond
    /// the addresses (an IPv4 header length below 20, a truncated IPv6 fragment header).
    pub transport: Option<usize>,
    /// A fragment after the first: it carries no transport header.
    pub later_fragment: bool,
}

impl IpHeader {
    /// Parse the header of `packet`: `None` unless it is IPv4 or IPv6 with a length field that
    /// fits the buffer.
    #[inline]
    pub fn parse(packet: &[u8]) -> Option<IpHeader> {
        match packet.first()? >> 4 {
            4 if packet.len() >= IPV4_MIN_HEADER => {
                let len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
                if !(IPV4_MIN_HEADER..=packet.len()).contains(&len) {
                    return None;
                }
                let ihl = ((packet[0] & 0x0f) as usize) * 4;
                let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
                Some(IpHeader {
                    src: Ipv4Addr::from(<[u8; 4]>::try_from(&packet[12..16]).ok()?).into(),
                    dst: Ipv4Addr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?).into(),
                    len,
                    proto: packet[9],
                    transport: (ihl >= IPV4_MIN_HEADER).then_some(ihl),
                    later_fragment: fragment_offset != 0,
                })
            }
            6 if packet.len() >= IPV6_HEADER => {
                let len = IPV6_HEADER + u16::from_be_bytes([packet[4], packet[5]]) as usize;
                if len > packet.len() {
                    return None;
                }
                let mut header = IpHeader {
                    src: Ipv6Addr::from(<[u8; 16]>::try_from(&packet[8..24]).ok()?).into(),
                    dst: Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?).into(),
                    len,
                    proto: packet[6],
                    transport: Some(IPV6_HEADER),
                    later_fragment: false,
                };
                if header.proto == PROTO_IPV6_FRAGMENT {
                    if len < IPV6_HEADER + IPV6_FRAGMENT_HEADER {
                        header.transport = None;
                    } else {
                        header.proto = packet[40];
                        header.later_fragment = u16::from_be_bytes([packet[42], packet[43]]) >> 3 != 0;
                        header.transport = Some(IPV6_HEADER + IPV6_FRAGMENT_HEADER);
                    }
                }
                Some(header)
            }
            _ => None,
        }
    }

    /// The transport header and what follows, within the packet's real length.
    #[inline]
    pub fn transport_bytes<'a>(&self, packet: &'a [u8]) -> Option<&'a [u8]> {
        packet.get(self.transport?..self.len)
    }
}

/// The key an underlay source's handshake budget is kept under, in the kernel and in
/// userspace alike: IPv4 as `::ffff:a.b.c.d`, IPv6 by its /64.
pub fn budget_key(source: IpAddr) -> [u8; 16] {
    let octets = match source.to_canonical() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    tunnelmesh_common::shield::budget_address(octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(total: u16, ihl_words: u8, frag: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x40 | ihl_words;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p
    }

    #[test]
    fn ipv4_length_header_length_and_fragments() {
        let h = IpHeader::parse(&v4(28, 5, 0)).unwrap();
        assert_eq!(
            (h.src, h.dst),
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            (h.len, h.proto, h.transport, h.later_fragment),
            (28, 6, Some(20), false)
        );
        assert_eq!(
            h.transport_bytes(&v4(28, 5, 0)).map(<[u8]>::len),
            Some(8),
            "padding is cut"
        );
        assert_eq!(IpHeader::parse(&v4(41, 5, 0)), None, "length beyond the buffer");
        assert_eq!(IpHeader::parse(&v4(19, 5, 0)), None, "length below a header");
        assert_eq!(
            IpHeader::parse(&v4(28, 4, 0)).unwrap().transport,
            None,
            "header length below 20"
        );
        assert_eq!(IpHeader::parse(&v4(40, 6, 0)).unwrap().transport, Some(24), "options");
        assert!(
            IpHeader::parse(&v4(28, 5, 0x2000)).is_some_and(|h| !h.later_fragment),
            "MF only"
        );
        assert!(IpHeader::parse(&v4(28, 5, 1)).unwrap().later_fragment);
        assert_eq!(IpHeader::parse(&[0x45; 19]), None);
        assert_eq!(IpHeader::parse(&[]), None);
    }

    #[test]
    fn ipv6_payload_length_and_the_fragment_header() {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&16u16.to_be_bytes());
        p[6] = 17;
        p[23] = 1;
        p[39] = 2;
        let h = IpHeader::parse(&p).unwrap();
        assert_eq!((h.len, h.proto, h.transport), (56, 17, Some(40)));
        assert_eq!(h.dst, "::2".parse::<IpAddr>().unwrap());
        p[6] = PROTO_IPV6_FRAGMENT;
        p[40] = 6;
        p[42..44].copy_from_slice(&(3u16 << 3).to_be_bytes());
        let h = IpHeader::parse(&p).unwrap();
        assert_eq!((h.proto, h.transport, h.later_fragment), (6, Some(48), true));
        p[4..6].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(
            IpHeader::parse(&p).unwrap().transport,
            None,
            "truncated fragment header"
        );
        p[4..6].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(IpHeader::parse(&p), None, "payload beyond the buffer");
        assert_eq!(IpHeader::parse(&[0x60; 20]), None);
    }
}
