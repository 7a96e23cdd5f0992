//! `examples/redis.rs` runs against a real redis-server.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

#[path = "../examples/redis.rs"]
mod example;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_example_runs() {
    let server = flagcache_testkit::RedisServer::start().unwrap();
    example::run(&server.url()).await.unwrap();
}
