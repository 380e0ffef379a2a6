//! The protocol core: pure logic with no I/O — bytes and the time in, decisions and bytes out.
//!
//! Nothing here opens a socket, reads a file, spawns a thread or calls the kernel, and nothing
//! here uses `unsafe`; every piece is tested deterministically with a virtual clock.
//!
//! - [`wire`]: WireGuard message layouts and the classifier every received datagram meets first.
//! - [`noise`]: the Noise IKpsk2 handshake, TAI64N, mac1/mac2 and cookies.
//! - [`session`]: transport keys, the replay window, the session timers.
//! - [`ip`]: the one parser of inner IP headers.
//! - [`routing`]: cryptokey routing (allowed IPs → peer).
//! - [`stun`]: the STUN Binding codec.
//! - [`discovery`]: STUN rounds, this node's candidates and the NAT kind in front of it.
//! - [`path`]: choosing the path to each peer (UDP, SSH, relay) and when to probe.
//! - [`punch`]: planning hole punches (targets, rounds, backoff).
//! - [`probe`]: the path probe carried inside a data message.
//! - [`framing`]: wire messages over a byte stream (the SSH transport).

#![forbid(unsafe_code)]

pub mod discovery;
pub mod framing;
pub mod ip;
pub mod noise;
pub mod path;
pub mod probe;
pub mod punch;
pub mod routing;
pub mod session;
pub mod stun;
pub mod wire;
