//! `tunnelmesh_steer` (`SK_REUSEPORT`, the workers' UDP sockets): a data message goes to the
//! socket of the worker named by the low bits of its receiver index
//! ([`tunnelmesh_common::steer::worker_of`]); anything else, or an index naming no socket, is
//! left to the kernel's 4-tuple hash. Never drops: a packet this program cannot place still
//! reaches a worker.

use aya_ebpf::{
    EbpfContext,
    bindings::sk_action::SK_PASS,
    btf_maps::ReusePortSockArray,
    helpers::bpf_skb_load_bytes,
    macros::{btf_map, sk_reuseport},
    programs::SkReuseportContext,
};
use tunnelmesh_common::{
    steer::{MAX_WORKERS, worker_of},
    wire,
};

#[btf_map]
static WORKER_SOCKETS: ReusePortSockArray<{ MAX_WORKERS as usize }> = ReusePortSockArray::new();

/// UDP header before the payload (the context's data starts at the transport header).
const UDP_HDR_LEN: usize = 8;

#[sk_reuseport]
pub fn tunnelmesh_steer(ctx: SkReuseportContext) -> u32 {
    let mut head = core::mem::MaybeUninit::<[u8; 8]>::uninit();
    // Read with the helper, not through `data`: a UDP GSO/GRO super-datagram's payload may lie
    // in page fragments past the linear head, where direct access sees nothing.
    // SAFETY: `head` is writable for exactly 8 bytes; the helper bounds-checks against the
    // packet (whose data starts at the UDP header) and fails rather than reading past it.
    let ret = unsafe { bpf_skb_load_bytes(ctx.as_ptr(), UDP_HDR_LEN as u32, head.as_mut_ptr().cast(), 8) };
    if ret != 0 {
        return SK_PASS;
    }
    // SAFETY: on success the helper wrote all 8 bytes.
    let head = unsafe { head.assume_init() };
    if head[0] != wire::MSG_DATA || head[1] != 0 || head[2] != 0 || head[3] != 0 {
        return SK_PASS;
    }
    let index = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    // An index naming no socket (a stale session): the kernel's hash decides.
    let _ = WORKER_SOCKETS.select_reuseport(&ctx, worker_of(index));
    SK_PASS
}
