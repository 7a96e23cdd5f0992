//! The reporting side of fleet presence: a cache's own [`NodeReport`], noted as it
//! applies invalidations, and the task that writes it to the registry every period and
//! soon after each application.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{FleetRegistry, NodeReport};
use crate::{now_ms, FlagKey, NodeId, Version};

/// How often a cache reports by default.
pub(crate) const DEFAULT_EVERY: Duration = Duration::from_secs(5);
/// A report lives this many periods: a node missing two writes in a row is still live.
const TTL_PERIODS: u32 = 3;
/// After a write prompted by an application, the next one waits this long, so a burst
/// of invalidations costs a few writes, not one each.
const MIN_GAP: Duration = Duration::from_millis(50);
/// The most keys a report lists (those applied most recently).
const MAX_KEYS: usize = 256;

/// What a builder was given: the registry and the period.
#[derive(Clone)]
pub(crate) struct Reporting {
    pub registry: Arc<dyn FleetRegistry>,
    pub every: Duration,
}

impl Reporting {
    pub(crate) fn new(registry: Arc<dyn FleetRegistry>) -> Self {
        Reporting {
            registry,
            every: DEFAULT_EVERY,
        }
    }
}

/// A cache's report and the nudge that has it written soon.
pub(crate) struct Reporter {
    report: Mutex<NodeReport>,
    nudge: mpsc::Sender<()>,
}

impl Reporter {
    /// Starts reporting `node` (named `name`) on the current runtime: a first write at
    /// once, then every period, until the reporter is dropped (its record is then
    /// removed).
    pub(crate) fn start(
        reporting: Reporting,
        node: NodeId,
        name: &str,
        transport: Option<&'static str>,
    ) -> Arc<Self> {
        let (nudge, nudged) = mpsc::channel(1);
        let mut report = NodeReport::new(node, name);
        report.subscribed = transport.is_some();
        report.transport = transport.map(str::to_string);
        let reporter = Arc::new(Reporter {
            report: Mutex::new(report),
            nudge,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(run(Arc::downgrade(&reporter), reporting, node, nudged));
        } else {
            tracing::warn!("no tokio runtime: fleet presence is not reported");
        }
        reporter
    }

    /// Notes that `version` of `key` was applied (the event sent at `sent_at_ms`, 0 if
    /// unknown) and asks for a write soon.
    pub(crate) fn applied(&self, key: &FlagKey, version: Version, sent_at_ms: u64) {
        let now = now_ms();
        let lag = (sent_at_ms > 0).then(|| now.saturating_sub(sent_at_ms));
        {
            let mut report = self.report.lock().unwrap_or_else(PoisonError::into_inner);
            report.note_applied(key, version, now, lag);
            if report.applied.len() > MAX_KEYS {
                let oldest = report
                    .applied
                    .iter()
                    .min_by_key(|(_, a)| a.at_ms)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    report.applied.remove(&k);
                }
            }
        }
        // A full channel already holds a nudge: this application rides on it.
        let _ = self.nudge.try_send(());
    }

    fn snapshot(&self) -> NodeReport {
        let mut report = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        report.seen_at_ms = now_ms();
        report.clone()
    }
}

/// Writes the report now, then after each period or nudge, until the reporter is gone;
/// then removes the record.
async fn run(
    reporter: Weak<Reporter>,
    reporting: Reporting,
    node: NodeId,
    mut nudged: mpsc::Receiver<()>,
) {
    let Reporting { registry, every } = reporting;
    let ttl = every * TTL_PERIODS;
    while let Some(snapshot) = reporter.upgrade().map(|r| r.snapshot()) {
        match tokio::time::timeout(every, registry.record(&snapshot, ttl)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "fleet report not written"),
            Err(_) => tracing::debug!("fleet report timed out"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            n = nudged.recv() => {
                if n.is_none() {
                    break;
                }
                tokio::time::sleep(MIN_GAP).await;
            }
        }
    }
    let _ = tokio::time::timeout(every, registry.remove(node)).await;
}
