//! Cross-process stampede protection with the meta protocol's recache flags, and a
//! server of a ring dying.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flagcache_core::{CacheStatus, Error, FlagCache, FlagKey, FlagStore, StaleReason, Version};
use flagcache_memcached::{MemcachedInvalidator, MemcachedRecache, MemcachedStore};
use flagcache_testkit::MemcachedServer;

type Loader = Arc<
    dyn Fn(
            FlagKey,
        ) -> futures_util::future::BoxFuture<
            'static,
            flagcache_core::Result<Option<(String, Version)>>,
        > + Send
        + Sync,
>;

fn source(
    calls: &Arc<AtomicUsize>,
    latency: Duration,
    up: Arc<std::sync::atomic::AtomicBool>,
) -> Loader {
    let calls = calls.clone();
    Arc::new(move |k: FlagKey| {
        let (calls, up) = (calls.clone(), up.clone());
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(latency).await;
            if up.load(Ordering::SeqCst) {
                Ok(Some((format!("{k}@1"), Version::new(1))))
            } else {
                Err(Error::loader(&k, std::io::Error::other("source down")))
            }
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_replicas_times_100_cold_reads_cost_one_load() {
    let server = MemcachedServer::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = source(&calls, Duration::from_millis(200), up);
    let mut replicas = Vec::new();
    for _ in 0..8 {
        let store = MemcachedStore::connect(&server.url()).await.unwrap();
        let load = load.clone();
        replicas.push(
            FlagCache::<String>::builder(store.clone(), move |k| load(k))
                .cross_process(MemcachedRecache::new(&store))
                .build()
                .await
                .unwrap(),
        );
    }
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
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "loader calls across 8 replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_server_of_three_costs_only_its_keys() {
    let mut servers: Vec<MemcachedServer> =
        (0..3).map(|_| MemcachedServer::start().unwrap()).collect();
    let urls: Vec<String> = servers.iter().map(MemcachedServer::url).collect();
    let store = MemcachedStore::builder()
        .servers(urls)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = source(&calls, Duration::from_millis(1), up.clone());
    let cache = FlagCache::<String>::builder(store.clone(), move |k| load(k))
        .fresh_for(Duration::from_millis(50))
        .stale_for(Duration::ZERO)
        .circuit_breaker(1_000, Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let keys: Vec<FlagKey> = (0..60)
        .map(|i| FlagKey::new(format!("k{i}")).unwrap())
        .collect();
    for k in &keys {
        cache.get(k).await.unwrap();
    }
    servers[1].stop();
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The other two servers keep answering; the dead one's keys miss.
    let mut alive = 0;
    let mut dead = 0;
    for k in &keys {
        match store.get(k).await {
            Ok(Some(_)) => alive += 1,
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                dead += 1;
            }
            Ok(None) => panic!("{k} vanished from a live server"),
        }
    }
    assert!(alive > 20 && dead > 5, "alive {alive}, dead {dead}");
    // With the source down too, the cache answers every key: fresh from live servers,
    // fail-safe for the dead one's.
    up.store(false, Ordering::SeqCst);
    for k in &keys {
        let l = cache.lookup(k).await.unwrap();
        assert!(
            matches!(
                l.status,
                CacheStatus::HitL2 | CacheStatus::Stale(StaleReason::FailSafe)
            ),
            "{k}: {:?}",
            l.status
        );
    }
    // Restarted (empty): reads recover without restarting anything.
    servers[1].restart().unwrap();
    up.store(true, Ordering::SeqCst);
    let mut recovered = 0;
    for _ in 0..50 {
        recovered = 0;
        for k in &keys {
            if store.get(k).await.is_ok() {
                recovered += 1;
            }
        }
        if recovered == keys.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        recovered,
        keys.len(),
        "the restarted server never came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_flag_does_not_make_the_fleet_wait_out_the_placeholder() {
    let server = MemcachedServer::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut replicas = Vec::new();
    for _ in 0..4 {
        let store = MemcachedStore::connect(&server.url()).await.unwrap();
        let calls = calls.clone();
        replicas.push(
            FlagCache::<String>::builder(store.clone(), move |_k: FlagKey| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(None)
                }
            })
            .cross_process(MemcachedRecache::new(&store).ttl(Duration::from_secs(10)))
            .build()
            .await
            .unwrap(),
        );
    }
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
    assert!(calls.load(Ordering::SeqCst) <= 4);
}

/// `FlagCache::refresh` marks the entry stale (`md … I`): exactly one process of the
/// fleet reloads it, and the others are answered with the stale value before that
/// refresh ends — proved by order (the loader is held until the answers are in), not
/// by time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_reloads_once_while_the_fleet_serves_the_stale_value() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let server = MemcachedServer::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let version = Arc::new(AtomicU64::new(1));
    let ended = Arc::new(AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Notify::new());
    let hold = Arc::new(AtomicBool::new(false));
    let load = {
        let (calls, version, ended, release, hold) = (
            calls.clone(),
            version.clone(),
            ended.clone(),
            release.clone(),
            hold.clone(),
        );
        Arc::new(move |k: FlagKey| {
            let (calls, version, ended, release, hold) = (
                calls.clone(),
                version.clone(),
                ended.clone(),
                release.clone(),
                hold.clone(),
            );
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let v = version.load(Ordering::SeqCst);
                if hold.load(Ordering::SeqCst) {
                    // The refresh: held open until the test has seen the stale answers.
                    release.notified().await;
                    ended.store(true, Ordering::SeqCst);
                }
                Ok(Some((format!("{k}@{v}"), Version::new(v))))
            }
        })
    };
    let mut replicas = Vec::new();
    for _ in 0..8 {
        let store = MemcachedStore::connect(&server.url()).await.unwrap();
        let log = MemcachedInvalidator::new(&store).poll_interval(Duration::from_millis(10));
        let load = load.clone();
        replicas.push(
            FlagCache::<String>::builder(store.clone(), move |k| load(k))
                .invalidator(log)
                .cross_process(
                    MemcachedRecache::new(&store).poll_interval(Duration::from_millis(5)),
                )
                .build()
                .await
                .unwrap(),
        );
    }
    let k = FlagKey::new("rules").unwrap();
    for cache in &replicas {
        assert_eq!(cache.get(&k).await.unwrap().unwrap().as_str(), "rules@1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The source moves to v2; replica 0 asks the fleet to refresh.
    version.store(2, Ordering::SeqCst);
    hold.store(true, Ordering::SeqCst);
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
            let (c, k, ended) = (cache.clone(), k.clone(), ended.clone());
            reads.push(tokio::spawn(async move {
                let l = c.lookup(&k).await.unwrap();
                (l, !ended.load(Ordering::SeqCst))
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
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "exactly one process reloads"
    );
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
    release.notify_one();
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
        let mut got = String::new();
        for _ in 0..400 {
            got = cache.get(&k).await.unwrap().unwrap().to_string();
            if got == "rules@2" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(got, "rules@2");
    }
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        p.await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "convergence cost a load");
}

/// The refresh's own notice comes back to the refresher while it reloads (here: a
/// 150 ms load, a 20 ms poll). That echo of an invalidation the refresher already
/// applied must not fence its reload: the value reaches L2 and the fleet without a
/// second load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_not_fenced_by_its_own_notice() {
    use std::sync::atomic::AtomicU64;
    let server = MemcachedServer::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let version = Arc::new(AtomicU64::new(1));
    let load = {
        let (calls, version) = (calls.clone(), version.clone());
        Arc::new(move |k: FlagKey| {
            let (calls, version) = (calls.clone(), version.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let v = version.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok(Some((format!("{k}@{v}"), Version::new(v))))
            }
        })
    };
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = MemcachedStore::connect(&server.url()).await.unwrap();
        let log = MemcachedInvalidator::new(&store).poll_interval(Duration::from_millis(20));
        let load = load.clone();
        replicas.push(
            FlagCache::<String>::builder(store.clone(), move |k| load(k))
                .invalidator(log)
                .cross_process(MemcachedRecache::new(&store))
                .build()
                .await
                .unwrap(),
        );
    }
    let k = FlagKey::new("fenced").unwrap();
    for cache in &replicas {
        assert_eq!(cache.get(&k).await.unwrap().unwrap().as_str(), "fenced@1");
    }
    version.store(2, Ordering::SeqCst);
    replicas[0].refresh(&k).await.unwrap();
    // Replica 0 reads at once: it wins the refresh, and its own notice lands while it
    // loads.
    let got = replicas[0].get(&k).await.unwrap().unwrap();
    assert_eq!(got.as_str(), "fenced@2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The other replica finds the refreshed value in L2.
    let mut seen = String::new();
    for _ in 0..200 {
        seen = replicas[1].get(&k).await.unwrap().unwrap().to_string();
        if seen == "fenced@2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen, "fenced@2");
    for cache in &replicas {
        assert_eq!(cache.get(&k).await.unwrap().unwrap().as_str(), "fenced@2");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the refresh was loaded twice"
    );
}

/// A hard `invalidate` during a refresh's load (the flag was deleted at the source)
/// must not be undone by the refresh writing its value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidate_during_a_refresh_is_not_undone_by_it() {
    use std::sync::atomic::AtomicBool;
    let server = MemcachedServer::start().unwrap();
    let present = Arc::new(AtomicBool::new(true));
    let release = Arc::new(tokio::sync::Notify::new());
    let hold = Arc::new(AtomicBool::new(false));
    let load = {
        let (present, release, hold) = (present.clone(), release.clone(), hold.clone());
        move |k: FlagKey| {
            let (present, release, hold) = (present.clone(), release.clone(), hold.clone());
            async move {
                let answer = present
                    .load(Ordering::SeqCst)
                    .then(|| (format!("{k}@1"), Version::new(1)));
                if hold.load(Ordering::SeqCst) {
                    release.notified().await;
                }
                Ok(answer)
            }
        }
    };
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let cache = FlagCache::<String>::builder(store.clone(), load)
        .cross_process(MemcachedRecache::new(&store))
        .build()
        .await
        .unwrap();
    let k = FlagKey::new("doomed").unwrap();
    cache.get(&k).await.unwrap();
    hold.store(true, Ordering::SeqCst);
    cache.refresh(&k).await.unwrap();
    // The refresh's load reads the source while the flag is still there…
    let reading = {
        let (c, k) = (cache.clone(), k.clone());
        tokio::spawn(async move { c.get(&k).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // …and then the flag is deleted and invalidated everywhere.
    present.store(false, Ordering::SeqCst);
    cache.invalidate(&k).await.unwrap();
    release.notify_one();
    let _ = reading.await.unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        None,
        "the refresh wrote a deleted flag back"
    );
}

/// Resumes a paused server even when the test fails first.
struct Paused<'a>(&'a MemcachedServer);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

/// Concurrent misses are batched per server: with one of two servers hung (it takes
/// requests and never answers), the keys on the other still come from L2 at once —
/// no batch mixes the two — and only the hung server's keys fall to the loader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_delays_only_its_own_keys_batches_stay_per_server() {
    let (a, b) = (
        MemcachedServer::start().unwrap(),
        MemcachedServer::start().unwrap(),
    );
    let store = MemcachedStore::builder()
        .servers([a.url(), b.url()])
        .namespace("per-server")
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let keys: Vec<FlagKey> = (0..60)
        .map(|i| FlagKey::new(format!("spread.{i}")).unwrap())
        .collect();
    for (i, k) in keys.iter().enumerate() {
        flagcache_core::FlagStoreExt::put_value(
            &store,
            k,
            &format!("l2:{i}"),
            Version::new(1),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    let groups: Vec<u64> = keys.iter().map(|k| store.read_group(k).unwrap()).collect();
    assert!(
        groups.contains(&0) && groups.contains(&1),
        "keys on both servers"
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let loader = source(&calls, Duration::ZERO, up);
    let cache = FlagCache::<String>::builder(store, move |k| loader(k))
        .l2_batch_after(1)
        .l2_timeout(Duration::from_millis(400))
        // Counts failures, not the hung server's keys: stays closed for this test.
        .circuit_breaker(1_000, Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    // Server index 1 is b (the ring keeps the configured order).
    b.pause().unwrap();
    let _resume = Paused(&b);
    let started = std::time::Instant::now();
    let reads: Vec<_> = keys
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move {
                let l = cache.lookup(&k).await;
                (l, started.elapsed())
            })
        })
        .collect();
    for ((r, i), group) in reads.into_iter().zip(0..).zip(&groups) {
        let (l, took) = r.await.unwrap();
        let l = l.unwrap();
        if *group == 0 {
            assert_eq!(l.status, CacheStatus::HitL2, "key {i} on the live server");
            assert_eq!(
                l.value.as_deref().map(String::as_str),
                Some(format!("l2:{i}").as_str())
            );
            assert!(
                took < Duration::from_millis(300),
                "key {i} on the live server took {took:?}"
            );
        } else {
            assert_eq!(
                l.status,
                CacheStatus::Miss,
                "key {i} on the hung server: loaded"
            );
        }
    }
    let on_b = groups.iter().filter(|g| **g == 1).count();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        on_b,
        "only the hung server's keys loaded"
    );
    assert!(cache.stats().l2_batches > 0, "{:?}", cache.stats());
}

/// Building a store probes its servers at once: two that hang cost one timeout in
/// all, not one each — and the store still builds over the one that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_probes_every_server_at_once() {
    let servers = [
        MemcachedServer::start().unwrap(),
        MemcachedServer::start().unwrap(),
        MemcachedServer::start().unwrap(),
    ];
    servers[1].pause().unwrap();
    let _resume1 = Paused(&servers[1]);
    servers[2].pause().unwrap();
    let _resume2 = Paused(&servers[2]);
    let started = std::time::Instant::now();
    let store = MemcachedStore::builder()
        .servers(servers.iter().map(MemcachedServer::url))
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let took = started.elapsed();
    // One after the other, the two hung servers would take 2 s or more.
    assert!(took < Duration::from_millis(1800), "build took {took:?}");
    assert!(store.item_size_limit() > 0);
}
