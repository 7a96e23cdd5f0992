//! [`FlagCache`]: the two tiers together — its public API and types, and the state its
//! parts share (`Inner`). The parts, one concept a file:
//! - `l1`: the in-process tier (lookup, install, drop);
//! - `fill`: the read path past L1 (coalesced fill: L2, then the loader, across processes);
//! - `l2`: guarded calls to the shared tier (breaker, timeout, counting);
//! - `fence`: version fences against late fills;
//! - `revalidate`: stale-while-revalidate and early refresh;
//! - `events`: publishing and applying invalidations, resyncs, the listener;
//! - `warm`: pre-loading keys;
//! - `health`: the readiness report and what it is read from;
//! - `backoff`: the retry schedule of the breaker's probes and of resubscribing;
//! - `batch`, `breaker`, `stats`, `builder`, `loader`: as named.

mod backoff;
mod batch;
mod breaker;
mod builder;
mod clock;
mod events;
mod fence;
mod fill;
mod health;
mod l1;
mod l1map;
mod l2;
mod loader;
mod revalidate;
mod stats;
mod tags;
mod warm;
mod writes;

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

pub use builder::FlagCacheBuilder;
pub use health::{BreakerState, GroupBreaker, Health, SubscriptionHealth};
pub use loader::{Loader, VersionSource};
pub use stats::Stats;
pub use warm::WarmReport;

use breaker::Breaker;
use fence::Fences;
use l1::L1Entry;
use revalidate::Refreshing;
use stats::Telemetry;

use crate::{Error, FlagKey, FlagStore, Invalidator, LocalCoalescer, NodeId, Result, Version};

/// Where a read was answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Fresh from the in-process tier.
    HitL1,
    /// From the shared tier.
    HitL2,
    /// From the loader (the source of truth).
    Miss,
    /// A value past its freshness, served on purpose; see [`StaleReason`].
    Stale(StaleReason),
}

/// Why a stale value was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StaleReason {
    /// Past its soft expiry, inside the stale-while-revalidate window: one background
    /// refresh is running.
    Revalidating,
    /// L2 and the loader failed or timed out; this is the last known value, within the
    /// maximum staleness.
    FailSafe,
}

/// The answer of [`FlagCache::lookup`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Lookup<T> {
    /// The value; `None` when the source has no such flag.
    pub value: Option<Arc<T>>,
    /// Its version (`None` for an absent flag).
    pub version: Option<Version>,
    /// Where it came from.
    pub status: CacheStatus,
}

impl<T> Clone for Lookup<T> {
    fn clone(&self) -> Self {
        Lookup {
            value: self.value.clone(),
            version: self.version,
            status: self.status,
        }
    }
}

impl<T> Lookup<T> {
    fn from_l1(slot: L1Entry<T>, status: CacheStatus) -> Self {
        Lookup {
            version: slot.value.as_ref().map(|_| slot.version),
            value: slot.value,
            status,
        }
    }
}

/// The future of [`FlagCache::get`]: ready at once on an L1 hit (it then holds only
/// the answer), a boxed fill otherwise.
#[must_use = "futures do nothing unless awaited"]
pub struct Get<'a, T>(GetState<'a, T>);

type MissFuture<'a, T> =
    Pin<Box<dyn std::future::Future<Output = Result<Option<Arc<T>>>> + Send + 'a>>;

enum GetState<'a, T> {
    Hit(Option<Arc<T>>),
    Miss(MissFuture<'a, T>),
    Done,
}

impl<T> fmt::Debug for Get<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.0 {
            GetState::Hit(_) => "hit",
            GetState::Miss(_) => "miss",
            GetState::Done => "done",
        };
        f.debug_tuple("Get").field(&state).finish()
    }
}

impl<T> std::future::Future for Get<'_, T> {
    type Output = Result<Option<Arc<T>>>;

    #[inline(always)]
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            GetState::Hit(value) => {
                let value = value.take();
                self.0 = GetState::Done;
                std::task::Poll::Ready(Ok(value))
            }
            GetState::Miss(fill) => {
                let answer = fill.as_mut().poll(cx);
                if answer.is_ready() {
                    self.0 = GetState::Done;
                }
                answer
            }
            GetState::Done => {
                std::task::Poll::Ready(Err(Error::Closed("a FlagCache::get already answered")))
            }
        }
    }
}

