//! Fleet presence: what each replica records about itself in the backend — that it is
//! alive, and which versions it has applied — and how a verifier reads it back
//! ([`FleetRegistry`], [`NodeReport`], [`NodeReport::verdict`]).
//!
//! Opt-in per cache with
//! [`FlagCacheBuilder::report_to_fleet`](crate::FlagCacheBuilder::report_to_fleet); a
//! cache without it writes nothing and pays one branch per applied invalidation.

mod reporter;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{BoxFuture, FlagKey, NodeId, Result, Version};

pub(crate) use reporter::{Reporter, Reporting};

/// Where replicas record their presence: one record per node, each written by its
/// node alone and kept for a TTL, so the cost grows with the fleet's size N (N writes
/// per period, one read of N records per verification), never with N².
///
/// Implemented by `RedisFleet` (keys with a TTL and a sorted-set index),
/// `MemcachedFleet` (keys with a TTL and an index of buckets) and `MemoryFleet`.
#[async_trait]
pub trait FleetRegistry: Send + Sync {
    /// Writes `report` for its node; it is gone `ttl` after the last write.
    ///
    /// # Errors
    /// A backend error or a timeout.
    async fn record(&self, report: &NodeReport, ttl: Duration) -> Result<()>;

    /// Every live node's latest report (those whose TTL has not passed), in no order.
    /// A record that does not decode is skipped.
    ///
    /// # Errors
    /// A backend error or a timeout.
    async fn nodes(&self) -> Result<Vec<NodeReport>>;

    /// Removes `node`'s record (a cache that stops). The default leaves it to expire.
    ///
    /// # Errors
    /// A backend error or a timeout.
    async fn remove(&self, node: NodeId) -> Result<()> {
        let _ = node;
        Ok(())
    }
}

#[deny(clippy::missing_trait_methods)]
impl<T: FleetRegistry + ?Sized> FleetRegistry for Arc<T> {
    fn record<'s, 'r, 'f>(
        &'s self,
        report: &'r NodeReport,
        ttl: Duration,
    ) -> BoxFuture<'f, Result<()>>
    where
        's: 'f,
        'r: 'f,
        Self: 'f,
    {
        (**self).record(report, ttl)
    }

    fn nodes<'s, 'f>(&'s self) -> BoxFuture<'f, Result<Vec<NodeReport>>>
    where
        's: 'f,
        Self: 'f,
    {
        (**self).nodes()
    }

    fn remove<'s, 'f>(&'s self, node: NodeId) -> BoxFuture<'f, Result<()>>
    where
        's: 'f,
        Self: 'f,
    {
        (**self).remove(node)
    }
}

/// A version a node applied for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Applied {
    /// The version (the node serves nothing older for the key from now on).
    pub version: u64,
    /// When the node applied it, in ms since the Unix epoch.
    pub at_ms: u64,
    /// From the event's send time to its application, when the event carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
}

/// What one replica records about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeReport {
    /// Its node id, the one its invalidations carry (hex, 16 digits).
    #[serde(with = "hex_node")]
    pub node: NodeId,
    /// The cache's name.
    pub name: String,
    /// The process id.
    pub pid: u32,
    /// The host name, when the environment says (`HOSTNAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// When the cache started reporting, in ms since the Unix epoch.
    pub started_at_ms: u64,
    /// When this report was written, in ms since the Unix epoch.
    pub seen_at_ms: u64,
    /// Whether the cache has an invalidator (a replica without one applies nothing).
    pub subscribed: bool,
    /// How its invalidator hears events ([`Invalidator::transport`](crate::Invalidator::transport)):
    /// `"pubsub"`, `"tracking"`, `"tracking+pubsub"`, `"log"`, `"memory"`, `"other"`;
    /// `None` without an invalidator, and in reports of versions before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The newest version applied per key, for the keys applied most recently.
    pub applied: BTreeMap<String, Applied>,
}

/// Where one replica stands on a key and version ([`NodeReport::verdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// It applied this version or a newer one.
    Applied(Applied),
    /// It started after L2 was written at this version or newer: it has never held an
    /// older value.
    StartedAfter,
    /// It has not applied the version (the newest it applied, if any).
    Behind(Option<Version>),
}

