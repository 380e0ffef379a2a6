//! `cargo xtask bench [SUITE]`: the benchmark suites (tables on stdout, JSON under
//! `target/bench/`). `tunnel` (the default, in `bench/tunnel.rs`) compares TunnelMesh with raw
//! veth, wireguard-go and boringtun-cli; `crypto` times the AEAD candidates; `coordinator`,
//! `shield` and `paths` are below. Benchmarks only report; they assert nothing.

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

/// `cargo xtask bench coordinator`: registration rate and memory with 10,000 simulated peers, and
/// the time one change takes to reach 1,000 connected WebSockets. The coordinator is the real
/// binary on loopback; the peers are in-process clients speaking the real protocol (TLS with a
/// pinned fingerprint, SSHSIG proof), without TUN devices.
mod coordinator {
    use std::{
        process::{Command, Stdio},
        sync::Arc,
        time::{Duration, Instant},
    };

    use serde_json::json;
    use tunnelmesh_daemon::{
        identity::Identity,
        node::client::{Client, JoinOptions, next_text},
    };

    const PEERS: usize = 10_000;
    const CONNECTED: usize = 1_000;
    const CONCURRENCY: usize = 32;
    const LISTEN: &str = "127.0.0.1:18443";

    fn memory_kib(pid: u32) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn client(url: &str, fingerprint: &str, token: &str, identity: Arc<Identity>) -> Client {
        let opts = JoinOptions {
            url: url.into(),
            fingerprint: fingerprint.into(),
            token: Some(token.into()),
            name: None,
            interface: String::new(),
            listen_port: 51820,
            mtu: 1420,
            workers: 1,
            state_dir: Default::default(),
            no_ebpf: true,
            no_offload: false,
            ssh_port: 0,
            port_mapping: tunnelmesh_daemon::nat::portmap::Mode::Off,
            port_mapping_lifetime: tunnelmesh_daemon::nat::portmap::DEFAULT_LIFETIME,
        };
        Client::new(&opts, identity).expect("client")
    }

    pub fn run() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("coordinator.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(tunnelmesh_tests::bin())
            .args(["coordinator", "--listen", LISTEN, "--data-dir"])
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the coordinator");
        let deadline = Instant::now() + Duration::from_secs(15);
        let fingerprint = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(fp) = text.lines().find_map(|l| l.strip_prefix("TLS fingerprint: ")) {
                break fp.trim().to_string();
            }
            assert!(Instant::now() < deadline, "coordinator did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = Command::new(tunnelmesh_tests::bin())
            .args([
                "coordinator",
                "token",
                "create",
                "--uses",
                "100000",
                "--ttl",
                "1h",
                "--data-dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let url = format!("https://{LISTEN}");
        let pid = child.id();
        let idle = memory_kib(pid);

        let identities: Vec<Arc<Identity>> = (0..=PEERS)
            .map(|i| Arc::new(Identity::generate(&format!("root@sim{i}")).0))
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let results = runtime.block_on(async {
            // Phase 1: every peer registers (connect, prove its key, receive the welcome, leave).
            let start = Instant::now();
            let all = Arc::new(identities.clone());
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut workers = Vec::new();
            for _ in 0..CONCURRENCY {
                let (all, next, url, fingerprint, token) = (
                    all.clone(),
                    next.clone(),
                    url.clone(),
                    fingerprint.clone(),
                    token.clone(),
                );
                workers.push(tokio::spawn(async move {
                    let mut largest = 0;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= PEERS {
                            break largest;
                        }
                        let id = all[i].clone();
                        let (welcome, _ws) = client(&url, &fingerprint, &token, id).join_raw().await.expect("join");
                        largest = largest.max(welcome.iter().map(String::len).sum::<usize>());
                    }
                }));
            }
            let mut largest_welcome = 0;
            for w in workers {
                largest_welcome = largest_welcome.max(w.await.unwrap());
            }
            let register_secs = start.elapsed().as_secs_f64();
            let after_register = memory_kib(pid);

            // Phase 2: 1,000 of them stay connected.
            let start = Instant::now();
            let mut sockets = Vec::new();
            for id in &identities[..CONNECTED] {
                let (_, ws) = client(&url, &fingerprint, &token, id.clone())
                    .join_raw()
                    .await
                    .expect("rejoin");
                sockets.push(ws);
            }
            let connect_secs = start.elapsed().as_secs_f64();
            let connected_memory = memory_kib(pid);

            // Phase 3: one node joins; how long until all 1,000 hear of it?
            let (tx, mut rx) = tokio::sync::mpsc::channel(CONNECTED);
            for mut ws in sockets {
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        let text = next_text(&mut ws).await.expect("update");
                        if text.contains("peer_upsert") {
                            let _ = tx.send(Instant::now()).await;
                            break;
                        }
                    }
                    ws
                });
            }
            let change = Instant::now();
            let newcomer = identities[PEERS].clone();
            let _kept = client(&url, &fingerprint, &token, newcomer)
                .join_raw()
                .await
                .expect("newcomer joins");
            let mut arrivals = Vec::new();
            for _ in 0..CONNECTED {
                arrivals.push(rx.recv().await.expect("arrival").duration_since(change).as_secs_f64() * 1000.0);
            }
            arrivals.sort_by(f64::total_cmp);
            json!({
                "peers": PEERS,
                "registration_seconds": register_secs,
                "registrations_per_second": PEERS as f64 / register_secs,
                "largest_welcome_bytes": largest_welcome,
                "coordinator_rss_kib_idle": idle.0,
                "coordinator_rss_kib_after_registration": after_register.0,
                "coordinator_rss_kib_with_1000_connected": connected_memory.0,
                "coordinator_peak_rss_kib": connected_memory.1,
                "connect_1000_seconds": connect_secs,
                "change_to_1000_ms_p50": arrivals[CONNECTED / 2],
                "change_to_1000_ms_max": arrivals[CONNECTED - 1],
            })
        });
        let _ = child.kill();
        let _ = child.wait();
        println!("| measure | value |");
        println!("|---|---|");
        for (k, v) in results.as_object().unwrap() {
            println!("| {k} | {v} |");
        }
        super::write_json("coordinator", &results);
    }
}

