//! The read path past L1: one coalesced fill per key — L2, then the loader (through the
//! cross-process coalescer when there is one) — and what a failed fill falls back to.

use std::sync::Arc;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use super::fence::FenceTicket;
use super::l1::L1Entry;
use super::l2::Access;
use super::stats::{seconds, Ev};
use super::{CacheStatus, Inner, Lookup, StaleReason};
use crate::{
    now_ms, Coalesced, Entry, Error, FillToken, FlagKey, Lease, LoadOutcome, PutOutcome, Result,
    Turn, Version,
};

/// Where a fill found its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tier {
    L2,
    Loader,
    /// A value the fleet holds as stale, served while another process refreshes it.
    StaleL2,
}

/// A fill's answer: the L1 entry it made, and where its value came from.
pub(super) type Filled<T> = (L1Entry<T>, Tier);

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A read: answered from L1 without awaiting anything when it can be; otherwise
    /// through the (boxed) miss path, so the future of a hit stays small.
    pub(super) async fn lookup(self: &Arc<Self>, key: &FlagKey) -> Result<Lookup<T>> {
        match self.lookup_l1(key, Lookup::from_l1) {
            Ok(hit) => Ok(hit),
            Err(fallback) => Box::pin(self.lookup_miss(key, fallback)).await,
        }
    }

    pub(super) async fn lookup_miss(
        self: &Arc<Self>,
        key: &FlagKey,
        fallback: Option<(L1Entry<T>, FenceTicket)>,
    ) -> Result<Lookup<T>> {
        match self.fetch(key).await {
            Ok((slot, tier)) => {
                let (ev, status) = match tier {
                    Tier::L2 => (Ev::HitL2, CacheStatus::HitL2),
                    Tier::Loader => (Ev::Miss, CacheStatus::Miss),
                    Tier::StaleL2 => (
                        Ev::StaleRevalidating,
                        CacheStatus::Stale(StaleReason::Revalidating),
                    ),
                };
                self.tel.bump(ev);
                Ok(Lookup::from_l1(slot, status))
            }
            Err(e) => {
                // Never fall back to a value invalidated while the fetch ran.
                let usable = fallback.filter(|(fb, seen)| {
                    e.is_transient()
                        && self.clock.ticks().saturating_sub(fb.filled_at)
                            <= super::clock::Clock::span(self.cfg.max_staleness)
                        && self.fences.lock().admits(
                            key,
                            *seen,
                            fb.value.as_ref().map(|_| fb.version),
                        )
                });
                match usable {
                    Some((fb, seen)) => {
                        tracing::warn!(cache = %self.cfg.name, %key, error = %e,
                            "serving last known value (fail-safe)");
                        self.throttle_retries(key, &fb, seen);
                        self.tel.bump(Ev::StaleFailSafe);
                        Ok(Lookup::from_l1(
                            fb,
                            CacheStatus::Stale(StaleReason::FailSafe),
                        ))
                    }
                    None => {
                        self.tel.bump(Ev::Error);
                        Err(e)
                    }
                }
            }
        }
    }

    /// One coalesced fill of `key`.
    pub(super) async fn fetch(self: &Arc<Self>, key: &FlagKey) -> Result<Filled<T>> {
        let this = self.clone();
        let k = key.clone();
        let (result, joined) = self
            .fills
            .run_joined(key, move || async move { this.fill(&k).await })
            .await;
        if joined {
            self.tel.bump(Ev::Coalesced);
        }
        result
    }

    pub(super) async fn fill(self: &Arc<Self>, key: &FlagKey) -> Result<Filled<T>> {
        let span = tracing::debug_span!("flagcache.fill", cache = %self.cfg.name, %key);
        async move {
            let start = self.fences.begin();
            let began = self.clock.now();
            let mut read = self.read_l2(key).await;
            let min = self.fences.announced(key, self.clock.ms());
            if let (Some(m), Some(e)) = (min, &read.entry) {
                if e.version < m {
                    // An invalidation announced a newer version than L2 gave us. The
                    // writer usually stores before it publishes: read once more.
                    tracing::debug!(version = %e.version, announced = %m, "L2 older than announced; re-reading");
                    read = self.read_l2(key).await;
                    if read.entry.as_ref().is_some_and(|e| e.version < m) {
                        read.entry = None;
                        read.token = self.fence_token(key).await;
                    }
                }
            }
            let servable = match &read.entry {
                Some(entry) => self.servable(key, entry).await,
                None => false,
            };
            if let (Some(entry), true) = (&read.entry, servable) {
                match self.install_entry(key, entry, start, began, false) {
                    Ok(slot) => return Ok((slot, Tier::L2)),
                    Err(e) => {
                        tracing::warn!(error = %e, "L2 entry does not decode; deleting it");
                        self.tel.bump(Ev::Corrupt);
                        let _ = Box::pin(self.delete_l2(key, Access::Read)).await;
                    }
                }
            }
            if read.entry.is_some() && read.token == FillToken::NONE {
                // An entry read but not served (a tag outdates it, or it did not
                // decode): the load writes, so it needs the key's fence.
                read.token = self.fence_token(key).await;
            }
            // What an entry this fill writes is stamped with: when it began, so that a
            // tag invalidated meanwhile outdates it (see `FlagCache::invalidate_tag`).
            // Worked out here rather than read at the start, which an L2 hit would pay
            // for: the wall clock now, less the time since, less a millisecond for the
            // rounding (an earlier stamp only outdates it sooner).
            // The wall clock first: a pause before the elapsed time is read only
            // makes the stamp earlier.
            let wall_ms = now_ms();
            let since = self.clock.now().saturating_duration_since(began);
            let since_ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
            let began_ms = wall_ms.saturating_sub(since_ms.saturating_add(1));
            // Boxed: the loader's path is the rare one, and inline its state would
            // make every fill's future — moved into the coalescer on each L2 hit —
            // several times larger.
            Box::pin(self.load(key, start, began, read.token, began_ms)).await
        }
        .instrument(span)
        .await
    }

    /// Loads from the source — through the cross-process coalescer when there is one,
    /// so that one process of the fleet loads while the others take its answer. `token`
    /// is the L2 fence the fill read with its miss: the value is written back only
    /// while it is still the key's.
    pub(super) async fn load(
        self: &Arc<Self>,
        key: &FlagKey,
        ticket: FenceTicket,
        began: quanta::Instant,
        token: FillToken,
        began_ms: u64,
    ) -> Result<Filled<T>> {
        let Some(coalescer) = &self.coalescer else {
            return self
                .load_from_source(key, ticket, began, token, began_ms)
                .await
                .map(|l| l.0);
        };
        let lease = match coalescer.acquire(key).await? {
            Turn::Load(lease) => lease,
            Turn::Answered(answer) => {
                if let Some(filled) = self.take_answer(key, answer, ticket, began).await {
                    return Ok(filled);
                }
                // Not usable here: load unguarded (no cross-process coalescing).
                Lease::unguarded()
            }
        };
        let loaded = self
            .load_from_source(key, ticket, began, token, began_ms)
            .await;
        let outcome = match &loaded {
            Ok((_, outcome)) => outcome.clone(),
            Err(e) => LoadOutcome::Failed(e.clone()),
        };
        lease.release(outcome).await;
        loaded.map(|l| l.0)
    }

    /// Installs another process's answer, if it passes the checks an L2 read passes:
    /// no announced newer version, and the version source's version when there is one.
    async fn take_answer(
        &self,
        key: &FlagKey,
        answer: Coalesced,
        ticket: FenceTicket,
        began: quanta::Instant,
    ) -> Option<Filled<T>> {
        match answer {
            Coalesced::Absent => {
                // Another process's answer from the source, as if it were ours.
                self.acceptable_answer(key, None)
                    .await
                    .then(|| (self.install_absent(key, ticket, began), Tier::L2))
            }
            Coalesced::Fresh(None) => None,
            Coalesced::Fresh(Some(entry)) => {
                if !self.acceptable_answer(key, Some(entry.version)).await
                    || !self.servable(key, &entry).await
                {
                    return None;
                }
                let slot = self.install_entry(key, &entry, ticket, began, false).ok()?;
                Some((slot, Tier::L2))
            }
            Coalesced::Stale(entry) if !self.servable(key, &entry).await => None,
            Coalesced::Stale(entry) => {
                // Another process is refreshing it: serve the stale value, held in L1
                // as stale (never as fresh), so that reads keep revalidating until the
                // new value lands.
                let slot = self.install_entry(key, &entry, ticket, began, true).ok()?;
                Some((slot, Tier::StaleL2))
            }
        }
    }

    /// Whether an answer another process got — an L2 entry at `version`, or the
    /// source's "no such flag" (`None`) — may answer this read: what [`Inner::fill`]
    /// checks of its own L2 reads. Not when an invalidation announced a newer version
    /// (any version, for an absence), nor when the version source disagrees.
    pub(super) async fn acceptable_answer(&self, key: &FlagKey, version: Option<Version>) -> bool {
        let announced = self.fences.announced(key, self.clock.ms());
        if announced.is_some_and(|min| version.map_or(true, |v| v < min)) {
            return false;
        }
        let Some(source) = &self.expected else {
            return true;
        };
        match (source.current_version(key).await, version) {
            (Ok(Some(current)), Some(v)) => current == v,
            (Ok(Some(_)), None) => false,
            (Ok(None), _) => true,
            // The version source failed: an entry is taken unchecked, as L2 reads
            // are; an absence is not.
            (Err(_), v) => v.is_some(),
        }
    }

    /// Calls the loader, writes its value to L2 (while the key's fence is still
    /// `token`) and installs it; returns how that went too, for the cross-process
    /// coalescer's lease.
    pub(super) async fn load_from_source(
        self: &Arc<Self>,
        key: &FlagKey,
        start: FenceTicket,
        began: quanta::Instant,
        token: FillToken,
        began_ms: u64,
    ) -> Result<(Filled<T>, LoadOutcome)> {
        let t = Instant::now();
        let loaded = tokio::time::timeout(self.cfg.loader_timeout, self.loader.load(key)).await;
        self.tel.load_latency.record(seconds(t.elapsed()));
        let loaded = match loaded {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.tel.bump(Ev::LoadError);
                return Err(e.with_key(key));
            }
            Err(_) => {
                self.tel.bump(Ev::LoadError);
                return Err(Error::Timeout {
                    backend: "loader",
                    operation: "load",
                    after: self.cfg.loader_timeout,
                });
            }
        };
        let Some((value, version)) = loaded else {
            self.tel.bump(Ev::LoadAbsent);
            // Invalidated while loading — the flag may have just been created: this
            // "no such flag" answers this read but is not handed to other processes.
            let outcome = if self.fences.lock().admits(key, start, None) {
                LoadOutcome::Absent
            } else {
                LoadOutcome::NotStored(None)
            };
            let filled = (self.install_absent(key, start, began), Tier::Loader);
            return Ok((filled, outcome));
        };
        self.tel.bump(Ev::Load);
        let payload = self.store.codec().encode_value(&value)?;
        let entry = Entry {
            version,
            stamp_ms: began_ms,
            payload,
        };
        let slot = self.new_l1_entry(
            Some(Arc::new(value)),
            version,
            self.clock.now().saturating_duration_since(began),
        );
        if !self.fences.lock().admits(key, start, Some(version)) {
            // Invalidated while loading: answer this read, but neither write the value
            // back to L2 (it might outlive the invalidation there) nor install it.
            self.tel.bump(Ev::FencedFill);
            return Ok(((slot, Tier::Loader), LoadOutcome::NotStored(None)));
        }
        let written = self.write_l2(key, &entry, token).await;
        match written {
            // An invalidation fenced the key after this fill read it (on any replica,
            // heard here or not): the value may predate it. It answers this read only.
            Some(PutOutcome::Fenced) => {
                tracing::debug!(%key, %version, "fill fenced in L2 by a later invalidation");
                self.tel.bump(Ev::FencedFill);
            }
            // L2 knows a newer version than the source just gave us (a lagging read
            // replica of the source): answer this read, but do not pin it in L1.
            Some(PutOutcome::Superseded { current }) if current > version => {
                tracing::debug!(%key, %version, %current, "loaded version is older than L2's");
            }
            _ => {
                self.install(key, &slot, start);
            }
        }
        let outcome = match written {
            // L2 holds a newer version than this load's: waiters must read that, not this.
            Some(PutOutcome::Superseded { current }) if current > version => {
                LoadOutcome::NotStored(None)
            }
            // Waiters must load after the invalidation too, not take this.
            Some(PutOutcome::Fenced) => LoadOutcome::NotStored(None),
            Some(_) => LoadOutcome::Stored(entry),
            None => LoadOutcome::NotStored(Some(entry)),
        };
        Ok(((slot, Tier::Loader), outcome))
    }
}
