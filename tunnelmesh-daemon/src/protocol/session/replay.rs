//! Sliding-window replay protection for data message counters (RFC 6479 style).
//!
//! Accepts each counter at most once, and only counters no older than `WINDOW` behind the
//! greatest one seen. The bitmap is a ring of 64-bit words; advancing the window clears only the
//! words it passes over, so every operation is O(1) amortised and allocation-free.

/// Counters tracked behind the newest (the ring is one word larger than the window).
pub const WINDOW: u64 = 8192 - 64;
const WORDS: usize = 8192 / 64;

/// Replay window for one receive key.
pub struct ReplayWindow {
    greatest: u64,
    seen_any: bool,
    ring: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            greatest: 0,
            seen_any: false,
            ring: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` would be accepted, without recording it (checked before decrypting).
    pub fn may_accept(&self, counter: u64) -> bool {
        if !self.seen_any || counter > self.greatest {
            return true;
        }
        if self.greatest - counter >= WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.ring[word] & bit == 0
    }

    /// Record `counter` (after it authenticated). Returns false if it was a replay or too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.may_accept(counter) {
            return false;
        }
        if !self.seen_any || counter > self.greatest {
            let from = if self.seen_any {
                self.greatest / 64 + 1
            } else {
                counter / 64
            };
            let to = counter / 64;
            // Clear the words the window advances over (at most the whole ring).
            let steps = (to + 1).saturating_sub(from).min(WORDS as u64);
            for i in 0..steps {
                self.ring[((to - i) % WORDS as u64) as usize] = 0;
            }
            self.greatest = counter;
            self.seen_any = true;
        }
        let (word, bit) = Self::slot(counter);
        self.ring[word] |= bit;
        true
    }

    fn slot(counter: u64) -> (usize, u64) {
        (((counter / 64) % WORDS as u64) as usize, 1u64 << (counter % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_is_accepted_once() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(1));
        assert!(w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(3));
        assert!(!w.accept(5));
    }

    #[test]
    fn counters_older_than_the_window_are_refused_and_in_window_reordering_is_fine() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(WINDOW + 100));
        assert!(!w.may_accept(99));
        assert!(!w.accept(100 - 1));
        assert!(w.accept(101));
        assert!(w.accept(WINDOW + 99));
        assert!(!w.accept(WINDOW + 99));
    }

    #[test]
    fn a_big_jump_forgets_old_bits_without_false_rejects() {
        let mut w = ReplayWindow::default();
        for c in 0..1000 {
            assert!(w.accept(c));
        }
        let far = 1_000_000;
        assert!(w.accept(far));
        // Counters in the new window whose ring slots held old bits must be accepted.
        for c in far - 500..far {
            assert!(w.accept(c), "{c}");
        }
        assert!(!w.accept(far - 100));
        assert!(!w.accept(900));
    }

    #[test]
    fn matches_a_naive_model_on_a_pseudo_random_sequence() {
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::HashSet::new();
        let mut greatest = 0u64;
        let mut x = 0x9e3779b97f4a7c15u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let counter = (i * 3).saturating_sub(x % 9000);
            let expect = if seen.is_empty() || counter > greatest {
                true
            } else {
                greatest - counter < WINDOW && !seen.contains(&counter)
            };
            assert_eq!(w.accept(counter), expect, "counter {counter} greatest {greatest}");
            if expect {
                seen.insert(counter);
                greatest = greatest.max(counter);
            }
        }
    }
}
