//! The path probe: the plaintext of a data message that tests a path. Its first byte is not an IP
//! version, so no IP stack would take it for a packet.

pub const LEN: usize = 12;
const MAGIC: [u8; 3] = [0x00, b'T', b'M'];
const REQUEST: u8 = 1;
const REPLY: u8 = 2;

pub fn encode(reply: bool, nonce: u64) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    p[..3].copy_from_slice(&MAGIC);
    p[3] = if reply { REPLY } else { REQUEST };
    p[4..].copy_from_slice(&nonce.to_le_bytes());
    p
}

/// (is a reply, nonce) of a probe plaintext (padded to 16 bytes by the sender's seal).
#[inline]
pub fn decode(plain: &[u8]) -> Option<(bool, u64)> {
    if plain.len() < LEN || plain[..3] != MAGIC || !matches!(plain[3], REQUEST | REPLY) {
        return None;
    }
    Some((plain[3] == REPLY, u64::from_le_bytes(plain[4..LEN].try_into().ok()?)))
}
