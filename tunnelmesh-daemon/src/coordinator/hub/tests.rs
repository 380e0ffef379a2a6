//! The hub driven directly: admission, welcomes in parts, candidates and punches.

use std::{net::IpAddr, time::Instant};

use super::*;
use crate::coordinator::store::{SqliteStore, TokenRecord};
use crate::{
    control::proto::{ClientMsg, JOIN_NAMESPACE, WELCOME_CHUNK, join_transcript},
    coordinator::admission,
};

const COORDINATOR: &str = "ssh-ed25519 AAAA coordinator";
const CERTIFICATE: &str = "SHA256:this-coordinators-certificate";

fn hub() -> Hub {
    let store = SqliteStore::for_tests("tmtok_test");
    let ipam = Ipam::new("100.64.0.0/10".parse().unwrap(), "fd00::/64".parse().unwrap(), []).unwrap();
    Hub::new(Box::new(store), ipam, COORDINATOR.into(), CERTIFICATE.into()).unwrap()
}

fn hello(id: &crate::identity::Identity, nonce: &[u8], token: Option<&str>) -> ClientMsg {
    ClientMsg::Hello {
        ssh_key: id.public().ssh_line_with_comment(),
        signature: id.sign(JOIN_NAMESPACE, &join_transcript(nonce, COORDINATOR, CERTIFICATE)),
        token: token.map(str::to_string),
        name: None,
        listen_port: 51820,
        endpoints: vec![],
        ssh_port: None,
        nat: NatKind::Unknown,
    }
}

#[test]
fn a_large_welcome_comes_in_bounded_parts_that_add_up_to_every_peer() {
    let mut hub = hub();
    let remote: IpAddr = "198.18.0.9".parse().unwrap();
    for i in 0..600 {
        let (id, _) = crate::identity::Identity::generate(&format!("root@n{i}"));
        hub.admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote).unwrap();
    }
    let (id, _) = crate::identity::Identity::generate("root@last");
    let admitted = hub.admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote).unwrap();
    assert_eq!(admitted.welcome.len(), 3, "600 peers in parts of {WELCOME_CHUNK}");
    let mut peers = 0;
    for (i, part) in admitted.welcome.iter().enumerate() {
        let more = i + 1 < admitted.welcome.len();
        match serde_json::from_str::<ServerMsg>(part).unwrap() {
            ServerMsg::Welcome {
                peers: p,
                more: m,
                mesh,
            } if i == 0 => {
                assert_eq!((m, mesh.node.name.as_str()), (more, "last"));
                peers += p.len();
            }
            ServerMsg::Peers { peers: p, more: m } if i > 0 => {
                assert_eq!(m, more);
                peers += p.len();
            }
            other => panic!("unexpected part {i}: {other:?}"),
        }
    }
    assert_eq!(peers, 600);
}

/// Where [`two_members`] connect from.
const MEMBERS_REMOTE: &str = "198.18.0.9";

/// Members a and b admitted with the test token from [`MEMBERS_REMOTE`]: a's identity and both
/// connections.
fn two_members(hub: &mut Hub) -> (crate::identity::Identity, Admitted, Admitted) {
    let remote: IpAddr = MEMBERS_REMOTE.parse().unwrap();
    let (a, _) = crate::identity::Identity::generate("root@a");
    let (b, _) = crate::identity::Identity::generate("root@b");
    let a_conn = hub.admit(hello(&a, b"n", Some("tmtok_test")), b"n", remote).unwrap();
    let b_conn = hub.admit(hello(&b, b"n", Some("tmtok_test")), b"n", remote).unwrap();
    (a, a_conn, b_conn)
}

