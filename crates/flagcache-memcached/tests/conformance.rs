//! The core conformance suite against a real memcached, on one server and on a ring of
//! three.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use async_memcached::MetaProtocol;
use flagcache_core::bytes::Bytes;
use flagcache_core::conformance::{self, RawAccess};
use flagcache_core::{async_trait, Entry, FlagKey, FlagStore, PutOutcome, Result, Version};
use flagcache_memcached::MemcachedStore;
use flagcache_testkit::MemcachedServer;

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
async fn a_ring_of_three_passes_the_suite() {
    let servers: Vec<MemcachedServer> = (0..3).map(|_| MemcachedServer::start().unwrap()).collect();
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
async fn contended_writes_retry_on_cas_conflicts_and_count_them() {
    let server = MemcachedServer::start().unwrap();
    let store = Arc::new(MemcachedStore::connect(&server.url()).await.unwrap());
    let key = FlagKey::new("contended").unwrap();
    // 64 writers, 4 rounds: the version guard holds and the conflicts are retried.
    for round in 0..4u64 {
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (1..=64u64)
            .map(|v| {
                let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                let version = round * 100 + v;
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .put(
                            &key,
                            &Entry::new(Version::new(version), vec![1]),
                            Duration::from_secs(60),
                        )
                        .await
                })
            })
            .collect();
        for t in tasks {
            let out = t.await.unwrap().unwrap();
            assert!(matches!(
                out,
                PutOutcome::Stored | PutOutcome::Superseded { .. }
            ));
        }
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().version,
            Version::new(round * 100 + 64)
        );
    }
    assert!(store.cas_retries() > 0, "no CAS conflict was ever retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_too_long_for_memcached_are_digested_and_stay_distinct() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .namespace("a-rather-long-namespace-for-this-service")
        .build()
        .await
        .unwrap();
    // 200 three-byte characters would be 600 bytes; 66 of them make 198 bytes, which
    // base64-encode past memcached's 250.
    let a = FlagKey::new("€".repeat(66)).unwrap();
    let b = FlagKey::new(format!("{}x", "€".repeat(65))).unwrap();
    let long_ascii = FlagKey::new("k".repeat(200)).unwrap();
    for (i, k) in [&a, &b, &long_ascii].into_iter().enumerate() {
        let out = store
            .put(
                k,
                &Entry::new(Version::new(1), vec![i as u8]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(out, PutOutcome::Stored);
    }
    for (i, k) in [&a, &b, &long_ascii].into_iter().enumerate() {
        assert_eq!(store.get(k).await.unwrap().unwrap().payload[..], [i as u8]);
    }
    let many = store
        .get_many(&[a.clone(), b.clone(), long_ascii.clone()])
        .await
        .unwrap();
    assert!(many.iter().all(Option::is_some));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_of_the_item_limit() {
    // A server with a 512 KiB item limit: the store reads it (less item overhead).
    let server = MemcachedServer::builder()
        .item_size_limit("512k")
        .start()
        .unwrap();
    let limit = 512 * 1024 - 512;
    let store = MemcachedStore::builder()
        .server(server.url())
        .max_chunks(1) // no chunking: the limit is the limit
        .build()
        .await
        .unwrap();
    assert_eq!(store.item_size_limit(), limit);
    // A limit set by hand wins over the server's.
    let told = MemcachedStore::builder()
        .server(server.url())
        .item_size_limit(100_000)
        .build()
        .await
        .unwrap();
    assert_eq!(told.item_size_limit(), 100_000);
    let noise = |n: usize| (0..n).map(|_| fastrand::u8(..)).collect::<Vec<u8>>();
    // Just under: stored and read back whole (28 bytes of envelope header).
    let under = FlagKey::new("under").unwrap();
    let e = Entry::new(Version::new(1), noise(limit - 28));
    assert_eq!(
        store
            .put(&under, &e, Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.get(&under).await.unwrap(), Some(e));
    // Just over: refused, nothing written, never dropped silently.
    let over = FlagKey::new("over").unwrap();
    let err = store
        .put(
            &over,
            &Entry::new(Version::new(1), noise(limit - 27)),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(err, Err(flagcache_core::Error::ValueTooLarge { .. })),
        "{err:?}"
    );
    assert_eq!(store.get(&over).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_item_limit_are_chunked_and_read_all_or_nothing() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .item_size_limit(64 * 1024)
        .max_chunks(8)
        .build()
        .await
        .unwrap();
    let big: Vec<u8> = (0..300 * 1024).map(|_| fastrand::u8(..)).collect();
    let key = FlagKey::new("big").unwrap();
    let e = Entry::new(Version::new(1), big.clone());
    assert_eq!(
        store.put(&key, &e, Duration::from_secs(60)).await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(e.clone()));
    assert_eq!(
        store.get_many(std::slice::from_ref(&key)).await.unwrap(),
        vec![Some(e.clone())]
    );
    // The version guard works on chunked values too.
    let older = Entry::new(Version::new(0), vec![1]);
    assert_eq!(
        store
            .put(&key, &older, Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Superseded {
            current: Version::new(1)
        }
    );
    // Over 8 chunks: refused, never dropped silently.
    let huge = Entry::new(
        Version::new(2),
        (0..600 * 1024)
            .map(|_| fastrand::u8(..))
            .collect::<Vec<u8>>(),
    );
    assert!(matches!(
        store.put(&key, &huge, Duration::from_secs(60)).await,
        Err(flagcache_core::Error::ValueTooLarge { .. })
    ));
    assert_eq!(
        store.get(&key).await.unwrap(),
        Some(e),
        "a refused write changed the value"
    );
    // One chunk lost (evicted): the value is a miss, never a torn value.
    let mut c = async_memcached::Client::new(&server.url()).await.unwrap();
    let mut chunk = None;
    {
        let mut dump = c.dump_keys().await.unwrap();
        while let Some(Ok(meta)) = dump.next().await {
            // metadump URL-encodes keys.
            let name = String::from_utf8_lossy(&meta.key)
                .replace("%3A", ":")
                .replace("%21", "!");
            if name.contains("chunk") {
                chunk = Some(name);
            }
        }
    }
    let chunk = chunk.expect("no chunk key found");
    c.meta_delete(chunk.as_bytes(), false, None, None)
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert_eq!(
        store.get_many(std::slice::from_ref(&key)).await.unwrap(),
        vec![None]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_chunked_write_leaves_the_stored_value_whole() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .item_size_limit(32 * 1024)
        .build()
        .await
        .unwrap();
    let key = FlagKey::new("big").unwrap();
    let noise = || {
        (0..100 * 1024)
            .map(|_| fastrand::u8(..))
            .collect::<Vec<u8>>()
    };
    let first = Entry::new(Version::new(3), noise());
    assert_eq!(
        store
            .put(&key, &first, Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    // Another replica loads the same version (other bytes, other stamp): superseded,
    // and the stored value must stay readable and whole.
    let same = Entry::new(Version::new(3), noise());
    assert_eq!(
        store
            .put(&key, &same, Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Superseded {
            current: Version::new(3)
        }
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(first));
    // A newer version replaces it, whole.
    let newer = Entry::new(Version::new(4), noise());
    assert_eq!(
        store
            .put(&key, &newer, Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(newer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_named_like_internal_keys_do_not_collide_with_them() {
    use flagcache_core::{FlagStoreExt, Invalidation, Invalidator};
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let log = flagcache_memcached::MemcachedInvalidator::new(&store);
    for name in ["inv:seq", "inv:1", "chunk:0", "#0123"] {
        let k = FlagKey::new(name).unwrap();
        store
            .put_value(
                &k,
                &name.to_string(),
                Version::new(1),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    log.publish(&Invalidation::all()).await.unwrap();
    log.publish(&Invalidation::all()).await.unwrap();
    for name in ["inv:seq", "inv:1", "chunk:0", "#0123"] {
        let k = FlagKey::new(name).unwrap();
        assert_eq!(
            store.get_value::<String>(&k).await.unwrap(),
            Some((name.to_string(), Version::new(1)))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_fails_no_operation_on_pooled_connections() {
    let mut server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .pool_size(4)
        .build()
        .await
        .unwrap();
    let keys: Vec<FlagKey> = (0..8)
        .map(|i| FlagKey::new(format!("restart.{i}")).unwrap())
        .collect();
    // Fill the pool: concurrent writes leave four idle connections behind.
    let entry = Entry::new(Version::new(1), Bytes::from_static(b"v"));
    let writes = keys
        .iter()
        .map(|k| store.put(k, &entry, Duration::from_secs(60)));
    for r in futures_util::future::join_all(writes).await {
        assert_eq!(r.unwrap(), PutOutcome::Stored);
    }
    // The server restarts (empty): every pooled connection is now dead.
    server.restart().unwrap();
    for k in &keys {
        assert_eq!(store.get(k).await.unwrap(), None, "{k}");
    }
    let stored = store
        .put(
            &keys[0],
            &Entry::new(Version::new(2), Bytes::from_static(b"w")),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(stored, PutOutcome::Stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_starts_with_a_server_of_its_ring_down() {
    let up = MemcachedServer::start().unwrap();
    let mut down = MemcachedServer::builder()
        .item_size_limit("2m")
        .start()
        .unwrap();
    down.stop();
    let store = MemcachedStore::builder()
        .servers([up.url(), down.url()])
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // The limit comes from the server that answered (memcached's default, 1 MiB).
    assert_eq!(store.item_size_limit(), (1 << 20) - 512);
    let keys: Vec<FlagKey> = (0..40)
        .map(|i| FlagKey::new(format!("k{i}")).unwrap())
        .collect();
    let entry = Entry::new(Version::new(1), Bytes::from_static(b"v"));
    let mut stored = 0;
    for k in &keys {
        if store.put(k, &entry, Duration::from_secs(60)).await.is_ok() {
            stored += 1;
        }
    }
    assert!(
        stored > 5 && stored < keys.len(),
        "stored {stored} of {}",
        keys.len()
    );
    // Back: its keys work without rebuilding the store.
    down.restart().unwrap();
    for k in &keys {
        store.put(k, &entry, Duration::from_secs(60)).await.unwrap();
    }
    // With no server reachable at all, building fails.
    down.stop();
    let err = MemcachedStore::builder()
        .server(down.url())
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_value_marked_stale_is_revalidated_by_its_own_version() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .item_size_limit(32 * 1024)
        .build()
        .await
        .unwrap();
    let key = FlagKey::new("big").unwrap();
    let payload: Vec<u8> = (0..100_000).map(|_| fastrand::u8(..)).collect();
    let entry = Entry::new(Version::new(3), payload);
    assert_eq!(
        store
            .put(&key, &entry, Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    store
        .mark_stale(&key, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    // The source confirms version 3: readable again, whole.
    store
        .put(&key, &entry, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Some(entry));
}
