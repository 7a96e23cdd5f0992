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
        return Err("usage: l2_profile raw|store|cache <redis url> <reads>".into());
    };
    let reads: usize = reads.parse()?;
    let tasks = setting("TASKS", 50);
    let store = RedisStore::builder()
        .url(&url)
        .namespace("l2-profile")
        .build()
        .await?;
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
    let names: Vec<String> = keys.iter().map(|k| store.redis_key(k)).collect();
    let conn = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let before = allocations();
    let started = std::time::Instant::now();
    let readers: Vec<_> = (0..tasks)
        .map(|task| {
            let reader = Reader {
                mode: mode.clone(),
                cache: cache.clone(),
                store: store.clone(),
                key: keys[task].clone(),
                name: names[task].clone(),
                conn: conn.clone(),
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

/// One task's reads of its key through one contender.
struct Reader {
    mode: String,
    cache: FlagCache<String>,
    store: RedisStore,
    key: FlagKey,
    name: String,
    conn: redis::aio::MultiplexedConnection,
}

impl Reader {
    async fn run(mut self, reads: usize) -> Res<()> {
        for _ in 0..reads {
            let hit = match self.mode.as_str() {
                "raw" => {
                    let v: Option<Vec<u8>> =
                        redis::AsyncCommands::get(&mut self.conn, &self.name).await?;
                    v.is_some()
                }
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
