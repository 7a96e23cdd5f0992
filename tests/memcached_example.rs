//! `examples/memcached.rs` runs against two real memcached servers.

#![cfg(feature = "memcached")]
#![allow(clippy::unwrap_used)]

#[path = "../examples/memcached.rs"]
mod example;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memcached_example_runs() {
    let a = flagcache_testkit::MemcachedServer::start().unwrap();
    let b = flagcache_testkit::MemcachedServer::start().unwrap();
    let list = format!("127.0.0.1:{},127.0.0.1:{}", a.port(), b.port());
    example::run(&list).await.unwrap();
}
