//! `cargo xtask bench`: throughput, latency and CPU cost of the tunnel against raw veth.
//!
//! Two namespaces joined by a veth, a TunnelMesh node in each. iperf3 measures one TCP stream
//! each way and four streams; ping measures round-trip time; the daemons' CPU time comes from
//! `/proc/<pid>/stat`. The same runs over the bare veth give the reference. Prints a table and
//! writes JSON to `target/bench/tunnel.json`. Benchmarks only report; they assert nothing.

use std::{fs, process::Stdio, thread, time::Duration};

use serde_json::{Value, json};
use tunnelmesh_tests::{Lab, NodeOptions};

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

/// One iperf3 run from `client_ns` to `server_ns`'s `dst`; bits per second received.
fn iperf(lab: &Lab, server_ns: &str, client_ns: &str, dst: &str, extra: &str) -> f64 {
    let mut server = lab
        .sh_cmd(server_ns, "iperf3 -s -1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3");
    thread::sleep(Duration::from_millis(300));
    let out = lab.sh(client_ns, &format!("iperf3 -c {dst} -t {SECONDS} -J {extra}"));
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0)
}

/// Average ping RTT in milliseconds.
fn ping_ms(lab: &Lab, ns: &str, dst: &str) -> f64 {
    let out = lab.sh(ns, &format!("ping -n -q -c 50 -i 0.02 {dst}"));
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 0.040/0.052/0.081/0.009 ms
    text.lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    let suite = std::env::args().nth(1).unwrap_or_else(|| "tunnel".into());
    if suite != "tunnel" {
        eprintln!("unknown bench suite {suite:?}; available: tunnel");
        std::process::exit(2);
    }
    let (lab, a, b) = Lab::pair(200, &NodeOptions::default(), &NodeOptions::default());
    let (ns_a, ns_b) = (lab.nodes[a].ns.clone(), lab.nodes[b].ns.clone());
    assert!(lab.ping(&ns_a, &lab.nodes[b].mesh4.to_string(), 2), "tunnel is up");
    let pids = [lab.pid(a).expect("a runs"), lab.pid(b).expect("b runs")];
    let cpu = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();

    let mut rows = Vec::new();
    for (path, dst_b, dst_a) in [
        (
            "raw veth",
            lab.nodes[b].underlay.to_string(),
            lab.nodes[a].underlay.to_string(),
        ),
        (
            "tunnelmesh",
            lab.nodes[b].mesh4.to_string(),
            lab.nodes[a].mesh4.to_string(),
        ),
    ] {
        let runs = [
            ("1 stream a→b", &ns_b, &ns_a, &dst_b, ""),
            ("1 stream b→a", &ns_a, &ns_b, &dst_a, ""),
            ("4 streams a→b", &ns_b, &ns_a, &dst_b, "-P 4"),
        ];
        for (name, server, client, dst, extra) in runs {
            let before = cpu();
            let bps = iperf(&lab, server, client, dst, extra);
            let daemon_cpu = cpu() - before;
            let gbit = bps * SECONDS as f64 / 1e9;
            rows.push(json!({
                "path": path, "test": name, "gbit_per_s": bps / 1e9,
                "daemon_cpu_s": if path == "tunnelmesh" { json!(daemon_cpu) } else { Value::Null },
                "daemon_cpu_s_per_gbit": if path == "tunnelmesh" && gbit > 0.0 { json!(daemon_cpu / gbit) } else { Value::Null },
            }));
        }
        rows.push(json!({ "path": path, "test": "ping rtt avg", "ms": ping_ms(&lab, &ns_a, &dst_b) }));
    }

    println!("| path | test | throughput | daemon CPU s (both) | CPU s per Gbit | RTT |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let f =
            |k: &str, unit: &str, prec: usize| r[k].as_f64().map_or("–".to_string(), |v| format!("{v:.prec$}{unit}"));
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r["path"].as_str().unwrap(),
            r["test"].as_str().unwrap(),
            f("gbit_per_s", " Gbit/s", 2),
            f("daemon_cpu_s", "", 2),
            f("daemon_cpu_s_per_gbit", "", 3),
            f("ms", " ms", 3)
        );
    }
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    let doc = json!({ "suite": "tunnel", "seconds_per_run": SECONDS, "cores": nproc, "results": rows });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&dir).expect("target/bench");
    let file = dir.join("tunnel.json");
    fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).expect("write JSON");
    println!("\nJSON: {}", file.display());
}
