//! The core conformance suite against real servers: a single node and a 3-master
//! cluster, in both layouts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{foreign_event, json_store, on_both_flavors, raw_conn, raw_publish};
use flagcache_core::bytes::Bytes;
use flagcache_core::conformance::{self, RawAccess};
use flagcache_core::{async_trait, FlagKey, Result};
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::{Flavor, RedisCluster, RedisServer};

/// Plants raw bytes with a plain `SET` from another client: over `C`, a plain or a
/// cluster connection.
struct Raw<C> {
    store: RedisStore,
    conn: tokio::sync::Mutex<C>,
}

impl<C> Raw<C> {
    fn new(store: &RedisStore, conn: C) -> Self {
        Raw {
            store: store.clone(),
            conn: tokio::sync::Mutex::new(conn),
        }
    }
}

#[async_trait]
impl<C: redis::aio::ConnectionLike + Send + Sync> RawAccess for Raw<C> {
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

async fn single_node_passes_the_suite(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let raw = Raw::new(&store, raw_conn(&server.url()).await);
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

async fn single_node_json_layout_passes_the_suite(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = json_store(&server.url()).await;
    let raw = Raw::new(&store, raw_conn(&server.url()).await);
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

async fn cluster_passes_the_suite(flavor: Flavor) {
    let cluster = RedisCluster::start_with(flavor, 3).unwrap();
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    // Raw writes go through a cluster connection too.
    let conn = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let raw = Raw::new(&store, conn);
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

async fn invalidation_reaches_every_subscriber(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let a = RedisInvalidator::connect(&server.url()).await.unwrap();
    let b = a.peer();
    let c = a.peer();
    conformance::invalidation_reaches_every_subscriber(&a, &[&a, &b, &c]).await;
}

async fn invalidation_on_a_cluster_reaches_every_subscriber(flavor: Flavor) {
    let cluster = RedisCluster::start_with(flavor, 3).unwrap();
    let a = RedisInvalidator::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let b = a.peer();
    conformance::invalidation_reaches_every_subscriber(&a, &[&a, &b]).await;
}

async fn a_skipped_sequence_number_is_a_gap(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let a = RedisInvalidator::connect(&server.url()).await.unwrap();
    let b = a.peer();
    // A raw client publishes, under a made-up node id, events 1 and 3: as if 2 had
    // been lost.
    let url = server.url();
    let lose_one = raw_publish(&url, vec![foreign_event(1), foreign_event(3)]);
    conformance::resync_after_gap(&b, &a, lose_one).await;
}

on_both_flavors!(
    single_node_passes_the_suite,
    single_node_json_layout_passes_the_suite,
    cluster_passes_the_suite,
    invalidation_reaches_every_subscriber,
    invalidation_on_a_cluster_reaches_every_subscriber,
    a_skipped_sequence_number_is_a_gap,
);
