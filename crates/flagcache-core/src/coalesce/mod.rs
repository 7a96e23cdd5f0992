//! Coalescing: who loads a key that missed. [`LocalCoalescer`] shares one fetch among
//! the callers of one process; a [`Coalescer`] decides it across the processes of a
//! fleet with a lease — one process loads, the others take its answer.

mod local;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

pub use local::LocalCoalescer;

use crate::{Entry, Error, FlagKey, Result};

/// A boxed, sendable future: what a [`ReleaseLease`] returns, and the type of the
/// adapter traits' async methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The cross-process coalescer: when many processes miss the same key at once, one of
/// them loads it from the source and the others take its answer, so a burst costs the
/// source one load for the whole fleet.
///
/// [`acquire`](Coalescer::acquire) decides for one caller: either it loads
/// ([`Turn::Load`], holding a [`Lease`] that it releases with the load's outcome), or
/// another process answered ([`Turn::Answered`]). `RedisLock` (a lock key in Redis),
/// `MemcachedRecache` (memcached's recache flags) and [`LocalCoalescer`] (within one
/// process) implement it; the conformance suite's coalescer properties check them.
///
/// `FlagCache` asks its coalescer (see `FlagCacheBuilder::coalescer`) only after an L2
/// miss, and takes an answer only if it passes the checks its own L2 reads pass.
#[async_trait]
pub trait Coalescer: Send + Sync {
    /// Decides who loads `key` after a miss.
    ///
    /// A coalescer that cannot reach its backend answers [`Turn::Load`] with
    /// [`Lease::unguarded`]: slower for the source, never broken for the caller.
    ///
    /// # Concurrent calls on the same key
    /// Among concurrent callers — in one process or many — one gets [`Turn::Load`] at a
    /// time; the others wait until its lease is released and are then answered with
    /// what it stored ([`Turn::Answered`]). A lease dropped unreleased
    /// ([`LoadOutcome::Abandoned`]) lets the next caller load. What a release without
    /// a stored value does is the implementation's:
    /// - `RedisLock` and `MemcachedRecache` hand the turn to the next caller, who loads
    ///   (`RedisLock` answers [`Coalesced::Absent`] after [`LoadOutcome::Absent`]);
    /// - [`LocalCoalescer`] shares the outcome with every waiter: the error of
    ///   [`LoadOutcome::Failed`], the entry of [`LoadOutcome::NotStored`] (each waiter
    ///   loads by itself after `NotStored(None)`), [`Coalesced::Absent`].
    ///
    /// `MemcachedRecache` also gives the turn to every caller when the key holds a value
    /// the caller has judged unusable (an older version than one announced): only a
    /// miss or a stale mark elects one loader.
    ///
    /// # Errors
    /// The lead's [`LoadOutcome::Failed`] error, where the coalescer shares it with its
    /// waiters ([`LocalCoalescer`]); backend errors otherwise become an unguarded load.
    async fn acquire(&self, key: &FlagKey) -> Result<Turn>;
}

/// [`Coalescer::acquire`]'s decision.
#[derive(Debug)]
pub enum Turn {
    /// This caller loads from the source, then releases the lease with the outcome.
    Load(Lease),
    /// Another process loaded (or is refreshing): its answer.
    Answered(Coalesced),
}

/// What another process's load answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coalesced {
    /// The value another process loaded — read back from the shared tier, or handed
    /// over in process by [`LocalCoalescer`] (`None`: there is nothing usable, so the
    /// caller loads by itself). The caller checks it as it checks its own L2 reads.
    Fresh(Option<Entry>),
    /// A value marked stale, served while another process refreshes it.
    Stale(Entry),
    /// Another process asked the source moments ago: it has no such flag. The caller
    /// remembers that as it would its own answer, without asking again.
    Absent,
}

/// How the load of a lease's holder ended: what it releases the lease with.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LoadOutcome {
    /// The loaded entry is in the shared tier (written, or a newer one was there).
    Stored(Entry),
    /// The source has no such flag.
    Absent,
    /// Loaded but not in the shared tier: the write failed (`Some`, the entry), or an
    /// invalidation fenced the load or the shared tier holds a newer version (`None`).
    NotStored(Option<Entry>),
    /// The load failed.
    Failed(Error),
    /// The holder went away before its load ended (the lease was dropped unreleased).
    Abandoned,
}

/// The right to load one key, won from a [`Coalescer`]. Release it with the load's
/// outcome ([`Lease::release`]); a lease dropped unreleased (its holder panicked or was
/// cancelled) is released as [`LoadOutcome::Abandoned`] — in the background, where the
/// release does I/O, when a Tokio runtime is at hand (else the backend's own expiry
/// frees it).
#[must_use = "a lease is released with the load's outcome"]
pub struct Lease(Option<Box<dyn ReleaseLease>>);

/// A [`Coalescer`]'s side of a [`Lease`]: what releasing it does.
pub trait ReleaseLease: Send + 'static {
    /// Frees the lease, telling the coalescer how the load ended.
    fn release(self: Box<Self>, outcome: LoadOutcome) -> BoxFuture<'static, ()>;
}

impl Lease {
    /// A lease released through `release`.
    pub fn new(release: impl ReleaseLease) -> Self {
        Lease(Some(Box::new(release)))
    }

    /// A lease that guards nothing: the load runs without cross-process coalescing.
    pub fn unguarded() -> Self {
        Lease(None)
    }

    /// Releases the lease with the load's outcome.
    pub async fn release(mut self, outcome: LoadOutcome) {
        if let Some(release) = self.0.take() {
            release.release(outcome).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(release) = self.0.take() else {
            return;
        };
        let released = release.release(LoadOutcome::Abandoned);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(released);
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lease")
            .field(&if self.0.is_some() {
                "held"
            } else {
                "unguarded"
            })
            .finish()
    }
}
