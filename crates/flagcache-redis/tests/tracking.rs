//! `RedisTrackingInvalidator` against real Redis and Valkey servers: a plain client's
//! `SET` and an expiry reach the replicas' L1; a killed tracking connection and a flush
//! are `Resync`; alongside pub/sub, a node's own write stays in its L1; on a cluster
//! every primary is tracked, a new one too; a server without RESP3 is refused at build.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{json_store, key, next, next_within, on_both_flavors, raw_conn};
use flagcache_core::{
    CacheStatus, Error, FlagCache, FlagKey, Invalidation, Invalidator, JsonCodec, ResyncReason,
    Signal, Subscription, Target, Version,
};
use flagcache_redis::{
    RedisInvalidator, RedisStore, RedisTrackingInvalidator, TRACKING_CLIENT_NAME,
};
use flagcache_testkit::{CountingSource, Flavor, RedisCluster, RedisSentinel, RedisServer};

/// Writes `raw` under `flags:{<k>}` with a plain client, as a service in another
/// language would: no store, no publish.
async fn foreign_set(url: &str, k: &str, raw: &str, px: Option<u64>) {
    let mut c = raw_conn(url).await;
    let mut cmd = redis::cmd("SET");
    cmd.arg(format!("flags:{{{k}}}")).arg(raw);
    if let Some(ms) = px {
        cmd.arg("PX").arg(ms);
    }
    let _: () = cmd.query_async(&mut c).await.unwrap();
}

/// The next signal that is not an invalidation of another key.
async fn next_for(sub: &mut Subscription, k: &FlagKey) -> Signal {
    loop {
        match next(sub).await {
            Signal::Invalidated(ev) if ev.target != Target::Key(k.clone()) => continue,
            s => return s,
        }
    }
}

/// A replica in the JSON layout, fresh for a minute: without an invalidation it
/// serves its L1 copy all that time.
async fn replica(url: &str, inv: RedisTrackingInvalidator) -> FlagCache<String> {
    FlagCache::<String>::builder(json_store(url).await, CountingSource::new(1))
        .fresh_for(Duration::from_secs(60))
        .invalidator(inv)
        .build()
        .await
        .unwrap()
}

