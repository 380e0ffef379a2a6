//! The node's inbound policy enforced in the kernel: TC programs on the mesh TUN device.
//!
//! [`KernelTables::build`] turns the compiled [`NodePolicy`] (the same one the userspace matcher
//! reads) into map contents; [`KernelAcl`] loads the programs, writes a policy into the
//! generation not in force and then flips `ACL_CONFIG` — a packet sees the old policy or the new
//! one, never a mixture — and attaches ingress and egress to the TUN device. The programs are
//! attached before the data plane starts, so a restarted daemon has no window in which denied
//! traffic passes. Maps are pinned under `/sys/fs/bpf/tunnelmesh/<interface>/acl_*`.

use std::{collections::HashMap as StdHashMap, ffi::CString, net::IpAddr};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType, tc},
};
use ipnet::IpNet;
use tunnelmesh_common::acl::{
    ACL_CONFIG_MAP, ACL_CONNTRACK_MAP, ACL_COUNTERS_MAP, ACL_EGRESS_PROGRAM, ACL_FLAG_ECHO_REQUEST,
    ACL_INGRESS_PROGRAM, ACL_MASK_WORDS, ACL_MAX_RULES, ACL_PROTO_ANY, ACL_PROTO_ICMP, ACL_PROTO_TCP, ACL_PROTO_UDP,
    ACL_RULE_HITS_MAP, ACL_RULES_MAP, ACL_SOURCES_MAP, AclConfig, AclFlow, AclMask, AclReason, AclRule, AclSource,
};

use super::{EBPF_OBJECT, FastpathError, Pins, loader};
use crate::policy::{NodePolicy, Proto, ports::ECHO_ONLY};

/// Pinned maps, by map name and pin file name.
const PINS: [(&str, &str); 6] = [
    (ACL_CONFIG_MAP, "acl_config"),
    (ACL_SOURCES_MAP, "acl_sources"),
    (ACL_RULES_MAP, "acl_rules"),
    (ACL_CONNTRACK_MAP, "acl_conntrack"),
    (ACL_COUNTERS_MAP, "acl_counters"),
    (ACL_RULE_HITS_MAP, "acl_rule_hits"),
];

/// The map contents of one policy generation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelTables {
    /// Rule slots, in policy order.
    pub rules: Vec<AclRule>,
    /// (prefix length over the 16-byte address, address, slots whose sources contain it).
    pub sources: Vec<(u32, [u8; 16], AclMask)>,
}

/// An address prefix as the trie stores it: IPv4 as `::ffff:a.b.c.d/96+len`.
fn trie_prefix(net: &IpNet) -> (u32, u128) {
    match net.trunc() {
        IpNet::V4(n) => (96 + n.prefix_len() as u32, u128::from(n.network().to_ipv6_mapped())),
        IpNet::V6(n) => (n.prefix_len() as u32, u128::from(n.network())),
    }
}

fn truncate(addr: u128, len: u32) -> u128 {
    match len {
        0 => 0,
        len => addr & (u128::MAX << (128 - len)),
    }
}

impl KernelTables {
    pub fn build(policy: &NodePolicy) -> Result<Self, FastpathError> {
        if policy.rules.len() > ACL_MAX_RULES as usize {
            return Err(FastpathError::PolicyTooLarge {
                rules: policy.rules.len(),
            });
        }
        let rules = policy
            .rules
            .iter()
            .map(|r| AclRule {
                id: r.id,
                low: r.ports.low,
                high: r.ports.high,
                proto: match r.proto {
                    Proto::Any => ACL_PROTO_ANY,
                    Proto::Tcp => ACL_PROTO_TCP,
                    Proto::Udp => ACL_PROTO_UDP,
                    Proto::Icmp => ACL_PROTO_ICMP,
                },
                flags: if r.proto == Proto::Icmp && r.ports == ECHO_ONLY {
                    ACL_FLAG_ECHO_REQUEST
                } else {
                    0
                },
                _pad: [0; 2],
            })
            .collect();
        // Slots naming each prefix directly, then each prefix's set widened by every shorter
        // prefix containing it: the trie's longest match is then the complete answer.
        let mut direct: StdHashMap<(u32, u128), AclMask> = StdHashMap::new();
        for (slot, rule) in policy.rules.iter().enumerate() {
            for net in &rule.sources {
                direct.entry(trie_prefix(net)).or_default().bits[slot / 32] |= 1 << (slot % 32);
            }
        }
        let mut sources: Vec<(u32, [u8; 16], AclMask)> = direct
            .keys()
            .map(|&(len, addr)| {
                let mut mask = AclMask::default();
                for shorter in 0..=len {
                    if let Some(m) = direct.get(&(shorter, truncate(addr, shorter))) {
                        for w in 0..ACL_MASK_WORDS {
                            mask.bits[w] |= m.bits[w];
                        }
                    }
                }
                (len, addr.to_be_bytes(), mask)
            })
            .collect();
        sources.sort_by_key(|(len, addr, _)| (*len, *addr));
        Ok(KernelTables { rules, sources })
    }
}

