//! mac1/mac2 and cookie replies: WireGuard's DoS protection for handshakes.
//!
//! Every handshake message carries `mac1`, a keyed BLAKE2s of the message under a key derived from
//! the *receiver's* public key, so a responder can reject junk without any Diffie-Hellman. Under
//! load a responder answers with a cookie reply instead of a response; the cookie is bound to the
//! sender's IP and port, and the initiator proves it received it by adding `mac2` on its retry.
//!
//! [`CookieChecker`] is our side as a receiver; [`CookieJar`] keeps, per remote peer, the keys to
//! stamp messages addressed to it and the last cookie it gave us.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use blake2::{
    Blake2s256, Blake2sMac, Digest,
    digest::{FixedOutput, KeyInit, Mac, consts::U16},
};
use chacha20poly1305::{AeadInPlace, XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::protocol::wire;

const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";
/// Cookie secrets rotate, and cookies expire, after this long.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);

type Mac16 = Blake2sMac<U16>;

/// The key of mac1 on messages to the node whose Noise public key is `public`.
pub fn mac1_key(public: &[u8; 32]) -> [u8; 32] {
    hash(LABEL_MAC1, public)
}

fn hash(label: &[u8], key: &[u8; 32]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(label);
    h.update(key);
    h.finalize().into()
}

fn mac(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Mac16 as KeyInit>::new_from_slice(key).expect("BLAKE2s takes 1..=32-byte keys");
    Mac::update(&mut m, data);
    m.finalize_fixed().into()
}

/// Why a handshake message failed the mac checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacVerdict {
    /// mac1 valid, and (if we are under load) mac2 valid too: process the handshake.
    Accept,
    /// mac1 valid but we are under load and mac2 is missing or stale: send a cookie reply.
    NeedCookie,
    /// mac1 invalid: drop silently.
    Reject,
}

/// Checks mac1/mac2 on messages addressed to us and makes cookie replies.
pub struct CookieChecker {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    secret: [u8; 32],
    secret_born: Instant,
}

impl CookieChecker {
    /// For a node whose Noise public key is `local_public`.
    pub fn new(local_public: &[u8; 32], now: Instant) -> Self {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        CookieChecker {
            mac1_key: hash(LABEL_MAC1, local_public),
            cookie_key: hash(LABEL_COOKIE, local_public),
            secret,
            secret_born: now,
        }
    }

    fn cookie_for(&mut self, src: SocketAddr, now: Instant) -> [u8; 16] {
        if now.duration_since(self.secret_born) >= COOKIE_LIFETIME {
            rand::thread_rng().fill_bytes(&mut self.secret);
            self.secret_born = now;
        }
        let mut addr = [0u8; 18];
        let n = match src.ip().to_canonical() {
            std::net::IpAddr::V4(ip) => {
                addr[..4].copy_from_slice(&ip.octets());
                4
            }
            std::net::IpAddr::V6(ip) => {
                addr[..16].copy_from_slice(&ip.octets());
                16
            }
        };
        addr[n..n + 2].copy_from_slice(&src.port().to_be_bytes());
        mac(&self.secret, &addr[..n + 2])
    }

    /// Check the macs of a handshake message (initiation or response) from `src`.
    pub fn verify(&mut self, msg: &[u8], src: SocketAddr, under_load: bool, now: Instant) -> MacVerdict {
        let len = msg.len();
        let mac1 = mac(&self.mac1_key, &msg[wire::mac1_range(len)]);
        if !constant_time_eq(&mac1, &msg[len - 32..len - 16]) {
            return MacVerdict::Reject;
        }
        if !under_load {
            return MacVerdict::Accept;
        }
        let cookie = self.cookie_for(src, now);
        let mac2 = mac(&cookie, &msg[wire::mac2_range(len)]);
        if constant_time_eq(&mac2, &msg[len - 16..]) {
            MacVerdict::Accept
        } else {
            MacVerdict::NeedCookie
        }
    }

    /// Build the cookie reply to `msg` (whose mac1 was valid) from `src`.
    pub fn cookie_reply(&mut self, msg: &[u8], src: SocketAddr, now: Instant) -> [u8; wire::COOKIE_REPLY_LEN] {
        let len = msg.len();
        let cookie = self.cookie_for(src, now);
        let mut out = [0u8; wire::COOKIE_REPLY_LEN];
        wire::put_header(&mut out, wire::MSG_COOKIE_REPLY);
        out[4..8].copy_from_slice(&msg[4..8]); // their sender index is our receiver index
        rand::thread_rng().fill_bytes(&mut out[wire::COOKIE_NONCE]);
        let nonce = *XNonce::from_slice(&out[wire::COOKIE_NONCE]);
        let mut sealed = [0u8; 16];
        sealed.copy_from_slice(&cookie);
        let tag = XChaCha20Poly1305::new(&self.cookie_key.into())
            .encrypt_in_place_detached(&nonce, &msg[len - 32..len - 16], &mut sealed)
            .expect("16-byte cookie always encrypts");
        out[32..48].copy_from_slice(&sealed);
        out[48..64].copy_from_slice(&tag);
        out
    }
}

