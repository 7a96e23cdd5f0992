#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[doc(inline)]
pub use flagcache_core::*;

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
