//! Accepting and starting handshakes: keys, indices, replays, the flood limit, strangers, a
//! mesh-key rotation, cookies under load, peers leaving, rekeys.

use super::*;

#[test]
fn a_handshake_installs_one_key_and_index_each_side_and_the_shield_learns_the_index_first() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    let out = a.event(Event::NeedSession(a.peer(&b)), t0);
    let init = only(&out, Kind::Initiation);
    assert!(shield_changes(&out).is_empty(), "a pending handshake is not a session");

    let out = b.receive(&a, init, t0);
    // The index the response carries reaches the shield before the response leaves.
    let shield_at = out
        .iter()
        .position(|o| matches!(o, Output::ShieldIndex { live: true, .. }));
    let response_at = out.iter().position(|o| matches!(o, Output::Transmit { .. }));
    assert!(shield_at.unwrap() < response_at.unwrap());
    let response = only(&out, Kind::Response);
    let responder_index = wire::sender_index(&response);
    assert_eq!(shield_changes(&out), [(responder_index, true)]);
    let peer_a = b.peer(&a);
    assert!(peer_a.keys.load().current.is_none() && peer_a.keys.load().next.is_some());
    assert!(b.dev.sessions.load().contains_key(&responder_index));

    // The initiator installs its key and confirms it with a keepalive on it.
    let out = a.receive(&b, response, t0);
    let keepalive = only(&out, Kind::Data);
    assert_eq!(wire::receiver_index(&keepalive), responder_index);
    let peer_b = a.peer(&b);
    let initiator_key = peer_b.keys.load().current.clone().expect("a session");
    assert_eq!(shield_changes(&out), [(initiator_key.local_index, true)]);
    assert_eq!(a.dev.sessions.load().len(), 1);
    assert_ne!(peer_b.last_handshake_unix.load(Ordering::Relaxed), 0);

    // The responder opens the keepalive with its `next` key, which the worker then promotes.
    let mut msg = keepalive;
    let next = peer_a.keys.load().next.clone().unwrap();
    assert_eq!(next.open(&mut msg, t0).map(|(len, _)| len), Ok(0));
    confirm_next_key(&mut b, &peer_a, t0);
    assert!(peer_a.keys.load().current.is_some());
    assert_eq!(b.dev.sessions.load().len(), 1);
}

#[test]
fn a_replayed_initiation_is_counted_and_never_answered() {
    let t0 = Instant::now();
    let (a, mut b) = pair(t0);
    let wall = Duration::from_secs(1_800_000_000);
    let init = crafted_initiation(&a, &b, &KEY_1, 7, wall, t0);
    assert_eq!(transmits(&b.receive(&a, init.clone(), t0)).len(), 1);
    let later = t0 + Duration::from_secs(1);
    let out = b.receive(&a, init, later);
    assert!(transmits(&out).is_empty() && shield_changes(&out).is_empty());
    assert_eq!(b.counter(|c| &c.handshake_replayed), 1);
    // An older timestamp is a replay too.
    let older = crafted_initiation(&a, &b, &KEY_1, 8, wall - Duration::from_secs(1), later);
    assert!(transmits(&b.receive(&a, older, later + Duration::from_secs(1))).is_empty());
    assert_eq!(b.counter(|c| &c.handshake_replayed), 2);
}

#[test]
fn at_most_one_initiation_per_peer_is_accepted_per_20_ms() {
    let t0 = Instant::now();
    let (a, mut b) = pair(t0);
    let wall = Duration::from_secs(1_800_000_000);
    let first = crafted_initiation(&a, &b, &KEY_1, 1, wall, t0);
    assert_eq!(transmits(&b.receive(&a, first, t0)).len(), 1);
    let soon = t0 + MIN_INITIATION_INTERVAL - Duration::from_millis(1);
    let second = crafted_initiation(&a, &b, &KEY_1, 2, wall + Duration::from_secs(1), soon);
    assert!(transmits(&b.receive(&a, second.clone(), soon)).is_empty());
    assert_eq!(b.counter(|c| &c.handshake_rejected), 1);
    // Its timestamp was not taken: the same initiation is welcome once the interval passed.
    let out = b.receive(&a, second, t0 + MIN_INITIATION_INTERVAL);
    only(&out, Kind::Response);
    assert_eq!(b.counter(|c| &c.handshake_replayed), 0);
    // Only the latest responder key and its index are kept.
    assert_eq!(b.dev.sessions.load().len(), 1);
    assert!(shield_changes(&out).contains(&(wire::sender_index(&only(&out, Kind::Response)), true)));
    assert_eq!(shield_changes(&out).iter().filter(|(_, live)| !live).count(), 1);
}

