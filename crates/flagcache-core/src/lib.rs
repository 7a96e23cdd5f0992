#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod cache;
mod coalesce;
mod codec;
mod error;
mod invalidation;
mod key;
mod raw;
mod store;
mod types;

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod fleet;
pub mod layer;

pub use cache::{
    BreakerState, CacheStatus, Evaluation, FlagCache, FlagCacheBuilder, Get, GroupBreaker, Health,
    Hook, Loader, Lookup, StaleReason, Stats, SubscriptionHealth, VersionSource, WarmReport,
};
pub use coalesce::{
    BoxFuture, Coalesced, Coalescer, Lease, LoadOutcome, LocalCoalescer, ReleaseLease, Turn,
};
pub use codec::{
    Codec, EnvelopeCodec, JsonCodec, DEFAULT_CODEC, FLAG_GZIP, FORMAT, GZIP_MAGIC, HEADER_LEN,
    JSON_MAX_VERSION, MAGIC, VERSION_OFFSET,
};
pub use error::{Error, Result, Source};
pub use invalidation::{Invalidation, ResyncReason, Signal, Subscription, Target};
pub use key::FlagKey;
pub use raw::{EntryReport, RawEntry};
pub use store::{FlagStore, FlagStoreExt, Invalidator};
pub use types::{
    now_ms, ttl_millis, Capabilities, Checked, Entry, FillRead, FillToken, NodeId, PutOutcome,
    Version,
};

/// Re-exported so adapters implement the traits with the same macro version.
pub use async_trait::async_trait;
/// Re-exported: [`Entry::payload`] is a [`Bytes`](bytes::Bytes).
pub use bytes;
