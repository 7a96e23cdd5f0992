//! The in-process tier: decoded values with their deadlines, and the version fences
//! that keep late fills out of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::{FlagKey, Version};

/// The clock L1 deadlines are read with: one calibrated TSC clock per process (a
/// monotonic OS clock where no stable TSC exists), cloned into each cache. Reading it
/// costs a few nanoseconds, where `std::time::Instant::now` costs tens on common
/// virtual machines — and calling it through a held `Clock` skips the global clock's
/// lookup, which is most of `quanta::Instant::now`'s cost.
pub(crate) fn clock() -> quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new).clone()
}

/// One L1 entry, stored inline in the L1 map: an L1 hit copies it out, which bumps one
/// reference count (the value's) and copies nothing else — no allocation, no decoding.
/// The value moves out of the copy to the caller.
///
/// Deadlines are read with [`clock`].
pub(crate) struct Slot<T> {
    /// `None`: the source said the flag does not exist (a negative entry).
    pub value: Option<Arc<T>>,
    pub version: Version,
    pub filled_at: quanta::Instant,
    /// Served as fresh until then.
    pub fresh_until: quanta::Instant,
    /// Served while one background refresh runs until then (stale-while-revalidate).
    pub stale_until: quanta::Instant,
    /// Served as a fail-safe answer, without retrying L2 and the loader, until then
    /// (set when a fill failed and this entry was served instead).
    pub retry_after: quanta::Instant,
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
            retry_after: self.retry_after,
            epoch: self.epoch,
            cost: self.cost,
        }
    }
}

/// Which keys have a background refresh running, so a stale hit decides without a lock
/// whether to start one: a fixed table of flags indexed by a hash of the key. Two keys
/// sharing a flag only means one waits for the other's refresh to finish before its
/// own starts; meanwhile it is served stale, as it would be anyway.
pub(crate) struct Refreshing {
    flags: Arc<[AtomicBool]>,
}

/// A claimed refresh flag; dropping it (the refresh finished, failed, panicked or never
/// started) releases the flag.
pub(crate) struct RefreshClaim {
    flags: Arc<[AtomicBool]>,
    index: usize,
}

impl Refreshing {
    const FLAGS: usize = 1024;

    pub fn new() -> Self {
        Refreshing {
            flags: (0..Self::FLAGS).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Claims `key`'s flag, unless a refresh holding it is running.
    pub fn claim(&self, key: &FlagKey) -> Option<RefreshClaim> {
        // FNV-1a: the table only needs spread, not resistance to crafted keys.
        let hash = key
            .as_str()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        // The modulo keeps the index below FLAGS, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let index = (hash % Self::FLAGS as u64) as usize;
        let flag = self.flags.get(index)?;
        if flag.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(RefreshClaim {
            flags: self.flags.clone(),
            index,
        })
    }
}

impl Drop for RefreshClaim {
    fn drop(&mut self) {
        if let Some(flag) = self.flags.get(self.index) {
            flag.store(false, Ordering::Release);
        }
    }
}

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

    /// Whether a value of `key` at `version`, read by a fill that started at `start`,
    /// may be installed (or written back, or served as a fallback): no invalidation of
    /// the key — or of everything — landed since `start` unless it announced `version`
    /// or older, and no invalidation ever announced a newer version.
    ///
    /// `version` is `None` for a negative result (the source has no such flag): it is
    /// not held to announced versions — the flag may have been deleted since — but it is
    /// fenced by time like any fill.
    pub fn admits(&self, key: &FlagKey, start: u64, version: Option<Version>) -> bool {
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
