//! The mesh interface's ACL (TC on the TUN device).
//!
//! `tunnelmesh_acl_ingress` sees every decrypted packet the daemon writes to the TUN device (the
//! daemon has already checked that its inner source belongs to the peer whose key decrypted it)
//! and passes it only if it is a reply in a flow this node opened (`ACL_CONNTRACK`) or a rule of
//! the generation in force allows it (`ACL_SOURCES` → candidate rule slots → `ACL_RULES`, first
//! match wins); everything else is dropped. `tunnelmesh_acl_egress` sees every packet this node
//! sends into the mesh and records the flow it opens. Layouts and semantics are those of the
//! userspace matcher (`tunnelmesh-daemon/src/policy/matcher.rs`); the daemon's test suite runs
//! one table of cases against both.
//!
//! Invariants: ingress fails closed (no config entry, unparsable packet → drop); egress never
//! drops; neither modifies a packet. Headers are read with `bpf_skb_load_bytes_relative` from the
//! network header, so the programs work on the TUN device (no link-layer header) and under
//! BPF_PROG_TEST_RUN (Ethernet frames) alike.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT, bpf_hdr_start_off::BPF_HDR_START_NET},
    btf_maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes_relative},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::info;
use tunnelmesh_common::acl::{
    ACL_FLAG_ECHO_REQUEST, ACL_MASK_WORDS, ACL_MAX_DESTINATIONS, ACL_MAX_FLOWS, ACL_MAX_RULES, ACL_MAX_SOURCES,
    ACL_PROTO_ANY, ACL_PROTO_ICMP, ACL_PROTO_TCP, ACL_PROTO_UDP, AclConfig, AclFlow, AclMask, AclReason, AclRule,
    AclSource, flow_idle_ns,
};
use tunnelmesh_common::events::{LOG_GENERATION_EGRESS, LOG_GENERATION_INGRESS};
use tunnelmesh_common::ip::{
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_IPV6_FRAGMENT, PROTO_TCP, PROTO_UDP,
};

#[btf_map]
static ACL_CONFIG: Array<AclConfig, 1> = Array::new();

#[btf_map]
static ACL_SOURCES: LpmTrie<AclSource, AclMask, { ACL_MAX_SOURCES as usize }> = LpmTrie::new();

#[btf_map]
static ACL_RULES: Array<AclRule, { 2 * ACL_MAX_RULES as usize }> = Array::new();

#[btf_map]
static ACL_DESTINATIONS: LpmTrie<AclSource, u8, { ACL_MAX_DESTINATIONS as usize }> = LpmTrie::new();

#[btf_map]
static ACL_CONNTRACK: LruHashMap<AclFlow, u64, { ACL_MAX_FLOWS as usize }> = LruHashMap::new();

