//! L1's storage: a map of 16-byte hot slots that a fresh hit reads, beside a map of
//! whole entries that every other path reads.
//!
//! A map read copies the slot out under the shard's lock. A 16-byte slot (the value and
//! one stamp word) comes back in two registers; a whole entry (56 bytes) comes back
//! through memory, which costs a fresh hit more than the rest of its work together. So
//! the hit reads the hot slot alone: its stamp holds the deadline (milliseconds on the
//! coarse clock) and the resync epoch, which is all a fresh hit checks.
//!
//! The two maps hold the same keys. Writers change both under the cache's fence lock,
//! hot slot first. The hot map decides evictions (it sees the hits) and evicting a
//! hot slot removes the whole entry; the whole-entry map has no bound of its own.

use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};

use super::clock::Tick;
use super::l1::L1Entry;
use crate::FlagKey;

/// Bits of the stamp that hold the resync epoch; the rest hold the deadline in
/// milliseconds since the clock's origin (40 bits: 34 years).
const EPOCH_BITS: u32 = 24;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
const MAX_MS: u64 = (1 << (64 - EPOCH_BITS)) - 1;

/// What a fresh hit reads: the value and its stamp (see [`stamp`]).
pub(crate) struct Hot<T> {
    pub value: Option<Arc<T>>,
    pub stamp: u64,
}

impl<T> Clone for Hot<T> {
    #[inline(always)]
    fn clone(&self) -> Self {
        Hot {
            value: self.value.clone(),
            stamp: self.stamp,
        }
    }
}

/// The stamp of an entry fresh until `fresh_until`, filled in resync `epoch`.
#[inline]
pub(crate) fn stamp(fresh_until: Tick, epoch: u32) -> u64 {
    let ms = (fresh_until / 1_000_000).min(MAX_MS);
    (ms << EPOCH_BITS) | (u64::from(epoch) & EPOCH_MASK)
}

/// Whether a slot stamped `stamp` is fresh at `now_ms` (coarse milliseconds) in resync
/// `epoch`. Epochs are compared on their low 24 bits: a slot 16 million resyncs old
/// would have to be still fresh to be taken for a current one.
#[inline(always)]
pub(crate) fn fresh(stamp: u64, now_ms: u64, epoch: u32) -> bool {
    (stamp & EPOCH_MASK) == (u64::from(epoch) & EPOCH_MASK) && now_ms < stamp >> EPOCH_BITS
}

type Whole<T> = Cache<FlagKey, L1Entry<T>, UnitWeighter>;

/// Removes a hot slot's whole entry when the hot map evicts the slot — or replaces it:
/// the map reports both alike.
struct Evict<T>(Arc<Whole<T>>);

impl<T> Clone for Evict<T> {
    fn clone(&self) -> Self {
        Evict(self.0.clone())
    }
}

impl<T> Lifecycle<FlagKey, Hot<T>> for Evict<T> {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), key: FlagKey, _: Hot<T>) {
        self.0.remove(&key);
    }
}

/// The two maps (see the module's documentation).
pub(crate) struct L1Map<T> {
    hot: Cache<FlagKey, Hot<T>, UnitWeighter, DefaultHashBuilder, Evict<T>>,
    whole: Arc<Whole<T>>,
}

