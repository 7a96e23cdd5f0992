//! Values at and over the item limit: the limit read from the server at build, a value
//! just over it refused when chunking is off, and larger values split in chunks that
//! are read back all or nothing, under the version guard.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use async_memcached::MetaProtocol;
use flagcache_core::{Entry, FlagStore, FlagStoreExt, PutOutcome, Version};
use flagcache_memcached::MemcachedStore;
use flagcache_testkit::MemcachedServer;

mod common;
use common::{key, noise, put, store_with_item_limit, TTL};

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
    let told = store_with_item_limit(&server, 100_000).await;
    assert_eq!(told.item_size_limit(), 100_000);
    // Just under: stored and read back whole (28 bytes of envelope header).
    let under = key("under");
    let e = Entry::new(Version::new(1), noise(limit - 28));
    assert_eq!(put(&store, &under, &e).await, PutOutcome::Stored);
    assert_eq!(store.get(&under).await.unwrap(), Some(e));
    // Just over: refused, nothing written, never dropped silently.
    let over = key("over");
    let err = store
        .put(&over, &Entry::new(Version::new(1), noise(limit - 27)), TTL)
        .await;
    assert!(
        matches!(err, Err(flagcache_core::Error::ValueTooLarge { .. })),
        "{err:?}"
    );
    assert_eq!(store.get(&over).await.unwrap(), None);
}

/// Deletes one chunk of the (only) chunked value on `server`, as an eviction would.
async fn lose_a_chunk(server: &MemcachedServer) {
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
    let key = key("big");
    let e = Entry::new(Version::new(1), noise(300 * 1024));
    assert_eq!(put(&store, &key, &e).await, PutOutcome::Stored);
    assert_eq!(store.get(&key).await.unwrap(), Some(e.clone()));
    assert_eq!(
        store.get_many(std::slice::from_ref(&key)).await.unwrap(),
        vec![Some(e.clone())]
    );
    // The version guard works on chunked values too.
    let older = Entry::new(Version::new(0), vec![1]);
    assert_eq!(
        put(&store, &key, &older).await,
        PutOutcome::Superseded {
            current: Version::new(1)
        }
    );
    // Over 8 chunks: refused, never dropped silently.
    let huge = Entry::new(Version::new(2), noise(600 * 1024));
    assert!(matches!(
        store.put(&key, &huge, TTL).await,
        Err(flagcache_core::Error::ValueTooLarge { .. })
    ));
    assert_eq!(
        store.get(&key).await.unwrap(),
        Some(e),
        "a refused write changed the value"
    );
    // One chunk lost (evicted): the value is a miss, never a torn value.
    lose_a_chunk(&server).await;
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert_eq!(
        store.get_many(std::slice::from_ref(&key)).await.unwrap(),
        vec![None]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_chunked_write_leaves_the_stored_value_whole() {
    let server = MemcachedServer::start().unwrap();
    let store = store_with_item_limit(&server, 32 * 1024).await;
    let key = key("big");
    let first = Entry::new(Version::new(3), noise(100 * 1024));
    assert_eq!(put(&store, &key, &first).await, PutOutcome::Stored);
    // Another replica loads the same version (other bytes, other stamp): superseded,
    // and the stored value must stay readable and whole.
    let same = Entry::new(Version::new(3), noise(100 * 1024));
    assert_eq!(
        put(&store, &key, &same).await,
        PutOutcome::Superseded {
            current: Version::new(3)
        }
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(first));
    // A newer version replaces it, whole.
    let newer = Entry::new(Version::new(4), noise(100 * 1024));
    assert_eq!(put(&store, &key, &newer).await, PutOutcome::Stored);
    assert_eq!(store.get(&key).await.unwrap(), Some(newer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_value_marked_stale_is_revalidated_by_its_own_version() {
    let server = MemcachedServer::start().unwrap();
    let store = store_with_item_limit(&server, 32 * 1024).await;
    let key = key("big");
    let entry = Entry::new(Version::new(3), noise(100_000));
    assert_eq!(put(&store, &key, &entry).await, PutOutcome::Stored);
    store
        .fence(
            &key,
            std::time::Duration::from_secs(30),
            Some(std::time::Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    // The source confirms version 3: readable again, whole.
    put(&store, &key, &entry).await;
    assert_eq!(store.get(&key).await.unwrap(), Some(entry));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_value_with_a_lost_chunk_guards_only_against_older_versions() {
    let server = MemcachedServer::start().unwrap();
    let store = store_with_item_limit(&server, 32 * 1024).await;
    let key = key("big");
    let high = Entry::new(Version::new(9), noise(100 * 1024));
    assert_eq!(put(&store, &key, &high).await, PutOutcome::Stored);
    lose_a_chunk(&server).await;
    assert_eq!(store.get(&key).await.unwrap(), None);
    // Its manifest's version 9 is authenticated by its checksum: a slow replica's older
    // value must not replace it…
    let older = Entry::new(Version::new(5), vec![5]);
    assert_eq!(
        put(&store, &key, &older).await,
        PutOutcome::Superseded {
            current: Version::new(9)
        }
    );
    // …while a load of version 9 (small or chunked) repairs it.
    let reloaded = Entry::new(Version::new(9), vec![9]);
    assert_eq!(put(&store, &key, &reloaded).await, PutOutcome::Stored);
    assert_eq!(store.get(&key).await.unwrap(), Some(reloaded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_write_over_unreadable_bytes_is_stored() {
    let server = MemcachedServer::start().unwrap();
    let store = store_with_item_limit(&server, 32 * 1024).await;
    let key = key("big");
    // A readable header at version 1,000,000 over a payload whose checksum fails.
    let claim = Entry::new(Version::new(1_000_000), vec![1, 2, 3]);
    let mut bytes = store.codec().encode_entry(&claim).unwrap().to_vec();
    *bytes.last_mut().unwrap() ^= 0x40;
    let mut c = async_memcached::Client::new(&server.url()).await.unwrap();
    c.meta_set(
        store.memcached_key(&key).as_bytes(),
        &bytes[..],
        false,
        None,
        Some(&["T60"]),
    )
    .await
    .unwrap();
    let big = Entry::new(Version::new(5), noise(100 * 1024));
    assert_eq!(put(&store, &key, &big).await, PutOutcome::Stored);
    assert_eq!(store.get(&key).await.unwrap(), Some(big));
}