/// Every message queued for a connected node so far.
#[test]
fn a_revoked_or_replaced_connection_is_heard_no_more_and_nothing_it_sent_is_pushed() {
    let mut hub = hub();
    let (a, a_conn, mut b_conn) = two_members(&mut hub);
    let candidates = ClientMsg::Candidates {
        endpoints: vec!["198.18.0.9:40000".into()],
        nat: NatKind::Easy,
    };
    let punch = ClientMsg::Punch {
        peer: b_conn.fingerprint.clone(),
    };

    // a reconnects: what its old connection still sends is not heard.
    let a_again = hub
        .admit(
            hello(&a, b"m", Some("tmtok_test")),
            b"m",
            MEMBERS_REMOTE.parse().unwrap(),
        )
        .unwrap();
    drain(&mut b_conn.updates);
    let stale = hub.on_message(&a_conn.fingerprint, a_conn.connection, candidates.clone());
    assert!(matches!(stale, Err(MessageError::Superseded)), "{stale:?}");
    assert!(drain(&mut b_conn.updates).is_empty());

    // The operator revokes a; its messages read before that, handled after it, push nothing.
    hub.store.revoke(&a_again.fingerprint).unwrap();
    // The operator's command writes from another connection, which moves `data_version`; this
    // test writes on the hub's own.
    hub.data_version = -1;
    hub.reconcile().unwrap();
    let told = drain(&mut b_conn.updates);
    // The revocation issued a new mesh key (security item 22), pushed with the removal.
    assert!(
        matches!(told.as_slice(), [ServerMsg::MeshKeys { mesh_keys }, ServerMsg::PeerRemoved { fingerprint }]
            if mesh_keys.len() == 2 && *fingerprint == a_again.fingerprint),
        "{told:?}"
    );
    for late in [candidates, punch] {
        let outcome = hub.on_message(&a_again.fingerprint, a_again.connection, late);
        assert!(matches!(outcome, Err(MessageError::Gone)), "{outcome:?}");
    }
    assert!(drain(&mut b_conn.updates).is_empty(), "b never hears of a again");
    assert!(!hub.peer_json.contains_key(&a_again.fingerprint));
}

#[test]
fn a_hello_signed_for_another_coordinator_is_refused() {
    // Coordinator B of another mesh relays our challenge to a node pinned to B: the node signs
    // for B's certificate (and whatever the challenge names), and we refuse it.
    let mut hub = hub();
    let (id, _) = crate::identity::Identity::generate("root@victim");
    let remote: IpAddr = "198.18.0.9".parse().unwrap();
    for (coordinator, certificate) in [
        (COORDINATOR, "SHA256:coordinator-b"),
        ("ssh-ed25519 BBBB b", CERTIFICATE),
    ] {
        let mut relayed = hello(&id, b"n", Some("tmtok_test"));
        if let ClientMsg::Hello { signature, .. } = &mut relayed {
            *signature = id.sign(JOIN_NAMESPACE, &join_transcript(b"n", coordinator, certificate));
        }
        let refused = hub.admit(relayed, b"n", remote);
        assert!(matches!(refused, Err(Refusal::BadSignature(_))), "{:?}", refused.err());
    }
    // The same node answering this coordinator's own challenge is admitted.
    assert!(hub.admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote).is_ok());
}

#[test]
fn a_hello_refused_for_a_taken_name_does_not_spend_a_single_use_token() {
    let mut hub = hub();
    hub.store
        .insert_token(&TokenRecord {
            hash: admission::token_hash("tmtok_once"),
            uses_left: 1,
            expires: unix_now() + 60,
            tags: vec![],
            names: "*".into(),
        })
        .unwrap();
    let remote: IpAddr = "198.18.0.9".parse().unwrap();
    let named = |id: &crate::identity::Identity, token: &str, name: &str| {
        let mut h = hello(id, b"n", Some(token));
        if let ClientMsg::Hello { name: n, .. } = &mut h {
            *n = Some(name.into());
        }
        h
    };
    let (web, _) = crate::identity::Identity::generate("root@web");
    hub.admit(named(&web, "tmtok_test", "web"), b"n", remote).unwrap();
    let (other, _) = crate::identity::Identity::generate("root@other");
    let refused = hub.admit(named(&other, "tmtok_once", "web"), b"n", remote);
    assert!(matches!(refused, Err(Refusal::NameTaken(_))), "{:?}", refused.err());
    // The single-use token is still there for a free name.
    assert!(hub.admit(named(&other, "tmtok_once", "other"), b"n", remote).is_ok());
}