/// What the evaluation hook receives for every read.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Evaluation<'a> {
    /// The key read.
    pub key: &'a FlagKey,
    /// Where the answer came from; `None` when the read failed.
    pub status: Option<CacheStatus>,
    /// The version served, if any.
    pub version: Option<Version>,
    /// How long the read took.
    pub latency: Duration,
}

/// The evaluation hook's type.
pub type Hook = Arc<dyn Fn(&Evaluation<'_>) + Send + Sync>;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub name: String,
    pub l1_enabled: bool,
    pub l1_capacity: usize,
    pub fresh_for: Duration,
    pub stale_for: Duration,
    pub max_staleness: Duration,
    pub fail_safe_throttle: Duration,
    pub negative_ttl: Duration,
    pub l2_ttl: Duration,
    pub jitter: f64,
    pub l2_timeout: Duration,
    pub loader_timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_backoff: Duration,
    pub xfetch_beta: f64,
    pub refetch_jitter: Option<Duration>,
    pub l2_batch_after: usize,
}

impl Config {
    /// `d` spread uniformly over ±`jitter`.
    pub(super) fn jittered(&self, d: Duration) -> Duration {
        if self.jitter <= 0.0 {
            return d;
        }
        d.mul_f64(1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0))
    }

    /// How long a versionless invalidation's fence stays in L2: longer than any fill
    /// begun before it can take to write — its L2 read, its load, and its write, each
    /// bounded by its timeout (twice over, for a fill that waited on another process's
    /// lock first) — plus a second of margin for clocks and scheduling.
    pub(super) fn fence_ttl(&self) -> Duration {
        (self.loader_timeout + self.l2_timeout) * 2 + Duration::from_secs(1)
    }
}

struct Inner<T> {
    cfg: Config,
    store: Arc<dyn FlagStore>,
    loader: Arc<dyn Loader<T>>,
    invalidator: Option<Arc<dyn Invalidator>>,
    expected: Option<Arc<dyn VersionSource>>,
    /// The cross-process coalescer, when configured.
    coalescer: Option<Arc<dyn crate::Coalescer>>,
    /// Tag bookkeeping, when the cache has a tagger.
    tags: Option<tags::Tags<T>>,
    hook: Option<Hook>,
    /// L1 on, no evaluation hook, no early refresh, a coarse clock: a fresh hit needs
    /// nothing but the entry and one load of the time (see [`Inner::fresh_hit`]).
    plain_hits: bool,
    node: NodeId,
    /// Fleet presence, when reported ([`FlagCacheBuilder::report_to_fleet`]).
    fleet: Option<Arc<crate::fleet::Reporter>>,
    l1: l1map::L1Map<T>,
    /// Which keys have a background refresh running.
    refreshing: Refreshing,
    /// Versionless key invalidations this cache published and already applied, whose
    /// echo from the invalidator is still to come: the echo must not fence the fills
    /// that began after the invalidation itself. Key → (echoes due, when).
    own_echoes: std::sync::Mutex<std::collections::HashMap<FlagKey, (u32, Instant)>>,
    /// The clock of L1 deadlines (see [`clock`]).
    clock: clock::Clock,
    /// Bumped by every `Resync`: entries of an older epoch are unverified.
    epoch: AtomicU64,
    /// Set while the invalidation subscription is down: L1 then serves nothing as
    /// fresh (only as a fail-safe fallback), since it would not hear of changes.
    deaf: AtomicBool,
    /// What [`FlagCache::health`] reports, recorded as it happens.
    health: health::HealthRecord,
    fences: Fences,
    fills: LocalCoalescer<fill::Filled<T>>,
    /// Gathers concurrent L2 reads into batches (shared stores that batch).
    batcher: Option<batch::ReadBatcher>,
    breaker: Breaker,
    /// Shared with the clock thread, which publishes its L1 hit count every tick.
    tel: Arc<Telemetry>,
    /// Dropped with the cache: ends the invalidation task.
    _shutdown: Option<oneshot::Sender<()>>,
}

