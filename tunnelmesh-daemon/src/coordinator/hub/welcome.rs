//! Rendering a welcome: the newcomer's node entry, its rules, the mesh keys and prefixes, then
//! every other member, in parts of at most [`WELCOME_CHUNK`] peers. The peers' entries are kept
//! rendered ([`Hub::remember`]), so a welcome to a mesh of thousands is assembled, not
//! serialized again.

use super::{Hub, to_json};
use crate::{
    control::proto::{NodeInfo, WELCOME_CHUNK},
    policy::NodePolicy,
};

impl Hub {
    /// The welcome of `fingerprint`: a `welcome` message, then `peers` messages that complete it.
    pub(super) fn render_welcome(
        &self,
        fingerprint: &str,
        node_info: &NodeInfo,
        node_policy: &NodePolicy,
    ) -> Vec<String> {
        let policy_json = to_json(node_policy);
        let others: Vec<&str> = self
            .peer_json
            .iter()
            .filter(|(fp, _)| fp.as_str() != fingerprint)
            .map(|(_, j)| j.as_str())
            .collect();
        let chunks: Vec<&[&str]> = if others.is_empty() {
            vec![&[]]
        } else {
            others.chunks(WELCOME_CHUNK).collect()
        };
        let last = chunks.len() - 1;
        chunks
                .iter()
                .enumerate()
                .map(|(i, chunk)| {
                    let head = if i == 0 {
                        format!(
                            r#"{{"type":"welcome","more":{},"stun_port":{},"node":{},"policy":{},"mesh_keys":{},"ipv4_prefix":{},"ipv6_prefix":{},"peers":["#,
                            i < last,
                            self.stun_port,
                            to_json(node_info),
                            policy_json,
                            to_json(&self.pushed_mesh_keys),
                            to_json(&self.ipam.v4().to_string()),
                            to_json(&self.ipam.v6().to_string()),
                        )
                    } else {
                        format!(r#"{{"type":"peers","more":{},"peers":["#, i < last)
                    };
                    let mut msg = String::with_capacity(head.len() + 2 + chunk.iter().map(|j| j.len() + 1).sum::<usize>());
                    msg.push_str(&head);
                    msg.push_str(&chunk.join(","));
                    msg.push_str("]}");
                    msg
                })
                .collect()
    }
}
