//! The coordinator with real peers in network namespaces: membership, addressing, push updates,
//! restarts, revocation and refusals.

use std::{fs, time::Duration};

use tunnelmesh_tests::{ALLOW_ALL, Coordinator, Lab, eventually};

/// A switched lab: coordinator in the first namespace, `peers` nodes in the others.
fn mesh(net: u8, peers: usize) -> (Lab, Coordinator, Vec<usize>) {
    let mut lab = Lab::new();
    let names: Vec<String> = std::iter::once("c".to_string())
        .chain((1..=peers).map(|i| format!("p{i}")))
        .collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let hosts = lab.switched(net, &name_refs);
    let mut nodes = Vec::new();
    for (i, (ns, addr)) in hosts.iter().enumerate().skip(1) {
        nodes.push(lab.node(&format!("p{i}"), ns, *addr, i as u8, tunnelmesh_tests::PORT));
    }
    // p1 and p2 are admitted by authorized_keys (with names and tags); the rest use tokens.
    let authorized = lab.dir.path().join("authorized_keys");
    let lines: String = nodes
        .iter()
        .take(2)
        .map(|&n| {
            format!(
                "tunnelmesh-name=\"{}\",tunnelmesh-tags=\"lab\" {}\n",
                lab.nodes[n].name, lab.nodes[n].public_line
            )
        })
        .collect();
    fs::write(&authorized, lines).unwrap();
    // Default deny: these tests are about membership, so everyone may reach everyone.
    let c = lab.coordinator_with_policy(&hosts[0], &authorized, ALLOW_ALL, &[]);
    (lab, c, nodes)
}

