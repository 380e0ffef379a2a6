//! The underlay shield: one judgement of every UDP datagram addressed to the mesh port, run at
//! one of two hooks.
//!
//! - `tunnelmesh_shield` (XDP) on interfaces whose driver runs XDP natively: it sees each wire
//!   frame before the kernel has built an skb for it.
//! - `tunnelmesh_shield_tc` (TC ingress) on veth and on interfaces without native XDP. Driver-mode
//!   XDP on a veth turns off its peer's software GSO and copies every skb into an `xdp_frame`;
//!   generic XDP runs after GRO and copies too. At TC a UDP GSO/GRO *super-datagram* arrives
//!   whole, so the program judges each of its segments (through `bpf_loop`, whose body the
//!   verifier checks once) and passes the super-datagram only if every segment passes.
//!
//! The judgement drops what cannot be a TunnelMesh message — wrong type, non-zero reserved bytes,
//! a size impossible for its type, a handshake whose mac1 is not this node's — before it costs
//! the daemon a syscall, a hash or a Diffie-Hellman. Data messages must name a receiver index the
//! daemon holds (`KNOWN_INDICES`, kept in sync by the daemon); one unknown-index message per
//! source per second still goes up, so a daemon that restarted notices a peer holding a lost
//! session. Initiations are never charged here: mac1 proves nothing about the source address, so
//! the daemon budgets sources only after a cookie proved them (under load) and writes the ones
//! that overspend into `BLOCKED_SOURCES`, whose initiations the shield then drops. Every verdict
//! on a mesh-port datagram is counted by reason in `SHIELD_COUNTERS`, per datagram: a dropped
//! super-datagram counts each of its segments under the reason of the first that failed.
//!
//! Fragments of datagrams to the mesh port pass (counted `fragment`): the stack reassembles them
//! and the daemon checks the whole datagram. IPv6 extension headers are walked (at most
//! [`MAX_EXTENSION_HEADERS`]) to find the UDP header.
//!
//! Invariants: traffic that is not UDP to the mesh port is never touched (always passed),
//! except an IPv6 packet with more extension headers than RFC 8200 allows one packet, which is
//! dropped as malformed (its port cannot be known); the programs never modify a packet; both
//! hooks run the same [`judge_datagram`], whose validity predicate is the shared
//! [`tunnelmesh_common::wire::valid_len`] and whose mac1 is the shared
//! [`tunnelmesh_common::blake2s`], as userspace applies them.

use core::{ffi::c_void, ptr::NonNull};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_ktime_get_ns, bpf_loop, bpf_skb_load_bytes},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::info;
use tunnelmesh_common::{
    blake2s,
    events::{LOG_BUDGET_AT, LOG_BUDGET_INTERVAL_NS, LOG_FIRST_DATAGRAM},
    ip,
    shield::{
        BLOCKED_SOURCES_MAX, BUDGET_STUN, BUDGET_UNKNOWN_INDEX, Budget, KNOWN_INDICES_MAX, MAX_SEGMENTS, ShieldReason,
        SourceKey, budget_address,
    },
    wire,
};

use crate::LOG_STATE;

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

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_MIN_HDR_LEN: usize = 20;
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

/// How a program type reads the frame it judges. Offsets count from the network header.
trait Frame: EbpfContext {
    /// The hook's name in the log.
    const HOOK: &'static str;
    /// The network protocol (EtherType).
    fn ether_type(&self) -> Option<u16>;
    /// `N` bytes at `offset`, if the frame has them.
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
    /// Copy `N` bytes at `offset` into `out`; whether the frame had them.
    fn copy<const N: usize>(&self, offset: usize, out: &mut [u8; N]) -> bool;
    /// Judge the `total` payload bytes at `payload` from `source`: one datagram, or each
    /// segment of a super-datagram.
    fn judge_payload(&self, source: [u8; 16], payload: usize, total: usize) -> Verdict;
    /// The interface the frame came in on.
    fn ifindex(&self) -> u32;
}

/// Bounds-checked pointer to `len` bytes at `offset` of an XDP frame (from its start).
///
/// `data_end` is read anew (volatile) for every check, so the compiler cannot drop a check it
/// can prove from an earlier one: the verifier tracks each pointer's own check, not the proof.
#[inline(always)]
fn xdp_bytes(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    // SAFETY: `ctx.ctx` is the program's context pointer, valid for the whole run.
    let end = unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) } as usize;
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *const u8)
}

