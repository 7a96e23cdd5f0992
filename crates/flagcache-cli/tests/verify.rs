//! `flagcache verify` and the live nodes of `flagcache watch`, against real Redis and
//! memcached: a fleet of 8 replicas reporting their presence (caches in this process),
//! one of which applies nothing (it has no invalidator).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use flagcache::{FlagCache, FlagKey, Version};
use flagcache_testkit::{MemcachedServer, RedisServer};
use serde_json::Value;

const REPORT_EVERY: Duration = Duration::from_millis(300);

/// Runs the command off the runtime's workers: its output.
async fn run(url: &str, args: &[&str]) -> std::process::Output {
    let (url, args) = (
        url.to_string(),
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    );
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_flagcache"))
            .env("FLAGCACHE_URL", &url)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Runs the command with `--json`: its exit code and the JSON document.
async fn flagcache(url: &str, args: &[&str]) -> (i32, Value) {
    let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let out = run(url, &args).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    let doc = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not one JSON document ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), doc)
}

/// The text output and exit code.
async fn flagcache_text(url: &str, args: &[&str]) -> (i32, String) {
    let out = run(url, args).await;
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// Seven replicas that hear invalidations, and an eighth that cannot (no invalidator),
/// all reporting their presence to the backend every 300 ms.
async fn fleet(url: &str) -> (Vec<FlagCache<Value>>, FlagCache<Value>) {
    let backend = flagcache::connect(url).await.unwrap();
    let no_source = |_key: FlagKey| async { Ok(None) };
    let mut replicas = Vec::new();
    for i in 0..7 {
        let cache = backend
            .cache_builder(no_source)
            .name(format!("replica-{i}"))
            .report_to_fleet(backend.fleet())
            .fleet_report_interval(REPORT_EVERY)
            .build()
            .await
            .unwrap();
        replicas.push(cache);
    }
    let deaf = FlagCache::builder(backend.store(), no_source)
        .name("deaf")
        .report_to_fleet(backend.fleet())
        .fleet_report_interval(REPORT_EVERY)
        .build()
        .await
        .unwrap();
    (replicas, deaf)
}

async fn verify_finds_the_replica_that_does_not_apply(url: &str) {
    let (replicas, deaf) = fleet(url).await;
    let key = format!("kill-{:x}", fastrand());
    let k = FlagKey::new(key.as_str()).unwrap();
    // Every replica has read an older version.
    replicas[0]
        .set(&k, Value::Bool(true), Version::new(7))
        .await
        .unwrap();
    for r in replicas.iter().chain([&deaf]) {
        r.get(&k).await.unwrap();
    }

    let (code, doc) = flagcache(url, &["set", &key, "--version", "8", "--value", "false"]).await;
    assert_eq!(code, 0, "{doc}");
    let (code, doc) = flagcache(url, &["verify", &key, "--version", "8", "--within", "3s"]).await;
    assert_eq!(code, 1, "the deaf replica is a straggler: {doc}");
    assert_eq!(doc["done"], false);
    assert_eq!(doc["live"], 8, "{doc}");
    let deaf_id = deaf.node_id().to_string();
    assert_eq!(doc["stragglers"], serde_json::json!([deaf_id]), "{doc}");
    let replicas_json = doc["replicas"].as_array().unwrap();
    let applied: Vec<&Value> = replicas_json
        .iter()
        .filter(|r| r["state"] == "applied")
        .collect();
    assert_eq!(applied.len(), 7, "{doc}");
    for r in &applied {
        assert_eq!(r["applied_version"], 8);
        assert!(r["lag_ms"].as_u64().unwrap() < 3000, "{r}");
    }
    let straggler = replicas_json.iter().find(|r| r["node"] == deaf_id).unwrap();
    assert_eq!(
        (&straggler["state"], &straggler["name"]),
        (&Value::from("behind"), &Value::from("deaf"))
    );
    let (code, text) = flagcache_text(
        url,
        &["verify", &key, "--version", "8", "--within", "500ms"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        text.contains("deaf") && text.contains("1 of 8 live replicas"),
        "{text}"
    );

    // `watch` lists the eight live nodes, and how each hears invalidations.
    let (_, doc) = flagcache(url, &["watch", "--for", "300ms"]).await;
    let nodes = doc["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 8, "{doc}");
    for n in nodes {
        let expected = match (n["name"].as_str(), url.starts_with("memcached")) {
            (Some("deaf"), _) => Value::Null,
            (_, true) => Value::from("log"),
            (_, false) => Value::from("pubsub"),
        };
        assert_eq!(n["transport"], expected, "{n}");
    }

    // The straggler leaves (its record is removed): the seven left all applied v8.
    drop(deaf);
    let (code, doc) = flagcache(url, &["verify", &key, "--version", "8", "--within", "5s"]).await;
    assert_eq!(code, 0, "{doc}");
    assert_eq!(
        (doc["done"].clone(), doc["live"].clone()),
        (Value::Bool(true), Value::from(7))
    );
    assert_eq!(doc["stragglers"], serde_json::json!([]));

    // A version nobody has: every replica is a straggler, at the budget's end.
    let (code, doc) = flagcache(
        url,
        &["verify", &key, "--version", "9", "--within", "300ms"],
    )
    .await;
    assert_eq!(code, 1);
    assert_eq!(doc["stragglers"].as_array().unwrap().len(), 7, "{doc}");
    drop(replicas);
}

fn fastrand() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_redis() {
    let server = RedisServer::start().unwrap();
    verify_finds_the_replica_that_does_not_apply(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_memcached() {
    let server = MemcachedServer::start().unwrap();
    verify_finds_the_replica_that_does_not_apply(&format!(
        "memcached://127.0.0.1:{}",
        server.port()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_without_reporting_replicas_is_a_finding() {
    let server = RedisServer::start().unwrap();
    let (code, doc) = flagcache(
        &server.url(),
        &["verify", "k", "--version", "1", "--within", "200ms"],
    )
    .await;
    assert_eq!(code, 1, "{doc}");
    assert_eq!(doc["live"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_without_presence_write_nothing_for_it() {
    let server = RedisServer::start().unwrap();
    let backend = flagcache::connect(&server.url()).await.unwrap();
    let no_source = |_key: FlagKey| async { Ok(None) };
    let quiet: FlagCache<Value> = backend.cache_builder(no_source).build().await.unwrap();
    let k = FlagKey::new("k").unwrap();
    quiet
        .set(&k, Value::Bool(true), Version::new(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.command(&["EXISTS", "{flags:fleet}:nodes"]).unwrap(),
        "0"
    );
    // With presence on, the same write is recorded.
    let reporting: FlagCache<Value> = backend
        .cache_builder(no_source)
        .report_to_fleet(backend.fleet())
        .build()
        .await
        .unwrap();
    reporting
        .set(&k, Value::Bool(false), Version::new(2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.command(&["ZCARD", "{flags:fleet}:nodes"]).unwrap(),
        "1"
    );
}
