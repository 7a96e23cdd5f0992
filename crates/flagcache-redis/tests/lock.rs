//! Cross-process stampede protection with a Redis lock, against a real server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{key, on_both_flavors};
use flagcache_core::{FlagCache, FlagKey};
use flagcache_redis::{RedisLock, RedisStore};
use flagcache_testkit::{Answer, CountingSource, Flavor, RedisServer};

/// `n` replicas over `server`, each with its own connections (as separate processes
/// would have), loading from `source` behind a `RedisLock` made by `lock`; with an
/// invalidator each when `invalidate` is set.
async fn replicas(
    server: &RedisServer,
    n: usize,
    source: &CountingSource,
    lock: impl Fn(RedisLock) -> RedisLock,
    invalidate: bool,
) -> Vec<FlagCache<String>> {
    let mut replicas = Vec::new();
    for i in 0..n {
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let mut builder = FlagCache::<String>::builder(store.clone(), source.clone())
            .name(format!("replica-{i}"))
            .coalescer(lock(RedisLock::new(&store)));
        if invalidate {
            let inv = flagcache_redis::RedisInvalidator::connect(&server.url())
                .await
                .unwrap();
            builder = builder.invalidator(inv);
        }
        replicas.push(builder.build().await.unwrap());
    }
    replicas
}

/// `cache.get(k)` on a task of its own.
fn spawn_get(
    cache: &FlagCache<String>,
    k: &FlagKey,
) -> tokio::task::JoinHandle<flagcache_core::Result<Option<Arc<String>>>> {
    let (c, k) = (cache.clone(), k.clone());
    tokio::spawn(async move { c.get(&k).await })
}

/// `per_replica` concurrent reads of `k` on every replica.
fn read_storm(
    replicas: &[FlagCache<String>],
    k: &FlagKey,
    per_replica: usize,
) -> Vec<tokio::task::JoinHandle<flagcache_core::Result<Option<Arc<String>>>>> {
    replicas
        .iter()
        .flat_map(|cache| (0..per_replica).map(move |_| spawn_get(cache, k)))
        .collect()
}

async fn eight_replicas_times_100_cold_reads_cost_one_load(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let source = CountingSource::new(1).with_latency(Duration::from_millis(200));
    let replicas = replicas(&server, 8, &source, |l| l, false).await;
    let k = key("cold");
    for r in read_storm(&replicas, &k, 100) {
        let v = r.await.unwrap().unwrap();
        assert_eq!(v.as_deref().map(String::as_str), Some("cold@1"));
    }
    assert_eq!(source.calls(), 1, "loader calls across 8 replicas");
    assert_eq!(
        server.command(&["EXISTS", "flags:lock:{cold}"]).unwrap(),
        "0",
        "lock released"
    );
}

async fn a_dead_lock_holder_is_taken_over_after_its_ttl(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let source = CountingSource::new(1).with_latency(Duration::from_millis(1));
    let cache = FlagCache::<String>::builder(store.clone(), source.clone())
        .coalescer(RedisLock::new(&store).ttl(Duration::from_millis(300)))
        .build()
        .await
        .unwrap();
    // A process took the lock and died: nobody will ever write the value. (Taken right
    // before the read, so that the read waits out most of its 300 ms however slowly
    // the setup ran.)
    let t = Instant::now();
    server
        .command(&["SET", "flags:lock:{orphan}", "dead-holder", "PX", "300"])
        .unwrap();
    let v = cache.get(&key("orphan")).await.unwrap();
    assert_eq!(v.as_deref().map(String::as_str), Some("orphan@1"));
    assert_eq!(source.calls(), 1);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "did not wait for the holder: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "waited too long: {waited:?}"
    );
}

/// Waiters wake when the holder announces its release, not at their next poll: with a
/// 10 s poll interval, the other replicas still get the value within moments of the
/// load ending.
async fn waiters_wake_on_the_release_announcement_not_the_next_poll(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let source = CountingSource::new(1).with_latency(Duration::from_millis(300));
    let slow_poll = |l: RedisLock| l.poll_interval(Duration::from_secs(10));
    let replicas = replicas(&server, 3, &source, slow_poll, false).await;
    let k = key("announced");
    let started = Instant::now();
    let first = spawn_get(&replicas[0], &k);
    // The others arrive while the first holds the lock.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let others: Vec<_> = replicas[1..]
        .iter()
        .map(|c| {
            let (c, k) = (c.clone(), k.clone());
            tokio::spawn(async move { (c.get(&k).await, started.elapsed()) })
        })
        .collect();
    first.await.unwrap().unwrap();
    for o in others {
        let (v, took) = o.await.unwrap();
        assert_eq!(
            v.unwrap().as_deref().map(String::as_str),
            Some("announced@1")
        );
        assert!(took < Duration::from_secs(2), "a waiter took {took:?}");
    }
    assert_eq!(source.calls(), 1, "one load for the three replicas");
}

/// A flag the source does not have, read by 8 replicas at once: the lock holder's
/// answer reaches the waiters through a short-lived marker, so the source is asked
/// once — not once per replica, each taking the lock in turn to ask again.
async fn an_absent_flag_costs_the_source_one_call_across_replicas(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let absent = CountingSource::new(1).with_latency(Duration::from_millis(200));
    absent.set_answer(Answer::Absent);
    let replicas = replicas(&server, 8, &absent, |l| l, false).await;
    let k = key("not-created-yet");
    for r in read_storm(&replicas, &k, 50) {
        assert_eq!(r.await.unwrap().unwrap(), None, "no such flag");
    }
    assert_eq!(absent.calls(), 1, "loader calls across 8 replicas");
    // The marker is short-lived: a flag created later is found by the next load.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        server
            .command(&["EXISTS", "flags:absent:{not-created-yet}"])
            .unwrap(),
        "0",
        "the absence marker expired"
    );
}

