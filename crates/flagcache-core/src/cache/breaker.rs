//! The circuit breakers around the shared tier: one per read group (one per server).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::backoff::{Backoff, FIRST_RETRY};
use super::health::BreakerState;

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
///
/// There is one such breaker per [`FlagStore::read_group`](crate::FlagStore::read_group)
/// — keys one server answers, which fail together when it is down — so one bad
/// memcached server trips its own keys' breaker, not the whole ring's; calls whose
/// key has no group (and calls without a key) share the group `None`. Only breakers
/// that are not closed with a clean record are kept, so the map stays as small as
/// the number of failing servers.
#[derive(Debug)]
pub(crate) struct Breaker {
    groups: Mutex<HashMap<Option<u64>, State>>,
    /// How many groups the map holds: while none has a record, an L2 call's permit and
    /// success take no lock (one atomic load).
    recorded: AtomicUsize,
    threshold: u32,
    schedule: Backoff,
    /// A probe's own time limit: no second probe is let through while one may still
    /// be waiting for its answer.
    probe_for: Duration,
}

/// A read group: `None` for calls whose key has none.
pub(crate) type Group = Option<u64>;

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
            groups: Mutex::default(),
            recorded: AtomicUsize::new(0),
            threshold: threshold.max(1),
            schedule: Backoff::new(FIRST_RETRY, max_backoff),
            probe_for: Duration::ZERO,
        }
    }

    /// Probes are calls bounded by `limit` (the L2 timeout): a probe keeps the breaker
    /// half-open at least that long, so no second probe overlaps it.
    #[must_use]
    pub fn probes_bounded_by(mut self, limit: Duration) -> Self {
        self.probe_for = limit;
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Group, State>> {
        // Nothing that can panic runs under the lock.
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a read of `group` may do.
    pub fn permit(&self, group: Group) -> Permit {
        // With a clean record (the usual case) the time is not needed: not read.
        if self.recorded.load(Ordering::Acquire) == 0 {
            return Permit::Call;
        }
        self.permit_at(group, Instant::now())
    }

    fn permit_at(&self, group: Group, now: Instant) -> Permit {
        let mut groups = self.lock();
        let Some(s) = groups.get_mut(&group) else {
            return Permit::Call;
        };
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
                    until: now + self.schedule.delay(failed_probes).max(self.probe_for),
                    failed_probes,
                };
                Permit::Probe
            }
            State::Open { .. } | State::HalfOpen { .. } => Permit::Skip,
        }
    }

    /// Whether any group's breaker is open.
    pub fn is_open(&self) -> bool {
        self.lock()
            .values()
            .any(|s| !matches!(s, State::Closed { .. }))
    }

    pub fn success(&self, group: Group) {
        if self.recorded.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut groups = self.lock();
        groups.remove(&group);
        self.recorded.store(groups.len(), Ordering::Release);
    }

    /// The state of every group that is not closed with a clean record, by group.
    pub fn report(&self, now: Instant) -> Vec<(Group, BreakerState)> {
        let mut states: Vec<_> = self
            .lock()
            .iter()
            .map(|(group, s)| {
                let state = match *s {
                    State::Closed { failures } => BreakerState::Closed { failures },
                    State::Open {
                        until,
                        failed_probes,
                    } => BreakerState::Open {
                        failed_probes,
                        next_probe_in: until.saturating_duration_since(now),
                    },
                    State::HalfOpen { failed_probes, .. } => {
                        BreakerState::HalfOpen { failed_probes }
                    }
                };
                (*group, state)
            })
            .collect();
        states.sort_by_key(|(group, _)| *group);
        states
    }

    /// Records the failure of a call of `group` made with `permit` ([`Permit::Call`]
    /// for a write); returns true when this failure opened the group's breaker.
    pub fn failure(&self, group: Group, permit: Permit) -> bool {
        self.failure_at(group, permit, Instant::now())
    }

    fn failure_at(&self, group: Group, permit: Permit, now: Instant) -> bool {
        let mut groups = self.lock();
        let s = groups.entry(group).or_insert(State::Closed { failures: 0 });
        let opened = match *s {
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
        };
        self.recorded.store(groups.len(), Ordering::Release);
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_second_probe_while_one_may_still_be_waiting_for_its_answer() {
        let b = Breaker::new(1, 5000 * MS).probes_bounded_by(250 * MS);
        let t0 = Instant::now();
        b.failure_at(None, Permit::Call, t0);
        assert_eq!(b.permit_at(None, t0 + 100 * MS), Permit::Probe);
        // The probe may take up to 250 ms: past the 100 ms delay, nobody else probes.
        assert_eq!(b.permit_at(None, t0 + 210 * MS), Permit::Skip);
        assert_eq!(b.permit_at(None, t0 + 349 * MS), Permit::Skip);
        // A probe whose outcome never came back: the next one after its time limit.
        assert_eq!(b.permit_at(None, t0 + 351 * MS), Permit::Probe);
    }

    #[test]
    fn a_clean_breaker_answers_without_its_lock() {
        let b = Breaker::new(2, 5000 * MS);
        assert_eq!(b.recorded.load(Ordering::Relaxed), 0);
        let t0 = Instant::now();
        b.failure_at(Some(1), Permit::Call, t0);
        assert_eq!(b.recorded.load(Ordering::Relaxed), 1);
        b.success(Some(1));
        assert_eq!(b.recorded.load(Ordering::Relaxed), 0);
        assert_eq!(b.permit_at(Some(1), t0), Permit::Call);
    }

    #[test]
    fn opens_after_threshold_and_probes_on_a_doubling_schedule_up_to_the_cap() {
        let b = Breaker::new(3, 500 * MS);
        let t0 = Instant::now();
        assert_eq!(b.permit_at(None, t0), Permit::Call);
        assert!(!b.failure_at(None, Permit::Call, t0));
        assert!(!b.failure_at(None, Permit::Call, t0));
        b.success(None); // resets the count
        assert!(!b.failure_at(None, Permit::Call, t0));
        assert!(!b.failure_at(None, Permit::Call, t0));
        assert!(
            b.failure_at(None, Permit::Call, t0),
            "third consecutive failure opens"
        );
        // Probes at +100 ms, then each failed one doubles the wait: 200, 400, 500 (cap).
        let mut at = t0;
        for wait in [100, 200, 400, 500, 500] {
            assert_eq!(
                b.permit_at(None, at + (wait - 1) * MS),
                Permit::Skip,
                "{wait}"
            );
            assert_eq!(b.permit_at(None, at + wait * MS), Permit::Probe, "{wait}");
            assert_eq!(
                b.permit_at(None, at + wait * MS),
                Permit::Skip,
                "one probe at a time"
            );
            at += wait * MS;
            assert!(
                !b.failure_at(None, Permit::Probe, at),
                "a failed probe re-opens (not a new opening)"
            );
            assert!(b.is_open());
        }
        assert_eq!(b.permit_at(None, at + 500 * MS), Permit::Probe);
        b.success(None);
        assert_eq!(b.permit_at(None, at + 500 * MS), Permit::Call);
        assert!(!b.is_open());
        // Opening again starts the schedule over.
        let t1 = at + 600 * MS;
        for _ in 0..3 {
            b.failure_at(None, Permit::Call, t1);
        }
        assert_eq!(b.permit_at(None, t1 + 100 * MS), Permit::Probe);
    }

    #[test]
    fn failures_other_than_the_probe_leave_the_schedule_alone() {
        let b = Breaker::new(1, 5000 * MS);
        let t0 = Instant::now();
        assert!(b.failure_at(None, Permit::Call, t0));
        // A write (or a read let through before it opened) fails while open.
        assert!(!b.failure_at(None, Permit::Call, t0 + 50 * MS));
        assert_eq!(b.permit_at(None, t0 + 100 * MS), Permit::Probe);
        // A write fails while the probe is in flight: the probe still decides.
        assert!(!b.failure_at(None, Permit::Call, t0 + 120 * MS));
        assert!(!b.failure_at(None, Permit::Probe, t0 + 150 * MS));
        assert_eq!(b.permit_at(None, t0 + 349 * MS), Permit::Skip);
        assert_eq!(b.permit_at(None, t0 + 350 * MS), Permit::Probe);
    }

    #[test]
    fn an_abandoned_probe_does_not_wedge_the_breaker() {
        let b = Breaker::new(1, 5000 * MS);
        let t0 = Instant::now();
        assert!(b.failure_at(None, Permit::Call, t0));
        assert_eq!(b.permit_at(None, t0 + 100 * MS), Permit::Probe);
        // The probe's caller is dropped: neither success nor failure is recorded.
        assert_eq!(b.permit_at(None, t0 + 150 * MS), Permit::Skip);
        assert_eq!(
            b.permit_at(None, t0 + 200 * MS),
            Permit::Probe,
            "a new probe after the wait"
        );
    }

    #[test]
    fn each_read_group_has_its_own_breaker() {
        let b = Breaker::new(2, 5000 * MS);
        let t0 = Instant::now();
        let (bad, good) = (Some(1), Some(2));
        assert!(!b.failure_at(bad, Permit::Call, t0));
        assert!(!b.failure_at(good, Permit::Call, t0));
        assert!(b.failure_at(bad, Permit::Call, t0), "the bad group opens");
        assert_eq!(b.permit_at(bad, t0), Permit::Skip);
        assert_eq!(b.permit_at(good, t0), Permit::Call);
        assert_eq!(b.permit_at(None, t0), Permit::Call);
        assert!(b.is_open());
        b.success(good);
        assert!(!b.failure_at(good, Permit::Call, t0), "its count was reset");
        b.success(bad);
        assert!(!b.is_open());
        assert_eq!(
            b.report(t0),
            vec![(good, BreakerState::Closed { failures: 1 })]
        );
        assert!(!b.failure_at(bad, Permit::Call, t0));
        assert!(b.failure_at(bad, Permit::Call, t0));
        assert_eq!(
            b.report(t0 + 40 * MS),
            vec![
                (
                    bad,
                    BreakerState::Open {
                        failed_probes: 0,
                        next_probe_in: 60 * MS
                    }
                ),
                (good, BreakerState::Closed { failures: 1 })
            ]
        );
        b.success(bad);
        b.success(good);
        assert!(b.lock().is_empty(), "closed, clean groups are forgotten");
    }

    #[test]
    fn a_cap_below_100_ms_is_the_wait() {
        let b = Breaker::new(1, 30 * MS);
        let t0 = Instant::now();
        assert!(b.failure_at(None, Permit::Call, t0));
        assert_eq!(b.permit_at(None, t0 + 30 * MS), Permit::Probe);
        assert!(!b.failure_at(None, Permit::Probe, t0 + 30 * MS));
        assert_eq!(b.permit_at(None, t0 + 60 * MS), Permit::Probe);
    }
}
