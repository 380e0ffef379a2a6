//! One direction-pair of transport keys from a completed handshake.
//!
//! Owns the data-path cryptography: ChaCha20-Poly1305 with a 64-bit little-endian counter nonce,
//! zero-padding to 16 bytes, and the replay window. Shared by all data-plane workers through an
//! `Arc`: the send counter is an atomic, and the replay window sits behind a per-keypair mutex,
//! taken once for a whole run of messages ([`Keypair::receiving`]) and uncontended while a
//! session is handled by one worker (the steering program sends all of a session's data to the
//! worker that owns it; without it, the reuseport hash keeps a peer's endpoint on one socket).
//! The two sit on separate cache lines, so a worker sending to a peer does not invalidate the
//! line another worker's receive path for the same peer is using.
//!
//! The AEAD is `ring`'s (BoringSSL's assembly: AVX2/SSSE3 on x86_64, NEON on aarch64), about 3×
//! faster per MTU-sized packet than RustCrypto's portable build on our machines (`cargo xtask
//! bench crypto`).

use std::{
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use super::{REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, ReplayWindow};
use crate::{protocol::noise::SessionKeys, protocol::wire};

/// Why a data message was dropped by the crypto layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecryptError {
    /// The counter was already used or is older than the window.
    Replay,
    /// The ciphertext does not authenticate under this key.
    Auth,
    /// The key is past REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES.
    Expired,
}

/// Transport keys of one session.
pub struct Keypair {
    send: LessSafeKey,
    recv: LessSafeKey,
    send_counter: CacheLine<AtomicU64>,
    replay: CacheLine<Mutex<ReplayWindow>>,
    pub local_index: u32,
    pub remote_index: u32,
    pub created: Instant,
    pub is_initiator: bool,
}

/// A value alone on its cache line (128 bytes: adjacent-line prefetch pairs 64-byte lines).
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key is a ChaCha20-Poly1305 key"))
}

/// Length of the data message carrying `payload_len` bytes of inner packet.
pub fn sealed_len(payload_len: usize) -> usize {
    let padded = payload_len.div_ceil(wire::PADDING_MULTIPLE) * wire::PADDING_MULTIPLE;
    wire::DATA_HEADER_LEN + padded + wire::AEAD_TAG_LEN
}

impl Keypair {
    pub fn new(keys: &SessionKeys, now: Instant) -> Self {
        Keypair {
            send: aead_key(&keys.send),
            recv: aead_key(&keys.recv),
            send_counter: CacheLine(AtomicU64::new(0)),
            replay: CacheLine(Mutex::new(ReplayWindow::default())),
            local_index: keys.local_index,
            remote_index: keys.remote_index,
            created: now,
            is_initiator: keys.is_initiator,
        }
    }

    /// Whether the key may still send at `now` (age and message count).
    pub fn can_send(&self, now: Instant) -> bool {
        now.duration_since(self.created) < REJECT_AFTER_TIME
            && self.send_counter.load(Ordering::Relaxed) < REJECT_AFTER_MESSAGES
    }

    /// Messages sent with this key so far.
    pub fn sent(&self) -> u64 {
        self.send_counter.load(Ordering::Relaxed)
    }

    /// Seal in place. `buf[16..16 + payload_len]` holds the inner packet; `buf` must have room
    /// for padding and tag (`sealed_len(payload_len)` bytes). Returns the message length.
    pub fn seal(&self, buf: &mut [u8], payload_len: usize, now: Instant) -> Result<usize, DecryptError> {
        let counter = self.reserve(1, now)?;
        Ok(self.seal_with(counter, buf, payload_len))
    }

    /// Reserve `n` consecutive send counters with one atomic add (a batch of segments of one
    /// super-packet); the first. Refused when any of them would pass the key's limits.
    pub fn reserve(&self, n: u64, now: Instant) -> Result<u64, DecryptError> {
        let first = self.send_counter.fetch_add(n, Ordering::Relaxed);
        if first.saturating_add(n) > REJECT_AFTER_MESSAGES || now.duration_since(self.created) >= REJECT_AFTER_TIME {
            return Err(DecryptError::Expired);
        }
        Ok(first)
    }

