//! Targets for bytes as they come off a socket: the wire classifier and every message parser,
//! STUN, port-mapping answers (PCP, NAT-PMP, UPnP-IGD), netlink notifications and the SSH carrier's framing.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use curve25519_dalek::MontgomeryPoint;
use zeroize::Zeroizing;

use crate::{
    nat::portmap::{natpmp, pcp, upnp},
    node::netwatch::concerns_other_interfaces,
    protocol::{
        framing::{self, Deframer},
        noise::{CookieChecker, CookieJar, LocalStatic, MacVerdict, SessionKeys, consume_initiation},
        probe,
        session::Keypair,
        stun,
        wire::{self, Kind},
    },
};

/// The static keys the wire target and its seeds use (`seed` repeated as the secret).
pub(super) fn local(seed: u8) -> LocalStatic {
    let secret = [seed; 32];
    LocalStatic {
        public: MontgomeryPoint::mul_base_clamped(secret).to_bytes(),
        secret: Zeroizing::new(secret),
    }
}

/// A datagram as the worker and the slow path meet it: the classifier first, then the parser
/// of its type with fixed keys. What the classifier accepts has exactly its type's size.
pub fn wire(data: &[u8]) {
    let now = Instant::now();
    let us = local(1);
    let psk = Zeroizing::new([3u8; 32]);
    let src: SocketAddr = "198.18.0.1:51820".parse().expect("an address");
    let mut msg = data.to_vec();
    let kind = wire::classify(&msg);
    if let Ok(kind) = kind {
        let expected = match kind {
            Kind::Initiation => Some(wire::INITIATION_LEN),
            Kind::Response => Some(wire::RESPONSE_LEN),
            Kind::CookieReply => Some(wire::COOKIE_REPLY_LEN),
            Kind::Data | Kind::Stun => None,
        };
        assert!(
            expected.is_none_or(|len| len == msg.len()),
            "{kind:?} of {} bytes",
            msg.len()
        );
        // Senders pad data to 16 bytes, but receivers take any length (as WireGuard does).
        assert!(kind != Kind::Data || msg.len() >= wire::DATA_MIN_LEN);
    }
    match kind {
        Ok(Kind::Initiation) => {
            let mut checker = CookieChecker::new(&us.public, now);
            for under_load in [false, true] {
                if checker.verify(&msg, src, under_load, now) == MacVerdict::Accept {
                    let _ = consume_initiation(&us, &psk, &msg);
                }
            }
        }
        Ok(Kind::Response) => {
            let _ = CookieChecker::new(&us.public, now).verify(&msg, src, false, now);
        }
        Ok(Kind::CookieReply) => {
            let mut jar = CookieJar::new(&local(2).public);
            let mut stamped = [0u8; wire::INITIATION_LEN];
            stamped[0] = wire::MSG_INITIATION;
            jar.stamp(&mut stamped, now);
            let _ = jar.consume_reply(&msg, now);
        }
        Ok(Kind::Data) => {
            let keys = SessionKeys {
                send: Zeroizing::new([4; 32]),
                recv: Zeroizing::new([4; 32]),
                local_index: wire::receiver_index(&msg),
                remote_index: 2,
                is_initiator: true,
            };
            let keypair = Keypair::new(&keys, now);
            if let Ok((len, _)) = keypair.open(&mut msg, now) {
                let _ = probe::decode(&msg[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + len]);
            }
        }
        Ok(Kind::Stun) => {
            let _ = stun::parse_binding_response(&msg, &[0; 12]);
        }
        Err(_) => {}
    }
}

/// STUN: requests (the coordinator's STUN server) and responses (a node's discovery). The
/// first 12 bytes are the transaction the node is waiting for. A response we build for an
/// address parses back to that address.
pub fn stun(data: &[u8]) {
    let Some((transaction, msg)) = data.split_first_chunk::<12>() else {
        return;
    };
    if let Some(t) = stun::parse_binding_request(msg) {
        let seen = msg
            .get(..18)
            .and_then(|b| {
                let port = u16::from_be_bytes([b[16], b[17]]);
                let ip: [u8; 16] = b[..16].try_into().ok()?;
                Some(SocketAddr::new(std::net::Ipv6Addr::from(ip).into(), port))
            })
            .unwrap_or_else(|| "198.18.0.1:4000".parse().expect("an address"));
        let answer = stun::binding_response(t, seen);
        assert_eq!(stun::parse_binding_response(&answer, &t), Some(stun::canonical(seen)));
    }
    let _ = stun::is_stun(msg);
    let _ = stun::parse_binding_response(msg, transaction);
}

