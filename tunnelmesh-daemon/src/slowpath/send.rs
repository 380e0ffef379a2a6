//! Sealed sends from the slow path: keepalives, path probes and the packets that waited for a
//! session, sealed on the peer's current key in the scratch buffer and handed out as
//! [`Output::Transmit`]. Probes are path-layer traffic: the session's timers do not count them.

use std::{sync::atomic::Ordering, time::Instant};

use super::{Output, SlowPath};
use crate::{
    device::{Peer, Via},
    protocol::{probe, session::sealed_len, wire},
};

impl SlowPath {
    pub(super) fn transmit(&mut self, via: Via, msg: Vec<u8>) {
        self.out.push(Output::Transmit { via, msg });
    }

    /// Seal `len` bytes already in `scratch[16..]` on the current key and send them on the
    /// path in use; the session's timers count it.
    pub(super) fn send_sealed(&mut self, peer: &Peer, len: usize, now: Instant) -> bool {
        let sent = Via::to_peer(peer, peer.path()).is_some_and(|via| self.seal_via(peer, len, via, now));
        if sent {
            let stamp = self.dev.clock.stamp(now);
            peer.activity.any_sent.store(stamp, Ordering::Relaxed);
            if len > 0 {
                peer.activity.data_sent.store(stamp, Ordering::Relaxed);
                peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
        }
        sent
    }

    /// Send a path probe on `via`.
    pub(super) fn send_probe(&mut self, peer: &Peer, via: Via, reply: bool, nonce: u64, now: Instant) -> bool {
        self.scratch[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + probe::LEN]
            .copy_from_slice(&probe::encode(reply, nonce));
        self.seal_via(peer, probe::LEN, via, now)
    }

    /// Seal `len` bytes already in `scratch[16..]` on the current key and send them on `via`.
    fn seal_via(&mut self, peer: &Peer, len: usize, via: Via, now: Instant) -> bool {
        let Some(key) = peer.keys.load().current.clone() else {
            return false;
        };
        let Ok(total) = key.seal(&mut self.scratch, len, now) else {
            return false;
        };
        let msg = self.scratch[..total].to_vec();
        self.transmit(via, msg);
        true
    }

    /// Send the packets queued while the session was missing; false if there were none.
    pub(super) fn flush_staged(&mut self, peer: &Peer, now: Instant) -> bool {
        let queued = peer.take_staged();
        for packet in &queued {
            if sealed_len(packet.len()) > self.scratch.len() {
                continue;
            }
            self.scratch[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + packet.len()].copy_from_slice(packet);
            self.send_sealed(peer, packet.len(), now);
        }
        !queued.is_empty()
    }
}
