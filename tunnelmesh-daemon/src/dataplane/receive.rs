//! Inbound: open a data message in place, take it as proof of the path and the key, check the
//! inner source and the policy.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use crate::{
    device::{ActivityStamps, Counters, Device, Event, IndexEntry, KeySet, PeerTable, Via},
    protocol::{ip::IpHeader, probe, session::DecryptError, wire},
};

/// Open one data message; the length of its inner packet if that may be delivered (its source
/// belongs to the sender and the policy lets it in).
#[inline]
pub(crate) fn open_inbound(
    dev: &Device,
    worker: usize,
    table: &PeerTable,
    entry: &IndexEntry,
    msg: &mut [u8],
    via: Via,
    now: Instant,
) -> Option<usize> {
    let counters = &dev.counters;
    let drop = |counter: &std::sync::atomic::AtomicU64| {
        Counters::bump(counter);
        None
    };
    let plain_len = match entry.keypair.open(msg, now) {
        Ok((len, _)) => len,
        Err(DecryptError::Replay) => return drop(&counters.rx_replayed),
        Err(DecryptError::Auth) => return drop(&counters.rx_auth_failed),
        Err(DecryptError::Expired) => return drop(&counters.rx_unknown_index),
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
    let bit = 1u64 << (worker % 64);
    if peer.rx_workers.load(Ordering::Relaxed) & bit == 0 {
        peer.rx_workers.fetch_or(bit, Ordering::Relaxed);
    }
    let stamp = dev.clock.stamp(now);
    ActivityStamps::touch(&peer.activity.any_received, stamp);
    ActivityStamps::touch(&peer.rx_via[via.kind() as usize], stamp);
    if plain_len == 0 {
        return None; // keepalive
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
        return None;
    }
    ActivityStamps::touch(&peer.activity.data_received, stamp);
    let Some(header) = IpHeader::parse(plain) else {
        return drop(&counters.rx_bad_inner);
    };
    if !table.route(header.src).is_some_and(|owner| Arc::ptr_eq(owner, peer)) {
        return drop(&counters.rx_spoofed_source);
    }
    if !dev.policy.inbound_allowed(&header, plain, now) {
        return None;
    }
    peer.rx_bytes.fetch_add(header.len as u64, Ordering::Relaxed);
    Some(header.len)
}
