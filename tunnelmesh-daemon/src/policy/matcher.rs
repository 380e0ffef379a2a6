//! Deciding a decrypted inbound packet: a reply to a flow this node opened, a rule that allows
//! it, or default deny. The same decision the eBPF ingress program makes.

use std::{net::IpAddr, time::Instant};

use tunnelmesh_common::ip::{
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};

use super::{
    compile::NodePolicy,
    conntrack::{Conntrack, FlowKey},
    ports::{ECHO_ONLY, Proto},
};
use crate::protocol::ip::IpHeader;

/// The header fields policy looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `Any` for a protocol policy does not name (it can only match an `any` rule).
    pub proto: Proto,
    pub src_port: u16,
    pub dst_port: u16,
    /// ICMP type and echo identifier.
    pub icmp_type: u8,
    pub icmp_id: u16,
    /// A fragment after the first: it carries no transport header.
    pub later_fragment: bool,
}

impl PacketInfo {
    /// The fields policy needs from a packet whose IP header is `header`. A malformed IP header
    /// or a truncated TCP/UDP/ICMP header gives `None` (denied).
    #[inline]
    pub fn of(header: &IpHeader, packet: &[u8]) -> Option<PacketInfo> {
        let l4 = header.transport_bytes(packet)?;
        let mut info = PacketInfo {
            src: header.src,
            dst: header.dst,
            proto: Proto::Any,
            src_port: 0,
            dst_port: 0,
            icmp_type: 0,
            icmp_id: 0,
            later_fragment: header.later_fragment,
        };
        if header.later_fragment {
            return Some(info);
        }
        // Only the protocols policy names need their header.
        match header.proto {
            PROTO_TCP | PROTO_UDP if l4.len() >= 4 => {
                info.proto = if header.proto == PROTO_TCP {
                    Proto::Tcp
                } else {
                    Proto::Udp
                };
                info.src_port = u16::from_be_bytes([l4[0], l4[1]]);
                info.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            }
            PROTO_ICMP | PROTO_ICMPV6 if l4.len() >= 8 => {
                info.proto = Proto::Icmp;
                info.icmp_type = l4[0];
                info.icmp_id = u16::from_be_bytes([l4[4], l4[5]]);
            }
            PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => return None, // truncated
            _ => {}
        }
        Some(info)
    }

    /// Parse `packet` from its first byte (tests, `policy explain`).
    pub fn parse(packet: &[u8]) -> Option<PacketInfo> {
        IpHeader::parse(packet).and_then(|h| Self::of(&h, packet))
    }

    fn is_echo(&self, request: bool) -> bool {
        let (v4, v6) = if request {
            (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST)
        } else {
            (ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY)
        };
        self.proto == Proto::Icmp && self.icmp_type == if self.src.is_ipv4() { v4 } else { v6 }
    }

    /// The flow an outbound packet opens, from this node's side (None if it opens none).
    pub fn outbound_flow(&self) -> Option<FlowKey> {
        match self.proto {
            Proto::Tcp | Proto::Udp => Some(FlowKey {
                proto: self.proto,
                local: self.src,
                local_port: self.src_port,
                remote: self.dst,
                remote_port: self.dst_port,
            }),
            Proto::Icmp if self.is_echo(true) => Some(FlowKey {
                proto: Proto::Icmp,
                local: self.src,
                local_port: self.icmp_id,
                remote: self.dst,
                remote_port: self.icmp_id,
            }),
            _ => None,
        }
    }

    /// The flow an inbound packet would be a reply in.
    pub fn reply_flow(&self) -> Option<FlowKey> {
        match self.proto {
            Proto::Tcp | Proto::Udp => Some(FlowKey {
                proto: self.proto,
                local: self.dst,
                local_port: self.dst_port,
                remote: self.src,
                remote_port: self.src_port,
            }),
            Proto::Icmp if self.is_echo(false) => Some(FlowKey {
                proto: Proto::Icmp,
                local: self.dst,
                local_port: self.icmp_id,
                remote: self.src,
                remote_port: self.icmp_id,
            }),
            _ => None,
        }
    }
}

/// What policy says about an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Part of a flow this node opened.
    Reply,
    /// Allowed by the `[[allow]]` rule with this index.
    Allow(u32),
    /// A fragment after the first, addressed to this node, that no rule allows by itself: it
    /// passes because the stack delivers it only reassembled with its first fragment, which
    /// carries the ports and was judged (Linux discards overlapping fragments, so a later one
    /// cannot rewrite those ports).
    Fragment,
    /// No rule allows it.
    Deny,
}

/// Decide `packet` (decrypted, inbound, its source already checked against the sender's key).
pub fn inbound_verdict(policy: &NodePolicy, conntrack: &mut Conntrack, packet: &PacketInfo, now: Instant) -> Verdict {
    if packet.reply_flow().is_some_and(|flow| conntrack.is_reply(flow, now)) {
        return Verdict::Reply;
    }
    // Rules allow packets to this node, never through it.
    if !addressed_to(policy, packet) {
        return Verdict::Deny;
    }
    match allowing_rule(policy, packet) {
        Some(id) => Verdict::Allow(id),
        None if packet.later_fragment => Verdict::Fragment,
        None => Verdict::Deny,
    }
}

