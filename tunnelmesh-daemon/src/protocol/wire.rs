//! Message layouts of the WireGuard-compatible UDP protocol.
//!
//! Pure byte layout: offsets, field accessors and the header check every received datagram goes
//! through. No cryptography here. Sizes and type numbers come from `tunnelmesh_common::wire`, the
//! crate the XDP shield shares.
//!
//! ```text
//! initiation (148): type|sender(4)|ephemeral(32)|static(48)|timestamp(28)|mac1(16)|mac2(16)
//! response    (92): type|sender(4)|receiver(4)|ephemeral(32)|empty(16)|mac1(16)|mac2(16)
//! cookie      (64): type|receiver(4)|nonce(24)|cookie(32)
//! data     (>= 32): type|receiver(4)|counter(8)|ciphertext+tag
//! ```

pub use tunnelmesh_common::wire::*;

/// Noise message bytes inside an initiation.
pub const INITIATION_NOISE: std::ops::Range<usize> = 8..116;
/// Noise message bytes inside a response.
pub const RESPONSE_NOISE: std::ops::Range<usize> = 12..60;
/// Offset of the 24-byte nonce in a cookie reply.
pub const COOKIE_NONCE: std::ops::Range<usize> = 8..32;

/// A datagram that passed the header check, classified by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Initiation,
    Response,
    CookieReply,
    Data,
    /// A STUN Binding response: the answer to a request this node sent from its tunnel socket.
    Stun,
}

/// Why a datagram was dropped before any cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("shorter than a message header")]
    TooShort,
    #[error("unknown message type or non-zero reserved bytes")]
    BadType,
    #[error("impossible length for its type")]
    BadLength,
}

/// Classify a datagram: the same checks as the XDP shield.
pub fn classify(msg: &[u8]) -> Result<Kind, HeaderError> {
    if msg.len() < 4 {
        return Err(HeaderError::TooShort);
    }
    if let Some(head) = msg.first_chunk::<8>()
        && is_stun_response(*head, msg.len())
    {
        return Ok(Kind::Stun);
    }
    if msg[1..4] != [0, 0, 0] {
        return Err(HeaderError::BadType);
    }
    let kind = match msg[0] {
        MSG_INITIATION => Kind::Initiation,
        MSG_RESPONSE => Kind::Response,
        MSG_COOKIE_REPLY => Kind::CookieReply,
        MSG_DATA => Kind::Data,
        _ => return Err(HeaderError::BadType),
    };
    if !valid_len(msg[0], msg.len()) {
        return Err(HeaderError::BadLength);
    }
    Ok(kind)
}

/// Read a little-endian u32 at `at`.
#[inline]
pub fn le32(msg: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(msg[at..at + 4].try_into().expect("4 bytes"))
}

/// Read a little-endian u64 at `at`.
#[inline]
pub fn le64(msg: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(msg[at..at + 8].try_into().expect("8 bytes"))
}

/// Write the 4-byte message header.
#[inline]
pub fn put_header(msg: &mut [u8], msg_type: u8) {
    msg[..4].copy_from_slice(&[msg_type, 0, 0, 0]);
}

/// Sender index of an initiation or response.
pub fn sender_index(msg: &[u8]) -> u32 {
    le32(msg, 4)
}

/// Receiver index of a response (offset 8) or of a cookie reply / data message (offset 4).
pub fn receiver_index(msg: &[u8]) -> u32 {
    if msg[0] == MSG_RESPONSE {
        le32(msg, 8)
    } else {
        le32(msg, 4)
    }
}

/// Range covered by mac1 (everything before the two macs).
pub fn mac1_range(len: usize) -> std::ops::Range<usize> {
    0..len - 32
}

/// Range covered by mac2 (everything before mac2).
pub fn mac2_range(len: usize) -> std::ops::Range<usize> {
    0..len - 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_matches_every_message_kind() {
        let mut init = [0u8; INITIATION_LEN];
        put_header(&mut init, MSG_INITIATION);
        assert_eq!(classify(&init), Ok(Kind::Initiation));
        assert_eq!(classify(&init[..147]), Err(HeaderError::BadLength));
        let mut data = [0u8; 48];
        put_header(&mut data, MSG_DATA);
        assert_eq!(classify(&data), Ok(Kind::Data));
        assert_eq!(
            classify(&data[..41]),
            Ok(Kind::Data),
            "unpadded data is valid (boringtun)"
        );
        assert_eq!(classify(&data[..31]), Err(HeaderError::BadLength));
        assert_eq!(classify(&data[..3]), Err(HeaderError::TooShort));
        data[2] = 1;
        assert_eq!(classify(&data), Err(HeaderError::BadType));
        data[2] = 0;
        data[0] = 9;
        assert_eq!(classify(&data), Err(HeaderError::BadType));
    }
}
