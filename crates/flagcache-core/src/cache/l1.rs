//! The in-process tier (L1): decoded values with their deadlines — looked up, installed
//! behind the version fences, and dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::clock::{Clock, Tick};
use super::fence::FenceTicket;
use super::l1map;
use super::stats::Ev;
use super::{CacheStatus, Inner, StaleReason};
use crate::{Entry, FlagKey, Result, Version};

/// One L1 entry, stored inline in the map of whole entries: the paths past a fresh hit
/// copy it out, which bumps one reference count (the value's) and copies nothing else —
/// no allocation, no decoding.
///
/// Times are [`Tick`]s of the cache's [`Clock`]. A fresh hit reads a 16-byte summary
/// of it instead (see [`l1map`]).
pub(crate) struct L1Entry<T> {
    /// `None`: the source said the flag does not exist (a negative entry).
    pub value: Option<Arc<T>>,
    pub version: Version,
    /// Served as fresh until then.
    pub fresh_until: Tick,
    pub filled_at: Tick,
    /// Served while one background refresh runs until then (stale-while-revalidate).
    pub stale_until: Tick,
    /// Served as a fail-safe answer, without retrying L2 and the loader, until then
    /// (set when a fill failed and this entry was served instead).
    pub retry_after: Tick,
    /// The resync epoch it was filled in (its low 32 bits): older entries are
    /// unverified. Compared for equality only, so wrapping is harmless.
    pub epoch: u32,
    /// How long the fill took (XFetch's delta), in microseconds, saturating.
    pub cost_us: u32,
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
            cost_us: self.cost_us,
        }
    }
}

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The resync epoch, as L1 entries record it (its low 32 bits).
    #[inline(always)]
    pub(super) fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::SeqCst) as u32
    }

    /// The common case of [`Self::lookup_l1`] alone, for inlining: a fresh L1 entry,
    /// no evaluation hook and no early refresh due. `None` means "ask
    /// [`Self::lookup_l1`]", not "absent".
    #[inline(always)]
    pub(super) fn fresh_hit(&self, key: &FlagKey) -> Option<Option<Arc<T>>> {
        if !self.plain_hits || self.deaf.load(Ordering::Relaxed) {
            return None;
        }
        let slot = self.l1.hot(key)?;
        if !l1map::fresh(slot.stamp, self.clock.recent_ms(), self.epoch()) {
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
                if slot.epoch == self.epoch() {
                    let now = self.clock.ticks();
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
            Some((slot, _)) if self.clock.ticks() < slot.retry_after => {
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
            throttled.retry_after = Clock::after(self.clock.ticks(), self.cfg.fail_safe_throttle);
            self.l1.insert(key, throttled);
        }
    }

    pub(super) fn new_l1_entry(
        &self,
        value: Option<Arc<T>>,
        version: Version,
        cost: Duration,
    ) -> L1Entry<T> {
        let now = self.clock.ticks();
        let (fresh, stale) = if value.is_some() {
            (self.cfg.jittered(self.cfg.fresh_for), self.cfg.stale_for)
        } else {
            (self.cfg.negative_ttl, Duration::ZERO)
        };
        let fresh_until = Clock::after(now, fresh);
        L1Entry {
            value,
            version,
            filled_at: now,
            fresh_until,
            stale_until: Clock::after(fresh_until, stale),
            retry_after: now,
            epoch: self.epoch(),
            cost_us: u32::try_from(cost.as_micros()).unwrap_or(u32::MAX),
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
            let epoch = self.epoch();
            if let Some(cur) = self.l1.peek(key) {
                if cur.value.is_some() && cur.epoch == epoch && cur.version > slot.version {
                    return false;
                }
            }
        }
        self.l1.insert(key, slot.clone());
        // Indexed under the fence lock: a tag invalidation fences first, then takes
        // the tag's keys, so it either refuses this fill or finds this key.
        let prune = self.index_tags(key, slot.value.as_deref());
        drop(fences);
        if prune {
            self.prune_tags();
        }
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
            // Never fresh: the deadline is the fill's own time (see `L1Map::insert`).
            slot.fresh_until = slot.filled_at;
            slot.stale_until = Clock::after(
                self.clock.ticks(),
                self.cfg.stale_for.max(Duration::from_secs(1)),
            );
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
        let epoch = self.epoch();
        let newer_held = self.l1.peek(key).is_some_and(|cur| {
            cur.value.is_some() && cur.epoch == epoch && cur.version > slot.version
        });
        if !newer_held {
            let value = slot.value.clone();
            self.l1.insert(key, slot);
            let prune = self.index_tags(key, value.as_deref());
            drop(fences);
            if prune {
                self.prune_tags();
            }
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
