//! `cargo xtask bench shield`: a flood of junk to a node's mesh port from another namespace, with
//! the shield at TC (the default on veth), at XDP, and without eBPF. Reports the flood rate, what the shield dropped, the
//! flooded daemon's CPU, and whether a peer's tunnel traffic kept flowing (TCP throughput and ping
//! through the tunnel, each before and during the flood).

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

/// How the flooded node checks what arrives.
#[derive(Clone, Copy)]
enum Mode {
    TcShield,
    XdpShield,
    NoEbpf,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::TcShield => "TC shield (default on veth)",
            Mode::XdpShield => "XDP shield",
            Mode::NoEbpf => "no eBPF (userspace checks)",
        }
    }
}

fn scenario(net: u8, mode: Mode) -> Value {
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
        no_ebpf: matches!(mode, Mode::NoEbpf),
        extra: if matches!(mode, Mode::XdpShield) {
            "shield_hook = \"xdp\"".into()
        } else {
            String::new()
        },
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
        "mode": mode.name(),
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
    let rows = [
        scenario(202, Mode::TcShield),
        scenario(205, Mode::XdpShield),
        scenario(203, Mode::NoEbpf),
    ];
    println!(
        "| mode | junk sent | dropped in the kernel | flooded daemon CPU | ping via tunnel quiet → flood (loss) | TCP via tunnel quiet → flood (junk meanwhile) |"
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