    /// Seal in place with a counter from [`Keypair::reserve`] (each used once).
    pub fn seal_with(&self, counter: u64, buf: &mut [u8], payload_len: usize) -> usize {
        let total = sealed_len(payload_len);
        let body_end = total - wire::AEAD_TAG_LEN;
        buf[wire::DATA_HEADER_LEN + payload_len..body_end].fill(0);
        wire::put_header(buf, wire::MSG_DATA);
        buf[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        buf[8..16].copy_from_slice(&counter.to_le_bytes());
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut buf[wire::DATA_HEADER_LEN..body_end])
            .expect("ChaCha20-Poly1305 encrypts any length below 256 GiB");
        buf[body_end..total].copy_from_slice(tag.as_ref());
        total
    }

    /// Open a data message in place. On success the plaintext (still padded) is
    /// `msg[16..len - 16]`; returns its length and the counter.
    pub fn open(&self, msg: &mut [u8], now: Instant) -> Result<(usize, u64), DecryptError> {
        self.receiving().open(msg, now)
    }

    /// This key's receive side with its replay window locked, for opening a run of messages
    /// (those of one receive batch) under one lock instead of one per message.
    pub fn receiving(&self) -> Receiving<'_> {
        Receiving {
            keypair: self,
            window: crate::sync::lock(&self.replay),
        }
    }
}

/// A keypair's receive side, its replay window held ([`Keypair::receiving`]).
pub struct Receiving<'k> {
    keypair: &'k Keypair,
    window: MutexGuard<'k, ReplayWindow>,
}

