//! Worker steering: which data-plane worker a session's inbound data goes to.
//!
//! The handshake thread allocates each session's receiver index with the owning worker in its
//! low bits; the `SK_REUSEPORT` program reads the receiver index of every data message and
//! delivers it to that worker's socket, so a session's receive path stays on one worker (one
//! replay window, never contended) wherever the peer roams. Everything else (handshakes,
//! cookies, STUN) is left to the kernel's hash.

/// Bits of a receiver index that name the worker.
pub const WORKER_BITS: u32 = 8;
/// Most workers steering can address.
pub const MAX_WORKERS: u32 = 1 << WORKER_BITS;
/// Name of the worker socket array in the eBPF object.
pub const WORKER_SOCKETS_MAP: &str = "WORKER_SOCKETS";
/// Name of the `SK_REUSEPORT` program in the eBPF object.
pub const STEER_PROGRAM: &str = "tunnelmesh_steer";

/// The worker that owns the session with receiver index `index`.
#[inline(always)]
pub const fn worker_of(index: u32) -> u32 {
    index & (MAX_WORKERS - 1)
}

/// `random` with its worker bits replaced by `worker` (< `MAX_WORKERS`).
#[inline(always)]
pub const fn index_for(worker: u32, random: u32) -> u32 {
    (random & !(MAX_WORKERS - 1)) | worker
}
