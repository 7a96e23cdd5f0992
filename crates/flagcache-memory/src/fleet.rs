//! Fleet presence in process memory ([`MemoryFleet`]): the registry of the caches of
//! one process, for tests and single-process apps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use flagcache_core::fleet::{FleetRegistry, NodeReport};
use flagcache_core::{async_trait, NodeId, Result};

/// A [`FleetRegistry`] in process memory: each node's latest report until its TTL
/// passes. Clones share the registry.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> flagcache::Result<()> {
/// use std::time::Duration;
/// use flagcache::fleet::{FleetRegistry, NodeReport};
/// use flagcache::NodeId;
/// use flagcache::memory::MemoryFleet;
///
/// let fleet = MemoryFleet::new();
/// fleet.record(&NodeReport::new(NodeId(1), "svc"), Duration::from_secs(15)).await?;
/// assert_eq!(fleet.nodes().await?.len(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryFleet {
    nodes: Arc<Mutex<HashMap<NodeId, (NodeReport, Instant)>>>,
}

impl MemoryFleet {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl FleetRegistry for MemoryFleet {
    async fn record(&self, report: &NodeReport, ttl: Duration) -> Result<()> {
        let until = Instant::now() + ttl;
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.retain(|_, (_, until)| *until > Instant::now());
        nodes.insert(report.node, (report.clone(), until));
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeReport>> {
        let now = Instant::now();
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(nodes
            .values()
            .filter(|(_, until)| *until > now)
            .map(|(r, _)| r.clone())
            .collect())
    }

    async fn remove(&self, node: NodeId) -> Result<()> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.remove(&node);
        Ok(())
    }
}
