//! Cross-process stampede protection with the meta protocol's recache flags: one load
//! for a fleet's cold reads, an absent flag, and refreshes served stale while one
//! process reloads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flagcache_core::{CacheStatus, FlagCache, FlagKey, FlagStore, StaleReason};
use flagcache_memcached::{MemcachedRecache, MemcachedStore};
use flagcache_testkit::{Answer, CountingSource, MemcachedServer};

mod common;
use common::replicas;

/// What `cache` serves for `k`: read every 5 ms until it is `want`, at most `tries`
/// times.
async fn read_until(cache: &FlagCache<String>, k: &FlagKey, want: &str, tries: usize) -> String {
    let mut got = String::new();
    for _ in 0..tries {
        got = cache.get(k).await.unwrap().unwrap().to_string();
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_replicas_times_100_cold_reads_cost_one_load() {
    let server = MemcachedServer::start().unwrap();
    let source = CountingSource::new(1).with_latency(Duration::from_millis(200));
    let replicas = replicas(&server, 8, source.clone(), None, |r| r).await;
    let k = FlagKey::new("cold").unwrap();
    let mut reads = Vec::new();
    for cache in &replicas {
        for _ in 0..100 {
            let (c, k) = (cache.clone(), k.clone());
            reads.push(tokio::spawn(async move { c.get(&k).await }));
        }
    }
    for r in reads {
        assert_eq!(
            r.await.unwrap().unwrap().as_deref().map(String::as_str),
            Some("cold@1")
        );
    }
    assert_eq!(source.calls(), 1, "loader calls across 8 replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_flag_does_not_make_the_fleet_wait_out_the_placeholder() {
    let server = MemcachedServer::start().unwrap();
    let source = CountingSource::new(1).with_latency(Duration::from_millis(100));
    source.set_answer(Answer::Absent);
    let replicas = replicas(&server, 4, source.clone(), None, |r| {
        r.ttl(Duration::from_secs(10))
    })
    .await;
    let t = std::time::Instant::now();
    let k = FlagKey::new("ghost").unwrap();
    let reads: Vec<_> = replicas
        .iter()
        .map(|c| {
            let (c, k) = (c.clone(), k.clone());
            tokio::spawn(async move { c.get(&k).await })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap().unwrap(), None);
    }
    // Each replica may load in turn, but nobody waits out the 10 s placeholder.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(source.calls() <= 4);
}

/// `FlagCache::refresh` marks the entry stale (`md … I`): exactly one process of the
/// fleet reloads it, and the others are answered with the stale value before that
/// refresh ends — proved by order (the loader is held until the answers are in), not
/// by time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_reloads_once_while_the_fleet_serves_the_stale_value() {
    let server = MemcachedServer::start().unwrap();
    let source = CountingSource::new(1);
    let replicas = replicas(
        &server,
        8,
        source.clone(),
        Some(Duration::from_millis(10)),
        |r| r.poll_interval(Duration::from_millis(5)),
    )
    .await;
    let k = FlagKey::new("rules").unwrap();
    for cache in &replicas {
        assert_eq!(cache.get(&k).await.unwrap().unwrap().as_str(), "rules@1");
    }
    assert_eq!(source.calls(), 1);

    // The source moves to v2; replica 0 asks the fleet to refresh, whose load is held
    // open until the test has seen the stale answers.
    source.set_version(2);
    source.hold();
    replicas[0].refresh(&k).await.unwrap();
    for cache in &replicas[1..] {
        for _ in 0..400 {
            if cache.stats().invalidations >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            cache.stats().invalidations >= 1,
            "the refresh never arrived"
        );
    }
    let mut reads = Vec::new();
    for cache in &replicas {
        for _ in 0..10 {
            let (c, k, source) = (cache.clone(), k.clone(), source.clone());
            reads.push(tokio::spawn(async move {
                let l = c.lookup(&k).await.unwrap();
                // `true` while the refresh's load, the source's second call, is open.
                (l, source.completed() < 2)
            }));
        }
    }
    // One replica's reads wait for the refresh it runs; the other 70 are answered
    // while it is held open.
    for _ in 0..1000 {
        if reads.iter().filter(|r| r.is_finished()).count() >= 70 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(source.calls(), 2, "exactly one process reloads");
    // A replica that is not the reloader (all its reads answered) reports a warm-up
    // of the key as stale, not as loaded.
    let bystander = (0..replicas.len())
        .find(|r| reads[r * 10..r * 10 + 10].iter().all(|t| t.is_finished()))
        .expect("a replica other than the reloader");
    let report = replicas[bystander].warm(std::slice::from_ref(&k)).await;
    assert_eq!((report.stale, report.loaded), (1, 0), "{report:?}");
    // Every replica keeps reading while the refresh lands: holding the stale value,
    // each revalidates on every read, and none may load again.
    let stop = Arc::new(AtomicBool::new(false));
    let mut pollers = Vec::new();
    for cache in &replicas {
        let (c, k, stop) = (cache.clone(), k.clone(), stop.clone());
        pollers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = c.lookup(&k).await;
                tokio::task::yield_now().await;
            }
        }));
    }
    source.release();
    let mut stale = 0;
    for r in reads {
        let (l, during_load) = r.await.unwrap();
        let value = l.value.as_deref().map(String::as_str);
        if l.status == CacheStatus::Stale(StaleReason::Revalidating) {
            assert_eq!(value, Some("rules@1"));
            assert!(during_load, "a stale answer came after the refresh ended");
            stale += 1;
        } else {
            assert_eq!(value, Some("rules@2"), "{l:?}");
        }
    }
    assert!(stale >= 70, "only {stale} stale answers");
    // Then the fleet converges on v2 without another load.
    for cache in &replicas {
        let got = read_until(cache, &k, "rules@2", 400).await;
        assert_eq!(got, "rules@2");
    }
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        p.await.unwrap();
    }
    assert_eq!(source.calls(), 2, "convergence cost a load");
}

