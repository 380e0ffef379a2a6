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

/// Segments after the first in one super-packet (64 in all, the most a receive batch of the data
/// plane holds; it checks its batch against this).
pub const MAX_MEMBERS: usize = 63;
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

/// Lay `packets` out in one buffer (slots of 2,000 bytes), push them all, flush: what the
/// TUN device is written (for tests and fuzzing).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHeader, Vec<u8>)> {
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

/// The bytes one `writev` of `iov` puts on the TUN device (for tests and fuzzing).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn concat(iov: &[IoSlice<'_>]) -> (VnetHeader, Vec<u8>) {
    let all: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
    (VnetHeader::parse(&all).unwrap(), all[super::VNET_HDR_LEN..].to_vec())
}

#[cfg(test)]
mod tests;
