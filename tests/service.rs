//! TunnelMesh as a system service: the systemd units as shipped, the notify protocol against a
//! real `NOTIFY_SOCKET` listener, and SIGHUP reloads of a running interface.

use std::{
    fs,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use tunnelmesh_tests::{Lab, NodeOptions, PORT, bin, eventually};

const UNITS: [&str; 2] = ["tunnelmesh@.service", "tunnelmesh-coordinator.service"];

/// The unit as shipped, with ExecStart pointing at the binary under test (verify checks that
/// the command exists and is executable), in `dir`.
fn unit_under_test(name: &str, dir: &Path) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd").join(name);
    let text = fs::read_to_string(&shipped).unwrap_or_else(|e| panic!("{}: {e}", shipped.display()));
    assert!(
        text.contains("ExecStart=/usr/bin/tunnelmesh "),
        "{name} runs the packaged binary"
    );
    let path = dir.join(name);
    fs::write(&path, text.replace("/usr/bin/tunnelmesh", bin().to_str().unwrap())).unwrap();
    path
}

#[test]
fn both_units_verify_without_a_word_and_score_at_most_2_5_in_systemd_analyze_security() {
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let unit = unit_under_test(name, dir.path());
        let out = Command::new("systemd-analyze")
            .args(["verify"])
            .arg(&unit)
            .output()
            .expect("systemd-analyze (Debian's systemd package) runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "{name}: {stderr}");

        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit)
            .output()
            .expect("systemd-analyze runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{name}: no exposure level in:\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        println!("{name}: systemd-analyze security exposure {score}");
        assert!(score <= 2.5, "{name}: exposure {score} > 2.5:\n{text}");
    }
}

/// What a service manager heard on its notify socket, each datagram with when it came.
struct Listener {
    socket: UnixDatagram,
    path: PathBuf,
    heard: Vec<(Instant, String)>,
}

impl Listener {
    fn bind(dir: &Path, name: &str) -> Listener {
        let path = dir.join(name);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Listener {
            socket,
            path,
            heard: Vec::new(),
        }
    }

    /// Listen until a datagram satisfies `what`, or `timeout`; that datagram.
    fn until(&mut self, timeout: Duration, what: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.heard.push((Instant::now(), text.clone()));
                if what(&text) {
                    return Some(text);
                }
            }
        }
        None
    }

    fn count(&self, field: &str) -> usize {
        self.heard.iter().filter(|(_, m)| m.lines().any(|l| l == field)).count()
    }
}

/// Two namespaces on one veth with a node each, configured as each other's peer; b started.
fn pair_with_b_running(net: u8) -> (Lab, usize, usize) {
    let mut lab = Lab::new();
    let (na, nb) = (lab.netns("a"), lab.netns("b"));
    let (ua, ub) = (
        std::net::Ipv4Addr::new(198, 18, net, 1),
        std::net::Ipv4Addr::new(198, 18, net, 2),
    );
    lab.link(&na, ua, &nb, ub);
    let a = lab.node("a", &na, ua, 1, PORT);
    let b = lab.node("b", &nb, ub, 2, PORT);
    lab.configure(a, &[b], &NodeOptions::default());
    lab.configure(b, &[a], &NodeOptions::default());
    lab.start(b);
    (lab, a, b)
}

