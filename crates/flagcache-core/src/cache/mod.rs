//! [`FlagCache`]: the two tiers together.

mod batch;
mod breaker;
mod builder;
mod l1;
mod loader;
mod stats;

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::Instrument;

pub use builder::{FlagCacheBuilder, VersionSource};
pub use loader::Loader;
pub use stats::Stats;

use crate::{Coalesced, RefreshOutcome};
use breaker::{Breaker, Permit};
use l1::{Fences, Refreshing, Slot};
use stats::{seconds, Ev, Telemetry};

use crate::{
    now_ms, Checked, Entry, Error, FlagKey, FlagStore, Invalidation, Invalidator, LocalCoalescer,
    NodeId, PutOutcome, Result, ResyncReason, Signal, Subscription, Target, Version,
};

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
    fn from_slot(slot: Slot<T>, status: CacheStatus) -> Self {
        Lookup {
            version: slot.value.as_ref().map(|_| slot.version),
            value: slot.value,
            status,
        }
    }
}

/// How long an own invalidation's echo is waited for (after that, it is applied like
/// any event).
const OWN_ECHO_WAIT: Duration = Duration::from_secs(30);

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

/// What [`FlagCache::warm`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct WarmReport {
    /// Keys already fresh in L1.
    pub already_fresh: usize,
    /// Keys filled from L2 (in one batched read).
    pub from_l2: usize,
    /// Keys filled from the loader.
    pub loaded: usize,
    /// Keys the source does not have.
    pub absent: usize,
    /// Keys answered with a value marked stale, which another process is reloading
    /// (see [`FlagCache::refresh`]); held in L1 as stale, not fresh.
    pub stale: usize,
    /// Keys that could not be filled, with why.
    pub failed: Vec<(FlagKey, Error)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    L2,
    Loader,
    /// A value the fleet holds as stale, served while another process refreshes it.
    StaleL2,
}

#[derive(Debug, thiserror::Error)]
#[error("circuit breaker open: the shared tier is being skipped after repeated failures")]
struct CircuitOpen;

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
    fn jittered(&self, d: Duration) -> Duration {
        if self.jitter <= 0.0 {
            return d;
        }
        d.mul_f64(1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0))
    }
}

type Filled<T> = (Slot<T>, Tier);

struct Inner<T> {
    cfg: Config,
    store: Arc<dyn FlagStore>,
    loader: Arc<dyn Loader<T>>,
    invalidator: Option<Arc<dyn Invalidator>>,
    expected: Option<Arc<dyn VersionSource>>,
    /// Coalesces loads across processes (a distributed lock), when configured.
    fleet: Option<Arc<dyn crate::Coalescer>>,
    hook: Option<Hook>,
    /// L1 on, no evaluation hook, no early refresh: a fresh hit needs nothing but the
    /// entry (see [`Inner::fresh_hit`]).
    plain_hits: bool,
    node: NodeId,
    l1: quick_cache::sync::Cache<FlagKey, Slot<T>>,
    /// Which keys have a background refresh running.
    refreshing: Refreshing,
    /// Versionless key invalidations this cache published and already applied, whose
    /// echo from the invalidator is still to come: the echo must not fence the fills
    /// that began after the invalidation itself. Key → (echoes due, when).
    own_echoes: std::sync::Mutex<std::collections::HashMap<FlagKey, (u32, Instant)>>,
    /// The clock of L1 deadlines (see [`l1::clock`]).
    clock: quanta::Clock,
    /// Bumped by every `Resync`: entries of an older epoch are unverified.
    epoch: AtomicU64,
    /// Set while the invalidation subscription is down: L1 then serves nothing as
    /// fresh (only as a fail-safe fallback), since it would not hear of changes.
    deaf: AtomicBool,
    fences: Fences,
    fills: LocalCoalescer<Filled<T>>,
    /// Gathers concurrent L2 reads into batches (shared stores that batch).
    batcher: Option<batch::ReadBatcher>,
    breaker: Breaker,
    tel: Telemetry,
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
/// # async fn main() -> flagcache_core::Result<()> {
/// use flagcache_core::{CacheStatus, FlagCache, FlagKey, Version};
/// # let store = flagcache_memory::MemoryStore::new();
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
    /// # async fn main() -> flagcache_core::Result<()> {
    /// # use flagcache_core::{FlagCache, FlagKey, Version};
    /// # let loader = |_: FlagKey| async { Ok(Some((true, Version::new(1)))) };
    /// # let cache = FlagCache::<bool>::builder(flagcache_memory::MemoryStore::new(), loader).build().await?;
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
        let hit = inner.lookup_l1(key, Lookup::from_slot).ok()?;
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

