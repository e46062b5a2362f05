//! Call limits kept at the gateway (SPEC section 4.9, PLATFORM.md section 3): at most `n`
//! calls in *any* sliding window of length `per`, with memory that does not grow with `n`.
//!
//! A [`Window`] counts calls per slot of `per / SLOTS` (rounded up) in a ring of
//! `SLOTS + 1` counters. A call at time `t` is admitted when the calls of the current slot
//! and the `SLOTS` before it, which cover `[t - per, t]` and a little more, number fewer
//! than `n`. Counting that little more is what makes the limit hold for every window, not
//! only for windows aligned to slots: the price is that a full window frees up to one slot
//! (5 %) later than an exact log of call times would. An exact log would need `n`
//! timestamps per rule (100,000 for a 100,000-an-hour rule); this needs 21 counters.
//!
//! A full window says when its oldest counted slot leaves the ring, which is when a call can
//! next be admitted: the wait of `max_wait_ms` and the `Retry-After` of a 429.

use std::time::{Duration, Instant};

use crate::platform::Rate;

/// Slots per window.
pub const SLOTS: u32 = 20;
const RING: usize = SLOTS as usize + 1;

/// One rule's window for one app.
#[derive(Debug, Clone)]
pub struct Window {
    n: u32,
    slot: Duration,
    /// Calls per slot; slot number `s` lives at `s % RING`.
    counts: [u32; RING],
    /// The newest slot number the ring has been moved to.
    head: u64,
    /// Slot 0 starts here.
    origin: Instant,
}

impl Window {
    /// An empty window for `rate`, its slots counted from `origin`.
    pub fn new(rate: Rate, origin: Instant) -> Self {
        let per = rate.per.max(Duration::from_millis(SLOTS.into()));
        // Rounded up, so that SLOTS slots span at least `per`.
        let nanos = per.as_nanos().div_ceil(u128::from(SLOTS));
        let slot = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        Window {
            n: rate.n,
            slot,
            counts: [0; RING],
            head: 0,
            origin,
        }
    }

    /// The rule's `n`.
    pub fn limit(&self) -> u32 {
        self.n
    }

    fn slot_of(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    fn start_of(&self, slot: u64) -> Instant {
        let nanos = u128::from(slot) * self.slot.as_nanos();
        self.origin + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Moves the ring to slot `s`, emptying the slots it passes.
    fn advance(&mut self, s: u64) {
        if s <= self.head {
            return;
        }
        let steps = (s - self.head).min(RING as u64);
        for i in 1..=steps {
            self.counts[((self.head + i) % RING as u64) as usize] = 0;
        }
        self.head = s;
    }

    /// Calls counted now (in the ring as of `now`).
    pub fn used(&mut self, now: Instant) -> u32 {
        self.advance(self.slot_of(now));
        self.counts.iter().sum()
    }

    /// Counts a call at `now` if the window has room; else how long until it has.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        let s = self.slot_of(now).max(self.head);
        self.advance(s);
        let total: u32 = self.counts.iter().sum();
        if total < self.n {
            self.counts[(s % RING as u64) as usize] += 1;
            return Ok(());
        }
        // Oldest first: the slot at ring position s + 1 + j is slot s - SLOTS + j, which
        // leaves the ring when slot s + j + 1 starts.
        let mut left = total;
        for j in 0..RING as u64 {
            left -= self.counts[((s + 1 + j) % RING as u64) as usize];
            if left < self.n {
                return Err(self.start_of(s + j + 1).saturating_duration_since(now));
            }
        }
        // n = 0: never.
        Err(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(n: u32, per_ms: u64) -> Rate {
        Rate {
            n,
            per: Duration::from_millis(per_ms),
        }
    }

    #[test]
    fn n_calls_pass_then_the_next_waits_for_the_oldest_slot() {
        let t0 = Instant::now();
        let mut w = Window::new(rate(3, 60_000), t0);
        for i in 0..3 {
            assert_eq!(w.try_acquire(t0 + Duration::from_secs(i)), Ok(()));
        }
        let wait = w.try_acquire(t0 + Duration::from_secs(10)).unwrap_err();
        // The first call's slot (0-3 s) leaves at 63 s: 53 s from the refused call.
        assert_eq!(wait, Duration::from_secs(53));
        assert!(w.try_acquire(t0 + Duration::from_secs(63)).is_ok());
        assert_eq!(
            w.used(t0 + Duration::from_secs(63)),
            1,
            "the first three have left"
        );
    }

    #[test]
    fn memory_does_not_grow_with_the_limit() {
        let t0 = Instant::now();
        let mut w = Window::new(rate(100_000, 3_600_000), t0);
        for i in 0..100_000u64 {
            assert!(w.try_acquire(t0 + Duration::from_micros(i * 10)).is_ok());
        }
        assert!(w.try_acquire(t0 + Duration::from_secs(2)).is_err());
        assert!(std::mem::size_of::<Window>() < 160);
    }
}
