//! The policy suite: one table of cases that both enforcers must decide identically — the
//! userspace matcher (`matcher::tests`) and the TC programs through BPF_PROG_TEST_RUN
//! (`fastpath::acl::tests`).
//!
//! Every case is a packet arriving at `web` from a peer (`sender`), optionally after `web` sent a
//! packet that opened a flow, and the verdict expected. The runner first applies the data plane's
//! inner-source check (the source must belong to the sending peer), exactly as the worker does
//! before policy; only packets that pass it reach the enforcer.

use super::{Member, NodePolicy, PolicyFile, Verdict, compile_for};
use crate::protocol::{ip::IpHeader, routing::AllowedIps};

pub const POLICY: &str = r#"
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

# Overlaps rule 0 on tcp/8090-8100: the first rule in the file names the verdict.
[[allow]]
from = ["laptop"]
to = ["web"]
ports = ["tcp/8090-8200", "udp/5000-5001", "icmp/13"]

# Selects nobody but web itself: a node never receives rules from itself.
[[allow]]
from = ["web"]
to = ["web"]
ports = ["any"]
"#;

pub const LAPTOP: u8 = 1;
pub const WEB: u8 = 2;
pub const DB: u8 = 3;
/// Not a member: no peer owns its address.
pub const STRANGER: u8 = 9;

pub fn members() -> Vec<Member> {
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

/// The compiled inbound policy of `web`.
pub fn web_policy() -> NodePolicy {
    compile_for(&PolicyFile::parse(POLICY).unwrap(), &members(), "web")
}

#[derive(Clone, Copy)]
pub enum L4 {
    Tcp(u16, u16),
    Udp(u16, u16),
    /// ICMP type and echo identifier (protocol 1 over IPv4, 58 over IPv6).
    Icmp(u8, u16),
    Proto(u8),
}

/// Fragmentation of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    None,
    /// First fragment: offset 0, more fragments follow (it carries the transport header).
    First,
    /// A later fragment: no transport header.
    Later,
}

fn addr(host: u8, v6: bool) -> Vec<u8> {
    if v6 {
        [&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..], &[host]].concat()
    } else {
        vec![100, 64, 0, host]
    }
}

/// An IP packet from mesh host `src` to mesh host `dst`, with correct length fields.
pub fn packet(src: u8, dst: u8, v6: bool, l4: L4, frag: Frag) -> Vec<u8> {
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
        let frag_header = match frag {
            Frag::None => None,
            Frag::First => Some([proto, 0, 0x00, 0x01, 0, 0, 0, 1]),
            Frag::Later => Some([proto, 0, 0x01, 0x00, 0, 0, 0, 1]), // offset 32 × 8 bytes
        };
        let payload = frag_header.map_or(0, |_| 8) + body.len();
        let next = if frag_header.is_some() { 44 } else { proto };
        let mut p = vec![0x60, 0, 0, 0, 0, payload as u8, next, 64];
        p.extend(addr(src, true));
        p.extend(addr(dst, true));
        p.extend(frag_header.iter().flatten());
        p.extend(body);
        p
    } else {
        let flags_offset: [u8; 2] = match frag {
            Frag::None => [0x40, 0],  // DF
            Frag::First => [0x20, 0], // MF, offset 0
            Frag::Later => [0x00, 0x20],
        };
        let total = (20 + body.len()) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, flags_offset[0], flags_offset[1], 64, proto, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend(addr(src, false));
        p.extend(addr(dst, false));
        p.extend(body);
        p
    }
}

/// One case of the suite.
pub struct Case {
    pub name: &'static str,
    /// The peer whose key decrypted the packet.
    pub sender: u8,
    pub inbound: Vec<u8>,
    /// A packet `web` sent first, and when (seconds).
    pub opened: Option<(Vec<u8>, u64)>,
    /// When the inbound packet arrives (seconds).
    pub at: u64,
    pub expected: Verdict,
}

impl Case {
    fn new(name: &'static str, inbound: Vec<u8>, expected: Verdict) -> Case {
        let sender = match inbound.first().map(|b| b >> 4) {
            Some(6) if inbound.len() >= 24 => inbound[23],
            _ if inbound.len() >= 16 => inbound[15],
            _ => LAPTOP,
        };
        Case {
            name,
            sender,
            inbound,
            opened: None,
            at: 0,
            expected,
        }
    }

