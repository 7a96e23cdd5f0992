//! The L2-hit scenario over memcached: `FlagCache` with L1 off (and the memcached
//! store alone) against a raw `async-memcached` get of the same stored bytes, through
//! a pool of the same size as the store's. The figures are ratios to the raw get (see
//! [`super::l2`]).

use std::sync::Arc;

use flagcache_memcached::MemcachedStore;

use super::l2::{l2_hit, l2_setup, raw_hit, L2Setup, MakeSetup};
use super::rounds::keyed_op;
use super::{err, Plan, Res, Section, Servers};

/// A small pool of raw `async-memcached` clients: the baseline's fair equivalent of
/// the store's pool.
struct RawPool {
    url: String,
    conns: std::sync::Mutex<Vec<async_memcached::Client>>,
    permits: tokio::sync::Semaphore,
}

impl RawPool {
    async fn get(&self, key: &str) -> Res<Option<Vec<u8>>> {
        use async_memcached::AsciiProtocol;
        let _permit = self.permits.acquire().await.map_err(err)?;
        let pooled = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut client = match pooled {
            Some(c) => c,
            None => async_memcached::Client::new(&self.url).await.map_err(err)?,
        };
        let value = client.get(key).await.map_err(err)?;
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(client);
        Ok(value.and_then(|v| v.data))
    }
}

/// L2 hit over memcached: `FlagCache` with L1 off against a raw pooled
/// `async-memcached` get of the same stored bytes.
pub async fn l2_hit_memcached(servers: &mut Servers, plan: Plan) -> Res<Section> {
    let url = servers.memcached_url()?;
    let make: MakeSetup = Arc::new(move || Box::pin(memcached_l2_setup(url.clone())));
    l2_hit("L2 hit, Memcached", plan, make).await
}

async fn memcached_l2_setup(url: String) -> Res<L2Setup> {
    const POOL: usize = 16;
    let store = MemcachedStore::builder()
        .server(&url)
        .namespace("bench-l2")
        .pool_size(POOL)
        .build()
        .await
        .map_err(err)?;
    let pool = Arc::new(RawPool {
        url,
        conns: std::sync::Mutex::new(Vec::new()),
        permits: tokio::sync::Semaphore::new(POOL),
    });
    let raw = move |names: Vec<String>| {
        keyed_op(pool, names, |pool, name| async move {
            raw_hit(pool.get(&name).await?, "raw get")
        })
    };
    l2_setup(
        "L2 hit, Memcached",
        store,
        MemcachedStore::memcached_key,
        ("raw async-memcached get (pooled)", Box::new(raw)),
    )
    .await
}
