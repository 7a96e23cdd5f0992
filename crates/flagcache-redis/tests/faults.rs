//! Faults and bad input against a real redis-server: restarts, flushed scripts, silent
//! subscriptions, foreign publishers, garbage entries, oversized values, bad passwords.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::{
    CacheStatus, Entry, Error, FlagCache, FlagKey, FlagStore, FlagStoreExt, Invalidation,
    Invalidator, JsonCodec, PutOutcome, ResyncReason, Signal, StaleReason, Subscription, Target,
    Version,
};
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::RedisServer;

fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

async fn next(sub: &mut Subscription) -> Signal {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("no signal within 10 s")
        .expect("subscription ended")
}

/// The next signal that is not an event from `skip`'s own heartbeats/noise.
async fn next_event_or_resync(sub: &mut Subscription) -> Signal {
    next(sub).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_fails_calls_fast_then_recovers_and_subscribers_resync_first() {
    let mut server = RedisServer::start().unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let publisher = RedisInvalidator::builder()
        .url(server.url())
        .heartbeat(Some(Duration::from_millis(100)))
        .build()
        .await
        .unwrap();
    let subscriber = publisher.peer().await.unwrap();
    let mut sub = subscriber.subscribe().await.unwrap();
    let k = key("k");
    store
        .put_value(&k, &1u32, Version::new(1), Duration::from_secs(60))
        .await
        .unwrap();

    server.stop();
    let t = Instant::now();
    let err = store.get(&k).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "failing took {:?}",
        t.elapsed()
    );

    server.restart().unwrap();
    // The store reconnects by itself (the restarted server is empty).
    let mut recovered = false;
    for _ in 0..100 {
        if let Ok(None) = store.get(&k).await {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the store did not recover after the restart");
    assert_eq!(
        store
            .put_value(&k, &2u32, Version::new(2), Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Stored
    );

    // The subscriber says Resync before any event published after the restart.
    let marker = key("after-restart");
    let mut resynced = false;
    for _ in 0..200 {
        let _ = publisher.publish(&Invalidation::key(marker.clone())).await;
        match next_event_or_resync(&mut sub).await {
            Signal::Resync(_) => resynced = true,
            Signal::Invalidated(ev) if ev.target == Target::Key(marker.clone()) => {
                assert!(resynced, "an event after the restart arrived before Resync");
                return;
            }
            _ => {}
        }
    }
    panic!("no event after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_script_flush() {
    let server = RedisServer::start().unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let k = key("k");
    for v in 1..=20u64 {
        if v % 5 == 0 {
            assert_eq!(server.command(&["SCRIPT", "FLUSH"]).unwrap(), "OK");
        }
        let out = store
            .put(
                &k,
                &Entry::new(Version::new(v), vec![v as u8]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(out, PutOutcome::Stored);
        assert!(matches!(
            store.get_checked(&k, Version::new(v)).await.unwrap(),
            flagcache_core::Checked::Hit(_)
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_noticed_by_missing_heartbeats() {
    let server = RedisServer::start().unwrap();
    let inv = RedisInvalidator::builder()
        .url(server.url())
        .heartbeat(Some(Duration::from_millis(100)))
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    // The server stops answering everyone for 1.5 s: nothing arrives, not even our
    // own heartbeats, yet no connection is closed.
    server.command(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap();
    match next(&mut sub).await {
        Signal::Resync(ResyncReason::HeartbeatMissed) => {}
        other => panic!("expected a heartbeat Resync, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_events_from_redis_cli_are_received() {
    let server = RedisServer::start().unwrap();
    let inv = RedisInvalidator::builder()
        .url(server.url())
        .codec(JsonCodec::new())
        .heartbeat(None)
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    let cli = std::env::var("FLAGCACHE_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
    let out = std::process::Command::new(cli)
        .args(["-p", &server.port().to_string(), "PUBLISH", "flag_updates"])
        .arg(r#"{"flagKey": "checkout", "version": 42}"#)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success());
    match next(&mut sub).await {
        Signal::Invalidated(ev) => {
            assert_eq!(ev.target, Target::Key(key("checkout")));
            assert_eq!(ev.version, Some(Version::new(42)));
        }
        other => panic!("{other:?}"),
    }
    // And what this crate publishes in JSON, another language reads as such.
    let client = redis::Client::open(server.url()).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe("flag_updates").await.unwrap();
    let mut stream = ps.into_on_message();
    inv.publish(&Invalidation::key(key("k")).with_version(Version::new(3)))
        .await
        .unwrap();
    use futures_util::StreamExt;
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap();
    let text: String = msg.get_payload().unwrap();
    assert!(
        text.contains(r#""flagKey":"k""#) && text.contains(r#""version":3"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_error_at_connect() {
    let server = RedisServer::builder().password("right").start().unwrap();
    let url = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let err = RedisStore::connect(&url).await.unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.to_lowercase().contains("auth") || text.contains("WRONGPASS"),
        "{text}"
    );
    assert!(
        !text.contains("wrong@"),
        "the password leaked into the error: {text}"
    );
    let ok = RedisStore::connect(&server.url()).await.unwrap();
    assert!(
        !format!("{ok:?}").contains("right"),
        "Debug shows the password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_are_refused_and_nothing_is_written() {
    let server = RedisServer::start().unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .max_value_size(4096)
        .build()
        .await
        .unwrap();
    let big: Vec<u8> = (0..8192).map(|_| fastrand::u8(..)).collect();
    let err = store
        .put(
            &key("big"),
            &Entry::new(Version::new(1), big),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(err, Err(Error::ValueTooLarge { limit: 4096, .. })),
        "{err:?}"
    );
    assert_eq!(server.command(&["EXISTS", "flags:{big}"]).unwrap(), "0");
    // Keys that a text protocol could not carry never get this far.
    assert!(matches!(
        FlagKey::new("a b\r\nFLUSHALL"),
        Err(Error::InvalidKey { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_cache_over_redis_survives_a_dead_server_and_garbage_entries() {
    let mut server = RedisServer::start().unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .response_timeout(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (l, u) = (loads.clone(), up.clone());
    let loader = move |k: FlagKey| {
        let (l, u) = (l.clone(), u.clone());
        async move {
            l.fetch_add(1, Ordering::SeqCst);
            if u.load(Ordering::SeqCst) {
                Ok(Some((format!("{k}@1"), Version::new(1))))
            } else {
                Err(Error::loader(&k, std::io::Error::other("source down")))
            }
        }
    };
    let cache = FlagCache::<String>::builder(store.clone(), loader)
        .fresh_for(Duration::from_millis(50))
        .stale_for(Duration::ZERO)
        .l2_timeout(Duration::from_millis(300))
        .circuit_breaker(3, Duration::from_millis(500))
        // Every read retries, so the breaker is what bounds the dead server's cost.
        .fail_safe_throttle(Duration::ZERO)
        .build()
        .await
        .unwrap();

    // Garbage under a flag key, written by another client: counted, a miss, reloaded.
    server
        .command(&["SET", "flags:{garbage}", "not an envelope"])
        .unwrap();
    let l = cache.lookup(&key("garbage")).await.unwrap();
    assert_eq!(l.status, CacheStatus::Miss);
    assert_eq!(cache.stats().corrupt, 1);
    let got: Option<(String, Version)> = store.get_value(&key("garbage")).await.unwrap();
    assert_eq!(got, Some(("garbage@1".into(), Version::new(1))));

    // Redis dies and the source fails too: the last known value is served.
    cache.get(&key("k")).await.unwrap();
    server.stop();
    up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(80)).await;
    for _ in 0..20 {
        let l = cache.lookup(&key("k")).await.unwrap();
        assert_eq!(l.status, CacheStatus::Stale(StaleReason::FailSafe));
    }
    assert!(cache.stats().breaker_open, "{:?}", cache.stats());

    // Everything comes back, without restarting anything in the app.
    server.restart().unwrap();
    up.store(true, Ordering::SeqCst);
    let mut refilled = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = cache.lookup(&key("k")).await;
        if let Ok(Some(v)) = store.get_value::<String>(&key("k")).await {
            refilled = Some(v);
            break;
        }
    }
    assert_eq!(
        refilled,
        Some(("k@1".into(), Version::new(1))),
        "L2 never refilled: {:?}",
        cache.stats()
    );
    assert!(!cache.stats().breaker_open);
    let l = cache.lookup(&key("k")).await.unwrap();
    assert!(!matches!(l.status, CacheStatus::Stale(_)), "{l:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_store_and_invalidator() {
    let server = RedisServer::builder().tls().start().unwrap();
    let (url, cert) = (server.tls_url().unwrap(), server.tls_root_cert().unwrap());
    let store = RedisStore::builder()
        .url(&url)
        .tls_root_cert(cert.clone())
        .build()
        .await
        .unwrap();
    let k = key("over-tls");
    store
        .put_value(&k, &7u32, Version::new(1), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store.get_value::<u32>(&k).await.unwrap(),
        Some((7, Version::new(1)))
    );
    // It really went over the TLS port to the same server.
    assert_eq!(
        server.command(&["EXISTS", "flags:{over-tls}"]).unwrap(),
        "1"
    );
    let inv = RedisInvalidator::builder()
        .url(&url)
        .tls_root_cert(cert)
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    inv.publish(&Invalidation::key(k.clone())).await.unwrap();
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.target == Target::Key(k)));
    // Without trusting the certificate, the connection is refused, permanently.
    let err = RedisStore::connect(&url).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
}

/// Publishes raw messages as a foreign node (id 99) would.
async fn raw_publish(url: &str, messages: Vec<Vec<u8>>) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for m in messages {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("flag_updates")
            .arg(m)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

fn event(seq: u64) -> Vec<u8> {
    let ev = Invalidation::key(key("x")).stamped(flagcache_core::NodeId(99), seq, 1);
    flagcache_core::Codec::default()
        .encode_invalidation(&ev)
        .unwrap()
        .to_vec()
}

fn heartbeat(seq: u64) -> Vec<u8> {
    let mut b = vec![0xF1, 0xA8, 0x01];
    b.extend_from_slice(&99u64.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_sequence_number_names_the_gap() {
    let server = RedisServer::start().unwrap();
    let inv = RedisInvalidator::connect(&server.url()).await.unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    raw_publish(&server.url(), vec![event(1), event(3)]).await;
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.seq == 1));
    assert_eq!(
        next(&mut sub).await,
        Signal::Resync(ResyncReason::SequenceGap {
            origin: flagcache_core::NodeId(99),
            expected: 2,
            got: 3
        })
    );
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.seq == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_last_event_is_revealed_by_the_next_heartbeat() {
    let server = RedisServer::start().unwrap();
    let inv = RedisInvalidator::connect(&server.url()).await.unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    // Event 1 arrives; event 2 is lost; the publisher's heartbeat says it sent 2.
    raw_publish(&server.url(), vec![event(1), heartbeat(1), heartbeat(2)]).await;
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.seq == 1));
    assert_eq!(
        next(&mut sub).await,
        Signal::Resync(ResyncReason::SequenceGap {
            origin: flagcache_core::NodeId(99),
            expected: 2,
            got: 2
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_subscribers_publish_no_heartbeats() {
    let server = RedisServer::start().unwrap();
    let inv = RedisInvalidator::builder()
        .url(server.url())
        .heartbeat(Some(Duration::from_millis(50)))
        .build()
        .await
        .unwrap();
    let _sub = inv.subscribe().await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe("flag_updates").await.unwrap();
    let mut stream = ps.into_on_message();
    use futures_util::StreamExt;
    // Nothing published yet: the channel stays silent.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );
    inv.publish(&Invalidation::all()).await.unwrap();
    // The event, then heartbeats carrying seq 1.
    let first = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.get_payload_bytes()[..2], [0xF1, 0xA7]);
    let hb = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hb.get_payload_bytes()[..3], [0xF1, 0xA8, 0x01]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_subscription_never_resyncs() {
    let server = RedisServer::start().unwrap();
    let a = RedisInvalidator::builder()
        .url(server.url())
        .heartbeat(Some(Duration::from_millis(20)))
        .build()
        .await
        .unwrap();
    let b = a.peer().await.unwrap();
    let mut sub = b.subscribe().await.unwrap();
    let _a_sub = a.subscribe().await.unwrap(); // so A sends heartbeats too
    for i in 0..20 {
        a.publish(&Invalidation::key(key(&format!("k{i}"))))
            .await
            .unwrap();
        b.publish(&Invalidation::key(key(&format!("b{i}"))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut events = 0;
    while let Ok(Some(signal)) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await
    {
        match signal {
            Signal::Invalidated(_) => events += 1,
            other => panic!("spurious {other:?} in steady state"),
        }
    }
    assert_eq!(events, 40);
}

/// `INFO commandstats` calls of `command` so far.
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Under concurrent misses the cache reads Redis with `MGET` batches rather than one
/// `GET` per key; every key gets its own entry, and a corrupt entry in a batch costs
/// only its own key (deleted, then loaded from the source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_read_redis_in_mget_batches_key_by_key() {
    const KEYS: usize = 300;
    let server = RedisServer::start().unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .build()
        .await
        .unwrap();
    let keys: Vec<FlagKey> = (0..KEYS).map(|i| key(&format!("mget.{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        store
            .put_value(
                k,
                &format!("l2:{i}"),
                Version::new(1),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let corrupt = 7;
    let _: () = redis::cmd("SET")
        .arg(store.redis_key(&keys[corrupt]))
        .arg(&b"\xf1 not an entry"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = loads.clone();
    let loader = move |_: FlagKey| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok(Some(("source".to_string(), Version::new(2)))) }
    };
    let cache = FlagCache::<String>::builder(store, loader)
        .l2_batch_after(4)
        .build()
        .await
        .unwrap();
    let (gets, mgets) = (
        command_calls(&mut conn, "get").await,
        command_calls(&mut conn, "mget").await,
    );
    let reads: Vec<_> = keys
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.lookup(&k).await })
        })
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        let l = r.await.unwrap().unwrap();
        let got = l.value.as_deref().map(String::as_str);
        if i == corrupt {
            assert_eq!((got, l.status), (Some("source"), CacheStatus::Miss));
        } else {
            assert_eq!(got, Some(format!("l2:{i}").as_str()), "key {i}");
            assert_eq!(l.status, CacheStatus::HitL2, "key {i}");
        }
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "only the corrupt key was loaded"
    );
    let st = cache.stats();
    assert!(
        st.l2_batches > 0 && st.l2_batched_reads > st.l2_batches,
        "{st:?}"
    );
    let gets = command_calls(&mut conn, "get").await - gets;
    let mgets = command_calls(&mut conn, "mget").await - mgets;
    assert_eq!(mgets, st.l2_batches, "one MGET per batch");
    assert!(
        gets + mgets < KEYS as u64 / 2,
        "{gets} GETs and {mgets} MGETs for {KEYS} keys"
    );
}
