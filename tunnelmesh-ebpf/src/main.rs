//! TunnelMesh kernel programs: the XDP underlay shield (here), the mesh interface's ACL
//! ([`acl`]) and the workers' socket steering ([`steer`]).
//!
//! `tunnelmesh_shield` (XDP, underlay interfaces): looks at every UDP datagram addressed to the
//! mesh port and drops what cannot be a TunnelMesh message — wrong type, non-zero reserved bytes,
//! a size impossible for its type, a handshake whose mac1 is not this node's — before it costs
//! the daemon a syscall, a hash or a Diffie-Hellman. Data messages must name a receiver index the
//! daemon holds (`KNOWN_INDICES`, kept in sync by the daemon); one unknown-index message per
//! source per second still goes up, so a daemon that restarted notices a peer holding a lost
//! session. Initiations are never charged here: mac1 proves nothing about the source address, so
//! the daemon budgets sources only after a cookie proved them (under load) and writes the ones
//! that overspend into `BLOCKED_SOURCES`, whose initiations the shield then drops. Every verdict
//! on a mesh-port datagram is counted by reason in `SHIELD_COUNTERS`.
//!
//! Fragments of datagrams to the mesh port pass (counted `fragment`): the stack reassembles them
//! and the daemon checks the whole datagram. IPv6 extension headers are walked (at most
//! [`MAX_EXTENSION_HEADERS`]) to find the UDP header.
//!
//! Rare events go to the daemon's log through aya-log, each said once ([`LOG_STATE`]): the first
//! datagram judged after load, a source's first refusal by a budget (at most one such line a
//! second), a policy generation coming into force (in [`acl`]). Nothing is logged per packet.
//!
//! Invariants: traffic that is not UDP to the mesh port is never touched (always `XDP_PASS`),
//! except an IPv6 packet with more extension headers than RFC 8200 allows one packet, which is
//! dropped as malformed (its port cannot be known); the program never modifies a packet; the
//! validity predicate is the shared [`tunnelmesh_common::wire::valid_len`] and the mac1 the
//! shared [`tunnelmesh_common::blake2s`], as userspace applies them.
#![no_std]
#![no_main]

mod acl;
mod steer;

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use aya_log_ebpf::info;
use tunnelmesh_common::{
    blake2s,
    events::{LOG_BUDGET_AT, LOG_BUDGET_INTERVAL_NS, LOG_FIRST_DATAGRAM, LOG_SLOTS},
    ip,
    shield::{
        BLOCKED_SOURCES_MAX, BUDGET_STUN, BUDGET_UNKNOWN_INDEX, Budget, KNOWN_INDICES_MAX, ShieldReason, SourceKey,
        budget_address,
    },
    wire,
};

/// The mesh UDP port in network byte order; set by the loader.
#[unsafe(no_mangle)]
static MESH_PORT_BE: Global<u16> = Global::new(0);

/// The BLAKE2s state after this node's mac1 key block; set by the loader.
#[unsafe(no_mangle)]
static MAC1_MIDSTATE: Global<[u32; 8]> = Global::new([0; 8]);

#[btf_map]
static SHIELD_COUNTERS: PerCpuArray<u64, { ShieldReason::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static KNOWN_INDICES: HashMap<u32, u8, { KNOWN_INDICES_MAX as usize }> = HashMap::new();

#[btf_map]
static SOURCE_BUDGETS: LruHashMap<SourceKey, Budget, 65536> = LruHashMap::new();

/// Working memory of the mac1 check (too big for the BPF stack).
struct Mac1Scratch {
    state: blake2s::State,
    msg: [u8; 2 * blake2s::BLOCK],
}

#[btf_map]
static MAC1_SCRATCH: PerCpuArray<Mac1Scratch, 1> = PerCpuArray::new();

#[btf_map]
static BLOCKED_SOURCES: LruHashMap<[u8; 16], u64, { BLOCKED_SOURCES_MAX as usize }> = LruHashMap::new();

/// What the programs have said in the log, one slot per event kind (`tunnelmesh_common::events`).
#[btf_map]
static LOG_STATE: Array<u64, { LOG_SLOTS as usize }> = Array::new();

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV6_HDR_LEN: usize = 40;
const UDP_HDR_LEN: usize = 8;
/// Extension headers walked before an IPv6 packet's transport header: RFC 8200 allows each
/// once (destination options twice), so no valid packet has more.
const MAX_EXTENSION_HEADERS: usize = 8;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

enum Verdict {
    /// Not ours to judge: some other traffic.
    NotMesh,
    Judged(ShieldReason),
}

#[xdp]
pub fn tunnelmesh_shield(ctx: XdpContext) -> u32 {
    match classify(&ctx) {
        Verdict::NotMesh => xdp_action::XDP_PASS,
        Verdict::Judged(reason) => {
            count(reason);
            if let Some(said) = LOG_STATE.get_ptr_mut(LOG_FIRST_DATAGRAM)
                // SAFETY: the map value lives while the program runs; two CPUs racing here can
                // at worst both say it.
                && unsafe { *said } == 0
            {
                // SAFETY: as above.
                unsafe { *said = 1 };
                info!(
                    &ctx,
                    "XDP shield: judging mesh datagrams (the first on ifindex {}: {})",
                    ctx.ingress_ifindex() as u32,
                    reason.name()
                );
            }
            if reason.passes() {
                xdp_action::XDP_PASS
            } else {
                xdp_action::XDP_DROP
            }
        }
    }
}

#[inline(always)]
fn count(reason: ShieldReason) {
    if let Some(slot) = SHIELD_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; the program cannot be preempted on it.
        unsafe { *slot += 1 };
    }
}

