//! A circuit breaker around the shared tier.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else still skips. If its outcome is never
    /// recorded (its caller was dropped), another probe is allowed after `until`.
    HalfOpen {
        until: Instant,
    },
}

/// After `threshold` consecutive failures the breaker opens for `backoff`: reads are
/// skipped, so a dead cache costs one timeout per back-off period instead of one per
/// request. Then one probe read is let through; its success closes the breaker, its
/// failure opens it again.
///
/// Writes do not ask for a permit: they are tried while the breaker is open (a kill
/// switch must not wait for a read's back-off), and any success closes it. Only the
/// probe's failure re-opens an open breaker; other failures while it is open (a
/// write, a read let through before it opened) leave its schedule as it is.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    backoff: Duration,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Call the backend.
    Call,
    /// Call it as the half-open probe.
    Probe,
    /// Skip it.
    Skip,
}

impl Breaker {
    pub fn new(threshold: u32, backoff: Duration) -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            backoff,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn permit(&self) -> Permit {
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => Permit::Call,
            State::Open { until } | State::HalfOpen { until } if Instant::now() >= until => {
                *s = State::HalfOpen {
                    until: Instant::now() + self.backoff,
                };
                Permit::Probe
            }
            State::Open { .. } | State::HalfOpen { .. } => Permit::Skip,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    pub fn success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// Records the failure of a call made with `permit` ([`Permit::Call`] for a write);
    /// returns true when this failure opened the breaker.
    pub fn failure(&self, permit: Permit) -> bool {
        let mut s = self.lock();
        let failures = match *s {
            State::Closed { failures } => failures + 1,
            // A failed probe re-opens at once.
            State::HalfOpen { .. } | State::Open { .. } if permit == Permit::Probe => {
                self.threshold
            }
            State::HalfOpen { .. } | State::Open { .. } => return false,
        };
        if failures >= self.threshold {
            let was_closed = matches!(*s, State::Closed { .. });
            *s = State::Open {
                until: Instant::now() + self.backoff,
            };
            was_closed
        } else {
            *s = State::Closed { failures };
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_backoff() {
        let b = Breaker::new(3, Duration::from_millis(30));
        assert_eq!(b.permit(), Permit::Call);
        assert!(!b.failure(Permit::Call));
        assert!(!b.failure(Permit::Call));
        b.success(); // resets the count
        assert!(!b.failure(Permit::Call));
        assert!(!b.failure(Permit::Call));
        assert!(b.failure(Permit::Call), "third consecutive failure opens");
        assert_eq!(b.permit(), Permit::Skip);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Skip, "one probe at a time");
        assert!(
            !b.failure(Permit::Probe),
            "a failed probe re-opens (not a new opening)"
        );
        assert_eq!(b.permit(), Permit::Skip);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.permit(), Permit::Probe);
        b.success();
        assert_eq!(b.permit(), Permit::Call);
        assert!(!b.is_open());
    }

    #[test]
    fn an_abandoned_probe_does_not_wedge_the_breaker() {
        let b = Breaker::new(1, Duration::from_millis(20));
        assert!(b.failure(Permit::Call));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.permit(), Permit::Probe);
        // The probe's caller is dropped: neither success nor failure is recorded.
        assert_eq!(b.permit(), Permit::Skip);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.permit(), Permit::Probe, "a new probe after the back-off");
    }
}
