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

use flagcache_core::{FlagCache, FlagKey, FlagStore, Version};
use flagcache_redis::RedisStore;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TASKS: usize = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(url), Some(reads)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: l2_profile raw|store|cache <redis url> <reads>".into());
    };
    let reads: usize = reads.parse()?;
    let store = RedisStore::builder()
        .url(&url)
        .namespace("l2-profile")
        .build()
        .await?;
    let loader = |_: FlagKey| async { Ok(Some(("x".repeat(1000), Version::new(1)))) };
    let cache = FlagCache::<String>::builder(store.clone(), loader)
        .l1(false)
        .build()
        .await?;
    let keys: Vec<FlagKey> = (0..TASKS)
        .map(|i| FlagKey::new(format!("p.{i}")))
        .collect::<Result<_, _>>()?;
    for k in &keys {
        cache.set(k, "x".repeat(1000), Version::new(1)).await?;
    }
    let names: Vec<String> = keys.iter().map(|k| store.redis_key(k)).collect();
    let conn = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let reader = Reader {
                mode: mode.clone(),
                cache: cache.clone(),
                store: store.clone(),
                key: keys[task].clone(),
                name: names[task].clone(),
                conn: conn.clone(),
            };
            tokio::spawn(reader.run(reads / TASKS))
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let st = cache.stats();
    println!(
        "{mode}: {:.0} reads/s; {} batched reads in {} batches",
        reads as f64 / started.elapsed().as_secs_f64(),
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
