//! `cargo xtask bench tunnel`: TunnelMesh against raw veth, Debian's `wireguard-go` and
//! crates.io's `boringtun-cli`, in one run on one machine.
//!
//! Absolute figures on our VMs move by 20–35 % between runs; ratios within one run do not. So
//! every system is measured in the same invocation, in interleaved rounds (each round sets up
//! each system afresh in its own two namespaces, measures it alone, tears it down), and the table
//! shows medians over the rounds. Per system: one TCP stream each way, four streams, 64-byte UDP
//! datagrams delivered per second, ping idle and under a bulk stream, the tunnel daemons' CPU
//! time (both ends) and Mbit moved per daemon-CPU-second. TunnelMesh runs with its defaults (the
//! shield at TC on these veths, steering, offloads), with the shield at XDP in the driver, without
//! eBPF, and without offloads. Benchmarks report; they assert nothing.
//!
//! Two knobs for whoever is chasing a figure: `TUNNELMESH_BENCH_SYSTEMS` (a comma list of
//! `veth`, `tunnelmesh`, `xdp_shield`, `no_ebpf`, `no_offload`, `wireguard-go`, `boringtun`, and `one_worker`,
//! which only runs when named) measures only those, and `TUNNELMESH_BENCH_PERF=1` records the
//! whole machine with `perf` during each one-stream a→b run
//! (`target/bench/perf/SYSTEM-rROUND.data`) and prints where its cycles went.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tunnelmesh_tests::{Lab, NodeOptions, host};

use super::{SECONDS, cpu_seconds, iperf3, ping_stats, write_json};

const ROUNDS: usize = 3;
/// boringtun-cli from crates.io, installed by the bench itself.
const BORINGTUN: &str = "0.7.1";
/// UDP port of the WireGuard implementations (TunnelMesh keeps its own).
const WG_PORT: u16 = 51900;

#[derive(Clone, Copy, PartialEq)]
enum System {
    Veth,
    TunnelMesh(Variant),
    WireguardGo,
    Boringtun,
}

/// How TunnelMesh is configured for a row.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// The product's defaults: the shield (at TC on a veth), steering, offloads, one worker per
    /// core.
    Defaults,
    /// The shield at XDP in the driver (`shield_hook = "xdp"`), which on a veth turns off the
    /// peer's GSO and copies every skb.
    XdpShield,
    NoEbpf,
    NoOffload,
    /// One worker: every flow to the peer on one TUN queue and one worker, which is what a TUN
    /// steering program choosing the queue by peer would do in this two-node bench (not measured
    /// unless named in `TUNNELMESH_BENCH_SYSTEMS`).
    OneWorker,
}

impl System {
    /// The name `TUNNELMESH_BENCH_SYSTEMS` knows it by.
    fn key(self) -> &'static str {
        match self {
            System::Veth => "veth",
            System::TunnelMesh(Variant::Defaults) => "tunnelmesh",
            System::TunnelMesh(Variant::XdpShield) => "xdp_shield",
            System::TunnelMesh(Variant::NoEbpf) => "no_ebpf",
            System::TunnelMesh(Variant::NoOffload) => "no_offload",
            System::TunnelMesh(Variant::OneWorker) => "one_worker",
            System::WireguardGo => "wireguard-go",
            System::Boringtun => "boringtun",
        }
    }

    fn name(self) -> &'static str {
        match self {
            System::Veth => "raw veth",
            System::TunnelMesh(Variant::Defaults) => "tunnelmesh",
            System::TunnelMesh(Variant::XdpShield) => "tunnelmesh (XDP shield)",
            System::TunnelMesh(Variant::NoEbpf) => "tunnelmesh (no eBPF)",
            System::TunnelMesh(Variant::NoOffload) => "tunnelmesh (no offloads)",
            System::TunnelMesh(Variant::OneWorker) => "tunnelmesh (one worker)",
            System::WireguardGo => "wireguard-go (Debian)",
            System::Boringtun => "boringtun-cli",
        }
    }
}

