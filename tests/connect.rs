//! `flagcache::connect(url)`: every URL form against a real server — two replicas built
//! from the same URL share L2, and a kill switch set on one reaches the other — and
//! the settings in the query reach the backend.

#![cfg(all(feature = "memory", feature = "redis", feature = "memcached"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use flagcache::{connect, store::FlagStoreExt, Backend, CacheStatus, FlagCache, FlagKey, Version};
use flagcache_testkit::{MemcachedServer, RedisCluster, RedisSentinel, RedisServer};

fn key() -> FlagKey {
    FlagKey::new(format!("checkout-{:x}", fastrand::u64(..))).unwrap()
}

async fn replica(backend: &Backend) -> FlagCache<String> {
    let source = |_k: FlagKey| async { Ok(Some(("on".to_string(), Version::new(1)))) };
    backend.cache_builder(source).build().await.unwrap()
}

/// Two replicas, each connected from `url`: B reads what A loaded from L2, and A's
/// kill switch reaches B through the backend's invalidation channel.
async fn two_replicas_share(url: &str) -> FlagKey {
    let (backend_a, backend_b) = if url.starts_with("memory://") {
        let b = connect(url).await.unwrap();
        (b.clone(), b)
    } else {
        (connect(url).await.unwrap(), connect(url).await.unwrap())
    };
    let (a, b) = (replica(&backend_a).await, replica(&backend_b).await);
    let k = key();
    assert_eq!(a.lookup(&k).await.unwrap().status, CacheStatus::Miss);
    let seen = b.lookup(&k).await.unwrap();
    assert_eq!(seen.status, CacheStatus::HitL2, "{url}");
    a.set(&k, "off".to_string(), Version::new(2)).await.unwrap();
    let start = Instant::now();
    while b.get(&k).await.unwrap().as_deref().map(String::as_str) != Some("off") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{url}: the kill switch never reached B"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    two_replicas_share("memory://").await;
    let backend = connect("memory://?layout=json").await.unwrap();
    assert!(backend.as_memory().is_some());
    assert!(backend.coalescer().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_namespace_channel_and_json_layout() {
    let server = RedisServer::start().unwrap();
    let url = format!(
        "redis://127.0.0.1:{}?namespace=svc&channel=svc-events&layout=json&response_timeout=1s",
        server.port()
    );
    let k = two_replicas_share(&url).await;
    let stored = server.command(&["GET", &format!("svc:{{{k}}}")]).unwrap();
    assert!(stored.contains(r#""flagConfig":"off""#), "{stored}");
    assert!(connect(&url).await.unwrap().coalescer().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_password_and_database() {
    let server = RedisServer::builder().password("s3cr%t").start().unwrap();
    let url = |db: u32| format!("redis://:s3cr%25t@127.0.0.1:{}/{db}", server.port());
    let k = two_replicas_share(&url(2)).await;
    let in_db = |db| {
        let url = url(db);
        let k = k.clone();
        async move {
            let backend = connect(&url).await.unwrap();
            backend.store().get_value::<String>(&k).await.unwrap()
        }
    };
    assert_eq!(in_db(2).await, Some(("off".to_string(), Version::new(2))));
    assert_eq!(in_db(0).await, None);
    let wrong = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let text = connect(&wrong).await.unwrap_err().to_string();
    assert!(!text.contains("wrong"), "the password leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_root_certificate() {
    let server = RedisServer::builder().tls().start().unwrap();
    let ca = server.dir().join("ca.pem");
    let port = server
        .tls_url()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("rediss://127.0.0.1:{port}?tls_ca={}", ca.display());
    let k = two_replicas_share(&url).await;
    assert_eq!(
        server
            .command(&["EXISTS", &format!("flags:{{{k}}}")])
            .unwrap(),
        "1"
    );
    // Without the certificate, the server's is not trusted.
    assert!(connect(&format!("rediss://127.0.0.1:{port}"))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_with_the_data_nodes_password() {
    let setup = RedisSentinel::start_with_password("pw").unwrap();
    let sentinel = setup.sentinel_url();
    let hostport = sentinel.trim_start_matches("redis://");
    let url = format!(
        "redis+sentinel://:pw@{hostport}/{}/0?connect_timeout=2s",
        RedisSentinel::SERVICE
    );
    let k = two_replicas_share(&url).await;
    let stored = setup
        .replica()
        .command(&["EXISTS", &format!("flags:{{{k}}}")]);
    // The write went to the primary, which replicates it.
    let start = Instant::now();
    let mut stored = stored.unwrap();
    while stored != "1" && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stored = setup
            .replica()
            .command(&["EXISTS", &format!("flags:{{{k}}}")])
            .unwrap();
    }
    assert_eq!(stored, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    let cluster = RedisCluster::start(3).unwrap();
    let hosts: Vec<String> = cluster
        .urls()
        .iter()
        .map(|u| u.trim_start_matches("redis://").to_string())
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    let k = two_replicas_share(&url).await;
    let backend = connect(&url).await.unwrap();
    assert_eq!(
        backend.store().get_value::<String>(&k).await.unwrap(),
        Some(("off".to_string(), Version::new(2)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_ring_with_poll_interval_and_namespace() {
    let (a, b) = (
        MemcachedServer::start().unwrap(),
        MemcachedServer::start().unwrap(),
    );
    let url = format!(
        "memcached://127.0.0.1:{},127.0.0.1:{}?poll_interval=20ms&namespace=svc&timeout=1s",
        a.port(),
        b.port()
    );
    let k = two_replicas_share(&url).await;
    let backend = connect(&url).await.unwrap();
    let store = backend.as_memcached().unwrap();
    assert_eq!(store.memcached_key(&k), format!("svc:{k}"));
    assert!(backend.coalescer().is_some());
}

#[tokio::test]
async fn a_bad_url_names_itself_redacted_and_lists_the_forms() {
    for bad in [
        "redis://:hunter2@127.0.0.1:notaport",
        "redis://:hunter2@127.0.0.1?colour=red",
        "redis://:hunter2@127.0.0.1?tls_ca=/ca.pem",
        "memcached://127.0.0.1:1?layout=yaml",
        "http://:hunter2@example.com",
    ] {
        let text = connect(bad).await.unwrap_err().to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("backend URL"), "{text}");
        assert!(
            text.contains("accepted forms") || text.contains("take:") || text.contains("layouts"),
            "{text}"
        );
    }
    let text = connect("redis+sentinel://:hunter2@h?sentinel_password=hunter2")
        .await
        .unwrap_err()
        .to_string();
    assert!(!text.contains("hunter2"), "{text}");
}