/// Bounds-checked pointer to `len` bytes at `offset` of the packet.
///
/// `data_end` is read anew (volatile) for every check, so the compiler cannot drop a check it
/// can prove from an earlier one: the verifier tracks each pointer's own check, not the proof.
#[inline(always)]
fn bytes(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    // SAFETY: `ctx.ctx` is the program's context pointer, valid for the whole run.
    let end = unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) } as usize;
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *const u8)
}

#[inline(always)]
fn be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    let p = bytes(ctx, offset, 2)?;
    // SAFETY: `bytes` checked that both bytes lie inside the packet.
    Some(unsafe { u16::from_be_bytes([*p, *p.add(1)]) })
}

#[inline(always)]
fn byte(ctx: &XdpContext, offset: usize) -> Option<u8> {
    let p = bytes(ctx, offset, 1)?;
    // SAFETY: `bytes` checked that the byte lies inside the packet.
    Some(unsafe { *p })
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let Some(ether_type) = be16(ctx, 12) else {
        return Verdict::NotMesh;
    };
    // Locate the UDP header; anything that is not UDP passes untouched.
    let mut source = [0u8; 16];
    let fragment;
    let udp = match ether_type {
        ETH_P_IP => {
            let Some(ver_ihl) = byte(ctx, ETH_HDR_LEN) else {
                return Verdict::NotMesh;
            };
            if byte(ctx, ETH_HDR_LEN + 9) != Some(ip::PROTO_UDP) {
                return Verdict::NotMesh;
            }
            // Later fragments carry no UDP header; leave them to the stack's reassembly. A first
            // fragment is judged by its port, then passed whole (`fragment`).
            let Some(frag) = be16(ctx, ETH_HDR_LEN + 6) else {
                return Verdict::NotMesh;
            };
            if frag & 0x1fff != 0 {
                return Verdict::NotMesh;
            }
            fragment = frag & 0x2000 != 0;
            let ihl = ((ver_ihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Verdict::NotMesh;
            }
            let Some(saddr) = bytes(ctx, ETH_HDR_LEN + 12, 4) else {
                return Verdict::NotMesh;
            };
            source[10] = 0xff;
            source[11] = 0xff;
            // SAFETY: `bytes` checked that the 4 address bytes lie inside the packet.
            unsafe { core::ptr::copy_nonoverlapping(saddr, source.as_mut_ptr().add(12), 4) };
            ETH_HDR_LEN + ihl
        }
        ETH_P_IPV6 => {
            let Some(saddr) = bytes(ctx, ETH_HDR_LEN + 8, 16) else {
                return Verdict::NotMesh;
            };
            // SAFETY: `bytes` checked that the 16 address bytes lie inside the packet.
            unsafe { core::ptr::copy_nonoverlapping(saddr, source.as_mut_ptr(), 16) };
            match udp_after_extension_headers(ctx) {
                Ipv6Transport::Udp { offset, first_fragment } => {
                    fragment = first_fragment;
                    offset
                }
                Ipv6Transport::Other => return Verdict::NotMesh,
                Ipv6Transport::TooManyHeaders => return Verdict::Judged(ShieldReason::Malformed),
            }
        }
        _ => return Verdict::NotMesh,
    };
    let Some(dst_port) = be16(ctx, udp + 2) else {
        return Verdict::NotMesh;
    };
    if dst_port != u16::from_be(MESH_PORT_BE.load()) {
        return Verdict::NotMesh;
    }
    if fragment {
        return Verdict::Judged(ShieldReason::Fragment);
    }
    let Some(udp_len) = be16(ctx, udp + 4) else {
        return Verdict::Judged(ShieldReason::Malformed);
    };
    let udp_len = udp_len as usize;
    if udp_len < UDP_HDR_LEN || bytes(ctx, udp, udp_len).is_none() {
        return Verdict::Judged(ShieldReason::Malformed);
    }
    let payload_len = udp_len - UDP_HDR_LEN;
    let payload = udp + UDP_HDR_LEN;
    let Some(header) = bytes(ctx, payload, 4) else {
        return Verdict::Judged(ShieldReason::TooShort);
    };
    // STUN answers to the requests the daemon sends from this port (to learn its public
    // address) share it with the mesh protocol; told apart by their first 8 bytes.
    if let Some(head) = bytes(ctx, payload, 8) {
        // SAFETY: `bytes` checked that the 8 bytes lie inside the packet.
        let head = unsafe { *(head as *const [u8; 8]) };
        if wire::is_stun_response(head, payload_len) {
            if !within_budget(ctx, source, BUDGET_STUN) {
                return Verdict::Judged(ShieldReason::StunRateLimited);
            }
            return Verdict::Judged(ShieldReason::Stun);
        }
    }
    // SAFETY: `bytes` checked that the 4 header bytes lie inside the packet.
    let (msg_type, reserved) = unsafe { (*header, *header.add(1) | *header.add(2) | *header.add(3)) };
    if reserved != 0 || !(wire::MSG_INITIATION..=wire::MSG_DATA).contains(&msg_type) {
        return Verdict::Judged(ShieldReason::BadType);
    }
    if !wire::valid_len(msg_type, payload_len) {
        return Verdict::Judged(ShieldReason::BadLength);
    }
    match msg_type {
        wire::MSG_DATA => {
            let Some(index) = bytes(ctx, payload + 4, 4) else {
                return Verdict::Judged(ShieldReason::Malformed);
            };
            // SAFETY: `bytes` checked that the 4 index bytes lie inside the packet.
            let index = unsafe { u32::from_le_bytes([*index, *index.add(1), *index.add(2), *index.add(3)]) };
            // SAFETY: the value is a plain u8 and is only tested for presence.
            if unsafe { KNOWN_INDICES.get(&index) }.is_none() && !within_budget(ctx, source, BUDGET_UNKNOWN_INDEX) {
                return Verdict::Judged(ShieldReason::UnknownIndex);
            }
        }
        wire::MSG_INITIATION => {
            if !mac1_ok::<{ wire::INITIATION_LEN - 32 }>(ctx, payload) {
                return Verdict::Judged(ShieldReason::BadMac);
            }
            if blocked(source) {
                return Verdict::Judged(ShieldReason::RateLimited);
            }
        }
        wire::MSG_RESPONSE => {
            if !mac1_ok::<{ wire::RESPONSE_LEN - 32 }>(ctx, payload) {
                return Verdict::Judged(ShieldReason::BadMac);
            }
        }
        _ => {}
    }
    Verdict::Judged(ShieldReason::Passed)
}

enum Ipv6Transport {
    /// The UDP header is at `offset`; `first_fragment` if a fragment header says more follow.
    Udp { offset: usize, first_fragment: bool },
    /// Another transport, or a later fragment (no UDP header in it).
    Other,
    /// More extension headers than any valid packet has.
    TooManyHeaders,
}

/// Walk an IPv6 packet's extension headers to its UDP header.
#[inline(always)]
fn udp_after_extension_headers(ctx: &XdpContext) -> Ipv6Transport {
    let Some(mut next) = byte(ctx, ETH_HDR_LEN + 6) else {
        return Ipv6Transport::Other;
    };
    let mut offset = ETH_HDR_LEN + IPV6_HDR_LEN;
    let mut first_fragment = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if next == ip::PROTO_UDP {
            return Ipv6Transport::Udp { offset, first_fragment };
        }
        // Every extension header is at least 8 bytes; its first four are all we read.
        let Some(header) = bytes(ctx, offset, 8) else {
            return Ipv6Transport::Other;
        };
        // SAFETY: `bytes` checked that the 8 header bytes lie inside the packet.
        let [following, len, frag_hi, frag_lo] = unsafe { *(header as *const [u8; 4]) };
        let header_len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => (len as usize + 1) * 8,
            IPV6_AUTH => (len as usize + 2) * 4,
            IPV6_FRAGMENT => {
                let frag = u16::from_be_bytes([frag_hi, frag_lo]);
                if frag & 0xfff8 != 0 {
                    return Ipv6Transport::Other;
                }
                first_fragment = frag & 1 != 0;
                8
            }
            _ => return Ipv6Transport::Other,
        };
        next = following;
        offset += header_len;
    }
    if next == ip::PROTO_UDP {
        return Ipv6Transport::Udp { offset, first_fragment };
    }
    match next {
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => Ipv6Transport::TooManyHeaders,
        _ => Ipv6Transport::Other,
    }
}