impl<T> L1Map<T> {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // Never full: it holds the keys the hot map holds, whose evictions remove
        // them. (A bound of its own would evict per shard, by a recency it does not
        // see, and take the hottest keys' stale and fail-safe answers with it.)
        let whole = Arc::new(Cache::with(
            capacity,
            u64::MAX / 2,
            UnitWeighter,
            DefaultHashBuilder::default(),
            quick_cache::sync::DefaultLifecycle::default(),
        ));
        let hot = Cache::with(
            capacity,
            capacity as u64,
            UnitWeighter,
            DefaultHashBuilder::default(),
            Evict(whole.clone()),
        );
        L1Map { hot, whole }
    }

    /// The hot slot of `key`, for a fresh hit.
    #[inline(always)]
    pub fn hot(&self, key: &FlagKey) -> Option<Hot<T>> {
        self.hot.get(key)
    }

    /// The whole entry of `key` (a read: counts as a use for eviction).
    pub fn get(&self, key: &FlagKey) -> Option<L1Entry<T>> {
        let entry = self.whole.get(key)?;
        // Keep the hot map's recency truthful for keys read past the fresh path.
        let _ = self.hot.get(key);
        Some(entry)
    }

    /// The whole entry of `key`, without counting a use.
    pub fn peek(&self, key: &FlagKey) -> Option<L1Entry<T>> {
        self.whole.peek(key)
    }

    /// Stores `entry` as `key`'s. Call under the fence lock.
    pub fn insert(&self, key: &FlagKey, entry: L1Entry<T>) {
        // An entry never fresh (held as stale, or a negative entry with no TTL) gets a
        // deadline of 0: the coarse clock's lag must not make it fresh for a tick.
        let deadline = if entry.fresh_until <= entry.filled_at {
            0
        } else {
            entry.fresh_until
        };
        let hot = Hot {
            value: entry.value.clone(),
            stamp: stamp(deadline, entry.epoch),
        };
        // The hot map reports a replaced slot as evicted, which removes the whole
        // entry: so the hot slot goes first.
        self.hot.insert(key.clone(), hot);
        self.whole.insert(key.clone(), entry);
        // A map too small to admit the slot reports it as evicted at once: then the
        // whole entry must not stay either.
        if self.hot.peek(key).is_none() {
            self.whole.remove(key);
        }
    }

    /// Removes `key` when its whole entry satisfies `drop`, or when only its hot slot
    /// is left. Call under the fence lock.
    pub fn remove_if(&self, key: &FlagKey, drop: impl FnOnce(&L1Entry<T>) -> bool) {
        match self.whole.peek(key) {
            Some(entry) if !drop(&entry) => {}
            _ => {
                self.whole.remove(key);
                self.hot.remove(key);
            }
        }
    }

    pub fn clear(&self) {
        self.hot.clear();
        self.whole.clear();
    }

    pub fn len(&self) -> usize {
        self.hot.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Version;

    fn entry(version: u64) -> L1Entry<u64> {
        L1Entry {
            value: Some(Arc::new(version)),
            version: Version::new(version),
            fresh_until: 10_000_000_000,
            filled_at: 0,
            stale_until: 10_000_000_000,
            retry_after: 0,
            epoch: 0,
            cost_us: 0,
        }
    }

    fn key(i: usize) -> FlagKey {
        FlagKey::new(format!("k{i}")).unwrap()
    }

    #[test]
    fn a_replaced_entry_keeps_its_whole_entry() {
        let map = L1Map::new(100);
        map.insert(&key(1), entry(1));
        map.insert(&key(1), entry(2));
        let hot = map.hot(&key(1)).unwrap();
        assert_eq!(hot.value.as_deref(), Some(&2));
        assert_eq!(map.get(&key(1)).unwrap().version, Version::new(2));
    }

    #[test]
    fn evicting_a_hot_slot_drops_its_whole_entry() {
        let map = L1Map::new(50);
        for i in 0..2_000 {
            map.insert(&key(i), entry(i as u64));
        }
        assert!(map.len() <= 60, "the hot map holds {}", map.len());
        let mut whole_only = 0;
        for i in 0..2_000 {
            let whole = map.peek(&key(i));
            if let Some(e) = &whole {
                assert_eq!(e.version, Version::new(i as u64));
            }
            if whole.is_some() && map.hot(&key(i)).is_none() {
                whole_only += 1;
            }
        }
        assert_eq!(whole_only, 0, "whole entries outlived their hot slots");
        let hot_only = (0..2_000)
            .filter(|&i| map.hot(&key(i)).is_some() && map.peek(&key(i)).is_none())
            .count();
        assert_eq!(hot_only, 0, "the whole-entry map evicted on its own");
    }

    #[test]
    fn an_entry_never_fresh_is_not_fresh_on_the_hot_path() {
        let map = L1Map::new(100);
        let mut held_stale = entry(1);
        held_stale.filled_at = 5_000_000_000;
        held_stale.fresh_until = held_stale.filled_at;
        map.insert(&key(1), held_stale);
        let hot = map.hot(&key(1)).unwrap();
        // Even with the coarse clock a tick (or many) behind the fill.
        assert!(!fresh(hot.stamp, 4_990, 0));
        assert!(!fresh(hot.stamp, 0, 0));
    }

    #[test]
    fn removal_drops_a_hot_slot_whose_whole_entry_is_gone() {
        let map = L1Map::new(100);
        map.insert(&key(1), entry(1));
        map.whole.remove(&key(1));
        map.remove_if(&key(1), |_| false);
        assert!(map.hot(&key(1)).is_none());
        map.insert(&key(2), entry(2));
        map.remove_if(&key(2), |e| e.version < Version::new(2));
        assert!(map.hot(&key(2)).is_some(), "kept: the condition refused");
        map.remove_if(&key(2), |e| e.version < Version::new(3));
        assert!(map.hot(&key(2)).is_none() && map.peek(&key(2)).is_none());
    }

    #[test]
    fn a_stamp_is_fresh_before_its_deadline_in_its_epoch_only() {
        let s = stamp(5_000_000_000, 7); // 5 s
        assert!(fresh(s, 4_999, 7));
        assert!(!fresh(s, 5_000, 7));
        assert!(!fresh(s, 10, 8));
        assert!(!fresh(s, 10, 6));
        assert!(fresh(s, 10, 7 + (1 << 24)), "epochs compare on 24 bits");
        assert!(
            fresh(stamp(u64::MAX, 1), MAX_MS - 1, 1),
            "deadlines saturate"
        );
    }
}
