//! The XDP underlay shield on the underlay interfaces.
//!
//! Its maps are pinned under `/sys/fs/bpf/tunnelmesh/<interface>/` (`shield_counters`,
//! `known_indices`, `source_budgets`; BTF-described, so `bpftool map dump pinned …` prints them).
//! The slow path keeps `known_indices` equal to the live session indices through
//! [`IndexMirror`]. Dropping [`Shield`] detaches the program and removes the pins. If eBPF cannot
//! be loaded the daemon keeps running: the same header checks run in userspace on every datagram.

use std::sync::{Arc, Mutex};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use tracing::warn;
use tunnelmesh_common::shield::{
    KNOWN_INDICES_MAP, SHIELD_COUNTERS_MAP, SHIELD_PORT_GLOBAL, SHIELD_PROGRAM, SOURCE_BUDGETS_MAP, ShieldReason,
};

use super::{FastpathError, Pins, loader};
use crate::device::IndexMirror;

/// Load the object with the mesh port set, the shield program loaded but not attached.
pub fn load_shield(port: u16) -> Result<Ebpf, FastpathError> {
    let port_be = port.to_be();
    let mut ebpf = loader(&super::SHIELD_MAPS)
        .override_global(SHIELD_PORT_GLOBAL, &port_be, true)
        .load(super::EBPF_OBJECT)?;
    shield_program(&mut ebpf)
        .load()
        .map_err(|source| FastpathError::Program {
            program: "XDP shield",
            interface: "(load)".into(),
            source,
        })?;
    Ok(ebpf)
}

