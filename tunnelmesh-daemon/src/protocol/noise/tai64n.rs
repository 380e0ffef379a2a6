//! TAI64N timestamps, the replay protection of handshake initiations.
//!
//! A responder remembers the greatest timestamp it has accepted from each peer and refuses an
//! initiation whose timestamp is not greater. The nanoseconds are rounded down (whitened) so the
//! timestamp does not leak the sender's clock at high resolution.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 2^62 + 10: the TAI64 label of the Unix epoch (TAI−UTC of 1970).
const TAI64_EPOCH: u64 = 0x4000_0000_0000_000a;
/// Resolution of the nanoseconds field (about 16.8 ms), as in wireguard-go.
const WHITENER_MASK: u32 = 0x0100_0000 - 1;

/// A 12-byte TAI64N label; byte order makes lexicographic order time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Tai64n(pub [u8; 12]);

impl Tai64n {
    /// The label for `since_epoch` after the Unix epoch.
    pub fn from_unix(since_epoch: Duration) -> Self {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&(TAI64_EPOCH + since_epoch.as_secs()).to_be_bytes());
        let nanos = since_epoch.subsec_nanos() & !WHITENER_MASK;
        out[8..].copy_from_slice(&nanos.to_be_bytes());
        Tai64n(out)
    }

    /// The label for the current wall-clock time.
    pub fn now() -> Self {
        Self::from_unix(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_times_compare_greater_and_whitening_hides_fine_resolution() {
        let a = Tai64n::from_unix(Duration::new(1_700_000_000, 1_000));
        let b = Tai64n::from_unix(Duration::new(1_700_000_000, 2_000));
        let c = Tai64n::from_unix(Duration::new(1_700_000_000, 20_000_000));
        let d = Tai64n::from_unix(Duration::new(1_700_000_001, 0));
        assert_eq!(a, b);
        assert!(c > b && d > c);
        assert_eq!(&a.0[..8], &(TAI64_EPOCH + 1_700_000_000).to_be_bytes());
    }
}
