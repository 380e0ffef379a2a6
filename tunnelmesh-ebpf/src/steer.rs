//! `tunnelmesh_steer` (`SK_REUSEPORT`, the workers' UDP sockets): a data message goes to the
//! socket of the worker named by the low bits of its receiver index
//! ([`tunnelmesh_common::steer::worker_of`]); anything else, or an index naming no socket, is
//! left to the kernel's 4-tuple hash. Never drops: a packet this program cannot place still
//! reaches a worker.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    btf_maps::ReusePortSockArray,
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
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + UDP_HDR_LEN + 8 > end {
        return SK_PASS;
    }
    // SAFETY: the 8 bytes after the UDP header are within the packet, checked just above.
    let head = unsafe { *((data + UDP_HDR_LEN) as *const [u8; 8]) };
    if head[0] != wire::MSG_DATA || head[1] != 0 || head[2] != 0 || head[3] != 0 {
        return SK_PASS;
    }
    let index = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    // An index naming no socket (a stale session): the kernel's hash decides.
    let _ = WORKER_SOCKETS.select_reuseport(&ctx, worker_of(index));
    SK_PASS
}
