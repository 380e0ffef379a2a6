//! Interoperability with an independent WireGuard implementation (boringtun), in both roles,
//! with the mesh key as PSK and data both ways. This is the external oracle for "wire-compatible
//! with WireGuard": our handshake, macs, key split, counters and padding must all agree with it.

use std::{net::Ipv4Addr, time::Instant};

use boringtun::{
    noise::{Tunn, TunnResult},
    x25519,
};
use curve25519_dalek::MontgomeryPoint;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::{
    protocol::noise::{
        CookieChecker, CookieJar, InitiatorHandshake, LocalStatic, MacVerdict, MeshKey, Tai64n, consume_initiation,
    },
    protocol::session::Keypair,
    protocol::wire,
};

struct Pair {
    ours: LocalStatic,
    psk: MeshKey,
    theirs: Tunn,
    their_public: [u8; 32],
}

fn pair(our_psk: [u8; 32], their_psk: [u8; 32]) -> Pair {
    let mut rng = rand::thread_rng();
    let mut our_secret = [0u8; 32];
    rng.fill_bytes(&mut our_secret);
    let ours = LocalStatic {
        public: MontgomeryPoint::mul_base_clamped(our_secret).to_bytes(),
        secret: Zeroizing::new(our_secret),
    };
    let mut their_secret = [0u8; 32];
    rng.fill_bytes(&mut their_secret);
    let their_secret = x25519::StaticSecret::from(their_secret);
    let their_public = x25519::PublicKey::from(&their_secret).to_bytes();
    let theirs = Tunn::new(
        their_secret,
        x25519::PublicKey::from(ours.public),
        Some(their_psk),
        None,
        7,
        None,
    );
    Pair {
        ours,
        psk: Zeroizing::new(our_psk),
        theirs,
        their_public,
    }
}

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let sum = p
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    p[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Data both ways over an established session.
fn exchange_data(keypair: &Keypair, theirs: &mut Tunn) {
    let now = Instant::now();
    let mut out = [0u8; 2048];
    // Ours → theirs.
    for size in [1, 15, 16, 100, 1380] {
        let packet = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], &vec![0xab; size]);
        let mut buf = vec![0u8; 2048];
        buf[16..16 + packet.len()].copy_from_slice(&packet);
        let n = keypair.seal(&mut buf, packet.len(), now).unwrap();
        match theirs.decapsulate(None, &buf[..n], &mut out) {
            TunnResult::WriteToTunnelV4(got, src) => {
                assert_eq!(src, Ipv4Addr::new(10, 0, 0, 1));
                assert_eq!(got, &packet[..], "payload {size}");
            }
            other => panic!("boringtun did not accept our data message: {}", describe(&other)),
        }
    }
    // Theirs → ours.
    for size in [0, 33, 1000] {
        let packet = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], &vec![0x5a; size]);
        let msg = match theirs.encapsulate(&packet, &mut out) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            other => panic!("boringtun did not encrypt: {}", describe(&other)),
        };
        let mut msg = msg;
        assert_eq!(wire::classify(&msg), Ok(wire::Kind::Data));
        let (len, _) = keypair.open(&mut msg, now).expect("we open boringtun's data message");
        assert_eq!(&msg[16..16 + packet.len()], &packet[..]);
        assert_eq!(len, packet.len(), "boringtun does not pad");
    }
}

fn describe(r: &TunnResult<'_>) -> String {
    match r {
        TunnResult::Done => "Done".into(),
        TunnResult::Err(e) => format!("Err({e:?})"),
        TunnResult::WriteToNetwork(m) => {
            format!("WriteToNetwork({} bytes, type {})", m.len(), m[0])
        }
        TunnResult::WriteToTunnelV4(..) => "WriteToTunnelV4".into(),
        TunnResult::WriteToTunnelV6(..) => "WriteToTunnelV6".into(),
    }
}

#[test]
fn we_initiate_to_boringtun_and_exchange_data_both_ways() {
    let mut p = pair([42; 32], [42; 32]);
    let now = Instant::now();
    let (mut handshake, mut init) = InitiatorHandshake::start(&p.ours, &p.psk, &p.their_public, 1234, Tai64n::now());
    CookieJar::new(&p.their_public).stamp(&mut init, now);
    let mut out = [0u8; 2048];
    let response = match p.theirs.decapsulate(None, &init, &mut out) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        other => panic!("boringtun did not answer our initiation: {}", describe(&other)),
    };
    assert_eq!(wire::classify(&response), Ok(wire::Kind::Response));
    assert_eq!(wire::receiver_index(&response), 1234);
    let mut checker = CookieChecker::new(&p.ours.public, now);
    assert_eq!(
        checker.verify(&response, "198.18.0.2:51820".parse().unwrap(), false, now),
        MacVerdict::Accept
    );
    let keys = handshake.finish(&response).expect("boringtun's response authenticates");
    let keypair = Keypair::new(&keys, now);
    exchange_data(&keypair, &mut p.theirs);
}

#[test]
fn boringtun_initiates_to_us_and_we_exchange_data_both_ways() {
    let mut p = pair([9; 32], [9; 32]);
    let now = Instant::now();
    let mut out = [0u8; 2048];
    let init = match p.theirs.format_handshake_initiation(&mut out, false) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        other => panic!("boringtun made no initiation: {}", describe(&other)),
    };
    let mut checker = CookieChecker::new(&p.ours.public, now);
    assert_eq!(
        checker.verify(&init, "198.18.0.2:51820".parse().unwrap(), false, now),
        MacVerdict::Accept
    );
    let received = consume_initiation(&p.ours, &p.psk, &init).expect("we read boringtun's initiation");
    assert_eq!(received.remote_public, p.their_public);
    assert!(received.timestamp > Tai64n::default());
    let (mut response, keys) = received.respond(555);
    CookieJar::new(&p.their_public).stamp(&mut response, now);
    let keypair = Keypair::new(&keys, now);
    // boringtun completes the handshake and confirms the key with a keepalive.
    match p.theirs.decapsulate(None, &response, &mut out) {
        TunnResult::WriteToNetwork(m) => {
            let mut keepalive = m.to_vec();
            assert_eq!(keypair.open(&mut keepalive, now).expect("keepalive opens").0, 0);
        }
        other => panic!("boringtun did not accept our response: {}", describe(&other)),
    }
    exchange_data(&keypair, &mut p.theirs);
}

#[test]
fn a_different_mesh_key_never_yields_a_session_with_boringtun() {
    let mut p = pair([1; 32], [2; 32]);
    let now = Instant::now();
    // We initiate: boringtun answers, but the response cannot authenticate for us.
    let (mut handshake, mut init) = InitiatorHandshake::start(&p.ours, &p.psk, &p.their_public, 1, Tai64n::now());
    CookieJar::new(&p.their_public).stamp(&mut init, now);
    let mut out = [0u8; 2048];
    let response = match p.theirs.decapsulate(None, &init, &mut out) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        other => panic!("unexpected: {}", describe(&other)),
    };
    assert!(handshake.finish(&response).is_err());
    // boringtun initiates: our response cannot authenticate for it.
    let mut p = pair([1; 32], [2; 32]);
    let init = match p.theirs.format_handshake_initiation(&mut out, false) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        other => panic!("unexpected: {}", describe(&other)),
    };
    let (mut response, _) = consume_initiation(&p.ours, &p.psk, &init).unwrap().respond(2);
    CookieJar::new(&p.their_public).stamp(&mut response, now);
    assert!(matches!(
        p.theirs.decapsulate(None, &response, &mut out),
        TunnResult::Err(_)
    ));
}
