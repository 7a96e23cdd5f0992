//! [`Health`]: what a readiness probe asks of a cache — its circuit breakers, its
//! subscription, its resyncs, how long ago L2 last answered and how fast — and the
//! cheap in-process records it is read from (no I/O).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::breaker::Group;

/// The state of one read group's L2 circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through; `failures` consecutive ones failed (fewer than the threshold).
    Closed {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// Reads are skipped; a probe read goes through in `next_probe_in`.
    Open {
        /// Probes that failed since it opened.
        failed_probes: u32,
        /// How long until the next probe read is let through.
        next_probe_in: Duration,
    },
    /// A probe read is in flight; other reads are skipped.
    HalfOpen {
        /// Probes that failed since it opened.
        failed_probes: u32,
    },
}

/// One read group's breaker in a [`Health`] report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupBreaker {
    /// The read group ([`FlagStore::read_group`](crate::FlagStore::read_group): one per
    /// server), `None` for keys without one.
    pub group: Option<u64>,
    /// Its state.
    pub state: BreakerState,
}

/// The invalidation subscription in a [`Health`] report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionHealth {
    /// Whether the subscription is up. While it is down, L1 serves nothing as fresh
    /// and the cache resubscribes (after 100 ms, doubling up to 1 s).
    pub up: bool,
    /// How long ago the last signal (an invalidation or a resync) arrived; `None`
    /// when none has.
    pub last_signal_age: Option<Duration>,
    /// How long it has been down, when it is.
    pub down_for: Option<Duration>,
}

/// A cache's health, from [`FlagCache::health`](crate::FlagCache::health): read from
/// in-process records, without I/O, so a readiness probe may ask for it on every
/// call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The breakers of the read groups that are open or have failures; a group not
    /// listed is closed with a clean record.
    pub breakers: Vec<GroupBreaker>,
    /// The invalidation subscription; `None` without an invalidator.
    pub subscription: Option<SubscriptionHealth>,
    /// `Resync` signals so far (each marked L1 unverified).
    pub resyncs: u64,
    /// How long ago an L2 call last succeeded; `None` when none has yet.
    pub l2_last_success_age: Option<Duration>,
    /// The 99th percentile of L2 call latency since the cache was built (the upper
    /// bound of its power-of-two bucket: at most twice the true figure); `None`
    /// before the first call.
    pub l2_latency_p99: Option<Duration>,
}

impl Health {
    /// Whether the breaker of some read group is open (or probing): some keys are
    /// read from the loader, not L2.
    pub fn l2_breaker_open(&self) -> bool {
        self.breakers
            .iter()
            .any(|b| !matches!(b.state, BreakerState::Closed { .. }))
    }
}

/// Power-of-two buckets of microseconds: bucket `i` counts latencies below `2^i` µs
/// (and at least `2^(i-1)`); the last one everything from 2^30 µs (18 min) up.
const BUCKETS: usize = 32;