#[test]
fn an_initiation_from_a_key_that_is_not_a_member_gets_no_answer_at_all() {
    let t0 = Instant::now();
    let (_, mut b) = pair(t0);
    let stranger = Node::new("stranger", "198.18.0.99:51820", t0);
    let init = crafted_initiation(&stranger, &b, &KEY_1, 1, Duration::from_secs(1_800_000_000), t0);
    let out = b.receive(&stranger, init, t0);
    assert!(out.is_empty(), "no response, no cookie: {out:?}");
    assert_eq!(b.counter(|c| &c.handshake_rejected), 1);
}

#[test]
fn during_a_mesh_key_rotation_the_initiator_alternates_keys_until_one_is_answered() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    // A has the new key first; B has not heard of it yet.
    a.set_mesh_keys(&[KEY_2, KEY_1]);
    let out = a.event(Event::NeedSession(a.peer(&b)), t0);
    let first = only(&out, Kind::Initiation);
    let out = b.receive(&a, first, t0);
    let response = only(&out, Kind::Response);
    // Under the new key the response does not decrypt: A retries under the old one at once.
    let t1 = t0 + Duration::from_millis(1);
    let out = a.receive(&b, response, t1);
    assert_eq!(a.counter(|c| &c.handshake_rejected), 1);
    assert!(transmits(&out).is_empty(), "not at once: B's flood limit would drop it");
    assert!(transmits(&a.handle(Input::Tick, t1 + MIN_INITIATION_INTERVAL / 2)).is_empty());
    let t2 = t1 + MIN_INITIATION_INTERVAL;
    let out = a.handle(Input::Tick, t2);
    let retry = only(&out, Kind::Initiation);
    let out = b.receive(&a, retry, t2);
    let response = only(&out, Kind::Response);
    let out = a.receive(&b, response, t2);
    only(&out, Kind::Data);
    assert!(a.peer(&b).keys.load().current.is_some(), "session under the old key");
}

#[test]
fn under_load_udp_initiations_get_a_cookie_reply_and_pass_once_they_carry_the_cookie() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    b.sp.set_backlog(UNDER_LOAD_QUEUE);
    let out = a.event(Event::NeedSession(a.peer(&b)), t0);
    let init = only(&out, Kind::Initiation);
    let out = b.receive(&a, init, t0);
    let reply = only(&out, Kind::CookieReply);
    assert_eq!(
        transmits(&out)[0].0,
        Via::Udp(a.addr),
        "the reply goes back to the source"
    );
    assert!(
        b.peer(&a).keys.load().next.is_none(),
        "no DH under load without a cookie"
    );
    assert_eq!(b.counter(|c| &c.cookie_replies_sent), 1);

    // A takes the cookie; its retransmission carries mac2 and is answered under load.
    assert!(
        a.event(
            Event::Handshake {
                msg: reply,
                via: Via::Udp(b.addr)
            },
            t0
        )
        .is_empty()
    );
    assert_eq!(a.counter(|c| &c.handshake_rejected), 0);
    let mut now = t0;
    let retry = loop {
        now += TICK;
        let out = a.handle(Input::Tick, now);
        if let Some((_, m)) = transmits(&out)
            .into_iter()
            .find(|(_, m)| wire::classify(m) == Ok(Kind::Initiation))
        {
            break m;
        }
        assert!(now - t0 < REKEY_TIMEOUT * 2, "no retransmission");
    };
    let out = b.receive(&a, retry, now);
    only(&out, Kind::Response);
    assert_eq!(b.counter(|c| &c.cookie_replies_sent), 1);
}

fn blocks(out: &[Output]) -> Vec<(std::net::IpAddr, Duration)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ShieldBlock { source, period } => Some((*source, *period)),
            _ => None,
        })
        .collect()
}

