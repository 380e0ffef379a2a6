//! Coalescing rules, table-driven, and the split-then-coalesce property.

use super::*;
use crate::offload::{
    GSO_NONE,
    split::{
        Segments,
        testing::{as_super, payload, tcp_packet},
    },
};

fn segs(v6: bool, seq: u32, sizes: &[usize], last_flags: u8) -> Vec<Vec<u8>> {
    let mut seq = seq;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let flags = if i + 1 == sizes.len() { last_flags } else { TCP_ACK };
            let p = tcp_packet(v6, 0, 12, seq, flags, &payload(n, i as u8));
            seq = seq.wrapping_add(n as u32);
            p
        })
        .collect()
}

/// Group sizes (packets per write) and whether each merged write is a valid super-packet
/// that splits back into exactly the segments it was made of.
fn shape(input: &[Vec<u8>], out: &[(VnetHeader, Vec<u8>)]) -> Vec<usize> {
    let mut used = 0;
    out.iter()
        .map(|(hdr, p)| {
            if hdr.gso_type == GSO_NONE {
                assert_eq!(hdr, &VnetHeader::default());
                used += 1;
                return 1;
            }
            let mut p = p.clone();
            let s = Segments::new(*hdr, &mut p, 1500).expect("a valid super-packet");
            for i in 0..s.count() {
                let mut seg = vec![0u8; 1500];
                let n = s.write(i, &mut seg);
                let want = &input[used + i];
                // IPv4 ids of merged segments come from the first: compare without them.
                let (a, b) = (&seg[..n], &want[..]);
                if a[0] >> 4 == 4 {
                    assert_eq!((&a[..4], &a[6..10], &a[12..]), (&b[..4], &b[6..10], &b[12..]));
                } else {
                    assert_eq!(a, b, "segment {i} of a merged write");
                }
            }
            used += s.count();
            s.count()
        })
        .collect()
}

#[test]
fn segments_of_one_flow_coalesce_and_split_back() {
    for v6 in [false, true] {
        let input = segs(v6, 1000, &[1200, 1200, 1200, 1200], TCP_ACK | TCP_PSH);
        let out = coalesce(&input);
        assert_eq!(shape(&input, &out), [4], "v6={v6}");
        let hdr = out[0].0;
        assert_eq!((hdr.gso_size, hdr.flags), (1200, F_NEEDS_CSUM));
    }
}