impl Frame for XdpContext {
    const HOOK: &'static str = "XDP";

    #[inline(always)]
    fn ether_type(&self) -> Option<u16> {
        let p = xdp_bytes(self, 12, 2)?;
        // SAFETY: `xdp_bytes` checked that both bytes lie inside the packet.
        Some(u16::from_be_bytes(unsafe {
            core::ptr::read_unaligned(p as *const [u8; 2])
        }))
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let p = xdp_bytes(self, ETH_HDR_LEN + offset, N)?;
        // SAFETY: `xdp_bytes` checked that the N bytes lie inside the packet.
        Some(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
    }

    #[inline(always)]
    fn copy<const N: usize>(&self, offset: usize, out: &mut [u8; N]) -> bool {
        let Some(p) = xdp_bytes(self, ETH_HDR_LEN + offset, N) else {
            return false;
        };
        // SAFETY: `xdp_bytes` checked that the N bytes lie inside the packet; `out` holds N.
        unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), N) };
        true
    }

    #[inline(always)]
    fn judge_payload(&self, source: [u8; 16], payload: usize, total: usize) -> Verdict {
        // XDP sees wire frames: one datagram each.
        Verdict::Datagram(judge_datagram(self, source, payload, total))
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
}

/// A TC frame: the skb at ingress, its data starting at the Ethernet header (the daemon attaches
/// the shield to Ethernet links only). Read with `bpf_skb_load_bytes`, which also reaches a
/// super-datagram's payload in page fragments (`bpf_skb_load_bytes_relative` reads the linear
/// head only).
impl Frame for TcContext {
    const HOOK: &'static str = "TC";

    #[inline(always)]
    fn ether_type(&self) -> Option<u16> {
        Some(u16::from_be(self.skb.protocol() as u16))
    }

    /// Into an uninitialised buffer: zeroing it first would be a `memset` call whose byte loop
    /// the verifier walks on every path (the helper initialises what it writes).
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let mut buf = core::mem::MaybeUninit::<[u8; N]>::uninit();
        // SAFETY: `buf` is writable for exactly N bytes; the helper bounds-checks against the
        // packet and fails rather than reading past it.
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.as_ptr(),
                (ETH_HDR_LEN + offset) as u32,
                buf.as_mut_ptr().cast(),
                N as u32,
            )
        };
        // SAFETY: on success the helper wrote all N bytes.
        (ret == 0).then(|| unsafe { buf.assume_init() })
    }

    #[inline(always)]
    fn copy<const N: usize>(&self, offset: usize, out: &mut [u8; N]) -> bool {
        // SAFETY: as in `load`, into `out`, writable for exactly N bytes.
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.as_ptr(),
                (ETH_HDR_LEN + offset) as u32,
                out.as_mut_ptr().cast(),
                N as u32,
            )
        };
        ret == 0
    }

    /// Through `bpf_loop` even for one datagram (one round): the verifier then checks the
    /// judgement once, in the callback, instead of once per path the header parsing leaves.
    #[inline(always)]
    fn judge_payload(&self, source: [u8; 16], payload: usize, total: usize) -> Verdict {
        // SAFETY: the context pointer is valid for the whole run; gso_size is a readable field.
        let size = unsafe { (*(self.as_ptr() as *const __sk_buff)).gso_size } as usize;
        // A GSO/GRO skb's segments carry `gso_size` payload bytes each (a shorter last).
        let size = if size == 0 || size >= total { total } else { size };
        judge_segments(self, source, payload, total, size)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*(self.as_ptr() as *const __sk_buff)).ingress_ifindex }
    }
}

/// What the shield made of a frame.
enum Verdict {
    /// Not ours to judge: some other traffic.
    NotMesh,
    /// One datagram, judged for this reason (not counted yet).
    Datagram(ShieldReason),
    /// Judged and counted segment by segment (TC): passes whole (`Passed`) or is dropped whole
    /// for the first refusing segment's reason.
    Counted(ShieldReason),
}

