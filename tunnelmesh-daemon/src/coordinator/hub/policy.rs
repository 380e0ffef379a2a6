//! Policy push: the coordinator compiles the policy file for each connected node and pushes a
//! node its rules whenever they change (policy file, membership, a newcomer the rules name).
//!
//! Compiling for every connected node costs members × rules per node, so it never runs under
//! the hub lock: a change only bumps a generation ([`Hub::policies_changed`]); the pusher task
//! ([`push_policies`]) takes a snapshot under the lock ([`Hub::policy_job`]), compiles outside
//! it, and pushes each node what differs from what it holds ([`Hub::apply_policies`]). Changes
//! that arrive while a compile runs are coalesced into the next one.

use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use tokio::sync::Notify;

use super::Hub;
use crate::{
    control::proto::ServerMsg,
    coordinator::{ipam::Ipam, store::NodeRecord},
    policy::{Member, NodePolicy, PolicyFile, compile_for},
};

/// The members among `records` (revoked and removed nodes are not), as policy sees them.
pub fn members<'a>(records: impl IntoIterator<Item = &'a NodeRecord>, ipam: &Ipam) -> Vec<Member> {
    records
        .into_iter()
        .filter(|n| !n.revoked && !n.removed)
        .map(|n| {
            let (v4, v6) = ipam.addresses(n.host);
            Member {
                name: n.name.clone(),
                tags: n.tags.clone(),
                addresses: vec![
                    IpNet::from(std::net::IpAddr::V4(v4)),
                    IpNet::from(std::net::IpAddr::V6(v6)),
                ],
            }
        })
        .collect()
}

/// Everything a recompile needs, taken under the hub lock and compiled outside it.
pub struct PolicyJob {
    generation: u64,
    policy: Arc<PolicyFile>,
    members: Vec<Member>,
    /// Each connected node: fingerprint, connection id, name.
    nodes: Vec<(String, u64, String)>,
}

/// A job's result: each node's rules, for the connection the job saw.
pub struct CompiledPolicies {
    generation: u64,
    policies: Vec<(String, u64, NodePolicy)>,
}

impl PolicyJob {
    pub fn compile(self) -> CompiledPolicies {
        let policies = self
            .nodes
            .into_iter()
            .map(|(fp, connection, name)| {
                let compiled = compile_for(&self.policy, &self.members, &name);
                (fp, connection, compiled)
            })
            .collect();
        CompiledPolicies {
            generation: self.generation,
            policies,
        }
    }
}

impl Hub {
    /// Put `policy` in force; every connected node is pushed its compiled rules.
    pub fn set_policy(&mut self, policy: PolicyFile) {
        self.policy = Some(Arc::new(policy));
        self.policies_changed();
    }

    /// Members as policy sees them (only computed when a policy exists).
    pub(super) fn members(&self) -> Vec<Member> {
        members(self.nodes.values(), &self.ipam)
    }

    pub(super) fn compiled_for(&self, members: &[Member], name: &str) -> NodePolicy {
        self.policy
            .as_ref()
            .map(|p| compile_for(p, members, name))
            .unwrap_or_default()
    }

    /// Membership or the policy changed: the connected nodes' rules are to be recompiled.
    pub(super) fn policies_changed(&mut self) {
        if self.policy.is_none() {
            return; // everyone holds the empty (deny-all) policy already
        }
        self.policy_generation += 1;
        self.policy_wake.notify_one();
    }

    /// The pusher waits on this for [`Hub::policies_changed`].
    pub fn policy_wake(&self) -> Arc<Notify> {
        self.policy_wake.clone()
    }

    /// A snapshot to recompile from, if anything changed since the last one was taken.
    pub fn policy_job(&mut self) -> Option<PolicyJob> {
        if self.policy_generation == self.policy_taken {
            return None;
        }
        self.policy_taken = self.policy_generation;
        let policy = self.policy.clone()?;
        let nodes = self
            .connections
            .iter()
            .filter_map(|(fp, c)| Some((fp.clone(), c.id, self.nodes.get(fp)?.name.clone())))
            .collect();
        Some(PolicyJob {
            generation: self.policy_generation,
            policy,
            members: self.members(),
            nodes,
        })
    }

    /// Push each node of `compiled` its rules where they differ from what it holds. A result
    /// older than one already applied is dropped, and so is a node's part when the connection
    /// it was compiled for has since been replaced (its welcome carried newer rules).
    pub fn apply_policies(&mut self, compiled: CompiledPolicies) {
        if compiled.generation <= self.policy_applied {
            return;
        }
        self.policy_applied = compiled.generation;
        for (fp, connection, policy) in compiled.policies {
            let Some(c) = self.connections.get(&fp).filter(|c| c.id == connection) else {
                continue;
            };
            if self.pushed_policy.get(&fp) == Some(&policy) {
                continue;
            }
            let _ = c.tx.try_send(Arc::new(ServerMsg::Policy { policy: policy.clone() }));
            self.pushed_policy.insert(fp, policy);
        }
    }

    /// Compile and push in place, as [`push_policies`] does outside the lock (tests and fuzz
    /// targets own their hub).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn settle_policies(&mut self) {
        while let Some(job) = self.policy_job() {
            let compiled = job.compile();
            self.apply_policies(compiled);
        }
    }
}

/// The coordinator's pusher: whenever policies changed, compile off the lock (on a blocking
/// thread) and push, until a snapshot finds nothing new.
pub async fn push_policies(hub: Arc<Mutex<Hub>>) {
    let wake = crate::sync::lock(&hub).policy_wake();
    loop {
        wake.notified().await;
        loop {
            let Some(job) = crate::sync::lock(&hub).policy_job() else {
                break;
            };
            let Ok(compiled) = tokio::task::spawn_blocking(move || job.compile()).await else {
                break; // the compile panicked or the runtime stops; the next change retries
            };
            crate::sync::lock(&hub).apply_policies(compiled);
        }
    }
}
