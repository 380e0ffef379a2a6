//! The underlay shield on the underlay interfaces: XDP in the driver where that is cheap, TC
//! ingress on veth and where the driver has no native XDP (see [`Hook`]).
//!
//! Its maps are pinned under `/sys/fs/bpf/tunnelmesh/<interface>/` (`shield_counters`,
//! `known_indices`, `source_budgets`, `blocked_sources`; BTF-described, so `bpftool map dump
//! pinned …` prints them); both programs share them. The slow path keeps `known_indices` equal
//! to the live session indices and writes `blocked_sources` through [`IndexMirror`]. The
//! programs check handshakes' mac1 under this node's key, set at load ([`load_shield`]).
//! Dropping [`Shield`] detaches the programs and removes the pins. If eBPF cannot be loaded the
//! daemon keeps running: the same header checks run in userspace on every datagram.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use serde::{Deserialize, Serialize};
use tracing::warn;
use tunnelmesh_common::{
    blake2s,
    shield::{
        BLOCKED_SOURCES_MAP, KNOWN_INDICES_MAP, SHIELD_COUNTERS_MAP, SHIELD_MAC1_GLOBAL, SHIELD_PORT_GLOBAL,
        SHIELD_PROGRAM, SHIELD_TC_PROGRAM, SOURCE_BUDGETS_MAP, ShieldReason,
    },
};

use aya_log::EbpfLogger;

use super::{
    FastpathError, Pins,
    kernel_log::{KernelLog, ToTracing},
    loader,
};
use crate::{device::IndexMirror, netconf::Link};

/// Where the shield judges an interface's datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// XDP in the driver: each wire frame, before the kernel builds an skb for it.
    Xdp,
    /// XDP in generic (skb) mode, only when `shield_hook = "xdp"` is asked of a driver without
    /// native XDP: after GRO, and every skb copied.
    XdpGeneric,
    /// TC ingress (TCX; clsact before Linux 6.6): after GRO, a UDP super-datagram judged segment
    /// by segment and passed or dropped whole.
    Tc,
}

impl Hook {
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::XdpGeneric => "xdp-generic",
            Hook::Tc => "tc",
        }
    }
}

/// Which hook the shield takes (`shield_hook` in `[interface]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookChoice {
    /// XDP in the driver, except on veth (driver-mode XDP there turns off the peer's GSO and
    /// copies every skb) and where the driver has no native XDP: TC there.
    #[default]
    Auto,
    /// XDP on every interface: in the driver, or generic where the driver has none.
    Xdp,
    /// TC ingress on every interface.
    Tc,
}

/// Load the object with the mesh port and the mac1 key of the node whose Noise public key is
/// `public` set, both shield programs loaded but not attached; its log ring read into `logger`.
pub fn load_shield<L: log::Log>(
    port: u16,
    public: &[u8; 32],
    logger: L,
) -> Result<(Ebpf, EbpfLogger<L>), FastpathError> {
    let port_be = port.to_be();
    let midstate = blake2s::keyed_midstate(&crate::protocol::noise::mac1_key(public));
    let mut ebpf = loader(&super::SHIELD_MAPS)
        .override_global(SHIELD_PORT_GLOBAL, &port_be, true)
        .override_global(SHIELD_MAC1_GLOBAL, &midstate, true)
        .load(super::EBPF_OBJECT)?;
    let logger = super::kernel_log::take(&mut ebpf, logger)?;
    let failed = |program, source| FastpathError::Program {
        program,
        interface: "(load)".into(),
        source,
    };
    xdp_program(&mut ebpf).load().map_err(|e| failed("XDP shield", e))?;
    tc_program(&mut ebpf).load().map_err(|e| failed("TC shield", e))?;
    Ok((ebpf, logger))
}