/// Waits (up to 5 s) until `cache` serves `k` from L1.
async fn until_in_l1(cache: &FlagCache<String>, k: &FlagKey) {
    let start = Instant::now();
    while cache.lookup(k).await.unwrap().status != CacheStatus::HitL1 {
        assert!(start.elapsed() < Duration::from_secs(5), "{k} never in L1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 5 s) until `cache` serves `want` for `k`; the time it took.
async fn until_served(cache: &FlagCache<String>, k: &FlagKey, want: &str) -> Duration {
    let start = Instant::now();
    loop {
        let got = cache.get(k).await.unwrap();
        if got.as_deref().map(String::as_str) == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still {got:?} 5 s after the write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_foreign_set_reaches_every_replicas_l1(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let url = server.url();
    let inv = RedisTrackingInvalidator::builder()
        .url(&url)
        .codec(JsonCodec::new())
        .build()
        .await
        .unwrap();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&url, inv.clone()).await);
    }
    let k = key("checkout");
    for r in &replicas {
        assert_eq!(r.get(&k).await.unwrap().as_deref().unwrap(), "checkout@1");
    }
    // The first fill's own L2 write is announced too (versionless, alone): wait until
    // every replica holds the value in L1.
    for r in &replicas {
        until_in_l1(r, &k).await;
    }
    foreign_set(
        &url,
        "checkout",
        r#"{"flagConfig":"from-go","version":2}"#,
        None,
    )
    .await;
    for r in &replicas {
        let took = until_served(r, &k, "from-go").await;
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}

async fn an_expiry_is_an_invalidation(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let url = server.url();
    let inv = RedisTrackingInvalidator::connect(&url).await.unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    let k = key("short-lived");
    foreign_set(&url, "short-lived", "x", Some(200)).await;
    let written = Instant::now();
    for what in ["the write", "the expiry"] {
        match next_for(&mut sub, &k).await {
            Signal::Invalidated(ev) => assert_eq!(ev.version, None, "{what}"),
            s => panic!("{what}: {s:?}"),
        }
    }
    assert!(written.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        server.command(&["EXISTS", "flags:{short-lived}"]).unwrap(),
        "0"
    );
}

/// The id of the one tracking connection, from `CLIENT LIST` (waiting, up to 5 s, for
/// the server to drop the one `build` opened to check the server and closed).
fn tracking_client_id(server: &RedisServer) -> String {
    let start = Instant::now();
    loop {
        let list = server.command(&["CLIENT", "LIST"]).unwrap();
        let ids: Vec<&str> = list
            .lines()
            .filter(|l| l.contains(&format!(" name={TRACKING_CLIENT_NAME} ")))
            .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
            .collect();
        if let [id] = ids[..] {
            return id.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{list}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn a_killed_tracking_connection_is_a_resync_then_tracking_resumes(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let url = server.url();
    let inv = RedisTrackingInvalidator::connect(&url).await.unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    let id = tracking_client_id(&server);
    assert_eq!(server.command(&["CLIENT", "KILL", "ID", &id]).unwrap(), "1");
    // Once when lost, once when a new tracking connection is in place.
    for _ in 0..2 {
        assert_eq!(
            next(&mut sub).await,
            Signal::Resync(ResyncReason::Reconnected)
        );
    }
    assert_ne!(tracking_client_id(&server), id);
    let k = key("after");
    foreign_set(&url, "after", "x", None).await;
    assert!(matches!(
        next_for(&mut sub, &k).await,
        Signal::Invalidated(_)
    ));
}

async fn a_reconnect_refused_for_good_ends_the_subscription(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = RedisTrackingInvalidator::connect(&server.url())
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    // The user may no longer turn tracking on (NOPERM: permanent), as a server that no
    // longer spoke RESP3 would refuse HELLO 3.
    assert_eq!(
        server
            .command(&["ACL", "SETUSER", "default", "-client|tracking"])
            .unwrap(),
        "OK"
    );
    let id = tracking_client_id(&server);
    server.command(&["CLIENT", "KILL", "ID", &id]).unwrap();
    assert_eq!(
        next(&mut sub).await,
        Signal::Resync(ResyncReason::Reconnected)
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await;
    assert_eq!(ended, Ok(None), "the subscription goes on");
}

async fn entries_filled_before_a_lost_tracking_connection_are_not_served_fresh(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = RedisTrackingInvalidator::connect(&server.url())
        .await
        .unwrap();
    let cache = replica(&server.url(), inv).await;
    let k = key("held");
    cache.get(&k).await.unwrap();
    until_in_l1(&cache, &k).await;
    let id = tracking_client_id(&server);
    server.command(&["CLIENT", "KILL", "ID", &id]).unwrap();
    // Writes may have been missed while it was away: once it is back (a second
    // tracking client listed), the entry is read from L2 again, not served from L1.
    let start = Instant::now();
    while cache.stats().resyncs < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(tracking_client_id(&server), id);
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL2);
}

async fn through_sentinel_tracking_follows_a_failover(flavor: Flavor) {
    let mut setup = RedisSentinel::start_with(flavor, None).unwrap();
    let inv = RedisTrackingInvalidator::builder()
        .sentinel([setup.sentinel_url()], RedisSentinel::SERVICE)
        .connection_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .ping_every(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    foreign_set(&setup.primary_mut().url(), "before", "x", None).await;
    expect_keys(&mut sub, &["before".to_string()]).await;

    let setup = tokio::task::spawn_blocking(move || {
        setup.fail_over().unwrap();
        setup
    })
    .await
    .unwrap();
    for _ in 0..2 {
        assert!(matches!(
            next_within(&mut sub, Duration::from_secs(30)).await,
            Signal::Resync(_)
        ));
    }
    foreign_set(&setup.replica().url(), "after", "x", None).await;
    expect_keys(&mut sub, &["after".to_string()]).await;
}

async fn a_flush_is_a_resync(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = RedisTrackingInvalidator::connect(&server.url())
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    server.command(&["FLUSHDB"]).unwrap();
    assert_eq!(next(&mut sub).await, Signal::Resync(ResyncReason::LogReset));
}

async fn locks_and_other_namespaces_are_not_tracked(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = RedisTrackingInvalidator::connect(&server.url())
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    for k in [
        "flags:lock:{a}",
        "flags:absent:{a}",
        "other:{a}",
        "flags:{a}b",
    ] {
        server.command(&["SET", k, "x"]).unwrap();
    }
    server.command(&["SET", "flags:{b}", "x"]).unwrap();
    match next(&mut sub).await {
        Signal::Invalidated(ev) => assert_eq!(ev.target, Target::Key(key("b"))),
        s => panic!("{s:?}"),
    }
}

async fn alongside_pubsub_a_nodes_own_write_stays_in_its_l1(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let url = server.url();
    let pubsub = RedisInvalidator::connect(&url).await.unwrap();
    let tracking = |p: RedisInvalidator| {
        RedisTrackingInvalidator::builder()
            .url(&url)
            .alongside(p)
            .build()
    };
    let (a_inv, b_inv) = (
        tracking(pubsub.clone()).await.unwrap(),
        tracking(pubsub.peer()).await.unwrap(),
    );
    assert_eq!(a_inv.node_id(), pubsub.node_id());
    let build = |inv| async {
        FlagCache::<String>::builder(
            RedisStore::connect(&url).await.unwrap(),
            CountingSource::new(1),
        )
        .fresh_for(Duration::from_secs(60))
        .invalidator(inv)
        .build()
        .await
        .unwrap()
    };
    let (a, b) = (build(a_inv).await, build(b_inv).await);
    let k = key("kill-switch");
    assert_eq!(
        b.get(&k).await.unwrap().as_deref().unwrap(),
        "kill-switch@1"
    );

    a.set(&k, "off".into(), Version::new(2)).await.unwrap();
    // B drops its v1 (the pub/sub event and the push both say v2)…
    until_served(&b, &k, "off").await;
    // …and A's v2 stays: the push its own write caused carries the version L2 holds.
    until_in_l1(&a, &k).await;
    until_in_l1(&b, &k).await;
    // A change that leaves the version as it is (a plain client's PEXPIRE here) is
    // pushed too, and evicts nothing: alone, both would read L2 again.
    let mut c = raw_conn(&url).await;
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(format!("flags:{{{}}}", k.as_str()))
        .arg(600_000)
        .query_async(&mut c)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for r in [&a, &b] {
        let l = r.lookup(&k).await.unwrap();
        assert_eq!(
            (l.status, l.value.as_deref().map(String::as_str)),
            (CacheStatus::HitL1, Some("off"))
        );
    }

    // A write by a plain client still reaches both.
    let stranger = RedisStore::connect(&url).await.unwrap();
    let codec = flagcache_core::Codec::default();
    let raw = codec
        .encode_entry(&flagcache_core::Entry {
            version: Version::new(3),
            stamp_ms: 0,
            payload: codec.encode_value(&"on").unwrap(),
        })
        .unwrap();
    let mut c = raw_conn(&url).await;
    let _: () = redis::cmd("SET")
        .arg(stranger.redis_key(&k))
        .arg(&raw[..])
        .query_async(&mut c)
        .await
        .unwrap();
    until_served(&a, &k, "on").await;
    until_served(&b, &k, "on").await;
}

async fn alone_it_refuses_what_the_server_cannot_see(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = RedisTrackingInvalidator::connect(&server.url())
        .await
        .unwrap();
    inv.publish(&Invalidation::key(key("k")).with_version(Version::new(1)))
        .await
        .unwrap();
    for ev in [
        Invalidation::tag("beta"),
        Invalidation::all(),
        Invalidation::key(key("k")).purging_shared(),
    ] {
        let err = inv.publish(&ev).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{ev:?}: {err}");
    }
}

async fn a_server_without_resp3_is_refused_at_build(flavor: Flavor) {
    let server = RedisServer::builder()
        .flavor(flavor)
        .args(["--rename-command", "HELLO", ""])
        .start()
        .unwrap();
    let err = RedisTrackingInvalidator::connect(&server.url())
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains(&server.port().to_string()),
        "{err}"
    );
}

/// Writes `flags:{<k>}` = "x" through a cluster client (which follows `MOVED`).
async fn cluster_set(conn: &mut redis::cluster_async::ClusterConnection, k: &str) {
    let _: () = redis::cmd("SET")
        .arg(format!("flags:{{{k}}}"))
        .arg("x")
        .query_async(conn)
        .await
        .unwrap();
}

/// Waits for invalidations of every key in `want` (others are ignored).
async fn expect_keys(sub: &mut Subscription, want: &[String]) {
    let mut missing: std::collections::BTreeSet<&str> = want.iter().map(String::as_str).collect();
    while !missing.is_empty() {
        match next(sub).await {
            Signal::Invalidated(ev) => {
                if let Target::Key(k) = &ev.target {
                    missing.remove(k.as_str());
                }
            }
            s => panic!("{s:?} while waiting for {missing:?}"),
        }
    }
}

async fn on_a_cluster_every_primary_is_tracked_and_a_new_one_joins(flavor: Flavor) {
    let mut cluster = RedisCluster::start_with(flavor, 3).unwrap();
    let inv = RedisTrackingInvalidator::builder()
        .cluster(cluster.urls())
        .ping_every(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    for node in cluster.nodes() {
        assert!(
            node.command(&["CLIENT", "LIST"])
                .unwrap()
                .contains(&format!(" name={TRACKING_CLIENT_NAME} ")),
            "a primary without a tracking connection"
        );
    }
    let mut conn = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    // 30 keys land on all three primaries.
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    for k in &keys {
        cluster_set(&mut conn, k).await;
    }
    expect_keys(&mut sub, &keys).await;

    // A fourth primary takes over the slot of `moved`: noticed at a PING, `Resync`
    // when noticed and again once it is tracked too.
    let slot: u16 = cluster.nodes()[0]
        .command(&["CLUSTER", "KEYSLOT", "flags:{moved}"])
        .unwrap()
        .parse()
        .unwrap();
    cluster.add_primary(slot).unwrap();
    for _ in 0..2 {
        assert_eq!(
            next(&mut sub).await,
            Signal::Resync(ResyncReason::Reconnected)
        );
    }
    cluster_set(&mut conn, "moved").await;
    expect_keys(&mut sub, &["moved".to_string()]).await;
}

async fn on_a_cluster_a_lost_primary_connection_is_a_resync(flavor: Flavor) {
    let cluster = RedisCluster::start_with(flavor, 3).unwrap();
    let inv = RedisTrackingInvalidator::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    let node = &cluster.nodes()[1];
    let id = tracking_client_id(node);
    assert_eq!(node.command(&["CLIENT", "KILL", "ID", &id]).unwrap(), "1");
    for _ in 0..2 {
        assert_eq!(
            next(&mut sub).await,
            Signal::Resync(ResyncReason::Reconnected)
        );
    }
}

on_both_flavors!(
    a_foreign_set_reaches_every_replicas_l1,
    an_expiry_is_an_invalidation,
    a_killed_tracking_connection_is_a_resync_then_tracking_resumes,
    a_flush_is_a_resync,
    entries_filled_before_a_lost_tracking_connection_are_not_served_fresh,
    through_sentinel_tracking_follows_a_failover,
    a_reconnect_refused_for_good_ends_the_subscription,
    locks_and_other_namespaces_are_not_tracked,
    alongside_pubsub_a_nodes_own_write_stays_in_its_l1,
    alone_it_refuses_what_the_server_cannot_see,
    a_server_without_resp3_is_refused_at_build,
    on_a_cluster_every_primary_is_tracked_and_a_new_one_joins,
    on_a_cluster_a_lost_primary_connection_is_a_resync,
);
