//! The coordinator connection and what the node knows of its own reachability.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use super::CoordinatorRequest;
use crate::protocol::discovery::Candidates;

/// Where the coordinator connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// Started from the cached state; joining.
    Connecting,
    Connected,
    /// Lost; tunnels keep running on the last state while we reconnect.
    Disconnected,
    /// The coordinator will not have this node (certificate mismatch, refused hello): the
    /// operator must act.
    Refused,
    /// Revoked while connected: every peer was dropped.
    Revoked,
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Refused => "refused",
            ConnectionState::Revoked => "revoked",
        })
    }
}

/// The coordinator connection, as `tunnelmesh status` reports it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ControlState {
    pub url: String,
    pub state: ConnectionState,
    pub last_error: Option<String>,
    /// Unix time of the last update received.
    pub last_update_unix: Option<u64>,
}

/// The coordinator connection, written by the coordinator client (`node::client`) alone; all
/// empty in a static mesh.
#[derive(Default)]
pub struct CoordinatorLink {
    /// Where the connection stands, for `status`.
    pub state: ArcSwapOption<ControlState>,
    /// The relay channel through the coordinator, while connected: (peer's Noise key, message).
    pub relay: ArcSwapOption<tokio::sync::mpsc::Sender<([u8; 32], Vec<u8>)>>,
    /// Requests from the slow path (candidates, punches), while connected.
    pub requests: ArcSwapOption<tokio::sync::mpsc::Sender<CoordinatorRequest>>,
    /// The coordinator's two STUN targets.
    pub stun_targets: ArcSwapOption<[SocketAddr; 2]>,
}

/// How the world reaches this node. Each part has one writer: the slow path (`candidates`),
/// the port-mapping thread (`port_mapping`, shared with it by handle), the network watch
/// (`network_generation`).
#[derive(Default)]
pub struct Reachability {
    /// This node's candidates as last learned (for the coordinator and `status`).
    pub candidates: ArcSwap<Candidates>,
    /// The port mapping the gateway granted, while it holds.
    pub port_mapping: Arc<ArcSwapOption<crate::nat::portmap::Mapping>>,
    /// Bumped on every change of this machine's addresses or routes.
    pub network_generation: Arc<AtomicU64>,
}
