//! The shared state of a running mesh interface: peers, their keys and endpoints, the session
//! index table, counters.
//!
//! Two kinds of thread touch it. Data-plane workers read it on every packet without locks
//! (`ArcSwap` snapshots, atomics) and only write atomics, plus the rare endpoint change on
//! roaming and the promotion of a confirmed responder key. The slow path
//! ([`crate::slowpath`]) owns everything else: handshake state, timers, cookies, and it is the
//! only writer of keys and of the index table. Workers reach it through a bounded channel of
//! [`Event`]s.

mod counters;
mod events;
mod link;
mod peer;
pub mod policy;
mod table;

pub use counters::Counters;
pub use events::{CoordinatorRequest, Event, IndexMirror, PingAnswer, PingReport, Via};
pub use link::{ConnectionState, ControlState, CoordinatorLink, Reachability};
pub use peer::{ActivityStamps, KeySet, MAX_STAGED, Peer, PeerSpec, RemoteCandidates};
pub use table::{IndexEntry, PeerTable};

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use zeroize::Zeroizing;

pub use crate::protocol::path::PathKind;
use crate::{identity::PublicIdentity, sync::lock};

/// Monotonic milliseconds since the device started; 0 means "never".
#[derive(Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new(epoch: Instant) -> Self {
        Clock { epoch }
    }
    /// Milliseconds since the epoch, plus one so that 0 stays "never".
    pub fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }
    pub fn instant(&self, stamp: u64) -> Option<Instant> {
        (stamp != 0).then(|| self.epoch + Duration::from_millis(stamp - 1))
    }
}

/// A running mesh interface.
pub struct Device {
    /// What the interface is; fixed when it comes up.
    pub info: InterfaceInfo,
    /// Inbound rules from the coordinator (default deny) and their enforcer; none in a static
    /// mesh, where every configured peer may reach this node.
    pub policy: policy::PolicyEnforcer,
    pub peers: ArcSwap<PeerTable>,
    /// Mesh keys (the Noise PSK), current first; during a rotation the previous one follows.
    pub mesh_keys: ArcSwap<Vec<Zeroizing<[u8; 32]>>>,
    pub sessions: ArcSwap<HashMap<u32, Arc<IndexEntry>>>,
    pub counters: Counters,
    pub clock: Clock,
    pub events: crossbeam_channel::Sender<Event>,
    pub shutdown: Arc<AtomicBool>,
    /// The coordinator connection (written by the coordinator client only).
    pub coordinator: CoordinatorLink,
    /// How the world reaches this node (candidates, port mapping, network changes).
    pub reach: Reachability,
    /// Messages received on SSH or relay paths go to the data plane through here.
    pub overlay_inbox: std::os::unix::net::UnixDatagram,
    /// The slow path's loop ([`HEARTBEAT_SLOW_PATH`]) and each worker's (`1 + id`): the service
    /// watchdog pings only while they all move.
    pub heartbeats: crate::service::Heartbeats,
}

/// The slow path's slot in [`Device::heartbeats`]; worker `id` has `1 + id`.
pub const HEARTBEAT_SLOW_PATH: usize = 0;

/// What a running interface is, fixed when it comes up (read by everyone, written by no one).
pub struct InterfaceInfo {
    pub interface: String,
    pub mtu: usize,
    /// What the TUN device offloads (fixed when its queues open).
    pub offloads: crate::sys::tun::Offloads,
    pub listen_port: u16,
    pub local: PublicIdentity,
    /// Our own mesh addresses (IPv4 only where the host has IPv6 disabled).
    pub addresses: Vec<IpNet>,
    /// The interface carries IPv6.
    pub ipv6: bool,
    pub started: Instant,
}

/// Header of a message in the overlay inbox: path kind, then the sending peer's Noise key.
pub const INBOX_HEADER: usize = 33;

impl Device {
    /// Send a wire message to `peer` on its SSH connection or the relay; false if dropped.
    pub fn send_overlay(&self, peer: &Peer, kind: PathKind, msg: &[u8]) -> bool {
        let sent = match kind {
            PathKind::Ssh => peer
                .ssh_tx
                .load()
                .as_ref()
                .is_some_and(|tx| tx.try_send(msg.to_vec()).is_ok()),
            PathKind::Relay => self
                .coordinator
                .relay
                .load()
                .as_ref()
                .is_some_and(|tx| tx.try_send((*peer.identity.noise_public(), msg.to_vec())).is_ok()),
            PathKind::Udp => false,
        };
        if !sent {
            Counters::bump(&self.counters.tx_overlay_dropped);
        }
        sent
    }

    /// Hand a wire message received on an SSH connection or the relay to the data plane.
    pub fn deliver_overlay(&self, via: Via, msg: &[u8]) {
        let (kind, key) = match via {
            Via::Ssh(k) => (PathKind::Ssh, k),
            Via::Relay(k) => (PathKind::Relay, k),
            Via::Udp(_) => return,
        };
        let mut datagram = Vec::with_capacity(INBOX_HEADER + msg.len());
        datagram.push(kind as u8);
        datagram.extend_from_slice(&key);
        datagram.extend_from_slice(msg);
        if self.overlay_inbox.send(&datagram).is_err() {
            Counters::bump(&self.counters.rx_overlay_dropped);
        }
    }

    /// Ask the slow path for a session with `peer`, once until it is served.
    pub fn request_session(&self, peer: &Arc<Peer>) {
        if !peer.session_requested.swap(true, Ordering::AcqRel)
            && self.events.try_send(Event::NeedSession(peer.clone())).is_err()
        {
            // The queue is full (a flood): the request is lost, so the next packet asks again
            // rather than the peer staying without a session for good.
            peer.session_requested.store(false, Ordering::Release);
            Counters::bump(&self.counters.handshake_queue_full);
        }
    }

    /// Replace the peer set (keys that stay keep their sessions) and the mesh keys.
    pub fn update(&self, specs: Vec<PeerSpec>, mesh_keys: Vec<Zeroizing<[u8; 32]>>) {
        let table = PeerTable::build(specs, &self.peers.load());
        self.peers.store(Arc::new(table));
        if !mesh_keys.is_empty() {
            self.mesh_keys.store(Arc::new(mesh_keys));
        }
        // The slow path drops the sessions of peers that left.
        let _ = self.events.send(Event::PeersChanged);
    }

    /// Queue a packet for `peer` until its handshake completes (slow path).
    pub fn stage(&self, peer: &Peer, packet: &[u8]) {
        let mut staged = lock(&peer.staged);
        if staged.len() >= MAX_STAGED {
            staged.pop_front();
            Counters::bump(&self.counters.tx_dropped);
        }
        staged.push_back(packet.to_vec());
    }
}
