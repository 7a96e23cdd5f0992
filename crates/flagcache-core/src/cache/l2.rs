//! Calls to the shared tier (L2): each one bounded by the L2 timeout and counted, reads
//! behind the circuit breaker; reads that fail become misses, corrupt entries are
//! deleted.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::batch::read_one;
use super::breaker::{Group, Permit};
use super::stats::{seconds, Ev};
use super::Inner;
use crate::{Entry, Error, FillRead, FillToken, FlagKey, PutOutcome, Result};

/// Why a read was skipped: the breaker of its read group is open.
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker open{}: L2 reads are skipped after repeated failures", OfGroup(*.group))]
struct CircuitOpen {
    group: Group,
}

/// Formats `" for read group <n>"` when there is one.
struct OfGroup(Group);

impl std::fmt::Display for OfGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(g) => write!(f, " for read group {g}"),
            None => Ok(()),
        }
    }
}

/// The error of a skipped call: transient, naming the key and its read group.
fn circuit_open(
    backend: &'static str,
    operation: &'static str,
    key: Option<&FlagKey>,
    group: Group,
) -> Error {
    let e = Error::backend(backend, operation, true, CircuitOpen { group });
    match key {
        Some(k) => e.with_key(k),
        None => e,
    }
}

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
    /// Reads L2 through the breaker and timeout, with the key's fence (see
    /// [`FlagStore::get_each_for_fill`](crate::FlagStore::get_each_for_fill)). Failures
    /// are counted and become misses: the loader is the truth, L2 only saves trips to it.
    pub(super) async fn read_l2(&self, key: &FlagKey) -> FillRead {
        match self
            .l2_call("get", Access::Read, Some(key), |group| {
                self.read_l2_raw(key, group)
            })
            .await
        {
            Ok(read) => read,
            Err(Error::Corrupt { reason, .. }) => {
                tracing::warn!(cache = %self.cfg.name, %key, %reason, "corrupt L2 entry; deleting it");
                self.tel.bump(Ev::Corrupt);
                let _ = Box::pin(self.delete_l2(key, Access::Read)).await;
                FillRead::default()
            }
            Err(e) => {
                tracing::warn!(cache = %self.cfg.name, %key, error = %e, "L2 read failed");
                FillRead::default()
            }
        }
    }

    /// The key's fence now, for a fill whose L2 entry turned out unservable: a store
    /// may have left a hit's token empty. Unreadable, it is [`FillToken::NONE`], which
    /// only makes the write stricter (refused while any fence is up).
    pub(super) async fn fence_token(&self, key: &FlagKey) -> FillToken {
        self.l2_call("fence_token", Access::Read, Some(key), |_| {
            self.store.fence_token(key)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::debug!(cache = %self.cfg.name, %key, error = %e, "fence unread");
            FillToken::NONE
        })
    }

    /// The read itself: batched when the store gives read groups. With a version
    /// source, an entry at another version than the source's is a miss — with the
    /// key's fence, so that the load it leads to may write.
    pub(super) async fn read_l2_raw(&self, key: &FlagKey, group: Group) -> Result<FillRead> {
        let mut read = match &self.batcher {
            Some(b) => b.get(key, group).await?,
            None => read_one(&*self.store, key).await?,
        };
        let Some(source) = &self.expected else {
            return Ok(read);
        };
        let Some(found) = read.entry.as_ref().map(|e| e.version) else {
            return Ok(read);
        };
        match source.current_version(key).await {
            Ok(Some(v)) if v != found => {
                tracing::debug!(%key, expected = %v, current = %found, "version-stamped read: L2 is stale");
                read.entry = None;
                read.token = self.store.fence_token(key).await.unwrap_or(FillToken::NONE);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%key, error = %e, "version source failed; reading L2 unchecked");
            }
        }
        Ok(read)
    }

    pub(super) fn l2_failed(&self, group: Group, permit: Permit) {
        if self.breaker.failure(group, permit) {
            tracing::warn!(cache = %self.cfg.name, ?group, max_backoff = ?self.cfg.breaker_backoff,
                "L2 circuit breaker opened: skipping L2 reads, probing from 100 ms on");
            self.tel.bump(Ev::BreakerOpened);
        }
    }

    /// Best-effort write of a loaded value to L2 (skipped while the breaker is open),
    /// refused when the key's fence is no longer `token`, the one its fill read;
    /// failures are counted, not returned.
    pub(super) async fn write_l2(
        &self,
        key: &FlagKey,
        entry: &Entry,
        token: FillToken,
    ) -> Option<PutOutcome> {
        let ttl = self.cfg.jittered(self.cfg.l2_ttl);
        let written = self
            .l2_call("put", Access::Read, Some(key), |_| {
                self.store.put_fill(key, entry, ttl, token)
            })
            .await;
        match written {
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
        self.l2_call("put", access, Some(key), |_| {
            self.store.put(key, entry, ttl)
        })
        .await
    }

    /// A versionless invalidation in L2 ([`FlagStore::fence`](crate::FlagStore::fence)):
    /// a fence that outlives every fill begun before it, and the entry dropped (or,
    /// with `keep_stale`, kept stale for that long where the backend can).
    pub(super) async fn fence_l2(
        &self,
        key: &FlagKey,
        keep_stale: Option<std::time::Duration>,
    ) -> Result<()> {
        let ttl = self.cfg.fence_ttl();
        self.l2_call("fence", Access::Write, Some(key), |_| {
            self.store.fence(key, ttl, keep_stale)
        })
        .await
    }

    pub(super) async fn delete_l2(&self, key: &FlagKey, access: Access) -> Result<()> {
        self.l2_call("delete", access, Some(key), |_| self.store.delete(key))
            .await
    }

    /// Every L2 call goes through here: a read is skipped while the circuit breaker of
    /// its key's read group is open (see [`Access`]; a call without a key has the
    /// group `None`); every call is timed, bounded by the L2 timeout, and its
    /// failure counted by kind (see [`Failure`]): timeouts, transient and permanent
    /// errors count towards opening the breaker, a refusal of the request leaves it
    /// as it is, and any other answer closes it. It takes a closure that makes the
    /// call rather than the call's future, so that future lives once, in this one's
    /// state, instead of twice; the closure gets the key's read group, which the store
    /// computes once per call (a memcached store hashes the key onto its ring for it).
    pub(super) async fn l2_call<R, F>(
        &self,
        operation: &'static str,
        access: Access,
        key: Option<&FlagKey>,
        call: impl FnOnce(Group) -> F,
    ) -> Result<R>
    where
        F: std::future::Future<Output = Result<R>>,
    {
        // The breaker of the key's read group: one per server.
        let group = key.and_then(|k| self.store.read_group(k));
        let permit = match access {
            Access::Read => self.breaker.permit(group),
            Access::Write => Permit::Call,
        };
        if permit == Permit::Skip {
            self.tel.bump(Ev::L2Skipped);
            return Err(circuit_open(self.store.name(), operation, key, group));
        }
        let t = self.clock.now();
        let answer = tokio::time::timeout(self.cfg.l2_timeout, call(group)).await;
        let now = self.clock.now();
        let latency = now.saturating_duration_since(t);
        self.tel.l2_latency.record(seconds(latency));
        let answer = answer.unwrap_or_else(|_| {
            Err(Error::Timeout {
                backend: self.store.name(),
                operation,
                after: self.cfg.l2_timeout,
            })
        });
        let failure = match &answer {
            Ok(_) => None,
            Err(e) => Failure::of(e),
        };
        self.health.l2_call(latency, failure.is_none(), now);
        match failure {
            None => self.breaker.success(group),
            Some(f) => {
                self.tel.bump(f.event());
                if f != Failure::Refused {
                    self.l2_failed(group, permit);
                }
            }
        }
        answer
    }
}

