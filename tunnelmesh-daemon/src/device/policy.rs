//! Who enforces the node's inbound policy, and the userspace enforcer.
//!
//! A coordinated node enforces its compiled [`NodePolicy`] in the kernel (TC programs on the TUN
//! device, [`KernelAcl`]) when it can, else in the data plane: the same compiled rules, the same
//! matcher semantics (the shared suite proves both decide alike). Exactly one of the two enforces
//! at any time. The choice is made when the interface is created, before any packet flows, so a
//! coordinated node fails closed; if a later policy cannot be written to the kernel, userspace
//! takes over before the kernel programs are detached (for that moment both enforce — never
//! neither). A static mesh has no policy and enforces nothing.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use tunnelmesh_common::acl::AclReason;

use crate::{
    fastpath::KernelAcl,
    policy::{Conntrack, FlowKey, NodePolicy, PacketInfo, Verdict, inbound_verdict, track_outbound},
    protocol::ip::IpHeader,
};

/// Shards of the userspace flow table; a flow and its replies hash to the same shard.
pub const CONNTRACK_SHARDS: usize = 16;
/// Flows per shard.
pub const CONNTRACK_SHARD_CAPACITY: usize = 4_096;

/// The rules in force and how often each allowed a packet (userspace enforcement).
pub struct ActivePolicy {
    pub rules: NodePolicy,
    /// (rule id, packets allowed), sorted by id.
    hits: Vec<(u32, AtomicU64)>,
}

impl ActivePolicy {
    fn new(rules: NodePolicy) -> Self {
        let mut ids: Vec<u32> = rules.rules.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ActivePolicy {
            rules,
            hits: ids.into_iter().map(|id| (id, AtomicU64::new(0))).collect(),
        }
    }
}

/// Userspace counters, named like the kernel's (`AclReason`).
#[derive(Default)]
struct Counters([AtomicU64; AclReason::COUNT as usize]);

