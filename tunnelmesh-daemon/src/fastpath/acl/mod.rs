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

use super::{EBPF_OBJECT, FastpathError, Pins, loader};
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
            installed_destinations: Default::default(),
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

#[cfg(test)]
mod tests;
