//! Default deny in a real mesh: coordinator + laptop, web, db in network namespaces, enforced by
//! the TC programs on the mesh interface and, with `--no-ebpf`, by the daemon itself.

use std::{
    fs,
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tunnelmesh_tests::{Lab, bpftool_dump, eventually};

const RULES: &str = "[[allow]]\nfrom = [\"laptop\"]\nto = [\"web\"]\nports = [\"tcp/443\"]\n\n\
                     [[allow]]\nfrom = [\"web\"]\nto = [\"db\"]\nports = [\"tcp/5432\"]\n";

/// The formatted entries of a pinned map (bpftool prints BTF-typed values under "formatted").
fn formatted(pin: &str) -> Vec<Value> {
    bpftool_dump(pin)
        .as_array()
        .expect("bpftool prints an array")
        .iter()
        .map(|e| e.get("formatted").cloned().expect("BTF-formatted entries"))
        .collect()
}

/// Detach the TC programs of the node whose mesh interface is `iface` the way another tool
/// would: its programs are those using its pinned `acl_config` map; their links are detached
/// with bpftool.
fn detach_acl(iface: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let bpftool = |args: &[&str]| -> Value { serde_json::from_slice(&run(args)).expect("bpftool prints JSON") };
    let config = bpftool(&[
        "map",
        "show",
        "pinned",
        &format!("/sys/fs/bpf/tunnelmesh/{iface}/acl_config"),
    ]);
    let config_id = config["id"].as_u64().expect("a map id");
    let ours: Vec<u64> = bpftool(&["prog", "show"])
        .as_array()
        .expect("an array")
        .iter()
        .filter(|p| {
            p["map_ids"]
                .as_array()
                .is_some_and(|m| m.iter().any(|id| id.as_u64() == Some(config_id)))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect();
    assert_eq!(ours.len(), 2, "ingress and egress use the node's acl_config");
    let mut detached = 0;
    for link in bpftool(&["link", "show"]).as_array().expect("an array") {
        if link["prog_id"].as_u64().is_some_and(|id| ours.contains(&id)) {
            run(&["link", "detach", "id", &link["id"].to_string()]);
            detached += 1;
        }
    }
    assert_eq!(detached, 2, "both links detached");
}

fn web_db_laptop(net: u8, no_ebpf: bool) {
    let mut lab = Lab::new();
    let hosts = lab.switched(net, &["c", "laptop", "web", "db"]);
    let mut ids = Vec::new();
    for (i, name) in ["laptop", "web", "db"].iter().enumerate() {
        let (ns, addr) = hosts[i + 1].clone();
        ids.push(lab.node(name, &ns, addr, i as u8 + 1, tunnelmesh_tests::PORT));
    }
    let (laptop, web, db) = (ids[0], ids[1], ids[2]);
    let authorized = lab.dir.path().join("authorized_keys");
    let lines: String = ids.iter().map(|&n| format!("{}\n", lab.nodes[n].public_line)).collect();
    fs::write(&authorized, lines).unwrap();
    let c = lab.coordinator_with_policy(&hosts[0], &authorized, RULES, &[]);
    let policy = lab.dir.path().join("policy.toml");
    let extra: &[&str] = if no_ebpf { &["--no-ebpf"] } else { &[] };
    for &n in &ids {
        lab.join(n, &c, extra);
    }
    let ns = |n: usize| lab.nodes[n].ns.clone();
    let v4 = |n: usize| lab.mesh_addrs(n).0;
    let v6 = |n: usize| lab.mesh_addrs(n).1;
    let enforcement = if no_ebpf { "userspace" } else { "ebpf" };
    let rules = |n: usize| lab.status(n)["policy"]["rules"].as_array().map(Vec::len);
    for n in ids.iter().copied() {
        let st = lab.status(n);
        assert_eq!(st["policy"]["enforcement"], enforcement, "{}", st["policy"]);
    }
    assert_eq!(rules(web), Some(1));
    assert_eq!(rules(db), Some(1));
    assert_eq!(rules(laptop), Some(0), "nothing may reach the laptop");

    assert!(
        lab.tcp_reaches(&ns(laptop), &ns(web), &v4(web), 443),
        "laptop → web tcp/443 (and the reply)"
    );
    assert!(lab.tcp_reaches(&ns(laptop), &ns(web), &v6(web), 443), "… over IPv6 too");
    assert!(lab.tcp_reaches(&ns(web), &ns(db), &v4(db), 5432), "web → db tcp/5432");
    assert!(
        !lab.tcp_reaches(&ns(laptop), &ns(db), &v4(db), 5432),
        "laptop → db denied"
    );
    assert!(
        !lab.tcp_reaches(&ns(laptop), &ns(web), &v4(web), 22),
        "laptop → web tcp/22 denied"
    );
    assert!(!lab.tcp_reaches(&ns(db), &ns(web), &v4(web), 443), "db → web denied");
    assert!(
        !lab.tcp_reaches(&ns(web), &ns(laptop), &v4(laptop), 443),
        "nothing reaches the laptop"
    );
    assert!(
        !lab.udp_reaches(&ns(laptop), &ns(web), &v4(web), 443),
        "udp/443 is not tcp/443"
    );
    assert!(!lab.udp_reaches(&ns(web), &ns(db), &v6(db), 5432), "udp/5432 denied");
    assert!(!lab.ping(&ns(laptop), &v4(web), 1), "no ICMP rule: ping denied");
    let web_status = lab.status(web);
    let counters = &web_status["policy"]["counters"];
    assert!(counters["denied"].as_u64() > Some(0), "{counters}");
    assert!(counters["allowed"].as_u64() > Some(0), "{counters}");
    assert!(
        web_status["policy"]["rule_hits"]["0"].as_u64() > Some(0),
        "rule 0 counted: {}",
        web_status["policy"]
    );

    // `tunnelmesh policy explain` agrees, naming the rule and its line.
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(tunnelmesh_tests::bin())
            .args(["policy", "explain", "--policy", policy.to_str().unwrap()])
            .args(["--data-dir", c.data_dir.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let why = explain(&["laptop", "web", "tcp/443"]);
    assert!(why.contains("allowed by rule 1 (line 1"), "{why}");
    let why = explain(&["web", "db", "tcp/5432"]);
    assert!(why.contains("allowed by rule 2 (line 6"), "{why}");
    let why = explain(&["laptop", "db", "tcp/5432"]);
    assert!(why.contains("denied") && why.contains("default deny"), "{why}");

    let pins = format!("/sys/fs/bpf/tunnelmesh/{}", lab.nodes[web].iface);
    if no_ebpf {
        assert!(
            !std::path::Path::new(&format!("{pins}/acl_rules")).exists(),
            "no kernel ACL with --no-ebpf"
        );
    } else {
        // bpftool shows the rule in force and the sources it applies to.
        let config = formatted(&format!("{pins}/acl_config"));
        let generation = config[0]["value"]["generation"].as_u64().unwrap();
        let slot = generation * 256;
        let rules = formatted(&format!("{pins}/acl_rules"));
        let rule = &rules.iter().find(|e| e["key"].as_u64() == Some(slot)).unwrap()["value"];
        assert_eq!(
            (rule["id"].as_u64(), rule["low"].as_u64(), rule["high"].as_u64()),
            (Some(0), Some(443), Some(443)),
            "{rule}"
        );
        let in_force: Vec<Value> = formatted(&format!("{pins}/acl_sources"))
            .into_iter()
            .filter(|e| e["key"]["data"]["generation_be"][3].as_u64() == Some(generation))
            .collect();
        assert_eq!(in_force.len(), 2, "laptop's IPv4 and IPv6 address: {in_force:?}");
        let flows = formatted(&format!("{pins}/acl_conntrack"));
        assert!(!flows.is_empty(), "web's connection to db opened flows");
        // The programs said in the daemon's log (aya-log) which generation came into force.
        let said = format!("ACL ingress: policy generation {generation} in force");
        eventually(
            "the kernel's log line reaches web's log",
            Duration::from_secs(2),
            || lab.log(web).contains(&said),
        );

        // Security item 22: programs detached behind the daemon's back (here with bpftool)
        // left the node open. Now the daemon notices within about a second and enforces the
        // policy itself: still default deny.
        detach_acl(&lab.nodes[web].iface);
        eventually("web notices its TC programs went", Duration::from_secs(5), || {
            lab.status(web)["policy"]["enforcement"] == "userspace"
        });
        assert!(
            !lab.tcp_reaches(&ns(laptop), &ns(web), &v4(web), 22),
            "laptop → web tcp/22 still denied"
        );
        assert!(
            lab.tcp_reaches(&ns(laptop), &ns(web), &v4(web), 443),
            "laptop → web tcp/443 still allowed"
        );
        assert!(lab.log(web).contains("TC programs were detached"));
    }

    // A policy change takes effect within 2 s, without a restart and without breaking allowed
    // flows.
    fs::write(
        &policy,
        format!("{RULES}\n[[allow]]\nfrom = [\"laptop\"]\nto = [\"web\"]\nports = [\"icmp/echo\", \"udp/5353\"]\n"),
    )
    .unwrap();
    let took = eventually("ping allowed by the new rule", Duration::from_secs(2), || {
        lab.sh_cmd(&ns(laptop), &format!("ping -n -q -c 1 -W 1 {}", v4(web)))
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    eprintln!("policy change took effect in {took:?} ({enforcement})");
    assert!(
        lab.udp_reaches(&ns(laptop), &ns(web), &v4(web), 5353),
        "udp/5353 now allowed"
    );
    assert!(
        lab.tcp_reaches(&ns(laptop), &ns(web), &v4(web), 443),
        "allowed flows still pass"
    );
    assert!(!lab.tcp_reaches(&ns(laptop), &ns(db), &v4(db), 5432), "still denied");

    restart_fails_closed(&mut lab, &c, web, laptop, extra);
}

/// Restart web while the laptop floods it with denied UDP: not one datagram may get through,
/// and web must be back (the allowed flow works, the flood reached it and was denied).
fn restart_fails_closed(lab: &mut Lab, c: &tunnelmesh_tests::Coordinator, web: usize, laptop: usize, extra: &[&str]) {
    let (web_ns, laptop_ns) = (lab.nodes[web].ns.clone(), lab.nodes[laptop].ns.clone());
    let target: std::net::SocketAddr = format!("{}:9999", lab.mesh_addrs(web).0).parse().unwrap();
    let sink = lab
        .in_netns(&web_ns, || UdpSocket::bind("0.0.0.0:9999").expect("bind"))
        .join()
        .unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if sink.recv_from(&mut b).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let flood = {
        let stop = stop.clone();
        lab.in_netns(&laptop_ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if s.send_to(b"denied", target).is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let pins = format!("/sys/fs/bpf/tunnelmesh/{}", lab.nodes[web].iface);
    lab.stop(web);
    assert!(
        !std::path::Path::new(&pins).exists(),
        "a clean stop detaches the programs and removes every pin"
    );
    lab.join(web, c, extra);
    eventually("web reachable again on tcp/443", Duration::from_secs(15), || {
        lab.tcp_reaches(&laptop_ns, &web_ns, &target.ip().to_string(), 443)
    });
    eventually(
        "the flood reaches web again and is denied",
        Duration::from_secs(5),
        || lab.status(web)["policy"]["counters"]["denied"].as_u64() > Some(20),
    );
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    counter.join().unwrap();
    assert!(sent > 100, "the flood ran ({sent} datagrams)");
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "denied datagrams got through around the restart"
    );
}

#[test]
fn default_deny_in_the_kernel_lets_laptop_reach_web_443_and_web_reach_db_5432_and_nothing_else() {
    web_db_laptop(38, false);
}

#[test]
fn default_deny_in_userspace_with_no_ebpf_decides_the_same() {
    web_db_laptop(39, true);
}
