//! [`LocalCoalescer`]: process-local single flight, per key — many concurrent callers of
//! one key share one fetch — and the same flights as a [`Coalescer`]'s leases.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use futures_util::FutureExt;
use tokio::sync::Notify;

use async_trait::async_trait;

use super::{BoxFuture, Coalesced, Coalescer, Lease, LoadOutcome, ReleaseLease, Turn};
use crate::{Error, FlagKey, Result};

/// One fetch's outcome, shared by the callers waiting on it. Made by the first caller
/// that joins the fetch: a fetch nobody joins — the usual case — allocates none.
struct Flight<V> {
    /// Set once, by the fetch's end.
    result: OnceLock<Result<V>>,
    /// The fetch ended without a result (its task was dropped with its runtime).
    abandoned: AtomicBool,
    /// Wakes the waiters when either of the above is set.
    landed: Notify,
}

impl<V> Flight<V> {
    fn new() -> Arc<Self> {
        Arc::new(Flight {
            result: OnceLock::new(),
            abandoned: AtomicBool::new(false),
            landed: Notify::new(),
        })
    }
}

/// A fetch in the air: the id of the fetch that leads it, and its waiters' flight once
/// somebody waits.
type Airborne<V> = (u64, Option<Arc<Flight<V>>>);

/// One shard of the in-flight map.
struct Flights<V> {
    /// By key: the fetch that callers of the key join.
    by_key: HashMap<FlagKey, Airborne<V>, foldhash::fast::RandomState>,
    /// Fetches [forgotten](LocalCoalescer::forget) while somebody waited on them: their
    /// leaders still publish to these waiters when they end.
    detached: Vec<(u64, Arc<Flight<V>>)>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Flights {
            by_key: HashMap::default(),
            detached: Vec::new(),
        }
    }
}

impl<V> Flights<V> {
    /// Forgets the fetch of `key`, keeping its flight for its leader if anyone waits.
    fn detach(&mut self, key: &FlagKey) {
        if let Some((id, Some(flight))) = self.by_key.remove(key) {
            self.detached.push((id, flight));
        }
    }
}

/// The leading side of a fetch: its place in the in-flight map, and the publishing of
/// its result to whoever joined. Dropped without [`Lead::finish`], it leaves the map
/// and tells the waiters the fetch is gone, so that they do not wait for ever.
struct Lead<V> {
    inner: Arc<Inner<V>>,
    key: FlagKey,
    id: u64,
    done: bool,
}

impl<V> Lead<V> {
    /// Leaves the in-flight map — a caller arriving from now on starts afresh rather
    /// than receive a result its request may postdate — and returns the waiters'
    /// flight, if anyone joined.
    fn leave(&mut self) -> Option<Arc<Flight<V>>> {
        self.done = true;
        let mut shard = self.inner.map(&self.key);
        if shard
            .by_key
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            return shard
                .by_key
                .remove(&self.key)
                .and_then(|(_, flight)| flight);
        }
        let i = shard.detached.iter().position(|(id, _)| *id == self.id)?;
        Some(shard.detached.swap_remove(i).1)
    }
}

impl<V: Clone> Lead<V> {
    /// Leaves the map, then hands `result` to the waiters, if any, and returns it.
    fn finish(mut self, result: Result<V>) -> Result<V> {
        if let Some(flight) = self.leave() {
            // Only this lead ever sets it, so it cannot be set already.
            let _ = flight.result.set(result.clone());
            flight.landed.notify_waiters();
        }
        result
    }
}

impl<V> Drop for Lead<V> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(flight) = self.leave() {
            flight.abandoned.store(true, Ordering::Release);
            flight.landed.notify_waiters();
        }
    }
}

/// How many locks the in-flight map is split over, so that fills of different keys on
/// different threads seldom wait for each other's lock.
const SHARDS: usize = 16;

/// One lock's part of the in-flight map, on a cache line of its own (two, as some
/// CPUs fetch lines in pairs), so that taking one shard's lock does not evict another's.
#[repr(align(128))]
struct Shard<V>(Mutex<Flights<V>>);

struct Inner<V> {
    /// The runtime to start fetches on when the caller is not inside one.
    runtime: Option<tokio::runtime::Handle>,
    shards: [Shard<V>; SHARDS],
    /// Picks a key's shard.
    hasher: foldhash::fast::RandomState,
    next_id: AtomicU64,
    fetches: AtomicU64,
    waits: AtomicU64,
}

