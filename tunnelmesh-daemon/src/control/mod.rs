//! The control protocol that the coordinator and the nodes speak, and what both sides share:
//! the messages ([`proto`]), the certificate fingerprint and the TLS crypto provider ([`tls`]),
//! the protocol's clock. The coordinator (`crate::coordinator`) and the node's client
//! (`crate::node::client`) both build on this; neither imports the other.

#![forbid(unsafe_code)]

pub mod proto;
pub mod tls;

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in seconds, the clock of the protocol's timestamps (tokens, mesh keys, updates).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
