//! `cargo xtask bench paths`: throughput and latency through the tunnel on each path type —
//! direct UDP, the SSH transport (UDP blocked by nftables), the coordinator's relay (everything
//! but the coordinator blocked) — between two coordinated peers on one switch.

use std::{fs, thread, time::Duration};

use serde_json::json;
use tunnelmesh_tests::{ALLOW_ALL, Lab, PORT, eventually};

use super::{SECONDS, cpu_seconds, iperf, ping_ms, write_json};

pub fn run() {
    let mut lab = Lab::new();
    let hosts = lab.switched(204, &["c", "p1", "p2"]);
    let p1 = lab.node("p1", &hosts[1].0, hosts[1].1, 1, PORT);
    let p2 = lab.node("p2", &hosts[2].0, hosts[2].1, 2, PORT);
    let authorized = lab.dir.path().join("authorized_keys");
    fs::write(
        &authorized,
        format!("{}\n{}\n", lab.nodes[p1].public_line, lab.nodes[p2].public_line),
    )
    .unwrap();
    // Measure what the relay can do, not its default per-peer limit.
    let c = lab.coordinator_with_policy(&hosts[0], &authorized, ALLOW_ALL, &["--relay-limit-mbit", "100000"]);
    lab.join(p1, &c, &[]);
    lab.join(p2, &c, &[]);
    let (ns1, ns2) = (lab.nodes[p1].ns.clone(), lab.nodes[p2].ns.clone());
    let mesh2 = lab.mesh_addrs(p2).0;
    let pids = [lab.pid(p1).unwrap(), lab.pid(p2).unwrap()];
    let cpu = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let mut rows = Vec::new();
    for (kind, block) in [("udp", None), ("ssh", Some("udp")), ("relay", Some("all"))] {
        lab.unblock_quietly(&ns1);
        lab.unblock_quietly(&ns2);
        if let Some(what) = block {
            lab.block(&ns1, hosts[2].1, what);
            lab.block(&ns2, hosts[1].1, what);
        }
        let _ = lab.ping_until_reply(&ns1, &mesh2, Duration::from_secs(10));
        eventually(&format!("both peers on {kind}"), Duration::from_secs(90), || {
            let _ = lab.ping(&ns1, &mesh2, 1);
            lab.peer_path(p1, p2) == kind && lab.peer_path(p2, p1) == kind
        });
        thread::sleep(Duration::from_secs(1));
        let before = cpu();
        let bps = iperf(&lab, &ns2, &ns1, &mesh2, "");
        let daemon_cpu = cpu() - before;
        let rtt = ping_ms(&lab, &ns1, &mesh2);
        rows.push(json!({
            "path": kind,
            "gbit_per_s": bps / 1e9,
            "rtt_ms": rtt,
            "daemon_cpu_s": daemon_cpu,
        }));
    }
    println!("| path | TCP through the tunnel (1 stream) | ping RTT | daemon CPU s (both) |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.3} Gbit/s | {:.3} ms | {:.2} |",
            r["path"].as_str().unwrap(),
            r["gbit_per_s"].as_f64().unwrap_or(f64::NAN),
            r["rtt_ms"].as_f64().unwrap_or(f64::NAN),
            r["daemon_cpu_s"].as_f64().unwrap_or(f64::NAN),
        );
    }
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    write_json(
        "paths",
        &json!({ "suite": "paths", "seconds_per_run": SECONDS, "cores": nproc, "results": rows }),
    );
}
