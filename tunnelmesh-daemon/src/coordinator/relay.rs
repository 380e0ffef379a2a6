//! The relay: the last-resort path between peers that reach nothing but the coordinator.
//!
//! Peers send binary WebSocket frames on their authenticated connection: the destination's
//! Noise public key (32 bytes) and one unchanged, end-to-end encrypted TunnelMesh wire message.
//! The coordinator checks the message's shape, replaces the key with the sender's and forwards
//! it; it holds no session key and cannot read it. Every destination has a bounded queue that is
//! only ever `try_send`-ed into (a slow reader loses its own frames, never stalls a sender), and
//! every sender a byte budget (token bucket), so one abusive peer cannot starve the others.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::protocol::wire;

/// Frames queued per destination before new ones are dropped.
pub const QUEUE: usize = 1024;
/// Bytes charged at least per frame (so floods of tiny frames cost their share).
const MIN_FRAME_COST: u64 = 256;

/// What the relay did, for `/v1/info` and the bench.
#[derive(Default, Serialize)]
pub struct RelayCounters {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped_no_destination: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_rate_limited: AtomicU64,
    pub dropped_malformed: AtomicU64,
}

/// A connected peer's session id and the queue of frames for it.
type Route = (u64, mpsc::Sender<Bytes>);

/// Connected peers by Noise key.
pub struct Relay {
    routes: Mutex<HashMap<[u8; 32], Route>>,
    pub counters: RelayCounters,
    /// Bytes per second each sender may relay (the burst is one second's worth).
    pub rate: u64,
    /// `--relay-dump`: every relayed message appended, exactly as the coordinator sees it.
    dump: Option<Mutex<std::fs::File>>,
}

/// A sender's byte budget (token bucket).
pub struct Budget {
    tokens: f64,
    last: Instant,
}

impl Budget {
    pub fn new(rate: u64) -> Self {
        Budget {
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    fn spend(&mut self, rate: u64, cost: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate as f64).min(rate as f64);
        if self.tokens >= cost as f64 {
            self.tokens -= cost as f64;
            true
        } else {
            false
        }
    }
}

impl Relay {
    pub fn new(rate: u64) -> Self {
        Relay {
            routes: Mutex::new(HashMap::new()),
            counters: RelayCounters::default(),
            rate,
            dump: None,
        }
    }

    /// Also append every relayed message to `file` (an audit of what the coordinator can see).
    pub fn dumping_to(mut self, file: std::fs::File) -> Self {
        self.dump = Some(Mutex::new(file));
        self
    }

    /// Register the connection `session` of the peer with Noise key `key`; frames for it arrive
    /// on the returned receiver. A newer connection of the same peer replaces an older one.
    pub fn register(&self, key: [u8; 32], session: u64) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(QUEUE);
        crate::sync::lock(&self.routes).insert(key, (session, tx));
        rx
    }

    /// Forget the connection, unless a newer one of the same peer took its place.
    pub fn unregister(&self, key: &[u8; 32], session: u64) {
        let mut routes = crate::sync::lock(&self.routes);
        if routes.get(key).is_some_and(|(s, _)| *s == session) {
            routes.remove(key);
        }
    }

    /// Forward one frame from the peer `from`: `[destination key][wire message]`.
    pub fn forward(&self, from: &[u8; 32], frame: &[u8], budget: &mut Budget) {
        let c = &self.counters;
        let Some((dst, msg)) = frame.split_first_chunk::<32>() else {
            c.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if wire::classify(msg).is_err() {
            c.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !budget.spend(self.rate, (msg.len() as u64).max(MIN_FRAME_COST), Instant::now()) {
            c.dropped_rate_limited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let target = crate::sync::lock(&self.routes).get(dst).map(|(_, tx)| tx.clone());
        let Some(tx) = target else {
            c.dropped_no_destination.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut out = Vec::with_capacity(32 + msg.len());
        out.extend_from_slice(from);
        out.extend_from_slice(msg);
        match tx.try_send(Bytes::from(out)) {
            Ok(()) => {
                c.frames.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
                if let Some(dump) = &self.dump {
                    let _ = std::io::Write::write_all(&mut *crate::sync::lock(dump), msg);
                }
            }
            Err(_) => {
                c.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8; len];
        m[0] = wire::MSG_DATA;
        m
    }

    fn frame(dst: [u8; 32], msg: &[u8]) -> Vec<u8> {
        [&dst[..], msg].concat()
    }

    #[test]
    fn frames_reach_their_destination_with_the_senders_key_and_junk_does_not() {
        let relay = Relay::new(1 << 20);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let _rx_a = relay.register(a, 1);
        let mut rx_b = relay.register(b, 2);
        let mut budget = Budget::new(relay.rate);
        let msg = data_message(64);
        relay.forward(&a, &frame(b, &msg), &mut budget);
        let got = rx_b.try_recv().expect("forwarded");
        assert_eq!(&got[..32], &a, "the receiver learns who sent it");
        assert_eq!(&got[32..], &msg[..]);
        relay.forward(&a, &frame(b, b"not a wire message"), &mut budget);
        relay.forward(&a, &frame([9; 32], &msg), &mut budget);
        relay.forward(&a, &[1, 2, 3], &mut budget);
        let c = &relay.counters;
        assert_eq!(c.frames.load(Ordering::Relaxed), 1);
        assert_eq!(c.dropped_malformed.load(Ordering::Relaxed), 2);
        assert_eq!(c.dropped_no_destination.load(Ordering::Relaxed), 1);
        assert!(rx_b.try_recv().is_err());
    }

    #[test]
    fn a_slow_reader_loses_its_own_frames_and_a_flooder_is_rate_limited() {
        let relay = Relay::new(1 << 40);
        let (a, slow, other) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let _rx_slow = relay.register(slow, 1);
        let mut rx_other = relay.register(other, 2);
        let mut budget = Budget::new(relay.rate);
        let msg = data_message(32);
        for _ in 0..QUEUE + 10 {
            relay.forward(&a, &frame(slow, &msg), &mut budget);
        }
        assert_eq!(relay.counters.dropped_queue_full.load(Ordering::Relaxed), 10);
        relay.forward(&a, &frame(other, &msg), &mut budget);
        assert!(rx_other.try_recv().is_ok(), "another destination is unaffected");

        let relay = Relay::new(64 * 1024);
        let mut rx_other = relay.register(other, 2);
        let mut flooder = Budget::new(relay.rate);
        let big = data_message(1400);
        let passed = (0..200)
            .filter(|_| {
                let before = relay.counters.frames.load(Ordering::Relaxed);
                relay.forward(&[4; 32], &frame(other, &big), &mut flooder);
                relay.counters.frames.load(Ordering::Relaxed) > before
            })
            .count();
        assert!(
            (40..=50).contains(&passed),
            "{passed} frames of 1400 B within a 64 KiB budget"
        );
        assert!(relay.counters.dropped_rate_limited.load(Ordering::Relaxed) >= 150);
        assert!(rx_other.try_recv().is_ok());
        // A newer connection replaces the older; the older's goodbye does not remove it.
        let _newer = relay.register(other, 3);
        relay.unregister(&other, 2);
        assert!(relay.routes.lock().unwrap().contains_key(&other));
    }
}
