//! TunnelMesh: the daemon, coordinator and CLI behind the one `tunnelmesh` binary.
//!
//! Module map (one concern each): `identity` (SSH key → Noise key), `wire` (message layouts),
//! `noise` (handshake, cookies), `session` (keys, replay window, timers), `routing` (cryptokey
//! routing), `device` (shared interface state and the handshake thread), `dataplane` (worker
//! threads), `sys` (the only `unsafe`: syscalls and ioctls), `fastpath` (eBPF), `netconf`
//! (addresses and routes), `coordinator` (the control plane server), `control` (its client in
//! the peer), `config`, `status`, `daemon` (`up`), `cli`.

pub mod cli;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod daemon;
pub mod dataplane;
pub mod device;
pub mod fastpath;
pub mod identity;
pub mod nat;
pub mod netcheck;
pub mod netconf;
pub mod noise;
pub mod offload;
pub mod policy;
pub mod portmap;
pub mod routing;
pub mod session;
pub mod ssh;
pub mod status;
pub mod stun;
pub mod sys;
pub mod wire;

#[cfg(test)]
mod garbage;
#[cfg(test)]
mod interop;