#[xdp]
pub fn tunnelmesh_shield(ctx: XdpContext) -> u32 {
    if shield(&ctx) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[classifier]
pub fn tunnelmesh_shield_tc(ctx: TcContext) -> i32 {
    if shield(&ctx) { TC_ACT_OK } else { TC_ACT_SHOT }
}

/// Judge and count the frame, say the first verdict after load; whether it passes.
#[inline(always)]
fn shield<F: Frame>(frame: &F) -> bool {
    let reason = match classify(frame) {
        Verdict::NotMesh => return true,
        Verdict::Datagram(reason) => {
            count(reason, 1);
            reason
        }
        Verdict::Counted(reason) => reason,
    };
    if let Some(said) = LOG_STATE.get_ptr_mut(LOG_FIRST_DATAGRAM)
        // SAFETY: the map value lives while the program runs; two CPUs racing here can
        // at worst both say it.
        && unsafe { *said } == 0
    {
        // SAFETY: as above.
        unsafe { *said = 1 };
        say_first_verdict(frame, reason);
    }
    reason.passes()
}

/// Say the first verdict after load. Out of line: the log record's code once per hook.
#[inline(never)]
fn say_first_verdict<F: Frame>(frame: &F, reason: ShieldReason) {
    info!(
        frame,
        "{} shield: judging mesh datagrams (the first on ifindex {}: {})",
        F::HOOK,
        frame.ifindex(),
        reason.name()
    );
}

#[inline(always)]
fn count(reason: ShieldReason, datagrams: u64) {
    if let Some(slot) = SHIELD_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; the program cannot be preempted on it.
        unsafe { *slot += datagrams };
    }
}

#[inline(always)]
fn be16<F: Frame>(frame: &F, offset: usize) -> Option<u16> {
    frame.load::<2>(offset).map(u16::from_be_bytes)
}

#[inline(always)]
fn classify<F: Frame>(frame: &F) -> Verdict {
    // Locate the UDP header; anything that is not UDP passes untouched.
    let mut source = [0u8; 16];
    let fragment;
    let udp = match frame.ether_type() {
        Some(ETH_P_IP) => {
            let Some([ver_ihl]) = frame.load::<1>(0) else {
                return Verdict::NotMesh;
            };
            if frame.load::<1>(9) != Some([ip::PROTO_UDP]) {
                return Verdict::NotMesh;
            }
            // Later fragments carry no UDP header; leave them to the stack's reassembly. A first
            // fragment is judged by its port, then passed whole (`fragment`).
            let Some(frag) = be16(frame, 6) else {
                return Verdict::NotMesh;
            };
            if frag & 0x1fff != 0 {
                return Verdict::NotMesh;
            }
            fragment = frag & 0x2000 != 0;
            let ihl = ((ver_ihl & 0x0f) as usize) * 4;
            if ihl < IPV4_MIN_HDR_LEN {
                return Verdict::NotMesh;
            }
            let Some(saddr) = frame.load::<4>(12) else {
                return Verdict::NotMesh;
            };
            source[10] = 0xff;
            source[11] = 0xff;
            source[12..].copy_from_slice(&saddr);
            ihl
        }
        Some(ETH_P_IPV6) => {
            let Some(saddr) = frame.load::<16>(8) else {
                return Verdict::NotMesh;
            };
            source = saddr;
            match udp_after_extension_headers(frame) {
                Ipv6Transport::Udp { offset, first_fragment } => {
                    fragment = first_fragment;
                    offset
                }
                Ipv6Transport::Other => return Verdict::NotMesh,
                Ipv6Transport::TooManyHeaders => return Verdict::Datagram(ShieldReason::Malformed),
            }
        }
        _ => return Verdict::NotMesh,
    };
    let Some(dst_port) = be16(frame, udp + 2) else {
        return Verdict::NotMesh;
    };
    if dst_port != u16::from_be(MESH_PORT_BE.load()) {
        return Verdict::NotMesh;
    }
    if fragment {
        return Verdict::Datagram(ShieldReason::Fragment);
    }
    // The UDP length covers every segment of a super-datagram (the kernel sets it so for GSO
    // sends and GRO merges alike); the frame must hold all of it.
    let Some(udp_len) = be16(frame, udp + 4) else {
        return Verdict::Datagram(ShieldReason::Malformed);
    };
    let udp_len = udp_len as usize;
    if udp_len < UDP_HDR_LEN || frame.load::<1>(udp + udp_len - 1).is_none() {
        return Verdict::Datagram(ShieldReason::Malformed);
    }
    frame.judge_payload(source, udp + UDP_HDR_LEN, udp_len - UDP_HDR_LEN)
}

