//! The handshake: `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` with WireGuard's identifier, message
//! framing, mac1/mac2 and cookies, and TAI64N replay protection.
//!
//! Sans-I/O: functions take bytes and return bytes and keys; nothing here touches a socket or the
//! clock (callers pass `now`). The Noise state machine itself is `snow`'s; this module supplies
//! WireGuard's prologue and message layout around it, so a stock WireGuard peer interoperates.

pub mod cookie;
pub mod handshake;
pub mod tai64n;

pub use cookie::{CookieChecker, CookieJar, MacVerdict, mac1_key};
pub use handshake::{InitiatorHandshake, LocalStatic, MeshKey, SessionKeys, consume_initiation};
pub use tai64n::Tai64n;