/// The same, with a holder that never hears the invalidation (no subscription): the
/// key's fence, read when the lock was taken, has changed by its release, so it
/// leaves no absence marker for the fleet to answer "no such flag" from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absence_fenced_by_an_unheard_invalidation_leaves_no_marker() {
    let server = RedisServer::start().unwrap();
    let source = CountingSource::new(1);
    source.set_answer(Answer::Absent);
    let replicas = replicas(&server, 2, &source, |l| l, false).await;
    let k = key("created-unheard");
    source.hold();
    let holder = spawn_get(&replicas[0], &k);
    let spawned = Instant::now();
    while source.calls() == 0 {
        assert!(
            spawned.elapsed() < Duration::from_secs(5),
            "the holder never called the source"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    replicas[1].invalidate(&k).await.unwrap();
    source.release();
    assert_eq!(
        holder.await.unwrap().unwrap(),
        None,
        "the holder's own answer"
    );
    assert_eq!(
        server
            .command(&["EXISTS", "flags:absent:{created-unheard}"])
            .unwrap(),
        "0",
        "a fenced absence left its marker"
    );
}

/// A "no such flag" that an invalidation overtook — the flag was created while the
/// holder asked — is not handed to the waiters: they load it themselves and find it.
async fn an_absence_overtaken_by_an_invalidation_is_not_shared(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    // The first call answers "none" slowly; the flag exists for every later one.
    let source = CountingSource::new(1).with_latency(Duration::from_millis(400));
    source.set_answer(Answer::Absent);
    let replicas = replicas(&server, 2, &source, |l| l, true).await;
    let k = key("created-meanwhile");
    let spawned = Instant::now();
    let holder = spawn_get(&replicas[0], &k);
    // A call sees the source as it is when it starts: once the holder's has started,
    // every later one finds the flag at once.
    while source.calls() == 0 {
        assert!(
            spawned.elapsed() < Duration::from_secs(5),
            "the holder never called the source"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    source.set_answer(Answer::Value);
    source.set_latency(Duration::ZERO);
    tokio::time::sleep_until((spawned + Duration::from_millis(100)).into()).await;
    let waiter = spawn_get(&replicas[1], &k);
    // The control plane creates the flag and tells the fleet, mid-load.
    tokio::time::sleep(Duration::from_millis(100)).await;
    replicas[1].invalidate(&k).await.unwrap();
    assert_eq!(
        holder.await.unwrap().unwrap(),
        None,
        "the holder's own answer"
    );
    assert_eq!(
        waiter
            .await
            .unwrap()
            .unwrap()
            .as_deref()
            .map(String::as_str),
        Some("created-meanwhile@1"),
        "the waiter found the new flag"
    );
}

async fn the_lock_passes_the_coalescer_properties(flavor: Flavor) {
    use flagcache_core::{conformance, Coalescer};
    let server = RedisServer::start_with(flavor).unwrap();
    // One store and one lock per simulated process, all on the one server.
    let mut fleet: Vec<Arc<dyn Coalescer>> = Vec::new();
    for _ in 0..6 {
        let store = RedisStore::connect(&server.url()).await.unwrap();
        fleet.push(Arc::new(RedisLock::new(&store)));
    }
    let store = RedisStore::connect(&server.url()).await.unwrap();
    conformance::one_load_per_burst(&fleet, Arc::new(store)).await;
    conformance::abandoned_lease_frees_the_key(
        fleet[0].clone(),
        fleet[1].clone(),
        fleet[2].clone(),
    )
    .await;
}

async fn a_loader_that_panics_releases_the_lock_at_once(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    // The first call panics after 300 ms, holding the lock until then; later calls answer.
    let source = CountingSource::new(1).with_latency(Duration::from_millis(300));
    source.set_answer(Answer::Panic);
    let fleet = replicas(&server, 2, &source, |l| l, false).await;
    let k = key("panicking-holder");
    let holder = spawn_get(&fleet[0], &k);
    while source.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    source.set_answer(Answer::Value);
    source.set_latency(Duration::ZERO);
    let started = Instant::now();
    let waiter = fleet[1].get(&k).await.unwrap();
    // The lock's TTL is 10 s: a holder whose unwinding did not release it would keep
    // the waiter until then.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the waiter waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        waiter.as_deref().map(String::as_str),
        Some("panicking-holder@1")
    );
    assert!(
        holder.await.unwrap().is_err(),
        "the panicking load is an error"
    );
    assert_eq!(source.calls(), 2);
}

on_both_flavors!(
    eight_replicas_times_100_cold_reads_cost_one_load,
    a_dead_lock_holder_is_taken_over_after_its_ttl,
    waiters_wake_on_the_release_announcement_not_the_next_poll,
    an_absent_flag_costs_the_source_one_call_across_replicas,
    an_absence_overtaken_by_an_invalidation_is_not_shared,
    the_lock_passes_the_coalescer_properties,
    a_loader_that_panics_releases_the_lock_at_once,
);