#[test]
fn notify_says_ready_once_pings_pass_pings_the_watchdog_and_says_stopping_and_never_ready_on_failure() {
    let (mut lab, a, b) = pair_with_b_running(60);
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Listener::bind(dir.path(), "notify");
    let socket = manager.path.display().to_string();
    // WatchdogSec=1: the daemon checks its threads and pings every 500 ms.
    lab.nodes[a].env = vec![
        ("NOTIFY_SOCKET".into(), socket),
        ("WATCHDOG_USEC".into(), "1000000".into()),
    ];
    lab.spawn(a);
    let ready = manager
        .until(Duration::from_secs(20), |m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1; heard {:?}\n{}", manager.heard, lab.log(a)));
    assert!(
        ready.contains("STATUS=") && ready.contains("0 of 1 peers up"),
        "{ready}"
    );
    let (ns, peer) = (lab.nodes[a].ns.clone(), lab.nodes[b].mesh4.to_string());
    assert!(
        lab.ping(&ns, &peer, 1),
        "READY came before the interface carried a ping"
    );

    let since = Instant::now();
    manager
        .until(Duration::from_secs(5), |m| {
            m.contains("STATUS=") && m.contains("1 of 1 peers up (1 udp)")
        })
        .unwrap_or_else(|| panic!("no status with the peer up; heard {:?}", manager.heard));
    manager.until(Duration::from_secs(3), |_| false);
    let pings: Vec<Instant> = manager
        .heard
        .iter()
        .filter(|(at, m)| *at >= since && m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        pings.len() >= 4,
        "{} watchdog pings in over 3 s: {:?}",
        pings.len(),
        manager.heard
    );
    for gap in pings.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap < Duration::from_millis(900),
            "a watchdog gap of {gap:?} (timeout 1 s)"
        );
    }

    let pid = lab.pid(a).expect("a runs");
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    manager
        .until(Duration::from_secs(5), |m| m.lines().any(|l| l == "STOPPING=1"))
        .unwrap_or_else(|| panic!("no STOPPING=1 on SIGTERM; heard {:?}", manager.heard));
    let (ok, log) = lab.wait_exit(a, Duration::from_secs(10));
    assert!(ok, "a clean stop exits 0:\n{log}");
    assert_eq!(manager.count("READY=1"), 1);

    // A start that fails half-way (its interface name is taken by another kind of device)
    // never says READY.
    let mut failing = Listener::bind(dir.path(), "notify-failing");
    let socket = failing.path.display().to_string();
    lab.sh(&ns, &format!("ip link add {} type bridge", lab.nodes[a].iface));
    lab.nodes[a].env = vec![("NOTIFY_SOCKET".into(), socket)];
    lab.spawn(a);
    let (ok, log) = lab.wait_exit(a, Duration::from_secs(20));
    assert!(!ok && log.contains("cannot create TUN device"), "{log}");
    failing.until(Duration::from_millis(300), |_| false);
    assert_eq!(
        failing.count("READY=1"),
        0,
        "READY from a failed start: {:?}",
        failing.heard
    );
}

#[test]
fn sighup_reloads_peers_live_keeps_sessions_and_refuses_what_needs_a_restart() {
    let mut lab = Lab::new();
    let hosts = lab.switched(61, &["a", "b", "c"]);
    let nodes: Vec<usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, (ns, addr))| lab.node(["a", "b", "c"][i], ns, *addr, i as u8 + 1, PORT))
        .collect();
    let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
    let opts = NodeOptions::default();
    lab.configure(a, &[b], &opts);
    lab.configure(b, &[a], &opts);
    lab.configure(c, &[a], &opts);
    for &n in &nodes {
        lab.start(n);
    }
    let (ns_a, to_b, to_c) = (
        lab.nodes[a].ns.clone(),
        lab.nodes[b].mesh4.to_string(),
        lab.nodes[c].mesh4.to_string(),
    );
    assert!(lab.ping(&ns_a, &to_b, 2));
    assert!(!lab.ping(&ns_a, &to_c, 1), "c is not a's peer yet");
    let before = lab.peer_status(a, b);
    let hup = |lab: &Lab| {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(lab.pid(a).expect("a runs") as i32, libc::SIGHUP) };
    };

    // c added to a's file; SIGHUP while a ping to b runs: nothing lost, b's session kept.
    lab.configure(a, &[b, c], &opts);
    let summary = lab.ping_while(&ns_a, &to_b, || hup(&lab));
    assert!(summary.contains(" 0% packet loss"), "{summary}\n{}", lab.log(a));
    eventually("a logs the reload", Duration::from_secs(5), || {
        lab.log(a).contains("config reloaded")
    });
    assert!(
        lab.ping(&ns_a, &to_c, 3),
        "c reachable after the reload:\n{}",
        lab.log(a)
    );
    // b's peer entry and session were kept: its byte counters and handshake time carry on.
    let after = lab.peer_status(a, b);
    assert!(
        after["rx_bytes"].as_u64() > before["rx_bytes"].as_u64(),
        "{before} → {after}"
    );
    assert!(
        after["last_handshake_secs"].as_u64() >= before["last_handshake_secs"].as_u64(),
        "no new handshake with b: {before} → {after}"
    );

    // A broken file: refused with its line and field, the running config stays.
    let config = lab.nodes[a].config.clone();
    let good = fs::read_to_string(&config).unwrap();
    fs::write(&config, good.replace("listen_port", "listen_prot")).unwrap();
    hup(&lab);
    eventually("the broken file is refused", Duration::from_secs(5), || {
        let log = lab.log(a);
        log.contains("reload refused") && log.contains("listen_prot") && log.contains("line ")
    });
    // A change that takes a restart: named, nothing applied (c stays a peer).
    fs::write(
        &config,
        good.replace(&format!("listen_port = {PORT}"), "listen_port = 51999"),
    )
    .unwrap();
    hup(&lab);
    eventually("the port change is refused", Duration::from_secs(5), || {
        lab.log(a).contains("listen_port changed, which takes a restart")
    });
    assert!(lab.ping(&ns_a, &to_b, 2) && lab.ping(&ns_a, &to_c, 2));

    // c taken out again: its route goes, b stays.
    lab.configure(a, &[b], &opts);
    hup(&lab);
    eventually("c's route is gone", Duration::from_secs(5), || {
        let routes = lab.sh(&ns_a, "ip -4 route show");
        !String::from_utf8_lossy(&routes.stdout).contains(&to_c)
    });
    assert!(lab.ping(&ns_a, &to_b, 2));
    assert!(lab.pid(a).is_some() && lab.status(a)["peers"].as_array().unwrap().len() == 1);
}

