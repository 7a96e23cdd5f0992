//! Tags: a value's tags (from the cache's tagger), which L1 keys carry each tag, and
//! the invalidation stamp of each tag — kept in L2, so that an entry written before its
//! tag was invalidated is not served, by any replica, without scanning L2.
//!
//! A tag invalidation writes the tag's stamp (the wall-clock time, in ms) to L2 under
//! the reserved key `!tag:<tag>`, version-guarded so a later stamp always wins, drops
//! the tag's keys from every replica's L1, and fences the fills in flight. An L2 entry
//! whose stamp (the time its fill began, or its `set`) is not after the stamp of one
//! of its tags reads as a miss. That is also the lease rule for tags: a load that began
//! before the invalidation writes an entry stamped before it, which nobody serves.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::l2::Access;
use super::Inner;
use crate::{now_ms, Entry, Error, FlagKey, Invalidation, Result, Version};

/// What a cache's tagger computes: a value's tags.
pub(super) type Tagger<T> = Arc<dyn Fn(&FlagKey, &T) -> Vec<String> + Send + Sync>;

/// How long a tag's stamp read from L2 is trusted by a cache without an invalidator
/// (with one, until an event or a resync says otherwise).
const UNSUBSCRIBED_STAMP_FOR: Duration = Duration::from_secs(1);

/// The fewest (tag, key) pairs the index holds before it is pruned.
const PRUNE_FLOOR: usize = 1024;

/// Which L1 keys carry each tag. A key dropped from L1 lingers until the next prune
/// (dropping it again is harmless); a prune forgets every key L1 no longer holds, and
/// comes once the pairs held have doubled since the last one (and at least
/// [`PRUNE_FLOOR`]), so that it costs O(1) per key indexed, amortized.
#[derive(Default)]
struct TagIndex {
    by_tag: HashMap<String, HashSet<FlagKey>>,
    /// (tag, key) pairs held.
    pairs: usize,
    /// `pairs` past which the next key indexed prunes.
    prune_past: usize,
}

/// The tag bookkeeping of one cache.
pub(super) struct Tags<T> {
    tagger: Tagger<T>,
    index: Mutex<TagIndex>,
    /// Each tag's invalidation stamp as last learned (0: never invalidated), and when.
    stamps: Mutex<HashMap<String, (u64, Instant)>>,
}

fn lock<V>(m: &Mutex<V>) -> MutexGuard<'_, V> {
    // Nothing that can panic runs under these locks.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reserved key of a tag's stamp in L2.
pub(super) fn stamp_key(tag: &str) -> Result<FlagKey> {
    FlagKey::new(format!("!tag:{tag}"))
        .map_err(|e| Error::InvalidArgument(format!("tag {tag:?}: {e}").into()))
}

impl<T> Tags<T> {
    pub(super) fn new(tagger: Tagger<T>) -> Self {
        Tags {
            tagger,
            index: Mutex::default(),
            stamps: Mutex::default(),
        }
    }

    pub(super) fn of(&self, key: &FlagKey, value: &T) -> Vec<String> {
        (self.tagger)(key, value)
    }

    /// Notes that `key`, now in L1, carries `tags`; true when the index is due a
    /// [`prune`](Tags::prune).
    pub(super) fn index(&self, key: &FlagKey, tags: &[String]) -> bool {
        if tags.is_empty() {
            return false;
        }
        let mut index = lock(&self.index);
        let TagIndex { by_tag, pairs, .. } = &mut *index;
        for t in tags {
            if by_tag.entry(t.clone()).or_default().insert(key.clone()) {
                *pairs += 1;
            }
        }
        index.pairs > index.prune_past.max(PRUNE_FLOOR)
    }

    /// Forgets the keys `held` says L1 no longer holds. Safe beside concurrent
    /// installs as long as they put a key in L1 before they index it: a key seen
    /// absent here is indexed again by the install that brings it back.
    pub(super) fn prune(&self, held: impl Fn(&FlagKey) -> bool) {
        let mut index = lock(&self.index);
        index.by_tag.retain(|_, keys| {
            keys.retain(|k| held(k));
            !keys.is_empty()
        });
        index.pairs = index.by_tag.values().map(HashSet::len).sum();
        index.prune_past = index.pairs.saturating_mul(2);
    }

    /// (tag, key) pairs the index holds.
    pub(super) fn pairs(&self) -> usize {
        lock(&self.index).pairs
    }

    /// The keys noted as carrying `tag`, forgotten.
    pub(super) fn take_keys(&self, tag: &str) -> HashSet<FlagKey> {
        let mut index = lock(&self.index);
        let keys = index.by_tag.remove(tag).unwrap_or_default();
        index.pairs -= keys.len();
        keys
    }

    /// Learns `tag`'s stamp (a later one wins).
    pub(super) fn learn(&self, tag: &str, stamp: u64) {
        let mut stamps = lock(&self.stamps);
        let e = stamps.entry(tag.to_string()).or_insert((0, Instant::now()));
        e.0 = e.0.max(stamp);
        e.1 = Instant::now();
    }