/// The shield program of a loaded object.
pub fn shield_program(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(SHIELD_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .expect("the embedded object contains the XDP shield")
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

/// The XDP shield attached to underlay interfaces.
pub struct Shield {
    known_indices: HashMap<MapData, u32, u8>,
    pub interfaces: Vec<String>,
    pub mode: &'static str,
    // Dropped before `ebpf`: the pins go, then the program detaches with its links.
    _pins: Pins,
    ebpf: Ebpf,
}

/// Pinned maps, by map name and pin file name.
const PINS: [(&str, &str); 3] = [
    (SHIELD_COUNTERS_MAP, "shield_counters"),
    (KNOWN_INDICES_MAP, "known_indices"),
    (SOURCE_BUDGETS_MAP, "source_budgets"),
];

impl Shield {
    /// Attach the shield for `port` on `interfaces`, pinning its maps under
    /// `PIN_ROOT/<mesh_interface>/`.
    pub fn attach(port: u16, interfaces: &[String], mesh_interface: &str) -> Result<Self, FastpathError> {
        let mut ebpf = load_shield(port)?;
        let mut mode = "driver";
        for name in interfaces {
            let cname = std::ffi::CString::new(name.as_str()).expect("interface names have no NUL");
            let program = shield_program(&mut ebpf);
            if program.attach(cname.as_c_str(), XdpMode::Driver).is_err() {
                mode = "generic";
                program
                    .attach(cname.as_c_str(), XdpMode::Skb)
                    .map_err(|source| FastpathError::Program {
                        program: "XDP shield",
                        interface: name.clone(),
                        source,
                    })?;
            }
        }
        let pins = Pins::create(&ebpf, mesh_interface, &PINS)?;
        let known_indices = HashMap::try_from(ebpf.take_map(KNOWN_INDICES_MAP).expect("the object has the index map"))?;
        Ok(Shield {
            known_indices,
            interfaces: interfaces.to_vec(),
            mode,
            _pins: pins,
            ebpf,
        })
    }

    /// Per-reason counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(ShieldReason, u64)>, FastpathError> {
        shield_counters(&self.ebpf)
    }
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
}

/// The shield run on frames through BPF_PROG_TEST_RUN (root, CAP_BPF), for the tests and the
/// differential fuzz target that holds it against the userspace classifier.
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing {
    use aya::{
        Ebpf,
        programs::{TestRun, TestRunOptions},
    };

    use super::shield_program;

    /// `enum xdp_action` values.
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;

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

    /// The shield's action on `frame`.
    pub fn run(ebpf: &mut Ebpf, frame: &[u8]) -> u32 {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        shield_program(ebpf)
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN must work (run as root)")
            .return_value
    }
}

#[cfg(test)]
mod tests {
    //! The shield run on crafted frames through BPF_PROG_TEST_RUN. Needs root (CAP_BPF); under
    //! CI these tests fail rather than skip when the kernel refuses.
    use super::testing::*;
    use super::*;
    use tunnelmesh_common::wire;

    const PORT: u16 = 51820;

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

    /// Load the shield with receiver index 0 (the index of the crafted data messages) known.
    fn shield_knowing_index_zero() -> Ebpf {
        let mut ebpf = load_shield(PORT).expect("the shield must load (run as root on a BPF-capable kernel)");
        let mut known: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(ebpf.map_mut(KNOWN_INDICES_MAP).expect("index map")).unwrap();
        known.insert(&0, &1, 0).unwrap();
        ebpf
    }

    fn data_for(index: u32) -> Vec<u8> {
        let mut m = message(wire::MSG_DATA, 48);
        m[4..8].copy_from_slice(&index.to_le_bytes());
        m
    }

    #[test]
    fn data_for_an_unknown_index_is_dropped_but_sampled_once_a_second_per_source() {
        let mut ebpf = shield_knowing_index_zero();
        assert_eq!(run(&mut ebpf, &frame_v4(PORT, &data_for(0))), XDP_PASS, "known index");
        let stranger = |ebpf: &mut Ebpf, src| run(ebpf, &frame_v4_from(src, PORT, &data_for(0xdead_beef)));
        assert_eq!(
            stranger(&mut ebpf, [198, 18, 0, 7]),
            XDP_PASS,
            "first unknown-index message from a source goes up"
        );
        for _ in 0..10 {
            assert_eq!(stranger(&mut ebpf, [198, 18, 0, 7]), XDP_DROP);
        }
        assert_eq!(stranger(&mut ebpf, [198, 18, 0, 8]), XDP_PASS, "budgets are per source");
        let c = counts(&ebpf);
        assert_eq!((c[&ShieldReason::UnknownIndex], c[&ShieldReason::Passed]), (10, 3));
    }

    #[test]
    fn initiations_beyond_a_sources_budget_are_rate_limited() {
        let mut ebpf = shield_knowing_index_zero();
        let initiation = message(wire::MSG_INITIATION, wire::INITIATION_LEN);
        let verdicts: Vec<u32> = (0..40)
            .map(|_| run(&mut ebpf, &frame_v4_from([198, 18, 0, 9], PORT, &initiation)))
            .collect();
        let passed = verdicts.iter().filter(|&&v| v == XDP_PASS).count();
        // A burst of 20 (plus at most one more if 200 ms went by during the loop).
        assert!((20..=21).contains(&passed), "{passed} of 40 passed");
        assert_eq!(verdicts[39], XDP_DROP);
        assert_eq!(
            run(&mut ebpf, &frame_v4_from([198, 18, 0, 10], PORT, &initiation)),
            XDP_PASS,
            "another source"
        );
        assert_eq!(counts(&ebpf)[&ShieldReason::RateLimited], 40 - passed as u64);
    }

    #[test]
    fn an_ipv6_source_is_budgeted_by_its_64_so_rotating_addresses_buys_nothing() {
        let mut ebpf = shield_knowing_index_zero();
        let initiation = message(wire::MSG_INITIATION, wire::INITIATION_LEN);
        let in_64 = |host: u8| {
            let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
            a[15] = host;
            a
        };
        // 40 initiations from 40 addresses of one /64: one budget.
        let passed = (0..40u8)
            .filter(|&h| run(&mut ebpf, &frame_v6_from(in_64(h), PORT, &initiation)) == XDP_PASS)
            .count();
        assert!((20..=21).contains(&passed), "{passed} of 40 passed");
        let mut other_64 = in_64(1);
        other_64[7] = 2;
        assert_eq!(
            run(&mut ebpf, &frame_v6_from(other_64, PORT, &initiation)),
            XDP_PASS,
            "another /64"
        );
        // IPv4 sources stay keyed by their whole address.
        assert_eq!(
            tunnelmesh_common::shield::budget_address(std::net::Ipv4Addr::new(198, 18, 0, 9).to_ipv6_mapped().octets()),
            std::net::Ipv4Addr::new(198, 18, 0, 9).to_ipv6_mapped().octets()
        );
    }

    #[test]
    fn shield_passes_valid_messages_and_drops_impossible_ones_by_reason() {
        let mut ebpf = shield_knowing_index_zero();
        let (pass, drop) = (XDP_PASS, XDP_DROP);
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            (
                "initiation v4",
                frame_v4(PORT, &message(wire::MSG_INITIATION, wire::INITIATION_LEN)),
                pass,
            ),
            (
                "response v6",
                frame_v6(PORT, &message(wire::MSG_RESPONSE, wire::RESPONSE_LEN)),
                pass,
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
            assert_eq!(run(&mut ebpf, frame), *expected, "{name}");
        }
        let counters = counts(&ebpf);
        assert_eq!(counters[&ShieldReason::Passed], 6);
        assert_eq!(counters[&ShieldReason::TooShort], 2);
        assert_eq!(counters[&ShieldReason::BadType], 2);
        assert_eq!(counters[&ShieldReason::BadLength], 2);
        assert_eq!(counters[&ShieldReason::Malformed], 1);
    }

    #[test]
    fn stun_responses_pass_within_their_sources_budget_and_lookalikes_do_not() {
        let mut ebpf = shield_knowing_index_zero();
        let response = crate::protocol::stun::binding_response([7; 12], "198.18.0.2:51820".parse().unwrap());
        let from = |src, msg: &[u8]| frame_v4_from(src, PORT, msg);
        assert_eq!(run(&mut ebpf, &from([198, 18, 0, 1], &response)), XDP_PASS);
        let mut wrong_cookie = response.clone();
        wrong_cookie[5] ^= 1;
        let mut wrong_length = response.clone();
        wrong_length.push(0);
        let mut request = response.clone();
        request[1] = 0x01;
        request[0] = 0x00;
        for junk in [&wrong_cookie, &wrong_length, &request] {
            assert_eq!(run(&mut ebpf, &from([198, 18, 0, 1], junk)), XDP_DROP);
        }
        // A burst of 10 per source, then one per 100 ms.
        let verdicts: Vec<u32> = (0..30)
            .map(|_| run(&mut ebpf, &from([198, 18, 0, 3], &response)))
            .collect();
        let passed = verdicts.iter().filter(|&&v| v == XDP_PASS).count();
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

    #[test]
    fn the_shield_and_userspace_agree_on_every_message_size() {
        let mut ebpf = shield_knowing_index_zero();
        for msg_type in 0..=5u8 {
            for len in (0..200).chain([1436, 1452, 1456]) {
                let msg = message(msg_type, len);
                let kernel_passes = run(&mut ebpf, &frame_v4(PORT, &msg)) == XDP_PASS;
                assert_eq!(
                    kernel_passes,
                    crate::protocol::wire::classify(&msg).is_ok(),
                    "type {msg_type} len {len}"
                );
            }
        }
    }
}