    /// Writes `value` at `version` through to L2 (version-guarded), updates L1, and
    /// publishes the invalidation so other replicas drop their copy.
    ///
    /// Returns [`PutOutcome::Superseded`] when L2 already holds `version` or newer; the
    /// refused value is then not installed anywhere, and an L1 copy older than the
    /// stored version is dropped. When L2 already holds exactly `version`, the
    /// invalidation is published again, so retrying a `set` whose publish failed is safe.
    ///
    /// # Concurrent calls on the same key
    /// Writers race in L2, where the version guard lets the highest version win; a
    /// read that started before this write cannot install its older value in L1 after it.
    ///
    /// # Errors
    /// A codec error; an L2 error or timeout (nothing was changed); or a publish error,
    /// in which case the value *is* stored and other replicas learn of it only by TTL
    /// until the `set` is retried.
    pub async fn set(&self, key: &FlagKey, value: T, version: Version) -> Result<PutOutcome> {
        let inner = &self.inner;
        let payload = inner.store.codec().encode_value(&value)?;
        let entry = Entry {
            version,
            stamp_ms: now_ms(),
            payload,
        };
        let outcome = inner.write_l2_strict(key, &entry).await?;
        match outcome {
            PutOutcome::Stored => {
                let slot = inner.make_slot(Some(Arc::new(value)), version, Duration::ZERO);
                inner.install_authoritative(key, slot);
                inner
                    .publish(Invalidation::key(key.clone()).with_version(version))
                    .await?;
            }
            PutOutcome::Superseded { current } => {
                inner.drop_older_than(key, current);
                if current == version {
                    inner
                        .publish(Invalidation::key(key.clone()).with_version(version))
                        .await?;
                }
            }
        }
        Ok(outcome)
    }

    /// Drops `key` everywhere: from this L1, from L2, and — through the invalidator —
    /// from every other replica's L1. The next read loads it from the source.
    ///
    /// # Errors
    /// An L2 or publish error (this replica's L1 is dropped regardless).
    pub async fn invalidate(&self, key: &FlagKey) -> Result<()> {
        let inner = &self.inner;
        inner.drop_local(key, None);
        let deleted = inner.delete_l2(key).await;
        // A read in the meantime may have refilled L1 from the entry just deleted.
        inner.drop_local(key, None);
        let published = inner.publish_applied(key).await;
        deleted.and(published)
    }

    /// Asks the fleet to reload `key` from the source while it goes on answering with
    /// the current value: a soft [`invalidate`](FlagCache::invalidate), for changes
    /// that may take one load's time to reach everyone (not for kill switches — use
    /// [`set`](FlagCache::set), which carries the new value and version).
    ///
    /// L2 marks the entry stale ([`FlagStore::mark_stale`]) and every replica drops its
    /// L1 copy. With a backend that keeps stale values (memcached, with
    /// `MemcachedRecache` as the cross-process coalescer), one process of the fleet
    /// reloads from the source while the others serve the stale value, marked
    /// [`StaleReason::Revalidating`], for at most twice the loader timeout. A reload
    /// that an invalidation fenced is never written back (a hard `invalidate` may be
    /// what fenced it): the reloader hands its turn on and the next reader reloads.
    /// Other backends delete, and the next reads load (coalesced) as after
    /// `invalidate`.
    ///
    /// # Errors
    /// An L2 or publish error (this replica's L1 is dropped regardless).
    pub async fn refresh(&self, key: &FlagKey) -> Result<()> {
        let inner = &self.inner;
        inner.drop_local(key, None);
        let grace = inner.cfg.loader_timeout * 2;
        let marked = inner
            .l2_call("mark_stale", || inner.store.mark_stale(key, grace))
            .await;
        // A read in the meantime may have refilled L1 from the entry just marked.
        inner.drop_local(key, None);
        let published = inner.publish_applied(key).await;
        marked.and(published)
    }