/// Per remote peer: stamps mac1/mac2 on messages to it and keeps the cookie it sent us.
pub struct CookieJar {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    cookie: Option<([u8; 16], Instant)>,
    last_mac1: Option<[u8; 16]>,
}

impl CookieJar {
    /// For messages addressed to the peer whose Noise public key is `remote_public`.
    pub fn new(remote_public: &[u8; 32]) -> Self {
        CookieJar {
            mac1_key: hash(LABEL_MAC1, remote_public),
            cookie_key: hash(LABEL_COOKIE, remote_public),
            cookie: None,
            last_mac1: None,
        }
    }

    /// Fill in mac1 and mac2 of an outgoing handshake message.
    pub fn stamp(&mut self, msg: &mut [u8], now: Instant) {
        let len = msg.len();
        let mac1 = mac(&self.mac1_key, &msg[wire::mac1_range(len)]);
        msg[len - 32..len - 16].copy_from_slice(&mac1);
        self.last_mac1 = Some(mac1);
        let mac2 = match self.cookie {
            Some((cookie, at)) if now.duration_since(at) < COOKIE_LIFETIME => mac(&cookie, &msg[wire::mac2_range(len)]),
            _ => [0u8; 16],
        };
        msg[len - 16..].copy_from_slice(&mac2);
    }

    /// Take a cookie reply to the last message we stamped. Returns false if it does not decrypt.
    pub fn consume_reply(&mut self, reply: &[u8], now: Instant) -> bool {
        let Some(last_mac1) = self.last_mac1 else {
            return false;
        };
        let nonce = *XNonce::from_slice(&reply[wire::COOKIE_NONCE]);
        let mut cookie = [0u8; 16];
        cookie.copy_from_slice(&reply[32..48]);
        let ok = XChaCha20Poly1305::new(&self.cookie_key.into())
            .decrypt_in_place_detached(&nonce, &last_mac1, &mut cookie, reply[48..64].into())
            .is_ok();
        if ok {
            self.cookie = Some((cookie, now));
        }
        ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The XDP shield's BLAKE2s (shared with the kernel program) gives the mac the `blake2`
    /// crate gives, for every length it may be asked (a response covers 60 bytes, an
    /// initiation 116) and keys of many nodes.
    #[test]
    fn the_kernels_blake2s_computes_the_same_mac1() {
        use rand::Rng;
        use tunnelmesh_common::blake2s;
        let mut rng = rand::thread_rng();
        for len in 1..=128 {
            let public: [u8; 32] = rng.r#gen();
            let key = mac1_key(&public);
            let mut padded = [0u8; 128];
            rng.fill(&mut padded[..len]);
            let want = mac(&key, &padded[..len]);
            let mut state = blake2s::State::new(blake2s::keyed_midstate(&key));
            blake2s::mac16(&mut state, &padded, len);
            let got: Vec<u8> = state.h[..4].iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(got, want, "length {len}");
        }
    }

    #[test]
    fn under_load_a_cookie_round_trip_earns_acceptance() {
        let now = Instant::now();
        let responder_pub = [7u8; 32];
        let mut checker = CookieChecker::new(&responder_pub, now);
        let mut jar = CookieJar::new(&responder_pub);
        let mut msg = [0u8; wire::INITIATION_LEN];
        wire::put_header(&mut msg, wire::MSG_INITIATION);
        msg[4..8].copy_from_slice(&42u32.to_le_bytes());
        jar.stamp(&mut msg, now);
        let src = addr("198.18.0.1:51820");
        assert_eq!(checker.verify(&msg, src, false, now), MacVerdict::Accept);
        assert_eq!(checker.verify(&msg, src, true, now), MacVerdict::NeedCookie);
        let reply = checker.cookie_reply(&msg, src, now);
        assert_eq!(wire::receiver_index(&reply), 42);
        assert!(jar.consume_reply(&reply, now));
        jar.stamp(&mut msg, now);
        assert_eq!(checker.verify(&msg, src, true, now), MacVerdict::Accept);
        // The cookie is bound to the source address and expires.
        assert_eq!(
            checker.verify(&msg, addr("198.18.0.2:51820"), true, now),
            MacVerdict::NeedCookie
        );
        let later = now + COOKIE_LIFETIME + Duration::from_secs(1);
        jar.stamp(&mut msg, later);
        assert_eq!(checker.verify(&msg, src, true, later), MacVerdict::NeedCookie);
    }

    #[test]
    fn wrong_mac1_is_rejected_and_forged_cookie_replies_are_ignored() {
        let now = Instant::now();
        let mut checker = CookieChecker::new(&[1u8; 32], now);
        let mut jar_for_other = CookieJar::new(&[2u8; 32]);
        let mut msg = [0u8; wire::RESPONSE_LEN];
        wire::put_header(&mut msg, wire::MSG_RESPONSE);
        jar_for_other.stamp(&mut msg, now);
        assert_eq!(
            checker.verify(&msg, addr("[2001:db8::1]:1"), false, now),
            MacVerdict::Reject
        );
        let mut reply = checker.cookie_reply(&msg, addr("[2001:db8::1]:1"), now);
        reply[40] ^= 1;
        assert!(!jar_for_other.consume_reply(&reply, now));
    }
}
