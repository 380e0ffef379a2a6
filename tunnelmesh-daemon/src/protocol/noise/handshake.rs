//! Building and consuming handshake initiations and responses.
//!
//! Invariants: an initiation is only answered after its static key, timestamp and PSK-bound
//! message all authenticate (snow decrypts the static key and timestamp; the PSK enters in the
//! response, so a node of another mesh completes nothing); keys are handed out only after the
//! Noise pattern finished; the initiator sends with the first split key, the responder with the
//! second.

use zeroize::Zeroizing;

use super::Tai64n;
use crate::protocol::wire;

/// Noise protocol name; the construction string WireGuard hashes first.
const PATTERN: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// WireGuard's identifier, mixed in as the Noise prologue.
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";

/// Why a handshake message was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("handshake message does not authenticate (wrong key or mesh key, or corrupted)")]
    Decrypt,
}

/// Our static key pair for handshakes.
pub struct LocalStatic {
    pub secret: Zeroizing<[u8; 32]>,
    pub public: [u8; 32],
}

/// The mesh key, carried in Noise PSK slot 2.
pub type MeshKey = Zeroizing<[u8; 32]>;

/// Transport keys and indices of a completed handshake.
pub struct SessionKeys {
    pub send: Zeroizing<[u8; 32]>,
    pub recv: Zeroizing<[u8; 32]>,
    /// Index the peer puts in messages to us.
    pub local_index: u32,
    /// Index we put in messages to the peer.
    pub remote_index: u32,
    pub is_initiator: bool,
}

fn builder<'a>(local: &'a LocalStatic, psk: &'a MeshKey) -> snow::Builder<'a> {
    let params = PATTERN.parse().expect("pattern name is valid");
    snow::Builder::new(params)
        .prologue(IDENTIFIER)
        .and_then(|b| b.local_private_key(local.secret.as_slice()))
        .and_then(|b| b.psk(2, psk))
        .expect("fixed-size keys are accepted")
}

/// An initiation we sent, waiting for its response.
pub struct InitiatorHandshake {
    state: snow::HandshakeState,
    local_index: u32,
}

impl InitiatorHandshake {
    /// Build an initiation to `remote_public` (macs left zero; the caller stamps them).
    pub fn start(
        local: &LocalStatic,
        psk: &MeshKey,
        remote_public: &[u8; 32],
        local_index: u32,
        timestamp: Tai64n,
    ) -> (Self, [u8; wire::INITIATION_LEN]) {
        let mut state = builder(local, psk)
            .remote_public_key(remote_public)
            .and_then(|b| b.build_initiator())
            .expect("initiator builds from fixed-size keys");
        let mut msg = [0u8; wire::INITIATION_LEN];
        wire::put_header(&mut msg, wire::MSG_INITIATION);
        msg[4..8].copy_from_slice(&local_index.to_le_bytes());
        let n = state
            .write_message(&timestamp.0, &mut msg[wire::INITIATION_NOISE])
            .expect("initiation fits its fixed size");
        debug_assert_eq!(n, wire::INITIATION_NOISE.len());
        (InitiatorHandshake { state, local_index }, msg)
    }

    /// Index this initiation announced; a response names it as its receiver.
    pub fn local_index(&self) -> u32 {
        self.local_index
    }

    /// Read the response; on success the session keys. A response that does not decrypt leaves
    /// the handshake as it was (snow restores its state), so a forged response cannot destroy the
    /// initiation the real one answers.
    pub fn finish(&mut self, response: &[u8]) -> Result<SessionKeys, HandshakeError> {
        let mut empty = [0u8; 0];
        self.state
            .read_message(&response[wire::RESPONSE_NOISE], &mut empty)
            .map_err(|_| HandshakeError::Decrypt)?;
        let (i2r, r2i) = self.state.dangerously_get_raw_split();
        Ok(SessionKeys {
            send: Zeroizing::new(i2r),
            recv: Zeroizing::new(r2i),
            local_index: self.local_index,
            remote_index: wire::sender_index(response),
            is_initiator: true,
        })
    }
}

/// A decrypted initiation: who sent it and when, ready to be answered.
pub struct ReceivedInitiation {
    state: snow::HandshakeState,
    pub remote_public: [u8; 32],
    pub timestamp: Tai64n,
    pub remote_index: u32,
}

