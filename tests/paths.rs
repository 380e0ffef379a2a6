//! Paths other than direct UDP: the coordinator's relay and the SSH transport, chosen and left
//! again by the path manager as nftables rules block and unblock the direct path.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};
use tunnelmesh_tests::{ALLOW_ALL, Coordinator, Lab, eventually};

/// Sent through the tunnel; must never appear where the coordinator can see.
const MARKER: &[u8] = b"TUNNELMESH-PLAINTEXT-MARKER-7f3a9c";

/// Coordinator (with a relay dump) and two peers on one switch (and a third, `p3`, on it but
/// not started); `block` is applied to p1's and p2's namespaces before they join.
fn two_peers(net: u8, block: &str) -> (Lab, Coordinator, usize, usize, Vec<(String, Ipv4Addr)>) {
    let mut lab = Lab::new();
    let hosts = lab.switched(net, &["c", "p1", "p2", "p3"]);
    let p1 = lab.node("p1", &hosts[1].0, hosts[1].1, 1, tunnelmesh_tests::PORT);
    let p2 = lab.node("p2", &hosts[2].0, hosts[2].1, 2, tunnelmesh_tests::PORT);
    let p3 = lab.node("p3", &hosts[3].0, hosts[3].1, 3, tunnelmesh_tests::PORT);
    let authorized = lab.dir.path().join("authorized_keys");
    let lines: String = [p1, p2, p3]
        .iter()
        .map(|&n| format!("{}\n", lab.nodes[n].public_line))
        .collect();
    fs::write(&authorized, lines).unwrap();
    let dump = lab.dir.path().join("relay.dump");
    let c = lab.coordinator_with_policy(
        &hosts[0],
        &authorized,
        ALLOW_ALL,
        &["--relay-dump", dump.to_str().unwrap()],
    );
    if !block.is_empty() {
        set_block(&lab, &hosts, block);
    }
    lab.join(p1, &c, &[]);
    lab.join(p2, &c, &[]);
    (lab, c, p1, p2, hosts)
}

/// Drop, in both peers' namespaces, outbound traffic to the other peer matching `what`
/// (`"all"`, `"udp"`, `"tcp"`).
fn set_block(lab: &Lab, hosts: &[(String, Ipv4Addr)], what: &str) {
    for (me, other) in [(1, 2), (2, 1)] {
        lab.block(&hosts[me].0, hosts[other].1, what);
    }
}

fn lift_block(lab: &Lab, hosts: &[(String, Ipv4Addr)]) {
    for me in [1, 2] {
        lab.unblock(&hosts[me].0);
    }
}

/// `bytes` (what the coordinator saw, by `what`) hold the relayed stream and never the marker.
fn saw_the_stream_but_no_plaintext(what: &str, bytes: &[u8]) {
    assert!(
        bytes.len() > 100_000,
        "{what} saw the relayed stream ({} bytes)",
        bytes.len()
    );
    assert!(!bytes.windows(MARKER.len()).any(|w| w == MARKER), "plaintext in {what}");
}

fn path(lab: &Lab, i: usize, peer: usize) -> String {
    lab.peer_path(i, peer)
}

/// `tunnelmesh ping` from node `i` to `peer`: its output.
fn tm_ping(lab: &Lab, i: usize, peer: usize) -> String {
    let out = std::process::Command::new(tunnelmesh_tests::bin())
        .args([
            "ping",
            "-c",
            "1",
            "--interface",
            &lab.nodes[i].iface,
            &lab.nodes[peer].name,
        ])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A TCP stream through the tunnel from `from` to `to` carrying [`MARKER`] until stopped;
/// `finish` returns (bytes sent, bytes received, hashes equal).
struct Stream {
    stop: Arc<AtomicBool>,
    sender: thread::JoinHandle<(u64, [u8; 32])>,
    receiver: thread::JoinHandle<(u64, [u8; 32])>,
}

impl Stream {
    fn start(lab: &Lab, from: usize, to: usize) -> Stream {
        let dst = SocketAddr::new(lab.mesh_addrs(to).0.parse().unwrap(), 7070);
        let listener = lab
            .in_netns(&lab.nodes[to].ns, move || TcpListener::bind(dst).expect("bind"))
            .join()
            .unwrap();
        let receiver = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("the stream connects");
            let (mut n, mut hash, mut buf) = (0u64, Sha256::new(), vec![0u8; 65536]);
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        n += k as u64;
                        hash.update(&buf[..k]);
                    }
                    Err(e) => panic!("the stream broke on the receiving side: {e}"),
                }
            }
            (n, hash.finalize().into())
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sender = lab.in_netns(&lab.nodes[from].ns, move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect through the tunnel");
            let chunk: Vec<u8> = MARKER.iter().copied().cycle().take(16 * 1024).collect();
            let (mut n, mut hash) = (0u64, Sha256::new());
            while !flag.load(Ordering::Relaxed) {
                s.write_all(&chunk).expect("the stream broke on the sending side");
                n += chunk.len() as u64;
                hash.update(&chunk);
                thread::sleep(Duration::from_millis(20));
            }
            (n, hash.finalize().into())
        });
        Stream { stop, sender, receiver }
    }

    fn finish(self) -> (u64, u64, bool) {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, h1) = self.sender.join().expect("sender");
        let (received, h2) = self.receiver.join().expect("receiver");
        (sent, received, h1 == h2)
    }
}

