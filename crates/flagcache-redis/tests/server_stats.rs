//! What the server says about itself, against a real Redis: `INFO all` holds the
//! figures a diagnosis reads, `PUBSUB NUMSUB` counts one subscriber per listening node,
//! and a Redis Cluster is refused (each node describes only itself).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flagcache_core::{Error, FlagKey, FlagStore, Invalidator};
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::{RedisCluster, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_subscribers_of_one_server() {
    let server = RedisServer::start().unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    store.get(&FlagKey::new("absent").unwrap()).await.unwrap();
    let info = store.server_info().await.unwrap();
    for figure in [
        "keyspace_misses:",
        "evicted_keys:",
        "maxmemory:",
        "connected_clients:",
        "cmdstat_get:calls=",
        "# Commandstats",
        "# Keyspace",
    ] {
        assert!(info.contains(figure), "{figure} not in INFO all");
    }

    let bus = RedisInvalidator::builder()
        .url(server.url())
        .channel("doctor_test")
        .build()
        .await
        .unwrap();
    assert_eq!(bus.channel(), "doctor_test");
    // `build` probes the channel with a subscription it drops; the server counts it
    // until that connection's close reaches it.
    assert_eq!(settles(&store, "doctor_test", 0).await, 0);
    let (a, b) = (
        bus.subscribe().await.unwrap(),
        bus.peer().subscribe().await.unwrap(),
    );
    assert_eq!(settles(&store, "doctor_test", 2).await, 2);
    assert_eq!(store.channel_subscribers("other").await.unwrap(), 0);
    drop((a, b));
}

/// The channel's subscriber count once it is `expected`, or the last count read after
/// 5 s.
async fn settles(store: &RedisStore, channel: &str, expected: u64) -> u64 {
    let mut count = store.channel_subscribers(channel).await.unwrap();
    for _ in 0..100 {
        if count == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        count = store.channel_subscribers(channel).await.unwrap();
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_refused() {
    let cluster = RedisCluster::start(3).unwrap();
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let e = store.server_info().await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("each node")),
        "{e}"
    );
    assert!(matches!(
        store.channel_subscribers("flag_updates").await,
        Err(Error::InvalidArgument(_))
    ));
}
