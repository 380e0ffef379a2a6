//! TunnelMesh kernel programs: the XDP underlay shield (here), the mesh interface's ACL
//! ([`acl`]) and the workers' socket steering ([`steer`]).
//!
//! `tunnelmesh_shield` (XDP, underlay interfaces): looks at every UDP datagram addressed to the
//! mesh port and drops what cannot be a TunnelMesh message — wrong type, non-zero reserved bytes,
//! a size impossible for its type — before it costs the daemon a syscall or a Diffie-Hellman.
//! Data messages must name a receiver index the daemon holds (`KNOWN_INDICES`, kept in sync by
//! the daemon); one unknown-index message per source per second still goes up, so a daemon that
//! restarted notices a peer holding a lost session. Handshake initiations are rate-limited per
//! source (`SOURCE_BUDGETS`, an LRU of token buckets). Every verdict on a mesh-port datagram is
//! counted by reason in `SHIELD_COUNTERS`.
//!
//! Invariants: traffic that is not UDP to the mesh port is never touched (always `XDP_PASS`);
//! the program never modifies a packet; the validity predicate is the shared
//! [`tunnelmesh_common::wire::valid_len`], the same one userspace applies.
#![no_std]
#![no_main]

mod acl;
mod steer;

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use tunnelmesh_common::{
    ip,
    shield::{
        BUDGET_INITIATIONS, BUDGET_STUN, BUDGET_UNKNOWN_INDEX, Budget, KNOWN_INDICES_MAX, ShieldReason, SourceKey,
        budget_address,
    },
    wire,
};

/// The mesh UDP port in network byte order; set by the loader.
#[unsafe(no_mangle)]
static MESH_PORT_BE: Global<u16> = Global::new(0);

#[btf_map]
static SHIELD_COUNTERS: PerCpuArray<u64, { ShieldReason::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static KNOWN_INDICES: HashMap<u32, u8, { KNOWN_INDICES_MAX as usize }> = HashMap::new();

#[btf_map]
static SOURCE_BUDGETS: LruHashMap<SourceKey, Budget, 65536> = LruHashMap::new();

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV6_HDR_LEN: usize = 40;
const UDP_HDR_LEN: usize = 8;

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
    let udp = match ether_type {
        ETH_P_IP => {
            let Some(ver_ihl) = byte(ctx, ETH_HDR_LEN) else {
                return Verdict::NotMesh;
            };
            if byte(ctx, ETH_HDR_LEN + 9) != Some(ip::PROTO_UDP) {
                return Verdict::NotMesh;
            }
            // Later fragments carry no UDP header; leave them to the stack's reassembly.
            match be16(ctx, ETH_HDR_LEN + 6) {
                Some(frag) if frag & 0x1fff == 0 => {}
                _ => return Verdict::NotMesh,
            }
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
            // Extension headers before UDP are not used by the mesh protocol; pass them.
            if byte(ctx, ETH_HDR_LEN + 6) != Some(ip::PROTO_UDP) {
                return Verdict::NotMesh;
            }
            let Some(saddr) = bytes(ctx, ETH_HDR_LEN + 8, 16) else {
                return Verdict::NotMesh;
            };
            // SAFETY: `bytes` checked that the 16 address bytes lie inside the packet.
            unsafe { core::ptr::copy_nonoverlapping(saddr, source.as_mut_ptr(), 16) };
            ETH_HDR_LEN + IPV6_HDR_LEN
        }
        _ => return Verdict::NotMesh,
    };
    let Some(dst_port) = be16(ctx, udp + 2) else {
        return Verdict::NotMesh;
    };
    if dst_port != u16::from_be(MESH_PORT_BE.load()) {
        return Verdict::NotMesh;
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
            if !within_budget(source, BUDGET_STUN) {
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
            if unsafe { KNOWN_INDICES.get(&index) }.is_none() && !within_budget(source, BUDGET_UNKNOWN_INDEX) {
                return Verdict::Judged(ShieldReason::UnknownIndex);
            }
        }
        wire::MSG_INITIATION => {
            if !within_budget(source, BUDGET_INITIATIONS) {
                return Verdict::Judged(ShieldReason::RateLimited);
            }
        }
        _ => {}
    }
    Verdict::Judged(ShieldReason::Passed)
}

/// Spend one message of `source`'s budget of `kind`.
#[inline(always)]
fn within_budget(source: [u8; 16], kind: u32) -> bool {
    let key = SourceKey {
        addr: budget_address(source),
        kind,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match SOURCE_BUDGETS.get_ptr_mut(&key) {
        // SAFETY: the map value lives while the program runs; concurrent updates from other CPUs
        // can only make the budget approximate, never unsafe.
        Some(budget) => unsafe { (*budget).spend(kind, now) },
        None => {
            let _ = SOURCE_BUDGETS.insert(&key, &Budget::fresh(kind, now), 0);
            true
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
