//! Replicas sharing one backend: each a `FlagCache` with its own store and
//! invalidator, over the scenario's control plane.

use std::sync::Arc;
use std::time::Duration;

use flagcache_core::FlagCache;
use flagcache_redis::{RedisInvalidator, RedisStore};

use super::{err, Res};
use crate::source::Source;

/// A replica's Redis store, under `namespace`.
pub(super) async fn redis_store(url: &str, namespace: &str) -> Res<RedisStore> {
    RedisStore::builder()
        .url(url)
        .namespace(namespace)
        .build()
        .await
        .map_err(err)
}

/// A replica's Redis store (under `namespace`) and invalidator (on `channel`).
pub(super) async fn redis_pair(
    url: &str,
    namespace: &str,
    channel: &str,
) -> Res<(RedisStore, RedisInvalidator)> {
    let store = redis_store(url, namespace).await?;
    let inv = RedisInvalidator::builder()
        .url(url)
        .channel(channel)
        .build()
        .await
        .map_err(err)?;
    Ok((store, inv))
}

/// Replica `name`: a `FlagCache` over `store` and `inv` that loads from `source`; its
/// L1 serves an entry as fresh for 5 minutes, longer than a scenario runs.
pub(super) async fn replica<S, I>(
    name: String,
    source: &Arc<Source>,
    store: S,
    inv: I,
) -> Res<FlagCache<String>>
where
    S: flagcache_core::FlagStore + 'static,
    I: flagcache_core::Invalidator + 'static,
{
    FlagCache::<String>::builder(store, source.loader())
        .name(name)
        .invalidator(inv)
        .fresh_for(Duration::from_secs(300))
        .build()
        .await
        .map_err(err)
}
