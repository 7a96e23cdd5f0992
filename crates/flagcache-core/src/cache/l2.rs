//! Calls to the shared tier (L2): each one bounded by the L2 timeout and counted, reads
//! behind the circuit breaker; reads that fail become misses, corrupt entries are
//! deleted.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::breaker::Permit;
use super::stats::{seconds, Ev};
use super::Inner;
use crate::{Checked, Entry, Error, FlagKey, PutOutcome, Result};

#[derive(Debug, thiserror::Error)]
#[error("circuit breaker open: the shared tier is being skipped after repeated failures")]
struct CircuitOpen;

/// What the circuit breaker does with an L2 call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// A read, or a fill's best-effort write-back: skipped while the breaker is open
    /// (the loader answers instead).
    Read,
    /// A write a caller asked for (`set`, `invalidate`, `refresh`, a shared purge):
    /// tried within the L2 timeout even while the breaker is open, so a kill switch
    /// does not wait for the reads' back-off; its success closes the breaker.
    Write,
}

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Reads L2 through the breaker and timeout. Failures are counted and become
    /// `None`: the loader is the truth, L2 only saves trips to it.
    pub(super) async fn read_l2(&self, key: &FlagKey) -> Option<Entry> {
        match self
            .l2_call("get", Access::Read, || self.read_l2_raw(key))
            .await
        {
            Ok(entry) => entry,
            Err(Error::Corrupt { reason, .. }) => {
                tracing::warn!(cache = %self.cfg.name, %key, %reason, "corrupt L2 entry; deleting it");
                self.tel.bump(Ev::Corrupt);
                let _ = Box::pin(self.delete_l2(key, Access::Read)).await;
                None
            }
            Err(e) => {
                tracing::warn!(cache = %self.cfg.name, %key, error = %e, "L2 read failed");
                None
            }
        }
    }

    pub(super) async fn read_l2_raw(&self, key: &FlagKey) -> Result<Option<Entry>> {
        let Some(source) = &self.expected else {
            return match &self.batcher {
                Some(b) => b.get(key).await,
                None => self.store.get(key).await,
            };
        };
        match source.current_version(key).await {
            Ok(Some(v)) => match self.store.get_checked(key, v).await? {
                Checked::Hit(e) => Ok(Some(e)),
                Checked::Stale { current } => {
                    tracing::debug!(%key, expected = %v, %current, "version-stamped read: L2 is stale");
                    Ok(None)
                }
                Checked::Miss => Ok(None),
            },
            Ok(None) => self.store.get(key).await,
            Err(e) => {
                tracing::warn!(%key, error = %e, "version source failed; reading L2 unchecked");
                self.store.get(key).await
            }
        }
    }

    pub(super) fn l2_failed(&self, permit: Permit) {
        if self.breaker.failure(permit) {
            tracing::warn!(cache = %self.cfg.name, max_backoff = ?self.cfg.breaker_backoff,
                "L2 circuit breaker opened: skipping L2 reads, probing from 100 ms on");
            self.tel.bump(Ev::BreakerOpened);
        }
    }

    /// Best-effort write of a loaded value to L2 (skipped while the breaker is open);
    /// failures are counted, not returned.
    pub(super) async fn write_l2(&self, key: &FlagKey, entry: &Entry) -> Option<PutOutcome> {
        match self.write_l2_strict(key, entry, Access::Read).await {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(cache = %self.cfg.name, %key, error = %e, "L2 write failed");
                None
            }
        }
    }

    pub(super) async fn write_l2_strict(
        &self,
        key: &FlagKey,
        entry: &Entry,
        access: Access,
    ) -> Result<PutOutcome> {
        let ttl = self.cfg.jittered(self.cfg.l2_ttl);
        self.l2_call("put", access, || self.store.put(key, entry, ttl))
            .await
    }

    pub(super) async fn delete_l2(&self, key: &FlagKey, access: Access) -> Result<()> {
        self.l2_call("delete", access, || self.store.delete(key))
            .await
    }

    /// Every L2 call goes through here: a read is skipped while the circuit breaker is
    /// open (see [`Access`]); every call is timed and bounded by the L2 timeout;
    /// transient failures and timeouts count towards opening the breaker, any answer
    /// of the server (even a refusal) closes it. It takes
    /// a closure that makes the call rather than the call's future, so that future lives
    /// once, in this one's state, instead of twice.
    pub(super) async fn l2_call<R, F>(
        &self,
        operation: &'static str,
        access: Access,
        call: impl FnOnce() -> F,
    ) -> Result<R>
    where
        F: std::future::Future<Output = Result<R>>,
    {
        let permit = match access {
            Access::Read => self.breaker.permit(),
            Access::Write => Permit::Call,
        };
        if permit == Permit::Skip {
            self.tel.bump(Ev::L2Skipped);
            return Err(Error::backend(
                self.store.name(),
                operation,
                true,
                CircuitOpen,
            ));
        }
        let t = self.clock.now();
        let answer = tokio::time::timeout(self.cfg.l2_timeout, call()).await;
        self.tel
            .l2_latency
            .record(seconds(self.clock.now().saturating_duration_since(t)));
        match answer {
            Ok(Err(e)) if e.is_transient() => {
                self.tel.bump(Ev::L2Error);
                self.l2_failed(permit);
                Err(e)
            }
            Ok(answer) => {
                self.breaker.success();
                answer
            }
            Err(_) => {
                self.tel.bump(Ev::L2Timeout);
                self.l2_failed(permit);
                Err(Error::Timeout {
                    backend: self.store.name(),
                    operation,
                    after: self.cfg.l2_timeout,
                })
            }
        }
    }
}