/// The ACL programs with a policy loaded; attached once [`KernelAcl::attach`] succeeds.
pub struct KernelAcl {
    /// Generation in force.
    generation: u32,
    /// Trie keys written per generation (removed before the generation is rewritten).
    installed: [Vec<Key<AclSource>>; 2],
    /// Rule id of each slot of the generation in force.
    slot_ids: Vec<u32>,
    // Dropped before `ebpf`: the pins go, then the programs detach with their links.
    pins: Option<Pins>,
    ebpf: Ebpf,
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("the embedded object contains the ACL programs")
}

impl KernelAcl {
    /// Load the programs (not attached) with `policy` in force.
    pub fn load(policy: &NodePolicy) -> Result<Self, FastpathError> {
        let tables = KernelTables::build(policy)?;
        let mut ebpf = loader(&super::ACL_MAPS).load(EBPF_OBJECT)?;
        for name in [ACL_INGRESS_PROGRAM, ACL_EGRESS_PROGRAM] {
            classifier(&mut ebpf, name)
                .load()
                .map_err(|source| FastpathError::Program {
                    program: name,
                    interface: "(load)".into(),
                    source,
                })?;
        }
        let mut acl = KernelAcl {
            generation: 1,
            installed: Default::default(),
            slot_ids: Vec::new(),
            pins: None,
            ebpf,
        };
        acl.write(tables)?;
        Ok(acl)
    }

    /// Attach ingress and egress to `interface` and pin the maps. On error nothing stays
    /// attached once `self` drops.
    pub fn attach(&mut self, interface: &str) -> Result<(), FastpathError> {
        let cname = CString::new(interface).expect("interface names have no NUL");
        for (name, hook) in [
            (ACL_INGRESS_PROGRAM, TcAttachType::Ingress),
            (ACL_EGRESS_PROGRAM, TcAttachType::Egress),
        ] {
            let program = classifier(&mut self.ebpf, name);
            if program.attach(cname.as_c_str(), hook).is_err() {
                // Kernels before 6.6 (no TCX) attach through a clsact qdisc.
                let _ = tc::qdisc_add_clsact(cname.as_c_str());
                program
                    .attach(cname.as_c_str(), hook)
                    .map_err(|source| FastpathError::Program {
                        program: name,
                        interface: interface.into(),
                        source,
                    })?;
            }
        }
        self.pins = Some(Pins::create(&self.ebpf, interface, &PINS)?);
        Ok(())
    }

    /// Put `policy` in force. On error the policy in force is unchanged.
    pub fn install(&mut self, policy: &NodePolicy) -> Result<(), FastpathError> {
        self.write(KernelTables::build(policy)?)
    }