/// One system, up in a fresh pair of namespaces.
struct Setup {
    /// The WireGuard daemons (TunnelMesh's belong to the lab).
    children: Vec<Child>,
    lab: Lab,
    ns: [String; 2],
    /// Where each side reaches the other: `dst[0]` is b's address seen from a.
    dst: [String; 2],
    pids: Vec<u32>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Setup {
    fn cpu(&self) -> f64 {
        self.pids.iter().map(|&p| cpu_seconds(p)).sum()
    }
}

fn start(system: System, net: u8, tools: &Tools) -> Setup {
    if let System::TunnelMesh(variant) = system {
        let opts = NodeOptions {
            no_ebpf: variant == Variant::NoEbpf,
            workers: if variant == Variant::OneWorker { 1 } else { 0 },
            extra: match variant {
                Variant::NoOffload => "no_offload = true".into(),
                Variant::XdpShield => "shield_hook = \"xdp\"".into(),
                _ => String::new(),
            },
            ..NodeOptions::default()
        };
        let (lab, a, b) = Lab::pair(net, &opts, &opts);
        let ns = [lab.nodes[a].ns.clone(), lab.nodes[b].ns.clone()];
        let dst = [lab.nodes[b].mesh4.to_string(), lab.nodes[a].mesh4.to_string()];
        let pids = vec![lab.pid(a).expect("a runs"), lab.pid(b).expect("b runs")];
        assert!(lab.ping(&ns[0], &dst[0], 2), "{} is up", system.name());
        return Setup {
            children: Vec::new(),
            lab,
            ns,
            dst,
            pids,
        };
    }
    let mut lab = Lab::new();
    let ns = [lab.netns("a"), lab.netns("b")];
    let under = [Ipv4Addr::new(198, 18, net, 1), Ipv4Addr::new(198, 18, net, 2)];
    lab.link(&ns[0], under[0], &ns[1], under[1]);
    if system == System::Veth {
        let dst = [under[1].to_string(), under[0].to_string()];
        return Setup {
            children: Vec::new(),
            lab,
            ns,
            dst,
            pids: Vec::new(),
        };
    }
    let keys: Vec<(String, String)> = (0..2).map(|_| wg_keypair(&lab)).collect();
    let mesh = [Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2)];
    let mut children = Vec::new();
    for side in 0..2 {
        let iface = format!("{}w{side}", lab.prefix);
        let sock = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns[side])).arg("--");
        match system {
            System::WireguardGo => cmd
                .arg(&tools.wireguard_go)
                .args(["-f", &iface])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1"),
            _ => cmd
                .arg(&tools.boringtun)
                .args([&iface, "--foreground", "--disable-drop-privileges"]),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", system.name()));
        children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "{} made no UAPI socket {}",
                system.name(),
                sock.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
        let key_file = lab.dir.path().join(format!("wg{side}.key"));
        fs::write(&key_file, &keys[side].0).expect("write key");
        let other = 1 - side;
        lab.sh(
            &ns[side],
            &format!(
                "wg set {iface} private-key {} listen-port {WG_PORT} peer {} endpoint {}:{WG_PORT} allowed-ips {}/32 \
                 && ip addr add {}/24 dev {iface} && ip link set {iface} mtu 1420 up",
                key_file.display(),
                keys[other].1,
                under[other],
                mesh[other],
                mesh[side],
            ),
        );
    }
    let pids = children.iter().map(Child::id).collect();
    let setup = Setup {
        children,
        lab,
        ns,
        dst: [mesh[1].to_string(), mesh[0].to_string()],
        pids,
    };
    assert!(
        setup.lab.ping(&setup.ns[0], &setup.dst[0], 3),
        "{} is up",
        system.name()
    );
    setup
}

/// A WireGuard key pair from `wg genkey` / `wg pubkey`: (private, public), base64.
fn wg_keypair(lab: &Lab) -> (String, String) {
    let private = String::from_utf8(host(&["wg", "genkey"]).stdout).expect("base64");
    let file = lab.dir.path().join("genkey.tmp");
    fs::write(&file, &private).expect("write key");
    let public = host(&["sh", "-c", &format!("wg pubkey < {}", file.display())]);
    let _ = fs::remove_file(&file);
    (
        private.trim().into(),
        String::from_utf8_lossy(&public.stdout).trim().into(),
    )
}

/// Where the WireGuard implementations to compare with are.
struct Tools {
    wireguard_go: PathBuf,
    boringtun: PathBuf,
}