/// PCP and NAT-PMP answers from whatever answers on the gateway's port 5351.
pub fn portmap(data: &[u8]) {
    let Some((nonce, msg)) = data.split_first_chunk::<12>() else {
        return;
    };
    let internal = u16::from_be_bytes([nonce[0], nonce[1]]);
    let _ = pcp::parse_map(msg, nonce);
    let _ = natpmp::parse_map(msg, internal);
    let _ = natpmp::parse_address(msg);
}

/// Route-netlink notification batches (the first four bytes: the mesh interface's index).
pub fn netlink(data: &[u8]) {
    let Some((index, batch)) = data.split_first_chunk::<4>() else {
        return;
    };
    let _ = concerns_other_interfaces(batch, u32::from_ne_bytes(*index));
}

/// The SSH carrier's stream, split into reads of the sizes the first bytes say: the messages
/// that come out are the same however the stream is split.
pub fn ssh_framing(data: &[u8]) {
    let Some((&cuts, rest)) = data.split_first() else {
        return;
    };
    let (sizes, stream) = rest.split_at(usize::from(cuts).min(rest.len()));
    // The reference: the whole stream at once.
    let mut whole = Vec::new();
    let mut at = stream;
    while let Some((len, body)) = at.split_first_chunk::<{ framing::PREFIX_LEN }>() {
        let len = usize::from(u16::from_be_bytes(*len));
        if body.len() < len {
            break;
        }
        whole.push(body[..len].to_vec());
        at = &body[len..];
    }
    let mut frames = Deframer::default();
    let mut got = Vec::new();
    let mut left = stream;
    let mut size = sizes.iter().cycle();
    while !left.is_empty() {
        let spare = frames.spare();
        assert!(!spare.is_empty(), "the deframer has no room to read into");
        let want = size.next().map_or(usize::MAX, |&s| usize::from(s).max(1) * 97);
        let n = want.min(spare.len()).min(left.len());
        spare[..n].copy_from_slice(&left[..n]);
        frames.filled(n);
        left = &left[n..];
        while let Some(msg) = frames.next_message() {
            got.push(msg.to_vec());
        }
    }
    assert_eq!(got, whole);
    let mut reframed = Vec::new();
    for m in &got {
        framing::frame(m, &mut reframed).expect("a deframed message fits a frame");
    }
    assert_eq!(reframed.len() + frames.pending(), stream.len());
}

/// What a UPnP gateway answers to AddPortMapping and GetExternalIPAddress, parsed by igd-next
/// and checked by us: a server on loopback answers the two requests with the input (split at
/// the offset its first byte gives; bare bodies get an HTTP header). An address we accept is
/// one a peer outside could reach.
pub fn upnp(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let (first, second) = rest.split_at((usize::from(cut) * 8).min(rest.len()));
    let answers: Vec<Vec<u8>> = [first, second]
        .iter()
        .map(|a| {
            if a.starts_with(b"HTTP/") {
                a.to_vec()
            } else {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    a.len()
                );
                [head.as_bytes(), a].concat()
            }
        })
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let addr = listener.local_addr().expect("its address");
    let server = std::thread::spawn(move || {
        for answer in answers {
            let Ok((mut stream, _)) = listener.accept() else { return };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            if read_request(&mut stream).is_some() {
                let _ = stream.write_all(&answer);
            }
        }
    });
    let igd = igd_next::Gateway {
        addr,
        root_url: "/rootDesc.xml".into(),
        control_url: "/ctl/IPConn".into(),
        control_schema_url: "/WANIPCn.xml".into(),
        control_schema: HashMap::new(),
        service_type: "urn:schemas-upnp-org:service:WANIPConnection:1".into(),
    };
    let local = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 51820);
    if let Ok(external) = upnp::map(&igd, local, 51820, 120) {
        assert!(!external.ip().is_loopback() && !external.ip().is_unspecified() && !external.ip().is_multicast());
    }
    // The server waits for a second request that may never come: connect so it returns.
    for _ in 0..2 {
        let _ = TcpStream::connect(addr);
    }
    server.join().expect("the loopback server");
}

/// Read one HTTP request (head and `Content-Length` body); `None` if the client went away.
fn read_request(stream: &mut TcpStream) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let body: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + body {
            return Some(());
        }
    }
}
