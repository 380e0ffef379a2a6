//! The policy file (TOML), as the operator writes it.
//!
//! ```toml
//! [groups]
//! admins = ["laptop", "tag:ops"]          # node names, tags, other groups
//!
//! [[allow]]
//! from = ["group:admins"]                 # "*", a node name, "tag:x" or "group:x"
//! to = ["tag:web"]
//! ports = ["tcp/443", "tcp/8000-8100", "udp/53", "icmp/echo"]
//! ```
//!
//! Nothing is reachable unless a rule allows it. `ports` items: `tcp`, `udp` (every port),
//! `tcp/PORT`, `tcp/LOW-HIGH`, `udp/…`, `icmp` (every ICMP/ICMPv6 type), `icmp/echo`
//! (echo request), `icmp/TYPE`, `any`. Errors name the line and say what is wrong.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::ports::{PortRange, Proto, parse_ports};

/// A node as policy sees it: its name, tags and mesh addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub tags: Vec<String>,
    pub addresses: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Line of the `[[allow]]` header (filled in by [`PolicyFile::parse`]).
    #[serde(skip)]
    pub line: usize,
    pub from: Vec<Spanned<String>>,
    pub to: Vec<Spanned<String>>,
    pub ports: Vec<Spanned<String>>,
    /// `ports` parsed (filled in by [`PolicyFile::parse`]), in the same order.
    #[serde(skip)]
    pub parsed_ports: Vec<(Proto, PortRange)>,
}

/// The parsed policy file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<Spanned<String>>>,
    #[serde(default, rename = "allow")]
    pub rules: Vec<Rule>,
    /// Each group flattened to the selectors it ends in (`*`, names, `tag:…`), computed once by
    /// [`PolicyFile::parse`]: selecting never recurses, so nesting costs nothing at compile time.
    #[serde(skip)]
    resolved: BTreeMap<String, Vec<String>>,
}

/// A `from`/`to` entry or group member that selects nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown group {0:?}; define it under [groups]")]
    UnknownGroup(String),
    #[error("{0:?} is not a selector: use \"*\", a node name, \"tag:NAME\" or \"group:NAME\"")]
    NotASelector(String),
}

/// A policy file that does not parse or refers to something that does not exist.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct PolicyError {
    pub line: usize,
    pub reason: String,
}

