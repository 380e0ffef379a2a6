//! One data-plane worker: the hot loop.

use std::{
    net::{SocketAddr, UdpSocket},
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixDatagram,
    },
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tracing::{debug, error};

use super::BATCH;
use crate::{
    device::{
        ActivityStamps, Counters, Device, Event, INBOX_HEADER, IndexEntry, KeySet, PathKind, PeerTable, Via, probe,
    },
    routing::inner_addrs,
    session::{DecryptError, sealed_len},
    sys::{mmsg::Batch, poll, tun},
    wire::{self, Kind},
};

/// How long a worker sleeps in `poll` before rechecking the shutdown flag.
const POLL_TIMEOUT: Duration = Duration::from_millis(200);
/// At most one "stale session" hint per worker per this interval.
const STALE_HINT_INTERVAL: Duration = Duration::from_millis(500);

/// What handling one received message needs, apart from the buffers it lives in.
struct Ctx {
    dev: Arc<Device>,
    tun: OwnedFd,
    last_stale_hint: Option<Instant>,
}

pub struct Worker {
    ctx: Ctx,
    udp: UdpSocket,
    /// Messages that arrived on SSH connections or the relay (shared by all workers).
    inbox: UnixDatagram,
    inbox_buf: Vec<u8>,
    rx: Batch,
    tx: Batch,
}

impl Worker {
    pub fn new(dev: Arc<Device>, tun: OwnedFd, udp: UdpSocket, inbox: UnixDatagram) -> Self {
        let slot = sealed_len(dev.mtu) + 64;
        Worker {
            rx: Batch::new(BATCH, slot),
            tx: Batch::new(BATCH, slot),
            inbox_buf: vec![0u8; slot + INBOX_HEADER],
            inbox,
            ctx: Ctx {
                dev,
                tun,
                last_stale_hint: None,
            },
            udp,
        }
    }

    pub fn run(mut self) {
        while !self.ctx.dev.shutdown.load(Ordering::Relaxed) {
            let fds = [self.ctx.tun.as_fd(), self.udp.as_fd(), self.inbox.as_fd()];
            let ready = match poll::readable(fds, POLL_TIMEOUT) {
                Ok(r) => r,
                Err(e) => {
                    error!("worker poll failed: {e}");
                    return;
                }
            };
            if ready[1] {
                self.receive();
            }
            if ready[2] {
                self.receive_overlay();
            }
            if ready[0] {
                self.transmit();
            }
        }
    }

    /// TUN → network: read a burst, seal in place, send as one batch.
    fn transmit(&mut self) {
        let mtu = self.ctx.dev.mtu;
        loop {
            let now = Instant::now();
            let table = self.ctx.dev.peers.load();
            let mut n = 0;
            while n < BATCH {
                let buf = self.tx.buf_mut(n);
                let len = match tun::read(
                    &self.ctx.tun,
                    &mut buf[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + mtu],
                ) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        error!("reading the TUN device failed: {e}");
                        break;
                    }
                };
                if let Some((sealed, dst)) = seal_outbound(&self.ctx.dev, &table, self.tx.buf_mut(n), len, now) {
                    self.tx.set_send(n, sealed, dst);
                    n += 1;
                }
            }
            if n > 0 {
                let outcome = self.tx.send(self.udp.as_fd(), n);
                if outcome.failed > 0 {
                    self.ctx
                        .dev
                        .counters
                        .tx_send_failed
                        .fetch_add(outcome.failed as u64, Ordering::Relaxed);
                    debug!("{} of {n} datagrams not sent: {:?}", outcome.failed, outcome.last_error);
                }
            }
            if n < BATCH {
                return;
            }
        }
    }

    /// Network → TUN: receive a batch, open each data message in place, deliver.
    fn receive(&mut self) {
        loop {
            let got = match self.rx.recv(self.udp.as_fd()) {
                Ok(n) => n,
                Err(e) => {
                    error!("receiving from the UDP socket failed: {e}");
                    return;
                }
            };
            if got == 0 {
                return;
            }
            let now = Instant::now();
            let sessions = self.ctx.dev.sessions.load();
            let table = self.ctx.dev.peers.load();
            for i in 0..got {
                let (msg, src) = self.rx.packet_mut(i);
                let via = Via::Udp(src);
                self.ctx.dispatch(&table, &sessions, msg, via, now);
            }
            if got < BATCH {
                return;
            }
        }
    }

    /// Messages from SSH connections and the relay: the same handling as UDP datagrams.
    fn receive_overlay(&mut self) {
        for _ in 0..BATCH {
            let Ok(n) = self.inbox.recv(&mut self.inbox_buf) else {
                return;
            };
            if n <= INBOX_HEADER {
                continue;
            }
            let key: [u8; 32] = self.inbox_buf[1..INBOX_HEADER].try_into().expect("32 bytes");
            let via = match PathKind::from_u8(self.inbox_buf[0]) {
                PathKind::Ssh => Via::Ssh(key),
                _ => Via::Relay(key),
            };
            let now = Instant::now();
            let sessions = self.ctx.dev.sessions.load();
            let table = self.ctx.dev.peers.load();
            let msg = &mut self.inbox_buf[INBOX_HEADER..n];
            self.ctx.dispatch(&table, &sessions, msg, via, now);
        }
    }
}

