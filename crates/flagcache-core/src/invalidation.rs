//! Invalidation events and the signals a subscriber receives.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use crate::{FlagKey, NodeId, Version};

/// What an invalidation applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Target {
    /// One flag.
    Key(FlagKey),
    /// Every flag carrying this tag.
    Tag(String),
    /// Everything.
    All,
}

/// An invalidation event.
///
/// Build one with [`Invalidation::key`], [`Invalidation::tag`] or [`Invalidation::all`].
/// The publishing [`Invalidator`](crate::Invalidator) stamps `origin`, `seq` and
/// `sent_at_ms` when it sends the event; what a subscriber receives carries them.
///
/// ```
/// use flagcache::{FlagKey, Version};
/// use flagcache::store::{Invalidation, Target};
///
/// let ev = Invalidation::key(FlagKey::new("kill-switch")?).with_version(Version::new(42));
/// assert!(matches!(ev.target, Target::Key(_)));
/// assert_eq!(ev.version, Some(Version::new(42)));
/// # Ok::<(), flagcache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Invalidation {
    /// What to invalidate.
    pub target: Target,
    /// The version that made the old value obsolete, when known: receivers may keep a
    /// value at this version or newer.
    pub version: Option<Version>,
    /// The publisher's node ([`NodeId::UNKNOWN`] for foreign publishers).
    pub origin: NodeId,
    /// The publisher's sequence number for this event (1, 2, 3… per publisher; 0 when
    /// the publisher does not number its events). A gap means events were lost.
    pub seq: u64,
    /// When the publisher sent it, in milliseconds since the Unix epoch (0 if unknown):
    /// receivers measure invalidation lag from it.
    pub sent_at_ms: u64,
    /// Asks every receiver to delete the key from the shared tier (L2) too, for
    /// publishers that cannot delete it themselves. Each receiver then reloads it, so
    /// prefer deleting L2 once at the publisher (as `FlagCache::invalidate` does).
    #[serde(default)]
    pub purge_shared: bool,
}

impl Invalidation {
    fn new(target: Target) -> Self {
        Invalidation {
            target,
            version: None,
            origin: NodeId::UNKNOWN,
            seq: 0,
            sent_at_ms: 0,
            purge_shared: false,
        }
    }

    /// Invalidates one key.
    pub fn key(key: FlagKey) -> Self {
        Self::new(Target::Key(key))
    }

    /// Invalidates every key carrying `tag`.
    pub fn tag(tag: impl Into<String>) -> Self {
        Self::new(Target::Tag(tag.into()))
    }

    /// Invalidates everything.
    pub fn all() -> Self {
        Self::new(Target::All)
    }

    /// Records the version that made the old value obsolete.
    #[must_use]
    pub fn with_version(mut self, version: Version) -> Self {
        self.version = Some(version);
        self
    }

    /// Asks receivers to delete the key from the shared tier as well (see
    /// [`Invalidation::purge_shared`]).
    #[must_use]
    pub fn purging_shared(mut self) -> Self {
        self.purge_shared = true;
        self
    }

    /// Sets the publisher's stamp: used by [`Invalidator`](crate::Invalidator)
    /// implementations when they send an event.
    #[must_use]
    pub fn stamped(mut self, origin: NodeId, seq: u64, sent_at_ms: u64) -> Self {
        self.origin = origin;
        self.seq = seq;
        self.sent_at_ms = sent_at_ms;
        self
    }
}

/// Why a subscriber must flush everything it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The receiver fell behind and `missed` events were dropped.
    Lagged {
        /// How many events were lost.
        missed: u64,
    },
    /// A publisher's sequence skipped numbers.
    SequenceGap {
        /// The publisher.
        origin: NodeId,
        /// The sequence number that was expected.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },
    /// The connection to the invalidation channel was lost and re-established.
    Reconnected,
    /// No heartbeat arrived in time: the subscription may have been silently dead.
    HeartbeatMissed,
    /// The server restarted or its log went backwards or was overwritten.
    LogReset,
    /// A message could not be decoded, so its content is unknown.
    Undecodable,
    /// The subscription ended for good: no further events will arrive.
    Closed,
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncReason::Lagged { missed } => write!(f, "lagged, {missed} events missed"),
            ResyncReason::SequenceGap {
                origin,
                expected,
                got,
            } => write!(
                f,
                "sequence gap from {origin}: expected {expected}, got {got}"
            ),
            ResyncReason::Reconnected => f.write_str("reconnected"),
            ResyncReason::HeartbeatMissed => f.write_str("heartbeat missed"),
            ResyncReason::LogReset => f.write_str("invalidation log reset"),
            ResyncReason::Undecodable => f.write_str("undecodable message"),
            ResyncReason::Closed => f.write_str("subscription closed"),
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// Drop what this event names.
    Invalidated(Invalidation),
    /// Events may have been missed: drop everything held locally. A subscriber that
    /// silently resumes after a gap would keep serving whatever it missed.
    Resync(ResyncReason),
}

/// A stream of [`Signal`]s from an [`Invalidator`](crate::Invalidator).
///
/// It ends (`recv` returns `None`) when the invalidator is closed for good.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Signal> + Send>>,
}

impl Subscription {
    /// Wraps any stream of signals.
    pub fn from_stream(stream: impl Stream<Item = Signal> + Send + 'static) -> Self {
        Subscription {
            inner: Box::pin(stream),
        }
    }

    /// Wraps the receiving half of a channel fed by a background task.
    pub fn from_receiver(mut rx: tokio::sync::mpsc::Receiver<Signal>) -> Self {
        Self::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    /// The next signal, or `None` when the invalidator is closed.
    pub async fn recv(&mut self) -> Option<Signal> {
        std::future::poll_fn(|cx| self.inner.as_mut().poll_next(cx)).await
    }
}

impl Stream for Subscription {
    type Item = Signal;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Signal>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}
