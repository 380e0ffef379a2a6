//! `cargo xtask bench coordinator`: registration rate and memory with 10,000 simulated peers, and
//! the time one change takes to reach 1,000 connected WebSockets. The coordinator is the real
//! binary on loopback; the peers are in-process clients speaking the real protocol (TLS with a
//! pinned fingerprint, SSHSIG proof), without TUN devices.

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
