//! `cargo xtask bench [SUITE]`: the benchmark suites (tables on stdout, JSON under
//! `target/bench/`). `tunnel` (the default, in `bench/tunnel.rs`) compares TunnelMesh with raw
//! veth, wireguard-go and boringtun-cli; `crypto` times the AEAD candidates; `coordinator`,
//! `shield` and `paths` time the control plane, the XDP shield and the fallback paths (each suite
//! in `bench/`). Benchmarks only report; they assert nothing.

use std::{fs, process::Stdio, thread, time::Duration};

use serde_json::Value;
use tunnelmesh_tests::Lab;

#[path = "bench/crypto.rs"]
mod crypto;
#[path = "bench/tunnel.rs"]
mod tunnel;

const SECONDS: u32 = 5;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / ticks
}

/// One iperf3 run from `client_ns` to `server_ns`'s `dst`: its JSON report (null if the client
/// failed: a benchmark reports what it got).
fn iperf3(lab: &Lab, server_ns: &str, client_ns: &str, dst: &str, extra: &str) -> Value {
    let mut server = lab
        .sh_cmd(server_ns, "iperf3 -s -1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3");
    thread::sleep(Duration::from_millis(300));
    let out = lab
        .sh_cmd(client_ns, &format!("iperf3 -c {dst} -t {SECONDS} -J {extra}"))
        .output();
    let _ = server.kill();
    let _ = server.wait();
    out.ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null)
}

/// One iperf3 run from `client_ns` to `server_ns`'s `dst`; bits per second received.
fn iperf(lab: &Lab, server_ns: &str, client_ns: &str, dst: &str, extra: &str) -> f64 {
    iperf3(lab, server_ns, client_ns, dst, extra)["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
}

/// Run `ping ARGS DST` in `ns`: (average RTT in ms, loss in %).
fn ping_stats(lab: &Lab, ns: &str, args: &str, dst: &str) -> (f64, f64) {
    let out = lab.sh(ns, &format!("ping -n -q {args} {dst}"));
    let text = String::from_utf8_lossy(&out.stdout);
    // "…, 0% packet loss, …" and "rtt min/avg/max/mdev = 0.040/0.052/0.081/0.009 ms"
    let loss = text
        .split(',')
        .find(|p| p.contains("packet loss"))
        .and_then(|p| p.trim().split('%').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let rtt = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    (rtt, loss)
}

/// Average RTT of 50 pings, in milliseconds.
fn ping_ms(lab: &Lab, ns: &str, dst: &str) -> f64 {
    ping_stats(lab, ns, "-c 50 -i 0.02", dst).0
}

fn main() {
    let suite = std::env::args().nth(1).unwrap_or_else(|| "tunnel".into());
    match suite.as_str() {
        "tunnel" => tunnel::run(),
        "coordinator" => coordinator::run(),
        "shield" => shield::run(),
        "paths" => paths::run(),
        "crypto" => crypto::run(),
        other => {
            eprintln!("unknown bench suite {other:?}; available: tunnel, crypto, coordinator, shield, paths");
            std::process::exit(2);
        }
    }
}

fn write_json(name: &str, doc: &Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&dir).expect("target/bench");
    let file = dir.join(format!("{name}.json"));
    fs::write(&file, serde_json::to_string_pretty(doc).unwrap()).expect("write JSON");
    println!("\nJSON: {}", file.display());
}

#[path = "bench/coordinator.rs"]
mod coordinator;

#[path = "bench/shield.rs"]
mod shield;

#[path = "bench/paths.rs"]
mod paths;
