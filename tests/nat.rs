//! `tunnelmesh netcheck` behind real NATs: a router namespace with nftables masquerade between a
//! LAN host and the coordinator's STUN targets.

use std::net::Ipv4Addr;

use serde_json::Value;
use tunnelmesh_tests::Lab;

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