/// The uid and gid the unprivileged daemon runs as (`nobody`/`nogroup`).
const NOBODY: u32 = 65534;

/// What the package's tmpfiles snippet and the unit prepare for an unprivileged daemon, undone
/// on drop: bpffs traversable by all (0711, not listable) with the pin root writable by the
/// daemon's group, and the per-instance runtime directory.
struct Prepared {
    bpffs_mode: u32,
    tun_mode: u32,
    runtime: PathBuf,
}

impl Prepared {
    fn new(lab: &Lab, i: usize) -> Prepared {
        use std::os::unix::fs::PermissionsExt;
        let sh = |script: &str| {
            let out = Command::new("sh").args(["-c", script]).output().unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf");
        let mode = |p: &str| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let n = &lab.nodes[i];
        // The guard exists before anything changes, so a failing step is undone too.
        let prepared = Prepared {
            bpffs_mode: mode("/sys/fs/bpf"),
            tun_mode: mode("/dev/net/tun"),
            runtime: PathBuf::from(format!("/run/tunnelmesh/{}", n.iface)),
        };
        // As udev leaves it on a stock Debian host (this VM has it 0600): opening it grants
        // nothing, TUNSETIFF needs CAP_NET_ADMIN.
        sh("chmod 0666 /dev/net/tun");
        sh(&format!(
            "chmod 0711 /sys/fs/bpf && install -d -o root -g {NOBODY} -m 0770 /sys/fs/bpf/tunnelmesh"
        ));
        // The lab's folder is root's: let the daemon through to its own key and cache.
        let state = lab.dir.path().join("state").join(&n.iface);
        sh(&format!(
            "chmod 0711 {dir} && chown {NOBODY}:{NOBODY} {key} && install -d -o {NOBODY} -g {NOBODY} -m 0750 {runtime} && install -d -m 0711 {dir}/state && install -d -o {NOBODY} -g {NOBODY} -m 0700 {state}",
            dir = lab.dir.path().display(),
            key = n.key.display(),
            runtime = prepared.runtime.display(),
            state = state.display(),
        ));
        prepared
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::remove_dir_all(&self.runtime);
        let _ = fs::set_permissions("/sys/fs/bpf", fs::Permissions::from_mode(self.bpffs_mode));
        let _ = fs::set_permissions("/dev/net/tun", fs::Permissions::from_mode(self.tun_mode));
    }
}

/// `setpriv` as a unit with `User=`, `AmbientCapabilities=` and `CapabilityBoundingSet=` of
/// exactly `caps` would start the daemon.
fn unprivileged(caps: &str) -> Vec<String> {
    let set = format!("-all,{caps}");
    [
        "setpriv",
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        &format!("--inh-caps={set}"),
        &format!("--ambient-caps={set}"),
        &format!("--bounding-set={set}"),
        "--no-new-privs",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn as_nobody_with_only_net_admin_bpf_and_perfmon_the_tunnel_shield_and_kernel_acl_work_and_with_less_it_says_userspace()
{
    let mut lab = Lab::new();
    let hosts = lab.switched(62, &["c", "laptop", "web"]);
    let laptop = lab.node("laptop", &hosts[1].0, hosts[1].1, 1, PORT);
    let web = lab.node("web", &hosts[2].0, hosts[2].1, 2, PORT);
    let authorized = lab.dir.path().join("authorized_keys");
    let lines = format!("{}\n{}\n", lab.nodes[laptop].public_line, lab.nodes[web].public_line);
    fs::write(&authorized, lines).unwrap();
    let policy = "[[allow]]\nfrom = [\"laptop\"]\nto = [\"web\"]\nports = [\"tcp/443\"]\n";
    let c = lab.coordinator_with_policy(&hosts[0], &authorized, policy, &[]);
    lab.join(laptop, &c, &[]);
    let _prepared = Prepared::new(&lab, web);
    lab.nodes[web].wrapper = unprivileged("+net_admin,+bpf,+perfmon");
    lab.nodes[web].env = vec![(
        "RUNTIME_DIRECTORY".into(),
        format!("/run/tunnelmesh/{}", lab.nodes[web].iface),
    )];
    lab.join(web, &c, &[]);

    let pid = lab.pid(web).unwrap();
    let proc_status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert!(field("Uid:").starts_with(&NOBODY.to_string()), "{proc_status}");
    // CAP_NET_ADMIN (12), CAP_PERFMON (38) and CAP_BPF (39), nothing else.
    let only = format!("{:016x}", (1u64 << 12) | (1u64 << 38) | (1u64 << 39));
    assert_eq!(field("CapEff:"), only, "{proc_status}");
    assert_eq!(field("CapBnd:"), only, "{proc_status}");

    let decide = |lab: &Lab| {
        let (lns, wns) = (lab.nodes[laptop].ns.clone(), lab.nodes[web].ns.clone());
        let wv4 = lab.mesh_addrs(web).0;
        assert!(lab.tcp_reaches(&lns, &wns, &wv4, 443), "laptop → web tcp/443 allowed");
        assert!(!lab.tcp_reaches(&lns, &wns, &wv4, 22), "laptop → web tcp/22 denied");
    };
    decide(&lab);
    let st = lab.status(web);
    assert_eq!(st["policy"]["enforcement"], "ebpf", "{}", st["policy"]);
    assert!(
        st["policy"]["counters"]["denied"].as_u64() > Some(0),
        "{}",
        st["policy"]
    );
    let fastpath = &st["fastpath"];
    assert_eq!(fastpath["enforcement"], "ebpf", "the shield is attached: {fastpath}");
    assert!(
        fastpath["shield"]["passed"].as_u64() > Some(0),
        "the shield sees traffic: {fastpath}"
    );
    let pins = format!("/sys/fs/bpf/tunnelmesh/{}", lab.nodes[web].iface);
    assert!(
        Path::new(&format!("{pins}/acl_rules")).exists(),
        "the ACL maps are pinned for bpftool"
    );
    let socket = format!("/run/tunnelmesh/{}/status.sock", lab.nodes[web].iface);
    let meta = fs::metadata(&socket).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (NOBODY, 0o660));

    // Without CAP_PERFMON the verifier refuses the programs (its Spectre v1 rules for loaders
    // that are not perfmon-capable): the same decisions, in userspace, and status says why.
    lab.stop(web);
    lab.nodes[web].wrapper = unprivileged("+net_admin,+bpf");
    lab.join(web, &c, &[]);
    decide(&lab);
    let st = lab.status(web);
    assert_eq!(st["policy"]["enforcement"], "userspace", "{}", st["policy"]);
    let reason = st["policy"]["userspace_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("CAP_PERFMON"), "{reason}");
    let fastpath = &st["fastpath"];
    assert_eq!(fastpath["enforcement"], "userspace", "{fastpath}");
    assert!(
        fastpath["error"].as_str().unwrap_or_default().contains("CAP_PERFMON"),
        "{fastpath}"
    );

    // Without CAP_BPF: the same decisions, in userspace, and status says so.
    lab.stop(web);
    lab.nodes[web].wrapper = unprivileged("+net_admin");
    lab.join(web, &c, &[]);
    decide(&lab);
    let st = lab.status(web);
    assert_eq!(st["policy"]["enforcement"], "userspace", "{}", st["policy"]);
    assert_eq!(st["fastpath"]["enforcement"], "userspace", "{}", st["fastpath"]);
    let log = lab.log(web);
    assert!(log.contains("CAP_BPF"), "the log says what is missing:\n{log}");
}

/// Samples of a Prometheus text document, parsed by a Prometheus text-format parser.
fn scrape(text: &str) -> Vec<prometheus_parse::Sample> {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not the Prometheus text format ({e}):\n{text}"))
        .samples
}

fn value(samples: &[prometheus_parse::Sample], metric: &str, label: Option<(&str, &str)>) -> f64 {
    let sample = samples
        .iter()
        .find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no {metric} {label:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("{metric} is not a number"),
    }
}

#[test]
fn metrics_parse_as_prometheus_text_from_the_cli_and_from_metrics_listen() {
    let served = NodeOptions {
        extra: "metrics_listen = \"127.0.0.1:9464\"".into(),
        ..NodeOptions::default()
    };
    let (lab, a, b) = Lab::pair(63, &served, &NodeOptions::default());
    let (ns, peer) = (lab.nodes[a].ns.clone(), lab.nodes[b].mesh4.to_string());
    assert!(lab.ping(&ns, &peer, 3));
    let b_name = lab.peer_status(a, b)["name"].as_str().unwrap().to_string();

    let out = Command::new(bin())
        .args(["metrics", "--interface", &lab.nodes[a].iface])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli = String::from_utf8(out.stdout).unwrap();
    let curl = lab.sh(&ns, "curl -sS --fail -D /dev/stderr http://127.0.0.1:9464/metrics");
    let headers = String::from_utf8_lossy(&curl.stderr).to_lowercase();
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    let http = String::from_utf8(curl.stdout).unwrap();
    for text in [&cli, &http] {
        let samples = scrape(text);
        assert_eq!(value(&samples, "tunnelmesh_peers", None), 1.0);
        assert_eq!(value(&samples, "tunnelmesh_peers_up", None), 1.0);
        let peer = Some(("peer", b_name.as_str()));
        assert!(
            value(&samples, "tunnelmesh_peer_received_bytes_total", peer) > 0.0,
            "{text}"
        );
        assert!(value(&samples, "tunnelmesh_peer_sent_bytes_total", peer) > 0.0);
        assert_eq!(
            value(&samples, "tunnelmesh_peer_path", Some(("path", "udp"))),
            1.0,
            "{text}"
        );
        assert!(value(&samples, "tunnelmesh_shield_packets_total", Some(("reason", "passed"))) > 0.0);
        assert_eq!(value(&samples, "tunnelmesh_node_info", Some(("shield", "ebpf"))), 1.0);
        assert!(value(&samples, "tunnelmesh_uptime_seconds", None) >= 0.0);
        value(
            &samples,
            "tunnelmesh_datapath_events_total",
            Some(("reason", "rx_malformed")),
        );
        // Conventions: one prefix, lower snake case, counters end in _total, units spelled out.
        for s in &samples {
            assert!(s.metric.starts_with("tunnelmesh_"), "{}", s.metric);
            assert!(
                s.metric.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                s.metric
            );
        }
        for line in text
            .lines()
            .filter(|l| l.starts_with("# TYPE ") && l.ends_with(" counter"))
        {
            let family = line.split(' ').nth(2).unwrap();
            assert!(
                samples.iter().any(|s| s.metric == format!("{family}_total")) || !text.contains(&format!("\n{family}")),
                "{line}"
            );
        }
    }
}

#[test]
fn the_coordinator_reads_its_config_file_and_serves_metrics_of_nodes_joins_pushes_and_the_relay() {
    let mut lab = Lab::new();
    let hosts = lab.switched(64, &["c", "p1", "p2", "p3"]);
    let nodes: Vec<usize> = (1..=3)
        .map(|i| lab.node(&format!("p{i}"), &hosts[i].0, hosts[i].1, i as u8, PORT))
        .collect();
    let authorized = lab.dir.path().join("authorized_keys");
    let lines = format!(
        "{}\n{}\n",
        lab.nodes[nodes[0]].public_line, lab.nodes[nodes[1]].public_line
    );
    fs::write(&authorized, lines).unwrap();
    let config = lab.dir.path().join("coordinator.toml");
    fs::write(
        &config,
        format!(
            "metrics_listen = \"127.0.0.1:9465\"\nauthorized_keys = \"{}\"\nrelay_limit_mbit = 50\n",
            authorized.display()
        ),
    )
    .unwrap();
    let c = lab.coordinator(&hosts[0].0, hosts[0].1, &["--config", config.to_str().unwrap()]);
    assert!(
        c.log().contains("metrics at http://127.0.0.1:9465/metrics"),
        "{}",
        c.log()
    );
    lab.join(nodes[0], &c, &[]);
    lab.join(nodes[1], &c, &[]);
    // p3 is in no authorized_keys and has no token: refused.
    lab.spawn_joining(nodes[2], &c, &[]);
    let (ok, _) = lab.wait_exit(nodes[2], Duration::from_secs(15));
    assert!(!ok);

    let metrics = || {
        let out = lab.sh(&hosts[0].0, "curl -sS --fail http://127.0.0.1:9465/metrics");
        let text = String::from_utf8(out.stdout).unwrap();
        (scrape(&text), text)
    };
    eventually("both nodes connected", Duration::from_secs(10), || {
        value(&metrics().0, "tunnelmesh_coordinator_connections", None) == 2.0
    });
    let (samples, text) = metrics();
    assert_eq!(value(&samples, "tunnelmesh_coordinator_nodes", None), 2.0, "{text}");
    let joins = |outcome| {
        value(
            &samples,
            "tunnelmesh_coordinator_joins_total",
            Some(("outcome", outcome)),
        )
    };
    assert_eq!((joins("admitted"), joins("refused")), (2.0, 1.0), "{text}");
    assert_eq!(
        value(&samples, "tunnelmesh_coordinator_join_duration_seconds_count", None),
        2.0,
        "{text}"
    );
    assert!(
        value(&samples, "tunnelmesh_coordinator_pushes_total", None) >= 1.0,
        "p1 heard of p2: {text}"
    );
    value(&samples, "tunnelmesh_coordinator_relay_bytes_total", None);
    value(
        &samples,
        "tunnelmesh_coordinator_relay_dropped_frames_total",
        Some(("reason", "rate_limited")),
    );
}

#[test]
fn the_debian_package_unpacks_into_a_throwaway_root_with_its_units_configs_docs_and_a_working_binary() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let debs: Vec<PathBuf> = fs::read_dir(repo.join("target/debian"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    let deb = debs
        .iter()
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("no target/debian/*.deb: `cargo xtask dist` builds it (and `cargo xtask test` runs it first)");
    let root = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let deb = deb.to_str().unwrap();
    run(&["dpkg-deb", "-x", deb, root.path().to_str().unwrap()]);
    let at = |p: &str| root.path().join(p.trim_start_matches('/'));
    for unit in UNITS {
        let shipped = fs::read(repo.join("dist/systemd").join(unit)).unwrap();
        assert_eq!(
            fs::read(at(&format!("lib/systemd/system/{unit}"))).unwrap(),
            shipped,
            "{unit} as tested"
        );
    }
    for file in [
        "usr/lib/sysusers.d/tunnelmesh.conf",
        "usr/lib/tmpfiles.d/tunnelmesh.conf",
        "usr/share/man/man1/tunnelmesh.1.gz",
        "usr/share/man/man1/tunnelmesh-up.1.gz",
        "usr/share/bash-completion/completions/tunnelmesh",
        "usr/share/zsh/vendor-completions/_tunnelmesh",
        "usr/share/fish/vendor_completions.d/tunnelmesh.fish",
        "usr/share/doc/tunnelmesh/copyright",
        "usr/share/doc/tunnelmesh/README.md",
    ] {
        assert!(
            fs::metadata(at(file)).is_ok_and(|m| m.len() > 0),
            "{file} is missing or empty"
        );
    }
    // The examples parse as what they claim to be (placeholders aside).
    let conffiles = run(&["dpkg-deb", "-I", deb, "conffiles"]);
    for conf in [
        "/etc/tunnelmesh/coordinator.toml",
        "/etc/tunnelmesh/static.toml.example",
        "/etc/tunnelmesh/coordinated.toml.example",
    ] {
        assert!(
            conffiles.lines().any(|l| l == conf),
            "{conf} is not a conffile: {conffiles}"
        );
    }
    let version = run(&[at("usr/bin/tunnelmesh").to_str().unwrap(), "--version"]);
    assert_eq!(version.trim(), format!("tunnelmesh {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(at("usr/bin/tunnelmesh"))
        .args(["coordinator", "info", "--config"])
        .arg(at("etc/tunnelmesh/coordinator.toml"))
        .args(["--data-dir", "/nonexistent-tunnelmesh-test"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("config") && stderr.contains("nonexistent"),
        "the shipped coordinator.toml parses: {stderr}"
    );
    // Maintainer scripts never enable or start anything.
    let control = tempfile::tempdir().unwrap();
    run(&["dpkg-deb", "-e", deb, control.path().to_str().unwrap()]);
    for script in ["postinst", "prerm", "postrm"] {
        let text = fs::read_to_string(control.path().join(script)).unwrap();
        for word in ["enable", "systemctl start", "invoke start", "restart "] {
            assert!(
                !text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .any(|l| l.contains(word) && !l.contains("try-restart")),
                "{script} runs `{word}`:\n{text}"
            );
        }
    }
}
