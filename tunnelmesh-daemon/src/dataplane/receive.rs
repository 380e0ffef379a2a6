//! Inbound: open data messages in place, take them as proof of the path and the key, check each
//! inner source and the policy.
//!
//! Consecutive data messages of one receive batch to the same session over the same path (with
//! UDP GRO, the datagrams of one buffer nearly always are) form a [`Run`]: the session is looked
//! up once, its replay window is locked once, and what the messages prove about the peer — a
//! confirmed key, its endpoint, the worker that sees it, its activity, the bytes it sent — is
//! recorded once when the run ends. Each message is still opened, replay-checked and judged on
//! its own.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use crate::{
    device::{ActivityStamps, Counters, Device, Event, IndexEntry, KeySet, PeerTable, Via},
    protocol::{
        ip::IpHeader,
        probe,
        session::{DecryptError, Receiving},
        wire,
    },
};

/// Data messages to one session over one path, opened one after another.
pub(crate) struct Run<'a> {
    entry: &'a IndexEntry,
    via: Via,
    rx: Receiving<'a>,
    /// Some message of the run authenticated.
    authenticated: bool,
    /// Some message of the run carried an IP packet.
    data: bool,
    /// Bytes of inner packets delivered.
    bytes: u64,
    /// The inner source last found to be the peer's (a stream's packets all share one).
    source: Option<IpAddr>,
}

impl<'a> Run<'a> {
    pub fn new(entry: &'a IndexEntry, via: Via) -> Self {
        Run {
            entry,
            via,
            rx: entry.keypair.receiving(),
            authenticated: false,
            data: false,
            bytes: 0,
            source: None,
        }
    }

    /// Whether a data message naming `index` that arrived `via` belongs to this run.
    pub fn continues(&self, index: u32, via: Via) -> bool {
        self.entry.keypair.local_index == index && self.via == via
    }

    /// Open one data message of the run; the length of its inner packet if that may be
    /// delivered (its source belongs to the sender and the policy lets it in). The packet starts
    /// at `msg[DATA_HEADER_LEN]`.
    #[inline]
    pub fn open(&mut self, dev: &Device, table: &PeerTable, msg: &mut [u8], now: Instant) -> Option<usize> {
        let counters = &dev.counters;
        let drop = |counter: &std::sync::atomic::AtomicU64| {
            Counters::bump(counter);
            None
        };
        let plain_len = match self.rx.open(msg, now) {
            Ok((len, _)) => len,
            Err(DecryptError::Replay) => return drop(&counters.rx_replayed),
            Err(DecryptError::Auth) => return drop(&counters.rx_auth_failed),
            Err(DecryptError::Expired) => return drop(&counters.rx_unknown_index),
        };
        self.authenticated = true;
        if plain_len == 0 {
            return None; // keepalive
        }
        let peer = &self.entry.peer;
        let plain = &msg[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + plain_len];
        if plain[0] >> 4 == 0 {
            // Not IP: a path probe, or nothing.
            match probe::decode(plain) {
                Some((reply, nonce)) => {
                    let _ = dev.events.try_send(Event::Probe {
                        peer: peer.clone(),
                        via: self.via,
                        reply,
                        nonce,
                    });
                }
                None => Counters::bump(&counters.rx_bad_inner),
            }
            return None;
        }
        self.data = true;
        let Some(header) = IpHeader::parse(plain) else {
            return drop(&counters.rx_bad_inner);
        };
        if self.source != Some(header.src) {
            if !table.route(header.src).is_some_and(|owner| Arc::ptr_eq(owner, peer)) {
                return drop(&counters.rx_spoofed_source);
            }
            self.source = Some(header.src);
        }
        if !dev.policy.inbound_allowed(&header, plain, now) {
            return None;
        }
        self.bytes += header.len as u64;
        Some(header.len)
    }