impl PolicyFile {
    /// Parse and check `text`; every error names its line.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError {
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            reason: e.message().to_string(),
        })?;
        let at = |s: &Spanned<String>| line_of(text, s.span().start);
        // The `[[allow]]` header above each rule's first key.
        let headers: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim() == "[[allow]]")
            .map(|(i, _)| i + 1)
            .collect();
        for (rule, line) in file.rules.iter_mut().zip(headers) {
            rule.line = line;
        }
        for (name, members) in &file.groups {
            for m in members {
                file.check_selector(m.get_ref()).map_err(|e| PolicyError {
                    line: at(m),
                    reason: e.to_string(),
                })?;
                if m.get_ref() == &format!("group:{name}") {
                    return Err(PolicyError {
                        line: at(m),
                        reason: format!("group {name:?} contains itself"),
                    });
                }
            }
        }
        file.resolved = file.resolve_groups(&at)?;
        for rule in &file.rules {
            for s in rule.from.iter().chain(&rule.to) {
                file.check_selector(s.get_ref()).map_err(|e| PolicyError {
                    line: at(s),
                    reason: e.to_string(),
                })?;
            }
        }
        for rule in &mut file.rules {
            rule.parsed_ports = rule
                .ports
                .iter()
                .map(|p| {
                    parse_ports(p.get_ref()).map_err(|e| PolicyError {
                        line: at(p),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        for rule in &file.rules {
            if rule.ports.is_empty() {
                let line = rule.from.first().map_or(1, at);
                return Err(PolicyError {
                    line,
                    reason: "an allow rule needs ports, e.g. ports = [\"tcp/443\"] or [\"any\"]".into(),
                });
            }
        }
        Ok(file)
    }

    fn check_selector(&self, s: &str) -> Result<(), SelectorError> {
        if let Some(group) = s.strip_prefix("group:") {
            if !self.groups.contains_key(group) {
                return Err(SelectorError::UnknownGroup(group.into()));
            }
        } else if s.strip_prefix("tag:").is_some_and(str::is_empty) || s.is_empty() {
            return Err(SelectorError::NotASelector(s.into()));
        }
        Ok(())
    }

    /// Flatten every group into its leaf selectors; a group reached again while it is being
    /// flattened is a cycle (`a` contains `b` contains `a`), refused with the line that closes it.
    fn resolve_groups(
        &self,
        at: &dyn Fn(&Spanned<String>) -> usize,
    ) -> Result<BTreeMap<String, Vec<String>>, PolicyError> {
        fn visit(
            file: &PolicyFile,
            group: &str,
            at: &dyn Fn(&Spanned<String>) -> usize,
            on_path: &mut Vec<String>,
            done: &mut BTreeMap<String, Vec<String>>,
        ) -> Result<(), PolicyError> {
            if done.contains_key(group) {
                return Ok(());
            }
            on_path.push(group.to_string());
            let mut leaves: Vec<String> = Vec::new();
            for m in file.groups.get(group).into_iter().flatten() {
                match m.get_ref().strip_prefix("group:") {
                    Some(inner) if on_path.iter().any(|g| g == inner) => {
                        let cycle = on_path.join(" → ");
                        return Err(PolicyError {
                            line: at(m),
                            reason: format!(
                                "groups contain each other: {cycle} → {inner}; remove one of the references"
                            ),
                        });
                    }
                    Some(inner) => {
                        visit(file, inner, at, on_path, done)?;
                        leaves.extend(done.get(inner).into_iter().flatten().cloned());
                    }
                    None => leaves.push(m.get_ref().clone()),
                }
            }
            leaves.sort();
            leaves.dedup();
            on_path.pop();
            done.insert(group.to_string(), leaves);
            Ok(())
        }
        let mut done = BTreeMap::new();
        for group in self.groups.keys() {
            visit(self, group, at, &mut Vec::new(), &mut done)?;
        }
        Ok(done)
    }

    /// Every node name a rule selects by name (directly or through a group): names a token
    /// holder may not take for itself.
    pub fn named_nodes(&self) -> std::collections::BTreeSet<String> {
        let leaves = |selector: &str| -> Vec<String> {
            match selector.strip_prefix("group:") {
                Some(group) => self.resolved.get(group).cloned().unwrap_or_default(),
                None => vec![selector.to_string()],
            }
        };
        self.rules
            .iter()
            .flat_map(|r| r.from.iter().chain(&r.to))
            .flat_map(|s| leaves(s.get_ref()))
            .filter(|leaf| leaf != "*" && !leaf.starts_with("tag:"))
            .collect()
    }

    /// Whether `member` is selected by `selector`.
    pub fn selects(&self, selector: &str, member: &Member) -> bool {
        match selector.strip_prefix("group:") {
            Some(group) => self
                .resolved
                .get(group)
                .is_some_and(|leaves| leaves.iter().any(|leaf| selects_leaf(leaf, member))),
            None => selects_leaf(selector, member),
        }
    }
}

/// Whether `member` is selected by a selector that is not a group.
fn selects_leaf(selector: &str, member: &Member) -> bool {
    match selector {
        "*" => true,
        s if s.starts_with("tag:") => member.tags.iter().any(|t| t == &s[4..]),
        name => member.name == name,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line_and_the_reason() {
        let cases = [
            (
                "[[allow]]\nfrom = [\"group:nope\"]\nto = [\"*\"]\nports = [\"any\"]\n",
                2,
                "unknown group",
            ),
            (
                "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp/70000\"]\n",
                4,
                "port",
            ),
            (
                "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"sctp/1\"]\n",
                4,
                "protocol",
            ),
            (
                "[[allow]]\nfrom = [\"*\"]\nto = [\"tag:\"]\nports = [\"any\"]\n",
                3,
                "not a selector",
            ),
            ("[groups]\nx = [\"group:x\"]\n", 2, "contains itself"),
            (
                "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = []\n",
                2,
                "needs ports",
            ),
            (
                "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nport = [\"any\"]\n",
                4,
                "unknown field",
            ),
            ("[[allow]\n", 1, "invalid table header"),
            (
                "[groups]\na = [\"laptop\", \"group:b\"]\nb = [\"group:c\"]\nc = [\"group:a\"]\n",
                4,
                "a → b → c → a",
            ),
        ];
        for (text, line, reason) in cases {
            let err = PolicyFile::parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.reason.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn selectors_resolve_names_tags_and_nested_groups() {
        let p = PolicyFile::parse("[groups]\nops = [\"laptop\", \"group:sre\"]\nsre = [\"tag:oncall\"]\n").unwrap();
        let laptop = Member {
            name: "laptop".into(),
            tags: vec![],
            addresses: vec![],
        };
        let pager = Member {
            name: "pager".into(),
            tags: vec!["oncall".into()],
            addresses: vec![],
        };
        let web = Member {
            name: "web".into(),
            tags: vec!["web".into()],
            addresses: vec![],
        };
        assert!(p.selects("group:ops", &laptop) && p.selects("group:ops", &pager));
        assert!(!p.selects("group:ops", &web));
        assert!(p.selects("tag:web", &web) && p.selects("*", &web) && p.selects("web", &web));
    }
}
