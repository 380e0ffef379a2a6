//! TunnelMesh kernel programs.
//!
//! `tunnelmesh_shield` (XDP, underlay interfaces): looks at every UDP datagram addressed to the
//! mesh port and drops what cannot be a TunnelMesh message — wrong type, non-zero reserved bytes,
//! a size impossible for its type — before it costs the daemon a syscall or a Diffie-Hellman.
//! Every verdict on a mesh-port datagram is counted by reason in `SHIELD_COUNTERS`.
//!
//! Invariants: traffic that is not UDP to the mesh port is never touched (always `XDP_PASS`);
//! the program never modifies a packet; the validity predicate is the shared
//! [`tunnelmesh_common::wire::valid_len`], the same one userspace applies.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use tunnelmesh_common::{shield::ShieldReason, wire};

/// The mesh UDP port in network byte order; set by the loader.
#[unsafe(no_mangle)]
static MESH_PORT_BE: Global<u16> = Global::new(0);

#[btf_map]
static SHIELD_COUNTERS: PerCpuArray<u64, { ShieldReason::COUNT as usize }> = PerCpuArray::new();

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_UDP: u8 = 17;
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
            if reason as u32 == ShieldReason::Passed as u32 {
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
#[inline(always)]
fn bytes(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
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
    let udp = match ether_type {
        ETH_P_IP => {
            let Some(ver_ihl) = byte(ctx, ETH_HDR_LEN) else {
                return Verdict::NotMesh;
            };
            if byte(ctx, ETH_HDR_LEN + 9) != Some(IPPROTO_UDP) {
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
            ETH_HDR_LEN + ihl
        }
        ETH_P_IPV6 => {
            // Extension headers before UDP are not used by the mesh protocol; pass them.
            if byte(ctx, ETH_HDR_LEN + 6) != Some(IPPROTO_UDP) {
                return Verdict::NotMesh;
            }
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
    // SAFETY: `bytes` checked that the 4 header bytes lie inside the packet.
    let (msg_type, reserved) = unsafe { (*header, *header.add(1) | *header.add(2) | *header.add(3)) };
    if reserved != 0 || !(wire::MSG_INITIATION..=wire::MSG_DATA).contains(&msg_type) {
        return Verdict::Judged(ShieldReason::BadType);
    }
    if !wire::valid_len(msg_type, payload_len) {
        return Verdict::Judged(ShieldReason::BadLength);
    }
    Verdict::Judged(ShieldReason::Passed)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
