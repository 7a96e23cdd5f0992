//! flagcache over memcached: two replicas share memcached (L2 + an invalidation log).
//!
//! ```text
//! MEMCACHED_SERVERS=127.0.0.1:11211,127.0.0.1:11212 cargo run --example memcached --features memcached
//! ```
//!
//! `MEMCACHED_SERVERS` is a comma-separated list of `host:port` (or `tcp://host:port`);
//! it defaults to `127.0.0.1:11211`.

use std::time::{Duration, Instant};

use flagcache::memcached::{MemcachedInvalidator, MemcachedRecache, MemcachedStore};
use flagcache::{FlagCache, FlagKey, Result, Version};

/// The entries of a comma-separated list; the store parses each (and refuses a bad
/// one at build, naming it).
fn servers(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

async fn replica(
    store: &MemcachedStore,
    log: &MemcachedInvalidator,
    name: &str,
) -> Result<FlagCache<bool>> {
    let control_plane = |_key: FlagKey| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Some((true, Version::new(1))))
    };
    FlagCache::builder(store.clone(), control_plane)
        .name(name)
        .invalidator(log.peer())
        .coalescer(MemcachedRecache::new(store))
        .build()
        .await
}

/// The whole example, against the memcached servers in `list`.
pub async fn run(list: &str) -> Result<()> {
    let store = MemcachedStore::builder()
        .servers(servers(list))
        .namespace("flagcache-example")
        .build()
        .await?;
    let log = MemcachedInvalidator::builder(&store)
        .poll_interval(Duration::from_millis(50))
        .build();
    let a = replica(&store, &log, "a").await?;
    let b = replica(&store, &log, "b").await?;
    let key = FlagKey::new(format!("new-checkout-{:x}", fastrand::u32(..)))?;

    let first = a.lookup(&key).await?;
    let second = b.lookup(&key).await?;
    println!(
        "replica A read {key}: {:?}; replica B: {:?}",
        first.status, second.status
    );

    let flipped = Instant::now();
    a.set(&key, false, Version::new(2)).await?;
    loop {
        if b.get(&key).await?.is_some_and(|on| !*on) {
            println!(
                "kill switch set on A reached B in {:?} (log polled every 50 ms)",
                flipped.elapsed()
            );
            break;
        }
        if flipped.elapsed() > Duration::from_secs(5) {
            println!("B did not see the kill switch within 5 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!("CAS retries so far: {}", store.cas_retries());
    Ok(())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<()> {
    let list = std::env::var("MEMCACHED_SERVERS").unwrap_or_else(|_| "127.0.0.1:11211".into());
    run(&list).await
}