/// A TC frame's judgement in progress, read and written by each [`judge_segment`] call. It
/// lives in a per-CPU map rather than on the stack: the verifier then checks the callback once,
/// where stack contents that differ by parsing path (header offsets, IPv4 or IPv6) would make it
/// check the callback again for each.
struct Segments {
    source: [u8; 16],
    /// Offset of the first segment's payload.
    payload: usize,
    /// Payload bytes of all segments.
    total: usize,
    /// Payload bytes of each segment but a shorter last.
    size: usize,
    /// Segments that passed, as datagrams (`Passed`) and as STUN answers (`Stun`).
    passed: u64,
    stun: u64,
    /// The first refusal (`ShieldReason` + 1; 0 for none).
    refused: u32,
}

#[btf_map]
static SEGMENTS: PerCpuArray<Segments, 1> = PerCpuArray::new();

/// What the callback gets on the stack: the frame (a context pointer cannot live in a map).
#[repr(C)]
struct LoopContext {
    skb: *mut __sk_buff,
}

/// Judge each `size`-byte segment (a shorter last) of the `total` payload bytes at `payload` of
/// a TC frame; count them all. One datagram is one segment (`size == total`; an empty one too).
#[inline(always)]
fn judge_segments(frame: &TcContext, source: [u8; 16], payload: usize, total: usize, size: usize) -> Verdict {
    // `checked_div_ceil` is not stable; an explicit test keeps the division's panic path out.
    let segments = if size == 0 { 1 } else { total.div_ceil(size).max(1) };
    if segments > MAX_SEGMENTS {
        count(ShieldReason::Malformed, 1);
        return Verdict::Counted(ShieldReason::Malformed);
    }
    let Some(state) = SEGMENTS.get_ptr_mut(0) else {
        return Verdict::NotMesh;
    };
    // SAFETY: this CPU's slot of the per-CPU map, ours for the run (no preemption).
    unsafe {
        *state = Segments {
            source,
            payload,
            total,
            size,
            passed: 0,
            stun: 0,
            refused: 0,
        }
    };
    let mut context = LoopContext {
        skb: frame.as_ptr().cast(),
    };
    // SAFETY: `judge_segment` has the callback signature bpf_loop expects and reads `context`
    // as the `LoopContext` it is, which outlives the call.
    unsafe {
        bpf_loop(
            segments as u32,
            judge_segment as *mut c_void,
            (&mut context as *mut LoopContext).cast(),
            0,
        )
    };
    // SAFETY: as above; the callbacks have returned.
    let (refused, passed, stun) = unsafe { ((*state).refused, (*state).passed, (*state).stun) };
    match ShieldReason::from_index(refused.wrapping_sub(1)) {
        Some(reason) => {
            count(reason, segments as u64);
            Verdict::Counted(reason)
        }
        None => {
            count(ShieldReason::Passed, passed);
            count(ShieldReason::Stun, stun);
            Verdict::Counted(ShieldReason::Passed)
        }
    }
}

/// `bpf_loop` callback: judge segment `i`; 1 stops the loop at the first refusal.
extern "C" fn judge_segment(i: u64, context: *mut c_void) -> i64 {
    // SAFETY: `judge_segments` passes its `LoopContext`, live for the whole loop.
    let Some(skb) = NonNull::new(unsafe { (*(context as *mut LoopContext)).skb }) else {
        return 1;
    };
    let Some(state) = SEGMENTS.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, filled by `judge_segments` before the loop began.
    let state = unsafe { &mut *state };
    let frame = TcContext::new(skb);
    let start = (i as usize) * state.size;
    let len = core::cmp::min(state.size, state.total.saturating_sub(start));
    let reason = judge_datagram(&frame, state.source, state.payload + start, len);
    match reason {
        ShieldReason::Passed => state.passed += 1,
        ShieldReason::Stun => state.stun += 1,
        refused => {
            state.refused = refused as u32 + 1;
            return 1;
        }
    }
    0
}

