//! Splitting what one TUN read returned into the packets that go on the wire.
//!
//! With offloads on, the kernel hands a TCP (TSO) or UDP (USO) super-packet of up to 64 KiB with
//! one set of headers and a segment size, and may leave the transport checksum for us to finish
//! (`NEEDS_CSUM`). [`Segments::new`] checks the header against the packet once; then
//! [`Segments::write`] builds segment `i` straight into the caller's send slot: the headers copied
//! and fixed (IPv4 total length, id and header checksum; IPv6 payload length; TCP sequence number,
//! FIN and PSH only on the last segment, CWR only on the first; UDP length) and the transport
//! checksum computed in full.

use super::{
    GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, Layout, OffloadError, PROTO_TCP, PROTO_UDP, VnetHeader,
    checksum,
};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// The packets one TUN read holds: one ordinary packet, or the segments of a super-packet.
#[derive(Debug)]
pub struct Segments<'a> {
    packet: &'a [u8],
    /// Headers and segment size of a super-packet; `None` for an ordinary packet.
    gso: Option<(Layout, usize)>,
    count: usize,
}

impl<'a> Segments<'a> {
    /// Check `hdr` against `packet` (what followed the header in the read). An ordinary packet
    /// whose checksum is left to us gets it finished here, in place. Every segment is at most
    /// `mtu` bytes.
    pub fn new(hdr: VnetHeader, packet: &'a mut [u8], mtu: usize) -> Result<Segments<'a>, OffloadError> {
        let gso_type = hdr.gso_type & !GSO_ECN;
        if gso_type == GSO_NONE {
            if hdr.flags & super::F_NEEDS_CSUM != 0 {
                finish_checksum(packet, hdr)?;
            }
            if packet.len() > mtu || packet.is_empty() {
                return Err(OffloadError::BadSegmentSize);
            }
            return Ok(Segments {
                packet,
                gso: None,
                count: 1,
            });
        }
        let layout = Layout::of(packet).ok_or(OffloadError::BadHeaders)?;
        let expected = match gso_type {
            GSO_TCPV4 => (false, PROTO_TCP),
            GSO_TCPV6 => (true, PROTO_TCP),
            GSO_UDP_L4 => (layout.v6, PROTO_UDP),
            _ => return Err(OffloadError::UnknownGso),
        };
        if (layout.v6, layout.proto) != expected {
            return Err(OffloadError::BadHeaders);
        }
        let gso_size = usize::from(hdr.gso_size);
        if gso_size == 0 || layout.hdr_len + gso_size > mtu {
            return Err(OffloadError::BadSegmentSize);
        }
        let payload = packet.len() - layout.hdr_len;
        if payload == 0 {
            return Err(OffloadError::BadHeaders);
        }
        Ok(Segments {
            packet,
            gso: Some((layout, gso_size)),
            count: payload.div_ceil(gso_size),
        })
    }

    /// How many packets go on the wire.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The packet as read: a super-packet's addresses and ports are every segment's.
    pub fn packet(&self) -> &[u8] {
        self.packet
    }

    /// Write packet `i` (< `count()`) to the start of `out` (at least `mtu` bytes); its length.
    pub fn write(&self, i: usize, out: &mut [u8]) -> usize {
        let Some((layout, gso_size)) = self.gso else {
            out[..self.packet.len()].copy_from_slice(self.packet);
            return self.packet.len();
        };
        let h = layout.hdr_len;
        let start = h + i * gso_size;
        let end = (start + gso_size).min(self.packet.len());
        let len = h + end - start;
        out[..h].copy_from_slice(&self.packet[..h]);
        out[h..len].copy_from_slice(&self.packet[start..end]);
        let seg = &mut out[..len];
        let last = i + 1 == self.count;
        if layout.v6 {
            seg[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            let id = u16::from_be_bytes([seg[4], seg[5]]).wrapping_add(i as u16);
            seg[4..6].copy_from_slice(&id.to_be_bytes());
            checksum::set_ipv4_header(seg, layout.ip_len);
        }
        let l4 = layout.ip_len;
        if layout.proto == PROTO_TCP {
            let seq = u32::from_be_bytes(seg[l4 + 4..l4 + 8].try_into().expect("4 bytes"));
            let seq = seq.wrapping_add((i * gso_size) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if !last {
                seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                seg[l4 + 13] &= !TCP_CWR;
            }
        } else {
            seg[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
        }
        let at = layout.csum_at();
        seg[at..at + 2].fill(0);
        let pseudo = checksum::pseudo_header(seg, layout.v6, layout.proto, len - l4);
        let mut c = checksum::checksum(&seg[l4..], pseudo);
        if c == 0 && layout.proto == PROTO_UDP {
            c = 0xffff; // 0 means "no checksum" in UDP
        }
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        len
    }
}

/// Finish a checksum the kernel left partial: the field at `csum_start + csum_offset` holds the
/// pseudo-header sum; the checksum covers everything from `csum_start`.
fn finish_checksum(packet: &mut [u8], hdr: VnetHeader) -> Result<(), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if start >= packet.len() || at + 2 > packet.len() {
        return Err(OffloadError::BadChecksumOffset);
    }
    let c = checksum::checksum(&packet[start..], 0);
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Packets as the kernel hands them over, for the tests and the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testing {
    use super::*;
    use crate::offload::F_NEEDS_CSUM;

    /// A TCP/IP packet: `v6`, IPv4 options (`ip_opts` bytes), TCP options, flags, payload.
    pub(crate) fn tcp_packet(
        v6: bool,
        ip_opts: usize,
        tcp_opts: usize,
        seq: u32,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 + ip_opts };
        let tcp_len = 20 + tcp_opts;
        let total = ip_len + tcp_len + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x40 | (ip_len / 4) as u8;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[10, 99, 0, 1]);
            p[16..20].copy_from_slice(&[10, 99, 0, 2]);
            for (i, b) in p[20..ip_len].iter_mut().enumerate() {
                *b = if i + 1 == ip_opts { 0 } else { 1 }; // NOPs, then end of options
            }
            checksum::set_ipv4_header(&mut p, ip_len);
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
        p[t + 12] = ((tcp_len / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        for (i, b) in p[t + 20..t + tcp_len].iter_mut().enumerate() {
            *b = if i % 4 == 3 { 8 } else { 1 };
        }
        p[t + tcp_len..].copy_from_slice(payload);
        let pseudo = checksum::pseudo_header(&p, v6, PROTO_TCP, total - t);
        let c = checksum::checksum(&p[t..], pseudo);
        p[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The kernel's view of a TSO super-packet: the TCP checksum holds only the pseudo-header.
    pub(crate) fn as_super(mut p: Vec<u8>, gso_size: u16) -> (VnetHeader, Vec<u8>) {
        let l = Layout::of(&p).unwrap();
        let pseudo = checksum::fold(checksum::pseudo_header(&p, l.v6, PROTO_TCP, p.len() - l.ip_len));
        p[l.csum_at()..l.csum_at() + 2].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if l.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: l.hdr_len as u16,
            gso_size,
            csum_start: l.ip_len as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }

    pub(crate) fn payload(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::offload::{F_NEEDS_CSUM, checksum::transport_valid};

    fn split_all(hdr: VnetHeader, mut p: Vec<u8>, mtu: usize) -> Result<Vec<Vec<u8>>, OffloadError> {
        let segs = Segments::new(hdr, &mut p, mtu)?;
        Ok((0..segs.count())
            .map(|i| {
                let mut out = vec![0u8; mtu];
                let n = segs.write(i, &mut out);
                out.truncate(n);
                out
            })
            .collect())
    }

    #[test]
    fn tso_super_packets_split_into_valid_segments() {
        // (IPv6, IPv4 option bytes, TCP option bytes, payload, segment size)
        for (v6, ip_opts, tcp_opts, len, gso) in [
            (false, 0, 0, 4000, 1000),
            (false, 8, 12, 4001, 1000),
            (true, 0, 12, 65000, 1348),
            (true, 0, 0, 999, 1000),
        ] {
            let data = payload(len, 3);
            let flags = 0x10 | TCP_PSH | TCP_FIN | TCP_CWR;
            let (hdr, p) = as_super(tcp_packet(v6, ip_opts, tcp_opts, 0xffff_f000, flags, &data), gso);
            let segs = split_all(hdr, p, 1420).unwrap();
            assert_eq!(segs.len(), len.div_ceil(usize::from(gso)));
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let l = Layout::whole(s).expect("lengths cover the segment");
                assert!(transport_valid(s, &l), "segment {i} checksum");
                if !v6 {
                    assert_eq!(checksum::checksum(&s[..l.ip_len], 0), 0, "IPv4 header checksum");
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
                }
                let t = l.ip_len;
                let seq = u32::from_be_bytes(s[t + 4..t + 8].try_into().unwrap());
                assert_eq!(seq, 0xffff_f000u32.wrapping_add((i * usize::from(gso)) as u32));
                let last = i + 1 == segs.len();
                assert_eq!(s[t + 13] & (TCP_PSH | TCP_FIN) != 0, last, "PSH/FIN only on the last");
                assert_eq!(s[t + 13] & TCP_CWR != 0, i == 0, "CWR only on the first");
                joined.extend_from_slice(&s[l.hdr_len..]);
            }
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn ordinary_packets_get_their_checksum_finished() {
        let p = tcp_packet(false, 0, 0, 1, 0x10, b"hello");
        let (mut hdr, partial) = as_super(p.clone(), 0);
        hdr.gso_type = GSO_NONE;
        assert_eq!(split_all(hdr, partial, 1420).unwrap(), vec![p.clone()]);
        let plain = VnetHeader::default();
        assert_eq!(split_all(plain, p.clone(), 1420).unwrap(), vec![p]);
    }

    #[test]
    fn malformed_headers_are_refused() {
        let p = tcp_packet(false, 0, 0, 1, 0x10, &payload(3000, 1));
        let (hdr, sup) = as_super(p.clone(), 1000);
        let cases = [
            (
                VnetHeader { gso_size: 0, ..hdr },
                sup.clone(),
                OffloadError::BadSegmentSize,
            ),
            (
                VnetHeader { gso_size: 1401, ..hdr },
                sup.clone(),
                OffloadError::BadSegmentSize,
            ),
            (
                VnetHeader {
                    gso_type: GSO_TCPV6,
                    ..hdr
                },
                sup.clone(),
                OffloadError::BadHeaders,
            ),
            (VnetHeader { gso_type: 9, ..hdr }, sup.clone(), OffloadError::UnknownGso),
            (hdr, sup[..30].to_vec(), OffloadError::BadHeaders),
            (hdr, sup[..40].to_vec(), OffloadError::BadHeaders),
            (
                VnetHeader {
                    gso_type: GSO_NONE,
                    csum_start: 5000,
                    ..hdr
                },
                p.clone(),
                OffloadError::BadChecksumOffset,
            ),
            (VnetHeader::default(), p.clone(), OffloadError::BadSegmentSize),
            (VnetHeader::default(), Vec::new(), OffloadError::BadSegmentSize),
        ];
        for (i, (hdr, mut pkt, want)) in cases.into_iter().enumerate() {
            assert_eq!(Segments::new(hdr, &mut pkt, 1420).err(), Some(want), "case {i}");
        }
    }

    #[test]
    fn uso_super_packets_split_into_udp_datagrams() {
        let data = payload(3000, 9);
        let mut p = tcp_packet(true, 0, 0, 0, 0, &[]);
        // Turn the header into UDP: 40 bytes IPv6, 8 bytes UDP.
        p.truncate(48);
        p[6] = PROTO_UDP;
        p.extend_from_slice(&data);
        let total = p.len();
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        p[44..46].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 48,
            gso_size: 1200,
            csum_start: 40,
            csum_offset: 6,
        };
        let segs = split_all(hdr, p, 1420).unwrap();
        assert_eq!(segs.iter().map(Vec::len).collect::<Vec<_>>(), [1248, 1248, 648]);
        for s in &segs {
            let l = Layout::whole(s).unwrap();
            assert!(transport_valid(s, &l));
            assert_eq!(usize::from(u16::from_be_bytes([s[44], s[45]])), s.len() - 40);
        }
    }
}
