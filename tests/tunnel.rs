//! The first encrypted tunnel, end to end: two real daemons in network namespaces over veth.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use tunnelmesh_tests::{Lab, NodeOptions, PORT};

fn default_pair(net: u8) -> (Lab, usize, usize) {
    Lab::pair(net, &NodeOptions::default(), &NodeOptions::default())
}

#[test]
fn peers_ping_each_other_over_ipv4_and_ipv6() {
    let (lab, a, b) = default_pair(1);
    let (na, nb) = (&lab.nodes[a], &lab.nodes[b]);
    assert!(lab.ping(&na.ns, &nb.mesh4.to_string(), 3), "a → b IPv4");
    assert!(lab.ping(&nb.ns, &na.mesh4.to_string(), 3), "b → a IPv4");
    assert!(lab.ping(&na.ns, &nb.mesh6.to_string(), 3), "a → b IPv6");
    assert!(lab.ping(&nb.ns, &na.mesh6.to_string(), 3), "b → a IPv6");
    let seen = lab.peer_status(a, b);
    assert!(seen["last_handshake_secs"].is_u64(), "{seen}");
    assert_eq!(seen["endpoint"], nb.endpoint().as_str());
    assert!(seen["rx_bytes"].as_u64().unwrap() > 0 && seen["tx_bytes"].as_u64().unwrap() > 0);
}

/// With offloads (the default) the kernel hands the daemon TSO super-packets and takes GRO
/// super-packets back; the receiver coalesced segments (`rx_coalesced`).
#[test]
fn a_100_mb_tcp_transfer_arrives_intact_and_coalesced() {
    let (lab, a, b) = default_pair(2);
    assert!(lab.ping(&lab.nodes[a].ns, &lab.nodes[b].mesh4.to_string(), 1));
    for i in [a, b] {
        assert_ne!(lab.status(i)["offloads"], "off", "offloads negotiated on this kernel");
    }
    let (sent, received, secs) = lab.tcp_transfer(a, b, 100 << 20);
    assert_eq!(sent, received, "SHA-256 of what was sent and what arrived");
    eprintln!("100 MiB in {secs:.2} s");
    let coalesced = lab.status(b)["counters"]["rx_coalesced"].as_u64().unwrap();
    assert!(coalesced > 1000, "b coalesced {coalesced} segments");
    assert_eq!(lab.status(a)["counters"]["tun_bad_offload"], 0);
}

/// Offloads are local to a host: one side without them, one with, same wire.
#[test]
fn a_100_mb_transfer_with_offloads_off_on_one_side_and_then_both_arrives_intact() {
    let off = NodeOptions {
        extra: "no_offload = true".into(),
        ..NodeOptions::default()
    };
    for (net, a_opts) in [(9, NodeOptions::default()), (10, off.clone())] {
        let (lab, a, b) = Lab::pair(net, &a_opts, &off);
        assert!(lab.ping(&lab.nodes[a].ns, &lab.nodes[b].mesh4.to_string(), 1));
        assert_eq!(lab.status(b)["offloads"], "off");
        let (sent, received, _) = lab.tcp_transfer(a, b, 100 << 20);
        assert_eq!(sent, received, "SHA-256 of what was sent and what arrived");
        let (sent, received, _) = lab.tcp_transfer(b, a, 20 << 20);
        assert_eq!(sent, received, "and back");
        assert_eq!(lab.status(b)["counters"]["rx_coalesced"], 0);
    }
}

#[test]
fn a_peer_with_another_mesh_key_never_completes_a_handshake() {
    let other = NodeOptions {
        mesh_key: [8; 32],
        ..NodeOptions::default()
    };
    let (lab, a, b) = Lab::pair(3, &NodeOptions::default(), &other);
    assert!(!lab.ping(&lab.nodes[a].ns, &lab.nodes[b].mesh4.to_string(), 3));
    assert!(!lab.ping(&lab.nodes[b].ns, &lab.nodes[a].mesh4.to_string(), 2));
    assert!(lab.peer_status(a, b)["last_handshake_secs"].is_null());
    assert!(lab.peer_status(b, a)["last_handshake_secs"].is_null());
    // a initiated and could not authenticate b's response (the mesh key enters there).
    assert!(lab.counter(a, "handshake_rejected") >= 1);
}

