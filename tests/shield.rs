//! The underlay shield attached for real on a veth inside a network namespace: at TC (the
//! default on veth) and at XDP when asked for.

use std::{net::UdpSocket, os::fd::AsRawFd, process::Command, time::Duration};

use tunnelmesh_tests::{Lab, NodeOptions, bpftool_dump, eventually, percpu_sums};

/// Sum of each per-CPU counter in the pinned shield map, by reason.
fn shield_counters(iface: &str) -> Vec<u64> {
    let sums = percpu_sums(&format!("/sys/fs/bpf/tunnelmesh/{iface}/shield_counters"));
    (0..11).map(|reason| sums.get(&reason).copied().unwrap_or(0)).collect()
}

/// On a veth the shield runs at TC ingress unless told otherwise: driver-mode XDP there would
/// turn off the peer's GSO and copy every skb.
#[test]
fn on_a_veth_the_tc_shield_drops_junk_before_the_daemon_and_judges_each_segment() {
    junk_is_dropped_in_the_kernel_and_counted(20, "", "tc");
}

#[test]
fn the_xdp_shield_asked_for_drops_the_same_junk_and_sees_every_datagram() {
    junk_is_dropped_in_the_kernel_and_counted(22, "shield_hook = \"xdp\"", "xdp");
}

/// Send `segments` from `ns` to `target` as one UDP GSO message of `size`-byte segments.
fn send_super_datagram(lab: &Lab, ns: &str, target: String, segments: Vec<Vec<u8>>, size: u16) {
    lab.in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let size = libc::c_int::from(size);
        // SAFETY: setsockopt reads an int of the given length from a live stack variable.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        s.send_to(&segments.concat(), &target).unwrap();
    })
    .join()
    .unwrap();
}

/// The receiver index of one of `iface`'s live sessions, from its pinned map.
fn live_index(iface: &str) -> u32 {
    let dump = bpftool_dump(&format!("/sys/fs/bpf/tunnelmesh/{iface}/known_indices"));
    let entry = &dump.as_array().expect("an array of entries")[0];
    let key = entry.get("formatted").map_or(&entry["key"], |f| &f["key"]);
    key.as_u64().expect("a typed key") as u32
}