#[btf_map]
static ACL_COUNTERS: PerCpuArray<u64, { AclReason::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static ACL_RULE_HITS: PerCpuArray<u64, { 2 * ACL_MAX_RULES as usize }> = PerCpuArray::new();

/// The header fields policy looks at (the userspace `PacketInfo`).
#[derive(Clone, Copy)]
struct Packet {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    /// `ACL_PROTO_*`; `ACL_PROTO_ANY` for a protocol policy does not name.
    proto: u8,
    src_port: u16,
    dst_port: u16,
    icmp_type: u8,
    icmp_id: u16,
    /// A fragment after the first: no transport header.
    later_fragment: bool,
}

impl Packet {
    #[inline(always)]
    fn is_echo(&self, request: bool) -> bool {
        let expected = match (self.v6, request) {
            (false, true) => ICMP_ECHO_REQUEST,
            (false, false) => ICMP_ECHO_REPLY,
            (true, true) => ICMPV6_ECHO_REQUEST,
            (true, false) => ICMPV6_ECHO_REPLY,
        };
        self.proto == ACL_PROTO_ICMP && self.icmp_type == expected
    }
}

/// `N` bytes at `offset` from the network header, if the packet has them.
#[inline(always)]
fn load<const N: usize>(ctx: &TcContext, offset: u32) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    // SAFETY: `buf` is a writable stack buffer of exactly `N` bytes; the helper bounds-checks
    // against the packet and fails rather than reading past it.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            buf.as_mut_ptr().cast(),
            N as u32,
            BPF_HDR_START_NET,
        )
    };
    (ret == 0).then_some(buf)
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let [first] = load::<1>(ctx, 0)?;
    let mut p = Packet {
        v6: false,
        src: [0; 16],
        dst: [0; 16],
        proto: ACL_PROTO_ANY,
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
        icmp_id: 0,
        later_fragment: false,
    };
    let (next, l4) = match first >> 4 {
        4 => {
            let h = load::<20>(ctx, 0)?;
            let ihl = ((h[0] & 0x0f) as u32) * 4;
            if ihl < 20 {
                return None;
            }
            p.src[10] = 0xff;
            p.src[11] = 0xff;
            p.dst[10] = 0xff;
            p.dst[11] = 0xff;
            p.src[12..].copy_from_slice(&h[12..16]);
            p.dst[12..].copy_from_slice(&h[16..20]);
            p.later_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0;
            (h[9], ihl)
        }
        6 => {
            let h = load::<40>(ctx, 0)?;
            p.v6 = true;
            p.src.copy_from_slice(&h[8..24]);
            p.dst.copy_from_slice(&h[24..40]);
            if h[6] == PROTO_IPV6_FRAGMENT {
                let f = load::<8>(ctx, 40)?;
                p.later_fragment = u16::from_be_bytes([f[2], f[3]]) >> 3 != 0;
                (f[0], 48)
            } else {
                (h[6], 40)
            }
        }
        _ => return None,
    };
    if p.later_fragment {
        return Some(p);
    }
    match next {
        PROTO_TCP | PROTO_UDP => {
            let t = load::<4>(ctx, l4)?;
            p.proto = if next == PROTO_TCP {
                ACL_PROTO_TCP
            } else {
                ACL_PROTO_UDP
            };
            p.src_port = u16::from_be_bytes([t[0], t[1]]);
            p.dst_port = u16::from_be_bytes([t[2], t[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let t = load::<8>(ctx, l4)?;
            p.proto = ACL_PROTO_ICMP;
            p.icmp_type = t[0];
            p.icmp_id = u16::from_be_bytes([t[4], t[5]]);
        }
        _ => {}
    }
    Some(p)
}

/// The flow an inbound packet would be a reply in.
#[inline(always)]
fn reply_flow(p: &Packet) -> Option<AclFlow> {
    let (local_port, remote_port) = match p.proto {
        ACL_PROTO_TCP | ACL_PROTO_UDP => (p.dst_port, p.src_port),
        ACL_PROTO_ICMP if p.is_echo(false) => (p.icmp_id, p.icmp_id),
        _ => return None,
    };
    Some(AclFlow {
        local: p.dst,
        remote: p.src,
        local_port,
        remote_port,
        proto: p.proto,
        _pad: [0; 3],
    })
}

/// The flow an outbound packet opens.
#[inline(always)]
fn outbound_flow(p: &Packet) -> Option<AclFlow> {
    let (local_port, remote_port) = match p.proto {
        ACL_PROTO_TCP | ACL_PROTO_UDP => (p.src_port, p.dst_port),
        ACL_PROTO_ICMP if p.is_echo(true) => (p.icmp_id, p.icmp_id),
        _ => return None,
    };
    Some(AclFlow {
        local: p.src,
        remote: p.dst,
        local_port,
        remote_port,
        proto: p.proto,
        _pad: [0; 3],
    })
}

#[inline(always)]
fn rule_matches(rule: &AclRule, p: &Packet) -> bool {
    if rule.proto == ACL_PROTO_ANY {
        return true;
    }
    // A later fragment has no ports: only an `any` rule can allow it.
    if p.later_fragment || rule.proto != p.proto {
        return false;
    }
    let value = if p.proto == ACL_PROTO_ICMP {
        if rule.flags & ACL_FLAG_ECHO_REQUEST != 0 {
            return p.is_echo(true);
        }
        p.icmp_type as u16
    } else {
        p.dst_port
    };
    rule.low <= value && value <= rule.high
}

/// Packets `ctx` stands for: a GSO super-packet (the kernel's TSO on egress, the daemon's GRO
/// on ingress) counts as its segments, so the counters stay per packet.
#[inline(always)]
fn packets(ctx: &TcContext) -> u64 {
    // SAFETY: a TC program's context is its `__sk_buff`, valid for the whole run.
    let segs = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).gso_segs };
    u64::from(segs.max(1))
}

#[inline(always)]
fn count(reason: AclReason, n: u64) {
    bump(&ACL_COUNTERS, reason as u32, n);
}

#[inline(always)]
fn bump<const N: usize>(map: &PerCpuArray<u64, N>, index: u32, n: u64) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; the program cannot be preempted on it.
        unsafe { *slot += n };
    }
}

/// Say once that `generation` is in force, the first time `direction` runs under it.
#[inline(always)]
fn announce_generation(ctx: &TcContext, slot: u32, direction: &str, generation: u32) {
    let Some(said) = crate::LOG_STATE.get_ptr_mut(slot) else {
        return;
    };
    let now = u64::from(generation) + 1;
    // SAFETY: the map value lives while the program runs; two CPUs racing at a switch can at
    // worst both say it.
    if unsafe { *said } != now {
        // SAFETY: as above.
        unsafe { *said = now };
        info!(ctx, "ACL {}: policy generation {} in force", direction, generation);
    }
}

