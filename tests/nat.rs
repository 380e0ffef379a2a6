//! NAT traversal behind real NATs: router namespaces with nftables masquerade between LAN hosts
//! and the coordinator. `tunnelmesh netcheck` on each kind of NAT, and the path matrix: which
//! pairs of peers end direct, on SSH, or on the relay — with traffic flowing in every case.

use std::{
    fs,
    net::Ipv4Addr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tunnelmesh_tests::{ALLOW_ALL, Lab, PORT};

/// How the router treats the LAN host's traffic.
enum Router {
    /// `masquerade`: Linux keeps the source port when it can (endpoint-independent mapping).
    Cone,
    /// `masquerade random,fully-random`: a new port per destination (endpoint-dependent).
    Symmetric,
    /// Masquerade, but UDP is dropped.
    UdpBlocked,
}

/// Coordinator on the WAN, a router, and a host behind it; `netcheck` from the host.
fn netcheck_behind(net: u8, router: Router) -> (Value, Ipv4Addr) {
    let mut lab = Lab::new();
    let wan = lab.switched(net, &["c", "r"]);
    let (c_ns, c_addr) = wan[0].clone();
    let (r_ns, r_wan) = wan[1].clone();
    let h_ns = lab.netns("h");
    let (r_lan, h_addr) = (Ipv4Addr::new(198, 19, net, 1), Ipv4Addr::new(198, 19, net, 2));
    lab.link(&r_ns, r_lan, &h_ns, h_addr);
    lab.sh(&h_ns, &format!("ip route add default via {r_lan}"));
    // An IPv6 default route too (its gateway link-local, as a router advertises it): netcheck
    // reports it with its interface.
    lab.sh(
        &h_ns,
        "dev=$(ip -o -4 addr show scope global | awk '{print $2}') && \
         ip -6 route add default via fe80::1 dev \"$dev\" metric 1024",
    );
    let masquerade = match router {
        Router::Symmetric => "masquerade random,fully-random",
        _ => "masquerade",
    };
    lab.sh(
        &r_ns,
        &format!(
            "sysctl -qw net.ipv4.ip_forward=1 && nft add table ip nat && \
             nft add chain ip nat post '{{ type nat hook postrouting priority 100; }}' && \
             nft add rule ip nat post ip saddr 198.19.{net}.0/24 ip daddr != 198.19.{net}.0/24 {masquerade}"
        ),
    );
    if let Router::UdpBlocked = router {
        lab.sh(
            &r_ns,
            "nft add table inet fw && \
             nft add chain inet fw forwarding '{ type filter hook forward priority 0; policy accept; }' && \
             nft add rule inet fw forwarding meta l4proto udp drop",
        );
    }
    let c = lab.coordinator(&c_ns, c_addr, &[]);
    let out = lab.sh(
        &h_ns,
        &format!(
            "{} netcheck --coordinator {} --json",
            tunnelmesh_tests::bin().display(),
            c.url
        ),
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("netcheck prints JSON");
    (report, r_wan)
}

#[test]
fn behind_a_cone_nat_netcheck_sees_the_routers_address_and_endpoint_independent_mapping() {
    let (r, router) = netcheck_behind(70, Router::Cone);
    assert_eq!(r["udp"], true, "{r}");
    assert_eq!(r["mapping"], "endpoint-independent", "{r}");
    let seen = r["mapped"][0].as_str().unwrap();
    assert!(
        seen.starts_with(&format!("{router}:")),
        "the router's public address: {r}"
    );
    assert_eq!(r["mapped"][0], r["mapped"][1]);
    assert!(
        r["stun_rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0 && ms < 100.0),
        "{r}"
    );
    assert_eq!(r["hairpinning"], false, "plain masquerade does not hairpin: {r}");
    assert_eq!(r["gateway"], "198.19.70.1");
    assert!(
        r["gateway6"]
            .as_str()
            .is_some_and(|g| g.starts_with("fe80::1%") && g.len() > 8),
        "the IPv6 default gateway with its interface: {r}"
    );
    assert_eq!(
        (&r["nat_pmp"], &r["pcp"], &r["upnp_igd"]),
        (&Value::Bool(false), &Value::Bool(false), &Value::Bool(false)),
        "no port-mapping service on this router: {r}"
    );
}

#[test]
fn behind_a_symmetric_nat_netcheck_sees_endpoint_dependent_mapping() {
    let (r, router) = netcheck_behind(71, Router::Symmetric);
    assert_eq!(r["udp"], true, "{r}");
    assert_eq!(r["mapping"], "endpoint-dependent", "{r}");
    assert_ne!(r["mapped"][0], r["mapped"][1]);
    assert!(r["mapped"][1].as_str().unwrap().starts_with(&format!("{router}:")));
}

#[test]
fn with_udp_blocked_netcheck_says_so() {
    let (r, _) = netcheck_behind(72, Router::UdpBlocked);
    assert_eq!(r["udp"], false, "{r}");
    assert_eq!(r["mapping"], "unknown");
    assert_eq!(r["stun_rtt_ms"], Value::Null);
}

/// What a router of the matrix does to its LAN's traffic. Every kind drops connections from
/// outside that its LAN did not open (port forwards aside), as a home router does: an unsolicited datagram is dropped
/// before conntrack keeps it, so it cannot spoil a mapping (see the README on hole punching).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Nat {
    /// `masquerade` alone: endpoint-independent mapping, and a router that takes unsolicited
    /// datagrams for local delivery (no input filter), so conntrack keeps them.
    Cone,
    /// `masquerade`: endpoint-independent mapping (the port is kept), filtering by the remote
    /// address and port.
    Restricted,
    /// `masquerade random,fully-random`: a random port per destination.
    Symmetric,
    /// Restricted, and UDP dropped in forwarding (TCP still works).
    UdpBlocked,
}

/// Make `router` a NAT for its LAN interface `lan`.
fn nat_router(lab: &Lab, router: &str, lan: &str, nat: Nat) {
    let masquerade = match nat {
        Nat::Symmetric => "masquerade random,fully-random",
        _ => "masquerade",
    };
    let input = if nat == Nat::Cone { "accept" } else { "drop" };
    let udp = if nat == Nat::UdpBlocked {
        "meta l4proto udp drop"
    } else {
        ""
    };
    let rules = format!(
        "table ip nat {{
  chain post {{
    type nat hook postrouting priority 100;
    oifname != \"{lan}\" {masquerade}
  }}
}}
table inet fw {{
  chain in {{
    type filter hook input priority 0; policy accept;
    iifname != {{ \"lo\", \"{lan}\" }} ct state new {input}
  }}
  chain through {{
    type filter hook forward priority 0; policy accept;
    ct status dnat accept
    iifname != \"{lan}\" ct state new drop
    {udp}
  }}
}}
"
    );
    let file = lab.dir.path().join(format!("{router}.nft"));
    fs::write(&file, rules).unwrap();
    lab.sh(
        router,
        &format!("sysctl -qw net.ipv4.ip_forward=1 && nft -f {}", file.display()),
    );
}

/// Ping `dst` from `ns` five times a second for `secs`, in the background: traffic that makes
/// both ends want a session (and a direct path) while the matrix settles.
fn keep_pinging(lab: &Lab, ns: &str, dst: &str, secs: u32) -> Child {
    // `exec`: killing the child must stop the ping, not just the shell around it.
    lab.sh_cmd(ns, &format!("exec ping -n -q -i 0.2 -w {secs} {dst}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ping runs")
}

#[test]
fn nat_matrix_every_pair_ends_on_the_path_its_nats_allow_and_carries_traffic() {
    let mut lab = Lab::new();
    // The internet: the coordinator, a public peer, and the routers' WAN sides.
    let wan = lab.switched(80, &["c", "p", "ra", "rb", "rs", "rt", "rd", "rl", "ru", "rk1", "rk2"]);
    let router = |name: &str| {
        wan.iter()
            .find(|(ns, _)| ns.ends_with(&format!("-{name}")))
            .unwrap()
            .clone()
    };
    let mut hosts: Vec<(&str, (String, Ipv4Addr))> = vec![("p", router("p"))];
    for (r, net, nat, names) in [
        ("ra", 81, Nat::Restricted, &["a"][..]),
        ("rb", 82, Nat::Restricted, &["b"]),
        ("rs", 83, Nat::Symmetric, &["s"]),
        ("rt", 84, Nat::Symmetric, &["t"]),
        ("rl", 87, Nat::Restricted, &["l1", "l2"]),
        ("ru", 88, Nat::UdpBlocked, &["u"]),
        ("rk1", 93, Nat::Cone, &["k1"]),
        ("rk2", 94, Nat::Cone, &["k2"]),
    ] {
        let (lan_hosts, bridge) = lab.lan(&router(r).0, net, names);
        nat_router(&lab, &router(r).0, &bridge, nat);
        hosts.extend(names.iter().copied().zip(lan_hosts));
    }
    // Double NAT: d behind rd2 behind rd, both restricted.
    let (inner, outer_lan) = lab.lan(&router("rd").0, 85, &["rd2"]);
    nat_router(&lab, &router("rd").0, &outer_lan, Nat::Restricted);
    let (d_host, inner_lan) = lab.lan(&inner[0].0, 86, &["d"]);
    nat_router(&lab, &inner[0].0, &inner_lan, Nat::Restricted);
    hosts.push(("d", d_host[0].clone()));

    let nodes: Vec<usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, (name, (ns, addr)))| lab.node(name, ns, *addr, i as u8 + 1, PORT))
        .collect();
    let node = |name: &str| nodes[hosts.iter().position(|(n, _)| *n == name).unwrap()];
    let authorized = lab.dir.path().join("authorized_keys");
    let keys: String = nodes
        .iter()
        .map(|&n| format!("{}\n", lab.nodes[n].public_line))
        .collect();
    fs::write(&authorized, keys).unwrap();
    let c = lab.coordinator_with_policy(&wan[0], &authorized, ALLOW_ALL, &[]);
    for &n in &nodes {
        lab.join(n, &c, &[]);
    }

    // What each node learned about itself from its tunnel socket.
    let nat_of = |name: &str| lab.status(node(name))["nat"].clone();
    let expect_nat = [
        ("p", "none"),
        ("a", "easy"),
        ("s", "hard"),
        ("d", "easy"),
        ("l1", "easy"),
        ("k1", "easy"),
        ("u", "unknown"),
    ];
    for (name, kind) in expect_nat {
        tunnelmesh_tests::eventually(
            &format!("{name} learns its NAT is {kind}"),
            Duration::from_secs(10),
            || nat_of(name)["nat"] == kind,
        );
    }
    assert_eq!(
        nat_of("a")["reflexive"],
        format!("{}:{PORT}", router("ra").1),
        "a Linux masquerade keeps the port"
    );
    assert_eq!(
        nat_of("d")["reflexive"],
        format!("{}:{PORT}", router("rd").1),
        "the outer NAT's address"
    );

    let matrix = [
        ("p", "a", "udp"),
        ("p", "s", "udp"),
        ("p", "d", "udp"),
        ("p", "u", "ssh"),
        ("a", "b", "udp"),
        ("a", "d", "udp"),
        ("l1", "l2", "udp"),
        ("l1", "a", "udp"),
        ("a", "s", "relay"),
        ("d", "s", "relay"),
        ("s", "t", "relay"),
        ("a", "u", "relay"),
        // A router without an input filter: the first datagram that reaches it from the other
        // side spoils its mapping (see README). A public peer still gets through (it answers the
        // port the spoiled mapping moved to). Two such routers end direct only if the two sides'
        // first datagrams cross in flight — a matter of microseconds in this lab (direct in 1 of
        // 8 runs here): either path is right, as long as both sides agree and traffic flows.
        ("p", "k1", "udp"),
        ("k1", "k2", "udp|relay"),
    ];
    let mesh = |name: &str| lab.mesh_addrs(node(name)).0;
    let mut pingers: Vec<Child> = matrix
        .iter()
        .map(|(x, y, _)| keep_pinging(&lab, &lab.nodes[node(x)].ns, &mesh(y), 60))
        .collect();
    let path = |x: &str, y: &str| lab.peer_path(node(x), node(y));
    let punches = |x: &str, y: &str| {
        let n = &lab.peer_status(node(x), node(y))["nat"];
        (n["punches"].as_u64().unwrap_or(0), n["punched"].as_u64().unwrap_or(0))
    };
    let start = Instant::now();
    let mut settled: Vec<Option<Duration>> = vec![None; matrix.len()];
    while start.elapsed() < Duration::from_secs(45) && settled.iter().any(Option::is_none) {
        for (i, (x, y, want)) in matrix.iter().enumerate() {
            if settled[i].is_some() {
                continue;
            }
            let now = path(x, y);
            let both = want.split('|').any(|w| w == now) && path(y, x) == now;
            // A relay pair is settled once punching was tried, failed, and tried again.
            let tried = now != "relay" || (punches(x, y).0 >= 2 && punches(y, x).0 >= 2);
            if both && tried {
                settled[i] = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut table = String::from("| peer | peer | path | settled after |\n|---|---|---|---|\n");
    for (i, (x, y, _)) in matrix.iter().enumerate() {
        table += &format!(
            "| {x} | {y} | {} / {} | {} |\n",
            path(x, y),
            path(y, x),
            settled[i].map_or("not settled".into(), |d| format!("{:.1} s", d.as_secs_f64()))
        );
    }
    eprintln!("{table}");
    for (i, (x, y, want)) in matrix.iter().enumerate() {
        assert!(
            settled[i].is_some(),
            "{x} <-> {y} should end on {want}:\n{table}\n{x}: {}\n{y}: {}",
            lab.status(node(x)),
            lab.status(node(y))
        );
    }
    // Direct paths to NAT'd peers came from punching; the same-NAT pair talks over its LAN.
    for (x, y) in [("a", "b"), ("a", "d"), ("l1", "l2"), ("p", "a")] {
        let (started, direct) = punches(x, y);
        assert!(
            started >= 1 && direct >= 1,
            "{x} punched to {y}: {started} started, {direct} direct"
        );
    }
    let l1_to_l2 = lab.peer_status(node("l1"), node("l2"))["endpoint"].clone();
    assert!(
        l1_to_l2.as_str().is_some_and(|e| e.starts_with("198.19.87.")),
        "two peers behind one NAT use their LAN addresses, not the NAT's: {l1_to_l2}"
    );
    // Traffic flows on every pair, whatever the path.
    for (x, y, _) in matrix {
        assert!(lab.ping(&lab.nodes[node(x)].ns, &mesh(y), 3), "{x} -> {y} ping");
        assert!(lab.ping(&lab.nodes[node(y)].ns, &mesh(x), 3), "{y} -> {x} ping");
    }
    for p in &mut pingers {
        let _ = p.kill();
        let _ = p.wait();
    }
    // Gone quiet, a punched path stays open: the path manager renews its proof of the path in
    // use (a probe round trip once the last proof is 25 s old) while the session lives, which
    // also keeps both NATs' mappings. (WireGuard's own passive keepalive goes once, 10 s after
    // the last data.)
    std::thread::sleep(Duration::from_secs(15));
    let passed = |lab: &Lab| lab.status(node("b"))["fastpath"]["shield"]["passed"].as_u64().unwrap();
    let before = passed(&lab);
    std::thread::sleep(Duration::from_secs(30));
    assert!(passed(&lab) > before, "no NAT keepalive reached b in 30 quiet seconds");
    assert_eq!((path("a", "b"), path("b", "a")), ("udp".into(), "udp".into()));
}

/// A `miniupnpd` (Debian's, nftables backend) serving NAT-PMP, PCP and UPnP-IGD on a router's LAN;
/// killed when dropped.
struct Miniupnpd(Child);

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start miniupnpd on `router` (WAN address `wan`, LAN interface `lan`). It learns that its WAN
/// address is reachable from the coordinator's STUN target (`stun`): the lab's addresses are in
/// 198.18.0.0/15, which miniupnpd otherwise refuses as "reserved".
fn miniupnpd(lab: &Lab, router: &str, wan: Ipv4Addr, lan: &str, stun: Ipv4Addr) -> Miniupnpd {
    let wan_if = String::from_utf8(
        lab.sh(router, &format!("ip -o -4 addr show to {wan}/32 | awk '{{print $2}}'"))
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    // The chains miniupnpd fills (Debian's nft_init.sh builds the same).
    lab.sh(
        router,
        "nft add table inet filter && \
         nft add chain inet filter miniupnpd && \
         nft add chain inet filter prerouting_miniupnpd && \
         nft add chain inet filter postrouting_miniupnpd && \
         nft add chain inet filter prerouting '{ type nat hook prerouting priority -100; policy accept; }' && \
         nft add rule inet filter prerouting jump prerouting_miniupnpd && \
         nft add chain inet filter postrouting '{ type nat hook postrouting priority 100; policy accept; }' && \
         nft add rule inet filter postrouting jump postrouting_miniupnpd",
    );
    let dir = lab.dir.path();
    let conf = dir.join(format!("{router}-miniupnpd.conf"));
    fs::write(
        &conf,
        format!(
            "ext_ifname={wan_if}\next_perform_stun=yes\next_stun_host={stun}\next_stun_port=3478\n\
             listening_ip={lan}\nhttp_port=0\nenable_natpmp=yes\nenable_upnp=yes\nsecure_mode=yes\n\
             system_uptime=yes\nmin_lifetime=2\nlease_file={}\nuuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n\
             allow 1024-65535 198.19.0.0/16 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            dir.join(format!("{router}-upnp.leases")).display()
        ),
    )
    .unwrap();
    let log = fs::File::create(dir.join(format!("{router}-miniupnpd.log"))).unwrap();
    let child = lab
        .sh_cmd(
            router,
            &format!(
                "exec miniupnpd -d -f {} -P {}",
                conf.display(),
                dir.join(format!("{router}-miniupnpd.pid")).display()
            ),
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("miniupnpd runs (cargo xtask setup installs it)");
    Miniupnpd(child)
}

#[test]
fn port_mapping_with_pcp_nat_pmp_and_upnp_is_made_renewed_and_removed_and_lets_a_hard_nat_in() {
    let mut lab = Lab::new();
    let wan = lab.switched(90, &["c", "rm", "rs"]);
    let (m_lan, m_bridge) = lab.lan(&wan[1].0, 91, &["m"]);
    nat_router(&lab, &wan[1].0, &m_bridge, Nat::Restricted);
    let (s_lan, s_bridge) = lab.lan(&wan[2].0, 92, &["s"]);
    nat_router(&lab, &wan[2].0, &s_bridge, Nat::Symmetric);
    let m = lab.node("m", &m_lan[0].0, m_lan[0].1, 1, PORT);
    let s = lab.node("s", &s_lan[0].0, s_lan[0].1, 2, PORT);
    let authorized = lab.dir.path().join("authorized_keys");
    let keys = format!("{}\n{}\n", lab.nodes[m].public_line, lab.nodes[s].public_line);
    fs::write(&authorized, keys).unwrap();
    let c = lab.coordinator_with_policy(&wan[0], &authorized, ALLOW_ALL, &[]);
    let _upnpd = miniupnpd(&lab, &wan[1].0, wan[1].1, &m_bridge, wan[0].1);
    let router_rules = |lab: &Lab| {
        String::from_utf8(
            lab.sh(&wan[1].0, "nft list chain inet filter prerouting_miniupnpd")
                .stdout,
        )
        .unwrap()
    };
    let m_addr = m_lan[0].1.to_string();

    for protocol in ["pcp", "nat-pmp", "upnp"] {
        lab.join(m, &c, &["--port-mapping", protocol, "--port-mapping-lifetime", "4"]);
        let mapping = |lab: &Lab| lab.status(m)["port_mapping"].clone();
        tunnelmesh_tests::eventually(&format!("a mapping via {protocol}"), Duration::from_secs(15), || {
            mapping(&lab)["protocol"] == protocol
        });
        let external = mapping(&lab)["external"].as_str().unwrap().to_string();
        assert!(
            external.starts_with(&format!("{}:", wan[1].1)),
            "{protocol}: {external}"
        );
        assert!(
            router_rules(&lab).contains(&m_addr),
            "{protocol}: the router forwards to m:\n{}",
            router_rules(&lab)
        );
        tunnelmesh_tests::eventually(
            &format!("{protocol} renews at half the lifetime"),
            Duration::from_secs(10),
            || mapping(&lab)["renewals"].as_u64().unwrap_or(0) >= 2,
        );
        tunnelmesh_tests::eventually(
            &format!("the {protocol} mapping is a candidate"),
            Duration::from_secs(30),
            || lab.status(m)["nat"]["port_mapped"] == external.as_str(),
        );
        lab.stop(m);
        tunnelmesh_tests::eventually(
            &format!("{protocol}: the mapping is removed on exit"),
            Duration::from_secs(5),
            || !router_rules(&lab).contains(&m_addr),
        );
    }

    // A peer behind a symmetric NAT reaches m directly through the mapping.
    lab.join(m, &c, &[]);
    lab.join(s, &c, &[]);
    tunnelmesh_tests::eventually("m's mapping is published", Duration::from_secs(30), || {
        lab.status(m)["nat"]["port_mapped"].is_string()
    });
    let m_mesh = lab.mesh_addrs(m).0;
    let mut pinger = keep_pinging(&lab, &lab.nodes[s].ns, &m_mesh, 30);
    tunnelmesh_tests::eventually(
        "symmetric s <-> port-mapped m goes direct",
        Duration::from_secs(25),
        || lab.peer_path(s, m) == "udp" && lab.peer_path(m, s) == "udp",
    );
    assert!(lab.ping(&lab.nodes[s].ns, &m_mesh, 3));
    let _ = pinger.kill();
    let _ = pinger.wait();
}
