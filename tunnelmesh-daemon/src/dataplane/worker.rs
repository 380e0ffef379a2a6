//! One data-plane worker: the hot loop.
//!
//! TUN → network: each read is one packet, or (with offloads) a TSO/USO super-packet that is cut
//! into MTU-sized segments straight into the send slots, with the route, key, endpoint and
//! counters taken once for all of them. Network → TUN: every data message of a receive batch is
//! opened and checked on its own, those of one session in a row as a [`Run`] (one lookup, one
//! lock, the peer's bookkeeping once); what passes is handed to the [`Coalescer`] and written at
//! the end of the batch, TCP segments (and, with USO, UDP datagrams) of one flow as one
//! super-packet (GRO).

use super::{
    receive::Run,
    send::{seal_outbound, send_batch},
};
use std::{
    io::IoSlice,
    net::UdpSocket,
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
    device::{Counters, Device, Event, INBOX_HEADER, IndexEntry, PathKind, PeerTable, Via},
    offload::{
        VNET_HDR_LEN, VnetHeader,
        coalesce::{Coalescer, Span},
        split::Segments,
    },
    protocol::session::sealed_len,
    protocol::wire::{self, Kind},
    sys::{
        mmsg::{self, Batch},
        poll,
        tun::{self, Offloads},
    },
};

/// How long a worker sleeps in `poll` before rechecking the shutdown flag.
const POLL_TIMEOUT: Duration = Duration::from_millis(200);
/// Receive buffers per `recvmmsg` with UDP GRO on (64 KiB each).
const GRO_BUFFERS: usize = 16;
/// At most one "stale session" hint per worker per this interval.
const STALE_HINT_INTERVAL: Duration = Duration::from_millis(500);

/// What handling one received message needs, apart from the buffers it lives in.
struct Dispatcher {
    /// This worker's number (its bit in `Peer::rx_workers`).
    id: usize,
    dev: Arc<Device>,
    tun: OwnedFd,
    offloads: Offloads,
    last_stale_hint: Option<Instant>,
}

pub struct Worker {
    dispatcher: Dispatcher,
    udp: UdpSocket,
    /// Messages that arrived on SSH connections or the relay (shared by all workers).
    inbox: UnixDatagram,
    inbox_buf: Vec<u8>,
    rx: Batch,
    tx: Batch,
    /// One TUN read: the virtio header and a packet or super-packet.
    tun_buf: Vec<u8>,
    gro: Coalescer,
}

impl Worker {
    /// A worker on one TUN queue and one UDP socket; `udp_offload` turns on UDP GSO and GRO.
    pub fn new(
        id: usize,
        dev: Arc<Device>,
        tun: OwnedFd,
        udp: UdpSocket,
        inbox: UnixDatagram,
        udp_offload: bool,
    ) -> Self {
        let slot = sealed_len(dev.info.mtu) + 64;
        let mut tx = Batch::new(BATCH, slot);
        if udp_offload {
            tx.enable_gso();
        }
        let rx = if udp_offload && mmsg::enable_gro(udp.as_fd()) {
            // A coalesced buffer can hold up to 64 KiB: fewer, larger slots.
            Batch::new(GRO_BUFFERS, crate::offload::MAX_SUPER_PACKET)
        } else {
            Batch::new(BATCH, slot)
        };
        let offloads = dev.info.offloads;
        let tun_read = if offloads.vnet_header() {
            VNET_HDR_LEN + crate::offload::MAX_SUPER_PACKET
        } else {
            dev.info.mtu
        };
        Worker {
            rx,
            tx,
            inbox_buf: vec![0u8; slot + INBOX_HEADER],
            tun_buf: vec![0u8; tun_read],
            gro: Coalescer::new(BATCH, offloads == Offloads::TsoUso),
            inbox,
            dispatcher: Dispatcher {
                id,
                dev,
                tun,
                offloads,
                last_stale_hint: None,
            },
            udp,
        }
    }

