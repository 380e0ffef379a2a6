//! The slow path driven with a virtual clock: two machines, A and B, hand each other what they
//! transmit; the tests play the workers' part (opening data, promoting a confirmed key) by hand.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use super::{Input, Output, SlowPath, TICK, UNDER_LOAD_QUEUE, accept::MIN_INITIATION_INTERVAL, ping::PING_TIMEOUT};
use crate::{
    device::{Clock, CoordinatorRequest, Counters, Device, Event, KeySet, Peer, PeerSpec, PeerTable, Via},
    identity::Identity,
    protocol::{
        discovery::NatKind,
        noise::{CookieJar, InitiatorHandshake, LocalStatic, Tai64n},
        probe, punch,
        session::REKEY_TIMEOUT,
        wire::{self, Kind},
    },
};

const KEY_1: [u8; 32] = [1; 32];
const KEY_2: [u8; 32] = [2; 32];

struct Node {
    name: &'static str,
    addr: SocketAddr,
    identity: Identity,
    dev: Arc<Device>,
    sp: SlowPath,
    /// What the workers would have sent to the slow path (kept open so sends succeed).
    _events: crossbeam_channel::Receiver<Event>,
}

impl Node {
    fn new(name: &'static str, addr: &str, t0: Instant) -> Self {
        let (identity, _) = Identity::generate(&format!("root@{name}"));
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let (inbox, _) = std::os::unix::net::UnixDatagram::pair().expect("a socket pair");
        let addr: SocketAddr = addr.parse().unwrap();
        let dev = Arc::new(Device {
            interface: format!("tm-{name}"),
            mtu: 1420,
            offloads: crate::sys::tun::Offloads::Off,
            listen_port: addr.port(),
            local: identity.public().clone(),
            addresses: Vec::new(),
            policy: crate::device::policy::PolicyEnforcer::none(),
            peers: ArcSwap::from_pointee(PeerTable::default()),
            mesh_keys: ArcSwap::from_pointee(vec![Zeroizing::new(KEY_1)]),
            sessions: ArcSwap::from_pointee(HashMap::new()),
            counters: Counters::default(),
            clock: Clock::new(t0),
            events: tx,
            shutdown: Default::default(),
            started: t0,
            coordinator: Default::default(),
            reach: Default::default(),
            overlay_inbox: inbox,
        });
        let sp = SlowPath::new(dev.clone(), local_static(&identity), 2, t0);
        Node {
            name,
            addr,
            identity,
            dev,
            sp,
            _events: rx,
        }
    }

    fn knows(&self, other: &Node) {
        self.knows_as(other, NatKind::None, Vec::new());
    }

    fn knows_as(&self, other: &Node, nat: NatKind, candidates: Vec<SocketAddr>) {
        let spec = PeerSpec {
            name: other.name.into(),
            identity: other.identity.public().clone(),
            allowed_ips: Vec::new(),
            endpoint: Some(other.addr),
            ssh_endpoint: None,
            persistent_keepalive: None,
            candidates,
            nat,
        };
        let table = PeerTable::build(vec![spec], &self.dev.peers.load());
        self.dev.peers.store(Arc::new(table));
    }

    fn peer(&self, other: &Node) -> Arc<Peer> {
        self.dev
            .peers
            .load()
            .get(other.identity.public().noise_public())
            .expect("a configured peer")
            .clone()
    }

    fn set_mesh_keys(&self, keys: &[[u8; 32]]) {
        self.dev
            .mesh_keys
            .store(Arc::new(keys.iter().map(|k| Zeroizing::new(*k)).collect()));
    }

    fn handle(&mut self, input: Input, now: Instant) -> Vec<Output> {
        self.sp.handle(input, now)
    }

    fn event(&mut self, event: Event, now: Instant) -> Vec<Output> {
        self.handle(Input::Event(event), now)
    }

    /// `msg` arrived from `from` over UDP.
    fn receive(&mut self, from: &Node, msg: Vec<u8>, now: Instant) -> Vec<Output> {
        let via = Via::Udp(from.addr);
        self.event(Event::Handshake { msg, via }, now)
    }

    fn counter(&self, pick: impl Fn(&Counters) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(&self.dev.counters).load(Ordering::Relaxed)
    }
}

fn local_static(identity: &Identity) -> LocalStatic {
    LocalStatic {
        secret: Zeroizing::new(*identity.noise_secret()),
        public: *identity.public().noise_public(),
    }
}

fn pair(t0: Instant) -> (Node, Node) {
    let a = Node::new("a", "198.18.0.1:51820", t0);
    let b = Node::new("b", "198.18.0.2:51820", t0);
    a.knows(&b);
    b.knows(&a);
    (a, b)
}

/// The messages transmitted, in order.
fn transmits(out: &[Output]) -> Vec<(Via, Vec<u8>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Transmit { via, msg } => Some((*via, msg.clone())),
            _ => None,
        })
        .collect()
}

/// The one message of kind `kind` transmitted.
fn only(out: &[Output], kind: Kind) -> Vec<u8> {
    let mut found: Vec<Vec<u8>> = transmits(out)
        .into_iter()
        .filter(|(_, m)| wire::classify(m) == Ok(kind))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind:?} in {out:?}");
    found.remove(0)
}

fn shield_changes(out: &[Output]) -> Vec<(u32, bool)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ShieldIndex { index, live } => Some((*index, *live)),
            _ => None,
        })
        .collect()
}

/// An initiation from `from` to `to` with an explicit timestamp, stamped with mac1.
fn crafted_initiation(from: &Node, to: &Node, psk: &[u8; 32], index: u32, at: Duration, now: Instant) -> Vec<u8> {
    let (_, mut msg) = InitiatorHandshake::start(
        &local_static(&from.identity),
        &Zeroizing::new(*psk),
        to.identity.public().noise_public(),
        index,
        Tai64n::from_unix(at),
    );
    CookieJar::new(to.identity.public().noise_public()).stamp(&mut msg, now);
    msg.to_vec()
}

/// What a worker does on the first data message on a responder key: promote it, tell the
/// slow path.
fn confirm_next_key(node: &mut Node, peer: &Arc<Peer>, now: Instant) -> Vec<Output> {
    let keys = peer.keys.load_full();
    peer.keys.store(Arc::new(KeySet {
        current: keys.next.clone(),
        previous: keys.current.clone(),
        next: None,
    }));
    node.event(Event::KeyConfirmed(peer.clone()), now)
}

/// A ↔ B handshake initiated by A, B's key confirmed; returns A's new receiver index.
fn establish(a: &mut Node, b: &mut Node, t0: Instant) -> u32 {
    a.sp.initiate(&a.peer(b), t0);
    let out = std::mem::take(&mut a.sp.out);
    let init = only(&out, Kind::Initiation);
    let out = b.receive(a, init, t0);
    let response = only(&out, Kind::Response);
    let out = a.receive(b, response, t0);
    only(&out, Kind::Data);
    let peer_a = b.peer(a);
    confirm_next_key(b, &peer_a, t0);
    a.peer(b).keys.load().current.as_ref().expect("a session").local_index
}

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
