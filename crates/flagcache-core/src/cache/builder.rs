//! [`FlagCacheBuilder`]: a cache's settings, their defaults, and building it.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use super::breaker::Breaker;
use super::events::listen;
use super::fence::Fences;
use super::stats::Telemetry;
use super::{Config, Evaluation, FlagCache, Hook, Inner, Loader, VersionSource};
use crate::{Coalescer, Error, FlagStore, Invalidator, LocalCoalescer, NodeId, Result};

/// Configures a [`FlagCache`]. Every setting has a default suited to flag configs
/// read on every request and changed a few times a day.
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`fresh_for`](Self::fresh_for) | 30 s (± jitter) | L1 serves an entry as fresh this long after a fill |
/// | [`stale_for`](Self::stale_for) | 5 min | then serves it while one background refresh runs |
/// | [`max_staleness`](Self::max_staleness) | 1 h | fail-safe: oldest last known value served when L2 and the loader fail |
/// | [`fail_safe_throttle`](Self::fail_safe_throttle) | 1 s | how long a fail-safe answer is reused before L2 and the loader are tried again |
/// | [`l2_ttl`](Self::l2_ttl) | 10 min (± jitter) | TTL of every L2 write |
/// | [`ttl_jitter`](Self::ttl_jitter) | 0.15 | ± spread of TTLs and freshness, so replicas do not expire in lockstep |
/// | [`negative_ttl`](Self::negative_ttl) | 5 s | how long "no such flag" is remembered in L1 |
/// | [`l2_timeout`](Self::l2_timeout) | 250 ms | per L2 call |
/// | [`loader_timeout`](Self::loader_timeout) | 5 s | per loader call |
/// | [`circuit_breaker`](Self::circuit_breaker) | 5 failures, 5 s | per server (read group): after that many consecutive failures, skip L2 reads; probe after 100 ms, doubling per failed probe up to the back-off cap |
/// | [`l1_capacity`](Self::l1_capacity) | 10 000 | L1 entries |
/// | [`xfetch`](Self::xfetch) | off | probabilistic early refresh |
/// | [`refetch_jitter`](Self::refetch_jitter) | off | re-fetch an invalidated key in the background after a random delay |
/// | [`l2_batch_after`](Self::l2_batch_after) | 4 | L2 reads in flight before further ones are gathered into one batched read |
pub struct FlagCacheBuilder<T> {
    store: Arc<dyn FlagStore>,
    loader: Arc<dyn Loader<T>>,
    invalidator: Option<Arc<dyn Invalidator>>,
    expected: Option<Arc<dyn VersionSource>>,
    coalescer: Option<Arc<dyn Coalescer>>,
    hook: Option<Hook>,
    tagger: Option<super::tags::Tagger<T>>,
    fleet: Option<crate::fleet::Reporting>,
    cfg: Config,
}

