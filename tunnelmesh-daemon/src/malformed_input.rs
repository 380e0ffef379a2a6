//! Garbage in, no panic out: every parser that untrusted bytes reach, fed random and
//! mutated-valid inputs. (Deterministic pseudo-random inputs, so a failure reproduces.)

use std::time::Instant;

use curve25519_dalek::MontgomeryPoint;
use zeroize::Zeroizing;

use crate::{
    policy::PacketInfo,
    protocol::ip::IpHeader,
    protocol::noise::{CookieChecker, CookieJar, InitiatorHandshake, LocalStatic, Tai64n, consume_initiation},
    protocol::session::Keypair,
    protocol::wire,
};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn local(seed: u8) -> LocalStatic {
    let secret = [seed; 32];
    LocalStatic {
        public: MontgomeryPoint::mul_base_clamped(secret).to_bytes(),
        secret: Zeroizing::new(secret),
    }
}

#[test]
fn random_and_mutated_datagrams_never_panic_any_parser() {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let now = Instant::now();
    let (us, them) = (local(1), local(2));
    let psk = Zeroizing::new([3u8; 32]);
    let mut checker = CookieChecker::new(&us.public, now);
    let mut jar = CookieJar::new(&us.public);
    let keys = crate::protocol::noise::SessionKeys {
        send: Zeroizing::new([4; 32]),
        recv: Zeroizing::new([5; 32]),
        local_index: 1,
        remote_index: 2,
        is_initiator: true,
    };
    let keypair = Keypair::new(&keys, now);
    let (_, mut valid_initiation) = InitiatorHandshake::start(&them, &psk, &us.public, 7, Tai64n::now());
    // Stamped, so the jar expects a cookie reply and decrypts what arrives.
    jar.stamp(&mut valid_initiation, now);
    let src = "198.18.0.1:51820".parse().unwrap();
    for round in 0..20_000 {
        let len = (rng.next() % 1600) as usize;
        let mut msg = if round % 4 == 0 {
            // A valid initiation with a few bytes flipped.
            let mut m = valid_initiation.to_vec();
            for _ in 0..(rng.next() % 4) {
                let i = (rng.next() as usize) % m.len();
                m[i] ^= rng.next() as u8 | 1;
            }
            m
        } else {
            rng.bytes(len)
        };
        if round % 3 == 0 && !msg.is_empty() {
            // Make the header plausible so deeper paths run.
            msg[0] = (rng.next() % 4 + 1) as u8;
            msg.iter_mut().skip(1).take(3).for_each(|b| *b = 0);
        }
        let _ = IpHeader::parse(&msg);
        let _ = PacketInfo::parse(&msg);
        match wire::classify(&msg) {
            Ok(wire::Kind::Initiation) => {
                let _ = checker.verify(&msg, src, round % 2 == 0, now);
                let _ = consume_initiation(&us, &psk, &msg);
            }
            Ok(wire::Kind::Response) => {
                let _ = checker.verify(&msg, src, false, now);
            }
            Ok(wire::Kind::CookieReply) => {
                let _ = jar.consume_reply(&msg, now);
            }
            Ok(wire::Kind::Data) => {
                let _ = keypair.open(&mut msg, now);
            }
            Ok(wire::Kind::Stun) => {
                let _ = crate::protocol::stun::parse_binding_response(&msg, &[0; 12]);
            }
            Err(_) => {}
        }
    }
}