/// Whether the handshake message at `payload` carries this node's mac1 over its first
/// `COVERED` bytes (the mac follows them).
#[inline(always)]
fn mac1_ok<const COVERED: usize>(ctx: &XdpContext, payload: usize) -> bool {
    let Some(p) = bytes(ctx, payload, COVERED + 16) else {
        return false;
    };
    let Some(scratch) = MAC1_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of the per-CPU scratch map, ours for the run (no preemption).
    let scratch = unsafe { &mut *scratch };
    // SAFETY: `bytes` checked that COVERED + 16 bytes lie inside the packet; the buffer holds
    // 128 ≥ COVERED bytes (an initiation covers 116).
    let mac = unsafe {
        core::ptr::copy_nonoverlapping(p, scratch.msg.as_mut_ptr(), COVERED);
        core::ptr::read_unaligned(p.add(COVERED) as *const [u8; 16])
    };
    scratch.msg[COVERED..].fill(0);
    scratch.state.h = MAC1_MIDSTATE.load();
    blake2s::mac16(&mut scratch.state, &scratch.msg, COVERED);
    let mut diff = 0u32;
    for i in 0..4 {
        diff |= scratch.state.h[i] ^ u32::from_le_bytes([mac[4 * i], mac[4 * i + 1], mac[4 * i + 2], mac[4 * i + 3]]);
    }
    diff == 0
}