/// What [`Health`] reports, recorded as it happens: a few relaxed atomics.
pub(crate) struct HealthRecord {
    base: quanta::Instant,
    /// Milliseconds since `base` plus one of the last L2 success; 0: never.
    l2_ok_ms: AtomicU64,
    /// The same, of the last signal received.
    signal_ms: AtomicU64,
    /// The same, of when the subscription went down; 0 while it is up.
    down_ms: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl HealthRecord {
    pub fn new(now: quanta::Instant) -> Self {
        HealthRecord {
            base: now,
            l2_ok_ms: AtomicU64::new(0),
            signal_ms: AtomicU64::new(0),
            down_ms: AtomicU64::new(0),
            latency: Default::default(),
        }
    }

    fn stamp(&self, now: quanta::Instant) -> u64 {
        let ms = now.saturating_duration_since(self.base).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
    }

    fn age(&self, stamp: u64, now: quanta::Instant) -> Option<Duration> {
        (stamp > 0).then(|| Duration::from_millis(self.stamp(now).saturating_sub(stamp)))
    }

    pub fn l2_call(&self, latency: Duration, ok: bool, now: quanta::Instant) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // The bit length of `us` is its bucket: below 2^i µs.
        let bucket = (u64::BITS - us.leading_zeros()) as usize;
        if let Some(b) = self.latency.get(bucket.min(BUCKETS - 1)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        if ok {
            self.l2_ok_ms.store(self.stamp(now), Ordering::Relaxed);
        }
    }

    pub fn signal(&self, now: quanta::Instant) {
        self.signal_ms.store(self.stamp(now), Ordering::Relaxed);
    }

    pub fn subscription_down(&self, now: quanta::Instant) {
        self.down_ms.store(self.stamp(now), Ordering::Relaxed);
    }

    pub fn subscription_up(&self) {
        self.down_ms.store(0, Ordering::Relaxed);
    }

    fn p99(&self) -> Option<Duration> {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        // The smallest bucket bound with at least 99 % of the calls at or below it.
        let rank = total - total / 100;
        let mut seen = 0;
        let bucket = counts.iter().position(|&n| {
            seen += n;
            seen >= rank
        })?;
        Some(Duration::from_micros(1u64 << bucket.min(63)))
    }

    pub fn report(
        &self,
        now: quanta::Instant,
        breakers: Vec<(Group, BreakerState)>,
        subscribed: bool,
        resyncs: u64,
    ) -> Health {
        let subscription = subscribed.then(|| {
            let down = self.down_ms.load(Ordering::Relaxed);
            SubscriptionHealth {
                up: down == 0,
                last_signal_age: self.age(self.signal_ms.load(Ordering::Relaxed), now),
                down_for: self.age(down, now),
            }
        });
        Health {
            breakers: breakers
                .into_iter()
                .map(|(group, state)| GroupBreaker { group, state })
                .collect(),
            subscription,
            resyncs,
            l2_last_success_age: self.age(self.l2_ok_ms.load(Ordering::Relaxed), now),
            l2_latency_p99: self.p99(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_bucket_bound_of_the_99th_percentile() {
        let clock = quanta::Clock::new();
        let now = clock.now();
        let r = HealthRecord::new(now);
        assert_eq!(r.p99(), None);
        for _ in 0..990 {
            r.l2_call(Duration::from_micros(300), true, now); // below 512 µs
        }
        for _ in 0..10 {
            r.l2_call(Duration::from_millis(40), false, now); // below 65.536 ms
        }
        assert_eq!(r.p99(), Some(Duration::from_micros(512)));
        for _ in 0..10 {
            r.l2_call(Duration::from_millis(40), false, now);
        }
        assert_eq!(r.p99(), Some(Duration::from_micros(65_536)));
    }

    #[test]
    fn ages_count_from_the_last_event() {
        let clock = quanta::Clock::new();
        let t0 = clock.now();
        let r = HealthRecord::new(t0);
        let h = r.report(t0, Vec::new(), true, 0);
        assert_eq!(h.l2_last_success_age, None);
        let sub = h.subscription.unwrap();
        assert!(sub.up && sub.last_signal_age.is_none() && sub.down_for.is_none());

        r.l2_call(
            Duration::from_millis(1),
            true,
            t0 + Duration::from_millis(10),
        );
        r.signal(t0 + Duration::from_millis(20));
        r.subscription_down(t0 + Duration::from_millis(30));
        let h = r.report(t0 + Duration::from_millis(530), Vec::new(), true, 2);
        assert_eq!(h.l2_last_success_age, Some(Duration::from_millis(520)));
        let sub = h.subscription.unwrap();
        assert_eq!(sub.last_signal_age, Some(Duration::from_millis(510)));
        assert_eq!(
            (sub.up, sub.down_for),
            (false, Some(Duration::from_millis(500)))
        );
        assert_eq!(h.resyncs, 2);
        r.subscription_up();
        let h = r.report(t0 + Duration::from_millis(600), Vec::new(), false, 2);
        assert_eq!(h.subscription, None, "no invalidator");
    }
}