/// `cargo xtask bench shield`: a flood of junk to a node's mesh port from another namespace, with
/// the XDP shield and without eBPF. Reports the flood rate, what the shield dropped, the
/// flooded daemon's CPU, and whether a peer's tunnel traffic kept flowing (TCP throughput and ping
/// through the tunnel, each before and during the flood).
mod shield {
    use std::{
        net::{Ipv4Addr, SocketAddr, UdpSocket},
        os::fd::AsRawFd,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        thread,
        time::{Duration, Instant},
    };

    use serde_json::{Value, json};
    use tunnelmesh_tests::{Lab, NodeOptions, PORT, percpu_sums};

    use super::{SECONDS, cpu_seconds, iperf, write_json};

    /// The junk: a datagram of an unknown type, a data message for an index no session has, and a
    /// forged handshake initiation (valid size, garbage content), in turn.
    fn junk() -> Vec<Vec<u8>> {
        let mut unknown_type = vec![0x5a; 64];
        unknown_type[0] = 9;
        let mut data = vec![0u8; 96];
        data[0] = 4;
        data[4..8].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
        let mut initiation = vec![0x33; 148];
        initiation[0] = 1;
        initiation[1..4].fill(0);
        vec![unknown_type, data, initiation]
    }

    /// Send junk to `target` as fast as a thread can (batches of 64 via sendmmsg) until `stop`;
    /// datagrams sent.
    fn flood(target: SocketAddr, stop: Arc<AtomicBool>) -> u64 {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind the flooder");
        socket.connect(target).expect("connect the flooder");
        let packets = junk();
        let mut iovecs: Vec<libc::iovec> = (0..64)
            .map(|i| {
                let p = &packets[i % packets.len()];
                libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                }
            })
            .collect();
        let mut headers: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `headers` point at `iovecs`, which point at `packets`; all outlive the call.
            let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), headers.len() as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        sent
    }

    /// (average RTT ms, loss %) of 200 pings at 100 Hz.
    fn ping(lab: &Lab, ns: &str, dst: &str) -> (f64, f64) {
        super::ping_stats(lab, ns, "-c 200 -i 0.01 -W 1", dst)
    }

    /// Datagrams the shield dropped (every reason but `passed`, key 0).
    fn shield_dropped(iface: &str) -> u64 {
        let pin = format!("/sys/fs/bpf/tunnelmesh/{iface}/shield_counters");
        if !std::path::Path::new(&pin).exists() {
            return 0;
        }
        percpu_sums(&pin).iter().filter(|(k, _)| **k != 0).map(|(_, n)| n).sum()
    }

    /// Flooding threads: one per core, as a botnet would not be polite either.
    fn flood_threads() -> usize {
        thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// A running flood from namespace `ns`.
    struct Flood {
        stop: Arc<AtomicBool>,
        threads: Vec<thread::JoinHandle<u64>>,
        started: Instant,
    }

    impl Flood {
        fn start(lab: &Lab, ns: &str, target: SocketAddr) -> Flood {
            let stop = Arc::new(AtomicBool::new(false));
            let threads = (0..flood_threads())
                .map(|_| {
                    let flag = stop.clone();
                    lab.in_netns(ns, move || flood(target, flag))
                })
                .collect();
            Flood {
                stop,
                threads,
                started: Instant::now(),
            }
        }

        /// Stop; datagrams per second sent.
        fn finish(self) -> f64 {
            self.stop.store(true, Ordering::Relaxed);
            let sent: u64 = self.threads.into_iter().map(|t| t.join().unwrap()).sum();
            sent as f64 / self.started.elapsed().as_secs_f64()
        }
    }

    fn scenario(net: u8, no_ebpf: bool) -> Value {
        let mut lab = Lab::new();
        // a—b carries the tunnel; the flooder j has its own link to a, so the junk costs no
        // bridge on the way.
        let (ns_a, ns_b, ns_j) = (lab.netns("a"), lab.netns("b"), lab.netns("j"));
        let (ua, ub) = (Ipv4Addr::new(198, 18, net, 1), Ipv4Addr::new(198, 18, net, 2));
        lab.link(&ns_a, ua, &ns_b, ub);
        let (ua_j, uj) = (Ipv4Addr::new(198, 19, net, 1), Ipv4Addr::new(198, 19, net, 2));
        lab.link(&ns_a, ua_j, &ns_j, uj);
        let a = lab.node("a", &ns_a, ua, 1, PORT);
        let b = lab.node("b", &ns_b, ub, 2, PORT);
        let opts = NodeOptions {
            no_ebpf,
            ..Default::default()
        };
        lab.configure(a, &[b], &opts);
        lab.configure(b, &[a], &NodeOptions::default());
        lab.start(a);
        lab.start(b);
        let mesh_a = lab.nodes[a].mesh4.to_string();
        assert!(lab.ping(&ns_b, &mesh_a, 3), "tunnel is up");
        let pid = lab.pid(a).expect("a runs");
        let iface = lab.nodes[a].iface.clone();
        let target = SocketAddr::new(ua_j.into(), PORT);

        let quiet_bps = iperf(&lab, &ns_a, &ns_b, &mesh_a, "");
        let quiet_ping = ping(&lab, &ns_b, &mesh_a);

        // Flood with a light legitimate load (ping at 100 Hz): the flood rate, what the shield
        // dropped, the daemon's CPU.
        let flood = Flood::start(&lab, &ns_j, target);
        thread::sleep(Duration::from_millis(300));
        let (cpu0, dropped0, t0) = (cpu_seconds(pid), shield_dropped(&iface), Instant::now());
        let flood_ping = ping(&lab, &ns_b, &mesh_a);
        let (cpu1, dropped1, elapsed) = (cpu_seconds(pid), shield_dropped(&iface), t0.elapsed());
        let flood_pps = flood.finish();
        // Flood while a TCP stream runs through the tunnel (everything shares the two cores).
        let flood = Flood::start(&lab, &ns_j, target);
        let flood_bps = iperf(&lab, &ns_a, &ns_b, &mesh_a, "");
        let flood_pps_tcp = flood.finish();
        json!({
            "mode": if no_ebpf { "no eBPF (userspace checks)" } else { "XDP shield" },
            "flood_pps": flood_pps,
            "dropped_in_kernel_pps": (dropped1 - dropped0) as f64 / elapsed.as_secs_f64(),
            "daemon_cpu_share": (cpu1 - cpu0) / elapsed.as_secs_f64(),
            "ping_ms_quiet": quiet_ping.0,
            "ping_loss_pct_quiet": quiet_ping.1,
            "ping_ms_flood": flood_ping.0,
            "ping_loss_pct_flood": flood_ping.1,
            "tcp_gbit_quiet": quiet_bps / 1e9,
            "tcp_gbit_flood": flood_bps / 1e9,
            "flood_pps_during_tcp": flood_pps_tcp,
            "daemon_counters": lab.status(a)["counters"].clone(),
        })
    }

    pub fn run() {
        let rows = [scenario(202, false), scenario(203, true)];
        println!(
            "| mode | junk sent | dropped by XDP | flooded daemon CPU | ping via tunnel quiet → flood (loss) | TCP via tunnel quiet → flood (junk meanwhile) |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {} | {:.0} k pkt/s | {:.0} k pkt/s | {:.0} % of a core | {:.3} → {:.3} ms ({:.1} %) | {:.2} → {:.2} Gbit/s ({:.0} k pkt/s) |",
                r["mode"].as_str().unwrap(),
                f("flood_pps") / 1e3,
                f("dropped_in_kernel_pps") / 1e3,
                f("daemon_cpu_share") * 100.0,
                f("ping_ms_quiet"),
                f("ping_ms_flood"),
                f("ping_loss_pct_flood"),
                f("tcp_gbit_quiet"),
                f("tcp_gbit_flood"),
                f("flood_pps_during_tcp") / 1e3,
            );
        }
        let nproc = thread::available_parallelism().map_or(1, |n| n.get());
        write_json(
            "shield",
            &json!({ "suite": "shield", "seconds_per_run": SECONDS, "cores": nproc, "results": rows }),
        );
    }
}

/// `cargo xtask bench paths`: throughput and latency through the tunnel on each path type —
/// direct UDP, the SSH transport (UDP blocked by nftables), the coordinator's relay (everything
/// but the coordinator blocked) — between two coordinated peers on one switch.
mod paths {
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
}