/// Security item 8: what fails mac1, what comes without a cookie under load, and anything
/// while the queue is short is never charged, so a spoofer cannot spend a peer's budget;
/// under load a source that proved its address (the cookie) is charged, and beyond its budget
/// it is dropped before any DH and blocked in the XDP shield.
#[test]
fn under_load_only_a_proven_source_is_charged_and_beyond_its_budget_it_is_dropped_and_blocked() {
    let t0 = Instant::now();
    let (a, mut b) = pair(t0);
    let wall = Duration::from_secs(1_800_000_000);
    let at = |i: u32| wall + Duration::from_secs(i as u64);
    for i in 0..40 {
        b.receive(&a, crafted_initiation(&a, &b, &KEY_1, i, at(i), t0), t0);
    }
    assert_eq!(b.counter(|c| &c.handshake_rate_limited), 0, "not under load: no budget");

    b.sp.set_backlog(UNDER_LOAD_QUEUE);
    for i in 0..100 {
        let mut forged = crafted_initiation(&a, &b, &KEY_1, 100 + i, at(100 + i), t0);
        forged[20] ^= 1; // mac1 no longer matches
        assert!(blocks(&b.receive(&a, forged, t0)).is_empty());
    }
    let mut jar = CookieJar::new(b.identity.public().noise_public());
    for i in 0..30 {
        let unproven = crafted_initiation(&a, &b, &KEY_1, 200 + i, at(200 + i), t0);
        only(&b.receive(&a, unproven, t0), Kind::CookieReply);
    }
    let first = crafted_initiation_stamped(&a, &b, &KEY_1, 300, at(300), &mut jar, t0);
    let reply = only(&b.receive(&a, first, t0), Kind::CookieReply);
    assert!(jar.consume_reply(&reply, t0));
    assert_eq!(
        b.counter(|c| &c.handshake_rate_limited),
        0,
        "nothing unproven was charged"
    );

    let mut blocked = Vec::new();
    for i in 0..30 {
        let proven = crafted_initiation_stamped(&a, &b, &KEY_1, 400 + i, at(400 + i), &mut jar, t0);
        blocked.extend(blocks(&b.receive(&a, proven, t0)));
    }
    assert_eq!(b.counter(|c| &c.handshake_rate_limited), 10, "a burst of 20 of the 30");
    assert_eq!(blocked, vec![(a.addr.ip(), super::super::limit::BLOCK_FOR); 10]);
}

/// Security item 13: initiations over SSH or the relay need no cookie (the carrier
/// authenticated the member), and under load they are charged to that member whatever the
/// carrier; the shield is not involved (they never crossed it).
#[test]
fn under_load_initiations_over_ssh_and_the_relay_are_budgeted_per_member() {
    let t0 = Instant::now();
    let (a, mut b) = pair(t0);
    b.sp.set_backlog(UNDER_LOAD_QUEUE * 10);
    let wall = Duration::from_secs(1_800_000_000);
    let member = *a.identity.public().noise_public();
    let mut out = Vec::new();
    for i in 0..40u32 {
        let via = if i % 2 == 0 {
            Via::Ssh(member)
        } else {
            Via::Relay(member)
        };
        let msg = crafted_initiation(&a, &b, &KEY_1, i, wall + Duration::from_secs(i as u64), t0);
        out.extend(b.event(Event::Handshake { msg, via }, t0));
    }
    assert_eq!(b.counter(|c| &c.handshake_rate_limited), 20);
    assert!(blocks(&out).is_empty());
    // Another carrier key has a budget of its own.
    let msg = crafted_initiation(&a, &b, &KEY_1, 99, wall + Duration::from_secs(99), t0);
    b.event(
        Event::Handshake {
            msg,
            via: Via::Relay([9; 32]),
        },
        t0,
    );
    assert_eq!(b.counter(|c| &c.handshake_rate_limited), 20);
}

#[test]
fn under_load_initiations_over_ssh_need_no_cookie() {
    let t0 = Instant::now();
    let (a, mut b) = pair(t0);
    b.sp.set_backlog(UNDER_LOAD_QUEUE * 10);
    let init = crafted_initiation(&a, &b, &KEY_1, 1, Duration::from_secs(1_800_000_000), t0);
    let via = Via::Ssh(*a.identity.public().noise_public());
    let out = b.event(Event::Handshake { msg: init, via }, t0);
    assert_eq!(transmits(&out)[0].0, via);
    only(&out, Kind::Response);
}

