//! Coalescing received TCP segments (and UDP datagrams, when the device takes USO) into
//! super-packets for the TUN device (GRO in userspace).
//!
//! The worker hands every packet that authenticated, passed the replay window, the inner-source
//! check and the policy to [`Coalescer::push`], in arrival order; at the end of the receive batch
//! [`Coalescer::flush`] writes each group with one `writev`: the virtio header, the first
//! packet (headers rewritten for the whole group) and the payloads of the others, straight from
//! the receive buffers. No timer: nothing waits for a later batch.
//!
//! The rules are those of wireguard-go's TCP GRO (and Linux's own): a segment joins the *last*
//! group of its flow when it has the same addresses, ports, IP fields (TOS/traffic class, TTL/hop
//! limit, DF, flow label), ACK number, window and TCP options; carries only ACK, or ACK and PSH;
//! starts exactly where the group ends; is no longer than the group's first payload; and the
//! group stays within 64 KiB. A PSH or a shorter segment ends its group. UDP datagrams of one
//! flow (same addresses, ports and IP fields) merge under the same size rules; the kernel cuts
//! them apart again at exactly those boundaries (`GSO_UDP_L4`). Every segment's checksum
//! is verified before it joins (the merged packet's is left to the kernel as `NEEDS_CSUM`, so a
//! bad one would otherwise be hidden). A packet that cannot join — another protocol, IPv4 options,
//! IPv6 extension headers, other flags, a bad checksum — goes out on its own and ends its flow's
//! group, so no segment overtakes another of its flow.

use std::io::IoSlice;

use super::{
    F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, Layout, MAX_SUPER_PACKET, PROTO_TCP, PROTO_UDP, VnetHeader,
    checksum,
};

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const NONE: u16 = u16::MAX;

/// A packet in the caller's receive buffer: `buf[start..start + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

impl Span {
    fn of<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.start..self.start + self.len]
    }
}

#[derive(Debug)]
struct Group {
    head: Span,
    /// Headers of a TCP segment whose flow may be matched; `None` for anything else.
    layout: Option<Layout>,
    /// More segments may join.
    open: bool,
    gso_size: usize,
    next_seq: u32,
    payload: usize,
    psh: bool,
    /// Members after the head (at most `MAX_MEMBERS`), as a chain through `Coalescer::members`.
    count: usize,
    first_member: u16,
    last_member: u16,
}

/// Groups of one receive batch; preallocated, reused batch after batch.
#[derive(Debug)]
pub struct Coalescer {
    groups: Vec<Group>,
    /// (payload of a member, next member of its group).
    members: Vec<(Span, u16)>,
    merged: u64,
    /// Coalesce UDP too (the TUN device accepted USO).
    udp: bool,
}

impl Coalescer {
    /// Room for `batch` packets per flush without allocating; `udp`: merge UDP datagrams too.
    pub fn new(batch: usize, udp: bool) -> Self {
        Coalescer {
            groups: Vec::with_capacity(batch),
            members: Vec::with_capacity(batch),
            merged: 0,
            udp,
        }
    }

    /// Segments that joined a group (were not written on their own) since the last call.
    pub fn take_merged(&mut self) -> u64 {
        std::mem::take(&mut self.merged)
    }

    /// Add the packet `buf[span]` (a whole IP packet, no padding).
    pub fn push(&mut self, buf: &[u8], span: Span) {
        let p = span.of(buf);
        let layout = Layout::whole(p).filter(|l| l.proto == PROTO_TCP || (self.udp && l.proto == PROTO_UDP));
        let Some(l) = layout else {
            return self.start(span, None, false);
        };
        let t = l.ip_len;
        let tcp = l.proto == PROTO_TCP;
        let payload = p.len() - l.hdr_len;
        // UDP has no flags and no sequence: only sizes decide.
        let (flags_ok, psh, seq) = if tcp {
            let flags = p[t + 13];
            (
                flags == TCP_ACK || flags == TCP_ACK | TCP_PSH,
                flags & TCP_PSH != 0,
                u32::from_be_bytes(p[t + 4..t + 8].try_into().expect("4 bytes")),
            )
        } else {
            (true, false, 0)
        };
        let eligible = (l.v6 || l.ip_len == 20) && flags_ok && payload > 0 && checksum::transport_valid(p, &l);
        let last_of_flow = self.groups.iter().rposition(|g| {
            g.layout
                .is_some_and(|gl| gl.proto == l.proto && gl.hdr_len == l.hdr_len && same_flow(g.head.of(buf), p, &l))
        });
        if let Some(gi) = last_of_flow {
            let g = &mut self.groups[gi];
            let headers_after = l.hdr_len - if l.v6 { 40 } else { 0 };
            if eligible
                && g.open
                && (!tcp || seq == g.next_seq)
                && payload <= g.gso_size
                && headers_after + g.payload + payload <= MAX_SUPER_PACKET
                && g.count < MAX_MEMBERS
            {
                let member = self.members.len() as u16;
                self.members.push((
                    Span {
                        start: span.start + l.hdr_len,
                        len: payload,
                    },
                    NONE,
                ));
                if g.last_member == NONE {
                    g.first_member = member;
                } else {
                    self.members[usize::from(g.last_member)].1 = member;
                }
                g.last_member = member;
                g.count += 1;
                g.next_seq = seq.wrapping_add(payload as u32);
                g.payload += payload;
                g.psh = psh;
                g.open = !psh && payload == g.gso_size;
                self.merged += 1;
                return;
            }
            // Cannot join: it goes out on its own (or heads a new group) after the old group.
            g.open = false;
        }
        self.start(span, Some(l), eligible);
        if eligible {
            let g = self.groups.last_mut().expect("just pushed");
            g.gso_size = payload;
            g.next_seq = seq.wrapping_add(payload as u32);
            g.payload = payload;
            g.psh = psh;
            g.open = !psh;
        }
    }

