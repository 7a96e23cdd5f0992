//! The `flagcache` binary against real Redis and memcached: `set`, `inspect`,
//! `invalidate`, `refresh` and `watch`, with `--json` and the exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flagcache_testkit::{MemcachedServer, RedisServer};
use serde_json::Value;

fn flagcache(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flagcache"))
        .env("FLAGCACHE_URL", url)
        .args(args)
        .output()
        .unwrap()
}

/// Runs with `--json`: the exit code and the one JSON document on stdout.
fn json(url: &str, args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let out = flagcache(url, &all);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let doc = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not one JSON document ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), doc)
}

fn key() -> String {
    format!("checkout-{:x}", fastrand_u32())
}

fn fastrand_u32() -> u32 {
    // Enough to keep the keys of concurrent tests apart.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// `set` then `inspect` then a stale `set` then `invalidate`, on `url`.
fn set_inspect_invalidate(url: &str, layout: &str) {
    let k = key();
    let (code, doc) = json(
        url,
        &[
            "set",
            &k,
            "--version",
            "7",
            "--value",
            r#"{"enabled":false}"#,
        ],
    );
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["outcome"], "stored");

    let (code, doc) = json(url, &["inspect", &k, "absent-key"]);
    assert_eq!(code, 1, "an absent key is a finding: {doc}");
    let e = &doc["entries"][0];
    assert_eq!(e["present"], true, "{doc}");
    assert_eq!(e["readable"], true, "{doc}");
    assert_eq!(e["layout"], layout);
    assert_eq!(e["version"], 7);
    assert!(e["ttl_left_ms"].as_u64().unwrap() > 0, "{doc}");
    assert!(e["age_ms"].as_u64().unwrap() < 60_000, "{doc}");
    assert!(e["stored_bytes"].as_u64().unwrap() > 0);
    assert_eq!(e["compressed"], false);
    assert_eq!(doc["entries"][1]["present"], false);

    let (code, doc) = json(url, &["set", &k, "--version", "6", "--value", "true"]);
    assert_eq!(code, 1, "a superseded write is a finding: {doc}");
    assert_eq!(doc["outcome"], "superseded");
    assert_eq!(doc["current"], 7);

    let (code, doc) = json(url, &["invalidate", &k]);
    assert_eq!(code, 0, "{doc}");
    let (code, doc) = json(url, &["inspect", &k]);
    assert_eq!(
        (code, &doc["entries"][0]["present"]),
        (1, &Value::Bool(false))
    );
    let (code, _) = json(url, &["invalidate", "--all"]);
    assert_eq!(code, 0);
    let (code, _) = json(url, &["refresh", &k]);
    assert_eq!(code, 0);
}

#[test]
fn redis_envelope_and_json_layouts() {
    let server = RedisServer::start().unwrap();
    set_inspect_invalidate(&server.url(), "envelope");
    set_inspect_invalidate(
        &format!("{}?layout=json&namespace=svc", server.url()),
        "json",
    );
}

#[test]
fn memcached() {
    let (a, b) = (
        MemcachedServer::start().unwrap(),
        MemcachedServer::start().unwrap(),
    );
    let url = format!("memcached://127.0.0.1:{},127.0.0.1:{}", a.port(), b.port());
    set_inspect_invalidate(&url, "envelope");
}

#[test]
fn an_unreadable_entry_is_reported_not_a_crash() {
    let server = RedisServer::start().unwrap();
    let k = key();
    server
        .command(&["SET", &format!("flags:{{{k}}}"), "not an envelope"])
        .unwrap();
    let (code, doc) = json(&server.url(), &["inspect", &k]);
    assert_eq!(code, 1, "{doc}");
    let e = &doc["entries"][0];
    assert_eq!(
        (&e["present"], &e["readable"]),
        (&Value::Bool(true), &Value::Bool(false))
    );
    assert!(e["problem"].as_str().unwrap().contains("corrupt"), "{doc}");
    let out = flagcache(&server.url(), &["inspect", &k]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("UNREADABLE"), "{text}");
}

