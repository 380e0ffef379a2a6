//! The `tunnelmesh` command line as a user meets it: identity display and the errors bad input gets.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command};

use tunnelmesh_tests::{bin, host};

fn keygen(dir: &Path, name: &str, args: &[&str]) -> String {
    let path = dir.join(name);
    host(
        &[
            &["ssh-keygen", "-q", "-C", "me@host", "-f", path.to_str().unwrap()],
            args,
        ]
        .concat(),
    );
    path.to_str().unwrap().to_string()
}

fn tunnelmesh(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run tunnelmesh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn identity_show_prints_what_ssh_keygen_prints_and_a_wireguard_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "id", &["-t", "ed25519", "-N", ""]);
    let (ok, stdout, stderr) = tunnelmesh(&["identity", "show", "--identity", &key]);
    assert!(ok, "{stderr}");
    let expected = String::from_utf8(host(&["ssh-keygen", "-lf", &key]).stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some(expected.trim_end()));
    let wg = lines
        .next()
        .unwrap()
        .strip_prefix("mesh public key: ")
        .expect("labelled");
    assert_eq!(wg.len(), 44, "32 bytes in base64");
}

#[test]
fn identity_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = keygen(dir.path(), "rsa", &["-t", "rsa", "-b", "2048", "-N", ""]);
    let (ok, _, stderr) = tunnelmesh(&["identity", "show", "--identity", &rsa]);
    assert!(
        !ok && stderr.contains("is RSA") && stderr.contains("ssh-keygen -t ed25519"),
        "{stderr}"
    );
    let (ok, _, stderr) = tunnelmesh(&["identity", "show", "--identity", "/nonexistent/key"]);
    assert!(
        !ok && stderr.contains("/nonexistent/key") && stderr.contains("--identity"),
        "{stderr}"
    );
    let enc = keygen(dir.path(), "enc", &["-t", "ed25519", "-N", "passphrase"]);
    let (ok, _, stderr) = tunnelmesh(&["identity", "show", "--identity", &enc]);
    assert!(
        !ok && stderr.contains("encrypted") && stderr.contains("terminal"),
        "{stderr}"
    );
    let open = keygen(dir.path(), "open", &["-t", "ed25519", "-N", ""]);
    fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, stderr) = tunnelmesh(&["identity", "show", "--identity", &open]);
    assert!(!ok && stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn a_malformed_config_names_the_file_line_and_field_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "id", &["-t", "ed25519", "-N", ""]);
    let config = dir.path().join("bad.toml");
    fs::write(
        &config,
        "[interface]\nname = \"tmbadcfg0\"\nmesh_key = \"not base64!\"\naddresses = [\"10.99.0.1/24\"]\n",
    )
    .unwrap();
    let (ok, _, stderr) = tunnelmesh(&["up", "--config", config.to_str().unwrap(), "--identity", &key]);
    assert!(!ok, "a bad config must not start");
    assert!(
        stderr.contains(config.to_str().unwrap()) && stderr.contains("line 3") && stderr.contains("mesh_key"),
        "{stderr}"
    );
    assert!(!Path::new("/sys/class/net/tmbadcfg0").exists(), "nothing was created");
    let (ok, _, stderr) = tunnelmesh(&["up", "--config", "/nonexistent.toml", "--identity", &key]);
    assert!(!ok && stderr.contains("/nonexistent.toml"), "{stderr}");
}

#[test]
fn policy_check_reports_the_line_and_reason_or_ok() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    fs::write(&good, "[groups]\nops = [\"laptop\"]\n\n[[allow]]\nfrom = [\"group:ops\"]\nto = [\"tag:web\"]\nports = [\"tcp/443\"]\n").unwrap();
    let (ok, stdout, stderr) = tunnelmesh(&["coordinator", "policy", "check", good.to_str().unwrap()]);
    assert!(
        ok && stdout.contains("ok (1 allow rules, 1 groups)"),
        "{stdout}{stderr}"
    );
    let bad = dir.path().join("bad.toml");
    fs::write(
        &bad,
        "[[allow]]\nfrom = [\"group:ops\"]\nto = [\"tag:web\"]\nports = [\"tcp/443\"]\n",
    )
    .unwrap();
    let (ok, _, stderr) = tunnelmesh(&["coordinator", "policy", "check", bad.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("bad.toml: line 2: unknown group \"ops\""),
        "{stderr}"
    );
}
