//! Stale-while-revalidate and early refresh: which keys have a background refresh
//! running, starting one, and XFetch's probabilistic early refresh.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::l1::L1Entry;
use super::Inner;
use crate::FlagKey;

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

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Starts one background refresh of `key`, unless one is running. The check is a
    /// flag in a fixed table — no lock on the hit path.
    pub(super) fn refresh_in_background(self: &Arc<Self>, key: &FlagKey) {
        let Some(claim) = self.refreshing.claim(key) else {
            return;
        };
        let this = self.clone();
        let k = key.clone();
        // Unless a fill of the key is in flight already, in which case the claim drops
        // here, at once.
        self.fills.start(key, move || async move {
            let _claim = claim;
            this.fill(&k).await
        });
    }

    /// A background refresh not tied to an entry (after an invalidation).
    pub(super) fn refetch_in_background(self: &Arc<Self>, key: &FlagKey) {
        let this = self.clone();
        let k = key.clone();
        self.fills
            .start(key, move || async move { this.fill(&k).await });
    }

    /// XFetch (Vattani et al.): refresh early with a probability that rises as expiry
    /// nears, scaled by how long a fill takes.
    pub(super) fn xfetch_due(&self, slot: &L1Entry<T>, now: super::clock::Tick) -> bool {
        let remaining = slot.fresh_until.saturating_sub(now) as f64 / 1e9;
        let delta = (f64::from(slot.cost_us) / 1e6).max(0.001);
        let u = fastrand::f64().max(f64::MIN_POSITIVE);
        delta * self.cfg.xfetch_beta * -u.ln() >= remaining
    }
}