/// The refresh's own notice comes back to the refresher while it reloads (here: a
/// 150 ms load, a 20 ms poll). That echo of an invalidation the refresher already
/// applied must not fence its reload: the value reaches L2 and the fleet without a
/// second load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_not_fenced_by_its_own_notice() {
    let server = MemcachedServer::start().unwrap();
    let source = CountingSource::new(1).with_latency(Duration::from_millis(150));
    let replicas = replicas(
        &server,
        2,
        source.clone(),
        Some(Duration::from_millis(20)),
        |r| r,
    )
    .await;
    let k = FlagKey::new("fenced").unwrap();
    for cache in &replicas {
        assert_eq!(cache.get(&k).await.unwrap().unwrap().as_str(), "fenced@1");
    }
    source.set_version(2);
    replicas[0].refresh(&k).await.unwrap();
    // Replica 0 reads at once: it wins the refresh, and its own notice lands while it
    // loads.
    let got = replicas[0].get(&k).await.unwrap().unwrap();
    assert_eq!(got.as_str(), "fenced@2");
    assert_eq!(source.calls(), 2);
    // The other replica finds the refreshed value in L2.
    let seen = read_until(&replicas[1], &k, "fenced@2", 200).await;
    assert_eq!(seen, "fenced@2");
    for cache in &replicas {
        assert_eq!(cache.get(&k).await.unwrap().unwrap().as_str(), "fenced@2");
    }
    assert_eq!(source.calls(), 2, "the refresh was loaded twice");
}

/// A hard `invalidate` during a refresh's load (the flag was deleted at the source)
/// must not be undone by the refresh writing its value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidate_during_a_refresh_is_not_undone_by_it() {
    let server = MemcachedServer::start().unwrap();
    let source = CountingSource::new(1);
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let cache = FlagCache::<String>::builder(store.clone(), source.clone())
        .coalescer(MemcachedRecache::new(&store))
        .build()
        .await
        .unwrap();
    let k = FlagKey::new("doomed").unwrap();
    cache.get(&k).await.unwrap();
    source.hold();
    cache.refresh(&k).await.unwrap();
    // The refresh's load reads the source while the flag is still there…
    let reading = {
        let (c, k) = (cache.clone(), k.clone());
        tokio::spawn(async move { c.get(&k).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // …and then the flag is deleted and invalidated everywhere.
    source.set_answer(Answer::Absent);
    cache.invalidate(&k).await.unwrap();
    source.release();
    let _ = reading.await.unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        None,
        "the refresh wrote a deleted flag back"
    );
}