#[inline(always)]
fn config() -> Option<AclConfig> {
    ACL_CONFIG.get(0).copied()
}

#[classifier]
pub fn tunnelmesh_acl_ingress(ctx: TcContext) -> i32 {
    let Some(config) = config() else {
        return TC_ACT_SHOT as i32;
    };
    if config.enforce == 0 {
        return TC_ACT_OK as i32;
    }
    announce_generation(&ctx, LOG_GENERATION_INGRESS, "ingress", config.generation);
    let n = packets(&ctx);
    let Some(p) = parse(&ctx) else {
        count(AclReason::Malformed, n);
        return TC_ACT_SHOT as i32;
    };
    if let Some(flow) = reply_flow(&p)
        && let Some(seen) = ACL_CONNTRACK.get_ptr_mut(&flow)
    {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: the map value lives while the program runs; a racing update from another CPU
        // can only move the timestamp.
        let last = unsafe { *seen };
        // Signed age: a stamp a racing CPU wrote just after our clock read counts as fresh.
        if (now.wrapping_sub(last) as i64) < flow_idle_ns(flow.proto) as i64 {
            // SAFETY: as above.
            unsafe { *seen = now };
            count(AclReason::Reply, n);
            return TC_ACT_OK as i32;
        }
        let _ = ACL_CONNTRACK.remove(&flow);
    }
    // Rules allow packets to this node, never through it.
    let slot = if addressed_to_this_node(&config, &p) {
        allowing_slot(&config, &p)
    } else {
        None
    };
    match slot {
        Some(slot) => {
            bump(&ACL_RULE_HITS, slot, n);
            count(AclReason::Allowed, n);
            TC_ACT_OK as i32
        }
        // The stack delivers it only with its first fragment, which policy judged.
        None if p.later_fragment && addressed_to_this_node(&config, &p) => {
            count(AclReason::Fragment, n);
            TC_ACT_OK as i32
        }
        None => {
            count(AclReason::Denied, n);
            TC_ACT_SHOT as i32
        }
    }
}

/// The full-length key of `addr` in the generation in force (sources and destinations alike).
#[inline(always)]
fn trie_key(config: &AclConfig, addr: [u8; 16]) -> Key<AclSource> {
    Key::new(
        32 + 128,
        AclSource {
            generation_be: (config.generation & 1).to_be_bytes(),
            addr,
        },
    )
}

/// Whether `p` goes to an address rules may allow (one of this node's own).
#[inline(always)]
fn addressed_to_this_node(config: &AclConfig, p: &Packet) -> bool {
    ACL_DESTINATIONS.get(&trie_key(config, p.dst)).is_some()
}

/// Whether a rule would allow the replies to outbound TCP/UDP packet `p`.
#[inline(always)]
fn replies_allowed_by_rule(config: &AclConfig, p: &Packet) -> bool {
    if p.proto != ACL_PROTO_TCP && p.proto != ACL_PROTO_UDP {
        return false;
    }
    let reply = Packet {
        src: p.dst,
        dst: p.src,
        src_port: p.dst_port,
        dst_port: p.src_port,
        ..*p
    };
    addressed_to_this_node(config, &reply) && allowing_slot(config, &reply).is_some()
}

/// The slot of the first rule (in policy order) that allows `p`.
#[inline(always)]
fn allowing_slot(config: &AclConfig, p: &Packet) -> Option<u32> {
    let generation = config.generation & 1;
    let mask = *ACL_SOURCES.get(&trie_key(config, p.src))?;
    let base = generation * ACL_MAX_RULES;
    for word in 0..ACL_MASK_WORDS {
        let bits = mask.bits[word];
        if bits == 0 {
            continue;
        }
        for bit in 0..32u32 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let slot = base + (word as u32) * 32 + bit;
            if let Some(rule) = ACL_RULES.get(slot)
                && rule_matches(rule, p)
            {
                return Some(slot);
            }
        }
    }
    None
}

#[classifier]
pub fn tunnelmesh_acl_egress(ctx: TcContext) -> i32 {
    let Some(config) = config().filter(|c| c.enforce != 0) else {
        return TC_ACT_OK as i32;
    };
    announce_generation(&ctx, LOG_GENERATION_EGRESS, "egress", config.generation);
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK as i32;
    };
    if let Some(flow) = outbound_flow(&p) {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        match ACL_CONNTRACK.get_ptr_mut(&flow) {
            // SAFETY: the map value lives while the program runs.
            Some(seen) => unsafe { *seen = now },
            // Replies a rule allows anyway need no flow (this node answering a peer).
            None if replies_allowed_by_rule(&config, &p) => return TC_ACT_OK as i32,
            None => {
                let _ = ACL_CONNTRACK.insert(&flow, &now, 0);
            }
        }
        count(AclReason::Tracked, packets(&ctx));
    }
    TC_ACT_OK as i32
}
