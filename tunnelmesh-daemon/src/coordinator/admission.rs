//! Who may join: the `authorized_keys` file and enrollment tokens.
//!
//! `authorized_keys` is OpenSSH's format; TunnelMesh reads two options on each line:
//!
//! ```text
//! tunnelmesh-name="web1",tunnelmesh-tags="web,prod" ssh-ed25519 AAAA... root@web1
//! ```
//!
//! Only ed25519 keys are accepted (other lines are reported and skipped). Tokens are random
//! strings shown once; only their SHA-256 is stored.

use std::{collections::HashMap, path::Path};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::identity::PublicIdentity;

/// A key the operator admitted in `authorized_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    pub name: Option<String>,
    pub tags: Vec<String>,
}

/// Parse an authorized_keys text. Returns admitted keys by fingerprint and the problems found
/// (line number and reason) for lines that were skipped.
pub fn parse_authorized_keys(text: &str) -> (HashMap<String, AuthorizedKey>, Vec<String>) {
    let mut keys = HashMap::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = match line.parse::<ssh_key::authorized_keys::Entry>() {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("line {}: {e}", n + 1));
                continue;
            }
        };
        let Ok(identity) = PublicIdentity::from_ssh_line(&entry.public_key().to_openssh().unwrap_or_default()) else {
            problems.push(format!(
                "line {}: not an ed25519 key; TunnelMesh identities are ed25519",
                n + 1
            ));
            continue;
        };
        let mut admitted = AuthorizedKey {
            name: None,
            tags: Vec::new(),
        };
        for opt in entry.config_opts().iter() {
            if let Some((k, v)) = opt.split_once('=') {
                let v = v.trim_matches('"');
                match k {
                    "tunnelmesh-name" => admitted.name = Some(v.to_string()),
                    "tunnelmesh-tags" => {
                        admitted.tags = v.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect()
                    }
                    _ => {}
                }
            }
        }
        if let Some(name) = &admitted.name
            && let Err(e) = check_name(name)
        {
            problems.push(format!("line {}: {e}", n + 1));
            continue;
        }
        keys.insert(identity.fingerprint(), admitted);
    }
    (keys, problems)
}

/// Read and parse an authorized_keys file.
pub fn read_authorized_keys(path: &Path) -> Result<(HashMap<String, AuthorizedKey>, Vec<String>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(parse_authorized_keys(&text))
}

/// Node names: 1–63 of `a-z 0-9 -`, starting with a letter or digit (usable as a DNS label).
/// A node name DNS and the policy file could not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid node name: use 1-63 of a-z, 0-9 and '-'")]
pub struct BadName(pub String);

pub fn check_name(name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if ok { Ok(()) } else { Err(BadName(name.into())) }
}

/// Turn a key comment (`user@host`: the host part) or hostname into a valid name, if possible.
pub fn name_from(hint: &str) -> Option<String> {
    let base = hint.split('@').next_back().unwrap_or(hint).to_ascii_lowercase();
    let cleaned: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cleaned = cleaned.trim_matches('-').chars().take(63).collect::<String>();
    check_name(&cleaned).ok().map(|_| cleaned)
}

/// Which names the holders of a token may take: `*` (any free name no policy rule names and no
/// `authorized_keys` line reserves), `prefix*` (names starting with it), or one exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenNames {
    Any,
    Prefix(String),
    Exactly(String),
}

