//! A circuit breaker around the shared tier.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::backoff::{Backoff, FIRST_RETRY};

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    /// Reads are skipped until `until`; `failed_probes` probes failed since it opened.
    Open {
        until: Instant,
        failed_probes: u32,
    },
    /// One probe is in flight; everyone else still skips. If its outcome is never
    /// recorded (its caller was dropped), another probe is allowed after `until`.
    HalfOpen {
        until: Instant,
        failed_probes: u32,
    },
}

/// After `threshold` consecutive failures the breaker opens: reads are skipped, so a
/// dead cache costs a few calls per second instead of one per request. The first probe
/// read is let through 100 ms after it opened; its success closes the breaker, its
/// failure opens it again for twice as long, and so on up to the configured back-off
/// cap (100 ms, 200, 400, 800 ms, 1.6 s, 3.2 s, 5 s, 5 s… with the default 5 s cap).
/// A restarted server is found within about 100 ms of coming back early in an outage,
/// within the cap late in one.
///
/// Writes do not ask for a permit: they are tried while the breaker is open (a kill
/// switch must not wait for a read's back-off), and any success closes it. Only the
/// probe's failure re-opens an open breaker; other failures while it is open (a
/// write, a read let through before it opened) leave its schedule as it is.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    schedule: Backoff,
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
    /// A breaker that opens after `threshold` consecutive failures and probes on a
    /// schedule from 100 ms up to `max_backoff`.
    pub fn new(threshold: u32, max_backoff: Duration) -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            schedule: Backoff::new(FIRST_RETRY, max_backoff),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn permit(&self) -> Permit {
        self.permit_at(Instant::now())
    }

    fn permit_at(&self, now: Instant) -> Permit {
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => Permit::Call,
            State::Open {
                until,
                failed_probes,
            }
            | State::HalfOpen {
                until,
                failed_probes,
            } if now >= until => {
                *s = State::HalfOpen {
                    until: now + self.schedule.delay(failed_probes),
                    failed_probes,
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
        self.failure_at(permit, Instant::now())
    }

    fn failure_at(&self, permit: Permit, now: Instant) -> bool {
        let mut s = self.lock();
        match *s {
            State::Closed { failures } if failures + 1 >= self.threshold => {
                *s = State::Open {
                    until: now + self.schedule.delay(0),
                    failed_probes: 0,
                };
                true
            }
            State::Closed { failures } => {
                *s = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            // A failed probe re-opens at once, for longer.
            State::HalfOpen { failed_probes, .. } | State::Open { failed_probes, .. }
                if permit == Permit::Probe =>
            {
                let failed_probes = failed_probes.saturating_add(1);
                *s = State::Open {
                    until: now + self.schedule.delay(failed_probes),
                    failed_probes,
                };
                false
            }
            State::HalfOpen { .. } | State::Open { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn opens_after_threshold_and_probes_on_a_doubling_schedule_up_to_the_cap() {
        let b = Breaker::new(3, 500 * MS);
        let t0 = Instant::now();
        assert_eq!(b.permit_at(t0), Permit::Call);
        assert!(!b.failure_at(Permit::Call, t0));
        assert!(!b.failure_at(Permit::Call, t0));
        b.success(); // resets the count
        assert!(!b.failure_at(Permit::Call, t0));
        assert!(!b.failure_at(Permit::Call, t0));
        assert!(
            b.failure_at(Permit::Call, t0),
            "third consecutive failure opens"
        );
        // Probes at +100 ms, then each failed one doubles the wait: 200, 400, 500 (cap).
        let mut at = t0;
        for wait in [100, 200, 400, 500, 500] {
            assert_eq!(b.permit_at(at + (wait - 1) * MS), Permit::Skip, "{wait}");
            assert_eq!(b.permit_at(at + wait * MS), Permit::Probe, "{wait}");
            assert_eq!(
                b.permit_at(at + wait * MS),
                Permit::Skip,
                "one probe at a time"
            );
            at += wait * MS;
            assert!(
                !b.failure_at(Permit::Probe, at),
                "a failed probe re-opens (not a new opening)"
            );
            assert!(b.is_open());
        }
        assert_eq!(b.permit_at(at + 500 * MS), Permit::Probe);
        b.success();
        assert_eq!(b.permit_at(at + 500 * MS), Permit::Call);
        assert!(!b.is_open());
        // Opening again starts the schedule over.
        let t1 = at + 600 * MS;
        for _ in 0..3 {
            b.failure_at(Permit::Call, t1);
        }
        assert_eq!(b.permit_at(t1 + 100 * MS), Permit::Probe);
    }

    #[test]
    fn failures_other_than_the_probe_leave_the_schedule_alone() {
        let b = Breaker::new(1, 5000 * MS);
        let t0 = Instant::now();
        assert!(b.failure_at(Permit::Call, t0));
        // A write (or a read let through before it opened) fails while open.
        assert!(!b.failure_at(Permit::Call, t0 + 50 * MS));
        assert_eq!(b.permit_at(t0 + 100 * MS), Permit::Probe);
        // A write fails while the probe is in flight: the probe still decides.
        assert!(!b.failure_at(Permit::Call, t0 + 120 * MS));
        assert!(!b.failure_at(Permit::Probe, t0 + 150 * MS));
        assert_eq!(b.permit_at(t0 + 349 * MS), Permit::Skip);
        assert_eq!(b.permit_at(t0 + 350 * MS), Permit::Probe);
    }

    #[test]
    fn an_abandoned_probe_does_not_wedge_the_breaker() {
        let b = Breaker::new(1, 5000 * MS);
        let t0 = Instant::now();
        assert!(b.failure_at(Permit::Call, t0));
        assert_eq!(b.permit_at(t0 + 100 * MS), Permit::Probe);
        // The probe's caller is dropped: neither success nor failure is recorded.
        assert_eq!(b.permit_at(t0 + 150 * MS), Permit::Skip);
        assert_eq!(
            b.permit_at(t0 + 200 * MS),
            Permit::Probe,
            "a new probe after the wait"
        );
    }

    #[test]
    fn a_cap_below_100_ms_is_the_wait() {
        let b = Breaker::new(1, 30 * MS);
        let t0 = Instant::now();
        assert!(b.failure_at(Permit::Call, t0));
        assert_eq!(b.permit_at(t0 + 30 * MS), Permit::Probe);
        assert!(!b.failure_at(Permit::Probe, t0 + 30 * MS));
        assert_eq!(b.permit_at(t0 + 60 * MS), Permit::Probe);
    }
}
