//! The in-process tier: decoded values with their deadlines, and the version fences
//! that keep late fills out of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::{FlagKey, Version};

/// One L1 entry. Cloning it (what an L1 hit does) copies a few words and bumps one
/// reference count: no allocation, no decoding.
pub(crate) struct Slot<T> {
    /// `None`: the source said the flag does not exist (a negative entry).
    pub value: Option<Arc<T>>,
    pub version: Version,
    pub filled_at: Instant,
    /// Served as fresh until then.
    pub fresh_until: Instant,
    /// Served while one background refresh runs until then (stale-while-revalidate).
    pub stale_until: Instant,
    /// The resync epoch it was filled in: older entries are unverified.
    pub epoch: u64,
    /// How long the fill took (XFetch's delta).
    pub cost: Duration,
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot {
            value: self.value.clone(),
            version: self.version,
            filled_at: self.filled_at,
            fresh_until: self.fresh_until,
            stale_until: self.stale_until,
            epoch: self.epoch,
            cost: self.cost,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Fence {
    seq: u64,
    min_version: Option<Version>,
    at: Instant,
}

/// Version fences. Every invalidation takes a sequence number; every fill notes the
/// sequence number when it starts. A fill may install its value into L1 only if no
/// invalidation of its key (or of everything) landed since it started — unless its
/// version is at least the one the invalidation announced.
///
/// Fences are checked and L1 is written under one lock, which invalidations also take,
/// so no invalidation can slip between a fill's check and its install. L1 *hits* never
/// take it.
pub(crate) struct Fences {
    seq: AtomicU64,
    all_seq: AtomicU64,
    by_key: Mutex<HashMap<FlagKey, Fence>>,
    keep_for: Duration,
}

pub(crate) struct FenceGuard<'a> {
    fences: &'a Fences,
    map: MutexGuard<'a, HashMap<FlagKey, Fence>>,
}

impl Fences {
    /// `keep_for`: how long a key's fence outlives its invalidation — at least as long
    /// as a fill can run, and as long as L2 can still hold the invalidated version.
    pub fn new(keep_for: Duration) -> Self {
        Fences {
            seq: AtomicU64::new(0),
            all_seq: AtomicU64::new(0),
            by_key: Mutex::new(HashMap::new()),
            keep_for,
        }
    }

    /// The sequence number a fill starts at.
    pub fn begin(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    pub fn lock(&self) -> FenceGuard<'_> {
        FenceGuard {
            fences: self,
            map: self.by_key.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }
}

impl FenceGuard<'_> {
    /// Records an invalidation of `key` that announced `version` (if any).
    pub fn invalidate(&mut self, key: &FlagKey, version: Option<Version>) {
        let seq = self.fences.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let now = Instant::now();
        if self.map.len() >= 1024 {
            let keep = self.fences.keep_for;
            self.map.retain(|_, f| now.duration_since(f.at) < keep);
        }
        let min_version = self.map.get(key).and_then(|f| f.min_version).max(version);
        self.map.insert(
            key.clone(),
            Fence {
                seq,
                min_version,
                at: now,
            },
        );
    }

    /// Records an invalidation of everything.
    pub fn invalidate_all(&mut self) {
        let seq = self.fences.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.fences.all_seq.store(seq, Ordering::SeqCst);
    }

    /// The lowest version an invalidation of `key` announced: anything older is known
    /// to be stale, wherever it comes from.
    pub fn min_version(&self, key: &FlagKey) -> Option<Version> {
        self.map
            .get(key)
            .filter(|f| f.at.elapsed() < self.fences.keep_for)
            .and_then(|f| f.min_version)
    }

    /// Whether a fill of `key` at `version` that started at `start` may install.
    pub fn admits(&self, key: &FlagKey, start: u64, version: Version) -> bool {
        if self.fences.all_seq.load(Ordering::SeqCst) > start {
            return false;
        }
        match self.map.get(key) {
            Some(f) if f.seq > start => f.min_version.is_some_and(|m| version >= m),
            _ => true,
        }
    }
}
