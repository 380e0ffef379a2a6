//! Around the sessions: `tunnelmesh ping`, path probes, hole punching, STUN discovery.

use super::*;

#[test]
fn ping_reports_the_round_trip_of_each_path_and_waits_no_longer_than_its_timeout() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    establish(&mut a, &mut b, t0);
    a.handle(Input::Tick, t0);
    let peer_b = a.peer(&b);

    let (tx, rx) = crossbeam_channel::bounded(1);
    let out = a.event(
        Event::Ping {
            peer: "b".into(),
            answer: tx.clone(),
        },
        t0,
    );
    let probes = transmits(&out);
    assert_eq!(probes.len(), 1, "only UDP is available");
    // Open the probe as B's worker would, and answer it 3 ms later.
    let mut msg = probes[0].1.clone();
    let key = b.peer(&a).keys.load().current.clone().unwrap();
    let (len, _) = key.open(&mut msg, t0).unwrap();
    let (reply, nonce) = probe::decode(&msg[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + len]).unwrap();
    assert!(!reply);
    let answered = t0 + Duration::from_millis(3);
    let probe = Event::Probe {
        peer: peer_b.clone(),
        via: Via::Udp(b.addr),
        reply: true,
        nonce,
    };
    let out = a.event(probe, answered);
    let Some(Output::PingDone { report: Ok(report), .. }) = out.into_iter().next() else {
        panic!("the ping was answered");
    };
    assert_eq!(report.paths.len(), 1);
    assert_eq!(report.paths[0].2, Some(3.0));

    // Unanswered: the report comes at the timeout, without a round trip.
    a.event(
        Event::Ping {
            peer: "b".into(),
            answer: tx.clone(),
        },
        t0,
    );
    assert!(
        a.handle(Input::Tick, t0 + PING_TIMEOUT - TICK)
            .iter()
            .all(|o| !matches!(o, Output::PingDone { .. }))
    );
    let out = a.handle(Input::Tick, t0 + PING_TIMEOUT);
    let Some(Output::PingDone { report: Ok(report), .. }) =
        out.into_iter().find(|o| matches!(o, Output::PingDone { .. }))
    else {
        panic!("the ping timed out");
    };
    assert_eq!(report.paths[0].2, None);

    // Unknown peers are named in the error.
    let out = a.event(
        Event::Ping {
            peer: "nobody".into(),
            answer: tx,
        },
        t0,
    );
    let Some(Output::PingDone { report: Err(e), .. }) = out.into_iter().next() else {
        panic!("an error");
    };
    assert!(e.contains("nobody"));
    drop(rx);
}

#[test]
fn a_path_probe_request_is_answered_on_the_path_it_came_on() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    establish(&mut a, &mut b, t0);
    let via = Via::Relay(*b.identity.public().noise_public());
    let out = a.event(
        Event::Probe {
            peer: a.peer(&b),
            via,
            reply: false,
            nonce: 42,
        },
        t0,
    );
    let sent = transmits(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, via);
}

#[test]
fn a_peer_behind_nat_that_udp_cannot_reach_is_punched_at_the_coordinators_word() {
    let t0 = Instant::now();
    let a = Node::new("a", "198.18.0.1:51820", t0);
    let b = Node::new("b", "198.18.0.2:51820", t0);
    let candidates: Vec<SocketAddr> = vec!["198.18.1.2:40000".parse().unwrap(), "10.0.0.2:51820".parse().unwrap()];
    a.knows_as(&b, NatKind::Easy, candidates.clone());
    let mut a = a;
    let (coordinator, mut requests) = tokio::sync::mpsc::channel(8);
    a.dev.coordinator.requests.store(Some(Arc::new(coordinator)));

    // A wants a session and UDP is unproven: it asks for a punch, once per backoff.
    a.event(Event::NeedSession(a.peer(&b)), t0);
    let out = a.handle(Input::Tick, t0);
    let asked: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Coordinator(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        asked,
        [CoordinatorRequest::Punch {
            peer: b.identity.public().fingerprint()
        }]
    );
    let again = a.handle(Input::Tick, t0 + TICK);
    assert!(!again.iter().any(|o| matches!(o, Output::Coordinator(_))));
    assert!(
        requests.try_recv().is_err(),
        "the machine hands requests to the driver only"
    );

    // The coordinator's word: initiations to every candidate, in rounds.
    let start = t0 + Duration::from_secs(1);
    let out = a.event(
        Event::Punch {
            key: *b.identity.public().noise_public(),
            candidates: candidates.clone(),
            nat: NatKind::Easy,
        },
        start,
    );
    let round: Vec<Via> = transmits(&out).into_iter().map(|(v, _)| v).collect();
    assert_eq!(round, candidates.iter().map(|c| Via::Udp(*c)).collect::<Vec<_>>());
    let mut rounds = 1;
    let mut now = start;
    while now < start + punch::GRACE {
        now += Duration::from_millis(50);
        let out = a.handle(Input::Tick, now);
        let punched = transmits(&out)
            .iter()
            .filter(|(v, m)| candidates.iter().any(|c| Via::Udp(*c) == *v) && wire::classify(m) == Ok(Kind::Initiation))
            .count();
        if punched == candidates.len() {
            rounds += 1;
        }
    }
    assert_eq!(rounds, punch::ROUNDS.len());
    assert_eq!(a.peer(&b).punches_started.load(Ordering::Relaxed), 1);
    assert_eq!(a.peer(&b).punches_succeeded.load(Ordering::Relaxed), 0);
}

#[test]
fn the_first_tick_reads_the_host_addresses_then_asks_both_stun_targets_from_the_tunnel_socket() {
    let t0 = Instant::now();
    let (mut a, _) = pair(t0);
    let targets: [SocketAddr; 2] = ["198.18.5.1:3478".parse().unwrap(), "198.18.5.1:3479".parse().unwrap()];
    a.dev.coordinator.stun_targets.store(Some(Arc::new(targets)));
    let out = a.handle(Input::Tick, t0);
    assert!(matches!(out.first(), Some(Output::ReadHostCandidates)));
    let out = a.handle(Input::HostCandidates(vec!["198.18.0.1:51820".parse().unwrap()]), t0);
    let asked: Vec<Via> = transmits(&out).into_iter().map(|(v, _)| v).collect();
    assert_eq!(asked, targets.map(Via::Udp));
    assert_eq!(
        a.dev.reach.candidates.load().host,
        vec!["198.18.0.1:51820".parse::<SocketAddr>().unwrap()]
    );
    // A network change is read again only after it settled.
    a.event(Event::NetworkChanged, t0);
    assert!(
        !a.handle(Input::Tick, t0 + TICK)
            .iter()
            .any(|o| matches!(o, Output::ReadHostCandidates))
    );
    assert!(
        a.handle(Input::Tick, t0 + 3 * TICK)
            .iter()
            .any(|o| matches!(o, Output::ReadHostCandidates))
    );
}