/// The shield learns a responder's index before the response is sent; if that send fails
/// (the response is lost, as any datagram may be), the index is not left behind: it lives with
/// its key, which is erased 3 × REJECT_AFTER_TIME after the handshake, as WireGuard erases it.
#[test]
fn the_index_of_a_response_that_was_never_sent_goes_with_its_key() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    let init = only(&a.event(Event::NeedSession(a.peer(&b)), t0), Kind::Initiation);
    let out = b.receive(&a, init, t0);
    let response = only(&out, Kind::Response);
    let index = wire::sender_index(&response);
    assert_eq!(shield_changes(&out), [(index, true)]);
    // The response never leaves B. Time passes with A silent (A's retries are not delivered).
    let mut removed = Vec::new();
    let mut now = t0;
    while now < t0 + 3 * crate::protocol::session::REJECT_AFTER_TIME + TICK * 2 {
        now += Duration::from_secs(1);
        removed.extend(shield_changes(&b.handle(Input::Tick, now)));
    }
    assert_eq!(removed, [(index, false)], "the shield forgets the index with the key");
    assert!(b.dev.sessions.load().is_empty());
    assert!(b.peer(&a).keys.load().next.is_none());
}

#[test]
fn a_peer_that_leaves_the_table_loses_its_keys_and_the_shield_its_index() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    establish(&mut a, &mut b, t0);
    let peer_b = a.peer(&b);
    let index = peer_b.keys.load().current.as_ref().unwrap().local_index;
    a.dev.update(Vec::new(), Vec::new());
    let out = a.event(Event::PeersChanged, t0);
    assert_eq!(shield_changes(&out), [(index, false)]);
    assert!(a.dev.sessions.load().is_empty());
    assert!(
        peer_b.keys.load().current.is_none(),
        "a worker holding the old peer cannot send"
    );
}

#[test]
fn a_rekey_keeps_the_previous_key_and_prunes_the_one_before_on_both_sides() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    let oldest = establish(&mut a, &mut b, t0);
    let responder_oldest = b.peer(&a).keys.load().current.as_ref().unwrap().local_index;
    let previous = establish(&mut a, &mut b, t0 + Duration::from_secs(1));
    assert_eq!(a.dev.sessions.load().len(), 2);
    let latest = establish(&mut a, &mut b, t0 + Duration::from_secs(2));
    let keys = a.peer(&b).keys.load();
    assert_eq!(keys.current.as_ref().unwrap().local_index, latest);
    assert_eq!(keys.previous.as_ref().unwrap().local_index, previous);
    for node in [&a, &b] {
        assert_eq!(node.dev.sessions.load().len(), 2, "{}: current and previous", node.name);
    }
    assert!(!a.dev.sessions.load().contains_key(&oldest));
    assert!(!b.dev.sessions.load().contains_key(&responder_oldest));
}

#[test]
fn a_forged_response_does_not_destroy_the_initiation_the_real_one_answers() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    let out = a.event(Event::NeedSession(a.peer(&b)), t0);
    let init = only(&out, Kind::Initiation);
    let response = only(&b.receive(&a, init, t0), Kind::Response);
    // An on-path injector answers first: the right receiver index and a valid mac1 (anyone can
    // compute it from A's public key), junk where the Noise message is.
    let mut forged = response.clone();
    for byte in &mut forged[12..60] {
        *byte ^= 0x5a;
    }
    CookieJar::new(a.identity.public().noise_public()).stamp(&mut forged, t0);
    let out = a.receive(&b, forged, t0);
    assert!(transmits(&out).is_empty());
    assert_eq!(a.counter(|c| &c.handshake_rejected), 1);
    // The real response still completes the handshake.
    let out = a.receive(&b, response, t0);
    only(&out, Kind::Data);
    assert!(a.peer(&b).keys.load().current.is_some());
}

#[test]
fn a_session_request_lost_to_a_full_queue_is_asked_again_by_the_next_packet() {
    let t0 = Instant::now();
    let (a, b) = pair(t0);
    // Fill the events queue (a handshake flood).
    while a.dev.events.try_send(Event::PeersChanged).is_ok() {}
    let peer = a.peer(&b);
    a.dev.request_session(&peer);
    assert_eq!(a.counter(|c| &c.handshake_queue_full), 1);
    assert!(
        !peer.session_requested.load(Ordering::Acquire),
        "the lost request is not remembered"
    );
    // The flood ends; the next packet's request gets through.
    while a.events.try_recv().is_ok() {}
    a.dev.request_session(&peer);
    assert!(matches!(a.events.try_recv(), Ok(Event::NeedSession(p)) if Arc::ptr_eq(&p, &peer)));
}
