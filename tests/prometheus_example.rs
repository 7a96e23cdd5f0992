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
    let handle = example::install().unwrap();
    let _cache = example::warm_cache().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(example::serve(listener, handle, 2));

    let response = scrape(addr, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let counter = |status: &str| {
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
    // One miss loaded the flag; the next two reads were L1 hits.
    assert_eq!(counter("miss"), Some(1.0), "{response}");
    assert_eq!(counter("hit_l1"), Some(2.0), "{response}");
    assert!(
        response.contains("flagcache_load_latency_seconds"),
        "the load latency histogram is missing: {response}"
    );
    assert!(scrape(addr, "/other").await.starts_with("HTTP/1.1 404"));
    server.await.unwrap().unwrap();
}