#[test]
fn only_the_coordinator_reachable_traffic_goes_through_the_relay_which_cannot_read_it_and_moves_back_to_udp() {
    let (lab, c, p1, p2, hosts) = two_peers(60, "all");
    let v4 = lab.mesh_addrs(p2).0;
    assert!(
        lab.ping_until_reply(&lab.nodes[p1].ns, &v4, Duration::from_secs(15))
            .is_some(),
        "p1 reaches p2 through the relay:\n{}\n{}\n{}",
        lab.log(p1),
        lab.log(p2),
        c.log()
    );
    eventually("both sides use the relay", Duration::from_secs(10), || {
        path(&lab, p1, p2) == "relay" && path(&lab, p2, p1) == "relay"
    });
    let ping = tm_ping(&lab, p1, p2);
    assert!(ping.contains(": reply via relay (in use): rtt"), "{ping}");

    // A stream carrying a marker runs through the relay, and on while the block is lifted. The
    // coordinator's wire is captured meanwhile.
    let capture = lab.dir.path().join("coordinator.pcap");
    let mut tcpdump = lab
        .sh_cmd(
            &c.ns,
            &format!("exec tcpdump -i any -U -s 0 -w {} tcp", capture.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    thread::sleep(Duration::from_millis(500));
    let stream = Stream::start(&lab, p1, p2);
    thread::sleep(Duration::from_secs(2));
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    saw_the_stream_but_no_plaintext(
        "the coordinator's wire",
        &fs::read(&capture).expect("the capture was written"),
    );
    saw_the_stream_but_no_plaintext("the relay dump", &fs::read(lab.dir.path().join("relay.dump")).unwrap());
    let info: serde_json::Value =
        serde_json::from_slice(&lab.sh(&c.ns, &format!("curl -sk {}/v1/info", c.url)).stdout).unwrap();
    assert!(info["relay"]["frames"].as_u64() > Some(100), "{info}");

    lift_block(&lab, &hosts);
    let took = eventually("traffic moves back to direct UDP", Duration::from_secs(60), || {
        path(&lab, p1, p2) == "udp" && path(&lab, p2, p1) == "udp"
    });
    eprintln!("back on UDP after {took:?}");
    thread::sleep(Duration::from_secs(2));
    let (sent, received, same) = stream.finish();
    assert!(
        sent > 0 && sent == received && same,
        "the stream survived: {sent} sent, {received} received"
    );
    let ping = tm_ping(&lab, p1, p2);
    assert!(
        ping.contains(": reply via udp") && ping.contains("(in use): rtt"),
        "{ping}"
    );
}

#[test]
fn udp_blocked_but_tcp_open_traffic_takes_the_ssh_transport() {
    let (lab, _c, p1, p2, _hosts) = two_peers(61, "udp");
    let v4 = lab.mesh_addrs(p2).0;
    assert!(
        lab.ping_until_reply(&lab.nodes[p1].ns, &v4, Duration::from_secs(15))
            .is_some(),
        "p1 reaches p2 (first through the relay)"
    );
    let took = eventually("both sides move to SSH", Duration::from_secs(20), || {
        path(&lab, p1, p2) == "ssh" && path(&lab, p2, p1) == "ssh"
    });
    eprintln!("on SSH after {took:?}");
    let stream = Stream::start(&lab, p1, p2);
    thread::sleep(Duration::from_secs(3));
    let (sent, received, same) = stream.finish();
    assert!(
        sent > 0 && sent == received && same,
        "{sent} sent, {received} received over SSH"
    );
    let ping = tm_ping(&lab, p1, p2);
    assert!(ping.contains(": reply via ssh (in use): rtt"), "{ping}");
    assert!(ping.contains(": no reply via udp"), "UDP stays blocked: {ping}");
    assert!(lab.log(p1).contains("SSH transport up"));
}

#[test]
fn an_ssh_server_whose_host_key_is_not_the_peers_is_refused_loudly() {
    // p1 cannot use UDP to p2, and its SSH connections to p2 land on p3 (another member, so
    // another host key): p1 must refuse them and fall back to the relay.
    let (mut lab, c, p1, p2, hosts) = two_peers(62, "udp");
    let p3 = 2;
    lab.join(p3, &c, &[]);
    lab.sh(
        &hosts[1].0,
        &format!(
            "nft add table ip tmnat && \
             nft add chain ip tmnat out '{{ type nat hook output priority -100; }}' && \
             nft add rule ip tmnat out ip daddr {} tcp dport {} dnat to {}",
            hosts[2].1,
            tunnelmesh_tests::PORT,
            hosts[3].1
        ),
    );
    // Only p1 dials: p2's connections to p1's SSH port are dropped.
    lab.sh(
        &hosts[2].0,
        &format!(
            "nft add rule inet tmblock out ip daddr {} tcp dport {} drop",
            hosts[1].1,
            tunnelmesh_tests::PORT
        ),
    );
    // SSH connections the peers opened at join, before these rules, would hold (conntrack keeps
    // their mapping): restart p1 so every SSH connection it has is dialed under the rules.
    lab.stop(p1);
    lab.join(p1, &c, &[]);
    let v4 = lab.mesh_addrs(p2).0;
    assert!(
        lab.ping_until_reply(&lab.nodes[p1].ns, &v4, Duration::from_secs(15))
            .is_some()
    );
    eventually("p1 refuses the impostor", Duration::from_secs(20), || {
        lab.counter(p1, "ssh_host_key_mismatch") > 0
    });
    assert!(lab.log(p1).contains("NOT the peer's mesh key"), "{}", lab.log(p1));
    assert_ne!(path(&lab, p1, p2), "ssh", "never on the impostor's connection");
    assert!(lab.ping(&lab.nodes[p1].ns, &v4, 2), "traffic still flows (relay)");
}

#[test]
fn on_an_open_network_traffic_goes_direct_and_falls_back_when_the_direct_path_dies() {
    let (lab, _c, p1, p2, hosts) = two_peers(63, "");
    let v4 = lab.mesh_addrs(p2).0;
    assert!(
        lab.ping_until_reply(&lab.nodes[p1].ns, &v4, Duration::from_secs(10))
            .is_some()
    );
    eventually("direct UDP both ways", Duration::from_secs(5), || {
        path(&lab, p1, p2) == "udp" && path(&lab, p2, p1) == "udp"
    });
    let ping = tm_ping(&lab, p1, p2);
    assert!(
        ping.contains(": reply via udp") && ping.contains("(in use): rtt"),
        "{ping}"
    );
    assert!(ping.contains(": reply via relay: rtt"), "the relay answers too: {ping}");
    // The direct path dies under a running stream: traffic moves down without losing it.
    let stream = Stream::start(&lab, p1, p2);
    thread::sleep(Duration::from_secs(1));
    set_block(&lab, &hosts, "all");
    let took = eventually("traffic leaves the dead path", Duration::from_secs(20), || {
        path(&lab, p1, p2) == "relay" && path(&lab, p2, p1) == "relay"
    });
    eprintln!("off the dead UDP path after {took:?}");
    thread::sleep(Duration::from_secs(2));
    let (sent, received, same) = stream.finish();
    assert!(sent > 0 && sent == received && same, "{sent} sent, {received} received");
}

#[test]
fn a_peer_that_moves_to_another_subnet_is_back_within_5_s_without_the_coordinator() {
    let (lab, mut c, p1, p2, hosts) = two_peers(64, "");
    let v4 = lab.mesh_addrs(p2).0;
    assert!(
        lab.ping_until_reply(&lab.nodes[p1].ns, &v4, Duration::from_secs(10))
            .is_some()
    );
    eventually("direct UDP", Duration::from_secs(5), || path(&lab, p1, p2) == "udp");
    // No help from the coordinator from here on.
    c.kill();
    let (old, new) = (hosts[1].1, Ipv4Addr::new(198, 18, 65, 2));
    let dev = |ns: &str, addr: Ipv4Addr| {
        let out = lab.sh(
            ns,
            &format!("ip -o -4 addr show | awk '$4 == \"{addr}/24\" {{print $2}}'"),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (d1, d2) = (dev(&hosts[1].0, old), dev(&hosts[2].0, hosts[2].1));
    lab.sh(
        &hosts[1].0,
        &format!(
            "ip addr del {old}/24 dev {d1} && ip addr add {new}/24 dev {d1} && ip route add 198.18.64.0/24 dev {d1}"
        ),
    );
    lab.sh(&hosts[2].0, &format!("ip route add 198.18.65.0/24 dev {d2}"));
    let back = lab
        .ping_until_reply(&lab.nodes[p1].ns, &v4, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("tunnel not back within 5 s:\n{}\n{}", lab.log(p1), lab.log(p2)));
    eprintln!("back after the move in {back:?}");
    let endpoint = lab.peer_status(p2, p1)["endpoint"].as_str().unwrap_or("").to_string();
    assert!(endpoint.starts_with(&format!("{new}:")), "p2 follows p1 to {endpoint}");
    assert_eq!(path(&lab, p1, p2), "udp");
    // The address change reaches p1's candidates through netlink (nothing else re-reads them).
    let moved = serde_json::json!([format!("{new}:{}", tunnelmesh_tests::PORT)]);
    eventually("p1's host candidates follow the move", Duration::from_secs(3), || {
        lab.status(p1)["nat"]["host"] == moved
    });
}
