//! App-layer invalidation: memcached has no pub/sub, so events go into a log kept in
//! memcached itself and every subscriber polls it.
//!
//! The log is a counter `<ns>!inv:seq`, advanced with `ma`, and a ring of `ring_size`
//! slots `<ns>!inv:<n mod ring_size>`. Publishing event number `n` is `ma` (which returns
//! `n`) then `ms` of the slot with `n` in its first 8 bytes. A subscriber remembers the
//! last number it delivered and, every poll, reads the counter and the slots after it.
//! It signals `Resync` when:
//! - the counter went backwards or vanished (a restart or an eviction);
//! - it fell further behind than the ring holds, or a slot holds a later lap than the
//!   one it wants (overwritten before it was read);
//! - a slot is still missing after a grace period (a publisher died between `ma` and
//!   `ms`, or the slot was evicted).
//!
//! All log keys live on the first server given (not on the ring, so replicas whose
//! server lists differ while a server is added still share one log), under
//! `<namespace>!inv:…`, which no flag key can produce. Propagation is bounded by the
//! poll interval plus a round trip.
//!
//! The byte layout is a published, stable format that services in other languages
//! append to: "The invalidation log format" in the crate docs is its specification.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flagcache_core::{
    now_ms, Error, Invalidation, Invalidator, NodeId, Result, ResyncReason, Signal, Subscription,
};
use tokio::sync::mpsc;

use crate::meta::{parse_number, Route, WireKey};
use crate::MemcachedStore;

/// An [`Invalidator`] over an invalidation log kept in memcached: see the
/// [crate docs](crate) for how it works and when it signals `Resync`.
///
/// Built as every adapter's invalidator is: [`builder`](MemcachedInvalidator::builder),
/// its settings, `build()` — or [`new`](MemcachedInvalidator::new) with the defaults;
/// [`peer`](MemcachedInvalidator::peer) adds another node on the same log. Clones are
/// the same node.
#[derive(Clone)]
pub struct MemcachedInvalidator {
    inner: Arc<Inner>,
}

/// Configures a [`MemcachedInvalidator`]: a ring of 1,024 slots, polled every 100 ms,
/// with a 1 s grace for missing slots, by default. Slots are kept for an hour.
#[derive(Debug, Clone)]
pub struct MemcachedInvalidatorBuilder {
    store: MemcachedStore,
    ring_size: u64,
    poll: Duration,
    grace: Duration,
}

impl MemcachedInvalidatorBuilder {
    /// How many events the log holds before the oldest is overwritten (default 1,024).
    /// A subscriber that falls further behind signals `Resync`.
    #[must_use]
    pub fn ring_size(mut self, slots: u64) -> Self {
        self.ring_size = slots.max(1);
        self
    }

