//! The Internet checksum (RFC 1071) over byte slices, with the IPv4/IPv6 pseudo-headers.

/// One's-complement sum of `data` as big-endian 16-bit words, added to `acc` (not folded).
#[inline]
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let (words, rest) = data.as_chunks::<8>();
    for w in words {
        let w = u64::from_be_bytes(*w);
        // Add the two 32-bit halves: no carry lost, the fold below takes care of them.
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let (pairs, last) = rest.as_chunks::<2>();
    for p in pairs {
        acc += u64::from(u16::from_be_bytes(*p));
    }
    if let [last] = last {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Fold a sum to 16 bits (not inverted).
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The finished checksum of `data` (folded and inverted).
#[inline]
pub fn checksum(data: &[u8], acc: u64) -> u16 {
    !fold(sum(data, acc))
}

/// Sum of the pseudo-header of the IP packet `ip` for a transport segment of `l4_len` bytes.
#[inline]
pub fn pseudo_header(ip: &[u8], v6: bool, proto: u8, l4_len: usize) -> u64 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    sum(addrs, u64::from(proto) + l4_len as u64)
}

/// Whether the transport checksum of a whole packet (headers in `layout`) verifies.
pub(crate) fn transport_valid(p: &[u8], layout: &super::Layout) -> bool {
    let l4 = &p[layout.ip_len..];
    if layout.proto == super::PROTO_UDP && !layout.v6 && u16::from_be_bytes([l4[6], l4[7]]) == 0 {
        return true; // IPv4 UDP without a checksum
    }
    fold(sum(l4, pseudo_header(p, layout.v6, layout.proto, l4.len()))) == 0xffff
}

/// Write the IPv4 header checksum of `ip[..ihl]`.
pub fn set_ipv4_header(ip: &mut [u8], ihl: usize) {
    ip[10..12].fill(0);
    let c = checksum(&ip[..ihl], 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytewise reference: 16-bit words summed with end-around carry.
    fn naive(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for c in data.chunks(2) {
            let w = u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
            acc += w;
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn matches_a_naive_sum_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 131 + 7) as u8 | 0x80).collect();
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(
                    checksum(&data[start..end], 0),
                    naive(&data[start..end]),
                    "{start}..{end}"
                );
            }
        }
    }

    #[test]
    fn rfc_1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        assert_eq!(fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)), 0xddf2);
    }
}
