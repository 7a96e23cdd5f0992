//! The in-process tier (L1): decoded values with their deadlines — looked up, installed
//! behind the version fences, and dropped.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::fence::FenceTicket;
use super::stats::Ev;
use super::{CacheStatus, Inner, StaleReason};
use crate::{Entry, FlagKey, Result, Version};

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
pub(crate) struct L1Entry<T> {
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

impl<T> Clone for L1Entry<T> {
    fn clone(&self) -> Self {
        L1Entry {
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

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The common case of [`Self::lookup_l1`] alone, for inlining: a fresh L1 entry,
    /// no evaluation hook and no early refresh due. `None` means "ask
    /// [`Self::lookup_l1`]", not "absent".
    #[inline(always)]
    pub(super) fn fresh_hit(&self, key: &FlagKey) -> Option<Option<Arc<T>>> {
        if !self.plain_hits || self.deaf.load(Ordering::Relaxed) {
            return None;
        }
        let slot = self.l1.get(key)?;
        if slot.epoch != self.epoch.load(Ordering::Relaxed) || self.clock.now() >= slot.fresh_until
        {
            return None;
        }
        self.tel.bump(Ev::HitL1);
        Some(slot.value)
    }

    /// The L1 part of a read: `Ok(answer(slot, status))` when L1 answers (fresh, or
    /// stale while one refresh runs), else `Err` with the fail-safe fallback L1 holds,
    /// if any.
    #[allow(clippy::type_complexity)]
    #[inline]
    pub(super) fn lookup_l1<R>(
        self: &Arc<Self>,
        key: &FlagKey,
        answer: impl FnOnce(L1Entry<T>, CacheStatus) -> R,
    ) -> std::result::Result<R, Option<(L1Entry<T>, FenceTicket)>> {
        let mut fallback = None;
        if self.cfg.l1_enabled && !self.deaf.load(Ordering::Relaxed) {
            if let Some(slot) = self.l1.get(key) {
                if slot.epoch == self.epoch.load(Ordering::Relaxed) {
                    let now = self.clock.now();
                    if now < slot.fresh_until {
                        if self.cfg.xfetch_beta > 0.0 && self.xfetch_due(&slot, now) {
                            self.refresh_in_background(key);
                        }
                        self.tel.bump(Ev::HitL1);
                        return Ok(answer(slot, CacheStatus::HitL1));
                    }
                    if now < slot.stale_until {
                        self.refresh_in_background(key);
                        self.tel.bump(Ev::StaleRevalidating);
                        let status = CacheStatus::Stale(StaleReason::Revalidating);
                        return Ok(answer(slot, status));
                    }
                }
                fallback = Some((slot, self.fences.begin()));
            }
        } else if self.cfg.l1_enabled {
            // Not subscribed: L1 cannot be trusted as fresh, only as a fallback.
            fallback = self.l1.get(key).map(|slot| (slot, self.fences.begin()));
        }
        match fallback {
            // A fail-safe answer given moments ago: serve it again rather than retry
            // L2 and the loader on every read while they are down.
            Some((slot, _)) if self.clock.now() < slot.retry_after => {
                self.tel.bump(Ev::StaleFailSafe);
                Ok(answer(slot, CacheStatus::Stale(StaleReason::FailSafe)))
            }
            other => Err(other),
        }
    }

    /// After a fail-safe answer, keeps serving that value without retrying until
    /// `fail_safe_throttle` has passed — unless the entry was replaced or invalidated
    /// meanwhile.
    pub(super) fn throttle_retries(&self, key: &FlagKey, served: &L1Entry<T>, seen: FenceTicket) {
        if self.cfg.fail_safe_throttle.is_zero() {
            return;
        }
        let fences = self.fences.lock();
        let version = served.value.as_ref().map(|_| served.version);
        let same = self
            .l1
            .peek(key)
            .is_some_and(|cur| cur.filled_at == served.filled_at && cur.version == served.version);
        if same && fences.admits(key, seen, version) {
            let mut throttled = served.clone();
            throttled.retry_after = self.clock.now() + self.cfg.fail_safe_throttle;
            self.l1.insert(key.clone(), throttled);
        }
    }

    pub(super) fn new_l1_entry(
        &self,
        value: Option<Arc<T>>,
        version: Version,
        cost: Duration,
    ) -> L1Entry<T> {
        let now = self.clock.now();
        let (fresh, stale) = if value.is_some() {
            (self.cfg.jittered(self.cfg.fresh_for), self.cfg.stale_for)
        } else {
            (self.cfg.negative_ttl, Duration::ZERO)
        };
        L1Entry {
            value,
            version,
            filled_at: now,
            fresh_until: now + fresh,
            stale_until: now + fresh + stale,
            retry_after: now,
            epoch: self.epoch.load(Ordering::SeqCst),
            cost,
        }
    }

    /// Installs a fill into L1 unless a fence refuses it (an invalidation landed since
    /// the fill started) or L1 already holds a newer version.
    pub(super) fn install(&self, key: &FlagKey, slot: &L1Entry<T>, start: FenceTicket) -> bool {
        if !self.cfg.l1_enabled {
            return false;
        }
        let fences = self.fences.lock();
        let version = slot.value.as_ref().map(|_| slot.version);
        if !fences.admits(key, start, version) {
            tracing::debug!(cache = %self.cfg.name, %key, version = %slot.version,
                "fill refused: an invalidation landed while it ran");
            self.tel.bump(Ev::FencedFill);
            return false;
        }
        if slot.value.is_some() {
            let epoch = self.epoch.load(Ordering::SeqCst);
            if let Some(cur) = self.l1.peek(key) {
                if cur.value.is_some() && cur.epoch == epoch && cur.version > slot.version {
                    return false;
                }
            }
        }
        self.l1.insert(key.clone(), slot.clone());
        self.index_tags(key, slot.value.as_deref());
        true
    }

    /// Decodes an L2 entry into an L1 slot and installs it, unless a fence refuses it.
    /// `stale`: a value another process is reloading — held as stale, never fresh.
    ///
    /// # Errors
    /// The codec's, when the payload does not decode.
    pub(super) fn install_entry(
        &self,
        key: &FlagKey,
        entry: &Entry,
        start: FenceTicket,
        began: quanta::Instant,
        stale: bool,
    ) -> Result<L1Entry<T>> {
        let value = self.store.codec().decode_value::<T>(&entry.payload)?;
        let mut slot = self.new_l1_entry(
            Some(Arc::new(value)),
            entry.version,
            self.clock.now().saturating_duration_since(began),
        );
        if stale {
            let now = self.clock.now();
            slot.fresh_until = now;
            slot.stale_until = now + self.cfg.stale_for.max(Duration::from_secs(1));
        }
        self.install(key, &slot, start);
        Ok(slot)
    }

    /// A "no such flag" answer for `key`, installed in L1 (fences permitting).
    pub(super) fn install_absent(
        &self,
        key: &FlagKey,
        start: FenceTicket,
        began: quanta::Instant,
    ) -> L1Entry<T> {
        let cost = self.clock.now().saturating_duration_since(began);
        let slot = self.new_l1_entry(None, Version::default(), cost);
        self.install(key, &slot, start);
        slot
    }

    /// Installs a value this replica wrote itself, fencing out older fills in flight.
    pub(super) fn install_authoritative(&self, key: &FlagKey, slot: L1Entry<T>) {
        let mut fences = self.fences.lock();
        fences.invalidate(key, Some(slot.version));
        self.fills.forget(key);
        if !self.cfg.l1_enabled {
            return;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let newer_held = self.l1.peek(key).is_some_and(|cur| {
            cur.value.is_some() && cur.epoch == epoch && cur.version > slot.version
        });
        if !newer_held {
            self.index_tags(key, slot.value.as_deref());
            self.l1.insert(key.clone(), slot);
        }
    }

    pub(super) fn drop_older_than(&self, key: &FlagKey, current: Version) {
        let mut fences = self.fences.lock();
        fences.invalidate(key, Some(current));
        self.l1
            .remove_if(key, |s| s.value.is_none() || s.version < current);
        self.fills.forget(key);
    }

    /// Drops `key` from L1 unless L1 already holds `at_least` or newer, and fences out
    /// fills that started before now.
    pub(super) fn drop_local(&self, key: &FlagKey, at_least: Option<Version>) {
        let mut fences = self.fences.lock();
        fences.invalidate(key, at_least);
        self.l1.remove_if(key, |s| match at_least {
            Some(v) => s.value.is_none() || s.version < v,
            None => true,
        });
        // Still under the fence lock: nobody can join the old fill in between.
        self.fills.forget(key);
    }

    pub(super) fn drop_all_local(&self) {
        let mut fences = self.fences.lock();
        fences.invalidate_all();
        self.l1.clear();
        self.fills.forget_all();
    }
}
