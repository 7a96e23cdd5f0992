//! flagcache over Redis: two replicas share a Redis (L2 + pub/sub invalidation).
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example redis --features redis
//! ```
//!
//! `REDIS_URL` defaults to `redis://127.0.0.1:6379`; `rediss://` (TLS) and
//! `redis://user:password@host:port/db` work too.

use std::time::{Duration, Instant};

use flagcache::redis::{RedisInvalidator, RedisLock, RedisStore};
use flagcache::{FlagCache, FlagKey, Result, Version};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Checkout {
    enabled: bool,
    rollout_percent: u8,
}

async fn replica(url: &str, name: &str) -> Result<FlagCache<Checkout>> {
    let store = RedisStore::builder()
        .url(url)
        .namespace("flagcache-example")
        .build()
        .await?;
    let invalidator = RedisInvalidator::builder()
        .url(url)
        .channel("flagcache-example")
        .build()
        .await?;
    let control_plane = |_key: FlagKey| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Some((
            Checkout {
                enabled: true,
                rollout_percent: 25,
            },
            Version::new(1),
        )))
    };
    FlagCache::builder(store.clone(), control_plane)
        .name(name)
        .invalidator(invalidator)
        .coalescer(RedisLock::new(&store))
        .build()
        .await
}

/// The whole example, against the Redis at `url`.
pub async fn run(url: &str) -> Result<()> {
    let a = replica(url, "a").await?;
    let b = replica(url, "b").await?;
    let key = FlagKey::new(format!("checkout-{:x}", fastrand::u32(..)))?;

    let first = a.lookup(&key).await?;
    let second = b.lookup(&key).await?;
    println!(
        "replica A read {key}: {:?}; replica B: {:?}",
        first.status, second.status
    );

    let flipped = Instant::now();
    a.set(
        &key,
        Checkout {
            enabled: false,
            rollout_percent: 0,
        },
        Version::new(2),
    )
    .await?;
    loop {
        if b.get(&key).await?.is_some_and(|c| !c.enabled) {
            println!("kill switch set on A reached B in {:?}", flipped.elapsed());
            break;
        }
        if flipped.elapsed() > Duration::from_secs(5) {
            println!("B did not see the kill switch within 5 s");
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    a.invalidate(&key).await?;
    println!("stats A: {:?}", a.stats());
    Ok(())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    run(&url).await
}