/// Decrypt an initiation addressed to us. The caller must then check that `remote_public` is a
/// peer and `timestamp` is newer than that peer's last, before calling [`ReceivedInitiation::respond`].
pub fn consume_initiation(
    local: &LocalStatic,
    psk: &MeshKey,
    msg: &[u8],
) -> Result<ReceivedInitiation, HandshakeError> {
    let mut state = builder(local, psk).build_responder().expect("responder builds");
    let mut ts = [0u8; 12];
    let n = state
        .read_message(&msg[wire::INITIATION_NOISE], &mut ts)
        .map_err(|_| HandshakeError::Decrypt)?;
    if n != ts.len() {
        return Err(HandshakeError::Decrypt);
    }
    let remote_public: [u8; 32] = state
        .get_remote_static()
        .and_then(|s| s.try_into().ok())
        .ok_or(HandshakeError::Decrypt)?;
    Ok(ReceivedInitiation {
        state,
        remote_public,
        timestamp: Tai64n(ts),
        remote_index: wire::sender_index(msg),
    })
}

impl ReceivedInitiation {
    /// Write the response (macs left zero) and derive the session keys.
    pub fn respond(mut self, local_index: u32) -> ([u8; wire::RESPONSE_LEN], SessionKeys) {
        let mut msg = [0u8; wire::RESPONSE_LEN];
        wire::put_header(&mut msg, wire::MSG_RESPONSE);
        msg[4..8].copy_from_slice(&local_index.to_le_bytes());
        msg[8..12].copy_from_slice(&self.remote_index.to_le_bytes());
        let n = self
            .state
            .write_message(&[], &mut msg[wire::RESPONSE_NOISE])
            .expect("response fits its fixed size");
        debug_assert_eq!(n, wire::RESPONSE_NOISE.len());
        let (i2r, r2i) = self.state.dangerously_get_raw_split();
        let keys = SessionKeys {
            send: Zeroizing::new(r2i),
            recv: Zeroizing::new(i2r),
            local_index,
            remote_index: self.remote_index,
            is_initiator: false,
        };
        (msg, keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::MontgomeryPoint;

    fn local(seed: u8) -> LocalStatic {
        let secret = [seed; 32];
        LocalStatic {
            public: MontgomeryPoint::mul_base_clamped(secret).to_bytes(),
            secret: Zeroizing::new(secret),
        }
    }

    fn psk(byte: u8) -> MeshKey {
        Zeroizing::new([byte; 32])
    }

    #[test]
    fn initiator_and_responder_derive_mirrored_keys() {
        let (a, b, k) = (local(1), local(2), psk(9));
        let ts = Tai64n::from_unix(std::time::Duration::from_secs(1_000));
        let (mut hs, init) = InitiatorHandshake::start(&a, &k, &b.public, 11, ts);
        let received = consume_initiation(&b, &k, &init).unwrap();
        assert_eq!(received.remote_public, a.public);
        assert_eq!(received.timestamp, ts);
        let (resp, bk) = received.respond(22);
        let ak = hs.finish(&resp).unwrap();
        assert_eq!(*ak.send, *bk.recv);
        assert_eq!(*ak.recv, *bk.send);
        assert_eq!((ak.local_index, ak.remote_index), (11, 22));
        assert_eq!((bk.local_index, bk.remote_index), (22, 11));
    }

    #[test]
    fn a_node_with_another_mesh_key_completes_no_handshake() {
        let (a, b) = (local(1), local(2));
        let (mut hs, init) = InitiatorHandshake::start(&a, &psk(9), &b.public, 1, Tai64n::default());
        // IKpsk2 mixes the PSK only into the response: the responder can read the initiation…
        let received = consume_initiation(&b, &psk(8), &init).unwrap();
        let (resp, _) = received.respond(2);
        // …but the initiator cannot authenticate the response, so no session exists on either side.
        assert_eq!(hs.finish(&resp).err(), Some(HandshakeError::Decrypt));
    }

    #[test]
    fn an_initiation_for_someone_else_does_not_decrypt() {
        let (a, b, c) = (local(1), local(2), local(3));
        let (_, init) = InitiatorHandshake::start(&a, &psk(9), &c.public, 1, Tai64n::default());
        assert_eq!(
            consume_initiation(&b, &psk(9), &init).err(),
            Some(HandshakeError::Decrypt)
        );
    }
}