/// Whether the daemon blocked `source`'s initiations until a time still to come.
#[inline(always)]
fn blocked(source: [u8; 16]) -> bool {
    // SAFETY: the value is a plain u64, copied out at once.
    match unsafe { BLOCKED_SOURCES.get(&budget_address(source)) } {
        Some(&until) => {
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            now < until
        }
        None => false,
    }
}

/// Spend one message of `source`'s budget of `kind`; at its first refusal, say so (unless
/// another source was said less than [`LOG_BUDGET_INTERVAL_NS`] ago).
#[inline(always)]
fn within_budget(ctx: &XdpContext, source: [u8; 16], kind: u32) -> bool {
    let key = SourceKey {
        addr: budget_address(source),
        kind,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match SOURCE_BUDGETS.get_ptr_mut(&key) {
        // SAFETY: the map value lives while the program runs; concurrent updates from other CPUs
        // can only make the budget approximate, never unsafe.
        Some(budget) => {
            // SAFETY: as above.
            let (allowed, refused) = unsafe { ((*budget).spend(kind, now), (*budget).refused) };
            if !allowed && refused == 1 {
                say_out_of_budget(ctx, source, kind, now);
            }
            allowed
        }
        None => {
            let _ = SOURCE_BUDGETS.insert(&key, &Budget::fresh(kind, now), 0);
            true
        }
    }
}

/// Say that `source` ran out of its budget of `kind`, unless another source was said less than
/// [`LOG_BUDGET_INTERVAL_NS`] ago. Out of line: one copy of the log record's code for both
/// budgets' call sites.
#[inline(never)]
fn say_out_of_budget(ctx: &XdpContext, source: [u8; 16], kind: u32, now: u64) {
    let Some(at) = LOG_STATE.get_ptr_mut(LOG_BUDGET_AT) else {
        return;
    };
    // SAFETY: the map value lives while the program runs; a race only lets two lines through.
    if unsafe { *at } != 0 && now.wrapping_sub(unsafe { *at }) < LOG_BUDGET_INTERVAL_NS {
        return;
    }
    // SAFETY: as above.
    unsafe { *at = now };
    let what = if kind == BUDGET_STUN { "STUN" } else { "unknown-index" };
    info!(
        ctx,
        "XDP shield: {:i} ran out of its {} budget; what it sends beyond it is dropped", source, what
    );
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
