//! Version fences: what keeps a fill that began before an invalidation from installing
//! its older value after it.
//!
//! Every invalidation takes a sequence number; every fill takes a [`FenceTicket`] (the
//! sequence number when it starts). A fill may install its value into L1 only if no
//! invalidation of its key (or of everything) landed since its ticket — unless its
//! version is at least the one the invalidation announced.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// How many keys `by_key` holds, kept in step under its lock, and when the newest
    /// of their fences was set (on the cache clock's millisecond base): a fill checks
    /// these before taking the lock, which it does not need while no fence is younger
    /// than `keep_for`.
    keyed: AtomicUsize,
    newest_ms: AtomicU64,
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
            keyed: AtomicUsize::new(0),
            newest_ms: AtomicU64::new(0),
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

    /// [`FenceGuard::announced`], without the lock while no key has a fence younger
    /// than `keep_for` (`announced` ignores older ones). `now_ms` is the cache clock's
    /// [`Clock::ms`](super::clock::Clock::ms), which may be a tick behind: the lock is
    /// then taken a tick longer than needed, never shorter. A fence set just after the
    /// check is one set after the call: the same answer the lock would give a moment
    /// later.
    pub fn announced(&self, key: &FlagKey, now_ms: u64) -> Option<Version> {
        if self.keyed.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let newest = self.newest_ms.load(Ordering::SeqCst);
        let keep_ms = u64::try_from(self.keep_for.as_millis()).unwrap_or(u64::MAX);
        if now_ms.saturating_sub(newest) > keep_ms {
            return None;
        }
        self.lock().announced(key)
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
        self.fences.keyed.store(map.fences.len(), Ordering::SeqCst);
        self.fences
            .newest_ms
            .store(super::clock::precise_ms(), Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::super::clock::precise_ms;
    use super::*;

    fn key(s: &str) -> FlagKey {
        FlagKey::new(s).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn announced_without_the_lock_agrees_with_it() {
        let fences = Fences::new(Duration::from_secs(60));
        let (a, b) = (key("a"), key("b"));
        // No fence at all: the lock-free path answers.
        assert_eq!(fences.announced(&a, precise_ms()), None);
        fences.lock().invalidate(&a, Some(Version::new(7)));
        // A recent fence: the key's announced version, and nothing for other keys.
        assert_eq!(fences.announced(&a, precise_ms()), Some(Version::new(7)));
        assert_eq!(fences.lock().announced(&a), Some(Version::new(7)));
        assert_eq!(fences.announced(&b, precise_ms()), None);
        // A versionless invalidation keeps the version announced before it.
        fences.lock().invalidate(&a, None);
        assert_eq!(fences.announced(&a, precise_ms()), Some(Version::new(7)));
        // A clock reading a little behind the fence's time still sees it.
        assert_eq!(
            fences.announced(&a, precise_ms().saturating_sub(20)),
            Some(Version::new(7))
        );
    }

    #[test]
    fn fences_older_than_keep_for_announce_nothing() {
        let fences = Fences::new(Duration::from_secs(1));
        let a = key("a");
        fences.lock().invalidate(&a, Some(Version::new(3)));
        assert_eq!(fences.announced(&a, precise_ms()), Some(Version::new(3)));
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(fences.announced(&a, precise_ms()), None);
        assert_eq!(fences.lock().announced(&a), None);
        // A new fence is seen again at once.
        fences.lock().invalidate(&a, Some(Version::new(4)));
        assert_eq!(fences.announced(&a, precise_ms()), Some(Version::new(4)));
    }
}
