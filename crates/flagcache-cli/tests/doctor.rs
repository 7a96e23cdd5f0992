//! `flagcache doctor` against real Redis and memcached: each condition is induced while
//! the doctor samples — a storm of misses without coalescing, 20 CAS writers on one key,
//! evictions, a replica whose subscription died, a flushed script cache, a server of
//! the ring stopped — and its diagnosis read from `--json`; a quiet deployment, a
//! Redis write storm and the doctor's own lost subscription are no finding.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flagcache::fleet::NodeReport;
use flagcache::{store::Entry, FlagCache, FlagKey, NodeId, Version};
use flagcache_testkit::{MemcachedServer, RedisCluster, RedisServer};
use serde_json::Value;

/// Runs `flagcache doctor --interval 1s --json` off the runtime's workers: its exit
/// code and JSON document.
async fn doctor(url: &str) -> (i32, Value) {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_flagcache"))
            .env("FLAGCACHE_URL", &url)
            .args(["doctor", "--interval", "1s", "--json"])
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let doc = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "not one JSON document ({e}): {stdout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        // Shown when a test fails.
        eprintln!("{doc}");
        (out.status.code().unwrap(), doc)
    })
    .await
    .unwrap()
}

/// The kinds of the findings, in order.
fn kinds(doc: &Value) -> Vec<String> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect()
}

fn finding<'d>(doc: &'d Value, kind: &str) -> &'d Value {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} finding: {doc}"))
}

/// Runs `load` in `tasks` tasks, each looping until the doctor is done.
async fn during_doctor<F, Fut>(url: &str, tasks: usize, load: F) -> (i32, Value)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(load);
    let mut handles = Vec::new();
    for i in 0..tasks {
        let (stop, load) = (stop.clone(), load.clone());
        handles.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                load(i).await;
            }
        }));
    }
    // The load is under way before the first sample.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let result = doctor(url).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    result
}

fn memcached_url(server: &MemcachedServer) -> String {
    format!("memcached://127.0.0.1:{}", server.port())
}

