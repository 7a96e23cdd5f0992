//! `examples/swap_backends.rs` runs unchanged on each backend `FLAGCACHE_URL` names.

#![allow(clippy::unwrap_used)]

#[path = "../examples/swap_backends.rs"]
mod example;

use flagcache_testkit::{MemcachedServer, RedisServer};

// One test in this binary: it sets the process's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_code_runs_on_every_backend() {
    let redis = RedisServer::start().unwrap();
    let memcached = MemcachedServer::start().unwrap();
    for (url, name) in [
        (None, "memory"),
        (Some(redis.url()), "redis"),
        (
            Some(format!("memcached://127.0.0.1:{}", memcached.port())),
            "memcached",
        ),
    ] {
        match &url {
            Some(url) => std::env::set_var(flagcache::URL_VAR, url),
            None => std::env::remove_var(flagcache::URL_VAR),
        }
        let (backend, value) = example::run().await.unwrap();
        assert_eq!(backend, name, "{url:?}");
        assert!(!value.enabled, "{url:?}");
    }
}
