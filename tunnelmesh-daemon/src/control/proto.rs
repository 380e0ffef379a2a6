//! The coordinator protocol: JSON messages over one WebSocket per peer (`/v1/connect`).
//!
//! ```text
//! coordinator → peer   challenge {nonce, coordinator}
//! peer → coordinator   hello {public_key, signature, token?, name?, listen_port, endpoints}
//! coordinator → peer   welcome {more, node, mesh_keys, ipv4_prefix, ipv6_prefix, peers}   or error
//! coordinator → peer   peers {more, peers} …   (the rest of the peer list while `more` is true)
//! coordinator → peer   peer_upsert {peer} | peer_removed {fingerprint} | mesh_keys {keys} | policy | revoked
//! peer → coordinator   candidates {endpoints, nat} | punch {peer}
//! coordinator → peer   punch {peer, endpoints, nat}   (to both peers of a punch at once)
//! ```
//!
//! The signature is SSHSIG (namespace [`JOIN_NAMESPACE`]) over [`join_transcript`]: the nonce, the
//! challenge's `coordinator` field and the certificate fingerprint the peer pinned. The peer proves
//! it holds the private key of `public_key`, and the proof is good at this coordinator only: a
//! coordinator of another mesh that relays this challenge to a node pinned to itself gets an
//! answer bound to its own certificate, which this one refuses. Mesh keys travel only on this
//! authenticated, pinned TLS channel.

use serde::{Deserialize, Serialize};

use crate::{policy::NodePolicy, protocol::discovery::NatKind};

/// SSHSIG namespace of join signatures (v2: the transcript binds the coordinator).
pub const JOIN_NAMESPACE: &str = "tunnelmesh-join@v2";

/// What a hello's signature covers: each part length-prefixed, so no two transcripts are equal.
pub fn join_transcript(nonce: &[u8], coordinator: &str, certificate_fingerprint: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + nonce.len() + coordinator.len() + certificate_fingerprint.len());
    for part in [nonce, coordinator.as_bytes(), certificate_fingerprint.as_bytes()] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}
/// Peers per welcome message; the rest follow in `peers` messages, so no message (and no
/// connection buffer) grows with the size of the mesh.
pub const WELCOME_CHUNK: usize = 256;
/// Path of the WebSocket endpoint.
pub const CONNECT_PATH: &str = "/v1/connect";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: String,
    pub fingerprint: String,
    /// The node's OpenSSH public key line, `ssh-ed25519 AAAA…` (its identity).
    #[serde(rename = "public_key")]
    pub ssh_key: String,
    pub ipv4: String,
    pub ipv6: String,
    /// Where the peer can be reached, best first: UDP `ip:port`, and `ssh://ip:port` for its
    /// SSH transport.
    pub endpoints: Vec<String>,
    pub tags: Vec<String>,
    /// The NAT in front of the peer: `none` means its UDP endpoints may be sent to unprompted;
    /// otherwise a direct path needs coordinated hole punching.
    #[serde(default)]
    pub nat: NatKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub fingerprint: String,
    pub ipv4: String,
    pub ipv6: String,
    pub tags: Vec<String>,
}

/// What a welcome tells a node about itself and the mesh, apart from the peers (the node keeps
/// it, with the peers, as its cached state).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshInfo {
    pub node: NodeInfo,
    /// Base64 mesh keys, current first.
    pub mesh_keys: Vec<String>,
    pub ipv4_prefix: String,
    pub ipv6_prefix: String,
    /// The node's inbound rules (default deny: empty means nothing may reach it).
    #[serde(default)]
    pub policy: NodePolicy,
    /// UDP port of the coordinator's first STUN target (the second is the next port); 0: none.
    #[serde(default)]
    pub stun_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Challenge {
        nonce: String,
        coordinator: String,
    },
    Welcome {
        #[serde(flatten)]
        mesh: MeshInfo,
        peers: Vec<PeerInfo>,
        /// More of the peer list follows in `peers` messages.
        #[serde(default)]
        more: bool,
    },
    /// Punch a hole to `peer` now: send to its `endpoints`. Sent to both sides at once.
    Punch {
        peer: String,
        endpoints: Vec<String>,
        #[serde(default)]
        nat: NatKind,
    },
    /// The node's inbound rules changed.
    Policy {
        policy: NodePolicy,
    },
    /// The next part of the welcome's peer list.
    Peers {
        peers: Vec<PeerInfo>,
        #[serde(default)]
        more: bool,
    },
    PeerUpsert {
        peer: PeerInfo,
    },
    PeerRemoved {
        fingerprint: String,
    },
    MeshKeys {
        mesh_keys: Vec<String>,
    },
    Revoked {
        message: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    Hello {
        /// The node's OpenSSH public key line.
        #[serde(rename = "public_key")]
        ssh_key: String,
        signature: String,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        name: Option<String>,
        listen_port: u16,
        #[serde(default)]
        endpoints: Vec<String>,
        /// TCP port of the peer's SSH transport, if it runs one.
        #[serde(default)]
        ssh_port: Option<u16>,
        /// The NAT kind the node's STUN answers showed (unknown before any).
        #[serde(default)]
        nat: NatKind,
    },
    /// The node's UDP candidates changed (best first: host, port-mapped, reflexive), and the
    /// NAT kind its STUN answers show.
    Candidates { endpoints: Vec<String>, nat: NatKind },
    /// Ask the coordinator to have `peer` (a fingerprint) and this node punch towards each other.
    Punch { peer: String },
}
