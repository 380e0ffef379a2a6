//! Targets for the handshake and data paths on live machines: two slow paths with fixed keys
//! (`slowpath::testbed`) exchange what they transmit under a virtual clock while the input
//! decides which message goes next, how it is damaged, what is injected and when time passes.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use arbitrary::{Arbitrary, Unstructured};

use crate::{
    dataplane::receive::Run,
    device::{Event, Via},
    policy::cases,
    protocol::{
        discovery::NatKind,
        session::sealed_len,
        wire::{self, Kind},
    },
    slowpath::{
        Input, Output,
        testbed::{Node, establish},
    },
};

/// One step of a handshake session.
#[derive(Debug, Arbitrary)]
enum Step {
    /// A (or B) wants a session with the other.
    Initiate { by_b: bool },
    /// Deliver the in-flight message `pick` (modulo how many there are), damaged or not.
    Deliver { pick: u8, damage: Damage },
    /// Bytes from the other machine's address, whatever they are.
    Inject { to_b: bool, msg: Vec<u8> },
    /// A message of `kind` with the right size and header and the rest from the input.
    Shaped { to_b: bool, kind: u8, body: Vec<u8> },
    /// Time passes and both machines tick.
    Wait { millis: u16 },
    /// The slow path's queue holds `queued` events (at 64 and above it answers with cookies).
    Load { on_b: bool, queued: u8 },
}

#[derive(Debug, Arbitrary)]
enum Damage {
    None,
    Flip {
        at: u16,
        mask: u8,
    },
    Truncate {
        to: u16,
    },
    /// Delivered twice (a replay).
    Twice,
}

/// The network between A and B: what each transmitted, addressed to the other.
struct Net {
    in_flight: Vec<(bool, Vec<u8>)>,
}

impl Net {
    fn take(&mut self, from_b: bool, out: Vec<Output>) {
        for o in out {
            if let Output::Transmit { msg, .. } = o {
                // Bounded: a flood of transmits is the slow path's to prevent, not ours to hold.
                if self.in_flight.len() < 256 {
                    self.in_flight.push((!from_b, msg));
                }
            }
        }
    }
}

/// `msg` arrives at `to` from `from` over UDP, handled as the worker and the slow path do:
/// data is opened by the worker's code (which may confirm a key and tell the slow path),
/// handshake messages go to the slow path; the events the workers raised are then handled.
fn arrive(to: &mut Node, from_addr: std::net::SocketAddr, mut msg: Vec<u8>, now: Instant) -> Vec<Output> {
    let via = Via::Udp(from_addr);
    let mut out = Vec::new();
    match wire::classify(&msg) {
        Ok(Kind::Data) => {
            let sessions = to.dev.sessions.load();
            match sessions.get(&wire::receiver_index(&msg)) {
                Some(entry) => {
                    let table = to.dev.peers.load();
                    let mut run = Run::new(entry, via);
                    let _ = run.open(&to.dev, &table, &mut msg, now);
                    run.finish(&to.dev, 0, now);
                }
                None => {
                    let _ = to.dev.events.try_send(Event::StaleSession(via));
                }
            }
        }
        Ok(Kind::Stun) | Err(_) => {}
        Ok(_) => out.extend(to.sp.handle(Input::Event(Event::Handshake { msg, via }), now)),
    }
    while let Ok(event) = to.events.try_recv() {
        out.extend(to.sp.handle(Input::Event(event), now));
    }
    out
}

/// Handshakes, cookie replies under load, retransmits, rekeys and stale sessions between two
/// machines with fixed keys, in the order and shape the input decides.
pub fn handshake(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let t0 = Instant::now();
    let mut now = t0;
    let mut a = Node::new("a", "198.18.0.1:51820", t0);
    let mut b = Node::new("b", "198.18.0.2:51820", t0);
    a.knows(&b);
    b.knows(&a);
    let mut net = Net { in_flight: Vec::new() };
    for _ in 0..64 {
        let Ok(step) = Step::arbitrary(&mut u) else { break };
        match step {
            Step::Initiate { by_b } => {
                let (me, other) = if by_b { (&mut b, &a) } else { (&mut a, &b) };
                let out = me.event(Event::NeedSession(me.peer(other)), now);
                net.take(by_b, out);
            }
            Step::Deliver { pick, damage } => {
                if net.in_flight.is_empty() {
                    continue;
                }
                let (to_b, mut msg) = net.in_flight.remove(usize::from(pick) % net.in_flight.len());
                let times = match damage {
                    Damage::None => 1,
                    Damage::Flip { at, mask } => {
                        let at = usize::from(at) % msg.len().max(1);
                        if let Some(byte) = msg.get_mut(at) {
                            *byte ^= mask;
                        }
                        1
                    }
                    Damage::Truncate { to } => {
                        msg.truncate(usize::from(to));
                        1
                    }
                    Damage::Twice => 2,
                };
                for _ in 0..times {
                    let (me, from) = if to_b { (&mut b, a.addr) } else { (&mut a, b.addr) };
                    let out = arrive(me, from, msg.clone(), now);
                    net.take(to_b, out);
                }
            }
            Step::Inject { to_b, msg } => {
                let (me, from) = if to_b { (&mut b, a.addr) } else { (&mut a, b.addr) };
                let out = arrive(me, from, msg, now);
                net.take(to_b, out);
            }
            Step::Shaped { to_b, kind, body } => {
                let kind = kind % 4 + 1;
                let len = match kind {
                    wire::MSG_INITIATION => wire::INITIATION_LEN,
                    wire::MSG_RESPONSE => wire::RESPONSE_LEN,
                    wire::MSG_COOKIE_REPLY => wire::COOKIE_REPLY_LEN,
                    _ => sealed_len(body.len().min(1500)),
                };
                let mut msg = vec![0u8; len];
                msg[0] = kind;
                let n = body.len().min(len - 4);
                msg[4..4 + n].copy_from_slice(&body[..n]);
                let (me, from) = if to_b { (&mut b, a.addr) } else { (&mut a, b.addr) };
                let out = arrive(me, from, msg, now);
                net.take(to_b, out);
            }
            Step::Wait { millis } => {
                now += Duration::from_millis(u64::from(millis) * 16);
                let out = a.handle(Input::Tick, now);
                net.take(false, out);
                let out = b.handle(Input::Tick, now);
                net.take(true, out);
            }
            Step::Load { on_b, queued } => {
                let me = if on_b { &mut b } else { &mut a };
                me.sp.set_backlog(usize::from(queued));
            }
        }
    }
}