/// Record outbound `packet` in `conntrack`: a flow it belongs to is refreshed; a new one is
/// opened unless a rule allows its replies anyway (this node answering a connection a peer
/// opened to an allowed port), so a peer allowed one port cannot fill the table with this
/// node's answers and evict the flows it opened. Whether the packet opened or refreshed a flow.
/// The rules are consulted only for a packet of no known flow, as in the egress program.
pub fn track_outbound(policy: &NodePolicy, conntrack: &mut Conntrack, packet: &PacketInfo, now: Instant) -> bool {
    let Some(flow) = packet.outbound_flow() else {
        return false;
    };
    if conntrack.refresh(flow, now) {
        return true;
    }
    if matches!(packet.proto, Proto::Tcp | Proto::Udp) {
        let reply = PacketInfo {
            src: packet.dst,
            dst: packet.src,
            src_port: packet.dst_port,
            dst_port: packet.src_port,
            ..*packet
        };
        if addressed_to(policy, &reply) && allowing_rule(policy, &reply).is_some() {
            return false;
        }
    }
    conntrack.outbound(flow, now);
    true
}

/// Whether `packet` goes to an address rules may allow (one of this node's own).
fn addressed_to(policy: &NodePolicy, packet: &PacketInfo) -> bool {
    policy.destinations.iter().any(|d| d.contains(&packet.dst))
}

/// The id of the first rule that allows `packet` by its source, protocol and port.
fn allowing_rule(policy: &NodePolicy, packet: &PacketInfo) -> Option<u32> {
    let allowed = policy.rules.iter().find(|rule| {
        let proto_ok = match (rule.proto, packet.proto) {
            (Proto::Any, _) => true,
            // A later fragment has no ports: only an `any` rule can allow it.
            (_, _) if packet.later_fragment => false,
            // `icmp/echo` is written with the IPv4 type; it means echo request in either family.
            (Proto::Icmp, Proto::Icmp) if rule.ports == ECHO_ONLY => packet.is_echo(true),
            (Proto::Icmp, Proto::Icmp) => rule.ports.contains(packet.icmp_type as u16),
            (r, p) if r == p => rule.ports.contains(packet.dst_port),
            _ => false,
        };
        proto_ok && rule.sources.iter().any(|net| net.contains(&packet.src))
    });
    allowed.map(|rule| rule.id)
}

/// Decide the bytes of a decrypted inbound packet: unparsable packets are denied.
pub fn decide(policy: &NodePolicy, conntrack: &mut Conntrack, packet: &[u8], now: Instant) -> Verdict {
    match PacketInfo::parse(packet) {
        Some(info) => inbound_verdict(policy, conntrack, &info, now),
        None => Verdict::Deny,
    }
}

#[cfg(test)]
mod tests {
    //! The shared policy table (`policy::cases`) against the userspace matcher; the eBPF
    //! programs run the same table in `fastpath::acl::tests`.
    use std::time::Duration;

    use super::*;
    use crate::policy::cases::{self, Frag, L4, LAPTOP, WEB, packet};

    #[test]
    fn the_policy_table() {
        let policy = cases::web_policy();
        let t0 = Instant::now();
        let cases = cases::cases();
        assert!(cases.len() >= 50, "{} cases", cases.len());
        for case in cases {
            let mut ct = Conntrack::new(1024);
            if let Some((out, sent)) = &case.opened
                && let Some(flow) = PacketInfo::parse(out).and_then(|p| p.outbound_flow())
            {
                ct.outbound(flow, t0 + Duration::from_secs(*sent));
            }
            let verdict = if cases::source_belongs_to_sender(&case) {
                decide(&policy, &mut ct, &case.inbound, t0 + Duration::from_secs(case.at))
            } else {
                Verdict::Deny
            };
            assert_eq!(verdict, case.expected, "{}", case.name);
        }
    }

    #[test]
    fn truncated_transport_headers_do_not_parse_and_the_flow_table_is_bounded() {
        use L4::{Tcp, Udp};
        let mut p = packet(LAPTOP, WEB, false, Tcp(1, 443), Frag::None);
        p.truncate(22);
        assert_eq!(PacketInfo::parse(&p), None);
        let mut ct = Conntrack::new(2);
        let t0 = Instant::now();
        for port in 1..=3 {
            let flow = PacketInfo::parse(&packet(WEB, LAPTOP, false, Udp(port, 53), Frag::None))
                .unwrap()
                .outbound_flow()
                .unwrap();
            ct.outbound(flow, t0);
        }
        assert_eq!(ct.len(), 2, "oldest evicted");
        let reply = |port| PacketInfo::parse(&packet(LAPTOP, WEB, false, Udp(53, port), Frag::None)).unwrap();
        let policy = NodePolicy::default();
        assert_eq!(inbound_verdict(&policy, &mut ct, &reply(1), t0), Verdict::Deny);
        assert_eq!(inbound_verdict(&policy, &mut ct, &reply(3), t0), Verdict::Reply);
    }
}