    /// Forgets every stamp learned: after a resync, events may have been missed.
    pub(super) fn forget_stamps(&self) {
        lock(&self.stamps).clear();
    }

    /// The stamp known for `tag`, if it can be trusted now.
    fn known(&self, tag: &str, subscribed: bool) -> Option<u64> {
        let stamps = lock(&self.stamps);
        let (stamp, at) = stamps.get(tag)?;
        (subscribed || at.elapsed() < UNSUBSCRIBED_STAMP_FOR).then_some(*stamp)
    }
}

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Whether an L2 entry of `key` holding `value` may be served: none of its tags was
    /// invalidated at or after the entry's stamp. A tag whose stamp cannot be read
    /// (L2 failing) does not refuse it: the fill's own L2 read succeeded, and the
    /// events keep L1 right.
    pub(super) async fn tags_allow(&self, key: &FlagKey, value: &T, entry: &Entry) -> bool {
        let Some(tags) = &self.tags else {
            return true;
        };
        let subscribed = self.invalidator.is_some();
        for tag in tags.of(key, value) {
            let stamp = match tags.known(&tag, subscribed) {
                Some(s) => s,
                None => match self.read_stamp(&tag).await {
                    Some(s) => {
                        tags.learn(&tag, s);
                        s
                    }
                    None => continue,
                },
            };
            if stamp > 0 && entry.stamp_ms <= stamp {
                tracing::debug!(cache = %self.cfg.name, %key, %tag, "L2 entry predates its tag's invalidation");
                return false;
            }
        }
        true
    }

    /// Whether an L2 entry of `key` may be served as far as its tags go (always, for a
    /// cache without a tagger). An entry that does not decode is left to the caller,
    /// which reports it.
    pub(super) async fn servable(&self, key: &FlagKey, entry: &Entry) -> bool {
        if self.tags.is_none() {
            return true;
        }
        match self.store.codec().decode_value::<T>(&entry.payload) {
            Ok(value) => self.tags_allow(key, &value, entry).await,
            Err(_) => true,
        }
    }

    /// Notes the tags of a value just installed in L1 (installed first: see
    /// [`Tags::prune`]); true when the index is due a [`prune_tags`](Inner::prune_tags),
    /// which the caller runs once it has let go of the fence lock.
    #[must_use]
    pub(super) fn index_tags(&self, key: &FlagKey, value: Option<&T>) -> bool {
        match (&self.tags, value) {
            (Some(tags), Some(value)) => tags.index(key, &tags.of(key, value)),
            _ => false,
        }
    }

    /// Forgets the tagged keys L1 no longer holds.
    pub(super) fn prune_tags(&self) {
        if let Some(tags) = &self.tags {
            tags.prune(|k| self.l1.peek(k).is_some());
        }
    }

    /// `tag`'s stamp in L2 (0: never invalidated); `None` when L2 cannot say.
    async fn read_stamp(&self, tag: &str) -> Option<u64> {
        let k = stamp_key(tag).ok()?;
        match self
            .l2_call("get", Access::Read, Some(&k), |_| self.store.get(&k))
            .await
        {
            Ok(found) => Some(found.map_or(0, |e| e.version.get())),
            Err(e) => {
                tracing::warn!(cache = %self.cfg.name, %tag, error = %e, "tag stamp unreadable");
                None
            }
        }
    }

    /// Records a tag invalidation here: the stamp learned, the tag's keys dropped from
    /// L1, and every fill in flight fenced (its value may carry the tag).
    pub(super) fn apply_tag(&self, tag: &str, stamp: u64) {
        let Some(tags) = &self.tags else {
            // Tags are not tracked: dropping everything is always correct.
            self.drop_all_local();
            return;
        };
        tags.learn(tag, stamp);
        // Fences the fills in flight only: L1 keeps the entries of other tags.
        self.fences.lock().invalidate_all();
        for key in tags.take_keys(tag) {
            self.drop_local(&key, None);
        }
    }

    /// [`FlagCache::invalidate_tag`](super::FlagCache::invalidate_tag).
    pub(super) async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        let key = stamp_key(tag)?;
        let stamp = now_ms();
        self.apply_tag(tag, stamp);
        let entry = Entry {
            version: Version::new(stamp),
            stamp_ms: stamp,
            payload: self.store.codec().encode_value(&())?,
        };
        // Outlives every entry written before it (their TTL is at most the L2 TTL and
        // its jitter).
        let ttl = self.cfg.l2_ttl * 2;
        let stored = self
            .l2_call("put", Access::Write, Some(&key), |_| {
                self.store.put(&key, &entry, ttl)
            })
            .await;
        let published = self.publish(Invalidation::tag(tag)).await;
        stored.map(drop).and(published)
    }
}