impl<V> Inner<V> {
    /// The part of the in-flight map that holds `key`.
    fn map(&self, key: &FlagKey) -> MutexGuard<'_, Flights<V>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        Self::lock(&self.shards[i])
    }

    /// Where a fetch whose caller went away runs on: the current runtime, else the
    /// coalescer's own.
    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone())
    }

    fn lock(shard: &Shard<V>) -> MutexGuard<'_, Flights<V>> {
        // The lock is never held across a panic-prone call, so poisoning cannot leave
        // the map inconsistent; recover it rather than propagate a panic.
        shard.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Process-local single flight, per key.
///
/// The first caller of a key drives the fetch itself (no task hop, so a coalesced miss
/// costs what the fetch costs); every caller that arrives while it runs waits for that
/// fetch's result instead of starting another. Then:
/// - the fetch runs to completion even if the caller that started it is dropped: what
///   remains of it moves to a spawned task (cancellation-safe: the other callers still
///   get the result);
/// - an error (or a panic, reported as [`Error::Loader`]) reaches every waiter and is not
///   remembered: the key leaves the in-flight map as the fetch ends, so the next call
///   fetches again;
/// - a caller arriving after the fetch ended starts a new one — results are not cached
///   here, that is the cache's job.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> flagcache::Result<()> {
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use flagcache::FlagKey;
/// use flagcache::coalesce::LocalCoalescer;
///
/// let coalescer = LocalCoalescer::<String>::new();
/// let calls = Arc::new(AtomicUsize::new(0));
/// let key = FlagKey::new("checkout")?;
/// let reads = (0..100).map(|_| {
///     let calls = calls.clone();
///     coalescer.run(&key, move || async move {
///         calls.fetch_add(1, Ordering::SeqCst);
///         tokio::time::sleep(std::time::Duration::from_millis(20)).await;
///         Ok("on".to_string())
///     })
/// });
/// let values = futures_util::future::try_join_all(reads).await?;
/// assert!(values.iter().all(|v| v == "on"));
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// assert_eq!(coalescer.in_flight(), 0);
/// # Ok(()) }
/// ```
pub struct LocalCoalescer<V = Coalesced> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for LocalCoalescer<V> {
    fn clone(&self) -> Self {
        LocalCoalescer {
            inner: self.inner.clone(),
        }
    }
}

impl<V> Default for LocalCoalescer<V> {
    fn default() -> Self {
        LocalCoalescer {
            inner: Arc::new(Inner {
                runtime: None,
                shards: std::array::from_fn(|_| Shard(Mutex::default())),
                hasher: foldhash::fast::RandomState::default(),
                next_id: AtomicU64::new(0),
                fetches: AtomicU64::new(0),
                waits: AtomicU64::new(0),
            }),
        }
    }
}

impl<V> fmt::Debug for LocalCoalescer<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCoalescer")
            .field("in_flight", &self.in_flight())
            .field("fetches", &self.fetches())
            .field("coalesced_waits", &self.coalesced_waits())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("fetch panicked: {0}")]
struct Panicked(String);