impl<T> std::fmt::Debug for FlagCacheBuilder<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagCacheBuilder")
            .field("store", &self.store.name())
            .field("invalidator", &self.invalidator.is_some())
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<T> FlagCacheBuilder<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    pub(super) fn new(store: Arc<dyn FlagStore>, loader: Arc<dyn Loader<T>>) -> Self {
        FlagCacheBuilder {
            store,
            loader,
            invalidator: None,
            expected: None,
            coalescer: None,
            hook: None,
            tagger: None,
            fleet: None,
            cfg: Config {
                name: "flags".to_string(),
                l1_enabled: true,
                l1_capacity: 10_000,
                fresh_for: Duration::from_secs(30),
                stale_for: Duration::from_secs(300),
                max_staleness: Duration::from_secs(3600),
                fail_safe_throttle: Duration::from_secs(1),
                negative_ttl: Duration::from_secs(5),
                l2_ttl: Duration::from_secs(600),
                jitter: 0.15,
                l2_timeout: Duration::from_millis(250),
                loader_timeout: Duration::from_secs(5),
                breaker_threshold: 5,
                breaker_backoff: Duration::from_secs(5),
                xfetch_beta: 0.0,
                refetch_jitter: None,
                l2_batch_after: 4,
            },
        }
    }

    /// The cache's name: the `cache` label of its metrics and a field of its logs.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.cfg.name = name.into();
        self
    }

    /// Subscribes to `invalidator` (and publishes this cache's writes through it).
    #[must_use]
    pub fn invalidator(mut self, invalidator: impl Invalidator + 'static) -> Self {
        self.invalidator = Some(Arc::new(invalidator));
        self
    }

    /// Turns L1 off: every read goes to L2 (still coalesced). For measuring L2, or for
    /// processes that must never hold a copy. There is no fail-safe without L1.
    #[must_use]
    pub fn l1(mut self, enabled: bool) -> Self {
        self.cfg.l1_enabled = enabled;
        self
    }

    /// How many entries L1 holds at most.
    #[must_use]
    pub fn l1_capacity(mut self, entries: usize) -> Self {
        self.cfg.l1_capacity = entries;
        self
    }

    /// How long after a fill L1 serves an entry as fresh (jittered).
    #[must_use]
    pub fn fresh_for(mut self, d: Duration) -> Self {
        self.cfg.fresh_for = d;
        self
    }

    /// How long past freshness L1 still serves an entry while one background refresh
    /// runs (stale-while-revalidate). Zero turns it off.
    #[must_use]
    pub fn stale_for(mut self, d: Duration) -> Self {
        self.cfg.stale_for = d;
        self
    }

    /// The oldest last known value served when L2 and the loader fail (fail-safe),
    /// counted from its fill. Zero turns fail-safe off.
    #[must_use]
    pub fn max_staleness(mut self, d: Duration) -> Self {
        self.cfg.max_staleness = d;
        self
    }

    /// After a fail-safe answer, how long L1 keeps giving it without retrying L2 and
    /// the loader (default 1 s): while they are down, each key costs one attempt per
    /// throttle period instead of one per read, so reads stay fast and the recovering
    /// control plane is not hammered. An invalidation still drops the entry at once.
    /// Zero retries on every read.
    #[must_use]
    pub fn fail_safe_throttle(mut self, d: Duration) -> Self {
        self.cfg.fail_safe_throttle = d;
        self
    }

    /// How long L1 remembers that the source has no such flag.
    #[must_use]
    pub fn negative_ttl(mut self, d: Duration) -> Self {
        self.cfg.negative_ttl = d;
        self
    }

    /// The TTL of every L2 write (jittered). It is the backstop under every other
    /// invalidation mechanism.
    #[must_use]
    pub fn l2_ttl(mut self, d: Duration) -> Self {
        self.cfg.l2_ttl = d;
        self
    }

    /// The ± spread applied to TTLs and freshness: 0.15 means ±15 %. At most 0.5.
    #[must_use]
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.cfg.jitter = fraction;
        self
    }

    /// The time limit of each L2 call.
    #[must_use]
    pub fn l2_timeout(mut self, d: Duration) -> Self {
        self.cfg.l2_timeout = d;
        self
    }

    /// The time limit of each loader call.
    #[must_use]
    pub fn loader_timeout(mut self, d: Duration) -> Self {
        self.cfg.loader_timeout = d;
        self
    }

    /// After `failures` consecutive L2 failures — timeouts, transient or permanent
    /// errors (`NOAUTH` counts: a server that refuses this client is of no use to
    /// reads), not a refusal of one request — skip L2 reads (they go to the loader)
    /// and let one probe read through 100 ms later; each failed probe doubles the wait
    /// before the next one, up to `backoff` (with the default 5 s: 100 ms, 200, 400,
    /// 800 ms, 1.6 s, 3.2 s, then every 5 s). A probe's success closes the breaker. A
    /// `backoff` under 100 ms is the wait between probes.
    ///
    /// Writes (`set`, `invalidate`, `refresh`) are never skipped: they try L2 within
    /// the L2 timeout, and their success closes the breaker too. So after an outage,
    /// L2 is found again by the first write, or by a probe within the current wait.
    ///
    /// There is one breaker per [`FlagStore::read_group`] (per server: one bad
    /// memcached server of a ring trips only its own keys' breaker), and one for keys
    /// without a group.
    ///
    /// (With an invalidator, a subscription that ended is reopened on a similar
    /// schedule: after 100 ms, doubling per failed attempt up to 1 s.)
    #[must_use]
    pub fn circuit_breaker(mut self, failures: u32, backoff: Duration) -> Self {
        self.cfg.breaker_threshold = failures;
        self.cfg.breaker_backoff = backoff;
        self
    }

    /// Probabilistic early refresh (XFetch) with parameter `beta` (1.0 is the usual
    /// choice; larger refreshes earlier). Off (0) by default.
    #[must_use]
    pub fn xfetch(mut self, beta: f64) -> Self {
        self.cfg.xfetch_beta = beta;
        self
    }

    /// After an invalidation of a key, re-fetch it in the background after a random
    /// delay of at most `max`, so that a fleet does not re-fetch at the same instant and
    /// the next read finds it warm. Off by default (the next read fetches).
    #[must_use]
    pub fn refetch_jitter(mut self, max: Duration) -> Self {
        self.cfg.refetch_jitter = Some(max);
        self
    }

    /// Gathers L2 reads into batches under load: once `inline` reads are in flight,
    /// further reads queue, and the reads queued within one pass of the scheduler go
    /// out as one batched read ([`FlagStore::get_each_for_fill`]: one `MGET`, one pipeline of
    /// meta gets) — they wait for one yield, not for the reads in flight. No read
    /// waits for a batch to fill: below `inline` concurrent reads, each goes out at
    /// once. Each key keeps its own answer — a corrupt
    /// entry fails only its own key.
    ///
    /// Batches never span servers: they form per [`FlagStore::read_group`] (one Redis
    /// primary, one memcached server; a Redis cluster and the memory store do not
    /// batch). Not for version-stamped reads. Default 4; `usize::MAX` turns batching
    /// off.
    ///
    /// ```
    /// # async fn f(store: flagcache::memory::MemoryStore) -> flagcache::Result<()> {
    /// # use flagcache::{FlagCache, FlagKey, Version};
    /// # let loader = |_: FlagKey| async { Ok(Some((true, Version::new(1)))) };
    /// let cache = FlagCache::<bool>::builder(store, loader)
    ///     .l2_batch_after(16) // more reads on their own before batching
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn l2_batch_after(mut self, inline: usize) -> Self {
        self.cfg.l2_batch_after = inline;
        self
    }

    /// Version-stamped reads: check every L2 entry against the version `source` says
    /// the key has, and treat any mismatch — older or newer — as a miss.
    #[must_use]
    pub fn version_source(mut self, source: impl VersionSource) -> Self {
        self.expected = Some(Arc::new(source));
        self
    }

    /// Tags values: `tagger` gives the tags of a flag's value (computed from the value,
    /// so a `set` and a load tag it alike), and
    /// [`FlagCache::invalidate_tag`] then invalidates exactly the flags carrying a
    /// tag — in every replica's L1 and in L2. Off by default (a tag invalidation then
    /// drops every replica's whole L1). Tags must make valid keys: no whitespace, no
    /// control characters.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flagcache::Result<()> {
    /// # let store = flagcache::memory::MemoryStore::new();
    /// use flagcache::{FlagCache, FlagKey, Version};
    ///
    /// #[derive(Clone, serde::Serialize, serde::Deserialize)]
    /// struct Flag { team: String, enabled: bool }
    ///
    /// let source = |_k: FlagKey| async {
    ///     Ok(Some((Flag { team: "checkout".into(), enabled: true }, Version::new(1))))
    /// };
    /// let cache = FlagCache::builder(store, source)
    ///     .tags(|_key, flag: &Flag| vec![format!("team:{}", flag.team)])
    ///     .build()
    ///     .await?;
    /// cache.get(&FlagKey::new("new-cart")?).await?;
    /// // Every flag of the checkout team, everywhere; the others stay cached.
    /// cache.invalidate_tag("team:checkout").await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn tags(
        mut self,
        tagger: impl Fn(&crate::FlagKey, &T) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.tagger = Some(Arc::new(tagger));
        self
    }

    /// Coalesces loads across processes with `coalescer` (the cross-process
    /// [`Coalescer`]: Redis' `RedisLock`, memcached's `MemcachedRecache`): when many
    /// replicas miss the same key at once, one loads from the source and the others
    /// take its answer. Within a process, loads are always coalesced.
    #[must_use]
    pub fn coalescer(mut self, coalescer: impl Coalescer + 'static) -> Self {
        self.coalescer = Some(Arc::new(coalescer));
        self
    }

    /// Calls `hook` after every read with the key, where the answer came from, the
    /// version and the latency. Keep it cheap: it runs on the read path.
    #[must_use]
    pub fn on_evaluation(mut self, hook: impl Fn(&Evaluation<'_>) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Reports this replica's presence to `registry`: its node id, name, last-seen
    /// time, and the newest version it applied per key (from versioned invalidations,
    /// its own `set`s included), written every 5 s
    /// ([`fleet_report_interval`](Self::fleet_report_interval)) and within 50 ms of
    /// applying a versioned invalidation; the record lives three periods and is
    /// removed when the cache is dropped. A verifier (`flagcache verify`) reads the
    /// records to tell whether every live replica applied a version. Off by default:
    /// a cache without it writes nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flagcache::Result<()> {
    /// # use flagcache::{FlagCache, FlagKey, Version};
    /// use flagcache::fleet::FleetRegistry;
    /// use flagcache::memory::{MemoryFleet, MemoryInvalidator, MemoryStore};
    ///
    /// let fleet = MemoryFleet::new();
    /// # let loader = |_: FlagKey| async { Ok(Some((true, Version::new(1)))) };
    /// let cache = FlagCache::<bool>::builder(MemoryStore::new(), loader)
    ///     .invalidator(MemoryInvalidator::new())
    ///     .report_to_fleet(fleet.clone())
    ///     .build()
    ///     .await?;
    /// let key = FlagKey::new("kill-switch")?;
    /// cache.set(&key, false, Version::new(8)).await?;
    /// # tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    /// let me = fleet.nodes().await?.into_iter().find(|n| n.node == cache.node_id());
    /// assert_eq!(me.map(|n| n.applied["kill-switch"].version), Some(8));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn report_to_fleet(mut self, registry: impl crate::fleet::FleetRegistry + 'static) -> Self {
        let every = self.fleet.as_ref().map(|f| f.every);
        let mut reporting = crate::fleet::Reporting::new(Arc::new(registry));
        if let Some(every) = every {
            reporting.every = every;
        }
        self.fleet = Some(reporting);
        self
    }

    /// How often the fleet report is written (default 5 s; it lives three periods).
    /// Call it after [`report_to_fleet`](Self::report_to_fleet); without it, it does
    /// nothing.
    #[must_use]
    pub fn fleet_report_interval(mut self, every: Duration) -> Self {
        if let Some(f) = &mut self.fleet {
            f.every = every.max(Duration::from_millis(10));
        }
        self
    }

    fn validate(&self) -> Result<()> {
        let c = &self.cfg;
        let bad = |what: &'static str| Err(Error::InvalidArgument(what.into()));
        if !(0.0..=0.5).contains(&c.jitter) || c.jitter.is_nan() {
            return bad("ttl_jitter must be between 0 and 0.5");
        }
        if c.l2_ttl.is_zero() {
            return bad("l2_ttl must be greater than zero: every write carries a TTL");
        }
        if c.l2_timeout.is_zero() || c.loader_timeout.is_zero() {
            return bad("timeouts must be greater than zero");
        }
        if c.l1_enabled && c.l1_capacity == 0 {
            return bad("l1_capacity must be at least 1 (or turn L1 off with l1(false))");
        }
        if c.l2_batch_after == 0 {
            return bad("l2_batch_after must be at least 1 (usize::MAX turns batching off)");
        }
        if c.xfetch_beta.is_nan() || c.xfetch_beta < 0.0 {
            return bad("xfetch beta must be 0 (off) or positive");
        }
        // Deadlines are computed as `now + duration`: keep them representable.
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let durations = [
            c.fresh_for,
            c.stale_for,
            c.max_staleness,
            c.fail_safe_throttle,
            c.negative_ttl,
            c.l2_ttl,
            c.l2_timeout,
            c.loader_timeout,
            c.breaker_backoff,
            c.refetch_jitter.unwrap_or_default(),
        ];
        if durations.iter().any(|d| *d > YEAR) {
            return bad("durations must be at most one year");
        }
        Ok(())
    }

    /// Builds the cache and, with an invalidator, subscribes and starts the task that
    /// applies invalidations (it ends when the last clone of the cache is dropped).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an inconsistent setting; the invalidator's error
    /// if subscribing fails.
    pub async fn build(self) -> Result<FlagCache<T>> {
        self.validate()?;
        let subscription = match &self.invalidator {
            Some(inv) => Some(inv.subscribe().await?),
            None => None,
        };
        let node = self
            .invalidator
            .as_ref()
            .map_or_else(NodeId::random, |i| i.node_id());
        let cfg = self.cfg;
        let transport = self.invalidator.as_ref().map(|i| i.transport());
        let fleet = self
            .fleet
            .map(|reporting| crate::fleet::Reporter::start(reporting, node, &cfg.name, transport));
        let keep_fences_for = cfg.l2_timeout
            + cfg.loader_timeout
            + cfg.l2_ttl.mul_f64(1.0 + cfg.jitter)
            + Duration::from_secs(1);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let clock = super::clock::Clock::new();
        let started = clock.now();
        let tel = Arc::new(Telemetry::new(&cfg.name, clock.coarse()));
        if clock.coarse() {
            let publish: Arc<dyn super::clock::OnTick> = tel.clone();
            super::clock::every_tick(Arc::downgrade(&publish));
        }
        let inner = Arc::new(Inner {
            l1: super::l1map::L1Map::new(cfg.l1_capacity),
            plain_hits: self.hook.is_none()
                && cfg.l1_enabled
                && cfg.xfetch_beta == 0.0
                && clock.coarse(),
            clock,
            refreshing: super::revalidate::Refreshing::new(),
            own_echoes: std::sync::Mutex::default(),
            epoch: AtomicU64::new(0),
            deaf: AtomicBool::new(false),
            health: super::health::HealthRecord::new(started),
            fences: Fences::new(keep_fences_for),
            // The runtime building the cache also runs the background refreshes that
            // synchronous readers (`get_cached`, `block_on(get)`) start.
            batcher: (cfg.l2_batch_after < usize::MAX).then(|| {
                super::batch::ReadBatcher::new(
                    self.store.clone(),
                    cfg.l2_batch_after,
                    tokio::runtime::Handle::try_current().ok(),
                )
            }),
            fills: tokio::runtime::Handle::try_current()
                .map_or_else(|_| LocalCoalescer::new(), LocalCoalescer::with_runtime),
            breaker: Breaker::new(cfg.breaker_threshold, cfg.breaker_backoff)
                .probes_bounded_by(cfg.l2_timeout),
            tel,
            store: self.store,
            loader: self.loader,
            invalidator: self.invalidator,
            expected: self.expected,
            coalescer: self.coalescer,
            tags: self.tagger.map(super::tags::Tags::new),
            hook: self.hook,
            fleet,
            node,
            _shutdown: subscription.as_ref().map(|_| shutdown_tx),
            cfg,
        });
        if let Some(sub) = subscription {
            tokio::spawn(listen(Arc::downgrade(&inner), sub, shutdown_rx));
        }
        Ok(FlagCache { inner })
    }
}
