//! The L2-hit scenario over Redis: `FlagCache` with L1 off (and the Redis store
//! alone) against a raw `redis-rs` GET of the same stored bytes on one multiplexed
//! connection. The figures are ratios to the raw GET (see [`super::l2`]).

use std::sync::Arc;

use flagcache_redis::RedisStore;

use super::l2::{l2_hit, l2_setup, raw_hit, L2Setup, MakeSetup};
use super::replicas::redis_store;
use super::rounds::keyed_op;
use super::{err, redis_conn, Plan, Res, Section, Servers};

/// L2 hit over Redis: `FlagCache` with L1 off against a raw `redis-rs` GET of the
/// same stored bytes.
pub async fn l2_hit_redis(servers: &mut Servers, plan: Plan) -> Res<Section> {
    let url = servers.redis_url()?;
    let make: MakeSetup = Arc::new(move || Box::pin(redis_l2_setup(url.clone())));
    l2_hit("L2 hit, Redis", plan, make).await
}

async fn redis_l2_setup(url: String) -> Res<L2Setup> {
    let store = redis_store(&url, "bench-l2").await?;
    let conn = redis_conn(&url).await?;
    let raw = move |names: Vec<String>| {
        keyed_op(conn, names, |mut conn, name| async move {
            let v: Option<Vec<u8>> = redis::AsyncCommands::get(&mut conn, &name)
                .await
                .map_err(err)?;
            raw_hit(v, "raw GET")
        })
    };
    l2_setup(
        "L2 hit, Redis",
        store,
        RedisStore::redis_key,
        ("raw redis-rs GET", Box::new(raw)),
    )
    .await
}
