//! One L2-hit contender alone, for a profiler: `raw` (a redis-rs GET), `store` (the
//! Redis store alone) or `cache` (`FlagCache` with L1 off), 50 tasks reading 50 keys
//! of 1 KiB from a running Redis, `reads` reads in all.
//!
//! ```text
//! cargo build --release -p flagcache-bench --example l2_profile
//! valgrind --tool=callgrind target/release/examples/l2_profile cache redis://127.0.0.1:6379 20000
//! ```
//!
//! Run it at two read counts and subtract: the difference over the extra reads is the
//! cost of one read, free of the setup's.
//!
//! Settings from the environment: `L2_BATCH_AFTER` (the cache's
//! [`l2_batch_after`](flagcache_core::FlagCacheBuilder::l2_batch_after), default 4),
//! `TASKS` (default 50) and `RUNTIME=current` (one thread; two workers by default). `examples/l2_allocs.rs` runs the same reads and counts
//! their allocations.

use flagcache_core::{FlagCache, FlagKey, FlagStore, Version};
use flagcache_memcached::MemcachedStore;
use flagcache_redis::RedisStore;

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A setting from the environment, or `default`.
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[allow(dead_code)] // `l2_allocs` has a main of its own
fn main() -> Res<()> {
    runtime()?.block_on(run(None))
}

/// Two worker threads, or one thread with `RUNTIME=current` (as the load generator's
/// 1-task rounds run).
pub fn runtime() -> Res<tokio::runtime::Runtime> {
    let current = std::env::var("RUNTIME").is_ok_and(|r| r == "current");
    let mut builder = if current {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    };
    Ok(builder.enable_all().build()?)
}

/// The reads, timed; `allocations` (when given) counts the allocations made so far,
/// and the report gives them per read.
pub async fn run(allocations: Option<fn() -> u64>) -> Res<()> {
    let allocations = || allocations.map_or(0, |count| count());

    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(url), Some(reads)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: l2_profile raw|store|cache <redis or memcached url> <reads>".into());
    };
    let reads: usize = reads.parse()?;
    let tasks = setting("TASKS", 50);
    match url.strip_prefix("memcached://") {
        Some(addr) => {
            let store = MemcachedStore::builder()
                .server(addr)
                .namespace("l2-profile")
                .build()
                .await?;
            let raw = |name| async move {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Raw::Memcached(
                    async_memcached::Client::new(format!("tcp://{addr}")).await?,
                    name,
                ))
            };
            measure(
                &mode,
                store.clone(),
                |k| store.memcached_key(k),
                raw,
                reads,
                tasks,
                allocations,
            )
            .await
        }
        None => {
            let store = RedisStore::builder()
                .url(&url)
                .namespace("l2-profile")
                .build()
                .await?;
            let conn = redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            let raw = |name| {
                let conn = conn.clone();
                async move { Ok(Raw::Redis(conn, name)) }
            };
            measure(
                &mode,
                store.clone(),
                |k| store.redis_key(k),
                raw,
                reads,
                tasks,
                allocations,
            )
            .await
        }
    }
}

/// The reads of `mode` over `store` (`name` gives a key's name in it, `raw` makes a
/// task's raw client).
async fn measure<S, Fut>(
    mode: &str,
    store: S,
    name: impl Fn(&FlagKey) -> String,
    raw: impl Fn(String) -> Fut,
    reads: usize,
    tasks: usize,
    allocations: impl Fn() -> u64,
) -> Res<()>
where
    S: FlagStore + Clone + 'static,
    Fut: std::future::Future<Output = Res<Raw>>,
{
    let loader = |_: FlagKey| async { Ok(Some(("x".repeat(1000), Version::new(1)))) };
    let cache = FlagCache::<String>::builder(store.clone(), loader)
        .l1(false)
        .l2_batch_after(setting("L2_BATCH_AFTER", 4))
        .build()
        .await?;
    let keys: Vec<FlagKey> = (0..tasks)
        .map(|i| FlagKey::new(format!("p.{i}")))
        .collect::<Result<_, _>>()?;
    for k in &keys {
        cache.set(k, "x".repeat(1000), Version::new(1)).await?;
    }
    let mut raws = Vec::with_capacity(tasks);
    for k in &keys {
        raws.push(raw(name(k)).await?);
    }
    let before = allocations();
    let started = std::time::Instant::now();
    let readers: Vec<_> = keys
        .iter()
        .zip(raws)
        .map(|(key, raw)| {
            let reader = Reader {
                mode: mode.to_string(),
                cache: cache.clone(),
                store: store.clone(),
                key: key.clone(),
                raw,
            };
            tokio::spawn(reader.run(reads / tasks))
        })
        .collect();
    for t in readers {
        t.await??;
    }
    let elapsed = started.elapsed();
    let allocated = allocations() - before;
    let st = cache.stats();
    println!(
        "{mode}: {:.0} reads/s, {:.1} allocations per read; {} batched reads in {} batches",
        reads as f64 / elapsed.as_secs_f64(),
        allocated as f64 / reads as f64,
        st.l2_batched_reads,
        st.l2_batches
    );
    Ok(())
}

/// The raw client of the backend, with the key's name in the store.
enum Raw {
    Redis(redis::aio::MultiplexedConnection, String),
    Memcached(async_memcached::Client, String),
}

/// One task's reads of its key through one contender.
struct Reader<S> {
    mode: String,
    cache: FlagCache<String>,
    store: S,
    key: FlagKey,
    raw: Raw,
}

impl<S: FlagStore> Reader<S> {
    async fn run(mut self, reads: usize) -> Res<()> {
        for _ in 0..reads {
            let hit = match self.mode.as_str() {
                "raw" => match &mut self.raw {
                    Raw::Redis(conn, name) => {
                        let v: Option<Vec<u8>> = redis::AsyncCommands::get(conn, &*name).await?;
                        v.is_some()
                    }
                    Raw::Memcached(client, name) => {
                        use async_memcached::AsciiProtocol;
                        client.get(&*name).await?.is_some()
                    }
                },
                "store" => self.store.get(&self.key).await?.is_some(),
                _ => self.cache.get(&self.key).await?.is_some(),
            };
            if !hit {
                return Err("a read missed".into());
            }
        }
        Ok(())
    }
}
