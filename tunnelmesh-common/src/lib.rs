//! Types shared by the TunnelMesh kernel programs and the daemon.
//!
//! This crate owns the layouts both sides of the kernel boundary must agree on: wire constants of
//! the WireGuard-compatible UDP protocol, and the `#[repr(C)]` keys and values of the eBPF maps.
//! It must stay `#![no_std]`, allocation-free and dependency-free (aya's `Pod` only behind the
//! `user` feature), because the same source compiles for `bpfel-unknown-none`.
#![no_std]

pub mod acl;
pub mod blake2s;
pub mod events;
pub mod ip;
pub mod shield;
pub mod steer;
pub mod wire;
