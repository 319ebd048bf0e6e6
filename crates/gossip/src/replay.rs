//! The replay window of sealed frames.
//!
//! Every frame's 96-bit nonce is a sender stream's random 64-bit epoch followed by that stream's
//! 32-bit counter (see [`crate::keyring`]). A receiver remembers, per key and epoch, the highest
//! counter it has opened and which of the [`WINDOW`] counters below it it has seen, as IPsec and
//! WireGuard do: a counter seen before, or too far below the highest, is a replay (or a copy too
//! late to matter) and is refused. Only frames that authenticated reach the window, so a forger
//! cannot move it.
//!
//! The receiver tracks at most [`MAX_STREAMS`] epochs and forgets the one that advanced least
//! recently when a new one arrives. A stream it has forgotten, or never saw, is accepted from its
//! next frame on: a recorded stream can be replayed once to a receiver that restarted or forgot
//! it, for as long as the key that sealed it is in the keyring. Rotating the key closes that.

use std::collections::HashMap;

/// How many counters below the highest one seen are still accepted (once each).
pub const WINDOW: u32 = 256;

/// How many sender streams one receiver remembers.
pub const MAX_STREAMS: usize = 8192;

const WORDS: usize = (WINDOW / 64) as usize;

/// One sender stream: the highest counter opened and a bitmap of the [`WINDOW`] below it
/// (bit `i` of the map is counter `top - i`).
#[derive(Debug, Clone)]
struct Stream {
    top: u32,
    seen: [u64; WORDS],
    /// When this stream last advanced, in calls to [`ReplayWindow::accept`].
    touched: u64,
}

impl Stream {
    fn new(counter: u32, tick: u64) -> Self {
        let mut seen = [0u64; WORDS];
        seen[0] = 1;
        Stream { top: counter, seen, touched: tick }
    }

    fn bit(&self, back: u32) -> bool {
        self.seen[(back / 64) as usize] & (1u64 << (back % 64)) != 0
    }

    fn set(&mut self, back: u32) {
        self.seen[(back / 64) as usize] |= 1u64 << (back % 64);
    }

    /// Moves the window up by `by` counters (the new top is marked seen by the caller).
    fn shift(&mut self, by: u32) {
        if by >= WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, by % 64);
        for i in (0..WORDS).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.seen[j]);
            let carry = match (bits, i.checked_sub(words + 1)) {
                (0, _) | (_, None) => 0,
                (_, Some(j)) => self.seen[j] >> (64 - bits),
            };
            self.seen[i] = (lo << bits) | carry;
        }
    }

    fn accept(&mut self, counter: u32, tick: u64) -> bool {
        if counter > self.top {
            self.shift(counter - self.top);
            self.top = counter;
            self.set(0);
            self.touched = tick;
            return true;
        }
        let back = self.top - counter;
        if back >= WINDOW || self.bit(back) {
            return false;
        }
        self.set(back);
        true
    }
}

/// The receiver's memory of which frames it has opened; see the module documentation.
#[derive(Debug, Default)]
pub struct ReplayWindow {
    streams: HashMap<(u32, u64), Stream>,
    tick: u64,
}

impl ReplayWindow {
    /// Records the frame of key `key_id` with stream `epoch` and `counter`; false when it is a
    /// replay or too old for the window. Call only for frames that authenticated.
    pub fn accept(&mut self, key_id: u32, epoch: u64, counter: u32) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some(s) = self.streams.get_mut(&(key_id, epoch)) {
            return s.accept(counter, tick);
        }
        if self.streams.len() >= MAX_STREAMS
            && let Some(oldest) =
                self.streams.iter().min_by_key(|(_, s)| s.touched).map(|(k, _)| *k)
        {
            self.streams.remove(&oldest);
        }
        self.streams.insert((key_id, epoch), Stream::new(counter, tick));
        true
    }

    /// Forgets the streams of a key that left the keyring.
    pub fn forget_key(&mut self, key_id: u32) {
        self.streams.retain(|(k, _), _| *k != key_id);
    }

    /// How many sender streams are remembered.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_out_of_order_and_replays() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(1, 7, 10));
        assert!(!w.accept(1, 7, 10), "the same frame twice");
        assert!(w.accept(1, 7, 12));
        assert!(w.accept(1, 7, 11), "late but inside the window");
        assert!(!w.accept(1, 7, 11));
        assert!(w.accept(1, 7, 10 + WINDOW + 5));
        assert!(!w.accept(1, 7, 12), "fell out of the window");
        assert!(w.accept(1, 7, 10 + WINDOW), "still inside");
        // Another epoch or key is another stream.
        assert!(w.accept(1, 8, 10));
        assert!(w.accept(2, 7, 10));
        assert_eq!(w.streams(), 3);
        w.forget_key(1);
        assert_eq!(w.streams(), 1);
    }

    #[test]
    fn forgets_the_stalest_stream_when_full() {
        let mut w = ReplayWindow::default();
        for e in 0..MAX_STREAMS as u64 {
            assert!(w.accept(1, e, 0));
        }
        assert!(w.accept(1, 0, 1), "epoch 0 advances and is now the freshest");
        assert!(w.accept(1, u64::MAX, 0), "a new stream evicts the stalest (epoch 1)");
        assert_eq!(w.streams(), MAX_STREAMS);
        assert!(!w.accept(1, 0, 1), "epoch 0 was kept");
        assert!(w.accept(1, 1, 0), "epoch 1 was forgotten, so it is new again");
    }

    proptest::proptest! {
        /// Against a model that remembers every counter: a counter is accepted exactly when it
        /// was never accepted before and lies within the window below the highest seen.
        #[test]
        fn matches_a_model(counters in proptest::collection::vec(0u32..2000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut top: Option<u32> = None;
            for c in counters {
                let fresh = !seen.contains(&c) && top.is_none_or(|t| c > t || t - c < WINDOW);
                proptest::prop_assert_eq!(w.accept(9, 9, c), fresh, "counter {}", c);
                if fresh {
                    seen.insert(c);
                    top = Some(top.map_or(c, |t| t.max(c)));
                }
            }
        }
    }
}
