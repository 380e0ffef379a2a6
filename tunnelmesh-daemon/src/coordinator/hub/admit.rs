//! Admission: a hello is checked (signature over the challenge, name, candidates), the node is
//! found or enrolled (authorized key or token; revoked keys never, removed ones only with a new
//! authorization), and gets its welcome and a queue of updates.
//!
//! What admitted a node is checked again on every connect: a node admitted by its
//! `authorized_keys` line is refused once the line is gone and takes the line's tags as they are
//! now; a node admitted by a token stays a member (with the token's tags) until it is revoked or
//! removed. A line added for a token-admitted node makes it key-admitted from then on.
//!
//! A token decides which names its holders may take ([`TokenNames`]).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use tokio::sync::mpsc;
use tracing::info;

use super::{
    Admitted, Connection, Hub, PEER_QUEUE, Refusal,
    rendezvous::{nat_of, parse_endpoints, published_endpoints},
};
use crate::{
    control::{
        proto::{ClientMsg, JOIN_NAMESPACE, NodeInfo, join_transcript},
        unix_now,
    },
    coordinator::{
        admission::{self, TokenNames},
        store::{Admission, NodeRecord},
    },
    identity::{PublicIdentity, verify_signature},
    policy::NodePolicy,
};

impl Hub {
    /// Decide on a hello from `remote` answering `nonce`. On success: the welcome and the queue
    /// of updates for this peer's connection, identified by the returned session id.
    pub fn admit(&mut self, hello: ClientMsg, nonce: &[u8], remote: IpAddr) -> Result<Admitted, Refusal> {
        let ClientMsg::Hello {
            ssh_key,
            signature,
            token,
            name,
            listen_port,
            endpoints,
            ssh_port,
            nat,
        } = hello
        else {
            return Err(Refusal::Malformed("expected a hello".into()));
        };
        let identity = PublicIdentity::from_ssh_line(&ssh_key).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let fingerprint = identity.fingerprint();
        let transcript = join_transcript(nonce, &self.coordinator_key, &self.certificate_fingerprint);
        if !verify_signature(&identity, JOIN_NAMESPACE, &transcript, &signature) {
            return Err(Refusal::BadSignature(fingerprint));
        }
        if listen_port == 0 {
            return Err(Refusal::Malformed("listen_port must be 1-65535".into()));
        }
        if let Some(n) = &name {
            admission::check_name(n).map_err(|e| Refusal::Invalid(e.to_string()))?;
        }
        let candidates = parse_endpoints(&endpoints).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let observed = SocketAddr::new(remote.to_canonical(), listen_port);
        let nat = nat_of(nat, &candidates, observed);
        let mut reported = published_endpoints(&candidates, observed, nat);
        if let Some(port) = ssh_port.filter(|p| *p != 0) {
            reported.push(format!(
                "ssh://{}",
                std::net::SocketAddr::new(remote.to_canonical(), port)
            ));
        }

        let node = match self.nodes.get(&fingerprint).cloned() {
            Some(n) if n.revoked => return Err(Refusal::Revoked(fingerprint)),
            Some(n) if n.removed => {
                // Rejoining after removal needs authorization again (which then admits it); the
                // address is kept.
                let n = if self.authorized.contains_key(&fingerprint) {
                    self.recheck(n)?
                } else {
                    let token = match &token {
                        Some(t) => self.store.consume_token(&admission::token_hash(t), unix_now())?,
                        None => None,
                    };
                    let Some(token) = token else {
                        return Err(Refusal::NotAuthorized(fingerprint));
                    };
                    self.store.set_admission(&fingerprint, Admission::Token, &token.tags)?;
                    NodeRecord {
                        tags: token.tags,
                        admitted_by: Admission::Token,
                        ..n
                    }
                };
                self.store.set_removed(&fingerprint, false)?;
                self.store.set_endpoints(&fingerprint, &reported)?;
                self.gone.remove(&fingerprint);
                NodeRecord {
                    endpoints: reported,
                    removed: false,
                    ..n
                }
            }
            Some(n) => {
                let n = self.recheck(n)?;
                if n.endpoints != reported {
                    self.store.set_endpoints(&fingerprint, &reported)?;
                }
                NodeRecord {
                    endpoints: reported,
                    ..n
                }
            }
            None => {
                let derived = admission::name_from(identity.comment()).unwrap_or_else(|| "node".into());
                let (name, tags, admitted_by) = match (self.authorized.get(&fingerprint).cloned(), &token) {
                    (Some(a), _) => {
                        let name = match a.name.or(name) {
                            // An asked-for name must be free (the store refuses it otherwise).
                            Some(n) => n,
                            None => self.free_name(derived, &Default::default()),
                        };
                        (name, a.tags, Admission::Key)
                    }
                    (None, Some(t)) => {
                        let name = self.name_for_token_holder(t, name, derived)?;
                        // Spent only now that the name is known to be free (a refusal must not
                        // use up a single-use token).
                        let record = self
                            .store
                            .consume_token(&admission::token_hash(t), unix_now())?
                            .ok_or(Refusal::BadToken)?;
                        (name, record.tags, Admission::Token)
                    }
                    (None, None) => return Err(Refusal::NotAuthorized(fingerprint)),
                };
                let mut ipam = self.ipam.clone();
                let host = ipam.allocate().map_err(|e| Refusal::Internal(e.to_string()))?;
                let record = NodeRecord {
                    fingerprint: fingerprint.clone(),
                    public_key: identity.ssh_line(),
                    name,
                    tags,
                    host,
                    created: unix_now(),
                    revoked: false,
                    removed: false,
                    endpoints: reported,
                    admitted_by,
                };
                self.store.insert_node(&record)?;
                // Only a committed allocation takes the number.
                self.ipam = ipam;
                info!(name = %record.name, %fingerprint, host, "node joined");
                record
            }
        };

        // What policy sees of a node (a newcomer, a rejoin after removal, a name or tags that
        // changed) decides whether the others' rules are recompiled; what peers see of it
        // (endpoints, NAT kind) whether its entry is pushed.
        let as_member = |n: &NodeRecord| (n.name.clone(), n.tags.clone(), n.host, n.revoked || n.removed);
        let membership_changed = self.nodes.get(&fingerprint).map(as_member) != Some(as_member(&node));
        let entry_before = self.peer_json.get(&fingerprint).cloned();
        self.nat.insert(fingerprint.clone(), nat);
        self.observed.insert(fingerprint.clone(), observed);
        self.remember(node.clone());
        self.drop_held(&fingerprint);
        let (v4, v6) = self.ipam.addresses(node.host);
        let node_info = NodeInfo {
            name: node.name.clone(),
            fingerprint: fingerprint.clone(),
            ipv4: v4.to_string(),
            ipv6: v6.to_string(),
            tags: node.tags.clone(),
        };
        // The mesh keys are what every connected peer holds now (a rotation reaches everyone in
        // the same push).
        let node_policy = if self.policy.is_some() {
            self.compiled_for(&self.members(), &node.name)
        } else {
            NodePolicy::default()
        };
        let welcome = self.render_welcome(&fingerprint, &node_info, &node_policy);
        if self.peer_json.get(&fingerprint) != entry_before.as_ref() {
            self.announce(&fingerprint, Instant::now());
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        self.next_connection += 1;
        let id = self.next_connection;
        // A reconnecting node replaces its old connection.
        self.connections.insert(fingerprint.clone(), Connection { id, tx });
        self.pushed_policy.insert(fingerprint.clone(), node_policy);
        // The others' rules may name the newcomer.
        if membership_changed {
            self.policies_changed();
        }
        Ok(Admitted {
            fingerprint,
            connection: id,
            welcome,
            updates: rx,
        })
    }

    /// Check again what admitted a known node `n`: its `authorized_keys` line must still be
    /// there (its tags are the line's now); a token-admitted node stays as it is.
    fn recheck(&mut self, n: NodeRecord) -> Result<NodeRecord, Refusal> {
        match (self.authorized.get(&n.fingerprint), n.admitted_by) {
            (Some(a), by) => {
                if a.tags != n.tags || by != Admission::Key {
                    self.store.set_admission(&n.fingerprint, Admission::Key, &a.tags)?;
                    info!(name = %n.name, tags = ?a.tags, "tags follow the node's authorized_keys line");
                }
                Ok(NodeRecord {
                    tags: a.tags.clone(),
                    admitted_by: Admission::Key,
                    ..n
                })
            }
            (None, Admission::Key) => Err(Refusal::NotAuthorized(n.fingerprint)),
            (None, Admission::Token | Admission::Unknown) => Ok(n),
        }
    }

    /// `base`, or `base-2`, `base-3`, … whichever no node has and `reserved` does not hold.
    fn free_name(&self, base: String, reserved: &BTreeSet<String>) -> String {
        let taken: std::collections::HashSet<&str> = self.nodes.values().map(|n| n.name.as_str()).collect();
        std::iter::once(base.clone())
            .chain((2..).map(|i| format!("{base}-{i}")))
            .find(|n| !taken.contains(n.as_str()) && !reserved.contains(n))
            .expect("an unbounded sequence has a free name")
    }

    /// The name a token holder takes, as its token's name rule decides: the token must be valid,
    /// the name must fit the rule and be free, and — unless the token names it exactly — not one
    /// the policy names or an `authorized_keys` line reserves (a holder must not pick up rights
    /// meant for a node that has not joined yet). A name derived from the key comment moves on
    /// to a free one (`base-2`, …); an asked-for name does not.
    fn name_for_token_holder(&self, token: &str, asked: Option<String>, derived: String) -> Result<String, Refusal> {
        let record = self
            .store
            .token(&admission::token_hash(token), unix_now())?
            .ok_or(Refusal::BadToken)?;
        let rule = TokenNames::parse(&record.names).map_err(Refusal::Internal)?;
        let reserved: BTreeSet<String> = match rule {
            TokenNames::Exactly(_) => BTreeSet::new(),
            _ => self
                .policy
                .iter()
                .flat_map(|p| p.named_nodes())
                .chain(self.authorized.values().filter_map(|a| a.name.clone()))
                .collect(),
        };
        let wanted = rule
            .name_for(asked.as_deref(), &derived)
            .map_err(Refusal::NameNotAllowed)?;
        admission::check_name(&wanted).map_err(|e| Refusal::Invalid(e.to_string()))?;
        if asked.is_none() && !matches!(rule, TokenNames::Exactly(_)) {
            return Ok(self.free_name(wanted, &reserved));
        }
        if self.nodes.values().any(|r| r.name == wanted) {
            return Err(Refusal::NameTaken(wanted));
        }
        if reserved.contains(&wanted) {
            return Err(Refusal::NameNotAllowed(format!(
                "the name {wanted:?} is named by the policy or reserved in authorized_keys; a token admits \
                 it only if made for it (`tunnelmesh coordinator token create --names {wanted}`)"
            )));
        }
        Ok(wanted)
    }
}
