//! Compiling the policy file into the inbound rules of one node.
//!
//! A node only ever receives its own [`NodePolicy`]: the rules whose `to` selects it, with `from`
//! resolved to the mesh addresses of the nodes it selects. The compiled form is flat and
//! fixed-size per rule, so the eBPF maps and the userspace matcher read the same thing.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::model::{Member, PolicyFile};

/// Transport protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP for IPv4, ICMPv6 for IPv6.
    Icmp,
    Any,
}

/// Inclusive range of destination ports, or of ICMP types for [`Proto::Icmp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange { low: 0, high: u16::MAX };

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

/// ICMP echo request: type 8 (IPv4) and 128 (ICMPv6).
pub const ICMP_ECHO_REQUEST: u16 = 8;
/// ICMPv6 echo request.
pub const ICMPV6_ECHO_REQUEST: u16 = 128;
/// The range of `icmp/echo` (written with the IPv4 type): it means echo request in either family.
pub const ECHO_ONLY: PortRange = PortRange {
    low: ICMP_ECHO_REQUEST,
    high: ICMP_ECHO_REQUEST,
};

/// Parse one `ports` item.
pub fn parse_ports(spec: &str) -> Result<(Proto, PortRange), String> {
    let (proto, range) = spec.split_once('/').map_or((spec, None), |(p, r)| (p, Some(r)));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        "any" if range.is_none() => return Ok((Proto::Any, PortRange::ALL)),
        other => {
            return Err(format!(
                "unknown protocol {other:?} in {spec:?}: use tcp, udp, icmp or any"
            ));
        }
    };
    let Some(range) = range else {
        return Ok((proto, PortRange::ALL));
    };
    if proto == Proto::Icmp {
        return match range {
            "echo" => Ok((
                proto,
                PortRange {
                    low: ICMP_ECHO_REQUEST,
                    high: ICMP_ECHO_REQUEST,
                },
            )),
            t => t
                .parse::<u8>()
                .map(|t| {
                    (
                        proto,
                        PortRange {
                            low: t as u16,
                            high: t as u16,
                        },
                    )
                })
                .map_err(|_| format!("{spec:?}: an ICMP type is \"echo\" or a number 0-255")),
        };
    }
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{spec:?}: {p:?} is not a port (0-65535)"))
    };
    let (low, high) = match range.split_once('-') {
        Some((l, h)) => (port(l)?, port(h)?),
        None => (port(range)?, port(range)?),
    };
    if low > high {
        return Err(format!("{spec:?}: the range is backwards"));
    }
    Ok((proto, PortRange { low, high }))
}

/// One inbound rule of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledRule {
    /// Index of the `[[allow]]` entry in the file (counters and `policy explain` name it).
    pub id: u32,
    pub sources: Vec<IpNet>,
    pub proto: Proto,
    pub ports: PortRange,
}

/// Everything a node needs to enforce: its inbound rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicy {
    pub rules: Vec<CompiledRule>,
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
        for p in &rule.ports {
            let (proto, ports) = parse_ports(p.get_ref()).expect("checked when the file was parsed");
            rules.push(CompiledRule {
                id: id as u32,
                sources: sources.clone(),
                proto,
                ports,
            });
        }
    }
    NodePolicy { rules }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_into_protocol_and_range() {
        assert_eq!(
            parse_ports("tcp/443"),
            Ok((Proto::Tcp, PortRange { low: 443, high: 443 }))
        );
        assert_eq!(
            parse_ports("udp/5000-5010"),
            Ok((Proto::Udp, PortRange { low: 5000, high: 5010 }))
        );
        assert_eq!(parse_ports("tcp"), Ok((Proto::Tcp, PortRange::ALL)));
        assert_eq!(
            parse_ports("icmp/echo"),
            Ok((Proto::Icmp, PortRange { low: 8, high: 8 }))
        );
        assert_eq!(parse_ports("any"), Ok((Proto::Any, PortRange::ALL)));
        assert!(parse_ports("tcp/10-1").unwrap_err().contains("backwards"));
        assert!(parse_ports("icmp/300").is_err() && parse_ports("any/1").is_err());
    }

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