/// Judge the datagram of `len` bytes at `payload` from `source`.
#[inline(always)]
fn judge_datagram<F: Frame>(frame: &F, source: [u8; 16], payload: usize, len: usize) -> ShieldReason {
    if len < 4 {
        return ShieldReason::TooShort;
    }
    let Some(header) = frame.load::<4>(payload) else {
        return ShieldReason::Malformed;
    };
    // STUN answers to the requests the daemon sends from this port (to learn its public
    // address) share it with the mesh protocol; told apart by their first 8 bytes.
    if len >= 8
        && let Some(head) = frame.load::<8>(payload)
        && wire::is_stun_response(head, len)
    {
        if !within_budget(frame, source, BUDGET_STUN) {
            return ShieldReason::StunRateLimited;
        }
        return ShieldReason::Stun;
    }
    let [msg_type, r1, r2, r3] = header;
    if r1 | r2 | r3 != 0 || !(wire::MSG_INITIATION..=wire::MSG_DATA).contains(&msg_type) {
        return ShieldReason::BadType;
    }
    if !wire::valid_len(msg_type, len) {
        return ShieldReason::BadLength;
    }
    match msg_type {
        wire::MSG_DATA => {
            let Some(index) = frame.load::<4>(payload + 4) else {
                return ShieldReason::Malformed;
            };
            let index = u32::from_le_bytes(index);
            // SAFETY: the value is a plain u8 and is only tested for presence.
            if unsafe { KNOWN_INDICES.get(&index) }.is_none() && !within_budget(frame, source, BUDGET_UNKNOWN_INDEX) {
                return ShieldReason::UnknownIndex;
            }
        }
        wire::MSG_INITIATION => {
            if !mac1_ok::<F, { wire::INITIATION_LEN - 32 }>(frame, payload) {
                return ShieldReason::BadMac;
            }
            if blocked(source) {
                return ShieldReason::RateLimited;
            }
        }
        wire::MSG_RESPONSE => {
            if !mac1_ok::<F, { wire::RESPONSE_LEN - 32 }>(frame, payload) {
                return ShieldReason::BadMac;
            }
        }
        _ => {}
    }
    ShieldReason::Passed
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
fn udp_after_extension_headers<F: Frame>(frame: &F) -> Ipv6Transport {
    let Some([mut next]) = frame.load::<1>(6) else {
        return Ipv6Transport::Other;
    };
    let mut offset = IPV6_HDR_LEN;
    let mut first_fragment = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if next == ip::PROTO_UDP {
            return Ipv6Transport::Udp { offset, first_fragment };
        }
        // Every extension header is at least 8 bytes; its first four are all we read.
        let Some([following, len, frag_hi, frag_lo]) = frame.load::<4>(offset) else {
            return Ipv6Transport::Other;
        };
        if frame.load::<1>(offset + 7).is_none() {
            return Ipv6Transport::Other;
        }
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
fn mac1_ok<F: Frame, const COVERED: usize>(frame: &F, payload: usize) -> bool {
    const { assert!(COVERED <= 2 * blake2s::BLOCK) };
    let Some(mac) = frame.load::<16>(payload + COVERED) else {
        return false;
    };
    let Some(scratch) = MAC1_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of the per-CPU scratch map, ours for the run (no preemption).
    let scratch = unsafe { &mut *scratch };
    // SAFETY: the buffer holds 128 ≥ COVERED bytes (asserted above), so its first COVERED bytes
    // are an array of that size.
    let covered = unsafe { &mut *(scratch.msg.as_mut_ptr() as *mut [u8; COVERED]) };
    if !frame.copy(payload, covered) {
        return false;
    }
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
fn within_budget<F: Frame>(frame: &F, source: [u8; 16], kind: u32) -> bool {
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
                say_out_of_budget(frame, source, kind, now);
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
fn say_out_of_budget<F: Frame>(frame: &F, source: [u8; 16], kind: u32, now: u64) {
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
        frame,
        "{} shield: {:i} ran out of its {} budget; what it sends beyond it is dropped",
        F::HOOK,
        source,
        what
    );
}
