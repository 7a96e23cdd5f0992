//! Counters: cheap atomics for [`Stats`] snapshots, mirrored to the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Histogram};

/// Everything the cache counts. The discriminant indexes the counter arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ev {
    HitL1,
    HitL2,
    Miss,
    StaleRevalidating,
    StaleFailSafe,
    Load,
    LoadAbsent,
    LoadError,
    L2Timeout,
    L2Transient,
    L2Permanent,
    L2Refused,
    L2Skipped,
    Corrupt,
    Coalesced,
    Invalidation,
    OwnEvent,
    Resync,
    FencedFill,
    BreakerOpened,
    PublishError,
    Error,
}

const N: usize = Ev::Error as usize + 1;

impl Ev {
    const ALL: [Ev; N] = [
        Ev::HitL1,
        Ev::HitL2,
        Ev::Miss,
        Ev::StaleRevalidating,
        Ev::StaleFailSafe,
        Ev::Load,
        Ev::LoadAbsent,
        Ev::LoadError,
        Ev::L2Timeout,
        Ev::L2Transient,
        Ev::L2Permanent,
        Ev::L2Refused,
        Ev::L2Skipped,
        Ev::Corrupt,
        Ev::Coalesced,
        Ev::Invalidation,
        Ev::OwnEvent,
        Ev::Resync,
        Ev::FencedFill,
        Ev::BreakerOpened,
        Ev::PublishError,
        Ev::Error,
    ];

    /// The metric name and its one distinguishing label.
    fn metric(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Ev::HitL1 => ("flagcache_requests_total", "status", "hit_l1"),
            Ev::HitL2 => ("flagcache_requests_total", "status", "hit_l2"),
            Ev::Miss => ("flagcache_requests_total", "status", "miss"),
            Ev::StaleRevalidating => ("flagcache_stale_served_total", "reason", "revalidating"),
            Ev::StaleFailSafe => ("flagcache_stale_served_total", "reason", "fail_safe"),
            Ev::Load => ("flagcache_loads_total", "outcome", "ok"),
            Ev::LoadAbsent => ("flagcache_loads_total", "outcome", "absent"),
            Ev::LoadError => ("flagcache_loads_total", "outcome", "error"),
            Ev::L2Timeout => ("flagcache_l2_errors_total", "kind", "timeout"),
            Ev::L2Transient => ("flagcache_l2_errors_total", "kind", "transient"),
            Ev::L2Permanent => ("flagcache_l2_errors_total", "kind", "permanent"),
            Ev::L2Refused => ("flagcache_l2_errors_total", "kind", "refused"),
            Ev::L2Skipped => ("flagcache_l2_errors_total", "kind", "skipped_open_breaker"),
            Ev::Corrupt => ("flagcache_l2_errors_total", "kind", "corrupt"),
            Ev::Coalesced => ("flagcache_coalesced_waits_total", "step", "fill"),
            Ev::Invalidation => ("flagcache_invalidations_total", "applied", "yes"),
            Ev::OwnEvent => ("flagcache_invalidations_total", "applied", "own_event"),
            Ev::Resync => ("flagcache_resyncs_total", "signal", "resync"),
            Ev::FencedFill => ("flagcache_fenced_fills_total", "refused", "yes"),
            Ev::BreakerOpened => ("flagcache_breaker_opened_total", "tier", "l2"),
            Ev::PublishError => ("flagcache_errors_total", "kind", "publish"),
            Ev::Error => ("flagcache_errors_total", "kind", "returned"),
        }
    }
}

/// L1 hits — the one event every read of a hot key records — are counted on
/// per-thread stripes, each on its own cache line. A thread leases one of `LEASED`
/// stripes while one is free and adds to it without a locked instruction; threads
/// beyond that many alive at once add atomically to one of `SPILLED` shared stripes
/// (never to a leased one, whose owner's plain add would overwrite theirs). Leases are
/// returned when their thread exits, so a churning thread pool does not run out.
const LEASED: usize = 16;
const SPILLED: usize = 4;
const STRIPES: usize = LEASED + SPILLED;

/// No stripe chosen yet.
const UNSET: usize = usize::MAX;

#[repr(align(128))]
#[derive(Default)]
struct Stripe(AtomicU64);

mod lease {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, PoisonError};

    use super::{LEASED, SPILLED, UNSET};

    /// Stripes never leased yet are `NEXT..LEASED`; returned ones wait in `FREE`.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    /// Round-robin over the shared stripes.
    static SPILL: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static MINE: Cell<usize> = const { Cell::new(UNSET) };
        static LEASE: Lease = Lease(take());
    }

    /// Returns its stripe when the thread exits.
    struct Lease(usize);

    impl Drop for Lease {
        fn drop(&mut self) {
            if self.0 >= LEASED {
                return;
            }
            // Counting on after this (from another thread-local's destructor) must
            // not write to a stripe another thread may lease next.
            let _ = MINE.try_with(|m| m.set(spill()));
            FREE.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.0);
        }
    }

    fn spill() -> usize {
        LEASED + SPILL.fetch_add(1, Ordering::Relaxed) % SPILLED
    }

    fn take() -> usize {
        let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = free.pop() {
            return i;
        }
        drop(free);
        NEXT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < LEASED).then_some(n + 1)
        })
        .unwrap_or_else(|_| spill())
    }

    /// This thread's stripe: below `LEASED`, this thread's alone; from there on,
    /// shared with other threads.
    #[inline]
    pub(super) fn stripe() -> usize {
        let i = MINE.with(Cell::get);
        if i != UNSET {
            return i;
        }
        let i = LEASE.try_with(|l| l.0).unwrap_or_else(|_| spill());
        MINE.with(|m| m.set(i));
        i
    }
}