#[test]
fn the_rules_decide_the_groups() {
    let flow = |sizes: &[usize], flags| segs(false, 7, sizes, flags);
    let mut out_of_order = flow(&[1000, 1000, 1000], TCP_ACK);
    out_of_order.swap(1, 2);
    let mut bad_checksum = flow(&[1000, 1000, 1000], TCP_ACK);
    bad_checksum[1][60] ^= 1;
    let mut replay_hole = flow(&[1000, 1000, 1000, 1000], TCP_ACK);
    replay_hole.remove(1); // the replay window dropped this one
    let mut other_ack = flow(&[1000, 1000], TCP_ACK);
    other_ack[1][20 + 11] ^= 1;
    other_ack[1][36..38].fill(0); // fix the checksum by hand below
    let l = Layout::whole(&other_ack[1]).unwrap();
    let p = &mut other_ack[1];
    let c = checksum::checksum(&p[20..], checksum::pseudo_header(p, false, PROTO_TCP, p.len() - 20));
    p[36..38].copy_from_slice(&c.to_be_bytes());
    assert!(checksum::transport_valid(p, &l));
    let mut interleaved = flow(&[1000, 1000, 1000], TCP_ACK);
    let mut other = tcp_packet(false, 0, 12, 5, TCP_ACK, &payload(100, 0));
    other[21] ^= 1; // another source port (checksum left wrong: it only has to be another flow)
    interleaved.insert(1, other);
    let ip_options = vec![
        tcp_packet(false, 4, 12, 7, TCP_ACK, &payload(1000, 0)),
        tcp_packet(false, 4, 12, 1007, TCP_ACK, &payload(1000, 1)),
    ];
    type Case<'a> = (&'a str, Vec<Vec<u8>>, &'a [usize]);
    let cases: &[Case] = &[
        ("PSH ends a group", flow(&[1000, 1000, 1000], TCP_ACK | TCP_PSH), &[3]),
        ("a shorter last segment", flow(&[1000, 1000, 400], TCP_ACK), &[3]),
        (
            "a shorter segment ends the group",
            flow(&[1000, 400, 1000], TCP_ACK),
            &[2, 1],
        ),
        (
            "a longer segment starts a new group",
            flow(&[400, 1000, 1000], TCP_ACK),
            &[1, 2],
        ),
        ("FIN goes alone", flow(&[1000, 1000, 1000], TCP_ACK | 0x01), &[2, 1]),
        ("out of order", out_of_order, &[1, 1, 1]),
        ("bad checksum goes alone and ends the group", bad_checksum, &[1, 1, 1]),
        ("a hole left by a replayed segment", replay_hole, &[1, 2]),
        ("another ACK number", other_ack, &[1, 1]),
        ("another flow in between", interleaved, &[3, 1]),
        ("IPv4 options are not merged", ip_options, &[1, 1]),
        ("64 KiB at most", flow(&[1400; 48], TCP_ACK), &[46, 2]),
        ("a batch at most", flow(&[100; 70], TCP_ACK), &[64, 6]),
    ];
    for (name, input, want) in cases {
        let out = coalesce(input);
        let got: Vec<usize> = if *name == "another flow in between" {
            out.iter()
                .map(|(h, p)| if h.gso_size == 0 { 1 } else { (p.len() - 52) / 1000 })
                .collect()
        } else {
            shape(input, &out)
        };
        assert_eq!(&got, want, "{name}");
    }
}

/// A UDP datagram of `len` payload bytes from port `sport`.
fn udp_packet(v6: bool, sport: u16, len: usize, salt: u8) -> Vec<u8> {
    let mut p = tcp_packet(v6, 0, 0, 0, 0, &[]);
    let t = if v6 { 40 } else { 20 };
    p.truncate(t + 8);
    if v6 {
        p[6] = PROTO_UDP;
    } else {
        p[9] = PROTO_UDP;
    }
    p.extend_from_slice(&payload(len, salt));
    let total = p.len();
    if v6 {
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        checksum::set_ipv4_header(&mut p, 20);
    }
    p[t..t + 2].copy_from_slice(&sport.to_be_bytes());
    p[t + 4..t + 6].copy_from_slice(&((total - t) as u16).to_be_bytes());
    p[t + 6..t + 8].fill(0);
    let mut c = checksum::checksum(&p[t..], checksum::pseudo_header(&p, v6, PROTO_UDP, total - t));
    if c == 0 {
        c = 0xffff;
    }
    p[t + 6..t + 8].copy_from_slice(&c.to_be_bytes());
    p
}

