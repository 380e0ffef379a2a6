//! Deciding a decrypted inbound packet: a reply to a flow this node opened, a rule that allows
//! it, or default deny. The same decision the eBPF ingress program makes.

use std::{net::IpAddr, time::Instant};

use super::{
    compile::{ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, NodePolicy, PortRange, Proto},
    conntrack::{Conntrack, FlowKey},
};

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

const ICMP_ECHO_REPLY: u8 = 0;
const ECHO_ONLY: PortRange = PortRange {
    low: ICMP_ECHO_REQUEST,
    high: ICMP_ECHO_REQUEST,
};
const ICMPV6_ECHO_REPLY: u8 = 129;

impl PacketInfo {
    /// Parse an IPv4 or IPv6 packet (IPv6 extension headers other than a fragment header are
    /// treated as an unnamed protocol).
    pub fn parse(packet: &[u8]) -> Option<PacketInfo> {
        let (src, dst, proto_num, l4, later_fragment): (IpAddr, IpAddr, u8, usize, bool) = match packet.first()? >> 4 {
            4 if packet.len() >= 20 => {
                let ihl = ((packet[0] & 0x0f) as usize) * 4;
                let frag = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
                (
                    <[u8; 4]>::try_from(&packet[12..16]).ok()?.into(),
                    <[u8; 4]>::try_from(&packet[16..20]).ok()?.into(),
                    packet[9],
                    ihl,
                    frag != 0,
                )
            }
            6 if packet.len() >= 40 => {
                let mut next = packet[6];
                let mut l4 = 40;
                let mut later = false;
                if next == 44 && packet.len() >= 48 {
                    later = u16::from_be_bytes([packet[42], packet[43]]) >> 3 != 0;
                    next = packet[40];
                    l4 = 48;
                }
                (
                    <[u8; 16]>::try_from(&packet[8..24]).ok()?.into(),
                    <[u8; 16]>::try_from(&packet[24..40]).ok()?.into(),
                    next,
                    l4,
                    later,
                )
            }
            _ => return None,
        };
        let mut info = PacketInfo {
            src,
            dst,
            proto: Proto::Any,
            src_port: 0,
            dst_port: 0,
            icmp_type: 0,
            icmp_id: 0,
            later_fragment,
        };
        if later_fragment {
            return Some(info);
        }
        let l4 = packet.get(l4..)?;
        match proto_num {
            6 | 17 if l4.len() >= 4 => {
                info.proto = if proto_num == 6 { Proto::Tcp } else { Proto::Udp };
                info.src_port = u16::from_be_bytes([l4[0], l4[1]]);
                info.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            }
            1 | 58 if l4.len() >= 8 => {
                info.proto = Proto::Icmp;
                info.icmp_type = l4[0];
                info.icmp_id = u16::from_be_bytes([l4[4], l4[5]]);
            }
            6 | 17 | 1 | 58 => return None, // truncated transport header
            _ => {}
        }
        Some(info)
    }