#[test]
fn a_large_value_on_memcached_shows_its_chunks_and_checksum() {
    let server = MemcachedServer::builder()
        .item_size_limit("512k")
        .start()
        .unwrap();
    let url = format!("memcached://127.0.0.1:{}", server.port());
    let file = std::env::temp_dir().join(format!("flagcache-cli-{}.json", std::process::id()));
    // Incompressible: distinct numbers.
    let big: Vec<u64> = (0..80_000u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    std::fs::write(&file, serde_json::to_string(&big).unwrap()).unwrap();
    let k = key();
    let (code, doc) = json(
        &url,
        &[
            "set",
            &k,
            "--version",
            "3",
            "--value-file",
            file.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&file).unwrap();
    assert_eq!(code, 0, "{doc}");
    let (code, doc) = json(&url, &["inspect", &k]);
    assert_eq!(code, 0, "{doc}");
    let e = &doc["entries"][0];
    assert!(e["chunks"].as_u64().unwrap() > 1, "{doc}");
    assert_eq!(e["checksum_ok"], true, "{doc}");
}

/// `flagcache watch --for 4s --json` on `url`, running.
fn watch_for_4s(url: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_flagcache"))
        .env("FLAGCACHE_URL", url)
        .args(["watch", "--for", "4s", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `watch --for` sees events published by another process, with origin, sequence and
/// lag.
fn watch_sees_events(url: &str) {
    let child = watch_for_4s(url);
    let k = key();
    let start = Instant::now();
    let mut version = 1;
    // Publish until the watcher has surely subscribed and seen some.
    while start.elapsed() < Duration::from_millis(2500) {
        let v = version.to_string();
        let (code, _) = json(url, &["set", &k, "--version", &v, "--value", "1"]);
        assert_eq!(code, 0);
        version += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let doc: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(out.status.code(), Some(0), "{doc}");
    assert!(doc["events"].as_u64().unwrap() >= 1, "{doc}");
    let ev = doc["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "invalidated")
        .unwrap();
    assert_eq!(ev["target"]["key"], k.as_str(), "{doc}");
    assert_eq!(ev["origin"].as_str().unwrap().len(), 16, "{doc}");
    assert!(ev["seq"].as_u64().unwrap() >= 1, "{doc}");
    assert!(ev["lag_ms"].as_u64().is_some(), "{doc}");
}

#[test]
fn watch_on_redis() {
    let server = RedisServer::start().unwrap();
    watch_sees_events(&server.url());
}

#[test]
fn watch_on_memcached() {
    let server = MemcachedServer::start().unwrap();
    watch_sees_events(&format!(
        "memcached://127.0.0.1:{}?poll_interval=50ms",
        server.port()
    ));
}

#[test]
fn usage_and_connection_errors_exit_2() {
    // No URL.
    let out = Command::new(env!("CARGO_BIN_EXE_flagcache"))
        .env_remove("FLAGCACHE_URL")
        .args(["inspect", "k", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["kind"], "usage");
    // A bad URL, its password redacted.
    let (code, doc) = json("redis://:hunter2@127.0.0.1:notaport", &["inspect", "k"]);
    assert_eq!(code, 2);
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("hunter2") && message.contains("accepted forms"),
        "{message}"
    );
    // Nothing listening.
    let (code, doc) = json(
        "redis://127.0.0.1:1?connect_timeout=500ms",
        &["inspect", "k"],
    );
    assert_eq!((code, &doc["error"]["kind"]), (2, &Value::from("connect")));
    // A missing argument (clap).
    assert_eq!(flagcache("memory://", &["set", "k"]).status.code(), Some(2));
}

#[test]
fn watch_flags_a_resync_and_exits_1() {
    let server = MemcachedServer::start().unwrap();
    let url = format!("memcached://127.0.0.1:{}?poll_interval=50ms", server.port());
    let child = watch_for_4s(&url);
    let k = key();
    let start = Instant::now();
    let mut version = 1;
    while start.elapsed() < Duration::from_millis(1500) {
        let v = version.to_string();
        assert_eq!(
            json(&url, &["set", &k, "--version", &v, "--value", "1"]).0,
            0
        );
        version += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    // The invalidation log is lost: every subscriber must flush.
    assert_eq!(server.request("flush_all\r\n").unwrap(), "OK");
    let out = child.wait_with_output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{doc}");
    assert!(doc["resyncs"].as_u64().unwrap() >= 1, "{doc}");
    assert!(
        doc["signals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "resync" && s["reason"].as_str().is_some()),
        "{doc}"
    );
}