    /// Drops every replica's L1 (this one's at once). L2 keeps its entries — they are
    /// versioned and guarded — so replicas refill from L2, not from the source.
    ///
    /// # Errors
    /// A publish error (this replica's L1 is dropped regardless).
    pub async fn invalidate_all(&self) -> Result<()> {
        self.inner.drop_all_local();
        self.inner.publish(Invalidation::all()).await
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
        stats
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

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A read: answered from L1 without awaiting anything when it can be; otherwise
    /// through the (boxed) miss path, so the future of a hit stays small.
    async fn lookup(self: &Arc<Self>, key: &FlagKey) -> Result<Lookup<T>> {
        match self.lookup_l1(key, Lookup::from_slot) {
            Ok(hit) => Ok(hit),
            Err(fallback) => Box::pin(self.lookup_miss(key, fallback)).await,
        }
    }

    /// The common case of [`Self::lookup_l1`] alone, for inlining: a fresh L1 entry,
    /// no evaluation hook and no early refresh due. `None` means "ask
    /// [`Self::lookup_l1`]", not "absent".
    #[inline(always)]
    fn fresh_hit(&self, key: &FlagKey) -> Option<Option<Arc<T>>> {
        if !self.plain_hits || self.deaf.load(Ordering::Relaxed) {
            return None;
        }
        let slot = self.l1.get(key)?;
        if slot.epoch != self.epoch.load(Ordering::Relaxed) || self.clock.now() >= slot.fresh_until
        {
            return None;
        }
        self.tel.bump(Ev::HitL1);
        Some(slot.value)
    }

    /// The L1 part of a read: `Ok(answer(slot, status))` when L1 answers (fresh, or
    /// stale while one refresh runs), else `Err` with the fail-safe fallback L1 holds,
    /// if any.
    #[allow(clippy::type_complexity)]
    #[inline]
    fn lookup_l1<R>(
        self: &Arc<Self>,
        key: &FlagKey,
        answer: impl FnOnce(Slot<T>, CacheStatus) -> R,
    ) -> std::result::Result<R, Option<(Slot<T>, u64)>> {
        let mut fallback = None;
        if self.cfg.l1_enabled && !self.deaf.load(Ordering::Relaxed) {
            if let Some(slot) = self.l1.get(key) {
                if slot.epoch == self.epoch.load(Ordering::Relaxed) {
                    let now = self.clock.now();
                    if now < slot.fresh_until {
                        if self.cfg.xfetch_beta > 0.0 && self.xfetch_due(&slot, now) {
                            self.refresh_in_background(key);
                        }
                        self.tel.bump(Ev::HitL1);
                        return Ok(answer(slot, CacheStatus::HitL1));
                    }
                    if now < slot.stale_until {
                        self.refresh_in_background(key);
                        self.tel.bump(Ev::StaleRevalidating);
                        let status = CacheStatus::Stale(StaleReason::Revalidating);
                        return Ok(answer(slot, status));
                    }
                }
                fallback = Some((slot, self.fences.begin()));
            }
        } else if self.cfg.l1_enabled {
            // Not subscribed: L1 cannot be trusted as fresh, only as a fallback.
            fallback = self.l1.get(key).map(|slot| (slot, self.fences.begin()));
        }
        match fallback {
            // A fail-safe answer given moments ago: serve it again rather than retry
            // L2 and the loader on every read while they are down.
            Some((slot, _)) if self.clock.now() < slot.retry_after => {
                self.tel.bump(Ev::StaleFailSafe);
                Ok(answer(slot, CacheStatus::Stale(StaleReason::FailSafe)))
            }
            other => Err(other),
        }
    }

    /// After a fail-safe answer, keeps serving that value without retrying until
    /// `fail_safe_throttle` has passed — unless the entry was replaced or invalidated
    /// meanwhile.
    fn throttle_retries(&self, key: &FlagKey, served: &Slot<T>, seen: u64) {
        if self.cfg.fail_safe_throttle.is_zero() {
            return;
        }
        let fences = self.fences.lock();
        let version = served.value.as_ref().map(|_| served.version);
        let same = self
            .l1
            .peek(key)
            .is_some_and(|cur| cur.filled_at == served.filled_at && cur.version == served.version);
        if same && fences.admits(key, seen, version) {
            let mut throttled = served.clone();
            throttled.retry_after = self.clock.now() + self.cfg.fail_safe_throttle;
            self.l1.insert(key.clone(), throttled);
        }
    }

    async fn lookup_miss(
        self: &Arc<Self>,
        key: &FlagKey,
        fallback: Option<(Slot<T>, u64)>,
    ) -> Result<Lookup<T>> {
        match self.fetch(key).await {
            Ok((slot, tier)) => {
                let (ev, status) = match tier {
                    Tier::L2 => (Ev::HitL2, CacheStatus::HitL2),
                    Tier::Loader => (Ev::Miss, CacheStatus::Miss),
                    Tier::StaleL2 => (
                        Ev::StaleRevalidating,
                        CacheStatus::Stale(StaleReason::Revalidating),
                    ),
                };
                self.tel.bump(ev);
                Ok(Lookup::from_slot(slot, status))
            }
            Err(e) => {
                // Never fall back to a value invalidated while the fetch ran.
                let usable = fallback.filter(|(fb, seen)| {
                    e.is_transient()
                        && self.clock.now().saturating_duration_since(fb.filled_at)
                            <= self.cfg.max_staleness
                        && self.fences.lock().admits(
                            key,
                            *seen,
                            fb.value.as_ref().map(|_| fb.version),
                        )
                });
                match usable {
                    Some((fb, seen)) => {
                        tracing::warn!(cache = %self.cfg.name, %key, error = %e,
                            "serving last known value (fail-safe)");
                        self.throttle_retries(key, &fb, seen);
                        self.tel.bump(Ev::StaleFailSafe);
                        Ok(Lookup::from_slot(
                            fb,
                            CacheStatus::Stale(StaleReason::FailSafe),
                        ))
                    }
                    None => {
                        self.tel.bump(Ev::Error);
                        Err(e)
                    }
                }
            }
        }
    }

    /// XFetch (Vattani et al.): refresh early with a probability that rises as expiry
    /// nears, scaled by how long a fill takes.
    fn xfetch_due(&self, slot: &Slot<T>, now: quanta::Instant) -> bool {
        let remaining = slot
            .fresh_until
            .saturating_duration_since(now)
            .as_secs_f64();
        let delta = slot.cost.as_secs_f64().max(0.001);
        let u = fastrand::f64().max(f64::MIN_POSITIVE);
        delta * self.cfg.xfetch_beta * -u.ln() >= remaining
    }

    /// One coalesced fill of `key`.
    async fn fetch(self: &Arc<Self>, key: &FlagKey) -> Result<Filled<T>> {
        let this = self.clone();
        let k = key.clone();
        let (result, joined) = self
            .fills
            .run_joined(key, move || async move { this.fill(&k).await })
            .await;
        if joined {
            self.tel.bump(Ev::Coalesced);
        }
        result
    }

    /// Starts one background refresh of `key`, unless one is running. The check is a
    /// flag in a fixed table — no lock on the hit path.
    fn refresh_in_background(self: &Arc<Self>, key: &FlagKey) {
        let Some(claim) = self.refreshing.claim(key) else {
            return;
        };
        let this = self.clone();
        let k = key.clone();
        // Unless a fill of the key is in flight already, in which case the claim drops
        // here, at once.
        self.fills.start(key, move || async move {
            let _claim = claim;
            this.fill(&k).await
        });
    }

    /// A background refresh not tied to an entry (after an invalidation).
    fn refetch_in_background(self: &Arc<Self>, key: &FlagKey) {
        let this = self.clone();
        let k = key.clone();
        self.fills
            .start(key, move || async move { this.fill(&k).await });
    }

    async fn fill(self: &Arc<Self>, key: &FlagKey) -> Result<Filled<T>> {
        let span = tracing::debug_span!("flagcache.fill", cache = %self.cfg.name, %key);
        async move {
            let start = self.fences.begin();
            let began = self.clock.now();
            let mut read = self.read_l2(key).await;
            let min = self.fences.lock().announced(key);
            if let (Some(m), Some(e)) = (min, &read) {
                if e.version < m {
                    // An invalidation announced a newer version than L2 gave us. The
                    // writer usually stores before it publishes: read once more.
                    tracing::debug!(version = %e.version, announced = %m, "L2 older than announced; re-reading");
                    read = self.read_l2(key).await.filter(|e| e.version >= m);
                }
            }
            if let Some(entry) = read {
                match self.install_entry(key, &entry, start, began, false) {
                    Ok(slot) => return Ok((slot, Tier::L2)),
                    Err(e) => {
                        tracing::warn!(error = %e, "L2 entry does not decode; deleting it");
                        self.tel.bump(Ev::Corrupt);
                        let _ = Box::pin(self.delete_l2(key)).await;
                    }
                }
            }
            // Boxed: the loader's path is the rare one, and inline its state would
            // make every fill's future — moved into the coalescer on each L2 hit —
            // several times larger.
            Box::pin(self.load(key, start, began)).await
        }
        .instrument(span)
        .await
    }

    /// Reads L2 through the breaker and timeout. Failures are counted and become
    /// `None`: the loader is the truth, L2 only saves trips to it.
    async fn read_l2(&self, key: &FlagKey) -> Option<Entry> {
        match self.l2_call("get", || self.read_l2_raw(key)).await {
            Ok(entry) => entry,
            Err(Error::Corrupt { reason, .. }) => {
                tracing::warn!(cache = %self.cfg.name, %key, %reason, "corrupt L2 entry; deleting it");
                self.tel.bump(Ev::Corrupt);
                let _ = Box::pin(self.delete_l2(key)).await;
                None
            }
            Err(e) => {
                tracing::warn!(cache = %self.cfg.name, %key, error = %e, "L2 read failed");
                None
            }
        }
    }

    async fn read_l2_raw(&self, key: &FlagKey) -> Result<Option<Entry>> {
        let Some(source) = &self.expected else {
            return match &self.batcher {
                Some(b) => b.get(key).await,
                None => self.store.get(key).await,
            };
        };
        match source.current_version(key).await {
            Ok(Some(v)) => match self.store.get_checked(key, v).await? {
                Checked::Hit(e) => Ok(Some(e)),
                Checked::Stale { current } => {
                    tracing::debug!(%key, expected = %v, %current, "version-stamped read: L2 is stale");
                    Ok(None)
                }
                Checked::Miss => Ok(None),
            },
            Ok(None) => self.store.get(key).await,
            Err(e) => {
                tracing::warn!(%key, error = %e, "version source failed; reading L2 unchecked");
                self.store.get(key).await
            }
        }
    }

    fn l2_failed(&self) {
        if self.breaker.failure() {
            tracing::warn!(cache = %self.cfg.name, backoff = ?self.cfg.breaker_backoff,
                "L2 circuit breaker opened");
            self.tel.bump(Ev::BreakerOpened);
        }
    }

    /// Loads from the source — through the cross-process coalescer when there is one,
    /// so that one process of the fleet loads while the others wait for its value in L2.
    async fn load(
        self: &Arc<Self>,
        key: &FlagKey,
        start: u64,
        began: quanta::Instant,
    ) -> Result<Filled<T>> {
        let Some(fleet) = &self.fleet else {
            return self
                .load_from_source(key, start, began)
                .await
                .map(|(f, _)| f);
        };
        let mine: Arc<std::sync::Mutex<Option<Filled<T>>>> = Arc::default();
        let out = mine.clone();
        let this = self.clone();
        let k = key.clone();
        let fetch: crate::Fetch = Box::pin(async move {
            let (filled, entry) = this.load_from_source(&k, start, began).await?;
            *out.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(filled);
            Ok(entry)
        });
        let answer = fleet.coalesce_or_stale(key, fetch).await?;
        let ran_here = mine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(filled) = ran_here {
            return Ok(filled);
        }
        let entry = match answer {
            Coalesced::Absent if self.acceptable_from_fleet(key, None).await => {
                // Another process's answer from the source, as if it were ours.
                return Ok((self.install_absent(key, start, began), Tier::L2));
            }
            Coalesced::Absent => None,
            Coalesced::Fresh(entry) => entry,
            Coalesced::Stale(entry) => {
                // Another process is refreshing it: serve the stale value, held in L1
                // as stale (never as fresh), so that reads keep revalidating until the
                // new value lands.
                if let Ok(slot) = self.install_entry(key, &entry, start, began, true) {
                    return Ok((slot, Tier::StaleL2));
                }
                None
            }
        };
        // Another process loaded it and stored it in L2 — used only if it passes the
        // checks an L2 read passes: no announced newer version, and the version
        // source's version when there is one.
        let entry = match entry {
            Some(e) if self.acceptable_from_fleet(key, Some(e.version)).await => Some(e),
            _ => None,
        };
        if let Some(entry) = entry {
            if let Ok(slot) = self.install_entry(key, &entry, start, began, false) {
                return Ok((slot, Tier::L2));
            }
        }
        self.load_from_source(key, start, began)
            .await
            .map(|(f, _)| f)
    }

    /// Decodes an L2 entry into an L1 slot and installs it, unless a fence refuses it.
    /// `stale`: a value another process is reloading — held as stale, never fresh.
    ///
    /// # Errors
    /// The codec's, when the payload does not decode.
    fn install_entry(
        &self,
        key: &FlagKey,
        entry: &Entry,
        start: u64,
        began: quanta::Instant,
        stale: bool,
    ) -> Result<Slot<T>> {
        let value = self.store.codec().decode_value::<T>(&entry.payload)?;
        let mut slot = self.make_slot(
            Some(Arc::new(value)),
            entry.version,
            self.clock.now().saturating_duration_since(began),
        );
        if stale {
            let now = self.clock.now();
            slot.fresh_until = now;
            slot.stale_until = now + self.cfg.stale_for.max(Duration::from_secs(1));
        }
        self.install(key, &slot, start);
        Ok(slot)
    }

    /// A "no such flag" answer for `key`, installed in L1 (fences permitting).
    fn install_absent(&self, key: &FlagKey, start: u64, began: quanta::Instant) -> Slot<T> {
        let cost = self.clock.now().saturating_duration_since(began);
        let slot = self.make_slot(None, Version::default(), cost);
        self.install(key, &slot, start);
        slot
    }

    /// Whether an answer another process got — an L2 entry at `version`, or the
    /// source's "no such flag" (`None`) — may answer this read: what [`Inner::fill`]
    /// checks of its own L2 reads. Not when an invalidation announced a newer version
    /// (any version, for an absence), nor when the version source disagrees.
    async fn acceptable_from_fleet(&self, key: &FlagKey, version: Option<Version>) -> bool {
        let announced = self.fences.lock().announced(key);
        if announced.is_some_and(|min| version.map_or(true, |v| v < min)) {
            return false;
        }
        let Some(source) = &self.expected else {
            return true;
        };
        match (source.current_version(key).await, version) {
            (Ok(Some(current)), Some(v)) => current == v,
            (Ok(Some(_)), None) => false,
            (Ok(None), _) => true,
            // The version source failed: an entry is taken unchecked, as L2 reads
            // are; an absence is not.
            (Err(_), v) => v.is_some(),
        }
    }

    /// Calls the loader, writes its value to L2 and installs it; returns the stored
    /// entry too (`None` when the source has no such flag).
    async fn load_from_source(
        self: &Arc<Self>,
        key: &FlagKey,
        start: u64,
        began: quanta::Instant,
    ) -> Result<(Filled<T>, Option<Entry>)> {
        let t = Instant::now();
        let loaded = tokio::time::timeout(self.cfg.loader_timeout, self.loader.load(key)).await;
        self.tel.load_latency.record(seconds(t.elapsed()));
        let loaded = match loaded {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.tel.bump(Ev::LoadError);
                return Err(e);
            }
            Err(_) => {
                self.tel.bump(Ev::LoadError);
                return Err(Error::Timeout {
                    backend: "loader",
                    operation: "load",
                    after: self.cfg.loader_timeout,
                });
            }
        };
        let Some((value, version)) = loaded else {
            self.tel.bump(Ev::LoadAbsent);
            // Invalidated while loading — the flag may have just been created: this
            // "no such flag" answers this read but is not handed to other processes.
            let admitted = self.fences.lock().admits(key, start, None);
            crate::coalesce::report_refresh(
                key,
                if admitted {
                    RefreshOutcome::Absent
                } else {
                    RefreshOutcome::NotStored
                },
            );
            return Ok(((self.install_absent(key, start, began), Tier::Loader), None));
        };
        self.tel.bump(Ev::Load);
        let payload = self.store.codec().encode_value(&value)?;
        let entry = Entry {
            version,
            stamp_ms: now_ms(),
            payload,
        };
        let slot = self.make_slot(
            Some(Arc::new(value)),
            version,
            self.clock.now().saturating_duration_since(began),
        );
        if !self.fences.lock().admits(key, start, Some(version)) {
            // Invalidated while loading: answer this read, but neither write the value
            // back to L2 (it might outlive the invalidation there) nor install it.
            self.tel.bump(Ev::FencedFill);
            crate::coalesce::report_refresh(key, RefreshOutcome::NotStored);
            return Ok(((slot, Tier::Loader), None));
        }
        let written = self.write_l2(key, &entry).await;
        crate::coalesce::report_refresh(
            key,
            if written.is_some() {
                RefreshOutcome::Stored
            } else {
                RefreshOutcome::NotStored
            },
        );
        match written {
            // L2 knows a newer version than the source just gave us (a lagging read
            // replica of the source): answer this read, but do not pin it in L1.
            Some(PutOutcome::Superseded { current }) if current > version => {
                tracing::debug!(%key, %version, %current, "loaded version is older than L2's");
            }
            _ => {
                self.install(key, &slot, start);
            }
        }
        Ok(((slot, Tier::Loader), Some(entry)))
    }

