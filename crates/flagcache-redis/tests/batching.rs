//! Batched reads: under concurrent misses `FlagCache` reads Redis in `MGET` batches,
//! key by key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{key, on_both_flavors, raw_conn};
use flagcache_core::{CacheStatus, FlagCache, FlagKey, FlagStoreExt, Version};
use flagcache_redis::RedisStore;
use flagcache_testkit::{Flavor, RedisServer};

/// `INFO commandstats` calls of `command` so far.
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Under concurrent misses the cache reads Redis with `MGET` batches rather than one
/// `GET` per key; every key gets its own entry, and a corrupt entry in a batch costs
/// only its own key (deleted, then loaded from the source).
async fn concurrent_misses_read_redis_in_mget_batches_key_by_key(flavor: Flavor) {
    const KEYS: usize = 300;
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let keys: Vec<FlagKey> = (0..KEYS).map(|i| key(&format!("mget.{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        store
            .put_value(
                k,
                &format!("l2:{i}"),
                Version::new(1),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    let mut conn = raw_conn(&server.url()).await;
    let corrupt = 7;
    let _: () = redis::cmd("SET")
        .arg(store.redis_key(&keys[corrupt]))
        .arg(&b"\xf1 not an entry"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = loads.clone();
    let loader = move |_: FlagKey| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok(Some(("source".to_string(), Version::new(2)))) }
    };
    let cache = FlagCache::<String>::builder(store, loader)
        .l2_batch_after(4)
        .build()
        .await
        .unwrap();
    let (gets, mgets) = (
        command_calls(&mut conn, "get").await,
        command_calls(&mut conn, "mget").await,
    );
    let reads = {
        let cache = cache.clone();
        flagcache_testkit::spawn_from_a_task(keys.clone(), move |k| {
            let cache = cache.clone();
            async move { cache.lookup(&k).await }
        })
        .await
    };
    for (i, r) in reads.into_iter().enumerate() {
        let l = r.await.unwrap().unwrap();
        let got = l.value.as_deref().map(String::as_str);
        if i == corrupt {
            assert_eq!((got, l.status), (Some("source"), CacheStatus::Miss));
        } else {
            assert_eq!(got, Some(format!("l2:{i}").as_str()), "key {i}");
            assert_eq!(l.status, CacheStatus::HitL2, "key {i}");
        }
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "only the corrupt key was loaded"
    );
    let st = cache.stats();
    assert!(
        st.l2_batches > 0 && st.l2_batched_reads > st.l2_batches,
        "{st:?}"
    );
    let gets = command_calls(&mut conn, "get").await - gets;
    let mgets = command_calls(&mut conn, "mget").await - mgets;
    // A fill reads the entries first, then the fences of the keys that missed: a read
    // on its own is a one-key MGET, a batch one MGET, and each one's misses one more.
    // (The GETs counted are the `put` script's.)
    assert!(
        mgets >= st.l2_batches,
        "one MGET per batch: {mgets} < {st:?}"
    );
    assert!(
        gets + mgets < KEYS as u64 / 2,
        "{gets} GETs and {mgets} MGETs for {KEYS} keys"
    );
}

on_both_flavors!(concurrent_misses_read_redis_in_mget_batches_key_by_key,);