impl Counters {
    fn bump(&self, reason: AclReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-reason counters and per-rule (id, hits), from whichever enforcer runs.
type Readings = (Vec<(AclReason, u64)>, Vec<(u32, u64)>);

/// The inbound policy of a device and its enforcer.
pub struct PolicyEnforcer {
    active: ArcSwapOption<ActivePolicy>,
    /// The kernel enforces (the data plane skips its own checks).
    in_kernel: AtomicBool,
    kernel: Mutex<Option<KernelAcl>>,
    /// Why the kernel does not enforce, when it does not.
    userspace_reason: Mutex<Option<String>>,
    counters: Counters,
    conntrack: Vec<Mutex<Conntrack>>,
}

impl PolicyEnforcer {
    /// A static mesh: no policy, nothing enforced.
    pub fn none() -> Self {
        Self::userspace(None, None)
    }

    fn userspace(policy: Option<NodePolicy>, reason: Option<String>) -> Self {
        PolicyEnforcer {
            active: ArcSwapOption::from(policy.map(|p| Arc::new(ActivePolicy::new(p)))),
            in_kernel: AtomicBool::new(false),
            kernel: Mutex::new(None),
            userspace_reason: Mutex::new(reason),
            counters: Counters::default(),
            conntrack: (0..CONNTRACK_SHARDS)
                .map(|_| Mutex::new(Conntrack::new(CONNTRACK_SHARD_CAPACITY)))
                .collect(),
        }
    }

    /// Enforce `policy` on `interface` (which must exist and carry no traffic yet): in the kernel
    /// unless `no_ebpf` or the programs cannot load or attach, else in userspace.
    pub fn start(policy: NodePolicy, interface: &str, no_ebpf: bool) -> Self {
        if no_ebpf {
            return Self::userspace(Some(policy), Some("eBPF disabled (--no-ebpf)".into()));
        }
        let kernel = KernelAcl::load(&policy).and_then(|mut acl| acl.attach(interface).map(|()| acl));
        match kernel {
            Ok(acl) => {
                info!(
                    interface,
                    rules = policy.rules.len(),
                    "policy enforced in the kernel (TC ACL)"
                );
                let enforcer = Self::userspace(Some(policy), None);
                *crate::sync::lock(&enforcer.kernel) = Some(acl);
                enforcer.in_kernel.store(true, Ordering::SeqCst);
                enforcer
            }
            Err(e) => {
                warn!("the kernel ACL is unavailable ({e}); the daemon enforces the policy itself");
                Self::userspace(Some(policy), Some(e.to_string()))
            }
        }
    }

    /// Put a new policy in force. The policy in force again is a no-op: every membership change
    /// pushes every node its policy, mostly unchanged, and rewriting the kernel maps (and
    /// resetting the per-rule counters) for nothing is what one chatty peer would amplify.
    pub fn set(&self, policy: NodePolicy) {
        if self.active.load().as_ref().is_some_and(|a| a.rules == policy) {
            return;
        }
        let mut kernel = crate::sync::lock(&self.kernel);
        let fallback = kernel.as_mut().and_then(|acl| acl.install(&policy).err());
        self.active.store(Some(Arc::new(ActivePolicy::new(policy))));
        if let Some(e) = fallback {
            warn!("cannot load the new policy into the kernel ({e}); the daemon enforces it from now on");
            self.in_kernel.store(false, Ordering::SeqCst);
            *crate::sync::lock(&self.userspace_reason) = Some(e.to_string());
            // Detach only now that userspace enforces the new policy.
            *kernel = None;
        }
    }

    /// Fail closed if the kernel programs were detached behind our back: the daemon enforces
    /// the policy itself from then on (the flows the kernel tracked are lost, so connections
    /// this node opened must reopen). Called every second by the slow-path thread.
    pub fn check_kernel(&self) {
        if !self.in_kernel.load(Ordering::Relaxed) {
            return;
        }
        let mut kernel = crate::sync::lock(&self.kernel);
        if kernel.as_mut().and_then(KernelAcl::attached) != Some(false) {
            return;
        }
        let reason = "the TC programs were detached from the interface by something else";
        warn!("{reason}; the daemon enforces the policy itself from now on");
        *crate::sync::lock(&self.userspace_reason) = Some(reason.to_string());
        self.in_kernel.store(false, Ordering::SeqCst);
        *kernel = None;
    }

    /// Record the flow an outbound packet opens (userspace enforcement only).
    #[inline]
    pub fn track_outbound(&self, header: &IpHeader, packet: &[u8], now: Instant) {
        if self.in_kernel.load(Ordering::Relaxed) {
            return;
        }
        let active = self.active.load();
        let Some(active) = active.as_deref() else {
            return;
        };
        let Some(info) = PacketInfo::of(header, packet) else {
            return;
        };
        let Some(flow) = info.outbound_flow() else {
            return;
        };
        if track_outbound(&active.rules, &mut self.shard(&flow), &info, now) {
            self.counters.bump(AclReason::Tracked);
        }
    }

    /// Whether an inbound packet (source already checked) may pass; counts the verdict.
    #[inline]
    pub fn inbound_allowed(&self, header: &IpHeader, packet: &[u8], now: Instant) -> bool {
        if self.in_kernel.load(Ordering::Relaxed) {
            return true;
        }
        let active = self.active.load();
        let Some(active) = active.as_deref() else {
            return true;
        };
        let info = PacketInfo::of(header, packet);
        let mut ct = match info.and_then(|i| i.reply_flow()) {
            Some(flow) => self.shard(&flow),
            None => crate::sync::lock(&self.conntrack[0]),
        };
        let verdict = match &info {
            Some(info) => inbound_verdict(&active.rules, &mut ct, info, now),
            None => Verdict::Deny,
        };
        drop(ct);
        match verdict {
            Verdict::Reply => self.counters.bump(AclReason::Reply),
            Verdict::Allow(id) => {
                self.counters.bump(AclReason::Allowed);
                if let Ok(i) = active.hits.binary_search_by_key(&id, |(id, _)| *id) {
                    active.hits[i].1.fetch_add(1, Ordering::Relaxed);
                }
            }
            Verdict::Fragment => self.counters.bump(AclReason::Fragment),
            Verdict::Deny if info.is_none() => self.counters.bump(AclReason::Malformed),
            Verdict::Deny => self.counters.bump(AclReason::Denied),
        }
        verdict != Verdict::Deny
    }

    fn shard(&self, flow: &FlowKey) -> std::sync::MutexGuard<'_, Conntrack> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(flow);
        crate::sync::lock(&self.conntrack[hash as usize % self.conntrack.len()])
    }

    /// The status section (`None` in a static mesh).
    pub fn status(&self) -> Option<PolicyStatus> {
        let active = self.active.load_full()?;
        let kernel = crate::sync::lock(&self.kernel);
        let mut error = None;
        let (enforcement, (counters, hits)): (_, Readings) = match kernel.as_ref() {
            Some(acl) => match acl.counters().and_then(|c| Ok((c, acl.rule_hits()?))) {
                Ok(readings) => (Enforcement::Ebpf, readings),
                Err(e) => {
                    error = Some(e.to_string());
                    (Enforcement::Ebpf, Default::default())
                }
            },
            None => (
                Enforcement::Userspace,
                (
                    AclReason::ALL
                        .iter()
                        .map(|&r| (r, self.counters.0[r as usize].load(Ordering::Relaxed)))
                        .collect(),
                    active
                        .hits
                        .iter()
                        .map(|(id, n)| (*id, n.load(Ordering::Relaxed)))
                        .collect(),
                ),
            ),
        };
        let mut hits_by_id: BTreeMap<u32, u64> = BTreeMap::new();
        for (id, n) in hits {
            *hits_by_id.entry(id).or_default() += n;
        }
        Some(PolicyStatus {
            enforcement,
            userspace_reason: crate::sync::lock(&self.userspace_reason).clone(),
            error,
            rules: active
                .rules
                .rules
                .iter()
                .map(|r| RuleStatus {
                    id: r.id,
                    proto: format!("{:?}", r.proto).to_lowercase(),
                    ports: format!("{}-{}", r.ports.low, r.ports.high),
                    sources: r.sources.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            destinations: active.rules.destinations.iter().map(|d| d.to_string()).collect(),
            rule_hits: hits_by_id,
            counters: counters.into_iter().map(|(r, n)| (r.name().to_string(), n)).collect(),
        })
    }
}

/// Who enforces the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// The TC programs on the mesh interface.
    Ebpf,
    /// The data plane.
    Userspace,
}

impl std::fmt::Display for Enforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Enforcement::Ebpf => "ebpf",
            Enforcement::Userspace => "userspace",
        })
    }
}

