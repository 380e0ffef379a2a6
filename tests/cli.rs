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

/// Starts a coordinator with `args` before the subcommand, stderr to a file, until "coordinator
/// up" is logged; returns what it logged.
fn coordinator_log(global: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(bin())
        .args(global)
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--stun-port",
            "0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        // Inherited from a test run under systemd, it must not send our stderr to the journal.
        .env("JOURNAL_STREAM", "0:0")
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the coordinator");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let text = fs::read_to_string(&log).unwrap();
        if text.contains("coordinator up") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("coordinator up"),
        "the coordinator did not come up:\n{text}"
    );
    text
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal_and_json_is_one_object_per_line() {
    let text = coordinator_log(&[]);
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal:\n{text}"
    );
    assert!(text.contains("WARN") && text.contains("no --policy"), "{text}");

    let json = coordinator_log(&["--log-format", "json"]);
    let mut warned = false;
    for line in json.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let message = v["fields"]["message"].as_str().expect("fields.message");
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        warned |= v["level"] == "WARN" && message.contains("no --policy");
    }
    assert!(warned, "the default-deny warning is missing:\n{json}");

    let (ok, _, stderr) = tunnelmesh(&["--log-format", "xml", "status"]);
    assert!(!ok);
    assert!(
        stderr.contains("invalid value 'xml'") && stderr.contains("text, json"),
        "{stderr}"
    );
}
