//! The kernel programs' rare events, said through aya-log and surfaced in the daemon's log:
//! the shield's first judged datagram after load, a source's first exhausted budget, a policy
//! generation coming into force. `LOG_STATE` (an array, one slot per kind) remembers what has
//! been said, so nothing is said per packet.

/// The log state map's slots.
pub const LOG_SLOTS: u32 = 4;
/// Slot: whether the shield has said it judged its first datagram since load.
pub const LOG_FIRST_DATAGRAM: u32 = 0;
/// Slot: when (boot-time ns) the shield last said a source ran out of a budget.
pub const LOG_BUDGET_AT: u32 = 1;
/// Slots: the policy generation (plus one; 0: none yet) the ACL ingress and egress programs
/// last said is in force.
pub const LOG_GENERATION_INGRESS: u32 = 2;
pub const LOG_GENERATION_EGRESS: u32 = 3;
/// At most one "ran out of its budget" line a second: a flood from many sources stays quiet
/// (each source is said once anyway: at its budget's first refusal).
pub const LOG_BUDGET_INTERVAL_NS: u64 = 1_000_000_000;
/// The aya-log ring buffer's size for a component that logs (the object asks 128 KiB; rare
/// events need far less), and for one that does not (the smallest a ring buffer can be).
pub const LOG_RING_BYTES: u32 = 16 * 1024;
pub const LOG_RING_BYTES_UNUSED: u32 = 4096;
/// The ring buffer aya-log writes to (the name aya-log-ebpf gives it).
pub const LOG_RING_MAP: &str = "AYA_LOGS";