pub(crate) struct Telemetry {
    counts: [AtomicU64; N],
    hits: [Stripe; STRIPES],
    /// L1 hits handed to the `metrics` counter so far (see [`Telemetry::publish_hits`]).
    hits_published: AtomicU64,
    /// The clock thread publishes the L1 hits every tick: a hit does not touch the
    /// `metrics` counter. Without that thread, each hit adds to it.
    stepped: bool,
    meters: [Counter; N],
    pub lag: Histogram,
    pub l2_latency: Histogram,
    pub load_latency: Histogram,
}

impl Telemetry {
    /// Registers every metric once, with the cache's name as a label, so recording on
    /// the hot path is an atomic add and never allocates. Install your `metrics`
    /// recorder before building the cache.
    pub fn new(cache: &str, stepped: bool) -> Self {
        let name = cache.to_string();
        Telemetry {
            counts: Default::default(),
            hits: Default::default(),
            hits_published: AtomicU64::new(0),
            stepped,
            meters: Ev::ALL.map(|ev| {
                let (metric, label, value) = ev.metric();
                metrics::counter!(metric, "cache" => name.clone(), label => value)
            }),
            lag: metrics::histogram!("flagcache_invalidation_lag_seconds", "cache" => name.clone()),
            l2_latency: metrics::histogram!("flagcache_l2_latency_seconds", "cache" => name.clone()),
            load_latency: metrics::histogram!("flagcache_load_latency_seconds", "cache" => name),
        }
    }

    /// Counts `ev`. An L1 hit — the hottest path there is — writes only this
    /// thread's stripe: the `metrics` counter, which every thread shares (one contended
    /// atomic per hit once a recorder is installed), gets the hits on the clock
    /// thread's ticks (see [`Telemetry::publish_hits`]).
    #[inline]
    pub fn bump(&self, ev: Ev) {
        if ev == Ev::HitL1 {
            let s = lease::stripe();
            let hits = &self.hits[s].0;
            if s < LEASED {
                // Only this thread writes this stripe: a plain add, no locked
                // instruction. Readers sum the stripes with loads.
                hits.store(
                    hits.load(Ordering::Relaxed).wrapping_add(1),
                    Ordering::Relaxed,
                );
            } else {
                hits.fetch_add(1, Ordering::Relaxed);
            }
            if self.stepped {
                return;
            }
            // No clock thread: each hit reaches the counter itself.
        } else {
            self.counts[ev as usize].fetch_add(1, Ordering::Relaxed);
        }
        self.meters[ev as usize].increment(1);
    }

    /// Hands the L1 hits not yet published to the `metrics` counter: on every tick of
    /// the clock thread (10 ms), on [`Telemetry::snapshot`] and when the cache is
    /// dropped. Concurrent publishers each add only what the others did not: the
    /// counter never counts a hit twice and never goes back. Without the clock
    /// thread, hits are counted as they happen and there is nothing to publish.
    pub fn publish_hits(&self) {
        if !self.stepped {
            return;
        }
        let total = self.get(Ev::HitL1);
        if total <= self.hits_published.load(Ordering::Relaxed) {
            return;
        }
        let before = self.hits_published.fetch_max(total, Ordering::Relaxed);
        if total > before {
            self.meters[Ev::HitL1 as usize].increment(total - before);
        }
    }

    pub fn get(&self, ev: Ev) -> u64 {
        if ev == Ev::HitL1 {
            return self.hits.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
        }
        self.counts[ev as usize].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self, l1_entries: usize, breaker_open: bool) -> Stats {
        self.publish_hits();
        Stats {
            hits_l1: self.get(Ev::HitL1),
            hits_l2: self.get(Ev::HitL2),
            misses: self.get(Ev::Miss),
            stale_revalidating: self.get(Ev::StaleRevalidating),
            stale_fail_safe: self.get(Ev::StaleFailSafe),
            loads: self.get(Ev::Load),
            loads_absent: self.get(Ev::LoadAbsent),
            load_errors: self.get(Ev::LoadError),
            l2_timeouts: self.get(Ev::L2Timeout),
            l2_transient_errors: self.get(Ev::L2Transient),
            l2_permanent_errors: self.get(Ev::L2Permanent),
            l2_refused: self.get(Ev::L2Refused),
            l2_errors: [
                Ev::L2Timeout,
                Ev::L2Transient,
                Ev::L2Permanent,
                Ev::L2Refused,
            ]
            .into_iter()
            .map(|ev| self.get(ev))
            .sum(),
            l2_skipped: self.get(Ev::L2Skipped),
            corrupt: self.get(Ev::Corrupt),
            coalesced_waits: self.get(Ev::Coalesced),
            l2_batches: 0,
            l2_batched_reads: 0,
            tagged_keys: 0,
            invalidations: self.get(Ev::Invalidation),
            own_events: self.get(Ev::OwnEvent),
            resyncs: self.get(Ev::Resync),
            fenced_fills: self.get(Ev::FencedFill),
            breaker_opened: self.get(Ev::BreakerOpened),
            publish_errors: self.get(Ev::PublishError),
            errors: self.get(Ev::Error),
            l1_entries,
            breaker_open,
        }
    }
}

