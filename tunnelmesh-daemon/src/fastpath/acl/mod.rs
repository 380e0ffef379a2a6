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
    ACL_CONFIG_MAP, ACL_CONNTRACK_MAP, ACL_COUNTERS_MAP, ACL_DESTINATIONS_MAP, ACL_EGRESS_PROGRAM,
    ACL_FLAG_ECHO_REQUEST, ACL_INGRESS_PROGRAM, ACL_MASK_WORDS, ACL_MAX_DESTINATIONS, ACL_MAX_RULES, ACL_PROTO_ANY,
    ACL_PROTO_ICMP, ACL_PROTO_TCP, ACL_PROTO_UDP, ACL_RULE_HITS_MAP, ACL_RULES_MAP, ACL_SOURCES_MAP, AclConfig,
    AclFlow, AclMask, AclReason, AclRule, AclSource,
};

use aya_log::EbpfLogger;

use super::{
    EBPF_OBJECT, FastpathError, Pins,
    kernel_log::{KernelLog, ToTracing},
    loader,
};
use crate::policy::{NodePolicy, Proto, ports::ECHO_ONLY};

/// Pinned maps, by map name and pin file name.
const PINS: [(&str, &str); 7] = [
    (ACL_CONFIG_MAP, "acl_config"),
    (ACL_SOURCES_MAP, "acl_sources"),
    (ACL_DESTINATIONS_MAP, "acl_destinations"),
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
    /// (prefix length, address) of each destination rules may allow packets to.
    pub destinations: Vec<(u32, [u8; 16])>,
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
        if policy.destinations.len() > (ACL_MAX_DESTINATIONS / 2) as usize {
            return Err(FastpathError::TooManyDestinations {
                destinations: policy.destinations.len(),
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
        let mut destinations: Vec<(u32, [u8; 16])> = policy
            .destinations
            .iter()
            .map(|net| {
                let (len, addr) = trie_prefix(net);
                (len, addr.to_be_bytes())
            })
            .collect();
        destinations.sort();
        destinations.dedup();
        Ok(KernelTables {
            rules,
            sources,
            destinations,
        })
    }
}

/// The ACL programs with a policy loaded; attached once [`KernelAcl::attach`] succeeds.
pub struct KernelAcl {
    /// Generation in force.
    generation: u32,
    /// Source and destination trie keys written per generation (removed before the generation
    /// is rewritten).
    installed: [Vec<Key<AclSource>>; 2],
    installed_destinations: [Vec<Key<AclSource>>; 2],
    /// Rule id of each slot of the generation in force.
    slot_ids: Vec<u32>,
    /// The interface the programs were attached to.
    interface: Option<CString>,
    _log: Option<KernelLog>,
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
    /// Load the programs (not attached) with `policy` in force; what they log goes to the
    /// daemon's log.
    pub fn load(policy: &NodePolicy) -> Result<Self, FastpathError> {
        let (mut acl, logger) = Self::load_logging_to(policy, ToTracing("TC ACL"))?;
        acl._log = Some(KernelLog::drain(logger)?);
        Ok(acl)
    }

    /// [`KernelAcl::load`], what the programs log read into `logger`.
    pub fn load_logging_to<L: log::Log>(
        policy: &NodePolicy,
        logger: L,
    ) -> Result<(Self, EbpfLogger<L>), FastpathError> {
        let tables = KernelTables::build(policy)?;
        let mut ebpf = loader(&super::ACL_MAPS).load(EBPF_OBJECT)?;
        let logger = super::kernel_log::take(&mut ebpf, logger)?;
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
            installed_destinations: Default::default(),
            slot_ids: Vec::new(),
            interface: None,
            _log: None,
            pins: None,
            ebpf,
        };
        acl.write(tables)?;
        Ok((acl, logger))
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
        self.interface = Some(cname);
        Ok(())
    }

    /// Whether both programs are still attached (something else — `tc`, `bpftool`, another
    /// loader — may detach them, and the node would fail open). `None` when the kernel cannot
    /// say (no TCX: the programs went through a clsact qdisc).
    pub fn attached(&mut self) -> Option<bool> {
        let interface = self.interface.clone()?;
        for (name, hook) in [
            (ACL_INGRESS_PROGRAM, TcAttachType::Ingress),
            (ACL_EGRESS_PROGRAM, TcAttachType::Egress),
        ] {
            let ours = classifier(&mut self.ebpf, name).info().ok()?.id();
            let (_, attached) = SchedClassifier::query_tcx(interface.as_c_str(), hook).ok()?;
            if !attached.iter().any(|p| p.id() == ours) {
                return Some(false);
            }
        }
        Some(true)
    }

    /// Put `policy` in force. On error the policy in force is unchanged.
    pub fn install(&mut self, policy: &NodePolicy) -> Result<(), FastpathError> {
        self.write(KernelTables::build(policy)?)
    }

    fn write(&mut self, tables: KernelTables) -> Result<(), FastpathError> {
        let next = self.generation ^ 1;
        let base = next * ACL_MAX_RULES;
        let destinations: Vec<(u32, [u8; 16], u8)> =
            tables.destinations.iter().map(|&(len, addr)| (len, addr, 1)).collect();
        rewrite_trie(
            &mut self.ebpf,
            ACL_SOURCES_MAP,
            next,
            &mut self.installed[next as usize],
            &tables.sources,
        )?;
        rewrite_trie(
            &mut self.ebpf,
            ACL_DESTINATIONS_MAP,
            next,
            &mut self.installed_destinations[next as usize],
            &destinations,
        )?;
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

/// Replace generation `generation`'s entries of the trie `map` (whose keys written before are in
/// `installed`) with `entries` (prefix length over the address, address, value).
fn rewrite_trie<V: aya::Pod>(
    ebpf: &mut Ebpf,
    map: &str,
    generation: u32,
    installed: &mut Vec<Key<AclSource>>,
    entries: &[(u32, [u8; 16], V)],
) -> Result<(), FastpathError> {
    let mut trie: LpmTrie<_, AclSource, V> =
        LpmTrie::try_from(ebpf.map_mut(map).expect("the object has the ACL tries"))?;
    for key in installed.drain(..) {
        let _ = trie.remove(&key);
    }
    for (len, addr, value) in entries {
        let key = Key::new(
            32 + len,
            AclSource {
                generation_be: generation.to_be_bytes(),
                addr: *addr,
            },
        );
        trie.insert(&key, value, 0)?;
        installed.push(key);
    }
    Ok(())
}

/// The address of an [`AclFlow`] side as an `IpAddr` (IPv4-mapped shown as IPv4).
pub fn flow_addr(addr: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The programs run on a packet through BPF_PROG_TEST_RUN (root, CAP_BPF), for the tests and
/// the differential fuzz target that holds them against the userspace matcher.
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing {
    use aya::programs::{TestRun, TestRunOptions};

    use super::{ACL_INGRESS_PROGRAM, AclReason, KernelAcl, StdHashMap, classifier};
    use crate::policy::Verdict;

    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    /// Offset of `gso_segs` in the uapi `struct __sk_buff` (192 bytes), the context a test run
    /// may set for a TC program.
    const SKB_GSO_SEGS: usize = 164;
    const SKB_SIZE: usize = 192;

    /// `packet` behind an Ethernet header (BPF_PROG_TEST_RUN feeds TC programs L2 frames).
    fn frame(packet: &[u8]) -> Vec<u8> {
        let ether_type: u16 = if packet.first().map(|b| b >> 4) == Some(6) {
            0x86DD
        } else {
            0x0800
        };
        [&[0u8; 12][..], &ether_type.to_be_bytes(), packet].concat()
    }

    impl KernelAcl {
        /// Run `program` on `packet`, as a GSO super-packet of `segments` segments (0: none).
        pub fn test_run(&mut self, program: &str, packet: &[u8], segments: u32) -> u32 {
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
            classifier(&mut self.ebpf, program)
                .test_run(opts)
                .expect("BPF_PROG_TEST_RUN must work (run as root)")
                .return_value
        }

        /// The reason counters, summed over CPUs.
        pub fn reasons(&self) -> StdHashMap<AclReason, u64> {
            self.counters().expect("the counters read").into_iter().collect()
        }

        /// The ingress program's verdict on `packet`, told apart by which counter moved (and,
        /// for an allowed packet, which rule's hit counter).
        pub fn ingress_verdict(&mut self, packet: &[u8]) -> Verdict {
            let before = self.reasons();
            let hits_before = self.rule_hits().expect("the rule hits read");
            let action = self.test_run(ACL_INGRESS_PROGRAM, packet, 0);
            let after = self.reasons();
            let moved = |r: AclReason| after[&r] - before[&r];
            match action {
                TC_ACT_OK if moved(AclReason::Reply) == 1 => Verdict::Reply,
                TC_ACT_OK if moved(AclReason::Allowed) == 1 => {
                    let hits = self.rule_hits().expect("the rule hits read");
                    let slot = (0..hits.len())
                        .find(|&i| hits[i].1 > hits_before[i].1)
                        .expect("an allowed packet counts a rule hit");
                    Verdict::Allow(hits[slot].0)
                }
                TC_ACT_OK if moved(AclReason::Fragment) == 1 => Verdict::Fragment,
                TC_ACT_SHOT if moved(AclReason::Denied) + moved(AclReason::Malformed) == 1 => Verdict::Deny,
                other => panic!("action {other} with counters {before:?} → {after:?} on {packet:02x?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