fn token(c: &Coordinator, uses: u32) -> String {
    let out = c.admin(&["token", "create", "--ttl", "10m", "--uses", &uses.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Node `i`'s mesh IPv4 and IPv6 addresses, from its status.
fn peer_names(lab: &Lab, i: usize) -> Vec<String> {
    let mut names: Vec<String> = lab.status(i)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn join_all(lab: &mut Lab, c: &Coordinator, nodes: &[usize]) {
    let t = token(c, 10);
    for (k, &n) in nodes.iter().enumerate() {
        if k < 2 {
            lab.join(n, c, &[])
        } else {
            lab.join(n, c, &["--token-file", &lab.token_file(&t)])
        }
    }
}

#[test]
fn four_peers_join_every_pair_pings_and_joins_and_leaves_propagate() {
    let (mut lab, c, nodes) = mesh(30, 5);
    let (first4, fifth) = (&nodes[..4], nodes[4]);
    join_all(&mut lab, &c, first4);
    assert_eq!(
        peer_names(&lab, nodes[0]),
        ["p2", "p3", "p4"],
        "names from authorized_keys and key comments"
    );
    for &a in first4 {
        for &b in first4 {
            if a != b {
                let (v4, _) = lab.mesh_addrs(b);
                assert!(
                    lab.ping(&lab.nodes[a].ns, &v4, 1),
                    "{} → {}",
                    lab.nodes[a].name,
                    lab.nodes[b].name
                );
            }
        }
    }
    let (_, v6) = lab.mesh_addrs(nodes[3]);
    assert!(lab.ping(&lab.nodes[nodes[0]].ns, &v6, 2), "IPv6 across the mesh");
    // Every address is distinct and inside the default prefix.
    let mut all: Vec<String> = first4.iter().map(|&n| lab.mesh_addrs(n).0).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|a| a.starts_with("100.")), "{all:?}");

    // A fifth node joins: everyone learns it and can reach it.
    lab.join(fifth, &c, &["--token-file", &lab.token_file(&token(&c, 1))]);
    let (v4_5, _) = lab.mesh_addrs(fifth);
    eventually("p1 learns p5", Duration::from_secs(5), || {
        peer_names(&lab, nodes[0]).contains(&"p5".to_string())
    });
    assert!(lab.ping(&lab.nodes[nodes[0]].ns, &v4_5, 2));
    // It is removed: everyone drops it.
    let out = c.admin(&["remove", "p5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let took = eventually("peers drop p5", Duration::from_secs(5), || {
        first4.iter().all(|&n| !peer_names(&lab, n).contains(&"p5".to_string()))
    });
    eprintln!("removal reached every peer in {took:?}");
    assert!(!lab.ping(&lab.nodes[nodes[0]].ns, &v4_5, 1));
}

#[test]
fn the_coordinator_going_down_costs_no_packet_and_its_restart_keeps_every_address() {
    let (mut lab, mut c, nodes) = mesh(31, 3);
    join_all(&mut lab, &c, &nodes);
    let before: Vec<(String, String)> = nodes.iter().map(|&n| lab.mesh_addrs(n)).collect();
    let (p1_ns, p2_v4) = (lab.nodes[nodes[0]].ns.clone(), before[1].0.clone());
    assert!(lab.ping(&p1_ns, &p2_v4, 2));
    // A continuous ping across the coordinator's death loses nothing.
    let summary = lab.ping_while(&p1_ns, &p2_v4, || c.kill());
    assert!(summary.contains(" 0% packet loss"), "{summary}");
    eventually("peers notice the coordinator is gone", Duration::from_secs(60), || {
        lab.status(nodes[0])["coordinator"]["state"] == "disconnected"
    });
    assert!(
        lab.ping(&p1_ns, &p2_v4, 3),
        "tunnels keep flowing without the coordinator"
    );
    // A peer restarted while the coordinator is down comes back from its cache.
    lab.kill(nodes[2]);
    lab.join(nodes[2], &c, &[]);
    assert_eq!(lab.mesh_addrs(nodes[2]), before[2]);
    assert!(
        lab.ping(&lab.nodes[nodes[2]].ns, &p2_v4, 3),
        "cached state brought the mesh up"
    );

    c.start();
    let took = eventually("peers reconnect", Duration::from_secs(40), || {
        nodes
            .iter()
            .all(|&n| lab.status(n)["coordinator"]["state"] == "connected")
    });
    eprintln!("peers reconverged {took:?} after the restart");
    let after: Vec<(String, String)> = nodes.iter().map(|&n| lab.mesh_addrs(n)).collect();
    assert_eq!(before, after, "allocations are identical after SIGKILL and restart");
    let out = c.admin(&["info"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&c.fingerprint),
        "same certificate after restart"
    );
}

#[test]
fn a_revoked_peer_is_dropped_everywhere_within_5_s_and_cannot_rejoin() {
    let (mut lab, c, nodes) = mesh(32, 3);
    join_all(&mut lab, &c, &nodes);
    let victim = nodes[2];
    let (v4, _) = lab.mesh_addrs(victim);
    assert!(lab.ping(&lab.nodes[nodes[0]].ns, &v4, 1));
    let fingerprint = lab.fingerprint(victim);
    let out = c.admin(&["revoke", &fingerprint]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let took = eventually("every peer drops the revoked node", Duration::from_secs(5), || {
        nodes[..2]
            .iter()
            .all(|&n| !peer_names(&lab, n).contains(&lab.nodes[victim].name))
    });
    eprintln!("revocation took effect in {took:?}");
    assert!(
        !lab.ping(&lab.nodes[nodes[0]].ns, &v4, 1),
        "no session with a revoked node"
    );
    assert_eq!(lab.status(victim)["coordinator"]["state"], "revoked");
    // It cannot come back, even with a fresh token.
    lab.kill(victim);
    lab.spawn_joining(victim, &c, &["--token-file", &lab.token_file(&token(&c, 1))]);
    let (ok, log) = lab.wait_exit(victim, Duration::from_secs(15));
    assert!(!ok && log.contains("revoked"), "{log}");
}

#[test]
fn refusals_are_clear_wrong_fingerprint_unknown_key_bad_token_taken_name() {
    let (mut lab, mut c, nodes) = mesh(33, 3);
    lab.join(nodes[0], &c, &[]);

    let real = c.fingerprint.clone();
    c.fingerprint = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into();
    lab.spawn_joining(nodes[1], &c, &[]);
    let (ok, log) = lab.wait_exit(nodes[1], Duration::from_secs(15));
    assert!(!ok && log.contains("not the pinned") && log.contains(&real), "{log}");
    c.fingerprint = real;

    lab.spawn_joining(nodes[2], &c, &[]);
    let (ok, log) = lab.wait_exit(nodes[2], Duration::from_secs(15));
    assert!(
        !ok && log.contains("is not authorized") && log.contains("--token-file"),
        "{log}"
    );

    lab.spawn_joining(nodes[2], &c, &["--token-file", &lab.token_file("tmtok_forged")]);
    let (ok, log) = lab.wait_exit(nodes[2], Duration::from_secs(15));
    assert!(!ok && log.contains("token is invalid"), "{log}");

    lab.spawn_joining(
        nodes[2],
        &c,
        &["--token-file", &lab.token_file(&token(&c, 1)), "--name", "p1"],
    );
    let (ok, log) = lab.wait_exit(nodes[2], Duration::from_secs(15));
    assert!(!ok && log.contains("belongs to another key"), "{log}");
    // The refused join did not use up the token's only use... and the store stayed consistent.
    let info = String::from_utf8(c.admin(&["info"]).stdout).unwrap();
    assert!(info.contains("nodes: 1 "), "{info}");
}

#[test]
fn malformed_api_requests_get_4xx_and_the_coordinator_keeps_serving() {
    let (mut lab, c, nodes) = mesh(34, 1);
    let curl = |args: &[&str]| -> String {
        let out = lab.sh(
            &c.ns,
            &format!(
                "curl -sk -o /dev/null -w '%{{http_code}}' {} {}/v1/info",
                args.join(" "),
                c.url
            ),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let code = |path: &str, args: &str| -> String {
        let out = lab.sh(
            &c.ns,
            &format!("curl -sk -o /dev/null -w '%{{http_code}}' {args} {}{path}", c.url),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        code("/v1/connect", ""),
        "400",
        "a WebSocket endpoint without an upgrade"
    );
    assert_eq!(code("/nope", ""), "404");
    assert_eq!(code("/v1/info", "-X POST -d garbage"), "405");
    assert!(code("/v1/connect", "-H 'Connection: Upgrade' -H 'Upgrade: websocket'").starts_with('4'));
    // Junk that is not even TLS.
    let listen = c.listen.clone();
    lab.in_netns(&c.ns, move || {
        let mut s = std::net::TcpStream::connect(&listen).expect("connect");
        let _ = std::io::Write::write_all(&mut s, b"GARBAGE\r\n\r\n\x16\x03\x01\xff\xff");
    })
    .join()
    .unwrap();
    assert_eq!(curl(&[]), "200", "still serving");
    lab.join(nodes[0], &c, &[]);
    assert_eq!(lab.status(nodes[0])["coordinator"]["state"], "connected");
}

#[test]
fn rotating_the_mesh_key_drops_no_established_tunnel() {
    let (mut lab, c, nodes) = mesh(35, 3);
    join_all(&mut lab, &c, &nodes[..2]);
    let (p1_ns, p2_v4) = (lab.nodes[nodes[0]].ns.clone(), lab.mesh_addrs(nodes[1]).0);
    assert!(lab.ping(&p1_ns, &p2_v4, 2));
    let summary = lab.ping_while(&p1_ns, &p2_v4, || {
        let out = c.admin(&["rotate-mesh-key"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    });
    assert!(summary.contains(" 0% packet loss"), "{summary}");
    // A handshake inside the overlap: p2 restarts, losing every session, so p1 and p2 must
    // handshake again under the mesh keys of the overlap. A fresh process has no handshake but
    // one made after it started.
    lab.stop(nodes[1]);
    lab.join(nodes[1], &c, &[]);
    assert!(lab.ping(&p1_ns, &p2_v4, 5), "p1 reaches the restarted p2");
    let seen = lab.peer_status(nodes[1], nodes[0]);
    assert!(
        seen["last_handshake_secs"].is_u64(),
        "p2 handshook with p1 after its restart: {seen}"
    );
    // A node that joins after the rotation reaches nodes that joined before it.
    lab.join(nodes[2], &c, &["--token-file", &lab.token_file(&token(&c, 1))]);
    let (p3_v4, _) = lab.mesh_addrs(nodes[2]);
    assert!(lab.ping(&p1_ns, &p3_v4, 3));
    assert!(lab.ping(&lab.nodes[nodes[2]].ns, &p2_v4, 3));
}

#[test]
fn authorized_keys_are_reloaded_when_the_file_changes() {
    let (mut lab, c, nodes) = mesh(36, 4);
    lab.spawn_joining(nodes[2], &c, &[]);
    let (ok, log) = lab.wait_exit(nodes[2], Duration::from_secs(15));
    assert!(!ok && log.contains("is not authorized"), "{log}");
    // The operator adds the key; the running coordinator picks it up without a restart.
    let authorized = lab.dir.path().join("authorized_keys");
    let mut text = fs::read_to_string(&authorized).unwrap();
    text += &format!(
        "tunnelmesh-name=\"db\",tunnelmesh-tags=\"db\" {}\n",
        lab.nodes[nodes[2]].public_line
    );
    fs::write(&authorized, text).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lab.join(nodes[2], &c, &[]);
    lab.join(nodes[0], &c, &[]);
    assert_eq!(peer_names(&lab, nodes[0]), ["db"]);
    let (v4, _) = lab.mesh_addrs(nodes[2]);
    assert!(lab.ping(&lab.nodes[nodes[0]].ns, &v4, 2));

    // SIGHUP reloads too, even when the file's modification time did not change.
    let before = fs::metadata(&authorized).unwrap().modified().unwrap();
    let mut text = fs::read_to_string(&authorized).unwrap();
    text += &format!("tunnelmesh-name=\"cache\" {}\n", lab.nodes[nodes[3]].public_line);
    fs::write(&authorized, text).unwrap();
    fs::File::options()
        .write(true)
        .open(&authorized)
        .unwrap()
        .set_modified(before)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    lab.spawn_joining(nodes[3], &c, &[]);
    let (ok, log) = lab.wait_exit(nodes[3], Duration::from_secs(15));
    assert!(
        !ok && log.contains("is not authorized"),
        "no reload without a change or a signal: {log}"
    );
    c.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    lab.join(nodes[3], &c, &[]);
    eventually(
        "p1 learns the node admitted after SIGHUP",
        Duration::from_secs(5),
        || peer_names(&lab, nodes[0]).contains(&"cache".to_string()),
    );
}

#[test]
fn an_operator_certificate_is_served_reported_and_pinned() {
    let mut lab = Lab::new();
    let hosts = lab.switched(37, &["c", "p1"]);
    let (cert, key) = (lab.dir.path().join("cert.pem"), lab.dir.path().join("key.pem"));
    tunnelmesh_tests::host(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=coordinator.example",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    let der = tunnelmesh_tests::host(&[
        "openssl",
        "x509",
        "-in",
        cert.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        "/dev/stdout",
    ]);
    let expected = {
        use base64::Engine;
        use sha2::Digest;
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(&der.stdout))
        )
    };
    let p1 = lab.node("p1", &hosts[1].0, hosts[1].1, 1, tunnelmesh_tests::PORT);
    let authorized = lab.dir.path().join("authorized_keys");
    fs::write(&authorized, format!("{}\n", lab.nodes[p1].public_line)).unwrap();
    let c = lab.coordinator(
        &hosts[0].0,
        hosts[0].1,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--authorized-keys",
            authorized.to_str().unwrap(),
        ],
    );
    assert_eq!(
        c.fingerprint, expected,
        "the coordinator serves and prints the operator's certificate"
    );
    let info = String::from_utf8(c.admin(&["info"]).stdout).unwrap();
    assert!(info.contains(&expected), "{info}");
    assert!(
        !c.data_dir.join("tls-cert.pem").exists(),
        "no self-signed certificate was made"
    );
    lab.join(p1, &c, &[]);
    assert_eq!(lab.status(p1)["coordinator"]["state"], "connected");
}
