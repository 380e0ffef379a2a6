//! Policy push: the coordinator compiles the policy file for each connected node and pushes a
//! node its rules whenever they change (policy file, membership, a newcomer the rules name).

use std::sync::Arc;

use ipnet::IpNet;

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

impl Hub {
    /// Put `policy` in force and push every connected node its compiled rules.
    pub fn set_policy(&mut self, policy: PolicyFile) {
        self.policy = Some(policy);
        self.push_policies();
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

    /// Recompile for every connected node (membership or policy changed); push what differs.
    pub(super) fn push_policies(&mut self) {
        if self.policy.is_none() {
            return; // everyone holds the empty (deny-all) policy already
        }
        let members = self.members();
        let mut updates = Vec::new();
        for fp in self.connections.keys() {
            let Some(node) = self.nodes.get(fp) else { continue };
            let compiled = self.compiled_for(&members, &node.name);
            if self.pushed_policy.get(fp) != Some(&compiled) {
                updates.push((fp.clone(), compiled));
            }
        }
        for (fp, policy) in updates {
            if let Some(s) = self.connections.get(&fp) {
                let _ = s.tx.try_send(Arc::new(ServerMsg::Policy { policy: policy.clone() }));
            }
            self.pushed_policy.insert(fp, policy);
        }
    }
}
