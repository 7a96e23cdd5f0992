//! Fleet presence on memcached ([`MemcachedFleet`]): one key per node with a TTL, and
//! an index of node ids spread over a few bucket keys, kept by compare-and-swap.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use flagcache_core::fleet::{FleetRegistry, NodeReport};
use flagcache_core::{async_trait, NodeId, Result};

use crate::meta::{exptime, Route, WireKey};
use crate::MemcachedStore;

/// How many index buckets: a node reads and, when absent from it, rewrites only its own.
const BUCKETS: u64 = 16;
/// How long a bucket lives: every node's report touches its bucket, so a bucket with a
/// live node never expires.
const BUCKET_TTL: Duration = Duration::from_secs(24 * 3600);
/// Compare-and-swap attempts on a bucket before giving up until the next report.
const CAS_ATTEMPTS: usize = 8;

/// A [`FleetRegistry`] on memcached, beside a [`MemcachedStore`]'s entries (same
/// servers, same namespace).
///
/// Keys, for the namespace `flags`: `flags!fleet:node:<node id>` (the report, JSON,
/// with the reporting period's TTL rounded up to whole seconds, plus one) and `flags!fleet:idx:<0…15>` (the node ids of one
/// bucket, space-separated). A report is a write of the record and a read of the
/// node's bucket (which refreshes its TTL); the bucket is rewritten (by CAS) only when
/// the node is missing from it. Reading the fleet is 16 bucket reads and one read per
/// listed node; ids whose record expired are dropped from their bucket then. O(N)
/// both ways.
///
/// ```no_run
/// # async fn f() -> flagcache::Result<()> {
/// use flagcache::{FlagCache, FlagKey, Version};
/// use flagcache::memcached::{MemcachedFleet, MemcachedInvalidator, MemcachedStore};
///
/// let store = MemcachedStore::connect("127.0.0.1:11211").await?;
/// # let loader = |_: FlagKey| async { Ok(Some((true, Version::new(1)))) };
/// let cache = FlagCache::<bool>::builder(store.clone(), loader)
///     .invalidator(MemcachedInvalidator::new(&store))
///     .report_to_fleet(MemcachedFleet::new(&store))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemcachedFleet {
    store: MemcachedStore,
}

impl fmt::Debug for MemcachedFleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemcachedFleet")
            .field("prefix", &self.store.internal_prefix())
            .finish_non_exhaustive()
    }
}

/// The ids a bucket lists.
fn parse_ids(bytes: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(bytes)
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect()
}

fn join_ids(ids: &BTreeSet<String>) -> Vec<u8> {
    ids.iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
        .into_bytes()
}

impl MemcachedFleet {
    /// The fleet registry of `store`'s namespace.
    pub fn new(store: &MemcachedStore) -> Self {
        MemcachedFleet {
            store: store.clone(),
        }
    }

    fn node_key(&self, node: &str) -> WireKey {
        WireKey::plain(format!("{}fleet:node:{node}", self.store.internal_prefix()))
    }

    fn bucket(&self, b: u64) -> WireKey {
        WireKey::plain(format!("{}fleet:idx:{b}", self.store.internal_prefix()))
    }

    /// Rewrites bucket `b` by compare-and-swap with `change` applied to its ids;
    /// `touch` also refreshes its TTL when it reads it. Nothing is written when
    /// `change` leaves the ids as they are.
    async fn update_bucket(
        &self,
        b: u64,
        touch: bool,
        change: impl Fn(&mut BTreeSet<String>),
    ) -> Result<()> {
        let wire = self.bucket(b);
        let ttl = exptime(BUCKET_TTL)?;
        let mut flags = vec!["v".to_string(), "c".to_string()];
        if touch {
            flags.push(format!("T{ttl}"));
        }
        for _ in 0..CAS_ATTEMPTS {
            let current = self
                .store
                .meta()
                .get_with("fleet index", &wire, flags.clone())
                .await?;
            let (mut ids, cas) = match &current {
                Some(v) => (parse_ids(v.data.as_deref().unwrap_or_default()), v.cas),
                None => (BTreeSet::new(), None),
            };
            let before = ids.clone();
            change(&mut ids);
            if ids == before {
                return Ok(());
            }
            let bytes = join_ids(&ids).into();
            // Without a CAS (an absent bucket) this is an add: a concurrent creator wins
            // and the next attempt reads its bucket.
            if self.store.meta().set(&wire, &bytes, ttl, cas).await? {
                return Ok(());
            }
        }
        tracing::debug!(
            bucket = b,
            "fleet index contended; retried at the next report"
        );
        Ok(())
    }
}

#[async_trait]
impl FleetRegistry for MemcachedFleet {
    async fn record(&self, report: &NodeReport, ttl: Duration) -> Result<()> {
        let id = report.node.to_string();
        let key = self.node_key(&id);
        // memcached's clock ticks in whole seconds, so an item set with an exptime of
        // n seconds may expire up to a second early: one second more keeps a node that
        // reports on time from ever looking gone.
        let whole = Duration::from_secs(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0) + 1);
        let secs = exptime(whole)?;
        self.store
            .meta()
            .raw_set(Route::Key(&key), &key, report.to_json()?, secs)
            .await?;
        self.update_bucket(report.node.0 % BUCKETS, true, |ids| {
            ids.insert(id.clone());
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeReport>> {
        let buckets = futures_util::future::try_join_all((0..BUCKETS).map(|b| async move {
            let wire = self.bucket(b);
            let raw = self.store.meta().raw_get(Route::Key(&wire), &wire).await?;
            Ok::<_, flagcache_core::Error>((b, raw.map(|r| parse_ids(&r)).unwrap_or_default()))
        }))
        .await?;
        let mut live = Vec::new();
        for (b, ids) in buckets {
            let records = futures_util::future::try_join_all(ids.iter().map(|id| async move {
                let key = self.node_key(id);
                let raw = self.store.meta().raw_get(Route::Key(&key), &key).await?;
                Ok::<_, flagcache_core::Error>((id.clone(), raw))
            }))
            .await?;
            let mut gone = BTreeSet::new();
            for (id, raw) in records {
                match raw.as_deref().and_then(NodeReport::from_json) {
                    Some(report) => live.push(report),
                    None => {
                        gone.insert(id);
                    }
                }
            }
            if !gone.is_empty() {
                // Expired nodes leave the index; a failure here only delays it.
                let pruned = self
                    .update_bucket(b, false, |ids| ids.retain(|id| !gone.contains(id)))
                    .await;
                if let Err(e) = pruned {
                    tracing::debug!(error = %e, "fleet index not pruned");
                }
            }
        }
        Ok(live)
    }

    async fn remove(&self, node: NodeId) -> Result<()> {
        let id = node.to_string();
        self.store.meta().delete(&self.node_key(&id)).await?;
        self.update_bucket(node.0 % BUCKETS, false, |ids| {
            ids.remove(&id);
        })
        .await
    }
}