#[test]
fn an_unknown_peers_handshake_is_ignored_without_an_answer() {
    let mut lab = Lab::new();
    let (na, nb, nx) = (lab.netns("a"), lab.netns("b"), lab.netns("x"));
    let (ua, ub) = ("198.18.4.1".parse().unwrap(), "198.18.4.2".parse().unwrap());
    lab.link(&na, ua, &nb, ub);
    let (ua2, ux) = ("198.18.14.1".parse().unwrap(), "198.18.14.2".parse().unwrap());
    lab.link(&na, ua2, &nx, ux);
    let a = lab.node("a", &na, ua, 1, PORT);
    let b = lab.node("b", &nb, ub, 2, PORT);
    // The stranger knows a, but a does not know it.
    let stranger = lab.node("x", &nx, ux, 9, PORT);
    lab.configure(a, &[b], &NodeOptions::default());
    lab.configure(b, &[a], &NodeOptions::default());
    lab.configure_with_endpoints(stranger, &[(a, format!("{ua2}:{PORT}"))], &NodeOptions::default());
    lab.start(a);
    lab.start(b);
    lab.start(stranger);
    assert!(!lab.ping(&nx, &lab.nodes[a].mesh4.to_string(), 3));
    assert!(
        lab.counter(a, "handshake_rejected") >= 1,
        "a saw the stranger's initiations"
    );
    assert_eq!(lab.counter(a, "cookie_replies_sent"), 0);
    // Nothing came back to the stranger: no response, no cookie, no data.
    let st = lab.status(stranger);
    assert!(st["peers"][0]["last_handshake_secs"].is_null());
    assert_eq!(st["peers"][0]["rx_bytes"], 0);
    for (name, value) in st["counters"].as_object().unwrap() {
        if name.starts_with("rx_") || name.starts_with("handshake_") {
            assert_eq!(value, 0, "stranger counter {name}");
        }
    }
    // The real peer is unaffected.
    assert!(lab.ping(&na, &lab.nodes[b].mesh4.to_string(), 2));
}

#[test]
fn a_spoofed_inner_source_is_dropped_and_counted() {
    let (lab, a, b) = default_pair(5);
    let (na, nb) = (&lab.nodes[a], &lab.nodes[b]);
    assert!(lab.ping(&nb.ns, &na.mesh4.to_string(), 1));
    // b sends from an address that is not among its allowed IPs at a.
    lab.sh(&nb.ns, &format!("ip addr add 10.99.0.77/32 dev {}", nb.iface));
    assert!(!lab.ping(&nb.ns, &format!("-I 10.99.0.77 {}", na.mesh4), 3));
    assert!(lab.counter(a, "rx_spoofed_source") >= 3);
}

/// Capture one data message (type 4, not a keepalive) arriving in `ns` on `port`.
fn capture_data_message(lab: &Lab, ns: &str, port: u16) -> std::thread::JoinHandle<Vec<u8>> {
    lab.in_netns(ns, move || {
        // SAFETY: plain socket(2) call; the descriptor is closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                (libc::ETH_P_IP as u16).to_be() as i32,
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 2048];
        let found = loop {
            assert!(Instant::now() < deadline, "no data message captured");
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            if p[9] != 17 || p.len() < ihl + 8 {
                continue;
            }
            let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
            let payload = &p[ihl + 8..];
            if dport == port && payload.len() > 32 && payload[0] == 4 {
                break payload.to_vec();
            }
        };
        // SAFETY: `fd` is ours and open.
        unsafe { libc::close(fd) };
        found
    })
}

