//! Wire constants of the WireGuard-compatible UDP protocol.
//!
//! Every message starts with a little-endian `u32` whose low byte is the type and whose three
//! high bytes are zero. Sizes are fixed for the handshake messages; a data message is a 16-byte
//! header followed by the AEAD ciphertext of the zero-padded inner packet (a multiple of 16
//! bytes when we send; any length when we receive) and a 16-byte tag.

/// Handshake initiation (Noise IK message 1).
pub const MSG_INITIATION: u8 = 1;
/// Handshake response (Noise IK message 2).
pub const MSG_RESPONSE: u8 = 2;
/// Cookie reply, sent instead of a response when under load.
pub const MSG_COOKIE_REPLY: u8 = 3;
/// Transport data.
pub const MSG_DATA: u8 = 4;

/// Size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Size of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Size of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Header of a data message: type, receiver index, counter.
pub const DATA_HEADER_LEN: usize = 16;
/// Poly1305 tag size.
pub const AEAD_TAG_LEN: usize = 16;
/// Smallest data message: an empty keepalive.
pub const DATA_MIN_LEN: usize = DATA_HEADER_LEN + AEAD_TAG_LEN;
/// We zero-pad inner packets to a multiple of this before encryption. Receivers must not require
/// it: boringtun, for one, does not pad.
pub const PADDING_MULTIPLE: usize = 16;

/// Whether `len` is a size a message of type `msg_type` can have on the wire.
///
/// The XDP shield and the userspace receive path both use this one predicate.
#[inline(always)]
pub const fn valid_len(msg_type: u8, len: usize) -> bool {
    match msg_type {
        MSG_INITIATION => len == INITIATION_LEN,
        MSG_RESPONSE => len == RESPONSE_LEN,
        MSG_COOKIE_REPLY => len == COOKIE_REPLY_LEN,
        MSG_DATA => len >= DATA_MIN_LEN,
        _ => false,
    }
}

/// The magic cookie every STUN message (RFC 5389/8489) carries at bytes 4..8.
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Size of a STUN header.
pub const STUN_HEADER_LEN: usize = 20;

/// Whether a datagram of `len` bytes starting with `head` is a STUN Binding response (success
/// `0x0101` or error `0x0111`) whose declared length matches: the answers to the STUN requests a
/// node sends from its tunnel socket. No WireGuard message starts this way (their bytes 1..4
/// are zero), so the two cannot be confused.
///
/// The XDP shield and the userspace receive path both use this one predicate.
#[inline(always)]
pub const fn is_stun_response(head: [u8; 8], len: usize) -> bool {
    let declared = ((head[2] as usize) << 8) | head[3] as usize;
    head[0] == 0x01
        && (head[1] == 0x01 || head[1] == 0x11)
        && head[4] == STUN_MAGIC_COOKIE[0]
        && head[5] == STUN_MAGIC_COOKIE[1]
        && head[6] == STUN_MAGIC_COOKIE[2]
        && head[7] == STUN_MAGIC_COOKIE[3]
        && declared.is_multiple_of(4)
        && STUN_HEADER_LEN + declared == len
}
