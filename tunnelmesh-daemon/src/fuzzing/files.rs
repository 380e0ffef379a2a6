//! Targets for the files an operator writes: the policy file (text, or built from selectors,
//! groups and port specs so the compiler and the matcher are reached), `authorized_keys` and
//! the static config. A file either parses or is an error naming its line; what parses
//! compiles into rules that only ever let members reach the node's own addresses.

use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};

use crate::{
    coordinator::admission::parse_authorized_keys,
    fastpath::acl::KernelTables,
    node::config::Config,
    policy::{Conntrack, Member, PolicyFile, Verdict, compile_for, decide},
};

const NAMES: [&str; 4] = ["laptop", "web", "db", "ops"];
const TAGS: [&str; 3] = ["web", "ops", "prod"];
const GROUPS: [&str; 3] = ["admins", "servers", "everyone"];

#[derive(Debug, Arbitrary)]
pub(super) enum Selector {
    Any,
    Name(u8),
    Tag(u8),
    Group(u8),
    Text(String),
}

impl Selector {
    fn render(&self) -> String {
        match self {
            Selector::Any => "*".into(),
            Selector::Name(i) => NAMES[usize::from(*i) % NAMES.len()].into(),
            Selector::Tag(i) => format!("tag:{}", TAGS[usize::from(*i) % TAGS.len()]),
            Selector::Group(i) => format!("group:{}", GROUPS[usize::from(*i) % GROUPS.len()]),
            Selector::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
pub(super) enum Ports {
    Tcp(Option<(u16, Option<u16>)>),
    Udp(Option<(u16, Option<u16>)>),
    Icmp(Option<u8>),
    Echo,
    Any,
    Text(String),
}

impl Ports {
    fn render(&self) -> String {
        let range = |proto: &str, r: &Option<(u16, Option<u16>)>| match r {
            None => proto.to_string(),
            Some((low, None)) => format!("{proto}/{low}"),
            Some((low, Some(high))) => format!("{proto}/{low}-{high}"),
        };
        match self {
            Ports::Tcp(r) => range("tcp", r),
            Ports::Udp(r) => range("udp", r),
            Ports::Icmp(None) => "icmp".into(),
            Ports::Icmp(Some(t)) => format!("icmp/{t}"),
            Ports::Echo => "icmp/echo".into(),
            Ports::Any => "any".into(),
            Ports::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
pub(super) struct Rule {
    from: Vec<Selector>,
    to: Vec<Selector>,
    ports: Vec<Ports>,
}

#[derive(Debug, Arbitrary)]
pub(super) enum Policy {
    Built {
        groups: Vec<(u8, Vec<Selector>)>,
        rules: Vec<Rule>,
    },
    Text(String),
}

fn quoted(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.map(|s| toml::Value::String(s).to_string()).collect();
    format!("[{}]", items.join(", "))
}

impl Policy {
    pub(super) fn render(&self) -> String {
        match self {
            Policy::Text(t) => t.clone(),
            Policy::Built { groups, rules } => {
                let mut text = String::new();
                if !groups.is_empty() {
                    text.push_str("[groups]\n");
                    let mut seen = std::collections::HashSet::new();
                    for (g, members) in groups {
                        let name = GROUPS[usize::from(*g) % GROUPS.len()];
                        if seen.insert(name) {
                            text.push_str(&format!("{name} = {}\n", quoted(members.iter().map(Selector::render))));
                        }
                    }
                }
                for r in rules {
                    text.push_str(&format!(
                        "\n[[allow]]\nfrom = {}\nto = {}\nports = {}\n",
                        quoted(r.from.iter().map(Selector::render)),
                        quoted(r.to.iter().map(Selector::render)),
                        quoted(r.ports.iter().map(Ports::render)),
                    ));
                }
                text
            }
        }
    }
}

pub(super) fn members() -> Vec<Member> {
    NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| Member {
            name: n.to_string(),
            tags: TAGS.iter().skip(i % 2).step_by(2).map(|t| t.to_string()).collect(),
            addresses: vec![
                format!("100.64.0.{}/32", i + 1).parse().expect("an address"),
                format!("fd00::{}/128", i + 1).parse().expect("an address"),
            ],
        })
        .collect()
}

/// A policy file: parsed (or refused with its line), compiled for every member; every rule a
/// member receives has sources among the other members and applies only to its own addresses;
/// the kernel's tables build from it, and a packet a rule names is allowed by that rule or an
/// earlier one.
pub fn policy(data: &[u8]) {
    let Ok(input) = Policy::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let text = input.render();
    let file = match PolicyFile::parse(&text) {
        Ok(f) => f,
        Err(e) => {
            // An error at the very end names the line after the last newline.
            assert!(e.line >= 1 && e.line <= text.lines().count() + 1, "{e} in {text:?}");
            return;
        }
    };
    let members = members();
    for me in &members {
        let compiled = compile_for(&file, &members, &me.name);
        assert_eq!(
            compiled.destinations,
            me.addresses
                .iter()
                .map(|a| ipnet::IpNet::from(a.addr()))
                .collect::<Vec<_>>()
        );
        for rule in &compiled.rules {
            assert!((rule.id as usize) < file.rules.len());
            for source in &rule.sources {
                assert!(
                    members
                        .iter()
                        .any(|m| m.name != me.name && m.addresses.contains(source)),
                    "{source} is no other member's"
                );
            }
        }
        let _ = KernelTables::build(&compiled);
        // A TCP rule's first port from its first source reaches the node by that rule or an
        // earlier one.
        let mut conntrack = Conntrack::new(16);
        for rule in compiled.rules.iter().filter(|r| r.proto == crate::policy::Proto::Tcp) {
            let (Some(src), Some(dst)) = (
                rule.sources.iter().find(|s| s.addr().is_ipv4()),
                me.addresses.iter().find(|a| a.addr().is_ipv4()),
            ) else {
                continue;
            };
            let packet = tcp_packet(src.addr(), dst.addr(), rule.ports.low);
            match decide(&compiled, &mut conntrack, &packet, Instant::now()) {
                Verdict::Allow(id) => assert!(id <= rule.id, "rule {} allows it, {id} said so", rule.id),
                other => panic!("rule {} names {packet:?}, verdict {other:?}", rule.id),
            }
        }
    }
}

fn tcp_packet(src: std::net::IpAddr, dst: std::net::IpAddr, port: u16) -> Vec<u8> {
    let (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) = (src, dst) else {
        unreachable!("IPv4 only")
    };
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[32] = 5 << 4;
    p
}

/// `authorized_keys`: every line is admitted or named with its problem, never both.
pub fn authorized_keys(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (keys, problems) = parse_authorized_keys(text);
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
        .count();
    assert!(keys.len() + problems.len() <= lines);
}

/// The static config: valid, or an error that says what is wrong.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text) {
        assert!(!e.to_string().is_empty());
    }
}