    /// `web` sent `opened` at `sent`; the inbound packet arrives at `at`.
    fn after(mut self, opened: Vec<u8>, sent: u64, at: u64) -> Case {
        self.opened = Some((opened, sent));
        self.at = at;
        self
    }

    fn sent_by(mut self, sender: u8) -> Case {
        self.sender = sender;
        self
    }
}

/// The data plane's check before policy: the inner source belongs to the sending peer.
pub fn source_belongs_to_sender(case: &Case) -> bool {
    let mut owners = AllowedIps::default();
    for (i, m) in members().iter().enumerate() {
        for a in &m.addresses {
            owners.insert(*a, i as u8 + 1);
        }
    }
    IpHeader::parse(&case.inbound).is_some_and(|h| owners.lookup(h.src) == Some(case.sender))
}

/// The table. Rule ids: 0 laptop tcp/443+8000-8100, 1 anyone icmp/echo, 2 db udp/53+any,
/// 3 laptop tcp/8090-8200+udp/5000-5001+icmp/13.
pub fn cases() -> Vec<Case> {
    use Frag::*;
    use L4::*;
    use Verdict::*;
    let p = packet;
    let web_to_laptop_ssh = || p(WEB, LAPTOP, false, Tcp(40000, 22), None);
    vec![
        // Ports and port ranges.
        Case::new(
            "tcp/443 from laptop",
            p(LAPTOP, WEB, false, Tcp(50000, 443), None),
            Allow(0),
        ),
        Case::new(
            "tcp/443 from laptop, IPv6",
            p(LAPTOP, WEB, true, Tcp(50000, 443), None),
            Allow(0),
        ),
        Case::new(
            "tcp/8000 lower edge",
            p(LAPTOP, WEB, false, Tcp(1, 8000), None),
            Allow(0),
        ),
        Case::new(
            "tcp/8000 lower edge, IPv6",
            p(LAPTOP, WEB, true, Tcp(1, 8000), None),
            Allow(0),
        ),
        Case::new("tcp/7999 just below", p(LAPTOP, WEB, false, Tcp(1, 7999), None), Deny),
        Case::new("tcp/442 just below 443", p(LAPTOP, WEB, false, Tcp(1, 442), None), Deny),
        Case::new("tcp/444 just above 443", p(LAPTOP, WEB, true, Tcp(1, 444), None), Deny),
        Case::new("tcp/22 not allowed", p(LAPTOP, WEB, true, Tcp(1, 22), None), Deny),
        Case::new("udp/443 is not tcp/443", p(LAPTOP, WEB, false, Udp(1, 443), None), Deny),
        Case::new(
            "udp/5000 lower edge of rule 3",
            p(LAPTOP, WEB, false, Udp(9, 5000), None),
            Allow(3),
        ),
        Case::new(
            "udp/5001 upper edge, IPv6",
            p(LAPTOP, WEB, true, Udp(9, 5001), None),
            Allow(3),
        ),
        Case::new("udp/5002 just above", p(LAPTOP, WEB, false, Udp(9, 5002), None), Deny),
        Case::new("udp/4999 just below", p(LAPTOP, WEB, false, Udp(9, 4999), None), Deny),
        Case::new(
            "udp/53 is db's, not laptop's",
            p(LAPTOP, WEB, false, Udp(9, 53), None),
            Deny,
        ),
        // Overlapping rules: the first in the file names the verdict.
        Case::new(
            "tcp/8095 in rules 0 and 3",
            p(LAPTOP, WEB, false, Tcp(1, 8095), None),
            Allow(0),
        ),
        Case::new(
            "tcp/8100 upper edge of rule 0",
            p(LAPTOP, WEB, false, Tcp(1, 8100), None),
            Allow(0),
        ),
        Case::new(
            "tcp/8101 only in rule 3",
            p(LAPTOP, WEB, false, Tcp(1, 8101), None),
            Allow(3),
        ),
        Case::new(
            "tcp/8200 upper edge of rule 3",
            p(LAPTOP, WEB, true, Tcp(1, 8200), None),
            Allow(3),
        ),
        Case::new("tcp/8201 beyond both", p(LAPTOP, WEB, false, Tcp(1, 8201), None), Deny),
        Case::new(
            "udp/53 from db: rule 2",
            p(DB, WEB, false, Udp(5353, 53), None),
            Allow(2),
        ),
        Case::new(
            "tcp/443 from db: rule 2's any",
            p(DB, WEB, false, Tcp(1, 443), None),
            Allow(2),
        ),
        Case::new("anything from db, IPv6", p(DB, WEB, true, Tcp(1, 9999), None), Allow(2)),
        Case::new("gre from db", p(DB, WEB, false, Proto(47), None), Allow(2)),
        Case::new("gre from db, IPv6", p(DB, WEB, true, Proto(47), None), Allow(2)),
        Case::new("gre from laptop", p(LAPTOP, WEB, false, Proto(47), None), Deny),
        Case::new("sctp from laptop, IPv6", p(LAPTOP, WEB, true, Proto(132), None), Deny),
        // ICMP types.
        Case::new("ping from laptop", p(LAPTOP, WEB, false, Icmp(8, 1), None), Allow(1)),
        Case::new("ping6 from laptop", p(LAPTOP, WEB, true, Icmp(128, 1), None), Allow(1)),
        Case::new(
            "ping from db: rule 1 before rule 2",
            p(DB, WEB, false, Icmp(8, 1), None),
            Allow(1),
        ),
        Case::new(
            "icmp timestamp (13) from laptop",
            p(LAPTOP, WEB, false, Icmp(13, 1), None),
            Allow(3),
        ),
        Case::new(
            "icmp timestamp reply (14)",
            p(LAPTOP, WEB, false, Icmp(14, 1), None),
            Deny,
        ),
        Case::new(
            "icmp unreachable (3) from laptop",
            p(LAPTOP, WEB, false, Icmp(3, 0), None),
            Deny,
        ),
        Case::new("unsolicited echo reply", p(LAPTOP, WEB, false, Icmp(0, 5), None), Deny),
        Case::new(
            "unsolicited echo6 reply",
            p(LAPTOP, WEB, true, Icmp(129, 5), None),
            Deny,
        ),
        Case::new(
            "type 128 over IPv4 is not echo",
            p(LAPTOP, WEB, false, Icmp(128, 1), None),
            Deny,
        ),
        Case::new(
            "type 8 over IPv6 is not echo",
            p(LAPTOP, WEB, true, Icmp(8, 1), None),
            Deny,
        ),
        Case::new("ping from a stranger", p(STRANGER, WEB, false, Icmp(8, 1), None), Deny).sent_by(LAPTOP),
        // Fragments.
        Case::new(
            "first fragment to tcp/443",
            p(LAPTOP, WEB, false, Tcp(1, 443), First),
            Allow(0),
        ),
        Case::new(
            "first IPv6 fragment to tcp/443",
            p(LAPTOP, WEB, true, Tcp(1, 443), First),
            Allow(0),
        ),
        Case::new(
            "first fragment to tcp/22",
            p(LAPTOP, WEB, false, Tcp(1, 22), First),
            Deny,
        ),
        // A later fragment carries no ports: the stack delivers it only reassembled with its
        // first fragment, which was judged; so one addressed to web passes (security item 15:
        // large UDP answers, e.g. DNSSEC, to a query web sent).
        Case::new(
            "later fragment from laptop",
            p(LAPTOP, WEB, false, Tcp(1, 443), Later),
            Fragment,
        ),
        Case::new(
            "later IPv6 fragment from laptop",
            p(LAPTOP, WEB, true, Tcp(1, 443), Later),
            Fragment,
        ),
        Case::new(
            "later fragment of a DNS answer to web's query",
            p(LAPTOP, WEB, false, Udp(53, 5353), Later),
            Fragment,
        )
        .after(p(WEB, LAPTOP, false, Udp(5353, 53), None), 0, 1),
        Case::new(
            "later fragment to web's LAN address",
            to(p(LAPTOP, WEB, false, Udp(53, 5353), Later), [192, 168, 1, 5]),
            Deny,
        ),
        Case::new(
            "later IPv6 fragment to an address web does not own",
            p(LAPTOP, 77, true, Udp(53, 5353), Later),
            Deny,
        ),
        Case::new(
            "later fragment from db (any)",
            p(DB, WEB, false, Udp(1, 53), Later),
            Allow(2),
        ),
        Case::new(
            "later IPv6 fragment from db (any)",
            p(DB, WEB, true, Udp(1, 53), Later),
            Allow(2),
        ),
        // TCP and UDP state, conntrack expiry.
        Case::new(
            "tcp reply to a flow web opened",
            p(LAPTOP, WEB, false, Tcp(22, 40000), None),
            Reply,
        )
        .after(web_to_laptop_ssh(), 0, 10),
        Case::new(
            "tcp reply after 299 idle s",
            p(LAPTOP, WEB, false, Tcp(22, 40000), None),
            Reply,
        )
        .after(web_to_laptop_ssh(), 0, 299),
        Case::new(
            "tcp reply after 301 idle s",
            p(LAPTOP, WEB, false, Tcp(22, 40000), None),
            Deny,
        )
        .after(web_to_laptop_ssh(), 0, 301),
        Case::new(
            "tcp reply from another port",
            p(LAPTOP, WEB, false, Tcp(23, 40000), None),
            Deny,
        )
        .after(web_to_laptop_ssh(), 0, 10),
        Case::new(
            "tcp reply to another local port",
            p(LAPTOP, WEB, false, Tcp(22, 40001), None),
            Deny,
        )
        .after(web_to_laptop_ssh(), 0, 10),
        Case::new(
            "udp answer to a tcp flow",
            p(LAPTOP, WEB, false, Udp(22, 40000), None),
            Deny,
        )
        .after(web_to_laptop_ssh(), 0, 1),
        Case::new(
            "reply to a flow with db is not laptop's",
            p(LAPTOP, WEB, false, Tcp(22, 40000), None),
            Deny,
        )
        .after(p(WEB, DB, false, Tcp(40000, 22), None), 0, 1),
        Case::new(
            "udp reply within a minute, IPv6",
            p(LAPTOP, WEB, true, Udp(123, 6000), None),
            Reply,
        )
        .after(p(WEB, LAPTOP, true, Udp(6000, 123), None), 0, 59),
        Case::new(
            "udp reply after a minute",
            p(LAPTOP, WEB, false, Udp(123, 6000), None),
            Deny,
        )
        .after(p(WEB, LAPTOP, false, Udp(6000, 123), None), 0, 61),
        Case::new(
            "echo reply to web's ping",
            p(LAPTOP, WEB, false, Icmp(0, 77), None),
            Reply,
        )
        .after(p(WEB, LAPTOP, false, Icmp(8, 77), None), 0, 1),
        Case::new("echo reply after 29 s", p(LAPTOP, WEB, false, Icmp(0, 77), None), Reply).after(
            p(WEB, LAPTOP, false, Icmp(8, 77), None),
            0,
            29,
        ),
        Case::new("echo reply after 31 s", p(LAPTOP, WEB, false, Icmp(0, 77), None), Deny).after(
            p(WEB, LAPTOP, false, Icmp(8, 77), None),
            0,
            31,
        ),
        Case::new(
            "echo reply with another id",
            p(LAPTOP, WEB, false, Icmp(0, 78), None),
            Deny,
        )
        .after(p(WEB, LAPTOP, false, Icmp(8, 77), None), 0, 1),
        Case::new(
            "echo6 reply to web's ping6",
            p(LAPTOP, WEB, true, Icmp(129, 9), None),
            Reply,
        )
        .after(p(WEB, LAPTOP, true, Icmp(128, 9), None), 0, 1),
        Case::new(
            "a reply to web's echo reply opens nothing",
            p(LAPTOP, WEB, false, Icmp(0, 5), None),
            Deny,
        )
        .after(p(WEB, LAPTOP, false, Icmp(0, 5), None), 0, 1),
        // Rules reach web's own mesh addresses, never past it (its LAN, docker bridges, loopback
        // aliases, or whatever it routes to with ip_forward on).
        Case::new(
            "laptop's tcp/443 to web's LAN address",
            to(p(LAPTOP, WEB, false, Tcp(1, 443), None), [192, 168, 1, 5]),
            Deny,
        ),
        Case::new(
            "laptop's tcp/443 to another mesh address web does not own",
            p(LAPTOP, 77, false, Tcp(1, 443), None),
            Deny,
        ),
        Case::new(
            "laptop's tcp/443 to an IPv6 address web does not own",
            p(LAPTOP, 77, true, Tcp(1, 443), None),
            Deny,
        ),
        Case::new(
            "db's any rule does not reach a docker bridge behind web",
            to(p(DB, WEB, false, Udp(1, 9999), None), [172, 17, 0, 2]),
            Deny,
        ),
        Case::new(
            "db's any rule does not reach web's loopback",
            to(p(DB, WEB, false, Tcp(1, 6379), None), [127, 0, 0, 1]),
            Deny,
        ),
        Case::new(
            "an echo request to web's LAN address",
            to(p(LAPTOP, WEB, false, Icmp(8, 1), None), [192, 168, 1, 5]),
            Deny,
        ),
        Case::new(
            "a reply to a flow web opened from its LAN address passes (conntrack, not rules)",
            to(p(LAPTOP, WEB, false, Udp(123, 6000), None), [192, 168, 1, 5]),
            Reply,
        )
        .after(
            from(p(WEB, LAPTOP, false, Udp(6000, 123), None), [192, 168, 1, 5]),
            0,
            1,
        ),
        // Spoofed sources: decided before policy.
        Case::new(
            "laptop's tcp/443 sent with db's key",
            p(LAPTOP, WEB, false, Tcp(1, 443), None),
            Deny,
        )
        .sent_by(DB),
        Case::new(
            "db's address sent with laptop's key",
            p(DB, WEB, true, Tcp(1, 9999), None),
            Deny,
        )
        .sent_by(LAPTOP),
        Case::new("a stranger's tcp/443", p(STRANGER, WEB, false, Tcp(1, 443), None), Deny).sent_by(LAPTOP),
        // Malformed packets.
        Case::new(
            "IPv4 header length below 20",
            ihl(p(LAPTOP, WEB, false, Tcp(1, 443), None), 4),
            Deny,
        ),
        Case::new(
            "IPv4 options before tcp/443",
            ihl(p(LAPTOP, WEB, false, Tcp(1, 443), None), 6),
            Allow(0),
        ),
        Case::new(
            "truncated tcp header",
            truncated(p(LAPTOP, WEB, false, Tcp(1, 443), None), 22),
            Deny,
        ),
        Case::new(
            "truncated icmp header",
            truncated(p(LAPTOP, WEB, false, Icmp(8, 1), None), 26),
            Deny,
        ),
        Case::new(
            "truncated IPv6 fragment header",
            truncated(p(LAPTOP, WEB, true, Tcp(1, 443), First), 44),
            Deny,
        ),
    ]
}

/// IPv4 `packet` addressed to `dst` instead.
fn to(mut packet: Vec<u8>, dst: [u8; 4]) -> Vec<u8> {
    packet[16..20].copy_from_slice(&dst);
    packet
}

/// IPv4 `packet` sent from `src` instead.
fn from(mut packet: Vec<u8>, src: [u8; 4]) -> Vec<u8> {
    packet[12..16].copy_from_slice(&src);
    packet
}

/// `packet` with its IPv4 header length field set to `words` (an option of zeros inserted for 6).
fn ihl(mut packet: Vec<u8>, words: u8) -> Vec<u8> {
    packet[0] = 0x40 | words;
    if words > 5 {
        let extra = (words as usize - 5) * 4;
        packet.splice(20..20, std::iter::repeat_n(0u8, extra));
        let total = packet.len() as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
    }
    packet
}

/// `packet` cut to `len` bytes, its length field made consistent.
fn truncated(mut packet: Vec<u8>, len: usize) -> Vec<u8> {
    packet.truncate(len);
    if packet[0] >> 4 == 4 {
        packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    } else {
        packet[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    }
    packet
}
