//! A running node: everything that assembles a mesh interface and keeps it in touch with the
//! world. May do I/O.
//!
//! - [`interface`]: `tunnelmesh up` — open the TUN queues, bind sockets, configure the kernel,
//!   start the slow path, the data-plane workers and the eBPF fast path, stop them in order.
//! - [`client`]: the coordinator client (join, follow updates, the relay channel).
//! - [`up`]: `tunnelmesh up` — the config file and the flags over it, reloads.
//! - [`config`]: the configuration file of an interface (static or coordinated).
//! - [`status`]: the status socket and what `tunnelmesh status` shows.
//! - [`metrics`]: the same in the Prometheus text format (`tunnelmesh metrics`, `/metrics`).
//! - [`netwatch`]: route netlink → "the network changed".

pub mod client;
pub mod config;
pub mod interface;
pub mod metrics;
pub mod netwatch;
pub mod status;
pub mod up;
