//! Foreign-client interop: services in another language (Python with `redis-py` and
//! `pymemcache`, the scripts in `tests/interop/`) share the same Redis and memcached
//! servers as a Rust replica, in the JSON layout. Python writes and publishes, the
//! replica serves it; the replica writes, Python reads it; Python appends to the
//! memcached invalidation log (following its published specification), the replica
//! applies it.
//!
//! The Python comes from `FLAGCACHE_INTEROP_PYTHON` (`scripts/test` sets it from
//! `scripts/interop-env`). Without it the tests print why and pass — except under
//! `CI=true`, where a missing interpreter fails them.

#![cfg(all(feature = "redis", feature = "memcached"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flagcache::memcached::{MemcachedInvalidator, MemcachedStore};
use flagcache::redis::{RedisInvalidator, RedisStore};
use flagcache::{codec::JsonCodec, CacheStatus, FlagCache, FlagKey, Lookup, Version};
use flagcache_testkit::{CountingSource, MemcachedServer, RedisServer};

/// The flag config both languages read and write.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Config {
    enabled: bool,
    percent: u8,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rules: Vec<String>,
}

const CHANNEL: &str = "flag_updates_v1";

/// The Python interpreter the interop scripts run with.
struct Python(PathBuf);

impl Python {
    /// `FLAGCACHE_INTEROP_PYTHON`; `None` (after saying why) when it is not set, unless
    /// `CI=true`.
    fn find(test: &str) -> Option<Python> {
        match std::env::var_os("FLAGCACHE_INTEROP_PYTHON") {
            Some(p) if !p.is_empty() => Some(Python(p.into())),
            _ if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
                "CI=true but FLAGCACHE_INTEROP_PYTHON is not set: scripts/test sets it from \
                 scripts/interop-env (a Python with redis and pymemcache)"
            ),
            _ => {
                eprintln!(
                    "{test}: skipped: FLAGCACHE_INTEROP_PYTHON is not set (scripts/interop-env \
                     prints a Python with redis and pymemcache)"
                );
                None
            }
        }
    }

    fn command(&self, script: &str, args: &[&str]) -> Command {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/interop")
            .join(script);
        let mut cmd = Command::new(&self.0);
        cmd.arg(path).args(args);
        cmd
    }

    /// Runs `script` with `args` to the end; its stdout, trimmed.
    async fn run(&self, script: &str, args: &[&str]) -> String {
        let mut cmd = self.command(script, args);
        let what = format!("{script} {args:?}");
        tokio::task::spawn_blocking(move || {
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{what} failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .await
        .unwrap()
    }

    /// Starts `redis_client.py listen`, returning once it is subscribed.
    async fn listen(&self, url: &str, count: usize) -> Listener {
        let count = count.to_string();
        let mut cmd = self.command(
            "redis_client.py",
            &[
                "listen",
                "--url",
                url,
                "--channel",
                CHANNEL,
                "--count",
                &count,
            ],
        );
        tokio::task::spawn_blocking(move || {
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap());
            let mut first = String::new();
            lines.read_line(&mut first).unwrap();
            assert_eq!(
                first.trim(),
                "ready",
                "the Python listener did not subscribe"
            );
            Listener { child, lines }
        })
        .await
        .unwrap()
    }
}

/// A Python subscriber on [`CHANNEL`].
struct Listener {
    child: Child,
    lines: BufReader<std::process::ChildStdout>,
}

impl Listener {
    /// The messages it heard (one JSON document a line), once it has heard them all.
    async fn messages(self) -> Vec<String> {
        tokio::task::spawn_blocking(move || {
            let Listener { child, lines } = self;
            let heard: Vec<String> = lines.lines().map(|l| l.unwrap()).collect();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "the Python listener: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            heard
        })
        .await
        .unwrap()
    }
}

fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

fn config(enabled: bool, percent: u8) -> Config {
    Config {
        enabled,
        percent,
        rules: Vec::new(),
    }
}

/// A source that must not be asked: every value comes from what Python wrote.
fn unused_source() -> CountingSource<Config> {
    CountingSource::answering(1, |_, _| config(false, 0))
}

