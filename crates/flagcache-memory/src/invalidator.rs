//! [`MemoryInvalidator`]: invalidation events over a Tokio broadcast channel, for the
//! nodes of one process.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use flagcache_core::{
    now_ms, Invalidation, Invalidator, NodeId, Result, ResyncReason, Signal, Subscription,
};
use tokio::sync::broadcast::{self, error::RecvError};

/// An [`Invalidator`] over a Tokio broadcast channel, for one process.
///
/// Built as every adapter's invalidator is: [`builder`](MemoryInvalidator::builder),
/// its settings, `build()` — or [`new`](MemoryInvalidator::new) with the defaults —
/// which makes a bus and a first node on it; [`peer`](MemoryInvalidator::peer) adds
/// another node (another simulated replica) to the same bus. Clones are the same node.
///
/// The bus holds the last `capacity` events; a subscriber that falls further behind
/// receives [`Signal::Resync`] with [`ResyncReason::Lagged`] — it never silently skips.
#[derive(Clone)]
pub struct MemoryInvalidator {
    bus: broadcast::Sender<Invalidation>,
    node: NodeId,
    seq: Arc<AtomicU64>,
}

impl fmt::Debug for MemoryInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryInvalidator")
            .field("node", &self.node)
            .field("subscribers", &self.bus.receiver_count())
            .finish()
    }
}

/// Configures a [`MemoryInvalidator`]'s bus.
#[derive(Debug, Clone)]
pub struct MemoryInvalidatorBuilder {
    capacity: usize,
}

impl MemoryInvalidatorBuilder {
    /// How many events the bus buffers per subscriber (at least 1; default
    /// [`MemoryInvalidator::DEFAULT_CAPACITY`]).
    #[must_use]
    pub fn capacity(mut self, events: usize) -> Self {
        self.capacity = events.max(1);
        self
    }

    /// A new bus, and a first node on it.
    pub fn build(self) -> MemoryInvalidator {
        let (bus, _) = broadcast::channel(self.capacity);
        MemoryInvalidator::node_on(bus)
    }
}

impl Default for MemoryInvalidator {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryInvalidator {
    /// Default number of events the bus buffers per subscriber.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// A new bus with the default settings, and a first node on it.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a bus.
    pub fn builder() -> MemoryInvalidatorBuilder {
        MemoryInvalidatorBuilder {
            capacity: Self::DEFAULT_CAPACITY,
        }
    }

    /// Another node on the same bus, with its own node id and sequence.
    pub fn peer(&self) -> Self {
        Self::node_on(self.bus.clone())
    }

    /// How many subscriptions are open on this bus (a closed `FlagCache` leaves none
    /// behind).
    pub fn subscriber_count(&self) -> usize {
        self.bus.receiver_count()
    }

    fn node_on(bus: broadcast::Sender<Invalidation>) -> Self {
        MemoryInvalidator {
            bus,
            node: NodeId::random(),
            seq: Arc::new(AtomicU64::new(0)),
        }
    }
}

#[async_trait]
impl Invalidator for MemoryInvalidator {
    fn node_id(&self) -> NodeId {
        self.node
    }

    fn transport(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, event: &Invalidation) -> Result<()> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let event = event.clone().stamped(self.node, seq, now_ms());
        // With no subscriber there is nobody to tell: not an error.
        let _ = self.bus.send(event);
        Ok(())
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let rx = self.bus.subscribe();
        Ok(Subscription::from_stream(futures_util::stream::unfold(
            rx,
            |mut rx| async move {
                let signal = match rx.recv().await {
                    Ok(ev) => Signal::Invalidated(ev),
                    Err(RecvError::Lagged(missed)) => {
                        Signal::Resync(ResyncReason::Lagged { missed })
                    }
                    Err(RecvError::Closed) => return None,
                };
                Some((signal, rx))
            },
        )))
    }
}
