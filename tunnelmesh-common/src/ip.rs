//! IP protocol numbers and ICMP message types, as both the kernel programs and the daemon read
//! them from inner packets (IANA "Assigned Internet Protocol Numbers", RFC 792, RFC 4443).

/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMP (IPv4).
pub const PROTO_ICMP: u8 = 1;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// The IPv6 fragment extension header.
pub const PROTO_IPV6_FRAGMENT: u8 = 44;

/// ICMP echo request and reply.
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMPv6 echo request and reply.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
