//! TUN offloads without I/O: the `virtio_net_hdr` in front of every packet on a TUN queue opened
//! with `IFF_VNET_HDR`, splitting the kernel's TSO/USO super-packets into MTU-sized segments
//! ([`split`]), and coalescing received TCP segments of one flow into one super-packet
//! ([`coalesce`]), as a NIC's GRO would.
//!
//! Invariants: every function here takes bytes from the kernel or from a peer and never panics or
//! allocates on them; a malformed header or super-packet is an error the worker counts and drops.
//! Offloads are local to this host: what goes on the wire is always ordinary MTU-sized packets,
//! each sealed on its own.

#![forbid(unsafe_code)]

pub mod checksum;
pub mod coalesce;
pub mod split;

/// Size of the `virtio_net_hdr` that `IFF_VNET_HDR` puts in front of every packet (the
/// default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;
/// Largest super-packet the kernel hands over or accepts (IPv4 total length is 16 bits).
pub const MAX_SUPER_PACKET: usize = 65535;

/// `virtio_net_hdr.flags`: the checksum from `csum_start` on is still to be computed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

pub use tunnelmesh_common::ip::{PROTO_TCP, PROTO_UDP};

/// The `virtio_net_hdr` in host byte order (a TUN device without `TUNSETVNETLE` uses the
/// host's, and both our targets are little-endian hosts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Why a packet read from the TUN device was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("shorter than a virtio_net_hdr")]
    ShortHeader,
    #[error("unknown GSO type")]
    UnknownGso,
    #[error("checksum start or offset outside the packet")]
    BadChecksumOffset,
    #[error("super-packet headers are malformed")]
    BadHeaders,
    #[error("segment size is zero or does not fit the MTU")]
    BadSegmentSize,
}

impl VnetHeader {
    pub fn parse(b: &[u8]) -> Result<Self, OffloadError> {
        let b: &[u8; VNET_HDR_LEN] = b.first_chunk().ok_or(OffloadError::ShortHeader)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Offsets of the IP and transport headers of a TCP or UDP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub v6: bool,
    /// IP header length (IPv4 with options, IPv6 fixed header; extension headers are refused).
    pub ip_len: usize,
    pub proto: u8,
    /// IP + transport header length.
    pub hdr_len: usize,
}

impl Layout {
    /// The headers of `p`, if it is an unfragmented TCP or UDP packet (IPv4 with or without
    /// options, IPv6 without extension headers) whose headers fit in `p`. The IP length field is
    /// not checked: a super-packet's may not cover it all (see [`Layout::whole`]).
    pub fn of(p: &[u8]) -> Option<Layout> {
        let (v6, ip_len, proto) = match p.first()? >> 4 {
            4 => {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if ihl < 20 || p.len() < ihl {
                    return None;
                }
                // MF or a fragment offset: not a whole transport segment.
                if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
                    return None;
                }
                (false, ihl, p[9])
            }
            6 if p.len() >= 40 => (true, 40, p[6]),
            _ => return None,
        };
        let l4_len = match proto {
            PROTO_TCP => usize::from(*p.get(ip_len + 12)? >> 4) * 4,
            PROTO_UDP => 8,
            _ => return None,
        };
        if proto == PROTO_TCP && l4_len < 20 {
            return None;
        }
        let hdr_len = ip_len + l4_len;
        (hdr_len <= p.len()).then_some(Layout {
            v6,
            ip_len,
            proto,
            hdr_len,
        })
    }

    /// Like [`Layout::of`], and the IP length field covers exactly `p` (no padding, no
    /// truncation): an ordinary packet as a peer sends it.
    pub fn whole(p: &[u8]) -> Option<Layout> {
        let layout = Layout::of(p)?;
        let ip_total = if layout.v6 {
            40 + usize::from(u16::from_be_bytes([p[4], p[5]]))
        } else {
            usize::from(u16::from_be_bytes([p[2], p[3]]))
        };
        (ip_total == p.len()).then_some(layout)
    }

    /// Offset of the transport checksum field.
    pub fn csum_at(&self) -> usize {
        self.ip_len + if self.proto == PROTO_TCP { 16 } else { 6 }
    }
}
