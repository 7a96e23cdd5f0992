//! Invalidation events: publishing this cache's own, applying the fleet's (drop from L1
//! behind a fence), resyncs, and the task that listens to the subscription.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use super::backoff::RESUBSCRIBE;
use super::l2::Access;
use super::stats::Ev;
use super::Inner;
use crate::{
    now_ms, Error, FlagKey, Invalidation, NodeId, Result, ResyncReason, Signal, Subscription,
    Target,
};

/// How long an own invalidation's echo is waited for (after that, it is applied like
/// any event).
const OWN_ECHO_WAIT: Duration = Duration::from_secs(30);

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    pub(super) async fn publish(&self, event: Invalidation) -> Result<()> {
        let Some(inv) = &self.invalidator else {
            return Ok(());
        };
        match tokio::time::timeout(
            self.cfg.l2_timeout.max(Duration::from_secs(1)),
            inv.publish(&event),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.tel.bump(Ev::PublishError);
                Err(e)
            }
            Err(_) => {
                self.tel.bump(Ev::PublishError);
                Err(Error::Timeout {
                    backend: "invalidator",
                    operation: "publish",
                    after: self.cfg.l2_timeout.max(Duration::from_secs(1)),
                })
            }
        }
    }

    /// Publishes a versionless invalidation of `key` that this cache has applied
    /// already, so that its own echo does not fence fills begun since.
    pub(super) async fn publish_applied(&self, key: &FlagKey) -> Result<()> {
        if self.invalidator.is_none() {
            return Ok(());
        }
        self.own_echoes_map()
            .entry(key.clone())
            .and_modify(|(n, at)| {
                *n += 1;
                *at = Instant::now();
            })
            .or_insert((1, Instant::now()));
        let published = self.publish(Invalidation::key(key.clone())).await;
        if published.is_err() {
            self.take_own_echo(key);
        }
        published
    }

    pub(super) fn own_echoes_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<FlagKey, (u32, Instant)>> {
        self.own_echoes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether an echo of this cache's own, already applied invalidation of `key` was
    /// due (recently); consumes it.
    pub(super) fn take_own_echo(&self, key: &FlagKey) -> bool {
        let mut echoes = self.own_echoes_map();
        let Some((n, at)) = echoes.get_mut(key) else {
            return false;
        };
        let due = *n > 0 && at.elapsed() < OWN_ECHO_WAIT;
        *n = n.saturating_sub(1);
        if *n == 0 || !due {
            echoes.remove(key);
        }
        due
    }

    /// Applies one event received from the invalidator.
    pub(super) async fn apply(self: &Arc<Self>, ev: &Invalidation) {
        // This node's own events are applied too: the version they carry keeps the
        // value this node just wrote (an L1 entry at that version or newer stays), and
        // another cache sharing this node's invalidator must not miss them.
        let own = ev.origin != NodeId::UNKNOWN && ev.origin == self.node;
        match &ev.target {
            // The echo of an invalidation this cache applied when it published it:
            // applying it again would only fence the fills begun since.
            Target::Key(key)
                if own && ev.version.is_none() && !ev.purge_shared && self.take_own_echo(key) => {}
            Target::Key(key) => {
                self.drop_local(key, ev.version);
                if ev.purge_shared {
                    let _ = self.delete_l2(key, Access::Write).await;
                    // A read in the meantime may have refilled from the deleted entry.
                    self.drop_local(key, ev.version);
                }
                if let Some(max) = self.cfg.refetch_jitter {
                    let this = self.clone();
                    let key = key.clone();
                    let delay = max.mul_f64(fastrand::f64());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        this.refetch_in_background(&key);
                    });
                }
            }
            Target::Tag(tag) => {
                let stamp = if ev.sent_at_ms > 0 {
                    ev.sent_at_ms
                } else {
                    now_ms()
                };
                self.apply_tag(tag, stamp);
            }
            _ => self.drop_all_local(),
        }
        if let (Some(fleet), Target::Key(key), Some(v)) = (&self.fleet, &ev.target, ev.version) {
            fleet.applied(key, v, ev.sent_at_ms);
        }
        // Counted once applied, so an observer of the counter sees the effect.
        if ev.sent_at_ms > 0 {
            let lag_ms = now_ms().saturating_sub(ev.sent_at_ms);
            self.tel.lag.record(lag_ms as f64 / 1000.0);
        }
        self.tel
            .bump(if own { Ev::OwnEvent } else { Ev::Invalidation });
    }

    /// Marks every L1 entry unverified: never served as fresh again, only as a
    /// fail-safe fallback when L2 and the loader both fail.
    pub(super) fn resync(&self, reason: &ResyncReason) {
        tracing::warn!(cache = %self.cfg.name, %reason, "resync: L1 marked unverified");
        let mut fences = self.fences.lock();
        fences.invalidate_all();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.fills.forget_all();
        drop(fences);
        if let Some(tags) = &self.tags {
            // Tag invalidations may have been missed too: read the stamps again.
            tags.forget_stamps();
        }
        self.tel.bump(Ev::Resync);
    }
}

/// Consumes the subscription until the cache is dropped; when the subscription ends,
/// marks L1 untrusted and subscribes again on the [`RESUBSCRIBE`] schedule (after
/// 100 ms, doubling per failed attempt up to 1 s).
pub(super) async fn listen<T>(
    weak: Weak<Inner<T>>,
    mut sub: Subscription,
    mut shutdown: oneshot::Receiver<()>,
) where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    loop {
        let signal = tokio::select! {
            _ = &mut shutdown => return,
            s = sub.recv() => s,
        };
        let Some(inner) = weak.upgrade() else { return };
        if signal.is_some() {
            inner.health.signal(inner.clock.now());
        }
        match signal {
            Some(Signal::Invalidated(ev)) => inner.apply(&ev).await,
            Some(Signal::Resync(reason)) => inner.resync(&reason),
            None => {
                tracing::error!(cache = %inner.cfg.name,
                    "invalidation subscription ended; L1 is untrusted until it is back");
                inner.deaf.store(true, Ordering::SeqCst);
                inner.health.subscription_down(inner.clock.now());
                inner.resync(&ResyncReason::Closed);
                let Some(invalidator) = inner.invalidator.clone() else {
                    return;
                };
                drop(inner);
                let mut failed = 0;
                sub = loop {
                    tokio::select! {
                        _ = &mut shutdown => return,
                        () = tokio::time::sleep(RESUBSCRIBE.delay(failed)) => {}
                    }
                    match invalidator.subscribe().await {
                        Ok(s) => break s,
                        Err(e) => {
                            tracing::warn!(error = %e, "resubscribing failed");
                            failed = failed.saturating_add(1);
                        }
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                // Whatever happened meanwhile was missed.
                inner.resync(&ResyncReason::Reconnected);
                inner.deaf.store(false, Ordering::SeqCst);
                inner.health.subscription_up();
            }
        }
    }
}