impl TokenNames {
    /// Parse `--names`: `*`, `prefix*` or a name.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let bad = |e: BadName| format!("--names {pattern:?}: {e} (use `*`, `prefix*` or one name)");
        match pattern.strip_suffix('*') {
            Some("") => Ok(TokenNames::Any),
            Some(prefix) => {
                // The prefix with one more letter must be a valid name.
                check_name(&format!("{prefix}a")).map_err(bad)?;
                Ok(TokenNames::Prefix(prefix.to_string()))
            }
            None => {
                check_name(pattern).map_err(bad)?;
                Ok(TokenNames::Exactly(pattern.to_string()))
            }
        }
    }

    /// The stored form (what [`TokenNames::parse`] reads back).
    pub fn pattern(&self) -> String {
        match self {
            TokenNames::Any => "*".into(),
            TokenNames::Prefix(p) => format!("{p}*"),
            TokenNames::Exactly(n) => n.clone(),
        }
    }

    /// The name a holder takes: the one it asked for, else the token's exact name, else `derived`
    /// (from its key comment) under the token's prefix. `None` if the token forbids it.
    pub fn name_for(&self, asked: Option<&str>, derived: &str) -> Result<String, String> {
        match (self, asked) {
            (TokenNames::Exactly(n), None) => Ok(n.clone()),
            (TokenNames::Exactly(n), Some(a)) if a == n => Ok(n.clone()),
            (TokenNames::Exactly(n), Some(a)) => Err(format!("this token admits only the name {n:?}, not {a:?}")),
            (TokenNames::Prefix(p), Some(a)) if a.starts_with(p.as_str()) => Ok(a.to_string()),
            (TokenNames::Prefix(p), Some(a)) => {
                Err(format!("this token admits only names starting with {p:?}, not {a:?}"))
            }
            (TokenNames::Prefix(p), None) if derived.starts_with(p.as_str()) => Ok(derived.to_string()),
            (TokenNames::Prefix(p), None) => Ok(format!("{p}{derived}").chars().take(63).collect()),
            (TokenNames::Any, a) => Ok(a.unwrap_or(derived).to_string()),
        }
    }
}

/// A new enrollment token and its stored hash.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!("tmtok_{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = token_hash(&token);
    (token, hash)
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHIharsaew3kq9pJB0LJAOc0Sg5CPOkGdMBJ2l7MEmRG peer@test";

    #[test]
    fn options_give_name_and_tags_and_bad_lines_are_reported() {
        let text = format!(
            "# comment\ntunnelmesh-name=\"web1\",tunnelmesh-tags=\"web,prod\" {KEY}\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ bad\ngarbage\n"
        );
        let (keys, problems) = parse_authorized_keys(&text);
        assert_eq!(keys.len(), 1);
        let k = keys.values().next().unwrap();
        assert_eq!(k.name.as_deref(), Some("web1"));
        assert_eq!(k.tags, ["web", "prod"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("line 3") && problems[1].starts_with("line 4"),
            "{problems:?}"
        );
    }

    #[test]
    fn names_are_dns_labels_and_tokens_hash_stably() {
        assert!(check_name("web-1").is_ok());
        assert!(check_name("Web").is_err() && check_name("-x").is_err() && check_name("").is_err());
        assert_eq!(name_from("root@Web_Server.1").as_deref(), Some("web-server-1"));
        let (t, h) = new_token();
        assert!(t.starts_with("tmtok_"));
        assert_eq!(token_hash(&t), h);
        assert_ne!(new_token().0, t);
    }

    #[test]
    fn a_token_decides_the_names_its_holders_take() {
        let any = TokenNames::parse("*").unwrap();
        let ci = TokenNames::parse("ci-*").unwrap();
        let laptop = TokenNames::parse("laptop").unwrap();
        assert_eq!(
            (any.pattern(), ci.pattern(), laptop.pattern()),
            ("*".into(), "ci-*".into(), "laptop".into())
        );
        assert_eq!(any.name_for(Some("db"), "host"), Ok("db".into()));
        assert_eq!(any.name_for(None, "host"), Ok("host".into()));
        assert_eq!(ci.name_for(Some("ci-7"), "host"), Ok("ci-7".into()));
        assert!(
            ci.name_for(Some("db"), "host")
                .unwrap_err()
                .contains("starting with \"ci-\"")
        );
        assert_eq!(ci.name_for(None, "runner3"), Ok("ci-runner3".into()));
        assert_eq!(laptop.name_for(None, "host"), Ok("laptop".into()));
        assert!(laptop.name_for(Some("db"), "host").is_err());
        for bad in ["Web*", "-*", "a b", ""] {
            assert!(TokenNames::parse(bad).is_err(), "{bad:?}");
        }
    }
}
