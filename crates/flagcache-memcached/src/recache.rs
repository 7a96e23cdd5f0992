//! Cross-process stampede protection with memcached's own recache flags: the item
//! operations (`mg … N` vivifies a miss and hands one client the win flag `W`, the
//! others see `Z`; `md … I` marks an entry stale and re-arms its token) and
//! [`MemcachedRecache`], the `Coalescer` built on them.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_memcached::MetaValue;
use async_trait::async_trait;
use flagcache_core::{
    BoxFuture, Coalesced, Coalescer, FlagKey, FlagStore, Lease, LoadOutcome, ReleaseLease, Result,
    Turn,
};

use crate::meta::WireKey;
use crate::MemcachedStore;

/// How long a plain read's finding (stale, token won) waits for the recache path,
/// which in `FlagCache` runs right after it.
const STALE_READ_KEPT_FOR: Duration = Duration::from_secs(2);

/// A plain read found an entry stale.
#[derive(Debug, Clone, Copy)]
struct StaleRead {
    at: Instant,
    /// It won the entry's recache token.
    won: bool,
    /// The stale entry's CAS.
    cas: Option<u64>,
}

/// Entries a plain read of this process just found stale — and whether it won their
/// recache token (memcached hands it to the first reader of a stale item, whatever the
/// command) — for this process's recache path, which runs next. Keyed by wire key.
#[derive(Debug, Default)]
pub(crate) struct StaleReads(Mutex<HashMap<String, StaleRead>>);

impl StaleReads {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, StaleRead>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that a plain read found `wire`'s entry stale (`found`).
    pub(crate) fn note(&self, wire: &WireKey, found: &MetaValue) {
        let mut reads = self.lock();
        if reads.len() >= 1024 {
            reads.retain(|_, r| r.at.elapsed() < STALE_READ_KEPT_FOR);
            if reads.len() >= 1024 {
                // Tokens nobody acted on pass with their entry's grace anyway.
                reads.clear();
            }
        }
        let read = StaleRead {
            at: Instant::now(),
            won: found.is_recache_winner == Some(true),
            cas: found.cas,
        };
        // A won token stays noted until taken: a later read of the same stale item in
        // this process (which memcached answers with Z) must not lose it, or nobody in
        // the fleet refreshes the item until its grace runs out.
        let keep = reads.get(&wire.text).is_some_and(|held| {
            held.won && held.cas == read.cas && held.at.elapsed() < STALE_READ_KEPT_FOR
        });
        if !keep {
            reads.insert(wire.text.clone(), read);
        }
    }

    /// What a plain read found at `wire` a moment ago, if anything. Forgets it.
    fn take(&self, wire: &WireKey) -> Option<StaleRead> {
        self.lock()
            .remove(&wire.text)
            .filter(|r| r.at.elapsed() < STALE_READ_KEPT_FOR)
    }
}

impl MemcachedStore {
    /// `md <key> I [T<exptime>]`: marks the entry stale, keeping its value (for
    /// `exptime` when given), and re-arms its recache token. Absent: fine.
    pub(crate) async fn invalidate_in_place(
        &self,
        wire: &WireKey,
        exptime: Option<u64>,
    ) -> Result<()> {
        let mut flags = vec!["I".to_string()];
        flags.extend(exptime.map(|t| format!("T{t}")));
        self.meta().delete_with("mark stale", wire, flags).await
    }

    /// Hands back a stale entry's recache token (`md <key> I C<cas>`), so that
    /// another reader of the fleet refreshes it. The CAS keeps it from marking a value
    /// stored meanwhile.
    pub(crate) async fn rearm(&self, key: &FlagKey, cas: Option<u64>) {
        let Ok(wire) = self.wire_key(key) else {
            return;
        };
        let mut flags = vec!["I".to_string()];
        flags.extend(cas.map(|c| format!("C{c}")));
        if let Err(e) = self.meta().delete_with("rearm", &wire, flags).await {
            tracing::debug!(error = %e, "could not hand back a recache token; it passes with the entry's grace");
        }
    }

    /// What a plain read of this process found a moment ago: `key` stale, and maybe
    /// its token won. Forgets it.
    fn take_stale_read(&self, key: &FlagKey) -> Option<StaleRead> {
        let wire = self.wire_key(key).ok()?;
        self.stale_reads().take(&wire)
    }