pub(crate) fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A snapshot of a cache's counters, from [`FlagCache::stats`](crate::FlagCache::stats).
/// Cheap: a few relaxed atomic loads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered fresh from L1.
    pub hits_l1: u64,
    /// Reads answered from L2 (after an L1 miss).
    pub hits_l2: u64,
    /// Reads that went to the loader.
    pub misses: u64,
    /// Reads answered with an L1 value past its soft expiry while a refresh ran.
    pub stale_revalidating: u64,
    /// Reads answered with a last known value because L2 or the loader failed.
    pub stale_fail_safe: u64,
    /// Loader calls that returned a value.
    pub loads: u64,
    /// Loader calls that found no such flag.
    pub loads_absent: u64,
    /// Loader calls that failed or timed out.
    pub load_errors: u64,
    /// L2 calls that failed, whatever the kind: the sum of `l2_timeouts`,
    /// `l2_transient_errors`, `l2_permanent_errors` and `l2_refused`. (Calls skipped
    /// by the breaker and corrupt entries are counted apart.) The `metrics` facade
    /// has each kind as `flagcache_l2_errors_total{kind=…}`.
    pub l2_errors: u64,
    /// L2 calls that timed out (`kind=timeout`).
    pub l2_timeouts: u64,
    /// L2 calls that failed in a way a retry may fix: connection refused or reset,
    /// overload (`kind=transient`).
    pub l2_transient_errors: u64,
    /// L2 calls that failed in a way only an operator fixes: authentication (`NOAUTH`,
    /// `WRONGPASS`), permissions (`NOPERM`), a closed store (`kind=permanent`). They
    /// count towards opening the circuit breaker.
    pub l2_permanent_errors: u64,
    /// L2 calls refused for their own request, not for the server's health: a value
    /// over the size limit, an invalid argument, a codec error (`kind=refused`).
    pub l2_refused: u64,
    /// L2 calls skipped because the circuit breaker was open.
    pub l2_skipped: u64,
    /// Corrupt L2 entries found (each deleted and treated as a miss).
    pub corrupt: u64,
    /// Reads that waited on another read's fill instead of starting one.
    pub coalesced_waits: u64,
    /// Batched L2 reads issued: the store calls made for reads that queued (see
    /// [`FlagCacheBuilder::l2_batch_after`](crate::FlagCacheBuilder::l2_batch_after)),
    /// one `MGET` or one pipeline each. A batch may hold a single read.
    pub l2_batches: u64,
    /// L2 reads that queued and went in those batches rather than on their own.
    pub l2_batched_reads: u64,
    /// (tag, key) pairs the tag index holds: which L1 keys an
    /// [`invalidate_tag`](crate::FlagCache::invalidate_tag) drops. Keys L1 evicted
    /// linger until the index has doubled since its last prune (and holds at least
    /// 1,024 pairs), then are forgotten: it stays within twice the pairs of the keys
    /// L1 holds, or 1,024.
    pub tagged_keys: u64,
    /// Invalidation events applied to L1.
    pub invalidations: u64,
    /// Events this node published itself, received back (applied idempotently: they
    /// never evict the version this node wrote).
    pub own_events: u64,
    /// `Resync` signals (L1 marked unverified).
    pub resyncs: u64,
    /// Fills refused because an invalidation landed while they ran.
    pub fenced_fills: u64,
    /// Times an L2 circuit breaker opened (there is one per read group — per server —
    /// of the store; each opening counts).
    pub breaker_opened: u64,
    /// Invalidations this node failed to publish.
    pub publish_errors: u64,
    /// Errors returned to callers.
    pub errors: u64,
    /// Entries in L1 now.
    pub l1_entries: usize,
    /// Whether an L2 circuit breaker (of any read group) is open now.
    pub breaker_open: bool,
}

impl Stats {
    /// Share of reads answered from a cache tier (L1, L2, or stale-while-revalidate):
    /// `(hits_l1 + hits_l2 + stale_revalidating) / (those + misses)`; 0 with no reads.
    pub fn hit_rate(&self) -> f64 {
        let hits = self.hits_l1 + self.hits_l2 + self.stale_revalidating;
        let total = hits + self.misses;
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    }
}

impl super::clock::OnTick for Telemetry {
    fn on_tick(&self) {
        self.publish_hits();
    }
}

impl Drop for Telemetry {
    /// The last hits of a cache being dropped reach the counter too.
    fn drop(&mut self) {
        self.publish_hits();
    }
}
