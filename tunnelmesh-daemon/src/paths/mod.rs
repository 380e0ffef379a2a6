//! The fallback transports that carry the same encrypted wire messages when UDP does not work:
//! [`ssh`] (a direct SSH connection to the peer) and [`relay`] (the coordinator's WebSocket). Which
//! one traffic takes is decided in [`crate::protocol::path`]; these only move bytes.

pub mod ssh;