    /// Best-effort write of a loaded value to L2; failures are counted, not returned.
    async fn write_l2(&self, key: &FlagKey, entry: &Entry) -> Option<PutOutcome> {
        match self.write_l2_strict(key, entry).await {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(cache = %self.cfg.name, %key, error = %e, "L2 write failed");
                None
            }
        }
    }

    async fn write_l2_strict(&self, key: &FlagKey, entry: &Entry) -> Result<PutOutcome> {
        let ttl = self.cfg.jittered(self.cfg.l2_ttl);
        self.l2_call("put", || self.store.put(key, entry, ttl))
            .await
    }

    async fn delete_l2(&self, key: &FlagKey) -> Result<()> {
        self.l2_call("delete", || self.store.delete(key)).await
    }

    /// Every L2 call goes through here: skipped while the circuit breaker is open,
    /// timed, bounded by the L2 timeout; transient failures and timeouts count towards
    /// opening the breaker, any answer of the server (even a refusal) closes it. The
    /// call is made here (`call()`), not passed in made: its future then lives once in
    /// this one's state, not twice.
    async fn l2_call<R, F>(&self, operation: &'static str, call: impl FnOnce() -> F) -> Result<R>
    where
        F: std::future::Future<Output = Result<R>>,
    {
        if self.breaker.permit() == Permit::Skip {
            self.tel.bump(Ev::L2Skipped);
            return Err(Error::backend(
                self.store.name(),
                operation,
                true,
                CircuitOpen,
            ));
        }
        let t = self.clock.now();
        let answer = tokio::time::timeout(self.cfg.l2_timeout, call()).await;
        self.tel
            .l2_latency
            .record(seconds(self.clock.now().saturating_duration_since(t)));
        match answer {
            Ok(Err(e)) if e.is_transient() => {
                self.tel.bump(Ev::L2Error);
                self.l2_failed();
                Err(e)
            }
            Ok(answer) => {
                self.breaker.success();
                answer
            }
            Err(_) => {
                self.tel.bump(Ev::L2Timeout);
                self.l2_failed();
                Err(Error::Timeout {
                    backend: self.store.name(),
                    operation,
                    after: self.cfg.l2_timeout,
                })
            }
        }
    }

    fn make_slot(&self, value: Option<Arc<T>>, version: Version, cost: Duration) -> Slot<T> {
        let now = self.clock.now();
        let (fresh, stale) = if value.is_some() {
            (self.cfg.jittered(self.cfg.fresh_for), self.cfg.stale_for)
        } else {
            (self.cfg.negative_ttl, Duration::ZERO)
        };
        Slot {
            value,
            version,
            filled_at: now,
            fresh_until: now + fresh,
            stale_until: now + fresh + stale,
            retry_after: now,
            epoch: self.epoch.load(Ordering::SeqCst),
            cost,
        }
    }

    /// Installs a fill into L1 unless a fence refuses it (an invalidation landed since
    /// the fill started) or L1 already holds a newer version.
    fn install(&self, key: &FlagKey, slot: &Slot<T>, start: u64) -> bool {
        if !self.cfg.l1_enabled {
            return false;
        }
        let fences = self.fences.lock();
        let version = slot.value.as_ref().map(|_| slot.version);
        if !fences.admits(key, start, version) {
            tracing::debug!(cache = %self.cfg.name, %key, version = %slot.version,
                "fill refused: an invalidation landed while it ran");
            self.tel.bump(Ev::FencedFill);
            return false;
        }
        if slot.value.is_some() {
            let epoch = self.epoch.load(Ordering::SeqCst);
            if let Some(cur) = self.l1.peek(key) {
                if cur.value.is_some() && cur.epoch == epoch && cur.version > slot.version {
                    return false;
                }
            }
        }
        self.l1.insert(key.clone(), slot.clone());
        true
    }

    /// Installs a value this replica wrote itself, fencing out older fills in flight.
    fn install_authoritative(&self, key: &FlagKey, slot: Slot<T>) {
        let mut fences = self.fences.lock();
        fences.invalidate(key, Some(slot.version));
        self.fills.forget(key);
        if !self.cfg.l1_enabled {
            return;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let newer_held = self.l1.peek(key).is_some_and(|cur| {
            cur.value.is_some() && cur.epoch == epoch && cur.version > slot.version
        });
        if !newer_held {
            self.l1.insert(key.clone(), slot);
        }
    }

    fn drop_older_than(&self, key: &FlagKey, current: Version) {
        let mut fences = self.fences.lock();
        fences.invalidate(key, Some(current));
        self.l1
            .remove_if(key, |s| s.value.is_none() || s.version < current);
        self.fills.forget(key);
    }

    /// Drops `key` from L1 unless L1 already holds `at_least` or newer, and fences out
    /// fills that started before now.
    fn drop_local(&self, key: &FlagKey, at_least: Option<Version>) {
        let mut fences = self.fences.lock();
        fences.invalidate(key, at_least);
        self.l1.remove_if(key, |s| match at_least {
            Some(v) => s.value.is_none() || s.version < v,
            None => true,
        });
        // Still under the fence lock: nobody can join the old fill in between.
        self.fills.forget(key);
    }

    fn drop_all_local(&self) {
        let mut fences = self.fences.lock();
        fences.invalidate_all();
        self.l1.clear();
        self.fills.forget_all();
    }

    async fn publish(&self, event: Invalidation) -> Result<()> {
        let Some(inv) = &self.invalidator else {
            return Ok(());
        };
        match tokio::time::timeout(
            self.cfg.l2_timeout.max(Duration::from_secs(1)),
            inv.publish(&event),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.tel.bump(Ev::PublishError);
                Err(e)
            }
            Err(_) => {
                self.tel.bump(Ev::PublishError);
                Err(Error::Timeout {
                    backend: "invalidator",
                    operation: "publish",
                    after: self.cfg.l2_timeout.max(Duration::from_secs(1)),
                })
            }
        }
    }

    /// Publishes a versionless invalidation of `key` that this cache has applied
    /// already, so that its own echo does not fence fills begun since.
    async fn publish_applied(&self, key: &FlagKey) -> Result<()> {
        if self.invalidator.is_none() {
            return Ok(());
        }
        self.own_echoes_map()
            .entry(key.clone())
            .and_modify(|(n, at)| {
                *n += 1;
                *at = Instant::now();
            })
            .or_insert((1, Instant::now()));
        let published = self.publish(Invalidation::key(key.clone())).await;
        if published.is_err() {
            self.take_own_echo(key);
        }
        published
    }

    fn own_echoes_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<FlagKey, (u32, Instant)>> {
        self.own_echoes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether an echo of this cache's own, already applied invalidation of `key` was
    /// due (recently); consumes it.
    fn take_own_echo(&self, key: &FlagKey) -> bool {
        let mut echoes = self.own_echoes_map();
        let Some((n, at)) = echoes.get_mut(key) else {
            return false;
        };
        let due = *n > 0 && at.elapsed() < OWN_ECHO_WAIT;
        *n = n.saturating_sub(1);
        if *n == 0 || !due {
            echoes.remove(key);
        }
        due
    }

    /// Applies one event received from the invalidator.
    async fn apply(self: &Arc<Self>, ev: &Invalidation) {
        // This node's own events are applied too: the version they carry keeps the
        // value this node just wrote (an L1 entry at that version or newer stays), and
        // another cache sharing this node's invalidator must not miss them.
        let own = ev.origin != NodeId::UNKNOWN && ev.origin == self.node;
        match &ev.target {
            // The echo of an invalidation this cache applied when it published it:
            // applying it again would only fence the fills begun since.
            Target::Key(key)
                if own && ev.version.is_none() && !ev.purge_shared && self.take_own_echo(key) => {}
            Target::Key(key) => {
                self.drop_local(key, ev.version);
                if ev.purge_shared {
                    let _ = self.delete_l2(key).await;
                    // A read in the meantime may have refilled from the deleted entry.
                    self.drop_local(key, ev.version);
                }
                if let Some(max) = self.cfg.refetch_jitter {
                    let this = self.clone();
                    let key = key.clone();
                    let delay = max.mul_f64(fastrand::f64());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        this.refetch_in_background(&key);
                    });
                }
            }
            // Tags are not tracked per key: dropping everything is always correct.
            _ => self.drop_all_local(),
        }
        // Counted once applied, so an observer of the counter sees the effect.
        if ev.sent_at_ms > 0 {
            let lag_ms = now_ms().saturating_sub(ev.sent_at_ms);
            self.tel.lag.record(lag_ms as f64 / 1000.0);
        }
        self.tel
            .bump(if own { Ev::OwnEvent } else { Ev::Invalidation });
    }

    /// Marks every L1 entry unverified: never served as fresh again, only as a
    /// fail-safe fallback when L2 and the loader both fail.
    fn resync(&self, reason: &ResyncReason) {
        tracing::warn!(cache = %self.cfg.name, %reason, "resync: L1 marked unverified");
        let mut fences = self.fences.lock();
        fences.invalidate_all();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.fills.forget_all();
        drop(fences);
        self.tel.bump(Ev::Resync);
    }

    async fn warm(self: &Arc<Self>, keys: &[FlagKey]) -> WarmReport {
        use futures_util::StreamExt;
        let mut report = WarmReport::default();
        let epoch = self.epoch.load(Ordering::SeqCst);
        let now = self.clock.now();
        let cold: Vec<FlagKey> = keys
            .iter()
            .filter(|k| {
                let fresh = self.cfg.l1_enabled
                    && self
                        .l1
                        .peek(*k)
                        .is_some_and(|s| s.epoch == epoch && now < s.fresh_until);
                if fresh {
                    report.already_fresh += 1;
                }
                !fresh
            })
            .cloned()
            .collect();
        let mut misses = Vec::new();
        let start = self.fences.begin();
        let began = self.clock.now();
        // Version-stamped reads check each key on its own; the batch read cannot.
        let batch = if cold.is_empty() || self.expected.is_some() {
            None
        } else {
            self.l2_call("get_many", || self.store.get_many(&cold))
                .await
                .ok()
                .filter(|found| found.len() == cold.len())
        };
        match batch {
            Some(found) => {
                for (key, entry) in cold.into_iter().zip(found) {
                    let filled =
                        entry.and_then(|e| self.install_entry(&key, &e, start, began, false).ok());
                    match filled {
                        Some(_) => report.from_l2 += 1,
                        None => misses.push(key),
                    }
                }
            }
            None => misses = cold,
        }
        let results: Vec<_> = futures_util::stream::iter(misses)
            .map(|key| async move {
                let r = self.fetch(&key).await;
                (key, r)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (key, r) in results {
            match r {
                Ok((slot, Tier::L2)) if slot.value.is_some() => report.from_l2 += 1,
                Ok((_, Tier::StaleL2)) => report.stale += 1,
                Ok((slot, _)) if slot.value.is_none() => report.absent += 1,
                Ok(_) => report.loaded += 1,
                Err(e) => report.failed.push((key, e)),
            }
        }
        report
    }
}

/// Consumes the subscription until the cache is dropped; when the subscription ends,
/// marks L1 untrusted and subscribes again with back-off.
async fn listen<T>(weak: Weak<Inner<T>>, mut sub: Subscription, mut shutdown: oneshot::Receiver<()>)
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    loop {
        let signal = tokio::select! {
            _ = &mut shutdown => return,
            s = sub.recv() => s,
        };
        let Some(inner) = weak.upgrade() else { return };
        match signal {
            Some(Signal::Invalidated(ev)) => inner.apply(&ev).await,
            Some(Signal::Resync(reason)) => inner.resync(&reason),
            None => {
                tracing::error!(cache = %inner.cfg.name,
                    "invalidation subscription ended; L1 is untrusted until it is back");
                inner.deaf.store(true, Ordering::SeqCst);
                inner.resync(&ResyncReason::Closed);
                let Some(invalidator) = inner.invalidator.clone() else {
                    return;
                };
                drop(inner);
                let mut backoff = Duration::from_millis(50);
                sub = loop {
                    tokio::select! {
                        _ = &mut shutdown => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    match invalidator.subscribe().await {
                        Ok(s) => break s,
                        Err(e) => {
                            tracing::warn!(error = %e, "resubscribing failed");
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                // Whatever happened meanwhile was missed.
                inner.resync(&ResyncReason::Reconnected);
                inner.deaf.store(false, Ordering::SeqCst);
            }
        }
    }
}