    /// How often subscribers poll (default 100 ms): the propagation bound.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// How long a subscriber waits for a slot whose number was taken but that was not
    /// written yet, before it gives up on it and signals `Resync` (default 1 s).
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The invalidator: a first node on the log.
    pub fn build(self) -> MemcachedInvalidator {
        MemcachedInvalidator {
            inner: Arc::new(Inner {
                store: self.store,
                node: NodeId::random(),
                seq: AtomicU64::new(0),
                ring_size: self.ring_size,
                poll: self.poll,
                grace: self.grace,
                slot_ttl: Duration::from_secs(3600),
                publishing: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

struct Inner {
    store: MemcachedStore,
    node: NodeId,
    seq: AtomicU64,
    ring_size: u64,
    poll: Duration,
    grace: Duration,
    slot_ttl: Duration,
    publishing: tokio::sync::Mutex<()>,
}

impl fmt::Debug for MemcachedInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemcachedInvalidator")
            .field("node", &self.inner.node)
            .field("ring_size", &self.inner.ring_size)
            .field("poll", &self.inner.poll)
            .field("grace", &self.inner.grace)
            .finish_non_exhaustive()
    }
}

impl MemcachedInvalidator {
    /// A log next to `store`'s entries with the default settings (see
    /// [`MemcachedInvalidatorBuilder`]).
    pub fn new(store: &MemcachedStore) -> Self {
        Self::builder(store).build()
    }

    /// Configures a log next to `store`'s entries (same servers, same namespace).
    pub fn builder(store: &MemcachedStore) -> MemcachedInvalidatorBuilder {
        MemcachedInvalidatorBuilder {
            store: store.clone(),
            ring_size: 1024,
            poll: Duration::from_millis(100),
            grace: Duration::from_secs(1),
        }
    }

    /// Another node on the same log (its own node id and sequence): a simulated
    /// replica in tests.
    pub fn peer(&self) -> Self {
        MemcachedInvalidator {
            inner: Arc::new(Inner {
                store: self.inner.store.clone(),
                node: NodeId::random(),
                seq: AtomicU64::new(0),
                ring_size: self.inner.ring_size,
                poll: self.inner.poll,
                grace: self.inner.grace,
                slot_ttl: self.inner.slot_ttl,
                publishing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn counter(&self) -> WireKey {
        WireKey::plain(format!("{}inv:seq", self.inner.store.internal_prefix()))
    }

    fn slot(&self, n: u64) -> WireKey {
        WireKey::plain(format!(
            "{}inv:{}",
            self.inner.store.internal_prefix(),
            n % self.inner.ring_size
        ))
    }

    /// The log's epoch: a random number kept at `<ns>!inv:epoch`, created (in add mode,
    /// so concurrent creators agree) when missing. A restart or a flush loses it, so a
    /// new one differs from what subscribers remember — a reset they notice even when
    /// publishers have pushed the counter back past where they were.
    async fn epoch(&self) -> Result<u64> {
        let key = WireKey::plain(format!("{}inv:epoch", self.inner.store.internal_prefix()));
        for _ in 0..3 {
            let raw = self.inner.store.meta().raw_get(Route::First, &key).await?;
            if let Some(e) = raw.as_deref().and_then(parse_number) {
                return Ok(e);
            }
            let fresh = fastrand::u64(1..);
            self.inner
                .store
                .meta()
                .raw_add(Route::First, &key, fresh.to_string().into_bytes())
                .await?;
        }
        Err(Error::corrupt("the invalidation log epoch cannot be read"))
    }

    async fn read_counter(&self) -> Result<Option<u64>> {
        let c = self.counter();
        let raw = self.inner.store.meta().raw_get(Route::First, &c).await?;
        Ok(raw.as_deref().and_then(parse_number))
    }

    /// The event in slot `n`: `Ok(Some)` when the slot holds lap `n`, `Err(later)` when it
    /// holds a later lap, `Ok(None)` when it is missing or holds an earlier lap.
    async fn read_slot(&self, n: u64) -> Result<std::result::Result<Option<Invalidation>, u64>> {
        let raw = self
            .inner
            .store
            .meta()
            .raw_get(Route::First, &self.slot(n))
            .await?;
        let Some(raw) = raw else { return Ok(Ok(None)) };
        let Some((head, body)) = raw.split_first_chunk::<8>() else {
            return Ok(Ok(None));
        };
        let lap = u64::from_be_bytes(*head);
        if lap > n {
            return Ok(Err(lap));
        }
        if lap < n {
            return Ok(Ok(None));
        }
        match self.inner.store_codec().decode_invalidation(body) {
            Ok(ev) => Ok(Ok(Some(ev))),
            Err(e) => Err(e),
        }
    }
}

impl Inner {
    fn store_codec(&self) -> &flagcache_core::Codec {
        flagcache_core::FlagStore::codec(&self.store)
    }
}

#[async_trait]
impl Invalidator for MemcachedInvalidator {
    fn node_id(&self) -> NodeId {
        self.inner.node
    }

    fn transport(&self) -> &'static str {
        "log"
    }

    async fn publish(&self, event: &Invalidation) -> Result<()> {
        // One publish at a time per node, so this node's events take log numbers in
        // the order of their sequence numbers.
        let _turn = self.inner.publishing.lock().await;
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let stamped = event.clone().stamped(self.inner.node, seq, now_ms());
        let body = self.inner.store_codec().encode_invalidation(&stamped)?;
        let n = self
            .inner
            .store
            .meta()
            .raw_incr(Route::First, &self.counter())
            .await?;
        let mut value = n.to_be_bytes().to_vec();
        value.extend_from_slice(&body);
        let ttl = self.inner.slot_ttl.as_secs().max(1);
        self.inner
            .store
            .meta()
            .raw_set(Route::First, &self.slot(n), value, ttl)
            .await
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let epoch = self.epoch().await?;
        let start = self.read_counter().await?.unwrap_or(0);
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(poll(self.clone(), start, epoch, tx));
        Ok(Subscription::from_receiver(rx))
    }
}

/// Follows the log from `last` until the subscription is dropped.
async fn poll(inv: MemcachedInvalidator, mut last: u64, mut epoch: u64, tx: mpsc::Sender<Signal>) {
    let mut ticker = tokio::time::interval(inv.inner.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missing_since: Option<(u64, Instant)> = None;
    let mut broken = false;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = ticker.tick() => {}
        }
        let mut out = Vec::new();
        match step(&inv, &mut last, &mut epoch, &mut missing_since, &mut out).await {
            Ok(()) => {
                if broken {
                    // The server answers again: whatever happened meanwhile is unknown.
                    broken = false;
                    out.insert(0, Signal::Resync(ResyncReason::Reconnected));
                }
            }
            Err(e) => {
                if !broken {
                    tracing::warn!(error = %e, "invalidation log unreachable");
                    broken = true;
                    out.push(Signal::Resync(ResyncReason::Reconnected));
                }
            }
        }
        for s in out {
            if tx.send(s).await.is_err() {
                return;
            }
        }
    }
}

/// One poll: delivers what the log holds after `last`, or the `Resync` it calls for.
async fn step(
    inv: &MemcachedInvalidator,
    last: &mut u64,
    epoch: &mut u64,
    missing_since: &mut Option<(u64, Instant)>,
    out: &mut Vec<Signal>,
) -> Result<()> {
    let now = inv.epoch().await?;
    if now != *epoch {
        // A new log (restart, flush): everything since the last poll is unknown.
        out.push(Signal::Resync(ResyncReason::LogReset));
        *epoch = now;
        *last = inv.read_counter().await?.unwrap_or(0);
        *missing_since = None;
        return Ok(());
    }
    let counter = inv.read_counter().await?;
    let Some(head) = counter else {
        if *last > 0 {
            // The counter vanished: a restart or an eviction.
            out.push(Signal::Resync(ResyncReason::LogReset));
            *last = 0;
        }
        return Ok(());
    };
    if head < *last {
        out.push(Signal::Resync(ResyncReason::LogReset));
        *last = head;
        return Ok(());
    }
    if head - *last > inv.inner.ring_size {
        out.push(Signal::Resync(ResyncReason::Lagged {
            missed: head - *last - inv.inner.ring_size,
        }));
        *last = head - inv.inner.ring_size;
    }
    while *last < head {
        let n = *last + 1;
        match inv.read_slot(n).await {
            Ok(Ok(Some(ev))) => {
                out.push(Signal::Invalidated(ev));
                *last = n;
                *missing_since = None;
            }
            Ok(Ok(None)) => {
                // Taken but not written yet, or evicted: wait a grace period.
                let since = match missing_since {
                    Some((m, at)) if *m == n => *at,
                    _ => {
                        *missing_since = Some((n, Instant::now()));
                        return Ok(());
                    }
                };
                if since.elapsed() < inv.inner.grace {
                    return Ok(());
                }
                out.push(Signal::Resync(ResyncReason::LogReset));
                *last = n;
                *missing_since = None;
            }
            Ok(Err(_later_lap)) => {
                // Overwritten before we read it: we are a whole ring behind.
                out.push(Signal::Resync(ResyncReason::Lagged {
                    missed: head - *last,
                }));
                *last = head;
            }
            Err(Error::Corrupt { .. } | Error::Codec { .. }) => {
                out.push(Signal::Resync(ResyncReason::Undecodable));
                *last = n;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
