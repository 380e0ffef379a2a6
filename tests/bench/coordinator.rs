//! `cargo xtask bench coordinator`: registration rate and memory with 10,000 simulated peers, the
//! time one change takes to reach 1,000 connected WebSockets, and what one member alternating its
//! endpoints 1,000 times a second costs the others (pushes per peer per second, coordinator
//! CPU). The coordinator is the real binary on loopback; the peers are in-process clients
//! speaking the real protocol (TLS with a pinned fingerprint, SSHSIG proof), without TUN devices.

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use tunnelmesh_daemon::{
    control::proto::ClientMsg,
    identity::Identity,
    node::client::{Client, JoinOptions, next_text, send_msg},
    protocol::discovery::NatKind,
};

const PEERS: usize = 10_000;
const CONNECTED: usize = 1_000;
const CONCURRENCY: usize = 32;
const LISTEN: &str = "127.0.0.1:18443";
/// Phase 4: endpoint changes one member sends per second, for this long.
const CHURN_PER_SECOND: u64 = 1_000;
const CHURN: Duration = Duration::from_secs(5);

/// CPU seconds `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

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
    let opts = JoinOptions::without_interface(url, fingerprint, token);
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
        let listeners: Vec<_> = sockets
            .into_iter()
            .map(|mut ws| {
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
                })
            })
            .collect();
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
        let mut sockets = Vec::new();
        for l in listeners {
            sockets.push(l.await.unwrap());
        }

        // Phase 4: the first of them alternates its endpoints CHURN_PER_SECOND times a second;
        // every other counts the pushes about it, until a second after the churn ends.
        let churner = identities[0].public().fingerprint();
        let mut sender = sockets.remove(0);
        let counters: Vec<_> = sockets
            .into_iter()
            .map(|mut ws| {
                let churner = churner.clone();
                tokio::spawn(async move {
                    let end = Instant::now() + CHURN + Duration::from_secs(2);
                    let mut pushes = 0u64;
                    while let Ok(Ok(text)) = tokio::time::timeout_at(end.into(), next_text(&mut ws)).await {
                        if text.contains("peer_upsert") && text.contains(&churner) {
                            pushes += 1;
                        }
                    }
                    (pushes, ws)
                })
            })
            .collect();
        let cpu_before = cpu_seconds(pid);
        let churn_start = Instant::now();
        let mut sent = 0u64;
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        while churn_start.elapsed() < CHURN {
            pace.tick().await;
            for _ in 0..CHURN_PER_SECOND / 100 {
                let msg = ClientMsg::Candidates {
                    endpoints: vec![format!("198.18.0.9:{}", 40000 + sent % 2)],
                    nat: NatKind::Easy,
                };
                send_msg(&mut sender, &msg).await.expect("send candidates");
                sent += 1;
            }
        }
        let churn_secs = churn_start.elapsed().as_secs_f64();
        let mut per_peer = Vec::new();
        for c in counters {
            per_peer.push(c.await.unwrap().0);
        }
        let coordinator_cpu = cpu_seconds(pid) - cpu_before;
        per_peer.sort_unstable();
        let window = churn_secs + 2.0;
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
            "churn_changes_per_second": sent as f64 / churn_secs,
            "churn_pushes_per_peer_max": per_peer[per_peer.len() - 1],
            "churn_pushes_per_peer_per_second_max": per_peer[per_peer.len() - 1] as f64 / window,
            "churn_pushes_per_peer_min": per_peer[0],
            "churn_coordinator_cpu_seconds": coordinator_cpu,
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