async fn storm_of_misses_is_a_stampede(url: &str) {
    let store = flagcache::connect(url).await.unwrap().store();
    // Twenty readers of five absent keys, no coalescer: every read goes to the server.
    let (code, doc) = during_doctor(url, 20, move |i| {
        let store = store.clone();
        async move {
            let key = FlagKey::new(format!("absent-{}", i % 5)).unwrap();
            assert!(store.get(&key).await.unwrap().is_none());
        }
    })
    .await;
    assert_eq!(code, 1, "{doc}");
    assert_eq!(kinds(&doc), ["stampede"], "{doc}");
    let f = finding(&doc, "stampede");
    assert!(
        f["figures"]["misses_per_sec"].as_f64().unwrap() >= 200.0,
        "{f}"
    );
    assert!(f["figures"]["miss_ratio"].as_f64().unwrap() >= 0.9, "{f}");
    assert!(f["action"].as_str().unwrap().contains("coalescer"), "{f}");
    assert_eq!(doc["healthy"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_misses_on_redis_is_a_stampede() {
    let server = RedisServer::start().unwrap();
    storm_of_misses_is_a_stampede(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_misses_on_memcached_is_a_stampede() {
    let server = MemcachedServer::start().unwrap();
    storm_of_misses_is_a_stampede(&memcached_url(&server)).await;
}

/// Versioned writes of one key, each newer than the last, in 20 tasks.
fn versioned_writer(
    store: Arc<dyn flagcache::store::FlagStore>,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
       + Send
       + Sync
       + 'static {
    let version = Arc::new(AtomicU64::new(1));
    move |_| {
        let (store, version) = (store.clone(), version.clone());
        Box::pin(async move {
            let key = FlagKey::new("rollout").unwrap();
            let v = Version::new(version.fetch_add(1, Ordering::Relaxed));
            let entry = Entry::new(v, &b"{\"enabled\":true}"[..]);
            store
                .put(&key, &entry, Duration::from_secs(60))
                .await
                .unwrap();
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_write_storm_is_a_figure_not_contention() {
    // Redis has no CAS counter and its scripts never retry: the writes per second are
    // reported, and no contention is claimed.
    let server = RedisServer::start().unwrap();
    let store = flagcache::connect(&server.url()).await.unwrap().store();
    let (code, doc) = during_doctor(&server.url(), 20, versioned_writer(store)).await;
    assert_eq!((code, kinds(&doc).len()), (0, 0), "{doc}");
    assert!(
        doc["rates"]["script_calls_per_sec"].as_f64().unwrap() >= 200.0,
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cas_writers_on_one_key_are_contention() {
    let server = MemcachedServer::start().unwrap();
    let url = memcached_url(&server);
    let store = flagcache::connect(&url).await.unwrap().store();
    let version = Arc::new(AtomicU64::new(1));
    // Twenty writers of one key, each with a newer version than the last: each write
    // reads the key's CAS token and loses when another writer got in first.
    let (code, doc) = during_doctor(&url, 20, move |_| {
        let (store, version) = (store.clone(), version.clone());
        async move {
            let key = FlagKey::new("rollout").unwrap();
            let v = Version::new(version.fetch_add(1, Ordering::Relaxed));
            let entry = Entry::new(v, &b"{\"enabled\":true}"[..]);
            store
                .put(&key, &entry, Duration::from_secs(60))
                .await
                .unwrap();
        }
    })
    .await;
    assert_eq!(code, 1, "{doc}");
    let f = finding(&doc, "cas_contention");
    assert!(f["figures"]["cas_badval"].as_u64().unwrap() >= 10, "{f}");
    assert!(
        f["figures"]["cas_badval_ratio"].as_f64().unwrap() >= 0.05,
        "{f}"
    );
    assert!(!kinds(&doc).contains(&"stampede".to_string()), "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_a_tiny_memcached_are_evictions() {
    // 2 MB of memory, written with 100 KB values as fast as one connection goes.
    let server = Arc::new(
        MemcachedServer::builder()
            .args(["-m", "2"])
            .start()
            .unwrap(),
    );
    let url = memcached_url(&server);
    let value = "x".repeat(100_000);
    let n = Arc::new(AtomicU64::new(0));
    let (code, doc) = during_doctor(&url, 1, move |_| {
        let (server, value, n) = (server.clone(), value.clone(), n.clone());
        async move {
            let i = n.fetch_add(1, Ordering::Relaxed);
            tokio::task::spawn_blocking(move || {
                let request = format!("set filler-{i} 0 0 {}\r\n{value}\r\n", value.len());
                assert_eq!(server.request(&request).unwrap(), "STORED");
            })
            .await
            .unwrap();
        }
    })
    .await;
    assert_eq!(code, 1, "{doc}");
    let f = finding(&doc, "evictions");
    assert!(f["figures"]["evictions"].as_u64().unwrap() >= 1, "{f}");
    assert_eq!(f["figures"]["max_memory"], 2 * 1024 * 1024, "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_a_tiny_redis_are_evictions() {
    let server = Arc::new(
        RedisServer::builder()
            .arg("maxmemory", "3mb")
            .arg("maxmemory-policy", "allkeys-lru")
            .start()
            .unwrap(),
    );
    let url = server.url();
    let value = "x".repeat(100_000);
    let n = Arc::new(AtomicU64::new(0));
    let (code, doc) = during_doctor(&url, 1, move |_| {
        let (server, value, n) = (server.clone(), value.clone(), n.clone());
        async move {
            let key = format!("filler-{}", n.fetch_add(1, Ordering::Relaxed));
            tokio::task::spawn_blocking(move || server.command(&["SET", &key, &value]).unwrap())
                .await
                .unwrap();
        }
    })
    .await;
    assert_eq!(code, 1, "{doc}");
    let f = finding(&doc, "evictions");
    assert!(f["figures"]["evictions"].as_u64().unwrap() >= 1, "{f}");
    assert_eq!(f["figures"]["max_memory"], 3 * 1024 * 1024, "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_redis_is_memory_pressure() {
    let server = RedisServer::start().unwrap();
    let info = server.command(&["INFO", "memory"]).unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The limit just above what is in use; nothing is written, nothing evicted.
    let limit = (used * 21 / 20).to_string();
    server
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .unwrap();
    server
        .command(&["CONFIG", "SET", "maxmemory", &limit])
        .unwrap();
    let (code, doc) = doctor(&server.url()).await;
    assert_eq!(code, 1, "{doc}");
    assert_eq!(kinds(&doc), ["memory_pressure"], "{doc}");
    let f = finding(&doc, "memory_pressure");
    assert!(f["figures"]["memory_fill"].as_f64().unwrap() >= 0.9, "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_memcached_log_is_a_broken_backplane() {
    let server = Arc::new(MemcachedServer::start().unwrap());
    let url = format!("{}?poll_interval=50ms", memcached_url(&server));
    let backend = flagcache::connect(&url).await.unwrap();
    let writer = replicas(&backend, 1).await.pop().unwrap();
    // Events go into the log, then the log is lost (flush_all): every subscriber,
    // the doctor's included, must resync.
    let (code, doc) = during_doctor(&url, 1, move |_| {
        let (server, writer) = (server.clone(), writer.clone());
        async move {
            let key = FlagKey::new("checkout").unwrap();
            writer.invalidate(&key).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
            tokio::task::spawn_blocking(move || server.request("flush_all\r\n").unwrap())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(code, 1, "{doc}");
    let f = finding(&doc, "resyncs");
    assert!(f["figures"]["resyncs"].as_u64().unwrap() >= 1, "{f}");
}

/// Caches that report their presence and listen to the invalidation channel.
async fn replicas(backend: &flagcache::Backend, n: usize) -> Vec<FlagCache<Value>> {
    let no_source = |_key: FlagKey| async { Ok(None) };
    let mut caches = Vec::new();
    for i in 0..n {
        caches.push(
            backend
                .cache_builder(no_source)
                .name(format!("replica-{i}"))
                .report_to_fleet(backend.fleet())
                .build()
                .await
                .unwrap(),
        );
    }
    caches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_fleet_on_redis_is_healthy() {
    let server = RedisServer::start().unwrap();
    let backend = flagcache::connect(&server.url()).await.unwrap();
    let fleet = replicas(&backend, 3).await;
    let key = FlagKey::new("checkout").unwrap();
    fleet[0]
        .set(&key, Value::Bool(true), Version::new(1))
        .await
        .unwrap();
    let (code, doc) = during_doctor(&server.url(), 1, move |_| {
        let store = backend.store();
        let key = key.clone();
        async move {
            store.get(&key).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!((code, kinds(&doc).len()), (0, 0), "{doc}");
    assert_eq!(doc["healthy"], true);
    let second = &doc["samples"][1];
    assert_eq!(second["subscribers"], 3, "{doc}");
    assert_eq!(
        (&second["live_nodes"], &second["subscribed_nodes"]),
        (&Value::from(3), &Value::from(3))
    );
    assert!(
        doc["rates"]["hits_per_sec"].as_f64().unwrap() > 0.0,
        "{doc}"
    );
    drop(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_client_tracking_are_not_missing_subscribers() {
    let server = RedisServer::start().unwrap();
    let backend = flagcache::connect(&server.url()).await.unwrap();
    // One replica on the pub/sub channel, two that hear changes through client
    // tracking alone: they hold no subscription to the channel, and none is missing.
    let mut fleet = replicas(&backend, 1).await;
    let no_source = |_key: FlagKey| async { Ok(None) };
    for i in 1..3 {
        let tracking = flagcache::redis::RedisTrackingInvalidator::connect(&server.url())
            .await
            .unwrap();
        fleet.push(
            backend
                .cache_builder(no_source)
                .name(format!("replica-{i}"))
                .invalidator(tracking)
                .report_to_fleet(backend.fleet())
                .build()
                .await
                .unwrap(),
        );
    }
    // Each replica's first report is written by a task of its own: wait for the three
    // (5 s at most, on a loaded machine).
    let mut nodes = Vec::new();
    for _ in 0..500 {
        nodes = backend.fleet().nodes().await.unwrap();
        if nodes.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut transports: Vec<_> = nodes.iter().map(|n| n.transport.clone()).collect();
    transports.sort();
    assert_eq!(
        transports,
        [
            Some("pubsub".into()),
            Some("tracking".into()),
            Some("tracking".into())
        ]
    );
    let (code, doc) = doctor(&server.url()).await;
    assert_eq!((code, kinds(&doc).len()), (0, 0), "{doc}");
    let second = &doc["samples"][1];
    assert_eq!(
        (
            &second["subscribers"],
            &second["subscribed_nodes"],
            &second["live_nodes"]
        ),
        (&Value::from(1), &Value::from(1), &Value::from(3)),
        "{doc}"
    );
    drop(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_memcached_is_healthy() {
    let server = MemcachedServer::start().unwrap();
    let url = memcached_url(&server);
    let backend = flagcache::connect(&url).await.unwrap();
    let fleet = replicas(&backend, 3).await;
    let (code, doc) = doctor(&url).await;
    assert_eq!((code, kinds(&doc).len()), (0, 0), "{doc}");
    assert_eq!(doc["samples"][1]["live_nodes"], 3, "{doc}");
    assert_eq!(doc["samples"][1]["subscribers"], Value::Null);
    drop(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_subscriber_died_is_a_broken_backplane() {
    let server = RedisServer::start().unwrap();
    let backend = flagcache::connect(&server.url()).await.unwrap();
    let fleet = replicas(&backend, 2).await;
    // A third replica's presence says it listens, but its subscription is gone (the
    // record outlives the connection for up to three report periods).
    let mut dead = NodeReport::new(NodeId(0xdead), "replica-2");
    dead.subscribed = true;
    backend
        .fleet()
        .record(&dead, Duration::from_secs(60))
        .await
        .unwrap();
    let (code, doc) = doctor(&server.url()).await;
    assert_eq!(code, 1, "{doc}");
    assert_eq!(kinds(&doc), ["missing_subscribers"], "{doc}");
    let f = finding(&doc, "missing_subscribers");
    assert_eq!(f["figures"]["subscribers"], 2, "{f}");
    assert_eq!(f["figures"]["subscribed_nodes"], 3, "{f}");
    assert_eq!(f["figures"]["missing"], 1, "{f}");

    // Its record gone, the backplane is whole again.
    backend.fleet().remove(NodeId(0xdead)).await.unwrap();
    let (code, doc) = doctor(&server.url()).await;
    assert_eq!(code, 0, "{doc}");
    drop(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctors_own_lost_subscription_is_no_missing_subscriber() {
    let server = RedisServer::start().unwrap();
    // The doctor connects as a user of its own, whose channel access is revoked while
    // it listens: the server drops its subscription and refuses it again.
    server
        .command(&[
            "ACL", "SETUSER", "doctor", "on", ">secret", "~*", "&*", "+@all",
        ])
        .unwrap();
    let backend = flagcache::connect(&server.url()).await.unwrap();
    let fleet = replicas(&backend, 2).await;
    let numsub = || {
        let reply = server
            .command(&["PUBSUB", "NUMSUB", "flag_updates"])
            .unwrap();
        reply.lines().nth(1).unwrap().parse::<u64>().unwrap()
    };
    assert_eq!(numsub(), 2);
    let url = format!("redis://doctor:secret@127.0.0.1:{}", server.port());
    let running = tokio::spawn(async move { doctor(&url).await });
    while numsub() < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
        .command(&["ACL", "SETUSER", "doctor", "resetchannels"])
        .unwrap();
    let (code, doc) = running.await.unwrap();
    assert_eq!(code, 1, "{doc}");
    // Events were lost to the doctor; the replicas' subscriptions are whole.
    assert_eq!(kinds(&doc), ["resyncs"], "{doc}");
    assert_eq!(doc["samples"][1]["subscribers"], 2, "{doc}");
    drop(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_of_the_ring_is_named() {
    let mut servers = [
        MemcachedServer::start().unwrap(),
        MemcachedServer::start().unwrap(),
    ];
    let ports = servers.each_ref().map(|s| s.port());
    let url = format!(
        "memcached://127.0.0.1:{},127.0.0.1:{}?timeout=500ms",
        ports[0], ports[1]
    );
    servers[1].stop();
    let (code, doc) = doctor(&url).await;
    assert_eq!(code, 1, "{doc}");
    assert_eq!(kinds(&doc), ["server_down"], "{doc}");
    let f = finding(&doc, "server_down");
    let down = f["figures"]["unreachable"].as_array().unwrap();
    assert_eq!(down.len(), 1, "{f}");
    assert!(
        down[0].as_str().unwrap().contains(&ports[1].to_string()),
        "{f}"
    );
    assert_eq!(f["figures"]["servers"], 2, "{f}");
    // The server that answers is still read.
    assert_eq!(doc["samples"][1]["servers"], 2, "{doc}");
    assert!(
        doc["samples"][1]["max_memory"].as_u64().unwrap() > 0,
        "{doc}"
    );

    // No server answering is no diagnosis: exit 2.
    servers[0].stop();
    let out = Command::new(env!("CARGO_BIN_EXE_flagcache"))
        .env("FLAGCACHE_URL", &url)
        .args(["doctor", "--json", "--interval", "100ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_is_found() {
    let server = Arc::new(RedisServer::start().unwrap());
    let url = server.url();
    let store = flagcache::connect(&url).await.unwrap().store();
    let version = Arc::new(AtomicU64::new(1));
    // Every 200 ms someone flushes the scripts, and a versioned write follows.
    let (code, doc) = during_doctor(&url, 1, move |_| {
        let (server, store, version) = (server.clone(), store.clone(), version.clone());
        async move {
            tokio::task::spawn_blocking(move || server.command(&["SCRIPT", "FLUSH"]).unwrap())
                .await
                .unwrap();
            let v = Version::new(version.fetch_add(1, Ordering::Relaxed));
            let entry = Entry::new(v, &b"true"[..]);
            let key = FlagKey::new("checkout").unwrap();
            store
                .put(&key, &entry, Duration::from_secs(60))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(code, 1, "{doc}");
    let f = finding(&doc, "script_cache_flush");
    assert!(f["figures"]["script_flushes"].as_u64().unwrap() >= 1, "{f}");
    assert!(
        f["figures"]["noscript_errors"].as_u64().unwrap() >= 1,
        "{f}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_prints_a_table_and_refuses_memory() {
    let server = RedisServer::start().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flagcache"))
        .env("FLAGCACHE_URL", server.url())
        .args(["doctor", "--interval", "300ms"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("FIGURE") && text.contains("healthy"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("sampling"));

    let out = Command::new(env!("CARGO_BIN_EXE_flagcache"))
        .env("FLAGCACHE_URL", "memory://")
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_flagcache"))
        .env("FLAGCACHE_URL", "redis://127.0.0.1:1?connect_timeout=300ms")
        .args(["doctor", "--json", "--interval", "100ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_is_a_usage_error_naming_the_way_out() {
    let cluster = RedisCluster::start(3).unwrap();
    let hosts: Vec<String> = cluster
        .urls()
        .iter()
        .map(|u| u.trim_start_matches("redis://").to_string())
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    let (code, doc) = doctor(&url).await;
    assert_eq!(
        (code, &doc["error"]["kind"]),
        (2, &Value::from("usage")),
        "{doc}"
    );
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("each node"),
        "{doc}"
    );
}
