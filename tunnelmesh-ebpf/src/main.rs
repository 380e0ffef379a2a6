//! TunnelMesh kernel programs: the underlay shield ([`shield`]: XDP, or TC where XDP would cost
//! more than it saves), the mesh interface's ACL ([`acl`]) and the workers' socket steering
//! ([`steer`]).
//!
//! Kernel and daemon agree on every map layout and wire constant through `tunnelmesh-common`
//! only. Rare events go to the daemon's log through aya-log, each said once; nothing is logged
//! per packet.
#![no_std]
#![no_main]

mod acl;
mod shield;
mod steer;

use aya_ebpf::{btf_maps::Array, macros::btf_map};
use tunnelmesh_common::events::LOG_SLOTS;

/// What the programs have said in the log, one slot per event kind (`tunnelmesh_common::events`).
#[btf_map]
static LOG_STATE: Array<u64, { LOG_SLOTS as usize }> = Array::new();

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
