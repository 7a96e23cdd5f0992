//! Through Redis Sentinel: the store and the invalidator follow a failover to the
//! promoted replica, and subscribers are told to resync.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{assert_round_trip, key, next_within, on_both_flavors};
use flagcache_core::{
    FlagKey, FlagStore, FlagStoreExt, Invalidation, Invalidator, PutOutcome, Signal, Target,
    Version,
};
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::{Flavor, RedisSentinel};

async fn store_and_invalidator_carry_on_after_a_failover(flavor: Flavor) {
    let setup = RedisSentinel::start_with(flavor, None).unwrap();
    let sentinels = [setup.sentinel_url()];
    let store = RedisStore::builder()
        .sentinel(sentinels.clone(), RedisSentinel::SERVICE)
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let publisher = RedisInvalidator::builder()
        .sentinel(sentinels.clone(), RedisSentinel::SERVICE)
        .heartbeat(Some(Duration::from_millis(200)))
        .build()
        .await
        .unwrap();
    let subscriber = publisher.peer();
    let mut sub = subscriber.subscribe().await.unwrap();
    let k = key("k");
    let ttl = Duration::from_secs(60);
    assert_eq!(
        store
            .put_value(&k, &1u32, Version::new(1), ttl)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    // Both see the same events before the failover.
    publisher
        .publish(&Invalidation::key(k.clone()))
        .await
        .unwrap();
    assert!(matches!(
        next_within(&mut sub, Duration::from_secs(5)).await,
        Signal::Invalidated(_)
    ));

    // The primary dies; the sentinel promotes the replica.
    let setup = tokio::task::spawn_blocking(move || {
        let mut setup = setup;
        setup.fail_over().unwrap();
        setup
    })
    .await
    .unwrap();
    assert_eq!(setup.primary_port().unwrap(), setup.replica().port());

    // The store finds the new primary by itself.
    let t = Instant::now();
    let mut written = false;
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(out) = store.put_value(&k, &2u32, Version::new(2), ttl).await {
            assert_eq!(out, PutOutcome::Stored);
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written, "the store never reached the promoted replica");
    assert_eq!(
        store.get_value::<u32>(&k).await.unwrap(),
        Some((2, Version::new(2)))
    );
    assert!(store.get(&k).await.unwrap().is_some());

    // The subscriber reconnects to the new primary and says Resync before new events.
    let marker = key("after-failover");
    let mut resynced = false;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let _ = publisher.publish(&Invalidation::key(marker.clone())).await;
        match tokio::time::timeout(Duration::from_millis(500), sub.recv()).await {
            Ok(Some(Signal::Resync(_))) => resynced = true,
            Ok(Some(Signal::Invalidated(ev))) if ev.target == Target::Key(marker.clone()) => {
                assert!(
                    resynced,
                    "an event after the failover arrived before Resync"
                );
                return;
            }
            Ok(None) => panic!("subscription ended"),
            _ => {}
        }
    }
    panic!("no event after the failover (resynced: {resynced})");
}

async fn data_nodes_with_a_password(flavor: Flavor) {
    let setup = RedisSentinel::start_with(flavor, Some("n0de-secret")).unwrap();
    let sentinels = [setup.sentinel_url()];
    let err = RedisStore::builder()
        .sentinel(sentinels.clone(), RedisSentinel::SERVICE)
        .build()
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "no password: {err}");
    let store = RedisStore::builder()
        .sentinel(sentinels.clone(), RedisSentinel::SERVICE)
        .sentinel_node_auth(None, Some("n0de-secret"), 0)
        .build()
        .await
        .unwrap();
    assert!(
        !format!("{store:?}").contains("n0de-secret"),
        "Debug shows the password"
    );
    let k = key("k");
    assert_round_trip(&store, &k, 1).await;
    let inv = RedisInvalidator::builder()
        .sentinel(sentinels, RedisSentinel::SERVICE)
        .sentinel_node_auth(None, Some("n0de-secret"), 0)
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    inv.publish(&Invalidation::key(k.clone())).await.unwrap();
    assert!(matches!(
        next_within(&mut sub, Duration::from_secs(5)).await,
        Signal::Invalidated(_)
    ));
}

/// `total_connections_received` from a server's `INFO stats`.
fn connections_received(server: &flagcache_testkit::RedisServer) -> u64 {
    let info = server.command(&["INFO", "stats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats has total_connections_received")
}

/// A store through `setup`'s sentinel with the given response timeout, and a flag
/// written through it.
async fn store_with_a_flag(setup: &RedisSentinel, response: Duration) -> (RedisStore, FlagKey) {
    let store = RedisStore::builder()
        .sentinel([setup.sentinel_url()], RedisSentinel::SERVICE)
        .response_timeout(response)
        .connection_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let k = key("k");
    store
        .put_value(&k, &1u32, Version::new(1), Duration::from_secs(60))
        .await
        .unwrap();
    (store, k)
}

/// When the connection to the primary breaks under load, the requests that find it
/// gone wait for one rediscovery instead of each asking Sentinel and connecting anew:
/// a burst of 200 costs the primary a handful of new connections, not one each.
async fn a_burst_after_a_broken_connection_reconnects_once(flavor: Flavor) {
    let mut setup = RedisSentinel::start_with(flavor, None).unwrap();
    let (store, k) = store_with_a_flag(&setup, Duration::from_millis(500)).await;
    let before = connections_received(setup.primary_mut());
    // Every client connection of the primary dropped at once (ours included).
    setup
        .primary_mut()
        .command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .unwrap();
    let reads: Vec<_> = (0..200)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.get(&k).await })
        })
        .collect();
    let mut failed = 0;
    for r in reads {
        if r.await.unwrap().is_err() {
            failed += 1;
        }
    }
    // Reads work again.
    let t = Instant::now();
    while store.get(&k).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the store never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = connections_received(setup.primary_mut()) - before;
    assert!(
        opened <= 6,
        "{opened} new connections to the primary for a burst of 200 ({failed} reads failed)"
    );
}

/// A caller that gives up on a silent primary before the connection's own response
/// timeout (as `FlagCache`'s shorter L2 timeout does) still makes the store forget
/// that connection: the next call asks Sentinel and connects anew.
async fn a_call_given_up_on_a_silent_primary_forgets_its_connection(flavor: Flavor) {
    let mut setup = RedisSentinel::start_with(flavor, None).unwrap();
    let (store, k) = store_with_a_flag(&setup, Duration::from_secs(5)).await;
    let before = connections_received(setup.primary_mut());
    setup.primary_mut().pause().unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(300), store.get(&k)).await;
    setup.primary_mut().resume().unwrap();
    assert!(gave_up.is_err(), "the paused primary answered");
    assert!(store.get(&k).await.unwrap().is_some());
    // Besides the connection that asks INFO itself.
    let opened = connections_received(setup.primary_mut()) - before - 1;
    assert!(
        opened >= 1,
        "the silent connection was reused instead of forgotten"
    );
}

on_both_flavors!(
    store_and_invalidator_carry_on_after_a_failover,
    data_nodes_with_a_password,
    a_burst_after_a_broken_connection_reconnects_once,
    a_call_given_up_on_a_silent_primary_forgets_its_connection,
);
