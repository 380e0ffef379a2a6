//! What the workers and the control plane tell the slow path, and the names of paths.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use super::{PathKind, Peer};
use crate::protocol::discovery::NatKind;

/// Something that must know the live receiver indices (the XDP shield). The slow path
/// adds an index before a message naming it can arrive, and removes it when the key goes.
pub trait IndexMirror: Send {
    fn insert(&self, index: u32);
    fn remove(&self, index: u32);
    /// Drop initiations from `source` (by its budget address: IPv6 by /64) for `period`: it
    /// proved its address and spent its budget.
    fn block(&self, source: IpAddr, period: Duration);
}

/// What workers tell the slow path.
pub enum Event {
    /// A handshake message (initiation, response or cookie reply) that came `via` a path.
    Handshake { msg: Vec<u8>, via: Via },
    /// The peer has packets to send but no usable key.
    NeedSession(Arc<Peer>),
    /// The peer confirmed its `next` key by sending data on it.
    KeyConfirmed(Arc<Peer>),
    /// The peer table or the mesh keys changed.
    PeersChanged,
    /// A data message for an index we do not know came `via` a path: the sender has a session
    /// we lost (we restarted). If it is a peer's, re-handshake at once.
    StaleSession(Via),
    /// A path probe (request or reply) from `peer`, authenticated by its session key.
    Probe {
        peer: Arc<Peer>,
        via: Via,
        reply: bool,
        nonce: u64,
    },
    /// `tunnelmesh ping`: probe every available path to the peer named `peer`.
    Ping {
        peer: String,
        answer: crossbeam_channel::Sender<PingAnswer>,
    },
    /// A STUN response on the tunnel port.
    Stun { msg: Vec<u8>, from: SocketAddr },
    /// The coordinator asks us to punch towards the peer with this Noise key, now.
    Punch {
        key: [u8; 32],
        candidates: Vec<SocketAddr>,
        nat: NatKind,
    },
    /// This machine's addresses or routes changed (netlink).
    NetworkChanged,
}

/// What the slow path asks of the coordinator; the coordinator client turns it into a protocol
/// message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordinatorRequest {
    /// Publish this node's candidates (best first) and its NAT kind.
    Candidates { endpoints: Vec<SocketAddr>, nat: NatKind },
    /// Have both sides punch towards the peer with this fingerprint.
    Punch { peer: String },
}

/// Where a message came from, or goes to: a UDP address, or a peer's SSH connection or relay
/// channel (named by the peer's Noise key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Udp(SocketAddr),
    Ssh([u8; 32]),
    Relay([u8; 32]),
}

impl Via {
    pub fn kind(&self) -> PathKind {
        match self {
            Via::Udp(_) => PathKind::Udp,
            Via::Ssh(_) => PathKind::Ssh,
            Via::Relay(_) => PathKind::Relay,
        }
    }

    /// `peer` reached on path `kind` (`None` for UDP without a known endpoint).
    pub fn to_peer(peer: &Peer, kind: PathKind) -> Option<Via> {
        let key = *peer.identity.noise_public();
        match kind {
            PathKind::Udp => peer.endpoint.load().as_deref().map(|e| Via::Udp(*e)),
            PathKind::Ssh => Some(Via::Ssh(key)),
            PathKind::Relay => Some(Via::Relay(key)),
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Udp(a) => write!(f, "udp {a}"),
            Via::Ssh(_) => f.write_str("ssh"),
            Via::Relay(_) => f.write_str("relay"),
        }
    }
}

/// A `tunnelmesh ping` answer as it travels over the status socket (JSON `{"Ok": report}` or
/// `{"Err": "why"}`, the text shown to the operator).
pub type PingAnswer = Result<PingReport, String>;

/// Answers of `tunnelmesh ping`: the path in use and each path's round trip.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PingReport {
    pub peer: String,
    pub current: Option<PathKind>,
    /// (path, where, round trip in ms or None if unanswered).
    pub paths: Vec<(PathKind, String, Option<f64>)>,
}