impl Receiving<'_> {
    /// [`Keypair::open`], with the window already held.
    pub fn open(&mut self, msg: &mut [u8], now: Instant) -> Result<(usize, u64), DecryptError> {
        let k = self.keypair;
        let counter = wire::le64(msg, 8);
        if counter >= REJECT_AFTER_MESSAGES || now.duration_since(k.created) >= REJECT_AFTER_TIME {
            return Err(DecryptError::Expired);
        }
        // Checked first, so that replayed floods cost no decryption; recorded only once the
        // message authenticated, so that forgeries burn no counter.
        if !self.window.may_accept(counter) {
            return Err(DecryptError::Replay);
        }
        let len = msg.len();
        k.recv
            .open_in_place(nonce(counter), Aad::empty(), &mut msg[wire::DATA_HEADER_LEN..])
            .map_err(|_| DecryptError::Auth)?;
        // With the window held this cannot refuse what `may_accept` let through; checked anyway,
        // because a replay let through would be a hole and the check costs a compare.
        if !self.window.accept(counter) {
            return Err(DecryptError::Replay);
        }
        Ok((len - wire::DATA_MIN_LEN, counter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn pair(now: Instant) -> (Keypair, Keypair) {
        let k1 = Zeroizing::new([1u8; 32]);
        let k2 = Zeroizing::new([2u8; 32]);
        let a = SessionKeys {
            send: k1.clone(),
            recv: k2.clone(),
            local_index: 1,
            remote_index: 2,
            is_initiator: true,
        };
        let b = SessionKeys {
            send: k2,
            recv: k1,
            local_index: 2,
            remote_index: 1,
            is_initiator: false,
        };
        (Keypair::new(&a, now), Keypair::new(&b, now))
    }

    #[test]
    fn sealed_packets_open_once_and_are_padded() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let mut buf = [0u8; 128];
        buf[16..21].copy_from_slice(b"hello");
        let n = a.seal(&mut buf, 5, now).unwrap();
        assert_eq!(n, 16 + 16 + 16);
        assert_eq!(wire::receiver_index(&buf), 2);
        let mut copy = buf;
        let (plain_len, counter) = b.open(&mut buf[..n], now).unwrap();
        assert_eq!((plain_len, counter), (16, 0));
        assert_eq!(&buf[16..21], b"hello");
        assert_eq!(b.open(&mut copy[..n], now), Err(DecryptError::Replay));
    }

    #[test]
    fn a_run_opens_under_one_lock_and_still_refuses_a_replay_within_it() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let sealed: Vec<[u8; 64]> = (0..3)
            .map(|i| {
                let mut buf = [0u8; 64];
                buf[16] = i;
                a.seal(&mut buf, 1, now).unwrap();
                buf
            })
            .collect();
        // 0, 1, 1 again, a forgery of 2, 2.
        let mut forged = sealed[2];
        forged[17] ^= 1;
        let mut run = [sealed[0], sealed[1], sealed[1], forged, sealed[2]];
        let mut rx = b.receiving();
        let got: Vec<_> = run
            .iter_mut()
            .map(|m| rx.open(&mut m[..48], now).map(|(_, c)| c))
            .collect();
        assert_eq!(
            got,
            [Ok(0), Ok(1), Err(DecryptError::Replay), Err(DecryptError::Auth), Ok(2)]
        );
        assert_eq!(run[4][16], 2, "opened in place");
        drop(rx);
        let mut again = sealed[0];
        assert_eq!(b.open(&mut again[..48], now), Err(DecryptError::Replay));
    }

    #[test]
    fn tampered_and_expired_messages_are_refused() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let mut buf = [0u8; 64];
        let n = a.seal(&mut buf, 0, now).unwrap();
        let genuine = buf;
        buf[20] ^= 0x80;
        assert_eq!(b.open(&mut buf[..n], now), Err(DecryptError::Auth));
        // A failed authentication does not burn the counter.
        let mut buf = genuine;
        assert!(b.open(&mut buf[..n], now).is_ok());
        let later = now + REJECT_AFTER_TIME;
        assert_eq!(a.seal(&mut buf, 0, later), Err(DecryptError::Expired));
        assert!(!a.can_send(later));
    }

    #[test]
    fn reserved_counters_are_consecutive_and_bounded() {
        let now = Instant::now();
        let (a, b) = pair(now);
        assert_eq!(a.reserve(3, now), Ok(0));
        let mut bufs = [[0u8; 64]; 3];
        for (i, buf) in bufs.iter_mut().enumerate() {
            let n = a.seal_with(i as u64, buf, 10);
            assert_eq!(b.open(&mut buf[..n], now).map(|(_, c)| c), Ok(i as u64));
        }
        assert_eq!(a.reserve(1, now), Ok(3));
        a.send_counter.store(REJECT_AFTER_MESSAGES - 2, Ordering::Relaxed);
        assert_eq!(a.reserve(3, now), Err(DecryptError::Expired));
    }

    #[test]
    fn sealed_messages_open_under_an_independent_implementation() {
        // ring's output against RustCrypto's ChaCha20-Poly1305 with WireGuard's nonce layout
        // (4 zero bytes, then the 64-bit little-endian counter: 0 for the first message).
        use chacha20poly1305::{AeadInPlace, ChaCha20Poly1305, KeyInit};
        let now = Instant::now();
        let (a, _) = pair(now);
        let mut buf = [0u8; 16 + 32 + 16];
        buf[16..26].copy_from_slice(b"0123456789");
        let n = a.seal(&mut buf, 10, now).unwrap();
        let rc = ChaCha20Poly1305::new(&[1u8; 32].into());
        let mut body = buf[16..n - 16].to_vec();
        let tag = chacha20poly1305::Tag::clone_from_slice(&buf[n - 16..n]);
        rc.decrypt_in_place_detached(&[0u8; 12].into(), &[], &mut body, &tag)
            .unwrap();
        assert_eq!(&body[..10], b"0123456789");
    }
}
