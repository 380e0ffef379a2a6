//! Compiling the policy file into the inbound rules of one node.
//!
//! A node only ever receives its own [`NodePolicy`]: the rules whose `to` selects it, with `from`
//! resolved to the mesh addresses of the nodes it selects, and the addresses a rule may be used
//! to reach: the node's own mesh addresses (a rule that lets a peer reach `web` on tcp/443 does
//! not let it reach tcp/443 on web's LAN, docker bridges or anything web routes to). The compiled
//! form is flat and fixed-size per rule, so the eBPF maps and the userspace matcher read the same
//! thing.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::model::{Member, PolicyFile};
use super::ports::{PortRange, Proto};

/// One inbound rule of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledRule {
    /// Index of the `[[allow]]` entry in the file (counters and `policy explain` name it).
    pub id: u32,
    pub sources: Vec<IpNet>,
    pub proto: Proto,
    pub ports: PortRange,
}

/// Everything a node needs to enforce: its inbound rules, and the destinations they apply to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicy {
    pub rules: Vec<CompiledRule>,
    /// The only addresses a rule allows packets to: the node's own mesh addresses. Empty (a
    /// coordinator from before this field) allows nothing by rule; replies to flows the node
    /// opened still pass.
    #[serde(default)]
    pub destinations: Vec<IpNet>,
}

/// Compile `file` for the node named `node` among `members`.
pub fn compile_for(file: &PolicyFile, members: &[Member], node: &str) -> NodePolicy {
    let Some(me) = members.iter().find(|m| m.name == node) else {
        return NodePolicy::default();
    };
    let mut rules = Vec::new();
    for (id, rule) in file.rules.iter().enumerate() {
        if !rule.to.iter().any(|s| file.selects(s.get_ref(), me)) {
            continue;
        }
        let sources: Vec<IpNet> = members
            .iter()
            .filter(|m| m.name != node && rule.from.iter().any(|s| file.selects(s.get_ref(), m)))
            .flat_map(|m| m.addresses.iter().copied())
            .collect();
        if sources.is_empty() {
            continue;
        }
        for &(proto, ports) in &rule.parsed_ports {
            rules.push(CompiledRule {
                id: id as u32,
                sources: sources.clone(),
                proto,
                ports,
            });
        }
    }
    NodePolicy {
        rules,
        destinations: me.addresses.iter().map(|a| IpNet::from(a.addr())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_receives_only_the_rules_that_concern_it() {
        let file = PolicyFile::parse(
            "[[allow]]\nfrom = [\"laptop\"]\nto = [\"tag:web\"]\nports = [\"tcp/443\"]\n\
             [[allow]]\nfrom = [\"tag:web\"]\nto = [\"db\"]\nports = [\"tcp/5432\", \"icmp/echo\"]\n",
        )
        .unwrap();
        let member = |name: &str, tag: &str, addr: &str| Member {
            name: name.into(),
            tags: vec![tag.into()],
            addresses: vec![addr.parse().unwrap()],
        };
        let members = [
            member("laptop", "", "100.64.0.1/32"),
            member("web", "web", "100.64.0.2/32"),
            member("db", "", "100.64.0.3/32"),
        ];
        let web = compile_for(&file, &members, "web");
        assert_eq!(web.rules.len(), 1);
        assert_eq!(
            (web.rules[0].id, web.rules[0].sources[0].to_string().as_str()),
            (0, "100.64.0.1/32")
        );
        let db = compile_for(&file, &members, "db");
        assert_eq!(
            db.rules.iter().map(|r| (r.id, r.proto)).collect::<Vec<_>>(),
            [(1, Proto::Tcp), (1, Proto::Icmp)]
        );
        assert!(
            compile_for(&file, &members, "laptop").rules.is_empty(),
            "default deny: nothing reaches the laptop"
        );
    }
}
