//! The write API of [`FlagCache`]: `set` (a versioned write through L2, then the
//! fleet told), and the versionless invalidations — of a key (`invalidate`, and its
//! soft form `refresh`), of a tag, of everything.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::l2::Access;
use super::FlagCache;
use crate::FlagKey;
use crate::{now_ms, Entry, Invalidation, PutOutcome, Result, Version};

impl<T> FlagCache<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Writes `value` at `version` through to L2 (version-guarded), updates L1, and
    /// publishes the invalidation so other replicas drop their copy.
    ///
    /// Returns [`PutOutcome::Superseded`] when L2 already holds `version` or newer; the
    /// refused value is then not installed anywhere, and an invalidation carrying the
    /// version L2 holds is published: every replica (this one included) drops an older
    /// copy and converges on L2's value, instead of serving the older one until its
    /// freshness runs out. So retrying a `set` whose publish failed is safe too.
    ///
    /// The L2 write is tried (within the L2 timeout) even while the circuit breaker
    /// skips L2 reads, and its success closes the breaker: a kill switch set right
    /// after an outage does not wait for the reads' back-off.
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
        let outcome = inner.write_l2_strict(key, &entry, Access::Write).await?;
        match outcome {
            PutOutcome::Stored => {
                let slot = inner.new_l1_entry(Some(Arc::new(value)), version, Duration::ZERO);
                inner.install_authoritative(key, slot);
                inner
                    .publish(Invalidation::key(key.clone()).with_version(version))
                    .await?;
            }
            // A versioned write is guarded by versions alone, never fenced.
            PutOutcome::Fenced => {}
            PutOutcome::Superseded { current } => {
                inner.drop_older_than(key, current);
                // L2 holds `current`: every replica holding something older drops it
                // and reads L2's value, so a refused write is never silently dropped.
                inner
                    .publish(Invalidation::key(key.clone()).with_version(current))
                    .await?;
            }
        }
        Ok(outcome)
    }

    /// Drops `key` everywhere: from this L1, from L2, and — through the invalidator —
    /// from every other replica's L1. The next read loads it from the source. As for
    /// [`set`](FlagCache::set), the L2 call is tried even while the circuit breaker
    /// is open.
    ///
    /// L2 is fenced ([`FlagStore::fence`](crate::FlagStore::fence)), not only emptied: a load that began before
    /// this call — on any replica, even one that has not heard of it yet — cannot write
    /// its value into L2 after it ([`PutOutcome::Fenced`]). Without the fence such a
    /// load would find the key absent, pass the version guard, and its older value
    /// would be served by every replica for the whole TTL. The fence lives for twice
    /// the loader and L2 timeouts plus a second.
    ///
    /// # Errors
    /// An L2 or publish error (this replica's L1 is dropped regardless).
    pub async fn invalidate(&self, key: &FlagKey) -> Result<()> {
        let inner = &self.inner;
        inner.drop_local(key, None);
        let deleted = inner.fence_l2(key, None).await;
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
    /// L2 is fenced as by [`invalidate`](FlagCache::invalidate) (a load begun before
    /// cannot write back) and every replica drops its L1 copy. With a backend that keeps stale values (memcached, with
    /// `MemcachedRecache` as the cross-process coalescer), one process of the fleet
    /// reloads from the source while the others serve the stale value, marked
    /// [`StaleReason::Revalidating`](super::StaleReason::Revalidating), for at most twice the loader timeout. A reload
    /// that an invalidation fenced is never written back (a hard `invalidate` may be
    /// what fenced it): the reloader hands its turn on and the next reader reloads.
    /// Other backends delete, and the next reads load (coalesced) as after
    /// `invalidate`. The L2 call is tried even while the circuit breaker is open.
    ///
    /// # Errors
    /// An L2 or publish error (this replica's L1 is dropped regardless).
    pub async fn refresh(&self, key: &FlagKey) -> Result<()> {
        let inner = &self.inner;
        inner.drop_local(key, None);
        let grace = inner.cfg.loader_timeout * 2;
        let marked = inner.fence_l2(key, Some(grace)).await;
        // A read in the meantime may have refilled L1 from the entry just marked.
        inner.drop_local(key, None);
        let published = inner.publish_applied(key).await;
        marked.and(published)
    }

    /// Invalidates every flag carrying `tag` (see
    /// [`FlagCacheBuilder::tags`](super::FlagCacheBuilder::tags)): on every replica, only the tag's keys leave L1
    /// (this one's at once), and L2 entries carrying the tag that were written before
    /// now are no longer served by anyone — without scanning L2: the tag's stamp (this
    /// time) is kept in L2 under the reserved key `!tag:<tag>`, and an entry read from
    /// L2 is served only if it is newer than the stamps of its tags. A replica that
    /// was down meanwhile reads the stamps from L2 when it comes back (a resync forgets
    /// what it knew). A load that began before the invalidation — on any replica —
    /// writes an entry stamped when it began, which is therefore never served (the
    /// lease rule). A cache without a tagger drops its whole L1.
    ///
    /// Entries are stamped with the writer's clock and compared with the invalidator's:
    /// clock skew between replicas widens or narrows the window by as much.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a tag that does not make a valid key (whitespace,
    /// control characters), an L2 or a publish error (this replica's L1 is dropped
    /// regardless).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        self.inner.invalidate_tag(tag).await
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
}
