//! `StripedCounter`: a counter that every cached read adds to, spread over cache lines.
//!
//! Why: one atomic that every read of every connection increments is one cache line that moves
//! between the cores at each read; on the two cores nbdkit, the S3 server and the client share,
//! that move is a cache miss on the hottest path there is (docs/PERFORMANCE.md: taking the hit
//! counter and the read detector's lock off a cached read gained about a tenth on four
//! connections). Each thread adds to the stripe it was given when it first counted, so threads
//! share a line only when they outnumber the stripes; reading the total sums the stripes, which
//! only the stats file does, once a second.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Stripes per counter: enough that nbdkit's threads on two cores rarely meet on one.
const STRIPES: usize = 16;

/// The stripe the next thread to count is given.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe, given at its first count.
    static STRIPE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// One stripe, a cache line of its own (two: the prefetcher fetches lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// A monotonic counter whose increments do not share a cache line across threads.
#[derive(Debug, Default)]
pub struct StripedCounter([Stripe; STRIPES]);

impl StripedCounter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        let stripe = STRIPE.with(|s| match s.get() {
            Some(stripe) => stripe,
            None => {
                let given = NEXT_STRIPE.fetch_add(1, Relaxed) % STRIPES;
                s.set(Some(given));
                given
            }
        });
        self.0[stripe].0.fetch_add(n, Relaxed);
    }

    /// The sum of everything added so far (adds racing with this may or may not be in it).
    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_from_many_threads_all_count() {
        let counter = StripedCounter::default();
        std::thread::scope(|s| {
            for _ in 0..40 {
                s.spawn(|| (0..1000).for_each(|_| counter.add(1)));
            }
        });
        assert_eq!(counter.get(), 40_000);
    }

    #[test]
    fn a_stripe_fills_its_own_cache_lines() {
        assert_eq!(std::mem::size_of::<Stripe>(), 128);
    }
}