/// One compiled rule slot.
#[derive(Debug, Serialize, Deserialize)]
pub struct RuleStatus {
    /// Index of the `[[allow]]` entry in the coordinator's policy file.
    pub id: u32,
    pub proto: String,
    /// Destination ports, or ICMP types.
    pub ports: String,
    pub sources: Vec<String>,
}

/// `policy` in `tunnelmesh status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub enforcement: Enforcement,
    /// Why the kernel does not enforce, when it does not.
    pub userspace_reason: Option<String>,
    /// Reading the kernel counters failed.
    pub error: Option<String>,
    pub rules: Vec<RuleStatus>,
    /// The addresses rules allow packets to (this node's own).
    #[serde(default)]
    pub destinations: Vec<String>,
    /// Packets allowed, by rule id (since the policy in force arrived).
    pub rule_hits: BTreeMap<u32, u64>,
    /// reply / allowed / denied / malformed / tracked.
    pub counters: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::cases::{self, Frag, L4, LAPTOP, WEB};

    #[test]
    fn the_policy_in_force_again_changes_nothing_a_new_one_replaces_it() {
        let enforcer = PolicyEnforcer::start(cases::web_policy(), "unused", true);
        let https = cases::packet(LAPTOP, WEB, false, L4::Tcp(1, 443), Frag::None);
        let header = IpHeader::parse(&https).unwrap();
        assert!(enforcer.inbound_allowed(&header, &https, Instant::now()));
        let hits = |e: &PolicyEnforcer| e.status().unwrap().rule_hits;
        assert_eq!(hits(&enforcer)[&0], 1);
        enforcer.set(cases::web_policy());
        assert_eq!(hits(&enforcer)[&0], 1, "unchanged: not reinstalled, counters kept");
        enforcer.set(NodePolicy::default());
        assert!(hits(&enforcer).is_empty(), "a new policy replaces it");
        assert!(!enforcer.inbound_allowed(&header, &https, Instant::now()));
    }
}