/// Install Debian's wireguard-go and wireguard-tools, and boringtun-cli from crates.io (into
/// `target/bench-tools`), unless there already.
fn install_tools() -> Tools {
    if !Path::new("/usr/bin/wireguard-go").exists() || !Path::new("/usr/bin/wg").exists() {
        let apt = |args: &[&str]| {
            let ok = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "apt-get {args:?} failed");
        };
        apt(&["update", "-q"]);
        apt(&[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "wireguard-go",
            "wireguard-tools",
        ]);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tools");
    let boringtun = root.join("bin/boringtun-cli");
    if !boringtun.exists() {
        let ok = Command::new("cargo")
            .args(["install", "boringtun-cli", "--version", BORINGTUN, "--locked", "--root"])
            .arg(&root)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cargo install boringtun-cli {BORINGTUN} failed");
    }
    Tools {
        wireguard_go: "/usr/bin/wireguard-go".into(),
        boringtun,
    }
}

/// Measure one system once; with `perf`, record the machine during the one-stream a→b run into
/// that file and print where the cycles went.
fn measure(system: System, net: u8, tools: &Tools, perf: Option<&Path>) -> BTreeMap<&'static str, f64> {
    let s = start(system, net, tools);
    let mut m = BTreeMap::new();
    let tunnel = !s.pids.is_empty();
    let tcp = |m: &mut BTreeMap<&'static str, f64>, key: &'static str, from: usize, extra: &str| {
        let recorder = perf.filter(|_| key == "tcp_1_ab_mbit").map(|file| {
            Command::new("perf")
                .args(["record", "-a", "-F", "999", "-o"])
                .arg(file)
                .args(["--", "sleep", &(SECONDS + 1).to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("TUNNELMESH_BENCH_PERF needs `perf` (Debian: apt install linux-perf): {e}"))
        });
        let before = s.cpu();
        let v = iperf3(&s.lab, &s.ns[1 - from], &s.ns[from], &s.dst[from], extra);
        let cpu = s.cpu() - before;
        if let (Some(mut recorder), Some(file)) = (recorder, perf) {
            let _ = recorder.wait();
            print_profile(system, file);
        }
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
        m.insert(key, bps / 1e6);
        if tunnel && key == "tcp_1_ab_mbit" {
            m.insert("daemon_cpu_s", cpu);
            m.insert("mbit_per_cpu_s", bps / 1e6 * f64::from(SECONDS) / cpu.max(1e-9));
        }
    };
    tcp(&mut m, "tcp_1_ab_mbit", 0, "");
    tcp(&mut m, "tcp_1_ba_mbit", 1, "");
    tcp(&mut m, "tcp_4_ab_mbit", 0, "-P 4");
    let udp = iperf3(&s.lab, &s.ns[1], &s.ns[0], &s.dst[0], "-u -l 64 -b 0");
    let sum = &udp["end"]["sum"];
    let delivered = sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
    m.insert("udp64_kpps", delivered / f64::from(SECONDS) / 1e3);
    m.insert(
        "ping_idle_ms",
        ping_stats(&s.lab, &s.ns[0], "-c 50 -i 0.02", &s.dst[0]).0,
    );
    // Ping under a bulk stream in the same direction.
    let mut server = s
        .lab
        .sh_cmd(&s.ns[1], "iperf3 -s -1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3");
    thread::sleep(Duration::from_millis(300));
    let mut bulk = s
        .lab
        .sh_cmd(&s.ns[0], &format!("exec iperf3 -c {} -t {}", s.dst[0], SECONDS + 1))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3");
    thread::sleep(Duration::from_millis(500));
    m.insert(
        "ping_loaded_ms",
        ping_stats(&s.lab, &s.ns[0], &format!("-c {} -i 0.1", SECONDS * 8), &s.dst[0]).0,
    );
    let _ = bulk.wait();
    let _ = server.kill();
    let _ = server.wait();
    m
}