/// One step on an established session, B receiving.
#[derive(Debug, Arbitrary)]
enum DataStep {
    /// A seals an inner packet (from its own mesh address or not) on its current key and B
    /// opens it, damaged or not.
    Packet { inner: Inner, damage: Damage },
    /// Raw bytes under B's live receiver index.
    Raw { body: Vec<u8> },
    /// A message A sealed earlier, again.
    Replay { pick: u8 },
    /// Time passes (past the key's lifetime, eventually).
    Wait { secs: u8 },
}

#[derive(Debug, Arbitrary)]
enum Inner {
    /// tcp/443 from A's mesh address to B's (the policy allows it).
    Https { v6: bool },
    /// A packet from the shared policy table's builder with fuzzed fields.
    Built {
        src: u8,
        dst: u8,
        v6: bool,
        proto: u8,
        port: u16,
    },
    /// Bytes as they come (a probe, a keepalive, anything).
    Bytes(Vec<u8>),
}

/// The data path on a live session: counters, the replay window, key expiry, probes, the
/// inner-source check and the policy, with B enforcing the shared table's policy for `web`.
pub fn data(input: &[u8]) {
    let mut u = Unstructured::new(input);
    let t0 = Instant::now();
    let mut now = t0;
    let mut a = Node::new("laptop", "198.18.0.1:51820", t0);
    let mut b = Node::new("web", "198.18.0.2:51820", t0);
    let laptop = &cases::members()[usize::from(cases::LAPTOP) - 1];
    b.knows_routing(&a, NatKind::None, Vec::new(), laptop.addresses.clone());
    a.knows(&b);
    b.dev.policy.set(cases::web_policy());
    establish(&mut a, &mut b, t0);
    let key = a.peer(&b).keys.load().current.clone().expect("a session");
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let delivered_before = b
        .dev
        .peers
        .load()
        .get(a.identity.public().noise_public())
        .map(|p| p.rx_bytes.load(Ordering::Relaxed));
    for _ in 0..64 {
        let Ok(step) = DataStep::arbitrary(&mut u) else { break };
        let msg = match step {
            DataStep::Packet { inner, damage } => {
                let plain = match inner {
                    Inner::Https { v6 } => cases::packet(
                        cases::LAPTOP,
                        cases::WEB,
                        v6,
                        cases::L4::Tcp(40000, 443),
                        cases::Frag::None,
                    ),
                    Inner::Built {
                        src,
                        dst,
                        v6,
                        proto,
                        port,
                    } => {
                        let l4 = match proto % 4 {
                            0 => cases::L4::Tcp(port, port),
                            1 => cases::L4::Udp(port, port),
                            2 => cases::L4::Icmp(port as u8, port),
                            _ => cases::L4::Proto(proto),
                        };
                        cases::packet(src % 4, dst % 4, v6, l4, cases::Frag::None)
                    }
                    Inner::Bytes(b) => b,
                };
                let plain = &plain[..plain.len().min(1500)];
                let mut buf = vec![0u8; sealed_len(plain.len())];
                buf[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + plain.len()].copy_from_slice(plain);
                let Ok(len) = key.seal(&mut buf, plain.len(), now) else {
                    continue;
                };
                buf.truncate(len);
                sent.push(buf.clone());
                match damage {
                    Damage::None | Damage::Twice => {}
                    Damage::Flip { at, mask } => {
                        let i = usize::from(at) % buf.len();
                        buf[i] ^= mask;
                    }
                    Damage::Truncate { to } => buf.truncate(usize::from(to)),
                }
                buf
            }
            DataStep::Raw { body } => {
                let mut msg = vec![0u8; wire::DATA_HEADER_LEN];
                msg[0] = wire::MSG_DATA;
                msg[4..8].copy_from_slice(&key.remote_index.to_le_bytes());
                msg.extend_from_slice(&body);
                msg
            }
            DataStep::Replay { pick } => match sent.get(usize::from(pick) % sent.len().max(1)) {
                Some(m) => m.clone(),
                None => continue,
            },
            DataStep::Wait { secs } => {
                now += Duration::from_secs(u64::from(secs) * 4);
                continue;
            }
        };
        let _ = arrive(&mut b, a.addr, msg, now);
    }
    // Whatever was delivered was counted on the one peer it came from.
    let delivered_after = b
        .dev
        .peers
        .load()
        .get(a.identity.public().noise_public())
        .map(|p| p.rx_bytes.load(Ordering::Relaxed));
    assert!(delivered_after >= delivered_before);
}