impl<V: Clone + Send + Sync + 'static> LocalCoalescer<V> {
    /// An empty coalescer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty coalescer that starts fetches on `runtime` when its caller runs
    /// outside any Tokio runtime (a synchronous caller of a cache built inside one).
    pub fn with_runtime(runtime: tokio::runtime::Handle) -> Self {
        let mut c = Self::default();
        if let Some(inner) = Arc::get_mut(&mut c.inner) {
            inner.runtime = Some(runtime);
        }
        c
    }

    /// Returns the result of `fetch` for `key`, sharing one run of it among all
    /// concurrent callers.
    ///
    /// # Concurrent calls on the same key
    /// Exactly one `fetch` runs per burst: the first caller's. Callers arriving while it
    /// runs do not call their `fetch` at all; they wait and receive a clone of the same
    /// result, error included. Dropping any caller — the first one too, whose remaining
    /// fetch then moves to a spawned task — neither cancels it nor affects the others.
    ///
    /// # Errors
    /// The fetch's error; [`Error::Loader`] if the fetch panicked;
    /// [`Error::Closed`] if there is no Tokio runtime or it shut down under the fetch.
    pub async fn run<F, Fut>(&self, key: &FlagKey, fetch: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        self.run_joined(key, fetch).await.0
    }

    /// [`LocalCoalescer::run`], also telling whether this call joined a fetch that was
    /// already in flight (`true`) or started one (`false`).
    pub(crate) async fn run_joined<F, Fut>(&self, key: &FlagKey, fetch: F) -> (Result<V>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        match self.join_or_lead(key, fetch) {
            Ok(Role::Join(flight)) => (Self::wait(flight).await, true),
            Ok(Role::Lead(leader)) => (leader.drive().await, false),
            Err(e) => (Err(e), false),
        }
    }

    /// Joins the fetch in flight for `key`, or becomes its leader: the caller drives
    /// the fetch itself — no task hop on the common path — and hands what remains of
    /// it to a spawned task if it is dropped first.
    fn join_or_lead<F, Fut>(&self, key: &FlagKey, fetch: F) -> Result<Role<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        // Leading needs a runtime: without one the fetch could not move to a task of its
        // own if its caller were dropped. Joining does not. A coalescer with a runtime
        // of its own looks one up only if the caller is dropped (see `Leader`'s drop);
        // one without keeps the caller's, in case the caller is dropped outside it.
        let mut caller_runtime = None;
        let may_lead = || {
            if self.inner.runtime.is_some() {
                return true;
            }
            caller_runtime = tokio::runtime::Handle::try_current().ok();
            caller_runtime.is_some()
        };
        let lead = match self.enter(key, may_lead) {
            Some(Entered::Joined(flight)) => return Ok(Role::Join(flight)),
            Some(Entered::Leads(lead)) => lead,
            None => return Err(Error::Closed("tokio runtime (coalescing needs one)")),
        };
        let panicking_key = key.clone();
        let fut = AssertUnwindSafe(fetch()).catch_unwind();
        Ok(Role::Lead(Leader {
            fetch: Some(Box::pin(async move {
                match fut.await {
                    Ok(r) => r,
                    Err(panic) => Err(Error::loader(&panicking_key, Panicked(panic_text(&*panic)))),
                }
            })),
            lead: Some(lead),
            caller_runtime,
        }))
    }

    /// Joins the flight of `key`, or — when `may_lead` says so — opens one that this
    /// caller leads: it then holds the fetch's place in the in-flight map and the
    /// publishing of its result. `None`: there is no flight to join and this caller
    /// may not lead.
    fn enter(&self, key: &FlagKey, may_lead: impl FnOnce() -> bool) -> Option<Entered<V>> {
        let mut map = self.inner.map(key);
        if let Some((_, flight)) = map.by_key.get_mut(key) {
            self.inner.waits.fetch_add(1, Ordering::Relaxed);
            return Some(Entered::Joined(
                flight.get_or_insert_with(Flight::new).clone(),
            ));
        }
        if !may_lead() {
            return None;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        map.by_key.insert(key.clone(), (id, None));
        drop(map);
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        Some(Entered::Leads(Lead {
            inner: self.inner.clone(),
            key: key.clone(),
            id,
            done: false,
        }))
    }

    /// Starts `fetch` for `key` in the background unless one is already in flight;
    /// returns whether it started one. Nobody waits for the result: use it for
    /// refreshes whose result lands elsewhere (a cache).
    ///
    /// # Concurrent calls on the same key
    /// At most one fetch per key runs; calls while it runs return `false` and drop
    /// their `fetch` unrun.
    pub fn start<F, Fut>(&self, key: &FlagKey, fetch: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        if self.inner.map(key).by_key.contains_key(key) {
            return false;
        }
        let Some(runtime) = self.inner.runtime() else {
            return false;
        };
        match self.join_or_lead(key, fetch) {
            Ok(Role::Lead(leader)) => {
                runtime.spawn(leader.drive());
                true
            }
            Ok(Role::Join(_)) | Err(_) => false,
        }
    }

    async fn wait(flight: Arc<Flight<V>>) -> Result<V> {
        Self::landed(flight).await.unwrap_or(Err(Error::Closed(
            "coalesced fetch (its runtime shut down)",
        )))
    }

    /// The flight's result once it lands; `None` when its leader went away without one.
    async fn landed(flight: Arc<Flight<V>>) -> Option<Result<V>> {
        loop {
            // Registered before the checks, so a result landing in between still
            // wakes this waiter.
            let landed = flight.landed.notified();
            let mut landed = std::pin::pin!(landed);
            landed.as_mut().enable();
            if let Some(result) = flight.result.get() {
                return Some(result.clone());
            }
            if flight.abandoned.load(Ordering::Acquire) {
                return None;
            }
            landed.await;
        }
    }
}

/// The lease protocol of [`Coalescer`] over a [`LocalCoalescer`]: the first caller of a
/// key loads and the others wait for the outcome it releases; a lease dropped without
/// a release lets the next caller lead.
#[async_trait]
impl Coalescer for LocalCoalescer<Coalesced> {
    async fn acquire(&self, key: &FlagKey) -> Result<Turn> {
        loop {
            // A lease is released by its holder, runtime or not: anyone may lead.
            match self.enter(key, || true) {
                Some(Entered::Leads(lead)) => {
                    return Ok(Turn::Load(Lease::new(LocalLease(lead))));
                }
                Some(Entered::Joined(flight)) => {
                    if let Some(answer) = Self::landed(flight).await {
                        return answer.map(Turn::Answered);
                    }
                }
                None => {}
            }
        }
    }
}