    fn is_echo(&self, request: bool) -> bool {
        let (v4, v6) = if request {
            (ICMP_ECHO_REQUEST as u8, ICMPV6_ECHO_REQUEST as u8)
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
    /// No rule allows it.
    Deny,
}

/// Decide `packet` (decrypted, inbound, its source already checked against the sender's key).
pub fn inbound_verdict(policy: &NodePolicy, conntrack: &mut Conntrack, packet: &PacketInfo, now: Instant) -> Verdict {
    if packet.reply_flow().is_some_and(|flow| conntrack.is_reply(flow, now)) {
        return Verdict::Reply;
    }
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
    allowed.map_or(Verdict::Deny, |rule| Verdict::Allow(rule.id))
}

#[cfg(test)]
mod tests {
    //! One table of cases, run through the compiler and the matcher; the eBPF enforcer will run
    //! the same table.
    use std::time::Duration;

    use super::*;
    use crate::policy::{Member, PolicyFile, compile_for};

    const POLICY: &str = r#"
[[allow]]
from = ["laptop"]
to = ["web"]
ports = ["tcp/443", "tcp/8000-8100"]

[[allow]]
from = ["*"]
to = ["web"]
ports = ["icmp/echo"]

[[allow]]
from = ["db"]
to = ["web"]
ports = ["udp/53", "any"]
"#;

    fn members() -> Vec<Member> {
        ["laptop", "web", "db"]
            .iter()
            .enumerate()
            .map(|(i, n)| Member {
                name: n.to_string(),
                tags: vec![],
                addresses: vec![
                    format!("100.64.0.{}/32", i + 1).parse().unwrap(),
                    format!("fd00::{}/128", i + 1).parse().unwrap(),
                ],
            })
            .collect()
    }

    const LAPTOP: u8 = 1;
    const WEB: u8 = 2;
    const DB: u8 = 3;
    const STRANGER: u8 = 9;

    #[derive(Clone, Copy)]
    enum L4 {
        Tcp(u16, u16),
        Udp(u16, u16),
        Icmp(u8, u16),
        Proto(u8),
    }

    fn addr(host: u8, v6: bool) -> Vec<u8> {
        if v6 {
            [&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..], &[host]].concat()
        } else {
            vec![100, 64, 0, host]
        }
    }

    /// A packet from `src` to `dst` (hosts of the mesh), `later`: a non-first fragment.
    fn packet(src: u8, dst: u8, v6: bool, l4: L4, later: bool) -> Vec<u8> {
        let (proto, body): (u8, Vec<u8>) = match l4 {
            L4::Tcp(s, d) => (6, [&s.to_be_bytes()[..], &d.to_be_bytes(), &[0; 16]].concat()),
            L4::Udp(s, d) => (17, [&s.to_be_bytes()[..], &d.to_be_bytes(), &[0; 4]].concat()),
            L4::Icmp(t, id) => (
                if v6 { 58 } else { 1 },
                [&[t, 0, 0, 0][..], &id.to_be_bytes(), &[0, 1]].concat(),
            ),
            L4::Proto(p) => (p, vec![0; 8]),
        };
        if v6 {
            let mut p = vec![0x60, 0, 0, 0, 0, 0, if later { 44 } else { proto }, 64];
            p.extend(addr(src, true));
            p.extend(addr(dst, true));
            if later {
                p.extend([proto, 0, 0x01, 0x00, 0, 0, 0, 1]); // offset 32 × 8 bytes
            }
            p.extend(body);
            p
        } else {
            let mut p = vec![
                0x45,
                0,
                0,
                0,
                0,
                0,
                if later { 0x00 } else { 0x40 },
                if later { 0x20 } else { 0 },
                64,
                proto,
                0,
                0,
            ];
            p.extend(addr(src, false));
            p.extend(addr(dst, false));
            p.extend(body);
            p
        }
    }

    /// (case, packet into web, a packet web sent first and when (s), seconds later, verdict)
    type Case = (&'static str, Vec<u8>, Option<(Vec<u8>, u64)>, u64, Verdict);

    #[test]
    fn the_policy_table() {
        let file = PolicyFile::parse(POLICY).unwrap();
        let policy = compile_for(&file, &members(), "web");
        let t0 = Instant::now();
        use L4::*;
        use Verdict::*;
        let cases: Vec<Case> = vec![
            (
                "tcp/443 from laptop",
                packet(LAPTOP, WEB, false, Tcp(50000, 443), false),
                None,
                0,
                Allow(0),
            ),
            (
                "tcp/443 from laptop, IPv6",
                packet(LAPTOP, WEB, true, Tcp(50000, 443), false),
                None,
                0,
                Allow(0),
            ),
            (
                "tcp/8000 lower edge",
                packet(LAPTOP, WEB, false, Tcp(1, 8000), false),
                None,
                0,
                Allow(0),
            ),
            (
                "tcp/8100 upper edge",
                packet(LAPTOP, WEB, false, Tcp(1, 8100), false),
                None,
                0,
                Allow(0),
            ),
            (
                "tcp/8101 just outside",
                packet(LAPTOP, WEB, false, Tcp(1, 8101), false),
                None,
                0,
                Deny,
            ),
            (
                "tcp/7999 just outside",
                packet(LAPTOP, WEB, false, Tcp(1, 7999), false),
                None,
                0,
                Deny,
            ),
            (
                "tcp/22 not allowed",
                packet(LAPTOP, WEB, true, Tcp(1, 22), false),
                None,
                0,
                Deny,
            ),
            (
                "udp/443 is not tcp/443",
                packet(LAPTOP, WEB, false, Udp(1, 443), false),
                None,
                0,
                Deny,
            ),
            (
                "a stranger's tcp/443",
                packet(STRANGER, WEB, false, Tcp(1, 443), false),
                None,
                0,
                Deny,
            ),
            (
                "ping from laptop",
                packet(LAPTOP, WEB, false, Icmp(8, 1), false),
                None,
                0,
                Allow(1),
            ),
            (
                "ping6 from laptop",
                packet(LAPTOP, WEB, true, Icmp(128, 1), false),
                None,
                0,
                Allow(1),
            ),
            (
                "ping from a stranger (not a member)",
                packet(STRANGER, WEB, false, Icmp(8, 1), false),
                None,
                0,
                Deny,
            ),
            (
                "icmp timestamp request",
                packet(LAPTOP, WEB, false, Icmp(13, 1), false),
                None,
                0,
                Deny,
            ),
            (
                "unsolicited echo reply",
                packet(LAPTOP, WEB, false, Icmp(0, 5), false),
                None,
                0,
                Deny,
            ),
            (
                "udp/53 from db (first matching rule)",
                packet(DB, WEB, false, Udp(5353, 53), false),
                None,
                0,
                Allow(2),
            ),
            (
                "anything from db",
                packet(DB, WEB, true, Tcp(1, 9999), false),
                None,
                0,
                Allow(2),
            ),
            (
                "gre from db",
                packet(DB, WEB, false, Proto(47), false),
                None,
                0,
                Allow(2),
            ),
            (
                "gre from laptop",
                packet(LAPTOP, WEB, false, Proto(47), false),
                None,
                0,
                Deny,
            ),
            (
                "later fragment from laptop",
                packet(LAPTOP, WEB, false, Tcp(1, 443), true),
                None,
                0,
                Deny,
            ),
            (
                "later IPv6 fragment from laptop",
                packet(LAPTOP, WEB, true, Tcp(1, 443), true),
                None,
                0,
                Deny,
            ),
            (
                "later fragment from db (any)",
                packet(DB, WEB, false, Udp(1, 53), true),
                None,
                0,
                Allow(2),
            ),
            (
                "tcp reply to a flow web opened",
                packet(LAPTOP, WEB, false, Tcp(22, 40000), false),
                Some((packet(WEB, LAPTOP, false, Tcp(40000, 22), false), 0)),
                10,
                Reply,
            ),
            (
                "tcp reply from another port",
                packet(LAPTOP, WEB, false, Tcp(23, 40000), false),
                Some((packet(WEB, LAPTOP, false, Tcp(40000, 22), false), 0)),
                10,
                Deny,
            ),
            (
                "tcp reply after 5 idle minutes",
                packet(LAPTOP, WEB, false, Tcp(22, 40000), false),
                Some((packet(WEB, LAPTOP, false, Tcp(40000, 22), false), 0)),
                301,
                Deny,
            ),
            (
                "udp reply within a minute, IPv6",
                packet(LAPTOP, WEB, true, Udp(123, 5000), false),
                Some((packet(WEB, LAPTOP, true, Udp(5000, 123), false), 0)),
                59,
                Reply,
            ),
            (
                "udp reply after a minute",
                packet(LAPTOP, WEB, false, Udp(123, 5000), false),
                Some((packet(WEB, LAPTOP, false, Udp(5000, 123), false), 0)),
                61,
                Deny,
            ),
            (
                "echo reply to web's ping",
                packet(LAPTOP, WEB, false, Icmp(0, 77), false),
                Some((packet(WEB, LAPTOP, false, Icmp(8, 77), false), 0)),
                1,
                Reply,
            ),
            (
                "echo reply with another id",
                packet(LAPTOP, WEB, false, Icmp(0, 78), false),
                Some((packet(WEB, LAPTOP, false, Icmp(8, 77), false), 0)),
                1,
                Deny,
            ),
            (
                "echo6 reply to web's ping6",
                packet(LAPTOP, WEB, true, Icmp(129, 9), false),
                Some((packet(WEB, LAPTOP, true, Icmp(128, 9), false), 0)),
                1,
                Reply,
            ),
            (
                "a reply to a flow with a third node is not a reply from this one",
                packet(LAPTOP, WEB, false, Tcp(22, 40000), false),
                Some((packet(WEB, DB, false, Tcp(40000, 22), false), 0)),
                1,
                Deny,
            ),
        ];
        assert!(cases.len() >= 30);
        for (name, inbound, opened, later, expected) in cases {
            let mut ct = Conntrack::new(1024);
            if let Some((out, at)) = opened {
                let flow = PacketInfo::parse(&out).unwrap().outbound_flow().expect("opens a flow");
                ct.outbound(flow, t0 + Duration::from_secs(at));
            }
            let info = PacketInfo::parse(&inbound).unwrap_or_else(|| panic!("{name}: parses"));
            assert_eq!(
                inbound_verdict(&policy, &mut ct, &info, t0 + Duration::from_secs(later)),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn truncated_transport_headers_do_not_parse_and_the_flow_table_is_bounded() {
        use L4::{Tcp, Udp};
        let mut p = packet(LAPTOP, WEB, false, Tcp(1, 443), false);
        p.truncate(22);
        assert_eq!(PacketInfo::parse(&p), None);
        let mut ct = Conntrack::new(2);
        let t0 = Instant::now();
        for port in 1..=3 {
            let flow = PacketInfo::parse(&packet(WEB, LAPTOP, false, Udp(port, 53), false))
                .unwrap()
                .outbound_flow()
                .unwrap();
            ct.outbound(flow, t0);
        }
        assert_eq!(ct.len(), 2, "oldest evicted");
        let reply = |port| PacketInfo::parse(&packet(LAPTOP, WEB, false, Udp(53, port), false)).unwrap();
        let policy = NodePolicy::default();
        assert_eq!(inbound_verdict(&policy, &mut ct, &reply(1), t0), Verdict::Deny);
        assert_eq!(inbound_verdict(&policy, &mut ct, &reply(3), t0), Verdict::Reply);
    }
}
