//! `examples/prometheus.rs` exposes the cache's counters: a scrape of `/metrics` finds
//! them, with the values the reads made.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/prometheus.rs"]
#[allow(dead_code)]
mod example;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape, as Prometheus makes it: `GET /metrics`, the whole response.
async fn scrape(addr: std::net::SocketAddr, path: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    response
}

// One test in this binary: it installs the process's metrics recorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_finds_the_cache_counters() {
    const SCRAPES: usize = 200;
    let handle = example::install().unwrap();
    let _cache = example::warm_cache().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(example::serve(listener, handle, SCRAPES + 1));

    let counter = |response: &str, status: &str| {
        response
            .lines()
            .find(|l| {
                l.starts_with("flagcache_requests_total{")
                    && l.contains("cache=\"checkout\"")
                    && l.contains(&format!("status=\"{status}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    // One miss loaded the flag; the next two reads were L1 hits. L1 hits reach the
    // recorder on the clock thread's next tick (10 ms): scrape until they are there,
    // 2 s at most.
    let mut response = String::new();
    for _ in 0..SCRAPES {
        response = scrape(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        if counter(&response, "hit_l1") == Some(2.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(counter(&response, "miss"), Some(1.0), "{response}");
    assert_eq!(counter(&response, "hit_l1"), Some(2.0), "{response}");
    assert!(
        response.contains("flagcache_load_latency_seconds"),
        "the load latency histogram is missing: {response}"
    );
    assert!(scrape(addr, "/other").await.starts_with("HTTP/1.1 404"));
    // Still serving: no connection failed it.
    assert!(!server.is_finished(), "{:?}", server.await);
    server.abort();
}