    /// `mg <key> v c N<ttl>`: reads the entry or, on a miss, vivifies an empty
    /// placeholder and tells exactly one caller it won the right to fill it (`W`); the
    /// others learn that the win was already given (`Z`).
    async fn recache_read(&self, key: &FlagKey, ttl_secs: u64) -> Result<Option<MetaValue>> {
        let wire = self.wire_key(key)?;
        let flags = vec!["v".to_string(), "c".to_string(), format!("N{ttl_secs}")];
        self.meta().get_with("recache get", &wire, flags).await
    }

    /// Removes the recache placeholder of `key` if it is still the one with `cas`
    /// (an abandoned fill), so that waiters elect a new winner at once.
    async fn drop_placeholder(&self, key: &FlagKey, cas: u64) -> Result<()> {
        let wire = self.wire_key(key)?;
        // Gone already, or filled meanwhile (CAS mismatch): both fine.
        self.meta()
            .delete_with("recache drop", &wire, vec![format!("C{cas}")])
            .await
    }
}

/// The cross-process [`Coalescer`] (see `FlagCacheBuilder::coalescer`) built on the meta protocol's
/// recache flags, with no lock keys of its own: on a miss, `mg <key> N<ttl>` vivifies an
/// empty placeholder and gives exactly one client in the fleet the win flag `W`; it
/// loads and stores the value. The others see `Z` and poll for the winner's value; if
/// none appears within the placeholder's TTL they load by themselves.
///
/// It also carries cross-process stale-while-revalidate: after
/// `FlagCache::refresh` marks an entry stale (`md … I`), the first reader of the fleet
/// wins the right to reload it and the others are answered at once with the stale
/// value, which `FlagCache` serves as stale while it keeps revalidating.
#[derive(Clone)]
pub struct MemcachedRecache {
    store: MemcachedStore,
    ttl: Duration,
    poll: Duration,
}

impl fmt::Debug for MemcachedRecache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemcachedRecache")
            .field("ttl", &self.ttl)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl MemcachedRecache {
    /// Recache over `store`'s entries: placeholders live 10 s (longer than a load),
    /// losers poll every 20 ms.
    pub fn new(store: &MemcachedStore) -> Self {
        MemcachedRecache {
            store: store.clone(),
            ttl: Duration::from_secs(10),
            poll: Duration::from_millis(20),
        }
    }

    /// How long a placeholder lives, and so how long losers wait (whole seconds).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// How often losers look for the winner's value (jittered ±50 %).
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }
}

impl MemcachedRecache {
    /// A lease on `key` of the given kind.
    fn lease(&self, key: &FlagKey, kind: Won) -> Turn {
        Turn::Load(Lease::new(RecacheLease {
            store: self.store.clone(),
            key: key.clone(),
            kind,
        }))
    }

    /// Someone else is filling `key`: waits for their value, or for the win to pass
    /// to us, or for the placeholder's TTL — then loads.
    async fn wait(&self, key: &FlagKey, ttl_secs: u64) -> Turn {
        let deadline = Instant::now() + self.ttl;
        while Instant::now() < deadline {
            tokio::time::sleep(self.poll.mul_f64(0.5 + fastrand::f64())).await;
            let Ok(Some(now)) = self.store.recache_read(key, ttl_secs).await else {
                continue;
            };
            let has_data = now.data.as_ref().is_some_and(|d| !d.is_empty());
            let stale = now.is_stale == Some(true);
            if has_data && !stale {
                // Their value (a chunked one is assembled by `get`).
                if let Ok(Some(entry)) = self.store.get(key).await {
                    return Turn::Answered(Coalesced::Fresh(Some(entry)));
                }
            } else if now.is_recache_winner == Some(true) {
                // The previous winner gave up: our turn.
                let kind = if stale {
                    Won::Stale(now.cas)
                } else {
                    Won::Placeholder(now.cas)
                };
                return self.lease(key, kind);
            }
        }
        tracing::warn!(%key, "the recache winner never filled the key; loading");
        Turn::Load(Lease::unguarded())
    }
}