/// Looks `k` up until `want` holds of the answer, for at most 10 s.
async fn eventually(
    cache: &FlagCache<Config>,
    k: &FlagKey,
    what: &str,
    want: impl Fn(&Lookup<Config>) -> bool,
) -> Lookup<Config> {
    let start = Instant::now();
    loop {
        let l = cache.lookup(k).await.unwrap();
        if want(&l) {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: still {:?} at {:?} ({:?})",
            l.value,
            l.version,
            l.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn redis_replica(
    server: &RedisServer,
    codec: JsonCodec,
    source: &CountingSource<Config>,
) -> (FlagCache<Config>, RedisStore) {
    let store = RedisStore::builder()
        .url(server.url())
        .codec(codec.clone())
        .build()
        .await
        .unwrap();
    let invalidator = RedisInvalidator::builder()
        .url(server.url())
        .channel(CHANNEL)
        .codec(codec)
        .build()
        .await
        .unwrap();
    let cache = FlagCache::builder(store.clone(), source.clone())
        .invalidator(invalidator)
        .build()
        .await
        .unwrap();
    (cache, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_writes_and_publishes_the_replica_serves_it() {
    let Some(py) = Python::find("python_writes_and_publishes_the_replica_serves_it") else {
        return;
    };
    let server = RedisServer::start().unwrap();
    let url = server.url();
    let source = unused_source();
    let (cache, store) = redis_replica(&server, JsonCodec::new(), &source).await;
    let k = key("api.catalog.new-search-ranking");
    let redis_key = store.redis_key(&k);
    let write = |version: u64, cfg: &'static str, extra: &'static [&'static str]| {
        let (py, url, redis_key, k) = (&py, url.clone(), redis_key.clone(), k.clone());
        let version = version.to_string();
        async move {
            let mut args = vec![
                "write",
                "--url",
                &url,
                "--key",
                &redis_key,
                "--flag",
                k.as_str(),
                "--version",
                &version,
                "--config",
                cfg,
            ];
            args.extend_from_slice(extra);
            py.run("redis_client.py", &args).await;
        }
    };

    write(1, r#"{"enabled": false, "percent": 0}"#, &[]).await;
    let first = cache.lookup(&k).await.unwrap();
    assert_eq!(first.status, CacheStatus::HitL2);
    assert_eq!(first.version, Some(Version::new(1)));
    assert_eq!(first.value.as_deref(), Some(&config(false, 0)));

    // The new value with its message: the replica drops its L1 copy and reads L2.
    write(
        2,
        r#"{"enabled": true, "percent": 25}"#,
        &["--channel", CHANNEL],
    )
    .await;
    let second = eventually(&cache, &k, "after Python's message", |l| {
        l.version == Some(Version::new(2))
    })
    .await;
    assert_eq!(second.value.as_deref(), Some(&config(true, 25)));

    // gzip'd JSON (`compression: gzip` services), then a version given as a string.
    write(
        3,
        r#"{"enabled": true, "percent": 50}"#,
        &["--gzip", "--channel", CHANNEL],
    )
    .await;
    let third = eventually(&cache, &k, "after Python's gzip'd entry", |l| {
        l.version == Some(Version::new(3))
    })
    .await;
    assert_eq!(third.value.as_deref(), Some(&config(true, 50)));
    write(
        4,
        r#"{"enabled": true, "percent": 75}"#,
        &["--gzip", "--string-version", "--channel", CHANNEL],
    )
    .await;
    let fourth = eventually(&cache, &k, "after a string version", |l| {
        l.version == Some(Version::new(4))
    })
    .await;
    assert_eq!(fourth.value.as_deref(), Some(&config(true, 75)));
    assert_eq!(source.calls(), 0, "every value came from what Python wrote");

    // The gzip'd entry guards against an older write on the server, as a plain one does.
    assert_eq!(
        cache
            .set(&k, config(false, 0), Version::new(2))
            .await
            .unwrap(),
        flagcache::PutOutcome::Superseded {
            current: Version::new(4)
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_writes_and_python_reads_it() {
    let Some(py) = Python::find("the_replica_writes_and_python_reads_it") else {
        return;
    };
    let server = RedisServer::start().unwrap();
    let url = server.url();
    let source = unused_source();
    let (cache, store) = redis_replica(&server, JsonCodec::new(), &source).await;
    let k = key("checkout.payments.express-pay");
    let listener = py.listen(&url, 1).await;

    cache
        .set(&k, config(true, 50), Version::new(7))
        .await
        .unwrap();
    let read = py
        .run(
            "redis_client.py",
            &["read", "--url", &url, "--key", &store.redis_key(&k)],
        )
        .await;
    assert_eq!(
        read,
        r#"{"flagConfig": {"enabled": true, "percent": 50}, "gzip": false, "version": 7}"#
    );
    let heard = listener.messages().await;
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert!(
        heard[0].contains(r#""flagKey": "checkout.payments.express-pay""#)
            && heard[0].contains(r#""version": 7"#),
        "{heard:?}"
    );

    // A replica that gzips documents over 512 bytes: Python reads them too.
    let (gzipping, _) = redis_replica(&server, JsonCodec::new().compress_above(512), &source).await;
    let wide = key("checkout.payments.wide");
    let rules = vec!["country in [US, CA]".to_string(); 40];
    let big = Config {
        rules: rules.clone(),
        ..config(true, 99)
    };
    gzipping.set(&wide, big, Version::new(8)).await.unwrap();
    let read = py
        .run(
            "redis_client.py",
            &["read", "--url", &url, "--key", &store.redis_key(&wide)],
        )
        .await;
    let rules = rules
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(
        read,
        format!(
            r#"{{"flagConfig": {{"enabled": true, "percent": 99, "rules": [{rules}]}}, "gzip": true, "version": 8}}"#
        )
    );
}

async fn memcached_replica(
    server: &MemcachedServer,
    codec: impl Into<flagcache::codec::Codec>,
    source: &CountingSource<Config>,
) -> FlagCache<Config> {
    let store = MemcachedStore::builder()
        .server(server.url())
        .codec(codec)
        .build()
        .await
        .unwrap();
    let invalidator = MemcachedInvalidator::builder(&store)
        .poll_interval(Duration::from_millis(20))
        .build();
    FlagCache::builder(store, source.clone())
        .invalidator(invalidator)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_appends_to_the_memcached_log_and_the_replica_applies_it() {
    let Some(py) = Python::find("python_appends_to_the_memcached_log_and_the_replica_applies_it")
    else {
        return;
    };
    let server = MemcachedServer::start().unwrap();
    let addr = server.addr().to_string();
    let source = unused_source();
    let cache = memcached_replica(&server, JsonCodec::new(), &source).await;
    let k = key("checkout.new-flow");
    let flag = k.as_str();
    let write = |version: &'static str, cfg: &'static str| {
        let (py, addr) = (&py, addr.clone());
        async move {
            py.run(
                "memcached_client.py",
                &[
                    "write",
                    "--server",
                    &addr,
                    "--flag",
                    flag,
                    "--version",
                    version,
                    "--config",
                    cfg,
                ],
            )
            .await;
        }
    };
    let append = |version: &'static str| {
        let (py, addr) = (&py, addr.clone());
        async move {
            py.run(
                "memcached_client.py",
                &[
                    "append",
                    "--server",
                    &addr,
                    "--flag",
                    flag,
                    "--version",
                    version,
                ],
            )
            .await
        }
    };

    write("1", r#"{"enabled": false, "percent": 0}"#).await;
    let first = cache.lookup(&k).await.unwrap();
    assert_eq!(
        (first.status, first.version),
        (CacheStatus::HitL2, Some(Version::new(1)))
    );

    write("2", r#"{"enabled": true, "percent": 10}"#).await;
    // The counter starts at 1: Python's first event is number 1.
    assert_eq!(append("2").await, r#"{"number": 1, "slot": "flags!inv:1"}"#);
    let second = eventually(&cache, &k, "after Python's log event", |l| {
        l.version == Some(Version::new(2))
    })
    .await;
    assert_eq!(second.value.as_deref(), Some(&config(true, 10)));

    // The replica's own writes share the counter: Python reads what it wrote.
    cache
        .set(&k, config(true, 90), Version::new(3))
        .await
        .unwrap();
    let read = py
        .run(
            "memcached_client.py",
            &["read", "--server", &addr, "--flag", flag],
        )
        .await;
    assert_eq!(
        read,
        r#"{"flagConfig": {"enabled": true, "percent": 90}, "version": 3}"#
    );
    assert_eq!(append("3").await, r#"{"number": 3, "slot": "flags!inv:3"}"#);
    assert_eq!(source.calls(), 0, "every value came from L2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_appends_envelope_events_to_the_memcached_log() {
    let Some(py) = Python::find("python_appends_envelope_events_to_the_memcached_log") else {
        return;
    };
    let server = MemcachedServer::start().unwrap();
    let addr = server.addr().to_string();
    let source = unused_source();
    let cache = memcached_replica(&server, flagcache::codec::Codec::default(), &source).await;
    let k = key("kill-switch");
    cache.get(&k).await.unwrap();
    assert_eq!(source.calls(), 1);
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);

    py.run(
        "memcached_client.py",
        &[
            "append",
            "--server",
            &addr,
            "--flag",
            k.as_str(),
            "--layout",
            "envelope",
        ],
    )
    .await;
    // The event drops the replica's L1 copy: the next read comes from L2.
    eventually(&cache, &k, "after Python's envelope event", |l| {
        l.status == CacheStatus::HitL2
    })
    .await;
}
