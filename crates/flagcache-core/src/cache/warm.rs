//! Warming: pre-loading keys before they are needed (a rollout step, a deploy) — one
//! batched L2 read, then the loader for what L2 lacks.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::fill::Tier;
use super::l2::Access;
use super::Inner;
use crate::{Error, FlagKey, FlagStoreExt};

/// What [`FlagCache::warm`](crate::FlagCache::warm) did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct WarmReport {
    /// Keys already fresh in L1.
    pub already_fresh: usize,
    /// Keys filled from L2 (in one batched read).
    pub from_l2: usize,
    /// Keys filled from the loader.
    pub loaded: usize,
    /// Keys the source does not have.
    pub absent: usize,
    /// Keys answered with a value marked stale, which another process is reloading
    /// (see [`FlagCache::refresh`](crate::FlagCache::refresh)); held in L1 as stale, not fresh.
    pub stale: usize,
    /// Keys that could not be filled, with why.
    pub failed: Vec<(FlagKey, Error)>,
}
impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    pub(super) async fn warm(self: &Arc<Self>, keys: &[FlagKey]) -> WarmReport {
        use futures_util::StreamExt;
        let mut report = WarmReport::default();
        let epoch = self.epoch();
        let now = self.clock.ticks();
        let cold: Vec<FlagKey> = keys
            .iter()
            .filter(|k| {
                let fresh = self.cfg.l1_enabled
                    && self
                        .l1
                        .peek(k)
                        .is_some_and(|s| s.epoch == epoch && now < s.fresh_until);
                if fresh {
                    report.already_fresh += 1;
                }
                !fresh
            })
            .cloned()
            .collect();
        let mut misses = Vec::new();
        let start = self.fences.begin();
        let began = self.clock.now();
        // Version-stamped reads check each key on its own; the batch read cannot.
        let batch = if cold.is_empty() || self.expected.is_some() {
            None
        } else {
            self.l2_call("get_many", Access::Read, None, |_| {
                self.store.get_many(&cold)
            })
            .await
            .ok()
            .filter(|found| found.len() == cold.len())
        };
        match batch {
            Some(found) => {
                for (key, entry) in cold.into_iter().zip(found) {
                    let filled = match entry {
                        Some(e) if self.servable(&key, &e).await => {
                            self.install_entry(&key, &e, start, began, false).ok()
                        }
                        _ => None,
                    };
                    match filled {
                        Some(_) => report.from_l2 += 1,
                        None => misses.push(key),
                    }
                }
            }
            None => misses = cold,
        }
        let results: Vec<_> = futures_util::stream::iter(misses)
            .map(|key| async move {
                let r = self.fetch(&key).await;
                (key, r)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (key, r) in results {
            match r {
                Ok((slot, Tier::L2)) if slot.value.is_some() => report.from_l2 += 1,
                Ok((_, Tier::StaleL2)) => report.stale += 1,
                Ok((slot, _)) if slot.value.is_none() => report.absent += 1,
                Ok(_) => report.loaded += 1,
                Err(e) => report.failed.push((key, e)),
            }
        }
        report
    }
}