impl Verdict {
    /// Whether the replica serves `version` or newer.
    pub fn is_done(&self) -> bool {
        !matches!(self, Verdict::Behind(_))
    }
}

impl NodeReport {
    /// Whether this replica has applied `version` (or newer) of `key`. `written_at_ms`
    /// is when L2 was written at `version` or newer, when known: a replica that started
    /// after it never held anything older.
    ///
    /// ```
    /// use flagcache::fleet::{NodeReport, Verdict};
    /// use flagcache::{FlagKey, NodeId, Version};
    ///
    /// let key = FlagKey::new("checkout")?;
    /// let mut report = NodeReport::new(NodeId(7), "flags");
    /// assert_eq!(report.verdict(&key, Version::new(8), None), Verdict::Behind(None));
    /// report.note_applied(&key, Version::new(9), 1_000, Some(3));
    /// assert!(report.verdict(&key, Version::new(8), None).is_done());
    /// # Ok::<(), flagcache::Error>(())
    /// ```
    pub fn verdict(&self, key: &FlagKey, version: Version, written_at_ms: Option<u64>) -> Verdict {
        match self.applied.get(key.as_str()) {
            Some(a) if a.version >= version.get() => Verdict::Applied(*a),
            applied => {
                if written_at_ms.is_some_and(|w| self.started_at_ms > w) {
                    Verdict::StartedAfter
                } else {
                    Verdict::Behind(applied.map(|a| Version::new(a.version)))
                }
            }
        }
    }

    /// A report of `node` named `name`, started now, with nothing applied.
    pub fn new(node: NodeId, name: impl Into<String>) -> Self {
        let now = crate::now_ms();
        NodeReport {
            node,
            name: name.into(),
            pid: std::process::id(),
            host: std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()),
            started_at_ms: now,
            seen_at_ms: now,
            subscribed: false,
            transport: None,
            applied: BTreeMap::new(),
        }
    }

    /// Notes that `version` of `key` was applied at `at_ms` (kept if newer than what
    /// was noted).
    pub fn note_applied(
        &mut self,
        key: &FlagKey,
        version: Version,
        at_ms: u64,
        lag_ms: Option<u64>,
    ) {
        let slot = self
            .applied
            .entry(key.as_str().to_string())
            .or_insert(Applied {
                version: 0,
                at_ms,
                lag_ms,
            });
        if version.get() >= slot.version {
            *slot = Applied {
                version: version.get(),
                at_ms,
                lag_ms,
            };
        }
    }

    /// The report as stored: JSON.
    ///
    /// # Errors
    /// [`Error::Codec`](crate::Error::Codec) (not expected: every field serializes).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| crate::Error::codec("fleet report", e))
    }

    /// A stored report; `None` for bytes that are not one.
    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A node id as 16 hex digits, as logs and events show it.
mod hex_node {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::NodeId;

    pub fn serialize<S: Serializer>(node: &NodeId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&node.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NodeId, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16)
            .map(NodeId)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_keep_the_newest_version() {
        let k = FlagKey::new("k").unwrap();
        let mut r = NodeReport::new(NodeId(0xabc), "svc");
        r.note_applied(&k, Version::new(5), 10, None);
        r.note_applied(&k, Version::new(4), 20, Some(1));
        assert_eq!(r.applied["k"].version, 5);
        let back = NodeReport::from_json(&r.to_json().unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(String::from_utf8(r.to_json().unwrap())
            .unwrap()
            .contains(r#""node":"0000000000000abc""#));
        assert_eq!(NodeReport::from_json(b"nope"), None);
    }

    #[test]
    fn a_replica_started_after_the_write_is_done() {
        let k = FlagKey::new("k").unwrap();
        let r = NodeReport::new(NodeId(1), "svc");
        let before = r.started_at_ms - 1;
        assert_eq!(
            r.verdict(&k, Version::new(3), Some(before)),
            Verdict::StartedAfter
        );
        assert_eq!(
            r.verdict(&k, Version::new(3), Some(r.started_at_ms + 5)),
            Verdict::Behind(None)
        );
    }
}