/// A [`LocalCoalescer`] flight's lead, as a [`Lease`].
struct LocalLease(Lead<Coalesced>);

impl ReleaseLease for LocalLease {
    fn release(self: Box<Self>, outcome: LoadOutcome) -> BoxFuture<'static, ()> {
        let LocalLease(lead) = *self;
        let answer = match outcome {
            LoadOutcome::Stored(entry) => Some(Ok(Coalesced::Fresh(Some(entry)))),
            LoadOutcome::NotStored(entry) => Some(Ok(Coalesced::Fresh(entry))),
            LoadOutcome::Absent => Some(Ok(Coalesced::Absent)),
            LoadOutcome::Failed(e) => Some(Err(e)),
            LoadOutcome::Abandoned => None,
        };
        // Unfinished, the lead leaves the map and tells the waiters to try again.
        if let Some(answer) = answer {
            let _ = lead.finish(answer);
        }
        Box::pin(std::future::ready(()))
    }
}

impl<V> LocalCoalescer<V> {
    /// Detaches the fetch in flight for `key`, if any: it runs on and its current
    /// waiters get its result, but callers arriving from now on start a new fetch.
    /// Used when an invalidation lands mid-fetch, so nobody who asks *after* it is
    /// handed a value read *before* it.
    pub fn forget(&self, key: &FlagKey) {
        self.inner.map(key).detach(key);
    }

    /// [`LocalCoalescer::forget`] for every key: callers arriving once it returns
    /// start new fetches. (The shards are cleared one after another: a caller racing
    /// the call may still join a fetch of a shard not cleared yet.)
    pub fn forget_all(&self) {
        for shard in &self.inner.shards {
            let mut flights = Inner::lock(shard);
            let Flights { by_key, detached } = &mut *flights;
            detached.extend(by_key.drain().filter_map(|(_, (id, f))| Some((id, f?))));
        }
    }

    /// How many keys have a fetch in flight (the shards are counted one after another,
    /// so the figure is exact only while no fetch starts or ends).
    pub fn in_flight(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| Inner::lock(s).by_key.len())
            .sum()
    }

    /// How many fetches were started, in total.
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// How many calls waited on another caller's fetch instead of starting one.
    pub fn coalesced_waits(&self) -> u64 {
        self.inner.waits.load(Ordering::Relaxed)
    }
}

/// What [`LocalCoalescer::enter`] made of a caller.
enum Entered<V> {
    Joined(Arc<Flight<V>>),
    Leads(Lead<V>),
}

enum Role<V: Clone + Send + Sync + 'static> {
    Join(Arc<Flight<V>>),
    Lead(Leader<V>),
}

type BoxedFetch<V> = Pin<Box<dyn Future<Output = Result<V>> + Send + 'static>>;

/// A fetch driven by the caller that started it. Dropped before the fetch ends (the
/// caller was cancelled), it spawns the rest of the fetch — on the current runtime,
/// else the coalescer's, else the one the caller started on — so the waiters still
/// get their result and the in-flight entry is still cleared when it ends.
struct Leader<V: Clone + Send + Sync + 'static> {
    fetch: Option<BoxedFetch<V>>,
    lead: Option<Lead<V>>,
    /// The runtime the caller started on, kept only by a coalescer without one of its
    /// own.
    caller_runtime: Option<tokio::runtime::Handle>,
}

impl<V: Clone + Send + Sync + 'static> Leader<V> {
    async fn drive(mut self) -> Result<V> {
        let result = match self.fetch.as_mut() {
            Some(fetch) => fetch.await,
            None => Err(Error::Closed("coalesced fetch")),
        };
        self.fetch = None;
        match self.lead.take() {
            Some(lead) => lead.finish(result),
            None => result,
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Drop for Leader<V> {
    fn drop(&mut self) {
        let (Some(fetch), Some(lead)) = (self.fetch.take(), self.lead.take()) else {
            return;
        };
        // If the runtime is shutting down the task never runs: dropping it drops
        // `lead`, and the waiters learn the fetch is gone (`Error::Closed`).
        if let Some(runtime) = lead.inner.runtime().or_else(|| self.caller_runtime.take()) {
            runtime.spawn(async move {
                let result = fetch.await;
                // The caller that started the fetch is gone: the waiters take it all.
                let _ = lead.finish(result);
            });
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