/// A typed, two-tier, invalidation-aware cache of versioned values.
///
/// Reads go L1 (in process, decoded `Arc<T>`) → L2 (a shared [`FlagStore`]) → the
/// [`Loader`] (the source of truth), coalesced per key; writes are version-guarded;
/// invalidations from an [`Invalidator`] evict L1 on every replica, behind version
/// fences. Cloning is cheap and shares everything.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> flagcache::Result<()> {
/// use flagcache::{CacheStatus, FlagCache, FlagKey, Version};
/// # let store = flagcache::memory::MemoryStore::new();
///
/// // The source of truth: here, a closure.
/// let loader = |key: FlagKey| async move {
///     Ok(Some((format!("config of {key}"), Version::new(1))))
/// };
/// let cache = FlagCache::<String>::builder(store, loader).build().await?;
/// let key = FlagKey::new("checkout")?;
///
/// let first = cache.lookup(&key).await?;
/// assert_eq!(first.status, CacheStatus::Miss);
/// let again = cache.lookup(&key).await?;
/// assert_eq!(again.status, CacheStatus::HitL1);
/// assert_eq!(again.value.as_deref().map(String::as_str), Some("config of checkout"));
/// # Ok(()) }
/// ```
pub struct FlagCache<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for FlagCache<T> {
    fn clone(&self) -> Self {
        FlagCache {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for FlagCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlagCache")
            .field("name", &self.inner.cfg.name)
            .field("node", &self.inner.node)
            .field("store", &self.inner.store.name())
            .field("l1_entries", &self.inner.l1.len())
            .finish_non_exhaustive()
    }
}

impl<T> FlagCache<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Starts building a cache over `store` (L2) and `loader` (the source of truth).
    /// See [`FlagCacheBuilder`] for the settings and their defaults.
    pub fn builder(store: impl FlagStore + 'static, loader: impl Loader<T>) -> FlagCacheBuilder<T> {
        FlagCacheBuilder::new(Arc::new(store), Arc::new(loader))
    }

    /// Reads `key`: the value, or `None` when the source has no such flag.
    ///
    /// # Concurrent calls on the same key
    /// Concurrent misses of one key share one fill: one L2 read and, if L2 misses, one
    /// loader call, whose result every caller receives. A caller being dropped does not
    /// cancel the fill. An error reaches every waiter and is not cached.
    ///
    /// # Errors
    /// When neither L2 nor the loader produced a value and no last known value within
    /// the maximum staleness exists: the loader's error, [`Error::Timeout`], or a codec
    /// error.
    #[inline(always)]
    pub fn get<'a>(&'a self, key: &'a FlagKey) -> Get<'a, T> {
        // The L1 part runs now, when the future is made: a fresh hit is a ready future
        // that holds only its answer; everything else takes the out-of-line path.
        match self.inner.fresh_hit(key) {
            Some(value) => Get(GetState::Hit(value)),
            None => self.get_slow(key),
        }
    }

    /// [`FlagCache::get`] past a fresh L1 hit: the evaluation hook, a stale or
    /// fail-safe L1 answer, or a boxed fill.
    #[inline(never)]
    fn get_slow<'a>(&'a self, key: &'a FlagKey) -> Get<'a, T> {
        let inner = &self.inner;
        if inner.hook.is_some() {
            return Get(GetState::Miss(Box::pin(async move {
                self.lookup(key).await.map(|l| l.value)
            })));
        }
        match inner.lookup_l1(key, |slot, _| slot.value) {
            Ok(value) => Get(GetState::Hit(value)),
            Err(fallback) => Get(GetState::Miss(Box::pin(async move {
                inner.lookup_miss(key, fallback).await.map(|l| l.value)
            }))),
        }
    }

    /// Answers `key` from L1 alone, without awaiting: `Some(value)` when L1 holds it
    /// fresh, or stale while one background refresh runs, or as a fail-safe answer
    /// within `fail_safe_throttle` — `Some(None)` being a flag the source does not
    /// have — and `None` when only [`FlagCache::get`] can answer.
    /// For evaluating flags in synchronous code; the evaluation hook and the counters
    /// see it as an L1 read.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flagcache::Result<()> {
    /// # use flagcache::{FlagCache, FlagKey, Version};
    /// # let loader = |_: FlagKey| async { Ok(Some((true, Version::new(1)))) };
    /// # let cache = FlagCache::<bool>::builder(flagcache::memory::MemoryStore::new(), loader).build().await?;
    /// let key = FlagKey::new("checkout.new-flow")?;
    /// assert_eq!(cache.get_cached(&key), None); // not loaded yet
    /// cache.get(&key).await?;
    /// assert_eq!(cache.get_cached(&key).flatten().as_deref(), Some(&true));
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn get_cached(&self, key: &FlagKey) -> Option<Option<Arc<T>>> {
        let inner = &self.inner;
        if let Some(value) = inner.fresh_hit(key) {
            return Some(value);
        }
        let Some(hook) = &inner.hook else {
            return inner.lookup_l1(key, |slot, _| slot.value).ok();
        };
        let started = Instant::now();
        let hit = inner.lookup_l1(key, Lookup::from_l1).ok()?;
        hook(&Evaluation {
            key,
            status: Some(hit.status),
            version: hit.version,
            latency: started.elapsed(),
        });
        Some(hit.value)
    }