    fn start(&mut self, head: Span, layout: Option<Layout>, open: bool) {
        self.groups.push(Group {
            head,
            layout,
            open,
            gso_size: 0,
            next_seq: 0,
            payload: 0,
            psh: false,
            count: 0,
            first_member: NONE,
            last_member: NONE,
        });
    }

    /// Write every group, in the order their first packets arrived, through `write` (one call
    /// per packet for the TUN device: the virtio header first), and start an empty batch.
    pub fn flush(&mut self, buf: &mut [u8], mut write: impl FnMut(&[IoSlice<'_>])) {
        // First rewrite the heads of merged groups, then hand out the (shared) slices.
        for g in &self.groups {
            if g.first_member != NONE {
                let l = g.layout.expect("only TCP segments and UDP datagrams merge");
                rewrite_head(&mut buf[g.head.start..g.head.start + g.head.len], &l, g.payload, g.psh);
            }
        }
        for g in &self.groups {
            let hdr = match (g.first_member, g.layout) {
                (NONE, _) | (_, None) => VnetHeader::default(),
                (_, Some(l)) => VnetHeader {
                    flags: F_NEEDS_CSUM,
                    gso_type: match (l.proto, l.v6) {
                        (PROTO_UDP, _) => GSO_UDP_L4,
                        (_, true) => GSO_TCPV6,
                        (_, false) => GSO_TCPV4,
                    },
                    hdr_len: l.hdr_len as u16,
                    gso_size: g.gso_size as u16,
                    csum_start: l.ip_len as u16,
                    csum_offset: (l.csum_at() - l.ip_len) as u16,
                },
            }
            .encode();
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            iov[0] = IoSlice::new(&hdr);
            iov[1] = IoSlice::new(g.head.of(buf));
            let mut n = 2;
            let mut m = g.first_member;
            while m != NONE {
                let (span, next) = self.members[usize::from(m)];
                iov[n] = IoSlice::new(span.of(buf));
                n += 1;
                m = next;
            }
            write(&iov[..n]);
        }
        self.groups.clear();
        self.members.clear();
    }
}

/// Segments after the first in one super-packet: those of one receive batch.
const MAX_MEMBERS: usize = crate::dataplane::BATCH - 1;
/// Most slices one write takes: virtio header, the first packet, the members' payloads.
const MAX_IOV: usize = 2 + MAX_MEMBERS;

/// Whether `p` belongs to the flow of `head` (both with the headers `l`): every IP and TCP field
/// but lengths, IPv4 id, checksums, sequence number and flags is equal (for UDP: the IP fields
/// and the ports).
fn same_flow(head: &[u8], p: &[u8], l: &Layout) -> bool {
    let t = l.ip_len;
    let ip_same = if l.v6 {
        // version, traffic class, flow label; next header, hop limit; addresses
        head[0..4] == p[0..4] && head[6..40] == p[6..40]
    } else {
        // version/IHL, TOS; DF/fragment; TTL, protocol; addresses
        head[0..2] == p[0..2] && head[6..10] == p[6..10] && head[12..20] == p[12..20]
    };
    if !ip_same || head[t..t + 4] != p[t..t + 4] {
        return false; // other addresses, IP fields or ports
    }
    l.proto == PROTO_UDP
        || head[t + 8..t + 13] == p[t + 8..t + 13] // ACK number, data offset
        && head[t + 14..t + 16] == p[t + 14..t + 16] // window
        && head[t + 20..l.hdr_len] == p[t + 20..l.hdr_len] // options
}

/// Turn the first segment's headers into the super-packet's: lengths (with UDP's own), IPv4
/// header checksum, PSH of the last segment, and the pseudo-header sum in the transport
/// checksum (`NEEDS_CSUM`).
fn rewrite_head(head: &mut [u8], l: &Layout, payload: usize, psh: bool) {
    let total = l.hdr_len + payload;
    if l.v6 {
        head[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    } else {
        head[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        checksum::set_ipv4_header(head, l.ip_len);
    }
    let t = l.ip_len;
    if l.proto == PROTO_UDP {
        head[t + 4..t + 6].copy_from_slice(&((total - t) as u16).to_be_bytes());
    } else if psh {
        head[t + 13] |= TCP_PSH;
    }
    let pseudo = checksum::fold(checksum::pseudo_header(head, l.v6, l.proto, total - t));
    let at = l.csum_at();
    head[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
}

/// The bytes one `writev` of `iov` puts on the TUN device (for tests and fuzzing).
#[cfg(test)]
pub(crate) fn concat(iov: &[IoSlice<'_>]) -> (VnetHeader, Vec<u8>) {
    let all: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
    (VnetHeader::parse(&all).unwrap(), all[super::VNET_HDR_LEN..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{
        GSO_NONE,
        split::{
            Segments,
            tests::{as_super, payload, tcp_packet},
        },
    };

    /// Lay `packets` out in one buffer (slots of 2,000 bytes), push them all, flush.
    fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHeader, Vec<u8>)> {
        let mut buf = vec![0u8; packets.len() * 2000];
        let mut c = Coalescer::new(64, true);
        for (i, p) in packets.iter().enumerate() {
            buf[i * 2000..i * 2000 + p.len()].copy_from_slice(p);
        }
        for (i, p) in packets.iter().enumerate() {
            c.push(
                &buf,
                Span {
                    start: i * 2000,
                    len: p.len(),
                },
            );
        }
        let mut out = Vec::new();
        c.flush(&mut buf, |iov| out.push(concat(iov)));
        out
    }

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
}