#[test]
fn a_replayed_data_message_is_dropped_and_counted() {
    let (lab, a, b) = default_pair(6);
    let (na, nb) = (&lab.nodes[a], &lab.nodes[b]);
    assert!(lab.ping(&nb.ns, &na.mesh4.to_string(), 1));
    let capture = capture_data_message(&lab, &na.ns, PORT);
    std::thread::sleep(Duration::from_millis(200));
    assert!(lab.ping(&nb.ns, &na.mesh4.to_string(), 2));
    let message = capture.join().unwrap();
    let before = lab.counter(a, "rx_replayed");
    let target = na.endpoint();
    lab.in_netns(&nb.ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..3 {
            socket.send_to(&message, &target).unwrap();
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lab.counter(a, "rx_replayed") - before, 3);
    // Replays neither move the endpoint nor break the tunnel.
    assert_eq!(lab.peer_status(a, b)["endpoint"], nb.endpoint().as_str());
    assert!(lab.ping(&na.ns, &nb.mesh4.to_string(), 2));
}

#[test]
fn the_tunnel_recovers_by_itself_after_a_peer_is_killed_and_restarted() {
    let (mut lab, a, b) = default_pair(7);
    let (ns_a, dst) = (lab.nodes[a].ns.clone(), lab.nodes[b].mesh4.to_string());
    assert!(lab.ping(&ns_a, &dst, 2));
    lab.kill(b);
    lab.start(b);
    let took = lab.ping_until_reply(&ns_a, &dst, Duration::from_secs(10));
    assert!(took.is_some(), "no reply within 10 s of the restart");
    eprintln!("recovered {:.2} s after restart", took.unwrap().as_secs_f64());
    assert!(lab.ping(&lab.nodes[b].ns, &lab.nodes[a].mesh4.to_string(), 2));
}

#[test]
fn traffic_continues_when_a_peers_underlay_address_changes() {
    let (lab, a, b) = default_pair(8);
    let (na, nb) = (&lab.nodes[a], &lab.nodes[b]);
    assert!(lab.ping(&na.ns, &nb.mesh4.to_string(), 2));
    let dev = lab.sh(&na.ns, "ip -o -4 addr show | awk '/198.18.8.1/ {print $2}'");
    let dev = String::from_utf8_lossy(&dev.stdout).trim().to_string();
    // Delete first: removing a primary address also removes the secondaries of its subnet.
    lab.sh(
        &na.ns,
        &format!("ip addr del 198.18.8.1/24 dev {dev} && ip addr add 198.18.8.3/24 dev {dev}"),
    );
    let took = lab.ping_until_reply(&na.ns, &nb.mesh4.to_string(), Duration::from_secs(5));
    assert!(took.is_some(), "no traffic after the address change");
    assert!(lab.ping(&na.ns, &nb.mesh4.to_string(), 3));
    assert_eq!(
        lab.peer_status(b, a)["endpoint"],
        "198.18.8.3:51820",
        "b follows a to its new address"
    );
    // And b can reach a at its new address on its own.
    assert!(lab.ping(&nb.ns, &na.mesh4.to_string(), 2));
}

/// With the eBPF fast path each session's data goes to the worker named in the receiver index it
/// allocated, the least-loaded first: four peers of a two-worker hub end two per worker (the
/// kernel's 4-tuple hash alone gives that only by chance), and each peer's data is opened by
/// exactly one worker.
#[test]
fn sessions_spread_over_the_workers_and_each_sessions_data_stays_on_one() {
    let mut lab = Lab::new();
    let hosts = lab.switched(12, &["hub", "s1", "s2", "s3", "s4"]);
    let nodes: Vec<usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, (ns, addr))| lab.node(&format!("w{i}"), ns, *addr, i as u8 + 1, PORT))
        .collect();
    let hub = nodes[0];
    let two_workers = NodeOptions {
        workers: 2,
        ..NodeOptions::default()
    };
    lab.configure(hub, &nodes[1..], &two_workers);
    for &s in &nodes[1..] {
        lab.configure(s, &[hub], &NodeOptions::default());
    }
    for &n in &nodes {
        lab.start(n);
    }
    assert_eq!(lab.status(hub)["fastpath"]["steering"], "ebpf");
    let hub4 = lab.nodes[hub].mesh4.to_string();
    // One after another, so that each session is allocated knowing the ones before it.
    for &s in &nodes[1..] {
        assert!(lab.ping(&lab.nodes[s].ns, &hub4, 5), "{} → hub", lab.nodes[s].name);
    }
    // Bulk data too: the spokes' UDP GSO sends reach the hub whole (no XDP on a veth turns their
    // GSO off), so steering must read a super-datagram's first message from its fragments.
    for &s in &nodes[1..] {
        let (sent, received, _) = lab.tcp_transfer(s, hub, 8 << 20);
        assert_eq!(sent, received, "{} → hub", lab.nodes[s].name);
    }
    let mut per_worker = [0; 2];
    for &s in &nodes[1..] {
        let workers = lab.peer_status(hub, s)["rx_workers"].as_array().unwrap().clone();
        assert_eq!(
            workers.len(),
            1,
            "{}'s data on exactly one worker: {workers:?}",
            lab.nodes[s].name
        );
        per_worker[workers[0].as_u64().unwrap() as usize] += 1;
    }
    assert_eq!(per_worker, [2, 2], "sessions per worker");
}