/// The kinds of failed L2 call, as counted (`Stats::l2_*`,
/// `flagcache_l2_errors_total{kind}`) and as the circuit breaker takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// No answer within the L2 timeout (the cache's or the adapter's own).
    Timeout,
    /// A failure a retry may fix: connection refused or reset, overload.
    Transient,
    /// A failure only an operator fixes: authentication (`NOAUTH`, `WRONGPASS`),
    /// permissions (`NOPERM`), a closed store.
    ///
    /// It counts towards opening the breaker, as a transient one does: a server that
    /// refuses every call of this client is of no more use to reads than a dead one,
    /// and skipping it gives reads the same answer — the loader's — without a round
    /// trip and a WARN line each. Nothing is hidden by it: the error is counted
    /// (`l2_permanent_errors`), the breaker's opening is counted and logged, and
    /// writes, which the breaker never skips, return the error to their callers. Once
    /// the operator fixes the cause, the next probe or write closes the breaker. Not
    /// counting it — as a success, say — would leave every read paying a round trip
    /// for an error forever, with nothing but a log line to tell.
    Permanent,
    /// The request itself was refused (a value over the size limit, an invalid
    /// argument, a codec error, an invalid key): it says nothing of the server's
    /// health, so the breaker is left as it is.
    Refused,
}