impl Ctx {
    /// Handle one wire message that arrived `via` a path.
    #[inline]
    fn dispatch(
        &mut self,
        table: &PeerTable,
        sessions: &std::collections::HashMap<u32, Arc<IndexEntry>>,
        msg: &mut [u8],
        via: Via,
        now: Instant,
    ) {
        let (dev, tun, last_stale_hint) = (&*self.dev, &self.tun, &mut self.last_stale_hint);
        match wire::classify(msg) {
            Err(_) => Counters::bump(&dev.counters.rx_malformed),
            Ok(Kind::Data) => match sessions.get(&wire::receiver_index(msg)) {
                Some(entry) => open_inbound(dev, table, tun, entry, msg, via, now),
                None => {
                    Counters::bump(&dev.counters.rx_unknown_index);
                    if last_stale_hint.is_none_or(|t| now.duration_since(t) >= STALE_HINT_INTERVAL) {
                        *last_stale_hint = Some(now);
                        let _ = dev.events.try_send(Event::StaleSession(via));
                    }
                }
            },
            Ok(Kind::Stun) => {
                // Only the handshake thread asks STUN questions; it matches the answers.
                if let Via::Udp(from) = via
                    && dev
                        .events
                        .try_send(Event::Stun {
                            msg: msg.to_vec(),
                            from,
                        })
                        .is_err()
                {
                    Counters::bump(&dev.counters.handshake_queue_full);
                }
            }
            Ok(_) => {
                let event = Event::Handshake { msg: msg.to_vec(), via };
                if dev.events.try_send(event).is_err() {
                    Counters::bump(&dev.counters.handshake_queue_full);
                }
            }
        }
    }
}

/// Route and seal one packet read from TUN into `buf[16..16 + len]`; the destination to send to.
#[inline]
fn seal_outbound(
    dev: &Device,
    table: &PeerTable,
    buf: &mut [u8],
    len: usize,
    now: Instant,
) -> Option<(usize, SocketAddr)> {
    let packet = &buf[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + len];
    let Some(peer) = inner_addrs(packet).and_then(|(_, dst, _)| table.route(dst)) else {
        Counters::bump(&dev.counters.tx_no_route);
        return None;
    };
    dev.policy.track_outbound(packet, now);
    let keys = peer.keys.load();
    let Some(key) = keys.current.as_ref().filter(|k| k.can_send(now)) else {
        dev.stage(peer, packet);
        dev.request_session(peer);
        return None;
    };
    let path = peer.path();
    let endpoint = match path {
        PathKind::Udp => match peer.endpoint.load().as_deref().copied() {
            Some(e) => Some(e),
            None => {
                Counters::bump(&dev.counters.tx_dropped);
                return None;
            }
        },
        _ => None,
    };
    let sealed = key.seal(buf, len, now).ok()?;
    let stamp = dev.clock.stamp(now);
    ActivityStamps::touch(&peer.activity.data_sent, stamp);
    ActivityStamps::touch(&peer.activity.any_sent, stamp);
    peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
    match endpoint {
        Some(e) => Some((sealed, e)),
        // SSH and relay: a fallback, one message at a time.
        None => {
            dev.send_overlay(peer, path, &buf[..sealed]);
            None
        }
    }
}

/// Open one data message and deliver its inner packet if its source belongs to the sender.
#[inline]
fn open_inbound(
    dev: &Device,
    table: &PeerTable,
    tun_fd: &OwnedFd,
    entry: &IndexEntry,
    msg: &mut [u8],
    via: Via,
    now: Instant,
) {
    let counters = &dev.counters;
    let plain_len = match entry.keypair.open(msg, now) {
        Ok((len, _)) => len,
        Err(DecryptError::Replay) => return Counters::bump(&counters.rx_replayed),
        Err(DecryptError::Auth) => return Counters::bump(&counters.rx_auth_failed),
        Err(DecryptError::Expired) => return Counters::bump(&counters.rx_unknown_index),
    };
    let peer = &entry.peer;
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
    if let Via::Udp(src) = via
        && peer.endpoint.load().as_deref() != Some(&src)
    {
        peer.endpoint.store(Some(Arc::new(src)));
    }
    let stamp = dev.clock.stamp(now);
    ActivityStamps::touch(&peer.activity.any_received, stamp);
    ActivityStamps::touch(&peer.rx_via[via.kind() as usize], stamp);
    if plain_len == 0 {
        return; // keepalive
    }
    let plain = &msg[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + plain_len];
    if plain[0] >> 4 == 0 {
        // Not IP: a path probe, or nothing.
        match probe::decode(plain) {
            Some((reply, nonce)) => {
                let _ = dev.events.try_send(Event::Probe {
                    peer: peer.clone(),
                    via,
                    reply,
                    nonce,
                });
            }
            None => Counters::bump(&counters.rx_bad_inner),
        }
        return;
    }
    ActivityStamps::touch(&peer.activity.data_received, stamp);
    let Some((inner_src, _, total)) = inner_addrs(plain) else {
        return Counters::bump(&counters.rx_bad_inner);
    };
    if !table.route(inner_src).is_some_and(|owner| Arc::ptr_eq(owner, peer)) {
        return Counters::bump(&counters.rx_spoofed_source);
    }
    if !dev.policy.inbound_allowed(&plain[..total], now) {
        return;
    }
    if tun::write(tun_fd, &plain[..total]).is_ok() {
        peer.rx_bytes.fetch_add(total as u64, Ordering::Relaxed);
    }
}
