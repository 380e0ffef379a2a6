//! TunnelMesh: the daemon, coordinator and CLI behind the one `tunnelmesh` binary.
//!
//! Rooms, from the bottom up (the module graph has no cycles; `cargo xtask modules` checks it):
//!
//! - `protocol` — the pure core, no I/O and no `unsafe`: `wire`, `noise`, `session`, `ip`,
//!   `routing`, `stun`, `discovery`, `path`, `punch`, `probe`.
//! - `control` — what the coordinator and the nodes share: messages, fingerprints, the clock.
//! - `policy` — the policy file, its compiler and the userspace matcher (no I/O).
//! - `offload` — TUN offload segmentation and coalescing (no I/O).
//! - `service` — the systemd notify protocol and the heartbeats its watchdog reads.
//! - `sync` — the one lock helper; `slots` — connection places bounded per source and in all.
//! - `device` — the shared state of a running interface that workers and the slow path read.
//! - `slowpath` — the sans-I/O slow path (handshakes, timers, index table, paths, ping,
//!   discovery, punching) and the thread that does its I/O.
//! - `dataplane` — the worker threads (I/O: TUN queues, UDP sockets).
//! - `fastpath` — the eBPF loaders (I/O: bpf(2)).
//! - `nat` — host addresses, gateway, netcheck, port mapping (I/O).
//! - `paths` — the SSH transport (I/O).
//! - `identity` (key files), `netconf` (iproute2) — I/O.
//! - `node` — assembling and running an interface, the coordinator client (`node::client`),
//!   config, status.
//! - `coordinator` — the control-plane server.
//! - `cli` — arguments, dispatch, output.
//! - `fuzzing` — the fuzz targets' entry points (built for tests and the `fuzzing` feature).
//! - `sys` — the only place with `unsafe`: syscalls and ioctls, each block with a `SAFETY` line.

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod control;
pub mod coordinator;
pub mod dataplane;
pub mod device;
pub mod fastpath;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod identity;
pub mod nat;
pub mod netconf;
pub mod node;
pub mod offload;
pub mod paths;
pub mod policy;
pub mod protocol;
pub mod service;
pub mod slots;
pub mod slowpath;
pub mod sync;
pub mod sys;

#[cfg(test)]
mod interop;
#[cfg(test)]
mod malformed_input;
