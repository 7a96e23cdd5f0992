//! The core conformance suite against a real memcached: on one server (in both layouts)
//! and on a ring of three.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use async_memcached::MetaProtocol;
use flagcache_core::bytes::Bytes;
use flagcache_core::conformance::{self, RawAccess};
use flagcache_core::{async_trait, FlagKey, JsonCodec, Result};
use flagcache_memcached::MemcachedStore;
use flagcache_testkit::MemcachedServer;

mod common;

/// Plants raw bytes with a plain meta set from another client.
struct Raw {
    store: MemcachedStore,
    servers: Vec<String>,
}

#[async_trait]
impl RawAccess for Raw {
    async fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) -> Result<()> {
        // Write it on every server: whichever the ring picks holds it.
        for url in &self.servers {
            let mut c = async_memcached::Client::new(url).await.unwrap();
            let t = format!("T{}", ttl.as_secs().max(1));
            c.meta_set(
                self.store.memcached_key(key).as_bytes(),
                &bytes[..],
                false,
                None,
                Some(&[t.as_str()]),
            )
            .await
            .unwrap();
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_passes_the_suite() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let raw = Raw {
        store: store.clone(),
        servers: vec![server.url()],
    };
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_json_layout_passes_the_suite() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .codec(JsonCodec::new())
        .build()
        .await
        .unwrap();
    let raw = Raw {
        store: store.clone(),
        servers: vec![server.url()],
    };
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_three_passes_the_suite() {
    let servers = common::start_servers(3);
    let urls: Vec<String> = servers.iter().map(MemcachedServer::url).collect();
    let store = MemcachedStore::builder()
        .servers(urls.clone())
        .build()
        .await
        .unwrap();
    let raw = Raw {
        store: store.clone(),
        servers: urls,
    };
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recache_passes_the_coalescer_properties() {
    use flagcache_core::Coalescer;
    use flagcache_memcached::MemcachedRecache;
    let server = MemcachedServer::start().unwrap();
    // One store and one recache per simulated process, all on the one server.
    let mut fleet: Vec<Arc<dyn Coalescer>> = Vec::new();
    for _ in 0..6 {
        let store = MemcachedStore::connect(&server.url()).await.unwrap();
        fleet.push(Arc::new(
            MemcachedRecache::new(&store).poll_interval(Duration::from_millis(5)),
        ));
    }
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    conformance::one_load_per_burst(&fleet, Arc::new(store)).await;
    conformance::abandoned_lease_frees_the_key(
        fleet[0].clone(),
        fleet[1].clone(),
        fleet[2].clone(),
    )
    .await;
}
