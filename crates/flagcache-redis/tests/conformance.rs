//! The core conformance suite against real servers: a single node and a 3-master
//! cluster, in both layouts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use flagcache_core::bytes::Bytes;
use flagcache_core::conformance::{self, RawAccess};
use flagcache_core::{async_trait, FlagKey, Invalidation, JsonCodec, Result};
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::{RedisCluster, RedisServer};

/// Plants raw bytes with a plain `SET` from another client.
struct Raw {
    store: RedisStore,
    conn: tokio::sync::Mutex<redis::aio::MultiplexedConnection>,
}

#[async_trait]
impl RawAccess for Raw {
    async fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) -> Result<()> {
        let mut c = self.conn.lock().await;
        let _: () = redis::cmd("SET")
            .arg(self.store.redis_key(key))
            .arg(&bytes[..])
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut *c)
            .await
            .map_err(|e| flagcache_core::Error::backend("redis", "raw set", true, e))?;
        Ok(())
    }
}

async fn raw_for(url: &str, store: &RedisStore) -> Raw {
    let client = redis::Client::open(url).unwrap();
    Raw {
        store: store.clone(),
        conn: tokio::sync::Mutex::new(client.get_multiplexed_async_connection().await.unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_passes_the_suite() {
    let server = RedisServer::start().unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let raw = raw_for(&server.url(), &store).await;
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_json_layout_passes_the_suite() {
    let server = RedisServer::start().unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .codec(JsonCodec::new())
        .build()
        .await
        .unwrap();
    let raw = raw_for(&server.url(), &store).await;
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_passes_the_suite() {
    let cluster = RedisCluster::start(3).unwrap();
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    // Raw writes go through a cluster connection too.
    struct ClusterRaw(
        RedisStore,
        tokio::sync::Mutex<redis::cluster_async::ClusterConnection>,
    );
    #[async_trait]
    impl RawAccess for ClusterRaw {
        async fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) -> Result<()> {
            let mut c = self.1.lock().await;
            let _: () = redis::cmd("SET")
                .arg(self.0.redis_key(key))
                .arg(&bytes[..])
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async(&mut *c)
                .await
                .map_err(|e| flagcache_core::Error::backend("redis", "raw set", true, e))?;
            Ok(())
        }
    }
    let conn = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let raw = ClusterRaw(store.clone(), tokio::sync::Mutex::new(conn));
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_every_subscriber() {
    let server = RedisServer::start().unwrap();
    let a = RedisInvalidator::connect(&server.url()).await.unwrap();
    let b = a.peer().await.unwrap();
    let c = a.peer().await.unwrap();
    conformance::invalidation_reaches_every_subscriber(&a, &[&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_on_a_cluster_reaches_every_subscriber() {
    let cluster = RedisCluster::start(3).unwrap();
    let a = RedisInvalidator::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let b = a.peer().await.unwrap();
    conformance::invalidation_reaches_every_subscriber(&a, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_sequence_number_is_a_gap() {
    let server = RedisServer::start().unwrap();
    let a = RedisInvalidator::connect(&server.url()).await.unwrap();
    let b = a.peer().await.unwrap();
    let url = server.url();
    let lose_one = async move {
        // A raw client publishes, under a made-up node id, events 1 and 3: as if 2
        // had been lost.
        let codec = flagcache_core::Codec::default();
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        for seq in [1, 3] {
            let ev = Invalidation::key(FlagKey::new("x").unwrap()).stamped(
                flagcache_core::NodeId(99),
                seq,
                1,
            );
            let bytes = codec.encode_invalidation(&ev).unwrap();
            let _: i64 = redis::cmd("PUBLISH")
                .arg("flag_updates")
                .arg(&bytes[..])
                .query_async(&mut c)
                .await
                .unwrap();
        }
    };
    conformance::resync_after_gap(&b, &a, lose_one).await;
}
