//! The key layout is a store setting: every template passes the store suite and the
//! lock's coalescer properties, on one node and on a cluster (where a flag's lock,
//! marker and fence must share its slot for the scripts to run), and a layout shared
//! with a foreign service reads and deletes the same keys it does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{key, on_both_flavors, raw_conn, Raw};
use flagcache_core::conformance;
use flagcache_core::{Coalescer, FlagStore, FlagStoreExt, JsonCodec, Version};
use flagcache_redis::{RedisLock, RedisStore, RedisStoreBuilder};
use flagcache_testkit::{Flavor, RedisCluster, RedisServer};

const TEMPLATES: [&str; 3] = ["{ns}:{{key}}", "{ns}:{key}", "{{ns}}:{key}"];

/// The suite and the lock's properties over stores `build` makes.
async fn suite<C: redis::aio::ConnectionLike + Send + Sync>(
    template: &str,
    build: impl Fn() -> RedisStoreBuilder,
    conn: C,
) {
    let store = build()
        .namespace(format!("layout{}", fastrand::u32(..)))
        .key_layout(template)
        .build()
        .await
        .unwrap();
    assert_eq!(store.key_layout().template(), template);
    let raw = Raw::new(&store, conn);
    conformance::run_store_suite(Arc::new(store.clone()), &raw).await;
    let fleet: Vec<Arc<dyn Coalescer>> = (0..3)
        .map(|_| Arc::new(RedisLock::new(&store)) as Arc<dyn Coalescer>)
        .collect();
    conformance::one_load_per_burst(&fleet, Arc::new(store.clone())).await;
}

async fn every_layout_passes_the_suite_on_one_node(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    for template in TEMPLATES {
        let url = server.url();
        suite(
            template,
            || RedisStore::builder().url(&url),
            raw_conn(&url).await,
        )
        .await;
    }
}

async fn every_layout_passes_the_suite_on_a_cluster(flavor: Flavor) {
    let cluster = RedisCluster::start_with(flavor, 3).unwrap();
    for template in TEMPLATES {
        let conn = redis::cluster::ClusterClient::new(cluster.urls())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        suite(
            template,
            || RedisStore::builder().cluster(cluster.urls()),
            conn,
        )
        .await;
    }
}

/// A service in another language keeps flags at `flags:<flagKey>` in the JSON layout:
/// with `{ns}:{key}` the store reads its entries, writes where it reads, and its `DEL`
/// removes ours.
async fn a_foreign_services_plain_keys_are_shared(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .key_layout("{ns}:{key}")
        .codec(JsonCodec::default())
        .build()
        .await
        .unwrap();
    let mut foreign = raw_conn(&server.url()).await;
    redis::cmd("SET")
        .arg("flags:checkout")
        .arg(r#"{"flagConfig": {"enabled": true}, "version": 7}"#)
        .query_async::<()>(&mut foreign)
        .await
        .unwrap();
    let k = key("checkout");
    let (value, version) = store
        .get_value::<serde_json::Value>(&k)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (value["enabled"].as_bool(), version),
        (Some(true), Version::new(7))
    );

    store
        .put_value(
            &k,
            &serde_json::json!({"enabled": false}),
            Version::new(8),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let theirs: String = redis::cmd("GET")
        .arg("flags:checkout")
        .query_async(&mut foreign)
        .await
        .unwrap();
    assert!(theirs.contains("\"version\":8"), "{theirs}");

    redis::cmd("DEL")
        .arg("flags:checkout")
        .query_async::<()>(&mut foreign)
        .await
        .unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        None,
        "their DEL missed our key"
    );
}

/// A template that cannot be right is refused at build, named, with the accepted forms.
async fn a_bad_layout_is_refused_at_build(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let e = RedisStore::builder()
        .url(server.url())
        .key_layout("{ns}:{flag}")
        .build()
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("{ns}:{flag}") && text.contains("{ns}:{{key}}"),
        "{text}"
    );
}

on_both_flavors!(
    every_layout_passes_the_suite_on_one_node,
    every_layout_passes_the_suite_on_a_cluster,
    a_foreign_services_plain_keys_are_shared,
    a_bad_layout_is_refused_at_build,
);
