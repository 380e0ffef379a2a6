//! The XDP underlay shield attached for real on a veth inside a network namespace.

use std::{net::UdpSocket, process::Command, time::Duration};

use serde_json::Value;
use tunnelmesh_tests::{Lab, NodeOptions};

/// Sum of each per-CPU counter in the pinned shield map, read with bpftool.
fn shield_counters(iface: &str) -> Vec<u64> {
    let pin = format!("/sys/fs/bpf/tunnelmesh/{iface}/shield_counters");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &pin])
        .output()
        .expect("bpftool is installed");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    let mut sums = vec![0u64; 5];
    for entry in entries.as_array().expect("array") {
        // With BTF, bpftool prints typed entries under "formatted".
        let e = entry.get("formatted").unwrap_or(entry);
        let key = e["key"].as_u64().expect("u32 key") as usize;
        sums[key] = e["values"]
            .as_array()
            .expect("per-CPU values")
            .iter()
            .map(|v| v["value"].as_u64().unwrap_or(0))
            .sum();
    }
    sums
}

#[test]
fn the_xdp_shield_drops_junk_before_the_daemon_and_counts_each_reason() {
    let (mut lab, a, b) = Lab::pair(20, &NodeOptions::default(), &NodeOptions::default());
    let status = lab.status(a);
    assert_eq!(status["fastpath"]["enforcement"], "ebpf", "{}", status["fastpath"]);
    assert!(lab.ping(&lab.nodes[b].ns, &lab.nodes[a].mesh4.to_string(), 2));
    let before = shield_counters(&lab.nodes[a].iface);
    assert!(before[0] > 0, "valid messages pass and are counted: {before:?}");

    let target = lab.nodes[a].endpoint();
    lab.in_netns(&lab.nodes[b].ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&[], &target).unwrap(); // too short
        s.send_to(&[1, 0], &target).unwrap(); // too short
        s.send_to(&[9, 0, 0, 0, 1, 2, 3, 4], &target).unwrap(); // bad type
        s.send_to(&[4, 1, 0, 0], &target).unwrap(); // reserved bytes set
        let mut short_initiation = vec![0u8; 100];
        short_initiation[0] = 1;
        s.send_to(&short_initiation, &target).unwrap(); // initiation of 100 bytes
        s.send_to(&[4, 0, 0, 0, 0, 0, 0, 0], &target).unwrap(); // data shorter than a keepalive
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = shield_counters(&lab.nodes[a].iface);
    assert_eq!(after[1] - before[1], 2, "too_short: {after:?}");
    assert_eq!(after[2] - before[2], 2, "bad_type: {after:?}");
    assert_eq!(after[3] - before[3], 2, "bad_length: {after:?}");
    // Dropped in the kernel: the daemon never saw them.
    assert_eq!(lab.counter(a, "rx_malformed"), 0);
    assert_eq!(lab.status(a)["fastpath"]["shield"]["bad_length"], after[3]);

    // A clean stop detaches the program and removes the pins.
    let iface = lab.nodes[a].iface.clone();
    lab.stop(a);
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/tunnelmesh/{iface}")).exists(),
        "pins removed"
    );
    let links = lab.sh(&lab.nodes[a].ns, "ip -d link show");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("prog/xdp"),
        "XDP detached"
    );
}

#[test]
fn without_ebpf_the_daemon_drops_the_same_junk_itself() {
    let no_ebpf = NodeOptions {
        no_ebpf: true,
        ..NodeOptions::default()
    };
    let (lab, a, b) = Lab::pair(21, &no_ebpf, &no_ebpf);
    assert_eq!(lab.status(a)["fastpath"]["enforcement"], "userspace");
    let target = lab.nodes[a].endpoint();
    lab.in_netns(&lab.nodes[b].ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for junk in [&[][..], &[9, 0, 0, 0][..], &[4, 0, 0, 0, 1][..], &[2u8; 92][..]] {
            s.send_to(junk, &target).unwrap();
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lab.counter(a, "rx_malformed"), 4);
    assert!(lab.ping(&lab.nodes[b].ns, &lab.nodes[a].mesh4.to_string(), 2));
}