#[test]
fn udp_datagrams_of_one_flow_coalesce_by_size_and_split_back() {
    for v6 in [false, true] {
        let flow = |sizes: &[usize]| -> Vec<Vec<u8>> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| udp_packet(v6, 9000, n, i as u8))
                .collect()
        };
        let mut other_port = flow(&[64, 64, 64]);
        other_port[1] = udp_packet(v6, 9001, 64, 1);
        type Case<'a> = (&'a str, Vec<Vec<u8>>, &'a [usize]);
        let cases: &[Case] = &[
            ("equal sizes", flow(&[64; 10]), &[10]),
            ("a shorter last", flow(&[500, 500, 100]), &[3]),
            ("a shorter one ends the group", flow(&[500, 100, 500]), &[2, 1]),
            ("another port in between", other_port, &[2, 1]),
        ];
        for (name, input, want) in cases {
            let out = coalesce(input);
            let got: Vec<usize> = out
                .iter()
                .map(|(h, p)| {
                    if h.gso_type == GSO_NONE {
                        return 1;
                    }
                    assert_eq!(h.gso_type, GSO_UDP_L4, "{name}");
                    let mut p = p.clone();
                    Segments::new(*h, &mut p, 1500)
                        .expect("a valid USO super-packet")
                        .count()
                })
                .collect();
            assert_eq!(&got, want, "{name} (v6={v6})");
        }
        // Split back, the datagrams are the ones that went in (IPv4 ids and header
        // checksums aside).
        let input = flow(&[700, 700, 700, 300]);
        let out = coalesce(&input);
        let (h, mut p) = out[0].clone();
        let s = Segments::new(h, &mut p, 1500).unwrap();
        assert_eq!(s.count(), input.len());
        for (i, want) in input.iter().enumerate() {
            let mut seg = vec![0u8; 1500];
            let n = s.write(i, &mut seg);
            let strip = |b: &[u8]| {
                if v6 {
                    b.to_vec()
                } else {
                    [&b[..4], &b[6..10], &b[12..]].concat()
                }
            };
            assert_eq!(strip(&seg[..n]), strip(want), "datagram {i} (v6={v6})");
        }
    }
}

#[test]
fn udp_is_not_merged_without_uso() {
    let input: Vec<Vec<u8>> = (0..4).map(|i| udp_packet(false, 9000, 64, i)).collect();
    let mut buf = vec![0u8; 4 * 2000];
    let mut c = Coalescer::new(64, false);
    for (i, p) in input.iter().enumerate() {
        buf[i * 2000..i * 2000 + p.len()].copy_from_slice(p);
        c.push(
            &buf,
            Span {
                start: i * 2000,
                len: p.len(),
            },
        );
    }
    let mut writes = 0;
    c.flush(&mut buf, |iov| {
        assert_eq!(concat(iov).0, VnetHeader::default());
        writes += 1;
    });
    assert_eq!(writes, 4);
}

#[test]
fn non_tcp_and_garbage_pass_through_unchanged() {
    let udp = {
        let mut p = tcp_packet(false, 0, 0, 0, 0, &payload(100, 1));
        p[9] = 17;
        p
    };
    let input = vec![udp.clone(), vec![0x45; 10], vec![0x60, 0, 0]];
    let out = coalesce(&input);
    assert_eq!(out.len(), 3);
    for ((h, p), want) in out.iter().zip(&input) {
        assert_eq!((h, p), (&VnetHeader::default(), want));
    }
}

/// Split then coalesce is the identity: any TSO super-packet the kernel could hand us, cut
/// into segments and coalesced again, is the same super-packet with the same segment size.
#[test]
fn split_then_coalesce_is_the_identity() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _ in 0..300 {
        let v6 = next(2) == 1;
        let tcp_opts = 4 * next(6) as usize;
        // What the kernel hands over: an MSS-sized segment size, up to 64 KiB.
        let gso = 1000 + next(400) as usize;
        let len = 1 + next(60_000) as usize;
        let flags = if next(2) == 1 { TCP_ACK | TCP_PSH } else { TCP_ACK };
        let seq = next(u64::from(u32::MAX)) as u32;
        let original = tcp_packet(v6, 0, tcp_opts, seq, flags, &payload(len, next(256) as u8));
        let (hdr, mut sup) = as_super(original.clone(), gso as u16);
        let want = sup.clone();
        let s = Segments::new(hdr, &mut sup, 1500).unwrap();
        let pieces: Vec<Vec<u8>> = (0..s.count())
            .map(|i| {
                let mut out = vec![0u8; 1500];
                let n = s.write(i, &mut out);
                out.truncate(n);
                out
            })
            .collect();
        let out = coalesce(&pieces);
        if pieces.len() == 1 {
            assert_eq!(out, vec![(VnetHeader::default(), original)]);
            continue;
        }
        assert_eq!(out.len(), 1, "one flow, in order: one write");
        assert_eq!(out[0].0, hdr);
        let first_difference = out[0].1.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!((out[0].1.len(), first_difference), (want.len(), None));
    }
}
