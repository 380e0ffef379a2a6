//! Fuzz entry points: one function per target, each taking the raw fuzzer input. Every place
//! where bytes from outside enter the daemon has one (the wire, the handshake and data paths,
//! STUN, port-mapping answers, netlink, the SSH carrier's framing, the coordinator protocol in
//! both directions, the files an operator writes), and the two policy enforcers and the XDP
//! shield are fuzzed against their userspace twins.
//!
//! The targets in `fuzz/fuzz_targets/` are one line each and call these; the normal test suite
//! replays every committed corpus file and every kept crash through the same functions
//! (`corpus_and_regressions_replay`), so a crash found once stays a test. A target panics only
//! when it has found a bug: bad input must be an error or a counted drop.
//!
//! Structure-aware targets read their input with `arbitrary` (the coordinator messages, policy
//! files, the handshake and data sessions); the rest take bytes as they come off the wire.
//! Everything is deterministic — fixed keys, a virtual clock — so a crash reproduces.
//!
//! Built only with the `fuzzing` feature (the fuzz crate turns it on) and for tests.

mod bytes;
mod control;
mod enforcers;
mod files;
mod noise;
pub mod seeds;

pub use bytes::{netlink, portmap, ssh_framing, stun, upnp, wire};
pub use control::{coordinator, node};
pub use enforcers::{acl_vs_matcher, inner_ip, offload, shield_vs_classifier};
pub use files::{authorized_keys, config, policy};
pub use noise::{data, handshake};

/// A target's entry point.
pub type Entry = fn(&[u8]);

/// Every target: its name (the file in `fuzz/fuzz_targets/` and its corpus folder) and entry.
pub const TARGETS: &[(&str, Entry)] = &[
    ("wire", wire),
    ("stun", stun),
    ("portmap", portmap),
    ("upnp", upnp),
    ("netlink", netlink),
    ("ssh_framing", ssh_framing),
    ("handshake", handshake),
    ("data", data),
    ("coordinator", coordinator),
    ("node", node),
    ("policy", policy),
    ("authorized_keys", authorized_keys),
    ("config", config),
    ("inner_ip", inner_ip),
    ("acl_vs_matcher", acl_vs_matcher),
    ("shield_vs_classifier", shield_vs_classifier),
    ("offload", offload),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every committed seed and every kept crash, through its target. A target without a seed
    /// corpus fails: the CI fuzz step starts from these.
    #[test]
    fn corpus_and_regressions_replay() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut replayed = 0;
        for (name, entry) in super::TARGETS {
            let mut seeds = 0;
            for kind in ["corpus", "regressions"] {
                let dir = fuzz.join(kind).join(name);
                let Ok(files) = std::fs::read_dir(&dir) else {
                    assert!(
                        kind != "corpus",
                        "target {name} has no seed corpus in {}",
                        dir.display()
                    );
                    continue;
                };
                for file in files {
                    let path = file.unwrap().path();
                    let input = std::fs::read(&path).unwrap();
                    // A panic names the file (the test harness prints it with the message).
                    eprintln!("{}", path.display());
                    entry(&input);
                    seeds += usize::from(kind == "corpus");
                    replayed += 1;
                }
            }
            assert!(seeds > 0, "target {name}: empty seed corpus");
        }
        assert!(replayed >= super::TARGETS.len());
    }

    /// The fuzz crate has a target file for every entry here, and no other.
    #[test]
    fn every_target_has_a_fuzz_target_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|f| f.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut names: Vec<String> = super::TARGETS.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        assert_eq!(files, names);
        let manifest = std::fs::read_to_string(dir.with_file_name("Cargo.toml")).unwrap();
        for name in names {
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "fuzz/Cargo.toml lacks a [[bin]] for {name}"
            );
        }
    }
}