/// Bursts of equal-sized UDP datagrams (what the receiver coalesces into USO super-packets for
/// its TUN device) arrive as the datagrams that were sent: same boundaries, same bytes, in
/// order, over IPv4 and IPv6.
#[test]
fn udp_bursts_arrive_datagram_by_datagram_intact_and_in_order() {
    let (lab, a, b) = default_pair(13);
    assert!(lab.ping(&lab.nodes[a].ns, &lab.nodes[b].mesh4.to_string(), 1));
    let before = lab.counter(b, "rx_coalesced");
    for dst in [lab.nodes[b].mesh4.to_string(), lab.nodes[b].mesh6.to_string()] {
        let target = std::net::SocketAddr::new(dst.parse().unwrap(), 7000);
        let server = lab
            .in_netns(&lab.nodes[b].ns, move || UdpSocket::bind(target).expect("bind"))
            .join()
            .unwrap();
        server.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        // Read while the bursts arrive (the application's socket buffer is the kernel default).
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2000];
            while let Ok(n) = server.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
            got
        });
        let datagram = |i: u32, len: usize| -> Vec<u8> {
            let mut d: Vec<u8> = (0..len).map(|k| (k as u32 * 31 + i) as u8).collect();
            d[..4].copy_from_slice(&i.to_be_bytes());
            d
        };
        lab.in_netns(&lab.nodes[a].ns, move || {
            let s = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
            for burst in 0..20u32 {
                for k in 0..30u32 {
                    // A shorter datagram ends each burst.
                    let len = if k == 29 { 300 } else { 1000 };
                    s.send_to(&datagram(burst * 30 + k, len), target).unwrap();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .join()
        .unwrap();
        let got = reader.join().unwrap();
        assert!(got.len() >= 540, "{} of 600 datagrams to {dst} arrived", got.len());
        let mut last = None;
        for d in &got {
            let i = u32::from_be_bytes(d[..4].try_into().unwrap());
            let len = if i % 30 == 29 { 300 } else { 1000 };
            assert_eq!(d, &datagram(i, len), "datagram {i} to {dst}");
            assert!(last.is_none_or(|l| i > l), "datagram {i} after {last:?}");
            last = Some(i);
        }
    }
    assert!(
        lab.counter(b, "rx_coalesced") > before,
        "the receiver coalesced UDP datagrams"
    );
}

/// On a host with IPv6 disabled (common on routers and in containers) a node comes up over IPv4
/// only, says so in its log and in `status`, and carries traffic.
#[test]
fn a_node_on_a_host_with_ipv6_disabled_comes_up_over_ipv4_only() {
    let defaults = NodeOptions::default();
    let (lab, a, b) = Lab::pair_prepared(31, &defaults, &defaults, |lab, [(na, _), _]| {
        let off = lab.sh(
            na,
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
        );
        assert!(off.status.success(), "{}", String::from_utf8_lossy(&off.stderr));
    });
    let (ma, mb) = (lab.nodes[a].mesh4.to_string(), lab.nodes[b].mesh4.to_string());
    assert!(lab.ping(&lab.nodes[a].ns, &mb, 3), "a → b IPv4");
    assert!(lab.ping(&lab.nodes[b].ns, &ma, 3), "b → a IPv4");
    let status = lab.status(a);
    assert_eq!(status["ipv6"], false, "{status}");
    let addresses = status["addresses"].as_array().unwrap();
    assert!(
        !addresses.is_empty() && addresses.iter().all(|a| !a.as_str().unwrap().contains(':')),
        "{addresses:?}"
    );
    assert!(lab.log(a).contains("IPv4 only"), "{}", lab.log(a));
    assert_eq!(lab.status(b)["ipv6"], true);
}
