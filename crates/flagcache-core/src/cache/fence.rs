//! Version fences: what keeps a fill that began before an invalidation from installing
//! its older value after it.
//!
//! Every invalidation takes a sequence number; every fill takes a [`FenceTicket`] (the
//! sequence number when it starts). A fill may install its value into L1 only if no
//! invalidation of its key (or of everything) landed since its ticket — unless its
//! version is at least the one the invalidation announced.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::{FlagKey, Version};

/// When a fill began, in the fences' sequence: the invalidations it must respect are
/// the ones numbered after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct FenceTicket(u64);

#[derive(Debug, Clone, Copy)]
struct Fence {
    /// The sequence number of the latest invalidation of the key.
    seq: u64,
    /// The version that latest invalidation announced: a fill that started before it
    /// may still install if it is at least this new. `None`: no earlier fill may.
    admit_from: Option<Version>,
    /// The highest version any invalidation of the key announced: anything older is
    /// known to be stale, whenever the fill started.
    announced: Option<Version>,
    at: Instant,
}

/// The fences of one cache (see the module's comment).
///
/// Fences are checked and L1 is written under one lock, which invalidations also take,
/// so no invalidation can slip between a fill's check and its install. L1 *hits* never
/// take it.
pub(crate) struct Fences {
    seq: AtomicU64,
    all_seq: AtomicU64,
    by_key: Mutex<Map>,
    keep_for: Duration,
}

struct Map {
    /// foldhash: a fast keyed hash (per-process random seed); the map is on every fill.
    fences: HashMap<FlagKey, Fence, foldhash::fast::RandomState>,
    /// Expired fences are swept when the map reaches this size; it doubles when a
    /// sweep frees little, so sweeping stays amortised O(1) per invalidation.
    sweep_at: usize,
}

pub(crate) struct FenceGuard<'a> {
    fences: &'a Fences,
    map: MutexGuard<'a, Map>,
}

impl Fences {
    /// `keep_for`: how long a key's fence outlives its invalidation — at least as long
    /// as a fill can run, and as long as L2 can still hold the invalidated version.
    pub fn new(keep_for: Duration) -> Self {
        Fences {
            seq: AtomicU64::new(0),
            all_seq: AtomicU64::new(0),
            by_key: Mutex::new(Map {
                fences: HashMap::default(),
                sweep_at: 1024,
            }),
            keep_for,
        }
    }

    /// The ticket of a fill that starts now.
    pub fn begin(&self) -> FenceTicket {
        FenceTicket(self.seq.load(Ordering::SeqCst))
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
        let map = &mut *self.map;
        if map.fences.len() >= map.sweep_at {
            let keep = self.fences.keep_for;
            map.fences.retain(|_, f| now.duration_since(f.at) < keep);
            map.sweep_at = (map.fences.len() * 2).max(1024);
        }
        let announced = map.fences.get(key).and_then(|f| f.announced).max(version);
        map.fences.insert(
            key.clone(),
            Fence {
                seq,
                admit_from: version,
                announced,
                at: now,
            },
        );
    }

    /// Records an invalidation of everything.
    pub fn invalidate_all(&mut self) {
        let seq = self.fences.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.fences.all_seq.store(seq, Ordering::SeqCst);
    }

    /// The highest version an invalidation of `key` announced: anything older is known
    /// to be stale, wherever it comes from.
    pub fn announced(&self, key: &FlagKey) -> Option<Version> {
        self.map
            .fences
            .get(key)
            .filter(|f| f.at.elapsed() < self.fences.keep_for)
            .and_then(|f| f.announced)
    }

    /// Whether a value of `key` at `version`, read by a fill holding `ticket`,
    /// may be installed (or written back, or served as a fallback): no invalidation of
    /// the key — or of everything — landed since the ticket unless it announced `version`
    /// or older, and no invalidation ever announced a newer version.
    ///
    /// `version` is `None` for a negative result (the source has no such flag): it is
    /// not held to announced versions — the flag may have been deleted since — but it is
    /// fenced by time like any fill.
    pub fn admits(&self, key: &FlagKey, ticket: FenceTicket, version: Option<Version>) -> bool {
        let FenceTicket(start) = ticket;
        if self.fences.all_seq.load(Ordering::SeqCst) > start {
            return false;
        }
        if let (Some(v), Some(a)) = (version, self.announced(key)) {
            if v < a {
                return false;
            }
        }
        match self.map.fences.get(key) {
            Some(f) if f.seq > start => match (version, f.admit_from) {
                (Some(v), Some(m)) => v >= m,
                _ => false,
            },
            _ => true,
        }
    }
}
