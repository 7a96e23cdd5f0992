//! A small service that exposes the cache's `flagcache_*` metrics to Prometheus.
//!
//! `FlagCache` reports through the `metrics` facade. Installing a Prometheus recorder
//! (the `metrics-exporter-prometheus` crate) is all it takes to expose every counter
//! and histogram — hits per tier, loads, L2 errors by kind, invalidation lag — at
//! `/metrics`. This example serves them with a few lines of tokio; a service usually
//! mounts `handle.render()` on the HTTP server it already has.
//!
//! ```text
//! cargo run --example prometheus        # then: curl http://127.0.0.1:9898/metrics
//! ```

use std::net::SocketAddr;

use flagcache::memory::MemoryStore;
use flagcache::{FlagCache, FlagKey, Version};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Installs the Prometheus recorder for this process and returns the handle that
/// renders its text format.
///
/// # Errors
/// When another recorder is installed already.
pub fn install() -> Result<PrometheusHandle, Box<dyn std::error::Error + Send + Sync>> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

/// A cache over the memory store that has answered a few reads: a miss, then hits.
///
/// # Errors
/// The cache's.
pub async fn warm_cache() -> flagcache::Result<FlagCache<bool>> {
    let source = |_key: FlagKey| async { Ok(Some((true, Version::new(1)))) };
    let cache = FlagCache::builder(MemoryStore::new(), source)
        .name("checkout")
        .build()
        .await?;
    let key = FlagKey::new("checkout.new-flow")?;
    for _ in 0..3 {
        cache.get(&key).await?;
    }
    Ok(cache)
}

/// Serves `GET /metrics` (anything else is a 404) on `listener`, `requests` times.
///
/// # Errors
/// An I/O error of the listener or a connection.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    requests: usize,
) -> std::io::Result<()> {
    for _ in 0..requests {
        let (mut conn, _) = listener.accept().await?;
        let mut buf = [0u8; 1024];
        let n = conn.read(&mut buf).await?;
        let request = String::from_utf8_lossy(&buf[..n]);
        let response = if request.starts_with("GET /metrics ") {
            let body = handle.render();
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
        };
        conn.write_all(response.as_bytes()).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let handle = install()?;
    let _cache = warm_cache().await?;
    let addr: SocketAddr = std::env::var("FLAGCACHE_METRICS_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:9898".to_string())
        .parse()?;
    let listener = TcpListener::bind(addr).await?;
    println!("serving http://{}/metrics", listener.local_addr()?);
    serve(listener, handle, usize::MAX).await?;
    Ok(())
}