impl Failure {
    /// The kind of `e`; `None` when it is an answer of a working server rather than a
    /// failure ([`Error::Corrupt`]: bytes were read; the caller counts them).
    pub(super) fn of(e: &Error) -> Option<Failure> {
        Some(match e {
            Error::Timeout { .. } => Failure::Timeout,
            Error::Backend {
                transient: true, ..
            }
            | Error::Loader { .. } => Failure::Transient,
            Error::Backend {
                transient: false, ..
            }
            | Error::Closed(_) => Failure::Permanent,
            Error::InvalidKey { .. }
            | Error::InvalidArgument(_)
            | Error::ValueTooLarge { .. }
            | Error::Codec { .. } => Failure::Refused,
            Error::Corrupt { .. } => return None,
        })
    }

    fn event(self) -> Ev {
        match self {
            Failure::Timeout => Ev::L2Timeout,
            Failure::Transient => Ev::L2Transient,
            Failure::Permanent => Ev::L2Permanent,
            Failure::Refused => Ev::L2Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_skipped_call_names_its_key_and_read_group() {
        let key = FlagKey::new("checkout.kill").unwrap();
        let e = circuit_open("memcached", "get", Some(&key), Some(7));
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "memcached get failed for checkout.kill: circuit breaker open for read group 7: \
             L2 reads are skipped after repeated failures"
        );
        let e = circuit_open("redis", "get_many", None, None);
        assert_eq!(
            e.to_string(),
            "redis get_many failed: circuit breaker open: L2 reads are skipped after repeated \
             failures"
        );
    }

    #[test]
    fn errors_are_classified_by_what_they_say_of_the_server() {
        let io = || std::io::Error::other("x");
        let kinds = [
            (
                Error::Timeout {
                    backend: "redis",
                    operation: "get",
                    after: Duration::from_millis(1),
                },
                Some(Failure::Timeout),
            ),
            (
                Error::backend("redis", "get", true, io()),
                Some(Failure::Transient),
            ),
            (
                Error::backend("redis", "get", false, io()),
                Some(Failure::Permanent),
            ),
            (Error::Closed("store"), Some(Failure::Permanent)),
            (
                Error::ValueTooLarge {
                    key: "k".into(),
                    size: 2,
                    limit: 1,
                    backend: "memcached",
                },
                Some(Failure::Refused),
            ),
            (Error::InvalidArgument("ttl".into()), Some(Failure::Refused)),
            (Error::codec("bad", io()), Some(Failure::Refused)),
            (Error::corrupt("bad magic"), None),
        ];
        for (e, kind) in kinds {
            assert_eq!(Failure::of(&e), kind, "{e}");
        }
    }
}
