//! Fault injection for tests: make a real store fail, slow down, or pause on demand.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    Capabilities, Checked, Codec, Entry, Error, FillRead, FillToken, FlagKey, FlagStore,
    PutOutcome, Result, Version,
};

/// The operations a [`FaultyStore`] counts and can fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `get`, `get_each`, `get_checked`, and the reads of a fill: `get_for_fill`,
    /// `get_each_for_fill` and `fence_token`.
    Read,
    /// `put`.
    Put,
    /// `delete`.
    Delete,
}

impl Op {
    fn index(self) -> usize {
        match self {
            Op::Read => 0,
            Op::Put => 1,
            Op::Delete => 2,
        }
    }
}

struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("injected fault")]
struct Injected;

struct State {
    failing: [AtomicBool; 3],
    latency_ms: AtomicU64,
    hold_reads: watch::Sender<bool>,
    held: AtomicUsize,
    calls: [AtomicU64; 3],
}

/// A handle that switches the faults of a [`FaultyStore`] at run time (clones share
/// the same switches).
#[derive(Clone)]
pub struct FaultControl {
    state: Arc<State>,
}

impl fmt::Debug for FaultControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultControl")
            .field("reads", &self.calls(Op::Read))
            .field("puts", &self.calls(Op::Put))
            .field("deletes", &self.calls(Op::Delete))
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl FaultControl {
    /// Makes every call of `op` fail with a transient backend error (or stop failing).
    pub fn fail(&self, op: Op, failing: bool) {
        self.state.failing[op.index()].store(failing, Ordering::SeqCst);
    }

    /// Makes every operation fail (or stop failing): a dead cache.
    pub fn fail_all(&self, failing: bool) {
        for op in [Op::Read, Op::Put, Op::Delete] {
            self.fail(op, failing);
        }
    }

    /// Adds `latency` before every operation (a slow or hung cache; pair with a timeout).
    pub fn set_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.state.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// Pauses every read *after* the inner store answered and before the answer is
    /// returned, until [`FaultControl::release_reads`]: for tests that force an
    /// interleaving (read an old value, deliver an invalidation, then let the old value
    /// arrive).
    pub fn hold_reads(&self) {
        self.state.hold_reads.send_replace(true);
    }

    /// Lets held reads (and later ones) proceed.
    pub fn release_reads(&self) {
        self.state.hold_reads.send_replace(false);
    }

    /// How many reads are paused right now.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    /// How many calls of `op` were made (faulted ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.state.calls[op.index()].load(Ordering::SeqCst)
    }
}

/// Wraps a store and injects faults into it on command, through its [`FaultControl`]:
/// errors per operation, added latency, and pausing reads. With no fault switched on,
/// it forwards every call unchanged.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use flagcache::layer::{FaultyStore, Op};
/// use flagcache::FlagKey;
/// use flagcache::store::FlagStore;
/// # struct Nothing;
/// # #[flagcache::store::async_trait]
/// # impl FlagStore for Nothing {
/// #     fn capabilities(&self) -> flagcache::store::Capabilities { Default::default() }
/// #     async fn get(&self, _: &FlagKey) -> flagcache::Result<Option<flagcache::store::Entry>> { Ok(None) }
/// #     async fn put(&self, _: &FlagKey, _: &flagcache::store::Entry, _: std::time::Duration) -> flagcache::Result<flagcache::PutOutcome> { Ok(flagcache::PutOutcome::Stored) }
/// #     async fn delete(&self, _: &FlagKey) -> flagcache::Result<()> { Ok(()) }
/// # }
/// # let real_store = Nothing;
/// let (store, faults) = FaultyStore::new(real_store);
/// let key = FlagKey::new("k").unwrap();
/// assert!(store.get(&key).await.is_ok());
/// faults.fail(Op::Read, true); // the cache "dies"
/// let err = store.get(&key).await.unwrap_err();
/// assert!(err.is_transient());
/// assert_eq!(faults.calls(Op::Read), 2);
/// # }
/// ```
pub struct FaultyStore<S> {
    inner: S,
    state: Arc<State>,
}

impl<S> fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore").finish_non_exhaustive()
    }
}

impl<S: FlagStore> FaultyStore<S> {
    /// Wraps `inner`; returns the store and the handle that controls its faults.
    pub fn new(inner: S) -> (Self, FaultControl) {
        let state = Arc::new(State {
            failing: Default::default(),
            latency_ms: AtomicU64::new(0),
            hold_reads: watch::Sender::new(false),
            held: AtomicUsize::new(0),
            calls: Default::default(),
        });
        let control = FaultControl {
            state: state.clone(),
        };
        (FaultyStore { inner, state }, control)
    }

    async fn enter(&self, op: Op, operation: &'static str) -> Result<()> {
        self.state.calls[op.index()].fetch_add(1, Ordering::SeqCst);
        let ms = self.state.latency_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if self.state.failing[op.index()].load(Ordering::SeqCst) {
            return Err(Error::backend(self.inner.name(), operation, true, Injected));
        }
        Ok(())
    }

    /// Holds a read's answer while reads are held.
    async fn hold<R>(&self, answer: R) -> R {
        let mut rx = self.state.hold_reads.subscribe();
        if *rx.borrow_and_update() {
            self.state.held.fetch_add(1, Ordering::SeqCst);
            // Counted down even if the read is dropped while held (a timeout).
            let _held = Held(&self.state.held);
            let _ = rx.wait_for(|hold| !*hold).await;
        }
        answer
    }
}

#[async_trait]
impl<S: FlagStore> FlagStore for FaultyStore<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn codec(&self) -> &Codec {
        self.inner.codec()
    }
    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.enter(Op::Read, "get").await?;
        self.hold(self.inner.get(key).await).await
    }
    fn read_group(&self, key: &FlagKey) -> Option<u64> {
        self.inner.read_group(key)
    }
    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        if let Err(e) = self.enter(Op::Read, "get_each").await {
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        self.hold(self.inner.get_each(keys).await).await
    }
    async fn get_checked(&self, key: &FlagKey, expected: Version) -> Result<Checked> {
        self.enter(Op::Read, "get_checked").await?;
        self.hold(self.inner.get_checked(key, expected).await).await
    }
    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.enter(Op::Put, "put").await?;
        self.inner.put(key, entry, ttl).await
    }
    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.enter(Op::Delete, "delete").await?;
        self.inner.delete(key).await
    }
    async fn get_each_for_fill(&self, keys: &[FlagKey]) -> Vec<Result<FillRead>> {
        if let Err(e) = self.enter(Op::Read, "get_each_for_fill").await {
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        self.hold(self.inner.get_each_for_fill(keys).await).await
    }
    async fn get_for_fill(&self, key: &FlagKey) -> Result<FillRead> {
        self.enter(Op::Read, "get_for_fill").await?;
        self.hold(self.inner.get_for_fill(key).await).await
    }
    async fn fence_token(&self, key: &FlagKey) -> Result<FillToken> {
        self.enter(Op::Read, "fence_token").await?;
        self.inner.fence_token(key).await
    }
    async fn put_fill(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        token: FillToken,
    ) -> Result<PutOutcome> {
        self.enter(Op::Put, "put_fill").await?;
        self.inner.put_fill(key, entry, ttl, token).await
    }
    async fn fence(
        &self,
        key: &FlagKey,
        ttl: Duration,
        keep_stale: Option<Duration>,
    ) -> Result<()> {
        self.enter(Op::Delete, "fence").await?;
        self.inner.fence(key, ttl, keep_stale).await
    }
}