#[async_trait]
impl Coalescer for MemcachedRecache {
    /// Reads `key` with the recache flags: the winner of a miss's placeholder, or of a
    /// stale entry's token, loads; when the entry was marked stale
    /// (`FlagStore::fence` with `keep_stale`, `md … I`) and another process won the right to
    /// refresh it, the answer is the stale value at once; otherwise this waits for the
    /// winner's value.
    async fn acquire(&self, key: &FlagKey) -> Result<Turn> {
        // What the plain read just before this found: the entry stale (and maybe the
        // token, which memcached gives to a stale item's first reader of any kind).
        let noted = self.store.take_stale_read(key);
        let ttl_secs = self.ttl.as_secs().max(1);
        let first = match self.store.recache_read(key, ttl_secs).await {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(Turn::Load(Lease::unguarded())),
            Err(e) => {
                tracing::warn!(%key, error = %e, "recache read failed; loading unguarded");
                return Ok(Turn::Load(Lease::unguarded()));
            }
        };
        let has_data = first.data.as_ref().is_some_and(|d| !d.is_empty());
        let stale = first.is_stale == Some(true);
        // A token won by the plain read, if the item is still the one it saw (a later
        // mark changes the CAS).
        let won_before = noted
            .as_ref()
            .is_some_and(|n| n.won && n.cas.is_some() && n.cas == first.cas);
        let won = first.is_recache_winner == Some(true) || won_before;
        if stale && !has_data && won {
            // A placeholder marked stale (a refresh while its winner loaded, which
            // the refresh's fence then refused): the right to fill it is ours.
            return Ok(self.lease(key, Won::Placeholder(first.cas)));
        }
        if has_data && stale {
            if won {
                return Ok(self.lease(key, Won::Stale(first.cas)));
            }
            // Someone else is refreshing it: serve the stale value meanwhile.
            if let Ok(Some(entry)) = self.store.read_entry(key, true).await {
                return Ok(Turn::Answered(Coalesced::Stale(entry)));
            }
            return Ok(self.wait(key, ttl_secs).await);
        }
        if has_data && noted.is_some() {
            // The plain read found it stale a moment ago and it no longer is: the
            // refresh landed in between, and its value is the answer — not a reason to
            // load again.
            if let Ok(Some(entry)) = self.store.get(key).await {
                return Ok(Turn::Answered(Coalesced::Fresh(Some(entry))));
            }
        }
        if has_data || first.is_recache_winner != Some(false) {
            // Either we won the right to fill it, or it holds a value — which the
            // caller has just judged unusable (a miss, a stale version): load.
            let placeholder = (!has_data).then_some(first.cas).flatten();
            return Ok(self.lease(key, Won::Placeholder(placeholder)));
        }
        Ok(self.wait(key, ttl_secs).await)
    }
}

/// What a [`RecacheLease`]'s holder won, with the item's CAS.
#[derive(Debug, Clone, Copy)]
enum Won {
    /// The right to fill a miss: the placeholder `N` vivified (`None`: the key held a
    /// value the caller could not use, and there is no placeholder).
    Placeholder(Option<u64>),
    /// The token of an entry marked stale: the right to refresh it.
    Stale(Option<u64>),
}

/// The lease of [`MemcachedRecache`]: what the winner does once its load ended.
struct RecacheLease {
    store: MemcachedStore,
    key: FlagKey,
    kind: Won,
}

impl ReleaseLease for RecacheLease {
    fn release(self: Box<Self>, outcome: LoadOutcome) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let RecacheLease { store, key, kind } = *self;
            match (kind, outcome) {
                (Won::Stale(_), LoadOutcome::Stored(_)) => {}
                // Gone at the source: remove the stale entry, so the fleet stops
                // serving it (unless it changed meanwhile).
                (Won::Stale(Some(cas)), LoadOutcome::Absent) => {
                    let _ = store.drop_placeholder(&key, cas).await;
                }
                // Not stored (fenced, or L2 failed), failed or abandoned: hand the token
                // on, so that another process tries.
                (Won::Stale(cas), _) => store.rearm(&key, cas).await,
                // The value replaced the placeholder.
                (Won::Placeholder(_), LoadOutcome::Stored(_)) => {}
                // Nothing was stored (absent, fenced, a failed load or write, an abandoned
                // lease): free the key so waiters elect a new winner instead of waiting
                // out the placeholder. CAS-guarded: a value stored meanwhile stays.
                (Won::Placeholder(Some(cas)), _) => {
                    let _ = store.drop_placeholder(&key, cas).await;
                }
                (Won::Placeholder(None), _) => {}
            }
        })
    }
}