    /// Reads `key` and tells where the answer came from (see [`Lookup`]).
    ///
    /// # Concurrent calls on the same key
    /// As for [`FlagCache::get`].
    ///
    /// # Errors
    /// As for [`FlagCache::get`].
    pub async fn lookup(&self, key: &FlagKey) -> Result<Lookup<T>> {
        let inner = &self.inner;
        let Some(hook) = &inner.hook else {
            return inner.lookup(key).await;
        };
        let started = Instant::now();
        let result = inner.lookup(key).await;
        let (status, version) = match &result {
            Ok(l) => (Some(l.status), l.version),
            Err(_) => (None, None),
        };
        hook(&Evaluation {
            key,
            status,
            version,
            latency: started.elapsed(),
        });
        result
    }

    /// Pre-loads `keys` before they are needed (a rollout step, a deploy): one batched
    /// L2 read for those not fresh in L1, then the loader for L2's misses, 16 at a time.
    ///
    /// # Concurrent calls on the same key
    /// Loader calls are coalesced with concurrent reads of the same keys.
    pub async fn warm(&self, keys: &[FlagKey]) -> WarmReport {
        self.inner.warm(keys).await
    }

    /// A snapshot of the counters (cheap: a few atomic loads).
    pub fn stats(&self) -> Stats {
        let mut stats = self
            .inner
            .tel
            .snapshot(self.inner.l1.len(), self.inner.breaker.is_open());
        // Counted when a caller joins, not when the fill it joined ends.
        stats.coalesced_waits = self.inner.fills.coalesced_waits();
        if let Some(b) = &self.inner.batcher {
            (stats.l2_batches, stats.l2_batched_reads) = b.counts();
        }
        if let Some(tags) = &self.inner.tags {
            stats.tagged_keys = tags.pairs() as u64;
        }
        stats
    }

    /// The cache's health, for a readiness probe: L2 breakers open or failing (per
    /// server), the invalidation subscription (up or down, age of its last signal),
    /// resyncs, how long ago L2 last answered and its latency p99 (over the cache's
    /// life). No I/O: a few atomic loads and one short lock. It does not probe L2 — the
    /// next read does — so a probe must not take a replica out of traffic for an open
    /// breaker (it would never read to close it); an open breaker still serves.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flagcache::Result<()> {
    /// # use std::time::Duration;
    /// # use flagcache::{FlagCache, FlagKey, Version};
    /// # let loader = |_: FlagKey| async { Ok(Some((true, Version::new(1)))) };
    /// # let cache = FlagCache::<bool>::builder(flagcache::memory::MemoryStore::new(), loader).build().await?;
    /// // A readiness probe: ready while changes are being heard (kill switches reach
    /// // this replica). An open L2 breaker is reported, not a reason to leave traffic.
    /// fn ready(cache: &FlagCache<bool>) -> bool {
    ///     cache.health().subscription.map_or(true, |s| s.up)
    /// }
    ///
    /// cache.get(&FlagKey::new("checkout")?).await?;
    /// assert!(ready(&cache));
    /// let health = cache.health();
    /// assert!(health.l2_last_success_age.is_some_and(|age| age < Duration::from_secs(60)));
    /// assert!(health.l2_latency_p99.is_some());
    /// # Ok(()) }
    /// ```
    pub fn health(&self) -> Health {
        let inner = &self.inner;
        inner.health.report(
            inner.clock.now(),
            inner.breaker.report(Instant::now()),
            inner.invalidator.is_some(),
            inner.tel.get(stats::Ev::Resync),
        )
    }

    /// This replica's node id (the one its invalidations carry).
    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    /// The shared tier.
    pub fn store(&self) -> &Arc<dyn FlagStore> {
        &self.inner.store
    }
}
