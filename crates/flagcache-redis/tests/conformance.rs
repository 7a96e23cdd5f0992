//! The core conformance suite against real servers: a single node and a 3-master
//! cluster, in both layouts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{foreign_event, json_store, on_both_flavors, raw_conn, raw_publish, Raw};
use flagcache_core::conformance;
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::{Flavor, RedisCluster, RedisServer};

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
