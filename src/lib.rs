#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

// What an application uses: the cache, its settings and its answers.
#[doc(inline)]
pub use flagcache_core::{
    BreakerState, CacheStatus, Error, Evaluation, FlagCache, FlagCacheBuilder, FlagKey, Get,
    GroupBreaker, Health, Hook, Loader, Lookup, NodeId, PutOutcome, Result, Source, StaleReason,
    Stats, SubscriptionHealth, Version, VersionSource, WarmReport,
};

#[cfg(feature = "conformance")]
#[doc(inline)]
pub use flagcache_core::conformance;
#[doc(inline)]
pub use flagcache_core::{fleet, layer};

/// What a storage or invalidation backend implements: the [`FlagStore`](store::FlagStore)
/// and [`Invalidator`](store::Invalidator) traits, the entries and events they carry,
/// and what reading raw entries reports. An application needs none of it; an adapter
/// author needs all of it.
pub mod store {
    #[doc(inline)]
    pub use flagcache_core::{
        async_trait, bytes, now_ms, ttl_millis, Capabilities, Checked, Entry, EntryReport,
        FillRead, FillToken, FlagStore, FlagStoreExt, Invalidation, Invalidator, RawEntry,
        ResyncReason, Signal, Subscription, Target,
    };
}

/// How values are stored in L2: the [`Codec`](codec::Codec) trait, the envelope format
/// (a header with magic, version, flags and checksum, then MessagePack, gzip'd when
/// large) and the JSON layout other services can read and write.
pub mod codec {
    #[doc(inline)]
    pub use flagcache_core::{
        Codec, EnvelopeCodec, JsonCodec, DEFAULT_CODEC, FLAG_GZIP, FORMAT, GZIP_MAGIC, HEADER_LEN,
        JSON_MAX_VERSION, MAGIC, VERSION_OFFSET,
    };
}

/// Sharing one load of a key between callers: in this process
/// ([`LocalCoalescer`](coalesce::LocalCoalescer)) and across processes (the
/// [`Coalescer`](coalesce::Coalescer) trait that `RedisLock` and `MemcachedRecache`
/// implement).
pub mod coalesce {
    #[doc(inline)]
    pub use flagcache_core::{
        BoxFuture, Coalesced, Coalescer, Lease, LoadOutcome, LocalCoalescer, ReleaseLease, Turn,
    };
}

/// The embedded in-process backend: [`MemoryStore`](memory::MemoryStore) and
/// [`MemoryInvalidator`](memory::MemoryInvalidator).
#[cfg(feature = "memory")]
#[doc(inline)]
pub use flagcache_memory as memory;

/// The Redis / Valkey backend: [`RedisStore`](redis::RedisStore) and
/// [`RedisInvalidator`](redis::RedisInvalidator).
#[cfg(feature = "redis")]
#[doc(inline)]
pub use flagcache_redis as redis;

/// The Memcached backend: [`MemcachedStore`](memcached::MemcachedStore).
#[cfg(feature = "memcached")]
#[doc(inline)]
pub use flagcache_memcached as memcached;

mod connect;
pub use connect::{connect, Backend, URL_VAR};
