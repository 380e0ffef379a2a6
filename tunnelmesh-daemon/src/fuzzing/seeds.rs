//! Seeds for the byte and text targets, made with the daemon's own encoders so each starts
//! from inputs that reach deep: one valid message of every wire type, STUN and port-mapping
//! answers, netlink notifications, framed streams, the shared policy table's packets, real
//! config and `authorized_keys` files. `cargo run --example fuzz_seeds --features fuzzing`
//! writes them to `fuzz/corpus/TARGET/seed-*`; the structure-aware targets' corpora are what
//! libFuzzer grew from them (`cargo xtask fuzz TARGET --seconds N` then `-merge=1`).

use std::{net::SocketAddr, time::Instant};

use zeroize::Zeroizing;

use super::bytes::local;
use crate::{
    identity::Identity,
    node::netwatch::address_and_route_on,
    policy::cases,
    protocol::{
        framing,
        noise::{CookieChecker, CookieJar, InitiatorHandshake, SessionKeys, Tai64n, consume_initiation},
        probe,
        session::{Keypair, sealed_len},
        stun, wire,
    },
};

/// One valid message of each wire type, keyed as the `wire` target keys its parsers.
fn wire_messages() -> Vec<(&'static str, Vec<u8>)> {
    let now = Instant::now();
    let (us, them) = (local(1), local(2));
    let psk = Zeroizing::new([3u8; 32]);
    let (_, mut initiation) =
        InitiatorHandshake::start(&them, &psk, &us.public, 7, Tai64n::from_unix(Default::default()));
    CookieJar::new(&us.public).stamp(&mut initiation, now);
    let received = consume_initiation(&us, &psk, &initiation).expect("our own initiation");
    let (response, _) = received.respond(9);
    let src: SocketAddr = "198.18.0.1:51820".parse().expect("an address");
    let cookie = CookieChecker::new(&us.public, now).cookie_reply(&initiation, src, now);
    let keys = SessionKeys {
        send: Zeroizing::new([4; 32]),
        recv: Zeroizing::new([4; 32]),
        local_index: 5,
        remote_index: 5,
        is_initiator: true,
    };
    let keypair = Keypair::new(&keys, now);
    let mut data = vec![0u8; sealed_len(probe::LEN)];
    data[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + probe::LEN].copy_from_slice(&probe::encode(false, 77));
    let len = keypair.seal(&mut data, probe::LEN, now).expect("a fresh key seals");
    data.truncate(len);
    let stun_answer = stun::binding_response([0; 12], "198.18.0.9:4000".parse().expect("an address"));
    vec![
        ("initiation", initiation.to_vec()),
        ("response", response.to_vec()),
        ("cookie-reply", cookie.to_vec()),
        ("data-probe", data),
        ("stun-response", stun_answer),
    ]
}

/// Every seed: target, file name, bytes.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| out.push((target, format!("seed-{name}"), bytes));

    for (name, msg) in wire_messages() {
        add("wire", name, msg.clone());
        add("shield_vs_classifier", name, [&[0u8][..], &msg].concat());
    }
    let transaction = [0x5a; 12];
    add(
        "stun",
        "request",
        [&transaction[..], &stun::binding_request(transaction)].concat(),
    );
    for seen in ["198.18.0.9:4000", "[2001:db8::9]:4000"] {
        let answer = stun::binding_response(transaction, seen.parse().expect("an address"));
        add(
            "stun",
            &format!("response-v{}", if seen.starts_with('[') { 6 } else { 4 }),
            [&transaction[..], &answer].concat(),
        );
    }

    let nonce = [0x11u8; 12];
    let mut pcp = vec![0u8; 60];
    pcp[0] = 2;
    pcp[1] = 0x81;
    pcp[4..8].copy_from_slice(&7200u32.to_be_bytes());
    pcp[24..36].copy_from_slice(&nonce);
    pcp[36] = 17;
    pcp[40..42].copy_from_slice(&51820u16.to_be_bytes());
    pcp[42..44].copy_from_slice(&40000u16.to_be_bytes());
    pcp[44..60].copy_from_slice(&std::net::Ipv4Addr::new(198, 18, 0, 7).to_ipv6_mapped().octets());
    add("portmap", "pcp-map", [&nonce[..], &pcp].concat());
    let mut natpmp = vec![0u8, 129, 0, 0, 0, 0, 0, 1];
    natpmp.extend_from_slice(&0x1111u16.to_be_bytes());
    natpmp.extend_from_slice(&40000u16.to_be_bytes());
    natpmp.extend_from_slice(&7200u32.to_be_bytes());
    add("portmap", "natpmp-map", [&nonce[..], &natpmp].concat());
    add(
        "portmap",
        "natpmp-address",
        [&nonce[..], &[0, 128, 0, 0, 0, 0, 0, 1, 198, 18, 0, 7]].concat(),
    );

    let soap = |name: &str, inner: &str| {
        format!(
            "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body>\
             <u:{name} xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\">{inner}</u:{name}></s:Body></s:Envelope>"
        )
    };
    let added = soap("AddPortMappingResponse", "");
    let external = soap(
        "GetExternalIPAddressResponse",
        "<NewExternalIPAddress>198.18.0.7</NewExternalIPAddress>",
    );
    let cut = added.len().div_ceil(8);
    let padded = format!("{added:<width$}", width = cut * 8);
    add(
        "upnp",
        "add-then-address",
        [&[cut as u8][..], padded.as_bytes(), external.as_bytes()].concat(),
    );

    let [address, route] = address_and_route_on(7);
    let [_, route_elsewhere] = address_and_route_on(3);
    add(
        "netlink",
        "addr-and-route",
        [&7u32.to_ne_bytes()[..], &address, &route, &route_elsewhere].concat(),
    );

    let mut stream = Vec::new();
    for (_, msg) in wire_messages() {
        framing::frame(&msg, &mut stream).expect("a wire message fits a frame");
    }
    add(
        "ssh_framing",
        "wire-messages",
        [&[3u8, 1, 2, 200][..], &stream].concat(),
    );

    for (i, case) in cases::cases().iter().enumerate() {
        add("inner_ip", &format!("case-{i:02}"), case.inbound.clone());
    }

    add("config", "static", STATIC_CONFIG.as_bytes().to_vec());
    let key = Identity::from_seed([9; 32], "root@web1")
        .public()
        .ssh_line_with_comment();
    add(
        "authorized_keys",
        "named-and-tagged",
        format!("# the operator's list\ntunnelmesh-name=\"web1\",tunnelmesh-tags=\"web,prod\" {key}\n{key}\n")
            .into_bytes(),
    );
    // The structure-aware targets start from nothing in particular; libFuzzer grows the rest.
    for target in [
        "handshake",
        "data",
        "coordinator",
        "node",
        "policy",
        "acl_vs_matcher",
        "offload",
    ] {
        add(target, "zeros", vec![0; 64]);
        add(target, "counting", (0..=255u8).collect());
    }
    out
}

const STATIC_CONFIG: &str = r#"[interface]
name = "tm0"
identity = "/etc/ssh/ssh_host_ed25519_key"
mesh_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
addresses = ["10.99.0.1/24", "fd99::1/64"]
listen_port = 51820
mtu = 1420

[[peer]]
public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZ1enpmdXp6ZnV6emZ1enpmdXp6ZnV6emZ1enpmdXp6 web"
endpoint = "198.18.0.2:51820"
allowed_ips = ["10.99.0.2/32", "fd99::2/128"]
persistent_keepalive = 25
"#;