/// Where the cycles of a `perf record -a` file went: by binary (the kernel, the daemon, each BPF
/// program) down to 0.1 %, then the symbols that took at least 1 %.
fn print_profile(system: System, file: &Path) {
    println!(
        "\nwhere the cycles went, {} one stream a→b ({}):",
        system.name(),
        file.display()
    );
    for (fields, limit) in [("overhead,dso", "0.1"), ("overhead,dso,sym", "1")] {
        let out = Command::new("perf")
            .args([
                "report",
                "--no-children",
                "--stdio",
                "-F",
                fields,
                "--percent-limit",
                limit,
                "-i",
            ])
            .arg(file)
            .stderr(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("perf report {}: {e}", file.display()));
        if !out.status.success() {
            println!(
                "  perf report could not read {} (was perf record interrupted?)",
                file.display()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            println!("  {}", line.trim_end());
        }
        println!();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run() {
    let tools = install_tools();
    let defaults = [
        System::Veth,
        System::TunnelMesh(Variant::Defaults),
        System::TunnelMesh(Variant::XdpShield),
        System::TunnelMesh(Variant::NoEbpf),
        System::TunnelMesh(Variant::NoOffload),
        System::WireguardGo,
        System::Boringtun,
    ];
    let systems: Vec<System> = match std::env::var("TUNNELMESH_BENCH_SYSTEMS") {
        Ok(list) => {
            let known: Vec<System> = defaults
                .into_iter()
                .chain([System::TunnelMesh(Variant::OneWorker)])
                .collect();
            let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &wanted {
                assert!(
                    known.iter().any(|s| s.key() == *w),
                    "TUNNELMESH_BENCH_SYSTEMS names `{w}`; the systems are {}",
                    known.iter().map(|s| s.key()).collect::<Vec<_>>().join(", ")
                );
            }
            known.into_iter().filter(|s| wanted.contains(&s.key())).collect()
        }
        Err(_) => defaults.to_vec(),
    };
    let perf_dir = std::env::var_os("TUNNELMESH_BENCH_PERF").map(|_| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/perf");
        fs::create_dir_all(&dir).expect("target/bench/perf");
        dir
    });
    let mut runs: Vec<Vec<BTreeMap<&str, f64>>> = vec![Vec::new(); systems.len()];
    for round in 0..ROUNDS {
        for (i, &system) in systems.iter().enumerate() {
            eprintln!("round {}/{ROUNDS}: {}", round + 1, system.name());
            let perf = perf_dir
                .as_ref()
                .map(|d| d.join(format!("{}-r{}.data", system.key(), round + 1)));
            runs[i].push(measure(system, 200 + i as u8, &tools, perf.as_deref()));
        }
    }
    let keys = [
        ("tcp_1_ab_mbit", "1 stream a→b Mbit/s"),
        ("tcp_1_ba_mbit", "1 stream b→a"),
        ("tcp_4_ab_mbit", "4 streams"),
        ("udp64_kpps", "64 B UDP kpkt/s"),
        ("ping_idle_ms", "ping idle ms"),
        ("ping_loaded_ms", "ping loaded ms"),
        ("daemon_cpu_s", "daemon CPU s"),
        ("mbit_per_cpu_s", "Mbit per CPU-s"),
    ];
    let mut table = Vec::new();
    for (i, system) in systems.iter().enumerate() {
        let mut row = serde_json::Map::new();
        row.insert("system".into(), json!(system.name()));
        for (key, _) in keys {
            let v = median(runs[i].iter().filter_map(|r| r.get(key).copied()).collect());
            row.insert(key.into(), if v.is_finite() { json!(v) } else { Value::Null });
        }
        row.insert("runs".into(), json!(runs[i]));
        table.push(Value::Object(row));
    }
    println!("\nmedians of {ROUNDS} interleaved rounds, {SECONDS} s per run");
    println!(
        "| system | {} |",
        keys.iter().map(|(_, h)| *h).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|".repeat(keys.len()));
    for row in &table {
        let cells: Vec<String> = keys
            .iter()
            .map(|(k, _)| match row[*k].as_f64() {
                Some(v) if k.ends_with("_ms") => format!("{v:.3}"),
                Some(v) => format!("{v:.0}"),
                None => "–".into(),
            })
            .collect();
        println!("| {} | {} |", row["system"].as_str().unwrap(), cells.join(" | "));
    }
    let by = |name: &str, key: &str| {
        table
            .iter()
            .find(|r| r["system"] == name)
            .and_then(|r| r[key].as_f64())
            .unwrap_or(f64::NAN)
    };
    let wg = "wireguard-go (Debian)";
    println!(
        "\ntunnelmesh / wireguard-go: 1 stream {:.2}×, Mbit per CPU-s {:.2}×; 64 B UDP / best of wireguard-go and boringtun {:.2}×",
        by("tunnelmesh", "tcp_1_ab_mbit") / by(wg, "tcp_1_ab_mbit"),
        by("tunnelmesh", "mbit_per_cpu_s") / by(wg, "mbit_per_cpu_s"),
        by("tunnelmesh", "udp64_kpps") / by(wg, "udp64_kpps").max(by("boringtun-cli", "udp64_kpps")),
    );
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    write_json(
        "tunnel",
        &json!({ "suite": "tunnel", "seconds_per_run": SECONDS, "rounds": ROUNDS, "cores": nproc, "results": table }),
    );
}