    pub fn run(mut self) {
        while !self.dispatcher.dev.shutdown.load(Ordering::Relaxed) {
            self.dispatcher.dev.heartbeats.beat(1 + self.dispatcher.id);
            let fds = [self.dispatcher.tun.as_fd(), self.udp.as_fd(), self.inbox.as_fd()];
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

    /// TUN → network: read a burst, cut super-packets into segments, seal each in place in a
    /// send slot, send as one batch (earlier when the slots run out). Bounded to about one batch
    /// of segments per turn, so that a bulk stream out of the TUN device never keeps the worker
    /// from what arrives on the socket (ACKs, pings) for long.
    fn transmit(&mut self) {
        let Worker {
            dispatcher,
            udp,
            tx,
            tun_buf,
            ..
        } = self;
        let dev = &*dispatcher.dev;
        let vnet = dispatcher.offloads.vnet_header();
        let now = Instant::now();
        let table = dev.peers.load();
        let (mut filled, mut reads, mut segments_read) = (0, 0, 0);
        while reads < BATCH && segments_read < BATCH {
            let len = match tun::read(&dispatcher.tun, tun_buf) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => {
                    error!("reading the TUN device failed: {e}");
                    break;
                }
            };
            reads += 1;
            let segments = if vnet {
                VnetHeader::parse(&tun_buf[..len])
                    .and_then(|hdr| Segments::new(hdr, &mut tun_buf[VNET_HDR_LEN..len], dev.info.mtu))
            } else {
                Segments::new(VnetHeader::default(), &mut tun_buf[..len], dev.info.mtu)
            };
            match segments {
                Ok(segments) => {
                    segments_read += segments.count();
                    filled = seal_outbound(dev, &table, &segments, tx, filled, udp, now);
                }
                Err(e) => {
                    Counters::bump(&dev.counters.tun_bad_offload);
                    debug!("dropped a packet from the TUN device: {e}");
                }
            }
        }
        send_batch(dev, tx, udp, filled);
    }

    /// Network → TUN: receive a batch, open each data message in place, deliver. One batch per
    /// turn: the TUN side gets its turn in between.
    fn receive(&mut self) {
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
        let sessions = self.dispatcher.dev.sessions.load();
        let table = self.dispatcher.dev.peers.load();
        let coalesce = self.dispatcher.offloads.tso();
        let mut run = None;
        for i in 0..got {
            let slot = i * self.rx.slot();
            let (len, src) = (self.rx.len(i), self.rx.source(i));
            let via = Via::Udp(src);
            // With UDP GRO one buffer holds several datagrams of one sender, each
            // `segment_size` long but the last; each is its own wire message.
            let step = match self.rx.segment_size(i) {
                0 => len.max(1),
                size => size,
            };
            let mut offset = 0;
            loop {
                let start = slot + offset;
                let end = slot + len.min(offset + step);
                let msg = &mut self.rx.storage_mut()[start..end];
                if let Some(plain) = self.dispatcher.dispatch(&table, &sessions, &mut run, msg, via, now) {
                    let span = Span {
                        start: start + wire::DATA_HEADER_LEN,
                        len: plain,
                    };
                    if coalesce {
                        self.gro.push(self.rx.storage(), span);
                    } else {
                        self.dispatcher
                            .deliver(&self.rx.storage()[span.start..span.start + span.len]);
                    }
                }
                offset += step;
                if offset >= len {
                    break;
                }
            }
        }
        self.dispatcher.end(run, now);
        if coalesce {
            let (dispatcher, gro) = (&self.dispatcher, &mut self.gro);
            gro.flush(self.rx.storage_mut(), |pieces| dispatcher.write_tun(pieces));
            let merged = gro.take_merged();
            if merged > 0 {
                dispatcher
                    .dev
                    .counters
                    .rx_coalesced
                    .fetch_add(merged, Ordering::Relaxed);
            }
        }
    }

    /// Messages from SSH connections and the relay: the same handling as UDP datagrams.
    fn receive_overlay(&mut self) {
        let now = Instant::now();
        let sessions = self.dispatcher.dev.sessions.load();
        let table = self.dispatcher.dev.peers.load();
        let mut run = None;
        for _ in 0..BATCH {
            let Ok(n) = self.inbox.recv(&mut self.inbox_buf) else {
                break;
            };
            if n <= INBOX_HEADER {
                continue;
            }
            let key: [u8; 32] = self.inbox_buf[1..INBOX_HEADER].try_into().expect("32 bytes");
            let via = match PathKind::from_u8(self.inbox_buf[0]) {
                PathKind::Ssh => Via::Ssh(key),
                _ => Via::Relay(key),
            };
            let msg = &mut self.inbox_buf[INBOX_HEADER..n];
            if let Some(len) = self.dispatcher.dispatch(&table, &sessions, &mut run, msg, via, now) {
                self.dispatcher
                    .deliver(&msg[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + len]);
            }
        }
        self.dispatcher.end(run, now);
    }
}

impl Dispatcher {
    /// Handle one wire message that arrived `via` a path. A data message continues `run` when
    /// it is to the same session over the same path, or ends it and starts the next; one whose
    /// inner packet may be delivered returns that packet's length (it starts at
    /// `msg[DATA_HEADER_LEN]`).
    #[inline]
    fn dispatch<'s>(
        &mut self,
        table: &PeerTable,
        sessions: &'s std::collections::HashMap<u32, Arc<IndexEntry>>,
        run: &mut Option<Run<'s>>,
        msg: &mut [u8],
        via: Via,
        now: Instant,
    ) -> Option<usize> {
        let dev = &*self.dev;
        match wire::classify(msg) {
            Err(_) => Counters::bump(&dev.counters.rx_malformed),
            Ok(Kind::Data) => {
                let index = wire::receiver_index(msg);
                if let Some(current) = run.as_mut().filter(|r| r.continues(index, via)) {
                    return current.open(dev, table, msg, now);
                }
                self.end(run.take(), now);
                match sessions.get(&index) {
                    Some(entry) => return run.insert(Run::new(entry, via)).open(dev, table, msg, now),
                    None => {
                        Counters::bump(&dev.counters.rx_unknown_index);
                        if self
                            .last_stale_hint
                            .is_none_or(|t| now.duration_since(t) >= STALE_HINT_INTERVAL)
                        {
                            self.last_stale_hint = Some(now);
                            let _ = dev.events.try_send(Event::StaleSession(via));
                        }
                    }
                }
            }
            Ok(Kind::Stun) => {
                // Only the slow path asks STUN questions; it matches the answers.
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
        None
    }

    /// End a run of data messages: record what it proved about its peer.
    fn end(&self, run: Option<Run<'_>>, now: Instant) {
        if let Some(run) = run {
            run.finish(&self.dev, self.id, now);
        }
    }

    /// Write one packet to the TUN device (behind an empty virtio header with offloads).
    fn deliver(&self, packet: &[u8]) {
        if self.offloads.vnet_header() {
            let hdr = VnetHeader::default().encode();
            self.write_tun(&[IoSlice::new(&hdr), IoSlice::new(packet)]);
        } else {
            self.write_tun(&[IoSlice::new(packet)]);
        }
    }

    fn write_tun(&self, pieces: &[IoSlice<'_>]) {
        if let Err(e) = tun::write_vectored(&self.tun, pieces) {
            Counters::bump(&self.dev.counters.tun_write_failed);
            debug!("the TUN device refused a packet: {e}");
        }
    }
}