/// The XDP shield program of a loaded object.
pub fn xdp_program(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(SHIELD_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .expect("the embedded object contains the XDP shield")
}

/// The TC shield program of a loaded object.
pub fn tc_program(ebpf: &mut Ebpf) -> &mut SchedClassifier {
    ebpf.program_mut(SHIELD_TC_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .expect("the embedded object contains the TC shield")
}

/// Sum the per-CPU shield counters of a loaded object.
pub fn shield_counters(ebpf: &Ebpf) -> Result<Vec<(ShieldReason, u64)>, FastpathError> {
    let map = ebpf
        .map(SHIELD_COUNTERS_MAP)
        .expect("the embedded object has the counter map");
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    ShieldReason::ALL
        .iter()
        .map(|&r| Ok((r, counters.get(&(r as u32), 0)?.iter().sum())))
        .collect()
}

/// The shield attached to underlay interfaces.
pub struct Shield {
    known_indices: HashMap<MapData, u32, u8>,
    blocked: HashMap<MapData, [u8; 16], u64>,
    /// Each guarded interface with the hook its shield runs at.
    pub hooks: Vec<(String, Hook)>,
    _log: KernelLog,
    // Dropped before `ebpf`: the pins go, then the programs detach with their links.
    _pins: Pins,
    ebpf: Ebpf,
}

/// Pinned maps, by map name and pin file name.
const PINS: [(&str, &str); 4] = [
    (SHIELD_COUNTERS_MAP, "shield_counters"),
    (KNOWN_INDICES_MAP, "known_indices"),
    (SOURCE_BUDGETS_MAP, "source_budgets"),
    (BLOCKED_SOURCES_MAP, "blocked_sources"),
];

impl Shield {
    /// Attach the shield for `port` and the node whose Noise public key is `public` to
    /// `interfaces` (those that are Ethernet links: the programs parse an Ethernet header), at
    /// the hooks `choice` picks, pinning its maps under `PIN_ROOT/<mesh_interface>/`.
    pub fn attach(
        port: u16,
        public: &[u8; 32],
        interfaces: &[Link],
        choice: HookChoice,
        mesh_interface: &str,
    ) -> Result<Self, FastpathError> {
        let (mut ebpf, log) = load_shield(port, public, ToTracing("shield"))?;
        let mut hooks = Vec::with_capacity(interfaces.len());
        for link in interfaces {
            if !link.ethernet {
                warn!(
                    interface = %link.name,
                    "not an Ethernet link: the shield does not guard it; the daemon checks what arrives on it itself"
                );
                continue;
            }
            let hook = attach_to(&mut ebpf, link, choice).map_err(|(program, source)| FastpathError::Program {
                program,
                interface: link.name.clone(),
                source,
            })?;
            hooks.push((link.name.clone(), hook));
        }
        let pins = Pins::create(&ebpf, mesh_interface, &PINS)?;
        let known_indices = HashMap::try_from(ebpf.take_map(KNOWN_INDICES_MAP).expect("the object has the index map"))?;
        let blocked = blocked_sources(&mut ebpf)?;
        Ok(Shield {
            known_indices,
            blocked,
            hooks,
            _log: KernelLog::drain(log)?,
            _pins: pins,
            ebpf,
        })
    }

    /// Per-reason counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(ShieldReason, u64)>, FastpathError> {
        shield_counters(&self.ebpf)
    }
}

/// Attach a loaded shield to `link` at the hook `choice` picks for it.
fn attach_to(
    ebpf: &mut Ebpf,
    link: &Link,
    choice: HookChoice,
) -> Result<Hook, (&'static str, aya::programs::ProgramError)> {
    let name = std::ffi::CString::new(link.name.as_str()).expect("interface names have no NUL");
    let name = name.as_c_str();
    let driver_xdp = match choice {
        HookChoice::Tc => false,
        HookChoice::Auto => !link.veth,
        HookChoice::Xdp => true,
    };
    if driver_xdp && xdp_program(ebpf).attach(name, XdpMode::Driver).is_ok() {
        return Ok(Hook::Xdp);
    }
    if choice == HookChoice::Xdp {
        xdp_program(ebpf)
            .attach(name, XdpMode::Skb)
            .map_err(|e| ("XDP shield", e))?;
        return Ok(Hook::XdpGeneric);
    }
    let program = tc_program(ebpf);
    if program.attach(name, TcAttachType::Ingress).is_err() {
        // Kernels before 6.6 (no TCX) attach through a clsact qdisc.
        let _ = tc::qdisc_add_clsact(name);
        program
            .attach(name, TcAttachType::Ingress)
            .map_err(|e| ("TC shield", e))?;
    }
    Ok(Hook::Tc)
}

/// Take the map of blocked sources out of a loaded object.
pub fn blocked_sources(ebpf: &mut Ebpf) -> Result<HashMap<MapData, [u8; 16], u64>, FastpathError> {
    let map = ebpf
        .take_map(BLOCKED_SOURCES_MAP)
        .expect("the object has the blocked-sources map");
    Ok(HashMap::try_from(map)?)
}

/// Block `source`'s initiations for `period` in the shield's map.
pub fn block_source(
    map: &mut HashMap<MapData, [u8; 16], u64>,
    source: IpAddr,
    period: Duration,
) -> Result<(), FastpathError> {
    let key = crate::protocol::ip::budget_key(source);
    let until = crate::sys::clock::monotonic_ns() + period.as_nanos() as u64;
    map.insert(&key, &until, 0)?;
    Ok(())
}

/// The shield as the daemon holds it: attached, or the reason it is not.
pub type SharedShield = Arc<Mutex<Result<Shield, String>>>;

impl IndexMirror for SharedShield {
    fn insert(&self, index: u32) {
        if let Ok(shield) = crate::sync::lock(self).as_mut()
            && let Err(e) = shield.known_indices.insert(&index, &1, 0)
        {
            warn!("the XDP shield could not learn receiver index {index:#x}: {e}; its data will be dropped");
        }
    }

    fn remove(&self, index: u32) {
        if let Ok(shield) = crate::sync::lock(self).as_mut() {
            let _ = shield.known_indices.remove(&index);
        }
    }

    fn block(&self, source: IpAddr, period: Duration) {
        if let Ok(shield) = crate::sync::lock(self).as_mut()
            && let Err(e) = block_source(&mut shield.blocked, source, period)
        {
            warn!("the XDP shield could not block {source}: {e}; the daemon drops its initiations itself");
        }
    }
}

/// The shield run on frames through BPF_PROG_TEST_RUN (root, CAP_BPF), for the tests and the
/// differential fuzz target that holds both programs against the userspace classifier.
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing {
    use aya::{
        Ebpf,
        programs::{TestRun, TestRunOptions},
    };

    use super::{Hook, tc_program, xdp_program};

    /// The two programs: the same judgement, read through XDP's and TC's context.
    pub const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

    /// What a program did with a frame.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Action {
        Pass,
        Drop,
    }
    pub use Action::{Drop as DROP, Pass as PASS};

    /// `enum xdp_action` and TC action values.
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    const TC_ACT_OK: u32 = 0;
    const TC_ACT_SHOT: u32 = 2;
    /// `struct __sk_buff`: its size and where `gso_size` sits (BPF_PROG_TEST_RUN takes it in).
    const SK_BUFF_LEN: usize = 192;
    const SK_BUFF_GSO_SIZE: usize = 176;

    /// A UDP/IPv4 frame from `src` to port `dst_port` carrying `payload`.
    pub fn frame_v4_from(src: [u8; 4], dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let total = 20 + 8 + payload.len();
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&dst_port.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// A UDP/IPv6 frame from `src` to port `dst_port` carrying `payload`.
    pub fn frame_v6_from(src: [u8; 16], dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        ip[6] = 17;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&dst_port.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// A UDP/IPv6 frame from `src` to port `dst_port` carrying `payload` after extension
    /// headers: each `(type, body)` becomes a header of that type whose next-header byte names
    /// the one after it (the body is the header's bytes after the next-header byte, padded to
    /// its length unit).
    pub fn frame_v6_through(
        src: [u8; 16],
        headers: &[(u8, Vec<u8>)],
        next: u8,
        dst_port: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let plain = frame_v6_from(src, dst_port, payload);
        let (eth_ip, udp) = plain.split_at(14 + 40);
        let mut chain = Vec::new();
        for (i, (_, body)) in headers.iter().enumerate() {
            let following = headers.get(i + 1).map_or(next, |h| h.0);
            chain.push(following);
            chain.extend_from_slice(body);
        }
        let mut f = eth_ip.to_vec();
        f[14 + 6] = headers.first().map_or(next, |h| h.0);
        let payload_len = (chain.len() + udp.len()) as u16;
        f[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
        f.extend_from_slice(&chain);
        f.extend_from_slice(udp);
        f
    }

    /// A destination-options header body (8 bytes: length 0, a PadN option).
    pub fn dest_opts() -> Vec<u8> {
        vec![0, 1, 4, 0, 0, 0, 0]
    }

    /// A fragment header body at fragment `offset` (8-byte units), `more` to follow.
    pub fn fragment_header(offset: u16, more: bool) -> Vec<u8> {
        let field = (offset << 3) | more as u16;
        let mut h = vec![0];
        h.extend_from_slice(&field.to_be_bytes());
        h.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        h
    }

    /// `frame` (IPv4) as a fragment: `offset` in 8-byte units, `more` to follow, the IP length
    /// cut to what the frame keeps after `keep` bytes of IP payload.
    pub fn fragment_v4(mut frame: Vec<u8>, offset: u16, more: bool, keep: usize) -> Vec<u8> {
        let field = offset | if more { 0x2000 } else { 0 };
        frame[14 + 6..14 + 8].copy_from_slice(&field.to_be_bytes());
        frame.truncate(14 + 20 + keep);
        frame[14 + 2..14 + 4].copy_from_slice(&((20 + keep) as u16).to_be_bytes());
        frame
    }

    /// What the shield program at `hook` does with `frame`.
    pub fn run(ebpf: &mut Ebpf, hook: Hook, frame: &[u8]) -> Action {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let ran = match hook {
            Hook::Xdp | Hook::XdpGeneric => xdp_program(ebpf).test_run(opts),
            Hook::Tc => tc_program(ebpf).test_run(opts),
        };
        let value = ran.expect("BPF_PROG_TEST_RUN must work (run as root)").return_value;
        match (hook, value) {
            (Hook::Tc, TC_ACT_OK) | (Hook::Xdp | Hook::XdpGeneric, XDP_PASS) => Action::Pass,
            (Hook::Tc, TC_ACT_SHOT) | (Hook::Xdp | Hook::XdpGeneric, XDP_DROP) => Action::Drop,
            (hook, other) => panic!("the {hook:?} shield returned {other}"),
        }
    }

    /// What the TC shield does with `frame` as a super-datagram of `segment_size`-byte segments
    /// (the skb's `gso_size`, as UDP GSO and GRO leave it).
    pub fn run_super_datagram(ebpf: &mut Ebpf, frame: &[u8], segment_size: u16) -> Action {
        let mut skb = [0u8; SK_BUFF_LEN];
        skb[SK_BUFF_GSO_SIZE..SK_BUFF_GSO_SIZE + 4].copy_from_slice(&u32::from(segment_size).to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&skb),
            ..Default::default()
        };
        let value = tc_program(ebpf)
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN must work (run as root)")
            .return_value;
        match value {
            TC_ACT_OK => Action::Pass,
            TC_ACT_SHOT => Action::Drop,
            other => panic!("the TC shield returned {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The shield run on crafted frames through BPF_PROG_TEST_RUN. Needs root (CAP_BPF); under
    //! CI these tests fail rather than skip when the kernel refuses.
    use super::testing::*;
    use super::*;
    use crate::fastpath::kernel_log::Captured;
    use tunnelmesh_common::wire;

    const PORT: u16 = 51820;
    /// The Noise public key of the node the shield guards (its mac1 key).
    const LOCAL: [u8; 32] = [0x42; 32];

    fn frame_v4(dst_port: u16, payload: &[u8]) -> Vec<u8> {
        frame_v4_from([198, 18, 0, 1], dst_port, payload)
    }

    fn frame_v6(dst_port: u16, payload: &[u8]) -> Vec<u8> {
        frame_v6_from([0; 16], dst_port, payload)
    }

    fn message(msg_type: u8, len: usize) -> Vec<u8> {
        let mut m = vec![0u8; len];
        if len > 0 {
            m[0] = msg_type;
        }
        m
    }

    fn counts(ebpf: &Ebpf) -> std::collections::HashMap<ShieldReason, u64> {
        shield_counters(ebpf).unwrap().into_iter().collect()
    }

    /// How the program at `hook` names itself in the log.
    fn hook_name(hook: Hook) -> &'static str {
        match hook {
            Hook::Tc => "TC",
            Hook::Xdp | Hook::XdpGeneric => "XDP",
        }
    }

    /// Load the shield with receiver index 0 (the index of the crafted data messages) known.
    fn shield_knowing_index_zero() -> Ebpf {
        shield_knowing_index_zero_logging().0
    }

    /// The same, with what its program logs.
    fn shield_knowing_index_zero_logging() -> (Ebpf, EbpfLogger<Captured>, Captured) {
        let captured = Captured::default();
        let (mut ebpf, logger) = load_shield(PORT, &LOCAL, captured.clone())
            .expect("the shield must load (run as root on a BPF-capable kernel)");
        let mut known: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(ebpf.map_mut(KNOWN_INDICES_MAP).expect("index map")).unwrap();
        known.insert(&0, &1, 0).unwrap();
        (ebpf, logger, captured)
    }

    fn data_for(index: u32) -> Vec<u8> {
        let mut m = message(wire::MSG_DATA, 48);
        m[4..8].copy_from_slice(&index.to_le_bytes());
        m
    }

    #[test]
    fn data_for_an_unknown_index_is_dropped_but_sampled_once_a_second_per_source() {
        for hook in HOOKS {
            let mut ebpf = shield_knowing_index_zero();
            assert_eq!(run(&mut ebpf, hook, &frame_v4(PORT, &data_for(0))), PASS, "known index");
            let stranger = |ebpf: &mut Ebpf, src| run(ebpf, hook, &frame_v4_from(src, PORT, &data_for(0xdead_beef)));
            assert_eq!(
                stranger(&mut ebpf, [198, 18, 0, 7]),
                PASS,
                "first unknown-index message from a source goes up"
            );
            for _ in 0..10 {
                assert_eq!(stranger(&mut ebpf, [198, 18, 0, 7]), DROP);
            }
            assert_eq!(stranger(&mut ebpf, [198, 18, 0, 8]), PASS, "budgets are per source");
            let c = counts(&ebpf);
            assert_eq!((c[&ShieldReason::UnknownIndex], c[&ShieldReason::Passed]), (10, 3));
        }
    }

    /// The shield says when it judges its first datagram and when a source's budget first
    /// refuses it; never per packet, and of many sources running out at once, one a second.
    #[test]
    fn the_shield_logs_its_first_verdict_and_a_sources_first_refusal_once() {
        for hook in HOOKS {
            let (mut ebpf, mut logger, captured) = shield_knowing_index_zero_logging();
            for _ in 0..3 {
                assert_eq!(run(&mut ebpf, hook, &frame_v4(PORT, &data_for(0))), PASS);
            }
            let lines = captured.lines(&mut logger);
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(
                lines[0].starts_with(&format!(
                    "{} shield: judging mesh datagrams (the first on ifindex ",
                    hook_name(hook)
                )) && lines[0].ends_with(": passed)"),
                "{lines:?}"
            );
            let stranger = |ebpf: &mut Ebpf, src| run(ebpf, hook, &frame_v4_from(src, PORT, &data_for(0xdead_beef)));
            for _ in 0..20 {
                stranger(&mut ebpf, [198, 18, 0, 7]);
            }
            let lines = captured.lines(&mut logger);
            assert_eq!(lines.len(), 2, "{lines:?}");
            assert_eq!(
                lines[1],
                format!(
                    "{} shield: ::ffff:198.18.0.7 ran out of its unknown-index budget; what it sends beyond it is dropped",
                    hook_name(hook)
                )
            );
            // Another source running out within the second is not said (its refusals are counted).
            for _ in 0..5 {
                stranger(&mut ebpf, [198, 18, 0, 8]);
            }
            assert_eq!(captured.lines(&mut logger).len(), 2);
            assert_eq!(counts(&ebpf)[&ShieldReason::UnknownIndex], 19 + 4);
        }
    }

    /// A handshake message of `msg_type` at its length with this node's mac1 (`signed`) or
    /// another node's.
    fn handshake(msg_type: u8, signed: bool) -> Vec<u8> {
        let len = if msg_type == wire::MSG_INITIATION {
            wire::INITIATION_LEN
        } else {
            wire::RESPONSE_LEN
        };
        let mut m = message(msg_type, len);
        m[8..40].fill(0x5a);
        let to = if signed { LOCAL } else { [0x77; 32] };
        crate::protocol::noise::CookieJar::new(&to).stamp(&mut m, std::time::Instant::now());
        m
    }

    /// The finding this replaces: initiations were charged before any mac1 check, so forged
    /// ones from a peer's address spent its budget and its real handshakes were dropped.
    #[test]
    fn only_handshakes_with_our_mac1_pass_and_forged_ones_charge_nobody() {
        for hook in HOOKS {
            let mut ebpf = shield_knowing_index_zero();
            let peer = [198, 18, 0, 9];
            for _ in 0..200 {
                let forged = run(
                    &mut ebpf,
                    hook,
                    &frame_v4_from(peer, PORT, &handshake(wire::MSG_INITIATION, false)),
                );
                assert_eq!(forged, DROP);
            }
            assert_eq!(
                run(
                    &mut ebpf,
                    hook,
                    &frame_v4_from(peer, PORT, &handshake(wire::MSG_RESPONSE, false))
                ),
                DROP,
                "a response under another key"
            );
            // The peer's real initiations all pass: nothing was charged, and the shield limits no
            // source by itself (the daemon blocks proven sources that overspend under load).
            for _ in 0..40 {
                let real = run(
                    &mut ebpf,
                    hook,
                    &frame_v4_from(peer, PORT, &handshake(wire::MSG_INITIATION, true)),
                );
                assert_eq!(real, PASS);
            }
            assert_eq!(
                run(
                    &mut ebpf,
                    hook,
                    &frame_v6_from([0xfd; 16], PORT, &handshake(wire::MSG_RESPONSE, true))
                ),
                PASS
            );
            let c = counts(&ebpf);
            assert_eq!((c[&ShieldReason::BadMac], c[&ShieldReason::Passed]), (201, 41));
            assert_eq!(c[&ShieldReason::RateLimited], 0);
        }
    }

    #[test]
    fn a_blocked_source_loses_its_initiations_for_the_period_and_ipv6_is_blocked_by_its_64() {
        for hook in HOOKS {
            let mut ebpf = shield_knowing_index_zero();
            let mut blocked = blocked_sources(&mut ebpf).unwrap();
            let initiation = handshake(wire::MSG_INITIATION, true);
            let in_64 = |host: u8| {
                let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
                a[15] = host;
                a
            };
            block_source(
                &mut blocked,
                std::net::Ipv6Addr::from(in_64(5)).into(),
                Duration::from_millis(500),
            )
            .unwrap();
            block_source(
                &mut blocked,
                std::net::Ipv4Addr::new(198, 18, 0, 9).into(),
                Duration::from_millis(500),
            )
            .unwrap();
            for host in [5, 6, 200] {
                assert_eq!(
                    run(&mut ebpf, hook, &frame_v6_from(in_64(host), PORT, &initiation)),
                    DROP,
                    "host {host} of the /64"
                );
            }
            assert_eq!(
                run(&mut ebpf, hook, &frame_v4_from([198, 18, 0, 9], PORT, &initiation)),
                DROP
            );
            let mut other_64 = in_64(5);
            other_64[7] = 2;
            assert_eq!(
                run(&mut ebpf, hook, &frame_v6_from(other_64, PORT, &initiation)),
                PASS,
                "another /64"
            );
            assert_eq!(
                run(&mut ebpf, hook, &frame_v4_from([198, 18, 0, 10], PORT, &initiation)),
                PASS
            );
            assert_eq!(
                run(&mut ebpf, hook, &frame_v4_from([198, 18, 0, 9], PORT, &data_for(0))),
                PASS,
                "only initiations are blocked"
            );
            assert_eq!(counts(&ebpf)[&ShieldReason::RateLimited], 4);
            std::thread::sleep(Duration::from_millis(600));
            assert_eq!(
                run(&mut ebpf, hook, &frame_v6_from(in_64(5), PORT, &initiation)),
                PASS,
                "the block ended"
            );
        }
    }

    /// IPv4 first fragments used to fail the UDP length check and be dropped (TCP in the tunnel
    /// stalled on a path MTU below ~1480); IPv6 extension headers skipped the shield.
    #[test]
    fn fragments_pass_to_the_stack_and_ipv6_extension_headers_are_walked() {
        for hook in HOOKS {
            let mut ebpf = shield_knowing_index_zero();
            let src = [0xfd; 16];
            let junk = message(9, 64);
            let keepalive = message(wire::MSG_DATA, 32);
            let big = message(wire::MSG_DATA, 32 + 1424);
            let (pass, drop) = (PASS, DROP);
            let cases: Vec<(&str, Vec<u8>, Action)> = vec![
                (
                    "v4 first fragment",
                    fragment_v4(frame_v4(PORT, &big), 0, true, 1376),
                    pass,
                ),
                (
                    "v4 later fragment",
                    fragment_v4(frame_v4(PORT, &big), 172, false, 88),
                    pass,
                ),
                ("v4 whole datagram of junk", frame_v4(PORT, &junk), drop),
                (
                    "v6 junk behind destination options",
                    frame_v6_through(src, &[(60, dest_opts())], 17, PORT, &junk),
                    drop,
                ),
                (
                    "v6 keepalive behind hop-by-hop and destination options",
                    frame_v6_through(src, &[(0, dest_opts()), (60, dest_opts())], 17, PORT, &keepalive),
                    pass,
                ),
                (
                    "v6 first fragment",
                    frame_v6_through(src, &[(44, fragment_header(0, true))], 17, PORT, &junk),
                    pass,
                ),
                (
                    "v6 later fragment",
                    frame_v6_through(src, &[(44, fragment_header(100, false))], 17, PORT, &junk),
                    pass,
                ),
                (
                    "v6 junk in an atomic fragment (offset 0, no more)",
                    frame_v6_through(src, &[(44, fragment_header(0, false))], 17, PORT, &junk),
                    drop,
                ),
                (
                    "v6 more extension headers than RFC 8200 allows",
                    frame_v6_through(src, &vec![(60, dest_opts()); 9], 17, PORT, &keepalive),
                    drop,
                ),
                (
                    "v6 TCP behind destination options is not ours",
                    frame_v6_through(src, &[(60, dest_opts())], 6, PORT, &junk),
                    pass,
                ),
                (
                    "v6 junk to another port behind destination options",
                    frame_v6_through(src, &[(60, dest_opts())], 17, 53, &junk),
                    pass,
                ),
            ];
            for (name, frame, expected) in &cases {
                assert_eq!(run(&mut ebpf, hook, frame), *expected, "{name}");
            }
            let c = counts(&ebpf);
            assert_eq!(c[&ShieldReason::Fragment], 2, "the two first fragments");
            assert_eq!(c[&ShieldReason::BadType], 3);
            assert_eq!(c[&ShieldReason::Malformed], 1);
            assert_eq!(c[&ShieldReason::Passed], 1);
        }
    }

    #[test]
    fn shield_passes_valid_messages_and_drops_impossible_ones_by_reason() {
        for hook in HOOKS {
            let mut ebpf = shield_knowing_index_zero();
            let (pass, drop) = (PASS, DROP);
            let cases: Vec<(&str, Vec<u8>, Action)> = vec![
                (
                    "initiation v4",
                    frame_v4(PORT, &handshake(wire::MSG_INITIATION, true)),
                    pass,
                ),
                (
                    "response v6",
                    frame_v6(PORT, &handshake(wire::MSG_RESPONSE, true)),
                    pass,
                ),
                (
                    "initiation for another node",
                    frame_v4(PORT, &handshake(wire::MSG_INITIATION, false)),
                    drop,
                ),
                (
                    "cookie reply",
                    frame_v4(PORT, &message(wire::MSG_COOKIE_REPLY, wire::COOKIE_REPLY_LEN)),
                    pass,
                ),
                ("keepalive", frame_v4(PORT, &message(wire::MSG_DATA, 32)), pass),
                ("data 1420", frame_v6(PORT, &message(wire::MSG_DATA, 32 + 1424)), pass),
                ("other port junk", frame_v4(53, b"xyz"), pass),
                ("empty", frame_v4(PORT, &[]), drop),
                ("three bytes", frame_v4(PORT, &[4, 0, 0]), drop),
                ("type 9", frame_v4(PORT, &message(9, 64)), drop),
                (
                    "reserved set",
                    frame_v6(PORT, &{
                        let mut m = message(wire::MSG_DATA, 48);
                        m[2] = 1;
                        m
                    }),
                    drop,
                ),
                (
                    "short initiation",
                    frame_v4(PORT, &message(wire::MSG_INITIATION, 147)),
                    drop,
                ),
                (
                    "data below keepalive size",
                    frame_v4(PORT, &message(wire::MSG_DATA, 31)),
                    drop,
                ),
                (
                    "unpadded data (boringtun does not pad)",
                    frame_v4(PORT, &message(wire::MSG_DATA, 41)),
                    pass,
                ),
                (
                    "truncated udp",
                    {
                        let mut f = frame_v4(PORT, &message(wire::MSG_DATA, 32));
                        f.truncate(14 + 20 + 8 + 10);
                        f
                    },
                    drop,
                ),
            ];
            for (name, frame, expected) in &cases {
                assert_eq!(run(&mut ebpf, hook, frame), *expected, "{name}");
            }
            let counters = counts(&ebpf);
            assert_eq!(counters[&ShieldReason::Passed], 6);
            assert_eq!(counters[&ShieldReason::TooShort], 2);
            assert_eq!(counters[&ShieldReason::BadType], 2);
            assert_eq!(counters[&ShieldReason::BadLength], 2);
            assert_eq!(counters[&ShieldReason::Malformed], 1);
            assert_eq!(counters[&ShieldReason::BadMac], 1);
        }
    }

    /// At TC a UDP GSO/GRO super-datagram arrives as one skb: each segment is judged as the
    /// datagram it is on the wire, and the whole passes only if every segment would.
    #[test]
    fn a_super_datagram_passes_only_if_every_segment_does_and_each_is_counted() {
        let mut ebpf = shield_knowing_index_zero();
        let glue = |segments: &[Vec<u8>]| segments.concat();
        let data = data_for(0);
        let mut short_last = data_for(0);
        short_last.truncate(40);
        let signed = handshake(wire::MSG_INITIATION, true);
        let forged = handshake(wire::MSG_INITIATION, false);
        let cookie = message(wire::MSG_COOKIE_REPLY, wire::COOKIE_REPLY_LEN);
        let mut data_64 = message(wire::MSG_DATA, 64);
        data_64[4..8].copy_from_slice(&0u32.to_le_bytes());
        // (what, UDP payload, segment size, action, reason counted, datagrams counted)
        type Case = (&'static str, Vec<u8>, usize, Action, ShieldReason, u64);
        let cases: Vec<Case> = vec![
            (
                "four data messages, the last shorter",
                glue(&[data.clone(), data.clone(), data.clone(), short_last]),
                48,
                PASS,
                ShieldReason::Passed,
                4,
            ),
            (
                "junk between data messages",
                glue(&[data.clone(), message(9, 48), data.clone()]),
                48,
                DROP,
                ShieldReason::BadType,
                3,
            ),
            (
                "a last segment too short for a header",
                glue(&[data.clone(), data.clone(), vec![4, 0, 0]]),
                48,
                DROP,
                ShieldReason::TooShort,
                3,
            ),
            (
                "two initiations with our mac1",
                glue(&[signed.clone(), signed.clone()]),
                wire::INITIATION_LEN,
                PASS,
                ShieldReason::Passed,
                2,
            ),
            (
                "a forged initiation after a real one",
                glue(&[signed, forged]),
                wire::INITIATION_LEN,
                DROP,
                ShieldReason::BadMac,
                2,
            ),
            (
                "a cookie reply merged with data of its size",
                glue(&[data_64.clone(), cookie, data_64]),
                wire::COOKIE_REPLY_LEN,
                PASS,
                ShieldReason::Passed,
                3,
            ),
            (
                "more segments than UDP GSO allows",
                vec![0; 200],
                1,
                DROP,
                ShieldReason::Malformed,
                1,
            ),
        ];
        for (name, payload, segment, expected, reason, datagrams) in cases {
            let before = counts(&ebpf);
            let frame = if name.contains("initiation") {
                frame_v6(PORT, &payload)
            } else {
                frame_v4(PORT, &payload)
            };
            assert_eq!(
                run_super_datagram(&mut ebpf, &frame, segment as u16),
                expected,
                "{name}"
            );
            let after = counts(&ebpf);
            let moved: Vec<(ShieldReason, u64)> = ShieldReason::ALL
                .iter()
                .map(|r| (*r, after[r] - before[r]))
                .filter(|(_, n)| *n > 0)
                .collect();
            assert_eq!(moved, [(reason, datagrams)], "{name}");
        }
        // The unknown-index sample still goes up once a second per source, segment or not.
        let stranger = data_for(0xdead_beef);
        let sampled = glue(&[data.clone(), stranger.clone()]);
        assert_eq!(run_super_datagram(&mut ebpf, &frame_v4(PORT, &sampled), 48), PASS);
        assert_eq!(run_super_datagram(&mut ebpf, &frame_v4(PORT, &sampled), 48), DROP);
        // Without a segment size the same bytes are one (long) data message.
        let glued = glue(&[data.clone(), message(9, 48)]);
        assert_eq!(run(&mut ebpf, Hook::Tc, &frame_v4(PORT, &glued)), PASS);
    }

    #[test]
    fn stun_responses_pass_within_their_sources_budget_and_lookalikes_do_not() {
        for hook in HOOKS {
            let mut ebpf = shield_knowing_index_zero();
            let response = crate::protocol::stun::binding_response([7; 12], "198.18.0.2:51820".parse().unwrap());
            let from = |src, msg: &[u8]| frame_v4_from(src, PORT, msg);
            assert_eq!(run(&mut ebpf, hook, &from([198, 18, 0, 1], &response)), PASS);
            let mut wrong_cookie = response.clone();
            wrong_cookie[5] ^= 1;
            let mut wrong_length = response.clone();
            wrong_length.push(0);
            let mut request = response.clone();
            request[1] = 0x01;
            request[0] = 0x00;
            for junk in [&wrong_cookie, &wrong_length, &request] {
                assert_eq!(run(&mut ebpf, hook, &from([198, 18, 0, 1], junk)), DROP);
            }
            // A burst of 10 per source, then one per 100 ms.
            let verdicts: Vec<Action> = (0..30)
                .map(|_| run(&mut ebpf, hook, &from([198, 18, 0, 3], &response)))
                .collect();
            let passed = verdicts.iter().filter(|&&v| v == PASS).count();
            assert!((10..=11).contains(&passed), "{passed} of 30 passed");
            let c = counts(&ebpf);
            assert_eq!(c[&ShieldReason::Stun], 1 + passed as u64);
            assert_eq!(c[&ShieldReason::StunRateLimited], 30 - passed as u64);
            assert_eq!(c[&ShieldReason::BadType], 3);
            assert_eq!(
                crate::protocol::wire::classify(&response),
                Ok(crate::protocol::wire::Kind::Stun)
            );
            for junk in [&wrong_cookie, &wrong_length, &request] {
                assert!(crate::protocol::wire::classify(junk).is_err());
            }
        }
    }

    #[test]
    fn the_shield_and_userspace_agree_on_every_message_size() {
        for hook in HOOKS {
            let mut ebpf = shield_knowing_index_zero();
            for msg_type in 0..=5u8 {
                for len in (0..200).chain([1436, 1452, 1456]) {
                    let mut msg = message(msg_type, len);
                    let handshake = matches!(
                        crate::protocol::wire::classify(&msg),
                        Ok(crate::protocol::wire::Kind::Initiation | crate::protocol::wire::Kind::Response)
                    );
                    if handshake {
                        // Userspace checks the mac after classifying; sign so both judge the size.
                        crate::protocol::noise::CookieJar::new(&LOCAL).stamp(&mut msg, std::time::Instant::now());
                    }
                    let kernel_passes = run(&mut ebpf, hook, &frame_v4(PORT, &msg)) == PASS;
                    assert_eq!(
                        kernel_passes,
                        crate::protocol::wire::classify(&msg).is_ok(),
                        "type {msg_type} len {len}"
                    );
                }
            }
        }
    }
}
