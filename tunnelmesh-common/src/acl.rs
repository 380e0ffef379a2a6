//! The mesh interface's ACL: map layouts shared by the TC programs and the daemon.
//!
//! The daemon compiles a node's inbound rules into two generations of tables (so a policy change
//! is one write of [`AclConfig::generation`]; packets never see half a policy):
//!
//! - `ACL_SOURCES`, an LPM trie from (generation, source address) to the set of rule slots whose
//!   sources contain that address ([`AclMask`]). A prefix's set includes the rules of every
//!   shorter prefix containing it, so the longest match is the whole answer.
//! - `ACL_DESTINATIONS`, an LPM trie from (generation, destination address) to 1: the addresses
//!   a rule may allow packets to (the node's own mesh addresses). A packet to any other address
//!   is allowed by no rule (replies to flows the node opened still pass).
//! - `ACL_RULES`, an array of [`AclRule`]s: slot `generation × ACL_MAX_RULES + i` is rule `i` of
//!   that generation, in the order the policy lists them (the first match names the verdict).
//! - `ACL_CONNTRACK`, an LRU hash of the flows this node opened ([`AclFlow`] → last packet time,
//!   ns of `CLOCK_MONOTONIC`), written by the egress program, read by the ingress program. An
//!   outbound TCP/UDP packet whose replies a rule allows anyway (the answers of a connection a
//!   peer opened to an allowed port) opens no flow, so such a peer cannot churn the table.
//! - `ACL_COUNTERS` (per reason, [`AclReason`]) and `ACL_RULE_HITS` (per rule slot), per CPU.

/// Rule slots per generation; a node whose compiled policy has more rules is enforced in
/// userspace.
pub const ACL_MAX_RULES: u32 = 256;
/// 32-bit words in an [`AclMask`] (32-bit so the trie value's alignment divides the key size).
pub const ACL_MASK_WORDS: usize = (ACL_MAX_RULES / 32) as usize;
/// Entries of the source trie (both generations together).
pub const ACL_MAX_SOURCES: u32 = 65_536;
/// Entries of the destination trie (both generations together).
pub const ACL_MAX_DESTINATIONS: u32 = 1024;
/// Flows the kernel conntrack holds before the least recently used is evicted.
pub const ACL_MAX_FLOWS: u32 = 65_536;

/// `AclRule::proto` values.
pub const ACL_PROTO_ANY: u8 = 0;
pub const ACL_PROTO_TCP: u8 = 1;
pub const ACL_PROTO_UDP: u8 = 2;
/// ICMP for IPv4, ICMPv6 for IPv6; `low..=high` are ICMP types.
pub const ACL_PROTO_ICMP: u8 = 3;
/// `AclRule::flags`: the rule allows echo requests of either family (`icmp/echo`).
pub const ACL_FLAG_ECHO_REQUEST: u8 = 1;

/// One inbound rule, as the ingress program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclRule {
    /// Index of the `[[allow]]` entry in the policy file.
    pub id: u32,
    /// Inclusive range of destination ports, or of ICMP types.
    pub low: u16,
    pub high: u16,
    pub proto: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Set of rule slots (bit `i % 32` of word `i / 32` is slot `i`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclMask {
    pub bits: [u32; ACL_MASK_WORDS],
}

/// Key data of `ACL_SOURCES` and `ACL_DESTINATIONS`: the generation (big-endian, always matched in full) then the
/// address (IPv4 as `::ffff:a.b.c.d`). The LPM prefix length counts the generation's 32 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclSource {
    pub generation_be: [u8; 4],
    pub addr: [u8; 16],
}

/// The single entry of `ACL_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclConfig {
    /// Which generation of `ACL_SOURCES`/`ACL_RULES` is in force (0 or 1).
    pub generation: u32,
    /// 1: enforce; 0: pass everything (the daemon enforces in userspace instead).
    pub enforce: u32,
}

/// A flow as this node sees it (conntrack key). For ICMP echo both ports are the identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclFlow {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// `ACL_PROTO_*`.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Idle time after which a flow is forgotten, by `ACL_PROTO_*`, in nanoseconds.
pub const fn flow_idle_ns(proto: u8) -> u64 {
    match proto {
        ACL_PROTO_TCP => 300_000_000_000,
        ACL_PROTO_UDP => 60_000_000_000,
        _ => 30_000_000_000,
    }
}

/// Why the ACL passed or dropped a packet; index of `ACL_COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AclReason {
    /// Inbound, part of a flow this node opened.
    Reply = 0,
    /// Inbound, allowed by a rule (counted per rule in `ACL_RULE_HITS` too).
    Allowed = 1,
    /// Inbound, no rule allows it.
    Denied = 2,
    /// Inbound, not a parsable IPv4/IPv6 packet (truncated headers): dropped.
    Malformed = 3,
    /// Outbound packets that opened or refreshed a flow.
    Tracked = 4,
    /// Inbound, a fragment after the first addressed to this node that no rule allows by
    /// itself: passed, because the stack delivers it only reassembled with its first fragment,
    /// which carries the ports and was judged (and Linux discards overlapping fragments).
    Fragment = 5,
}

impl AclReason {
    pub const COUNT: u32 = 6;
    pub const ALL: [AclReason; Self::COUNT as usize] = [
        AclReason::Reply,
        AclReason::Allowed,
        AclReason::Denied,
        AclReason::Malformed,
        AclReason::Tracked,
        AclReason::Fragment,
    ];

    /// Stable lower-case name used in status output and docs.
    pub const fn name(self) -> &'static str {
        match self {
            AclReason::Reply => "reply",
            AclReason::Allowed => "allowed",
            AclReason::Denied => "denied",
            AclReason::Malformed => "malformed",
            AclReason::Tracked => "tracked",
            AclReason::Fragment => "fragment",
        }
    }
}

/// Program and map names in the object file (map names are also the pin names, lower-cased).
pub const ACL_INGRESS_PROGRAM: &str = "tunnelmesh_acl_ingress";
pub const ACL_EGRESS_PROGRAM: &str = "tunnelmesh_acl_egress";
pub const ACL_CONFIG_MAP: &str = "ACL_CONFIG";
pub const ACL_SOURCES_MAP: &str = "ACL_SOURCES";
pub const ACL_RULES_MAP: &str = "ACL_RULES";
pub const ACL_DESTINATIONS_MAP: &str = "ACL_DESTINATIONS";
pub const ACL_CONNTRACK_MAP: &str = "ACL_CONNTRACK";
pub const ACL_COUNTERS_MAP: &str = "ACL_COUNTERS";
pub const ACL_RULE_HITS_MAP: &str = "ACL_RULE_HITS";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `repr(C)`, made of integers and byte arrays, with no implicit padding
    // (explicit `_pad` fields fill the gaps), so any bit pattern is valid and none is uninit.
    unsafe impl aya::Pod for super::AclRule {}
    unsafe impl aya::Pod for super::AclMask {}
    unsafe impl aya::Pod for super::AclSource {}
    unsafe impl aya::Pod for super::AclConfig {}
    unsafe impl aya::Pod for super::AclFlow {}
}