    /// Record what the run proved about the peer (nothing, if no message authenticated).
    pub fn finish(self, dev: &Device, worker: usize, now: Instant) {
        if !self.authenticated {
            return;
        }
        let (entry, peer) = (self.entry, &self.entry.peer);
        drop(self.rx); // the window is not needed for what follows
        // First data on a responder key confirms it: promote it to current.
        let keys = peer.keys.load();
        if keys.next.as_ref().is_some_and(|k| Arc::ptr_eq(k, &entry.keypair)) {
            peer.keys.rcu(|ks| {
                if ks.next.as_ref().is_some_and(|k| Arc::ptr_eq(k, &entry.keypair)) {
                    KeySet {
                        current: ks.next.clone(),
                        previous: ks.current.clone(),
                        next: None,
                    }
                } else {
                    (**ks).clone()
                }
            });
            let _ = dev.events.try_send(Event::KeyConfirmed(peer.clone()));
        }
        // Authenticated roaming: the UDP endpoint follows the last authenticated datagram.
        if let Via::Udp(src) = self.via
            && peer.endpoint.load().as_deref() != Some(&src)
        {
            peer.endpoint.store(Some(Arc::new(src)));
        }
        let bit = 1u64 << (worker % 64);
        if peer.rx_workers.load(Ordering::Relaxed) & bit == 0 {
            peer.rx_workers.fetch_or(bit, Ordering::Relaxed);
        }
        let stamp = dev.clock.stamp(now);
        ActivityStamps::touch(&peer.activity.any_received, stamp);
        ActivityStamps::touch(&peer.rx_via[self.via.kind() as usize], stamp);
        if self.data {
            ActivityStamps::touch(&peer.activity.data_received, stamp);
        }
        if self.bytes > 0 {
            peer.rx_bytes.fetch_add(self.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::atomic::AtomicU64};

    use super::*;
    use crate::{
        policy::cases::{Frag, L4, packet},
        protocol::{discovery::NatKind, session::sealed_len},
        slowpath::testbed::{Node, establish, pair},
    };

    /// A data message from `a` to `b` on a's current key carrying `inner`.
    fn sealed(a: &Node, b: &Node, inner: &[u8], now: Instant) -> Vec<u8> {
        let key = a.peer(b).keys.load().current.clone().expect("a session");
        let mut msg = vec![0u8; sealed_len(inner.len())];
        msg[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + inner.len()].copy_from_slice(inner);
        let n = key.seal(&mut msg, inner.len(), now).unwrap();
        msg.truncate(n);
        msg
    }

    fn count(b: &Node, pick: fn(&Counters) -> &AtomicU64) -> u64 {
        pick(&b.dev.counters).load(Ordering::Relaxed)
    }

    #[test]
    fn a_run_judges_each_message_and_records_what_it_proved_once() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0);
        // b knows 100.64.0.1 as a's; 100.64.0.7 is nobody's.
        b.knows_routing(&a, NatKind::None, Vec::new(), vec!["100.64.0.1/32".parse().unwrap()]);
        establish(&mut a, &mut b, t0);
        let from_a = packet(1, 2, false, L4::Udp(1000, 2000), Frag::None);
        let good = sealed(&a, &b, &from_a, t0);
        let second = sealed(&a, &b, &from_a, t0);
        let mut forged = sealed(&a, &b, &from_a, t0);
        forged[20] ^= 1;
        let spoofed = sealed(&a, &b, &packet(7, 2, false, L4::Udp(1000, 2000), Frag::None), t0);
        let keepalive = sealed(&a, &b, &[], t0);
        let run_of = [&good, &second, &good, &forged, &spoofed, &keepalive];

        let peer = b.peer(&a);
        let roamed: SocketAddr = "198.18.0.9:40000".parse().unwrap();
        let sessions = b.dev.sessions.load();
        let table = b.dev.peers.load();
        let index = wire::receiver_index(&good);
        let entry = sessions.get(&index).expect("b's session");
        let mut run = Run::new(entry, Via::Udp(roamed));
        assert!(run.continues(index, Via::Udp(roamed)));
        assert!(!run.continues(index, Via::Udp(a.addr)), "another path is another run");
        assert!(
            !run.continues(index ^ 1, Via::Udp(roamed)),
            "another session is another run"
        );
        let opened: Vec<Option<usize>> = run_of
            .iter()
            .map(|m| run.open(&b.dev, &table, &mut m.to_vec(), t0))
            .collect();
        let len = from_a.len();
        assert_eq!(opened, [Some(len), Some(len), None, None, None, None]);
        assert_eq!(count(&b, |c| &c.rx_replayed), 1);
        assert_eq!(count(&b, |c| &c.rx_auth_failed), 1);
        assert_eq!(count(&b, |c| &c.rx_spoofed_source), 1);
        // Nothing about the peer is recorded before the run ends …
        assert_eq!(peer.rx_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(**peer.endpoint.load().as_ref().unwrap(), a.addr);
        let later = t0 + std::time::Duration::from_secs(3);
        run.finish(&b.dev, 3, later);
        // … and then once: the bytes delivered, the new endpoint, the worker, the activity.
        assert_eq!(peer.rx_bytes.load(Ordering::Relaxed), 2 * len as u64);
        assert_eq!(**peer.endpoint.load().as_ref().unwrap(), roamed);
        assert_eq!(peer.rx_workers.load(Ordering::Relaxed), 1 << 3);
        let stamp = b.dev.clock.stamp(later);
        assert_eq!(peer.activity.data_received.load(Ordering::Relaxed), stamp);
        assert_eq!(peer.activity.any_received.load(Ordering::Relaxed), stamp);
        // The window outlives the run: the run's messages stay spent.
        let mut again = good.clone();
        assert_eq!(entry.keypair.open(&mut again, later), Err(DecryptError::Replay));
    }

    #[test]
    fn a_run_of_forgeries_proves_nothing() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0);
        establish(&mut a, &mut b, t0);
        let mut forged = sealed(&a, &b, &[], t0);
        forged[17] ^= 0x40;
        let sessions = b.dev.sessions.load();
        let table = b.dev.peers.load();
        let entry = sessions.get(&wire::receiver_index(&forged)).expect("b's session");
        let elsewhere: SocketAddr = "198.18.0.66:1".parse().unwrap();
        let peer = b.peer(&a);
        let heard = peer.activity.any_received.load(Ordering::Relaxed);
        let later = t0 + std::time::Duration::from_secs(3);
        let mut run = Run::new(entry, Via::Udp(elsewhere));
        for _ in 0..3 {
            assert_eq!(run.open(&b.dev, &table, &mut forged.clone(), later), None);
        }
        run.finish(&b.dev, 5, later);
        assert_eq!(count(&b, |c| &c.rx_auth_failed), 3);
        assert_eq!(
            **peer.endpoint.load().as_ref().unwrap(),
            a.addr,
            "no roaming on a forgery"
        );
        assert_eq!(peer.rx_workers.load(Ordering::Relaxed) & 1 << 5, 0);
        assert_eq!(peer.activity.any_received.load(Ordering::Relaxed), heard);
    }
}
