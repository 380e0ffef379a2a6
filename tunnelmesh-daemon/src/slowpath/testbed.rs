//! Two slow paths driven against each other with a virtual clock, for the tests and the fuzz
//! targets: machines A and B hand each other what they transmit; the caller plays the workers'
//! part (opening data, promoting a confirmed key) by hand.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use super::{Input, Output, SlowPath};
use crate::{
    device::{Clock, Counters, Device, Event, InterfaceInfo, KeySet, Peer, PeerSpec, PeerTable, Via},
    identity::Identity,
    protocol::{
        discovery::NatKind,
        noise::{CookieJar, InitiatorHandshake, LocalStatic, Tai64n},
        wire::{self, Kind},
    },
};

pub const KEY_1: [u8; 32] = [1; 32];
pub const KEY_2: [u8; 32] = [2; 32];

pub struct Node {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub identity: Identity,
    pub dev: Arc<Device>,
    pub sp: SlowPath,
    /// What the workers would have sent to the slow path (kept open so sends succeed).
    pub events: crossbeam_channel::Receiver<Event>,
}

impl Node {
    pub fn new(name: &'static str, addr: &str, t0: Instant) -> Self {
        let mut seed = [0u8; 32];
        seed[..name.len().min(32)].copy_from_slice(&name.as_bytes()[..name.len().min(32)]);
        let identity = Identity::from_seed(seed, &format!("root@{name}"));
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let (inbox, _) = std::os::unix::net::UnixDatagram::pair().expect("a socket pair");
        let addr: SocketAddr = addr.parse().unwrap();
        let dev = Arc::new(Device {
            info: InterfaceInfo {
                interface: format!("tm-{name}"),
                mtu: 1420,
                offloads: crate::sys::tun::Offloads::Off,
                listen_port: addr.port(),
                local: identity.public().clone(),
                addresses: Vec::new(),
                ipv6: true,
                started: t0,
            },
            policy: crate::device::policy::PolicyEnforcer::none(),
            peers: ArcSwap::from_pointee(PeerTable::default()),
            mesh_keys: ArcSwap::from_pointee(vec![Zeroizing::new(KEY_1)]),
            sessions: ArcSwap::from_pointee(HashMap::new()),
            counters: Counters::default(),
            clock: Clock::new(t0),
            events: tx,
            shutdown: Default::default(),
            coordinator: Default::default(),
            reach: Default::default(),
            overlay_inbox: inbox,
            heartbeats: crate::service::Heartbeats::new(1),
        });
        let sp = SlowPath::new(dev.clone(), local_static(&identity), 2, t0);
        Node {
            name,
            addr,
            identity,
            dev,
            sp,
            events: rx,
        }
    }

    pub fn knows(&self, other: &Node) {
        self.knows_as(other, NatKind::None, Vec::new());
    }

    pub fn knows_as(&self, other: &Node, nat: NatKind, candidates: Vec<SocketAddr>) {
        self.knows_routing(other, nat, candidates, Vec::new());
    }

    /// `other` is this node's one peer, and owns `allowed_ips` on the mesh.
    pub fn knows_routing(
        &self,
        other: &Node,
        nat: NatKind,
        candidates: Vec<SocketAddr>,
        allowed_ips: Vec<ipnet::IpNet>,
    ) {
        let spec = PeerSpec {
            name: other.name.into(),
            identity: other.identity.public().clone(),
            allowed_ips,
            endpoint: Some(other.addr),
            ssh_endpoint: None,
            persistent_keepalive: None,
            candidates,
            nat,
        };
        let table = PeerTable::build(vec![spec], &self.dev.peers.load());
        self.dev.peers.store(Arc::new(table));
    }

    pub fn peer(&self, other: &Node) -> Arc<Peer> {
        self.dev
            .peers
            .load()
            .get(other.identity.public().noise_public())
            .expect("a configured peer")
            .clone()
    }

    pub fn set_mesh_keys(&self, keys: &[[u8; 32]]) {
        self.dev
            .mesh_keys
            .store(Arc::new(keys.iter().map(|k| Zeroizing::new(*k)).collect()));
    }

    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Output> {
        self.sp.handle(input, now)
    }

    pub fn event(&mut self, event: Event, now: Instant) -> Vec<Output> {
        self.handle(Input::Event(event), now)
    }

    /// `msg` arrived from `from` over UDP.
    pub fn receive(&mut self, from: &Node, msg: Vec<u8>, now: Instant) -> Vec<Output> {
        let via = Via::Udp(from.addr);
        self.event(Event::Handshake { msg, via }, now)
    }

    pub fn counter(&self, pick: impl Fn(&Counters) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(&self.dev.counters).load(Ordering::Relaxed)
    }
}

pub fn local_static(identity: &Identity) -> LocalStatic {
    LocalStatic {
        secret: Zeroizing::new(*identity.noise_secret()),
        public: *identity.public().noise_public(),
    }
}

pub fn pair(t0: Instant) -> (Node, Node) {
    let a = Node::new("a", "198.18.0.1:51820", t0);
    let b = Node::new("b", "198.18.0.2:51820", t0);
    a.knows(&b);
    b.knows(&a);
    (a, b)
}

/// The messages transmitted, in order.
pub fn transmits(out: &[Output]) -> Vec<(Via, Vec<u8>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Transmit { via, msg } => Some((*via, msg.clone())),
            _ => None,
        })
        .collect()
}

/// The one message of kind `kind` transmitted.
pub fn only(out: &[Output], kind: Kind) -> Vec<u8> {
    let mut found: Vec<Vec<u8>> = transmits(out)
        .into_iter()
        .filter(|(_, m)| wire::classify(m) == Ok(kind))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind:?} in {out:?}");
    found.remove(0)
}

pub fn shield_changes(out: &[Output]) -> Vec<(u32, bool)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ShieldIndex { index, live } => Some((*index, *live)),
            _ => None,
        })
        .collect()
}

/// An initiation from `from` to `to` with an explicit timestamp, stamped with mac1.
pub fn crafted_initiation(from: &Node, to: &Node, psk: &[u8; 32], index: u32, at: Duration, now: Instant) -> Vec<u8> {
    let mut jar = CookieJar::new(to.identity.public().noise_public());
    crafted_initiation_stamped(from, to, psk, index, at, &mut jar, now)
}

/// [`crafted_initiation`], its macs stamped by `jar` (which may hold a cookie from `to`).
pub fn crafted_initiation_stamped(
    from: &Node,
    to: &Node,
    psk: &[u8; 32],
    index: u32,
    at: Duration,
    jar: &mut CookieJar,
    now: Instant,
) -> Vec<u8> {
    let (_, mut msg) = InitiatorHandshake::start(
        &local_static(&from.identity),
        &Zeroizing::new(*psk),
        to.identity.public().noise_public(),
        index,
        Tai64n::from_unix(at),
    );
    jar.stamp(&mut msg, now);
    msg.to_vec()
}

/// What a worker does on the first data message on a responder key: promote it, tell the
/// slow path.
pub fn confirm_next_key(node: &mut Node, peer: &Arc<Peer>, now: Instant) -> Vec<Output> {
    let keys = peer.keys.load_full();
    peer.keys.store(Arc::new(KeySet {
        current: keys.next.clone(),
        previous: keys.current.clone(),
        next: None,
    }));
    node.event(Event::KeyConfirmed(peer.clone()), now)
}

/// A ↔ B handshake initiated by A, B's key confirmed; returns A's new receiver index.
pub fn establish(a: &mut Node, b: &mut Node, t0: Instant) -> u32 {
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
