//! Retry schedules that back off: the first retry soon, each failed one doubling the
//! wait, up to a cap. The circuit breaker's probes and the invalidation listener's
//! resubscribes follow one.

use std::time::Duration;

/// The first retry's wait: short, so a restarted server is found in well under a
/// second, long enough that a dead one costs a few calls a second at most.
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(100);

/// How the invalidation listener resubscribes after its subscription ended: after
/// 100 ms, then 200, 400, 800 ms, then every second.
pub(crate) const RESUBSCRIBE: Backoff = Backoff::new(FIRST_RETRY, Duration::from_secs(1));

/// Waits of `first`, `2 × first`, `4 × first`… never longer than `cap` (nor `first`
/// longer than `cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    first: Duration,
    cap: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, cap: Duration) -> Self {
        let first = if first.as_nanos() > cap.as_nanos() {
            cap
        } else {
            first
        };
        Backoff { first, cap }
    }

    /// The wait before retry number `failed` + 1, after `failed` failed retries.
    pub fn delay(&self, failed: u32) -> Duration {
        let factor = 1u32.checked_shl(failed).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_the_first_wait_up_to_the_cap() {
        let b = Backoff::new(100 * MS, 5000 * MS);
        let waits: Vec<_> = (0..8).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.delay(u32::MAX), 5000 * MS, "no overflow");
    }

    #[test]
    fn a_cap_below_the_first_wait_is_the_wait() {
        let b = Backoff::new(100 * MS, 30 * MS);
        assert_eq!(b.delay(0), 30 * MS);
        assert_eq!(b.delay(3), 30 * MS);
    }

    #[test]
    fn resubscribes_start_at_100_ms_and_never_wait_over_a_second() {
        let waits: Vec<_> = (0..6).map(|n| RESUBSCRIBE.delay(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
    }
}
