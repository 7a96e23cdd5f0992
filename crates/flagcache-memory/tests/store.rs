//! Behaviour of `MemoryStore` and `MemoryInvalidator` beyond the shared suite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flagcache_core::{
    Entry, FlagKey, FlagStore, Invalidation, Invalidator, PutOutcome, ResyncReason, Signal, Version,
};
use flagcache_memory::{MemoryInvalidator, MemoryStore};

fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

#[tokio::test]
async fn clones_share_entries() {
    let a = MemoryStore::new();
    let b = a.clone();
    let e = Entry::new(Version::new(1), &b"x"[..]);
    a.put(&key("k"), &e, Duration::from_secs(5)).await.unwrap();
    assert_eq!(b.get(&key("k")).await.unwrap(), Some(e));
    assert_eq!(b.len(), 1);
}

#[tokio::test]
async fn large_payloads_are_kept_compressed() {
    let store = MemoryStore::new();
    let text = "rule: country in [DE, FR, NL] -> treatment\n".repeat(500);
    let e = Entry::new(Version::new(1), text.clone().into_bytes());
    store
        .put(&key("big"), &e, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(store.get(&key("big")).await.unwrap(), Some(e));
    // The max_value_size check applies to the stored (compressed) size: a 21 KB text
    // fits under a 4 KiB limit once gzip'd.
    let small = MemoryStore::builder().max_value_size(4096).build();
    let e = Entry::new(Version::new(1), text.into_bytes());
    assert_eq!(
        small
            .put(&key("big"), &e, Duration::from_secs(5))
            .await
            .unwrap(),
        PutOutcome::Stored
    );
}

#[tokio::test]
async fn refused_write_keeps_the_ttl_of_the_stored_entry() {
    let store = MemoryStore::new();
    let k = key("k");
    store
        .put(
            &k,
            &Entry::new(Version::new(2), &b"new"[..]),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    // A superseded write must not extend the newer entry's life either.
    let out = store
        .put(
            &k,
            &Entry::new(Version::new(1), &b"old"[..]),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        PutOutcome::Superseded {
            current: Version::new(2)
        }
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.get(&k).await.unwrap(), None);
}

#[tokio::test]
async fn lag_reports_how_many_events_were_missed() {
    let a = MemoryInvalidator::builder().capacity(4).build();
    let mut sub = a.subscribe().await.unwrap();
    for i in 0..10 {
        a.publish(&Invalidation::key(key(&format!("k{i}"))))
            .await
            .unwrap();
    }
    assert_eq!(
        sub.recv().await,
        Some(Signal::Resync(ResyncReason::Lagged { missed: 6 }))
    );
    // Then the 4 retained events, in order.
    for i in 6..10 {
        match sub.recv().await {
            Some(Signal::Invalidated(ev)) => assert_eq!(ev.seq, i + 1),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn publishing_with_no_subscriber_is_fine_and_peers_are_distinct_nodes() {
    let a = MemoryInvalidator::new();
    a.publish(&Invalidation::all()).await.unwrap();
    let b = a.peer();
    assert_ne!(a.node_id(), b.node_id());
    assert_eq!(a.clone().node_id(), a.node_id());
}
