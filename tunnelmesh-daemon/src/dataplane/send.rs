//! Outbound: seal a TUN read (a packet, or the segments of a super-packet) in place in the send
//! slots, and send the batch.

use std::{net::UdpSocket, os::fd::AsFd, sync::atomic::Ordering, time::Instant};

use tracing::{debug, warn};

use super::BATCH;
use crate::{
    device::{ActivityStamps, Counters, Device, PathKind, PeerTable},
    offload::split::Segments,
    protocol::{ip::IpHeader, wire},
    sys::mmsg::Batch,
};

/// Route and seal every packet of one TUN read into the send slots from `filled` on (sending
/// the batch when it is full); the new fill level. One route, key, endpoint and counter
/// reservation serves all segments of a super-packet: they share addresses.
#[inline]
pub(super) fn seal_outbound(
    dev: &Device,
    table: &PeerTable,
    segments: &Segments<'_>,
    tx: &mut Batch,
    mut filled: usize,
    udp: &UdpSocket,
    now: Instant,
) -> usize {
    if filled == BATCH {
        send_batch(dev, tx, udp, filled);
        filled = 0;
    }
    let packet = segments.packet();
    let count = segments.count();
    let payload = wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + dev.info.mtu;
    let header = IpHeader::parse(packet);
    let Some((header, peer)) = header.and_then(|h| Some((h, table.route(h.dst)?))) else {
        dev.counters.tx_no_route.fetch_add(count as u64, Ordering::Relaxed);
        return filled;
    };
    dev.policy.track_outbound(&header, packet, now);
    let keys = peer.keys.load();
    let Some(key) = keys.current.as_ref().filter(|k| k.can_send(now)) else {
        // Segments wait for the session; a free slot serves to cut them.
        let scratch = &mut tx.buf_mut(filled)[payload];
        for i in 0..count {
            let len = segments.write(i, scratch);
            dev.stage(peer, &scratch[..len]);
        }
        dev.request_session(peer);
        return filled;
    };
    let path = peer.path();
    let endpoint = match path {
        PathKind::Udp => match peer.endpoint.load().as_deref().copied() {
            Some(e) => Some(e),
            None => {
                dev.counters.tx_dropped.fetch_add(count as u64, Ordering::Relaxed);
                return filled;
            }
        },
        _ => None,
    };
    let Ok(first_counter) = key.reserve(count as u64, now) else {
        return filled;
    };
    let mut bytes = 0;
    for i in 0..count {
        if filled == BATCH {
            send_batch(dev, tx, udp, filled);
            filled = 0;
        }
        let buf = tx.buf_mut(filled);
        let len = segments.write(i, &mut buf[payload.clone()]);
        let sealed = key.seal_with(first_counter + i as u64, buf, len);
        bytes += len as u64;
        match endpoint {
            Some(e) => {
                tx.set_send(filled, sealed, e);
                filled += 1;
            }
            // SSH and relay: a fallback, one message at a time.
            None => {
                dev.send_overlay(peer, path, &buf[..sealed]);
            }
        }
    }
    let stamp = dev.clock.stamp(now);
    ActivityStamps::touch(&peer.activity.data_sent, stamp);
    ActivityStamps::touch(&peer.activity.any_sent, stamp);
    peer.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    filled
}

/// Send slots `0..n` of the batch, counting what the kernel refused.
pub(super) fn send_batch(dev: &Device, tx: &mut Batch, udp: &UdpSocket, n: usize) {
    if n == 0 {
        return;
    }
    let outcome = tx.send(udp.as_fd(), n);
    if let Some(e) = outcome.gso_refused {
        Counters::bump(&dev.counters.udp_gso_refused);
        warn!("UDP segmentation offload refused ({e}); sending one datagram per message from now on");
    }
    if outcome.failed > 0 {
        dev.counters
            .tx_send_failed
            .fetch_add(outcome.failed as u64, Ordering::Relaxed);
        debug!("{} of {n} datagrams not sent: {:?}", outcome.failed, outcome.last_error);
    }
}
