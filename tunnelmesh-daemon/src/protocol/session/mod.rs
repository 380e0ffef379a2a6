//! Sessions: transport keys, counters, replay protection and the WireGuard timers.
//!
//! Sans-I/O: [`Keypair`] seals and opens buffers it is handed, [`Timers`] turns the time and the
//! observed activity into actions. The constants are those of the WireGuard paper (section 6).

pub mod keypair;
pub mod replay;
pub mod timers;

use std::time::Duration;

pub use keypair::{DecryptError, Keypair, Receiving, sealed_len};
pub use replay::ReplayWindow;
pub use timers::{Activity, TimerAction, Timers};

/// Initiators start a new handshake once a key has sent this many messages.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// No key sends or receives past this many messages.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// Initiators start a new handshake once a key is this old.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// No key is used past this age.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A handshake is retried for this long before giving up.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// An unanswered initiation is retransmitted after this long.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that received data and sent nothing back for this long sends a keepalive.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