    fn write(&mut self, tables: KernelTables) -> Result<(), FastpathError> {
        let next = self.generation ^ 1;
        let base = next * ACL_MAX_RULES;
        {
            let mut sources: LpmTrie<_, AclSource, AclMask> =
                LpmTrie::try_from(self.ebpf.map_mut(ACL_SOURCES_MAP).expect("source trie"))?;
            for key in self.installed[next as usize].drain(..) {
                let _ = sources.remove(&key);
            }
            for (len, addr, mask) in &tables.sources {
                let key = Key::new(
                    32 + len,
                    AclSource {
                        generation_be: next.to_be_bytes(),
                        addr: *addr,
                    },
                );
                sources.insert(&key, mask, 0)?;
                self.installed[next as usize].push(key);
            }
        }
        {
            let mut rules: Array<_, AclRule> = Array::try_from(self.ebpf.map_mut(ACL_RULES_MAP).expect("rule array"))?;
            for (i, rule) in tables.rules.iter().enumerate() {
                rules.set(base + i as u32, rule, 0)?;
            }
        }
        {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| FastpathError::Cpus(e))?.get() as usize;
            let mut hits: PerCpuArray<_, u64> =
                PerCpuArray::try_from(self.ebpf.map_mut(ACL_RULE_HITS_MAP).expect("rule hits"))?;
            for i in 0..tables.rules.len() as u32 {
                let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(FastpathError::Cpus)?;
                hits.set(base + i, zeros, 0)?;
            }
        }
        self.set_config(AclConfig {
            generation: next,
            enforce: 1,
        })?;
        self.generation = next;
        self.slot_ids = tables.rules.iter().map(|r| r.id).collect();
        Ok(())
    }

    fn set_config(&mut self, config: AclConfig) -> Result<(), FastpathError> {
        let mut map: Array<_, AclConfig> = Array::try_from(self.ebpf.map_mut(ACL_CONFIG_MAP).expect("config"))?;
        map.set(0, &config, 0)?;
        Ok(())
    }

    /// Per-reason counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(AclReason, u64)>, FastpathError> {
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(ACL_COUNTERS_MAP).expect("ACL counters"))?;
        AclReason::ALL
            .iter()
            .map(|&r| Ok((r, counters.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Packets each rule slot of the policy in force allowed: (rule id, hits), in slot order.
    pub fn rule_hits(&self) -> Result<Vec<(u32, u64)>, FastpathError> {
        let hits: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map(ACL_RULE_HITS_MAP).expect("rule hits"))?;
        let base = self.generation * ACL_MAX_RULES;
        self.slot_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| Ok((id, hits.get(&(base + i as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Flows in the kernel's table (local, remote) — for status and tests.
    pub fn flows(&self) -> Result<Vec<(AclFlow, u64)>, FastpathError> {
        let flows: HashMap<_, AclFlow, u64> = HashMap::try_from(self.ebpf.map(ACL_CONNTRACK_MAP).expect("conntrack"))?;
        Ok(flows.iter().filter_map(Result::ok).collect())
    }
}

/// The address of an [`AclFlow`] side as an `IpAddr` (IPv4-mapped shown as IPv4).
pub fn flow_addr(addr: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    //! The shared policy table (`policy::cases`) run against the TC programs through
    //! BPF_PROG_TEST_RUN; the userspace matcher runs the same table in `policy::matcher`.
    //! Needs root (CAP_BPF); under CI these tests fail rather than skip when the kernel refuses.
    use aya::programs::{TestRun, TestRunOptions};

    use super::*;
    use crate::policy::{
        CompiledRule, PortRange, Verdict,
        cases::{self, Case},
    };

    const TC_ACT_OK: u32 = 0;
    const TC_ACT_SHOT: u32 = 2;

    /// `packet` behind an Ethernet header (BPF_PROG_TEST_RUN feeds TC programs L2 frames).
    fn frame(packet: &[u8]) -> Vec<u8> {
        let ether_type: u16 = if packet.first().map(|b| b >> 4) == Some(6) {
            0x86DD
        } else {
            0x0800
        };
        [&[0u8; 12][..], &ether_type.to_be_bytes(), packet].concat()
    }

    fn run(acl: &mut KernelAcl, program: &str, packet: &[u8]) -> u32 {
        run_segments(acl, program, packet, 0)
    }

    /// Offset of `gso_segs` in the uapi `struct __sk_buff` (192 bytes), the context a test run
    /// may set for a TC program.
    const SKB_GSO_SEGS: usize = 164;
    const SKB_SIZE: usize = 192;

    /// Run `program` on `packet` as a GSO super-packet of `segments` segments (0: none).
    fn run_segments(acl: &mut KernelAcl, program: &str, packet: &[u8], segments: u32) -> u32 {
        let frame = frame(packet);
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx = [0u8; SKB_SIZE];
        ctx[SKB_GSO_SEGS..SKB_GSO_SEGS + 4].copy_from_slice(&segments.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ctx_in: (segments > 0).then_some(&ctx[..]),
            ..Default::default()
        };
        classifier(&mut acl.ebpf, program)
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN must work (run as root)")
            .return_value
    }

    fn counts(acl: &KernelAcl) -> StdHashMap<AclReason, u64> {
        acl.counters().unwrap().into_iter().collect()
    }

    /// Move every flow's last-seen time `secs` into the past.
    fn age_flows(acl: &mut KernelAcl, secs: u64) {
        let mut flows: HashMap<_, AclFlow, u64> =
            HashMap::try_from(acl.ebpf.map_mut(ACL_CONNTRACK_MAP).expect("conntrack")).unwrap();
        let entries: Vec<(AclFlow, u64)> = flows.iter().map(Result::unwrap).collect();
        for (flow, seen) in entries {
            flows
                .insert(&flow, &seen.wrapping_sub(secs * 1_000_000_000), 0)
                .unwrap();
        }
    }

    fn clear_flows(acl: &mut KernelAcl) {
        let mut flows: HashMap<_, AclFlow, u64> =
            HashMap::try_from(acl.ebpf.map_mut(ACL_CONNTRACK_MAP).expect("conntrack")).unwrap();
        let keys: Vec<AclFlow> = flows.keys().map(Result::unwrap).collect();
        for key in keys {
            flows.remove(&key).unwrap();
        }
    }

    /// The verdict of the kernel on `case`, told apart by which counter moved.
    fn kernel_verdict(acl: &mut KernelAcl, case: &Case) -> Verdict {
        if let Some((out, sent)) = &case.opened {
            assert_eq!(
                run(acl, ACL_EGRESS_PROGRAM, out),
                TC_ACT_OK,
                "{}: egress never drops",
                case.name
            );
            age_flows(acl, case.at - sent);
        }
        if !cases::source_belongs_to_sender(case) {
            return Verdict::Deny;
        }
        let before = counts(acl);
        let hits_before = acl.rule_hits().unwrap();
        let action = run(acl, ACL_INGRESS_PROGRAM, &case.inbound);
        let after = counts(acl);
        let moved = |r: AclReason| after[&r] - before[&r];
        match action {
            TC_ACT_OK if moved(AclReason::Reply) == 1 => Verdict::Reply,
            TC_ACT_OK if moved(AclReason::Allowed) == 1 => {
                let hits = acl.rule_hits().unwrap();
                let slot = (0..hits.len())
                    .find(|&i| hits[i].1 > hits_before[i].1)
                    .expect("an allowed packet counts a rule hit");
                Verdict::Allow(hits[slot].0)
            }
            TC_ACT_SHOT if moved(AclReason::Denied) + moved(AclReason::Malformed) == 1 => Verdict::Deny,
            other => panic!("{}: action {other} with counters {before:?} → {after:?}", case.name),
        }
    }

    fn web_acl() -> KernelAcl {
        KernelAcl::load(&cases::web_policy()).expect("the ACL must load (run as root on a BPF-capable kernel)")
    }

    /// laptop → web tcp/443 (allowed by the web policy).
    fn https_from_laptop() -> Vec<u8> {
        cases::packet(
            cases::LAPTOP,
            cases::WEB,
            true,
            cases::L4::Tcp(1, 443),
            cases::Frag::None,
        )
    }

    /// web → db udp/53 (a flow web opens).
    fn dns_from_web() -> Vec<u8> {
        cases::packet(cases::WEB, cases::DB, false, cases::L4::Udp(7, 53), cases::Frag::None)
    }

    /// A super-packet (the daemon's GRO writes, the kernel's TSO) counts as its segments.
    #[test]
    fn super_packets_count_as_their_segments() {
        let mut acl = web_acl();
        let https = https_from_laptop();
        let opened = dns_from_web();
        let before = counts(&acl);
        let hits_before: u64 = acl.rule_hits().unwrap().iter().map(|h| h.1).sum();
        assert_eq!(run_segments(&mut acl, ACL_INGRESS_PROGRAM, &https, 5), TC_ACT_OK);
        assert_eq!(run_segments(&mut acl, ACL_EGRESS_PROGRAM, &opened, 3), TC_ACT_OK);
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_OK);
        let after = counts(&acl);
        let moved = |r: AclReason| after[&r] - before[&r];
        assert_eq!(moved(AclReason::Allowed), 5 + 1);
        assert_eq!(moved(AclReason::Tracked), 3);
        let hits_after: u64 = acl.rule_hits().unwrap().iter().map(|h| h.1).sum();
        assert_eq!(hits_after - hits_before, 6);
    }

    #[test]
    fn the_policy_table_in_the_kernel() {
        let cases = cases::cases();
        assert!(cases.len() >= 50);
        let mut acl = web_acl();
        for case in &cases {
            // An empty flow table per case, as the userspace run has.
            clear_flows(&mut acl);
            assert_eq!(kernel_verdict(&mut acl, case), case.expected, "{}", case.name);
        }
    }

    #[test]
    fn a_new_policy_replaces_the_old_one_whole_and_keeps_flows() {
        let mut acl = web_acl();
        let ssh_from_laptop = cases::packet(
            cases::LAPTOP,
            cases::WEB,
            false,
            cases::L4::Tcp(1, 22),
            cases::Frag::None,
        );
        let https = https_from_laptop();
        let opened = dns_from_web();
        let answer = cases::packet(cases::DB, cases::WEB, false, cases::L4::Udp(53, 7), cases::Frag::None);
        run(&mut acl, ACL_EGRESS_PROGRAM, &opened);
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &ssh_from_laptop), TC_ACT_SHOT);
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_OK);
        // Three swaps: each generation is rewritten at least once.
        for round in 0..3 {
            let ssh_only = NodePolicy {
                rules: vec![CompiledRule {
                    id: 7,
                    sources: vec!["100.64.0.1/32".parse().unwrap(), "fd00::1/128".parse().unwrap()],
                    proto: Proto::Tcp,
                    ports: PortRange { low: 22, high: 22 },
                }],
            };
            acl.install(&ssh_only).unwrap();
            assert_eq!(
                run(&mut acl, ACL_INGRESS_PROGRAM, &ssh_from_laptop),
                TC_ACT_OK,
                "round {round}"
            );
            assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_SHOT, "round {round}");
            assert_eq!(acl.rule_hits().unwrap(), [(7, 1)]);
            acl.install(&cases::web_policy()).unwrap();
            assert_eq!(
                run(&mut acl, ACL_INGRESS_PROGRAM, &ssh_from_laptop),
                TC_ACT_SHOT,
                "round {round}"
            );
            assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_OK, "round {round}");
            assert_eq!(
                run(&mut acl, ACL_INGRESS_PROGRAM, &answer),
                TC_ACT_OK,
                "flows survive policy changes"
            );
        }
        assert_eq!(acl.flows().unwrap().len(), 1);
        let (flow, _) = acl.flows().unwrap()[0];
        assert_eq!(
            (flow_addr(flow.local), flow_addr(flow.remote)),
            ("100.64.0.2".parse().unwrap(), "100.64.0.3".parse().unwrap())
        );
    }

    #[test]
    fn nested_source_prefixes_carry_the_rules_of_the_shorter_ones() {
        let rule = |id, net: &str, low| CompiledRule {
            id,
            sources: vec![net.parse().unwrap()],
            proto: Proto::Tcp,
            ports: PortRange { low, high: low },
        };
        let policy = NodePolicy {
            rules: vec![rule(0, "100.64.0.0/10", 80), rule(1, "100.64.0.5/32", 22)],
        };
        let tables = KernelTables::build(&policy).unwrap();
        let host = tables
            .sources
            .iter()
            .find(|(len, _, _)| *len == 128)
            .expect("the host prefix");
        assert_eq!(host.2.bits[0], 0b11, "the /32 also carries the /10's rule");
        let mut acl = KernelAcl::load(&policy).unwrap();
        let from = |host: u8, port| cases::packet(host, cases::WEB, false, cases::L4::Tcp(1, port), cases::Frag::None);
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(5, 80)), TC_ACT_OK);
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(5, 22)), TC_ACT_OK);
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(6, 80)), TC_ACT_OK);
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(6, 22)), TC_ACT_SHOT);
    }

    #[test]
    fn a_policy_beyond_the_slots_is_refused_before_any_write() {
        let rules = (0..=ACL_MAX_RULES)
            .map(|id| CompiledRule {
                id,
                sources: vec!["100.64.0.1/32".parse().unwrap()],
                proto: Proto::Udp,
                ports: PortRange::ALL,
            })
            .collect();
        let err = KernelTables::build(&NodePolicy { rules }).unwrap_err();
        assert!(err.to_string().contains("257 rules"), "{err}");
    }
}