fn junk_is_dropped_in_the_kernel_and_counted(net: u8, extra: &str, hook: &str) {
    let opts = NodeOptions {
        extra: extra.into(),
        ..NodeOptions::default()
    };
    let mut a_veth = String::new();
    let (mut lab, a, b) = Lab::pair_prepared(net, &opts, &opts, |_, [(_, veth), _]| a_veth = veth.to_string());
    let status = lab.status(a);
    assert_eq!(status["fastpath"]["enforcement"], "ebpf", "{}", status["fastpath"]);
    let on = &status["fastpath"]["shield_on"];
    assert_eq!(on[0]["interface"], a_veth.as_str(), "{on}");
    assert_eq!(on[0]["hook"], hook, "{on}");
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

    // Data for a session nobody has: dropped in the kernel, except one sample a second that goes
    // up so a restarted daemon can notice a peer holding a lost session.
    let target = lab.nodes[a].endpoint();
    let rejected_before = lab.counter(a, "handshake_rejected");
    lab.in_netns(&lab.nodes[b].ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut forged = [0u8; 64];
        forged[0] = 4;
        forged[4..8].copy_from_slice(&0x5eed_f00du32.to_le_bytes());
        for _ in 0..5 {
            s.send_to(&forged, &target).unwrap();
        }
        // A flood of forged initiations from one source: none carries a's mac1.
        let mut initiation = [0u8; 148];
        initiation[0] = 1;
        for _ in 0..40 {
            s.send_to(&initiation, &target).unwrap();
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let flood = shield_counters(&lab.nodes[a].iface);
    assert_eq!(flood[5] - after[5], 4, "unknown_index: {flood:?}");
    assert_eq!(lab.counter(a, "rx_unknown_index"), 1, "one sample reached the daemon");
    assert_eq!(flood[9] - after[9], 40, "bad_mac: {flood:?}");
    assert_eq!(flood[6], after[6], "forged initiations charge no budget: {flood:?}");
    let reached = lab.counter(a, "handshake_rejected") - rejected_before;
    assert_eq!(reached, 0, "{reached} forged initiations reached the daemon");
    // The peer whose session is real is unaffected.
    assert!(lab.ping(&lab.nodes[b].ns, &lab.nodes[a].mesh4.to_string(), 2));
    let log = lab.log(a);
    assert!(log.contains("shield attached"), "{log}");
    // The program's own rare events, read from its aya-log ring into the daemon's log: its
    // first verdict, and b's first refusal by the unknown-index budget (said once, not four times).
    let program = hook.to_uppercase();
    assert!(
        log.contains(&format!("{program} shield: judging mesh datagrams")),
        "{log}"
    );
    let refused = format!(
        "{program} shield: ::ffff:{} ran out of its unknown-index budget",
        lab.nodes[b].underlay
    );
    assert_eq!(log.matches(&refused).count(), 1, "{log}");
    let pins = std::fs::read_dir(format!("/sys/fs/bpf/tunnelmesh/{}", lab.nodes[a].iface))
        .unwrap()
        .count();
    assert_eq!(
        pins, 4,
        "shield_counters, known_indices, source_budgets, blocked_sources are pinned"
    );
    let indices = bpftool_dump(&format!("/sys/fs/bpf/tunnelmesh/{}/known_indices", lab.nodes[a].iface));
    assert!(
        !indices.as_array().unwrap().is_empty(),
        "the live session's index is in the kernel map"
    );

    // One UDP GSO send of three 48-byte segments: data for the live session, junk, data. A
    // veth hands it over whole unless driver-mode XDP on the receiver turned off the sender's
    // GSO: at TC the shield judges each segment and drops the whole for the junk one; at XDP it
    // sees three datagrams, drops the junk and lets the data (forged: it fails to decrypt) up.
    let index = live_index(&lab.nodes[a].iface);
    // Counters far ahead of the session's: each passes the replay window and fails to decrypt.
    let forged = std::sync::atomic::AtomicU64::new(1 << 40);
    let data = || {
        let mut m = vec![0u8; 48];
        m[0] = 4;
        m[4..8].copy_from_slice(&index.to_le_bytes());
        let counter = forged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m[8..16].copy_from_slice(&counter.to_le_bytes());
        m
    };
    let mut junk = vec![0u8; 48];
    junk[0] = 9;
    let (before, failed_before) = (shield_counters(&lab.nodes[a].iface), lab.counter(a, "rx_auth_failed"));
    send_super_datagram(
        &lab,
        &lab.nodes[b].ns,
        lab.nodes[a].endpoint(),
        vec![data(), junk, data()],
        48,
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = shield_counters(&lab.nodes[a].iface);
    let failed = lab.counter(a, "rx_auth_failed") - failed_before;
    let (bad_type, passed) = (after[2] - before[2], after[0] - before[0]);
    if hook == "tc" {
        assert_eq!(
            (bad_type, failed),
            (3, 0),
            "the whole super-datagram dropped: {after:?}"
        );
    } else {
        assert_eq!((bad_type, failed), (1, 2), "three datagrams judged apart: {after:?}");
        assert!(passed >= 2, "{after:?}");
    }
    // Three data segments pass whole and reach the daemon, which refuses each on its own.
    let failed_before = lab.counter(a, "rx_auth_failed");
    send_super_datagram(
        &lab,
        &lab.nodes[b].ns,
        lab.nodes[a].endpoint(),
        vec![data(), data(), data()],
        48,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lab.counter(a, "rx_auth_failed") - failed_before, 3);

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
    lab.stop(b);
    // The kernel frees a program once its last holder is gone (sockets go after an RCU grace
    // period), so this is awaited rather than checked at once.
    let ours_loaded = || -> Vec<String> {
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show"])
            .output()
            .expect("bpftool is installed");
        let programs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
        programs
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .filter(|n| n.starts_with("tunnelmesh_"))
            .map(str::to_string)
            .collect()
    };
    eventually(
        "every program unloaded after both nodes stopped",
        Duration::from_secs(5),
        || ours_loaded().is_empty(),
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
    assert_eq!(
        lab.status(a)["fastpath"]["steering"],
        "hash",
        "without eBPF the kernel's hash steers"
    );
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

/// Security item 9: on an underlay whose path MTU (1400) is below the tunnel's full-size
/// datagrams, each of those leaves in two fragments. The shield dropped every first fragment
/// as malformed (TCP in the tunnel stalled); now fragments go up to the stack, which
/// reassembles them, and 100 MiB of TCP arrive intact with the shield attached.
#[test]
fn over_an_underlay_whose_path_mtu_is_1400_fragmented_datagrams_pass_the_shield() {
    let defaults = NodeOptions::default();
    let (lab, a, b) = Lab::pair_prepared(23, &defaults, &defaults, |lab, ends| {
        for (ns, veth) in ends {
            lab.sh(ns, &format!("ip link set {veth} mtu 1400"));
        }
    });
    for i in [a, b] {
        assert_eq!(lab.status(i)["fastpath"]["enforcement"], "ebpf");
    }
    assert!(lab.ping(&lab.nodes[a].ns, &lab.nodes[b].mesh4.to_string(), 2));
    let (sent, received, secs) = lab.tcp_transfer(a, b, 100 << 20);
    assert_eq!(sent, received, "SHA-256 of what was sent and what arrived");
    eprintln!("100 MiB over a 1400-byte path in {secs:.2} s");
    let counters = shield_counters(&lab.nodes[b].iface);
    assert!(
        counters[10] > 10_000,
        "b's shield passed {} first fragments: {counters:?}",
        counters[10]
    );
    assert_eq!(counters[4], 0, "nothing judged malformed: {counters:?}");
    // The sender's GSO runs of full-size datagrams exceed the path MTU (EMSGSIZE): it falls
    // back to one datagram per message, which the kernel fragments.
    let refused = lab.status(a)["counters"]["udp_gso_refused"].as_u64().unwrap();
    assert!(refused >= 1, "a's GSO fallback was counted: {refused}");
}