fn drain(rx: &mut mpsc::Receiver<Arc<ServerMsg>>) -> Vec<ServerMsg> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|m| (*m).clone())
        .collect()
}

#[test]
fn candidates_are_checked_kept_and_pushed_and_a_punch_reaches_both_sides_at_once() {
    let mut hub = hub();
    let nat_d: IpAddr = "198.18.0.9".parse().unwrap();
    let (a, _) = crate::identity::Identity::generate("root@a");
    let (b, _) = crate::identity::Identity::generate("root@b");
    // a says it has host address 10.0.0.2: its connection from 198.18.0.9 went through NAT.
    let mut hello_a = hello(&a, b"n", Some("tmtok_test"));
    if let ClientMsg::Hello { endpoints, .. } = &mut hello_a {
        endpoints.push("10.0.0.2:51820".into());
    }
    let mut a_conn = hub.admit(hello_a, b"n", nat_d).unwrap();
    // b's connection comes from its own address: not behind NAT.
    let mut hello_b = hello(&b, b"n", Some("tmtok_test"));
    if let ClientMsg::Hello { endpoints, .. } = &mut hello_b {
        endpoints.push("198.18.0.20:51820".into());
    }
    let mut b_conn = hub.admit(hello_b, b"n", "198.18.0.20".parse().unwrap()).unwrap();
    let info = |hub: &Hub, fp: &str| hub.peer_info(&hub.nodes[fp]);
    assert_eq!(info(&hub, &b_conn.fingerprint).nat, NatKind::None);
    let a_info = info(&hub, &a_conn.fingerprint);
    assert_eq!(a_info.nat, NatKind::Unknown);
    assert_eq!(
        a_info.endpoints,
        ["10.0.0.2:51820", "198.18.0.9:51820"],
        "until STUN says better, the connection's address with the listen port is a guess"
    );
    drain(&mut b_conn.updates);

    // STUN told a its public address: kept, the guess dropped, and b is told.
    let stun = ClientMsg::Candidates {
        endpoints: vec!["10.0.0.2:51820".into(), "198.18.0.9:40000".into()],
        nat: NatKind::Hard,
    };
    hub.on_message(&a_conn.fingerprint, a_conn.connection, stun.clone())
        .unwrap();
    let a_info = info(&hub, &a_conn.fingerprint);
    assert_eq!(
        (a_info.endpoints.as_slice(), a_info.nat),
        (
            &["10.0.0.2:51820".to_string(), "198.18.0.9:40000".into()][..],
            NatKind::Hard
        )
    );
    match drain(&mut b_conn.updates).as_slice() {
        [ServerMsg::PeerUpsert { peer }] => assert_eq!(peer, &a_info),
        other => panic!("b should get one upsert: {other:?}"),
    }
    hub.on_message(&a_conn.fingerprint, a_conn.connection, stun).unwrap();
    assert!(drain(&mut b_conn.updates).is_empty(), "no change, no push");

    // Bad input is refused with a reason, and changes nothing.
    let nine = (0..9).map(|i| format!("10.0.0.{i}:1")).collect();
    for (bad, why) in [(vec!["10.0.0.2".to_string()], "is not ip:port"), (nine, "at most 8")] {
        let err = hub
            .on_message(
                &a_conn.fingerprint,
                a_conn.connection,
                ClientMsg::Candidates {
                    endpoints: bad,
                    nat: NatKind::Easy,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(info(&hub, &a_conn.fingerprint), a_info);

    // No policy lets them talk: no punch is brokered.
    let punch_b = ClientMsg::Punch {
        peer: b_conn.fingerprint.clone(),
    };
    let refused = hub.on_message(&a_conn.fingerprint, a_conn.connection, punch_b.clone());
    assert!(matches!(refused, Err(MessageError::PunchNotAllowed(_))), "{refused:?}");
    hub.set_policy(PolicyFile::parse("[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n").unwrap());
    hub.settle_policies();

    // A punch: both sides hear about the other, with its candidates, in one go.
    drain(&mut a_conn.updates);
    drain(&mut b_conn.updates);
    hub.on_message(
        &a_conn.fingerprint,
        a_conn.connection,
        ClientMsg::Punch {
            peer: b_conn.fingerprint.clone(),
        },
    )
    .unwrap();
    let to_a = drain(&mut a_conn.updates);
    let to_b = drain(&mut b_conn.updates);
    assert!(
        matches!(to_a.as_slice(), [ServerMsg::Punch { peer, endpoints, nat: NatKind::None }]
        if *peer == b_conn.fingerprint && endpoints == &["198.18.0.20:51820"]),
        "{to_a:?}"
    );
    assert!(
        matches!(to_b.as_slice(), [ServerMsg::Punch { peer, endpoints, nat: NatKind::Hard }]
        if *peer == a_conn.fingerprint && endpoints == &["198.18.0.9:40000"]),
        "{to_b:?}"
    );
    // The pair is asked at most every PUNCH_INTERVAL, whoever asks.
    hub.on_message(
        &b_conn.fingerprint,
        b_conn.connection,
        ClientMsg::Punch {
            peer: a_conn.fingerprint.clone(),
        },
    )
    .unwrap();
    assert!(drain(&mut a_conn.updates).is_empty() && drain(&mut b_conn.updates).is_empty());
    assert!(
        hub.on_message(
            &a_conn.fingerprint,
            a_conn.connection,
            ClientMsg::Punch {
                peer: a_conn.fingerprint.clone()
            }
        )
        .is_err()
    );
    assert!(
        hub.on_message(
            &a_conn.fingerprint,
            a_conn.connection,
            ClientMsg::Punch {
                peer: "SHA256:nobody".into()
            }
        )
        .is_err()
    );
    // However it asks, a node's punch requests are budgeted.
    let mut outcomes = (0..2 * rendezvous::PUNCH_BUDGET)
        .map(|_| hub.on_message(&a_conn.fingerprint, a_conn.connection, punch_b.clone()));
    assert!(outcomes.any(|o| matches!(o, Err(MessageError::PunchBudget))));
}

#[test]
fn admission_checks_the_signature_the_token_and_revocation() {
    let mut hub = hub();
    let remote: IpAddr = "198.18.0.9".parse().unwrap();
    let (id, _) = crate::identity::Identity::generate("root@web");
    // A signature over another nonce proves nothing.
    let err = hub
        .admit(hello(&id, b"old nonce", Some("tmtok_test")), b"fresh", remote)
        .err()
        .unwrap();
    assert!(matches!(err, Refusal::BadSignature(_)), "{err}");
    let err = hub.admit(hello(&id, b"n", None), b"n", remote).err().unwrap();
    assert!(matches!(err, Refusal::NotAuthorized(_)), "{err}");
    let err = hub
        .admit(hello(&id, b"n", Some("tmtok_forged")), b"n", remote)
        .err()
        .unwrap();
    assert!(matches!(err, Refusal::BadToken), "{err}");
    let first = hub.admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote).unwrap();
    // The same key again gets the same address, without a token.
    let again = hub.admit(hello(&id, b"n", None), b"n", remote).unwrap();
    assert_eq!(
        first.welcome[0].split("\"peers\"").next(),
        again.welcome[0].split("\"peers\"").next()
    );
    // The operator revokes from another process (another connection to the store).
    hub.store.revoke("web").unwrap();
    hub.data_version -= 1;
    hub.reconcile().unwrap();
    let err = hub
        .admit(hello(&id, b"n", Some("tmtok_test")), b"n", remote)
        .err()
        .unwrap();
    assert!(matches!(err, Refusal::Revoked(_)), "{err}");
}

/// Security item 7: what admitted a node is checked again. A line's new tags reach a
/// key-admitted node's record; once its line is gone it is removed at once (its peers told)
/// and refused when it reconnects; a token-admitted node is not affected by `authorized_keys`.
/// Before, an admitted node rejoined with its stored tags whatever the file said.
#[test]
fn admission_and_tags_follow_authorized_keys_on_reload_and_on_every_connect() {
    use crate::coordinator::admission::AuthorizedKey;
    let mut hub = hub();
    let remote: IpAddr = "198.18.0.9".parse().unwrap();
    let (keyed, _) = crate::identity::Identity::generate("root@keyed");
    let (tokened, _) = crate::identity::Identity::generate("root@tokened");
    let fingerprint = keyed.public().fingerprint();
    let line = |tags: &[&str]| {
        HashMap::from([(
            fingerprint.clone(),
            AuthorizedKey {
                name: Some("keyed".into()),
                tags: tags.iter().map(|s| s.to_string()).collect(),
            },
        )])
    };
    hub.set_authorized(line(&["web"])).unwrap();
    hub.admit(hello(&keyed, b"n1", None), b"n1", remote).unwrap();
    hub.admit(hello(&tokened, b"n2", Some("tmtok_test")), b"n2", remote)
        .unwrap();
    assert_eq!(hub.nodes[&fingerprint].tags, ["web"]);

    hub.set_authorized(line(&["db"])).unwrap();
    assert_eq!(
        hub.nodes[&fingerprint].tags,
        ["db"],
        "the line's new tags, without a reconnect"
    );
    let stored = hub.store.node(&fingerprint).unwrap().unwrap();
    assert_eq!(
        (stored.tags, stored.admitted_by),
        (vec!["db".to_string()], Admission::Key)
    );

    hub.set_authorized(HashMap::new()).unwrap();
    assert!(hub.nodes[&fingerprint].removed, "removed once its line is gone");
    assert!(
        !hub.connections.contains_key(&fingerprint),
        "its connection was told and dropped"
    );
    assert!(matches!(
        hub.admit(hello(&keyed, b"n3", None), b"n3", remote),
        Err(Refusal::NotAuthorized(_))
    ));
    assert!(
        hub.admit(hello(&tokened, b"n4", None), b"n4", remote).is_ok(),
        "a token-admitted node stays a member"
    );
    // The removed node may come back with a token, taking the token's tags.
    hub.admit(hello(&keyed, b"n5", Some("tmtok_test")), b"n5", remote)
        .unwrap();
    assert_eq!(hub.nodes[&fingerprint].tags, ["t"]);
    assert_eq!(hub.nodes[&fingerprint].admitted_by, Admission::Token);
}

/// Security item 7: a token holder picked any free name — also one the policy grants rights
/// to before that node first joins. Now the token decides: `*` (any name the policy does not
/// name and no authorized_keys line reserves), `prefix*`, or one exact name; a refusal spends
/// nothing.
#[test]
fn a_token_decides_which_names_its_holders_take_and_a_refusal_spends_nothing() {
    use crate::coordinator::admission::AuthorizedKey;
    let mut hub = hub();
    hub.set_policy(
        crate::policy::PolicyFile::parse("[[allow]]\nfrom = [\"admin\"]\nto = [\"*\"]\nports = [\"any\"]\n").unwrap(),
    );
    let (reserved, _) = crate::identity::Identity::generate("root@db");
    hub.set_authorized(HashMap::from([(
        reserved.public().fingerprint(),
        AuthorizedKey {
            name: Some("db".into()),
            tags: vec![],
        },
    )]))
    .unwrap();
    for (token, names) in [("tmtok_ci", "ci-*"), ("tmtok_admin", "admin")] {
        hub.store
            .insert_token(&TokenRecord {
                hash: admission::token_hash(token),
                uses_left: 1,
                expires: unix_now() + 60,
                tags: vec![],
                names: names.into(),
            })
            .unwrap();
    }
    let remote: IpAddr = "198.18.0.9".parse().unwrap();
    let join = |hub: &mut Hub, who: &str, token: &str, name: Option<&str>| {
        let (id, _) = crate::identity::Identity::generate(&format!("root@{who}"));
        let mut h = hello(&id, b"n", Some(token));
        if let ClientMsg::Hello { name: n, .. } = &mut h {
            *n = name.map(str::to_string);
        }
        hub.admit(h, b"n", remote)
            .map(|a| hub.nodes[&a.fingerprint].name.clone())
    };
    let not_allowed = |r: Result<String, Refusal>| matches!(r, Err(Refusal::NameNotAllowed(_)));
    // The any-name token: not the policy's "admin", not authorized_keys' "db".
    assert!(not_allowed(join(&mut hub, "x", "tmtok_test", Some("admin"))));
    assert!(not_allowed(join(&mut hub, "y", "tmtok_test", Some("db"))));
    assert_eq!(
        join(&mut hub, "admin", "tmtok_test", None).unwrap(),
        "admin-2",
        "a derived name moves on"
    );
    // The prefix token refuses other names without spending its one use, then admits one.
    assert!(not_allowed(join(&mut hub, "z", "tmtok_ci", Some("web"))));
    assert_eq!(join(&mut hub, "runner", "tmtok_ci", None).unwrap(), "ci-runner");
    // The token made for "admin" gives exactly that name.
    assert!(not_allowed(join(&mut hub, "w", "tmtok_admin", Some("other"))));
    assert_eq!(join(&mut hub, "w", "tmtok_admin", None).unwrap(), "admin");
}

/// Security item 6: every `candidates` message was pushed to every peer at once (and written
/// to the store), so a member alternating its endpoints 1,000 times a second had every node
/// rewrite its peer table and its cache 1,000 times a second. Now a node's entry is pushed at
/// a bounded pace; what it sent meanwhile is held, and only its newest change is pushed.
#[test]
fn a_node_alternating_its_endpoints_reaches_its_peers_at_a_bounded_pace_with_its_newest_change() {
    let mut hub = hub();
    let (_, a_conn, mut b_conn) = two_members(&mut hub);
    drain(&mut b_conn.updates);
    let start = Instant::now();
    let alternate = |i: usize| ClientMsg::Candidates {
        endpoints: vec![format!("198.18.0.9:{}", 40000 + i % 2)],
        nat: NatKind::Easy,
    };
    for i in 0..1_000 {
        hub.on_message(&a_conn.fingerprint, a_conn.connection, alternate(i))
            .unwrap();
    }
    let burst = drain(&mut b_conn.updates);
    assert!(
        (1..=rendezvous::CANDIDATES_BURST as usize).contains(&burst.len()),
        "1,000 changes reach b as {} pushes",
        burst.len()
    );
    // What came since is held: the next pushes wait for the pace, then carry the newest only.
    hub.flush_paced(start);
    assert!(drain(&mut b_conn.updates).is_empty(), "nothing before the pace allows");
    let newest = vec!["198.18.0.9:40001".to_string()];
    let mut pushed = Vec::new();
    for tick in 1..=10 {
        hub.flush_paced(start + CANDIDATES_INTERVAL * tick);
        pushed.extend(drain(&mut b_conn.updates));
    }
    assert!(
        matches!(pushed.as_slice(), [ServerMsg::PeerUpsert { peer }] if peer.endpoints == newest),
        "{pushed:?}"
    );
    assert_eq!(
        hub.store
            .nodes()
            .unwrap()
            .iter()
            .find(|n| n.fingerprint == a_conn.fingerprint)
            .unwrap()
            .endpoints,
        newest
    );

    // A node revoked while a change of it is held: the change is never pushed.
    for i in 0..100 {
        hub.on_message(&a_conn.fingerprint, a_conn.connection, alternate(i))
            .unwrap();
    }
    drain(&mut b_conn.updates);
    hub.revoke_now(&a_conn.fingerprint).unwrap();
    drain(&mut b_conn.updates);
    hub.flush_paced(start + CANDIDATES_INTERVAL * 100);
    assert!(
        drain(&mut b_conn.updates).is_empty(),
        "nothing of a revoked node is pushed"
    );
}

/// Security item 6: every join or reconnect recompiled every connected node's policy under
/// the hub lock, and was pushed to every peer even when nothing about the node changed. Now a
/// rejoin that changes nothing pushes nothing and compiles nothing; a real change is compiled
/// from a snapshot outside the lock, and a result older than one applied is dropped.
#[test]
fn a_rejoin_that_changes_nothing_pushes_and_compiles_nothing_and_stale_compiles_are_dropped() {
    let mut hub = hub();
    hub.set_policy(PolicyFile::parse("[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n").unwrap());
    hub.settle_policies();
    let remote: IpAddr = "198.18.0.9".parse().unwrap();
    let ids: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| crate::identity::Identity::generate(&format!("root@{n}")).0)
        .collect();
    let mut a = hub
        .admit(hello(&ids[0], b"n", Some("tmtok_test")), b"n", remote)
        .unwrap();
    let _b = hub
        .admit(hello(&ids[1], b"n", Some("tmtok_test")), b"n", remote)
        .unwrap();
    hub.settle_policies();
    assert!(
        drain(&mut a.updates)
            .iter()
            .any(|m| matches!(m, ServerMsg::Policy { .. })),
        "a newcomer changes a's rules"
    );

    // b reconnects as it was: a hears nothing and nothing is recompiled.
    let b = hub.admit(hello(&ids[1], b"m", None), b"m", remote).unwrap();
    assert!(hub.policy_job().is_none(), "an unchanged membership compiles nothing");
    assert!(drain(&mut a.updates).is_empty(), "an unchanged entry is not pushed");

    // Two changes; their compiles finish out of order: the older result is dropped.
    let _c = hub
        .admit(hello(&ids[2], b"n", Some("tmtok_test")), b"n", remote)
        .unwrap();
    let older = hub.policy_job().expect("c's join is compiled");
    hub.set_policy(PolicyFile::parse("[[allow]]\nfrom = [\"c\"]\nto = [\"*\"]\nports = [\"any\"]\n").unwrap());
    let newer = hub.policy_job().expect("the new policy is compiled");
    assert!(hub.policy_job().is_none(), "a change is compiled once");
    drain(&mut a.updates);
    hub.apply_policies(newer.compile());
    let only_from_c = |m: &ServerMsg| matches!(m, ServerMsg::Policy { policy } if policy.rules.len() == 1);
    assert!(matches!(drain(&mut a.updates).as_slice(), [m] if only_from_c(m)));
    hub.apply_policies(older.compile());
    assert!(drain(&mut a.updates).is_empty(), "a stale compile pushes nothing");

    // A part compiled for a connection since replaced is not pushed: its welcome had newer rules.
    let allow_from = |who: &str| {
        PolicyFile::parse(&format!(
            "[[allow]]\nfrom = [\"{who}\"]\nto = [\"*\"]\nports = [\"any\"]\n"
        ))
        .unwrap()
    };
    hub.set_policy(allow_from("a"));
    let job = hub.policy_job().unwrap();
    hub.set_policy(allow_from("c"));
    let mut b_again = hub.admit(hello(&ids[1], b"o", None), b"o", remote).unwrap();
    drop(b);
    hub.apply_policies(job.compile());
    assert!(
        drain(&mut b_again.updates)
            .iter()
            .all(|m| !matches!(m, ServerMsg::Policy { .. })),
        "b keeps its welcome's rules"
    );
    hub.settle_policies();
    assert!(drain(&mut b_again.updates).is_empty(), "and they are the newest");
}
