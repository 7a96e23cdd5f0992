//! A fleet to operate: replicas that read a flag on `FLAGCACHE_URL` and report their
//! presence, for trying the `flagcache` command (`inspect`, `watch`, `verify`,
//! `doctor`) against something live.
//!
//! ```text
//! FLAGCACHE_URL=redis://127.0.0.1:6379 cargo run --example fleet --features redis
//! flagcache inspect checkout                       # in another terminal
//! flagcache set checkout --version 2 --value '{"enabled":false}'
//! flagcache verify checkout --version 2 --within 2s
//! ```
//!
//! `FLEET_REPLICAS` (default 8) replicas run for `FLEET_SECONDS` (default 60), each
//! reading `checkout` every 50 ms. With `FLEET_STRAGGLER=1` the last replica has no
//! invalidation subscription: it keeps serving what it has until its TTL, and
//! `flagcache verify` names it.

use std::time::Duration;

use flagcache::{Backend, FlagCache, FlagKey, Result, Version};

/// The flag's configuration, as the control plane serves it (and `flagcache set`
/// writes it: `--value '{"enabled":false}'`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Checkout {
    enabled: bool,
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<()> {
    let backend = Backend::from_env_or("memory://").await?;
    let replicas = setting("FLEET_REPLICAS", 8).max(1);
    let seconds = setting("FLEET_SECONDS", 60);
    let straggler = setting("FLEET_STRAGGLER", 0) == 1;
    // The control plane: version 1 of every flag until someone writes a newer one.
    let control_plane =
        |_key: FlagKey| async { Ok(Some((Checkout { enabled: true }, Version::new(1)))) };
    let key = FlagKey::new("checkout")?;
    let mut fleet = Vec::new();
    for i in 0..replicas {
        let builder = if straggler && i + 1 == replicas {
            FlagCache::builder(backend.store(), control_plane)
        } else {
            backend.cache_builder(control_plane)
        };
        let cache: FlagCache<Checkout> = builder
            .name(format!("replica-{i}"))
            .fresh_for(Duration::from_secs(300))
            .report_to_fleet(backend.fleet())
            .build()
            .await?;
        fleet.push(cache);
    }
    println!(
        "{replicas} replicas on {} for {seconds} s{}",
        backend.url(),
        if straggler {
            " (the last one unsubscribed)"
        } else {
            ""
        }
    );
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while tokio::time::Instant::now() < until {
        tick.tick().await;
        for cache in &fleet {
            // A read error is what the cache reports; the fleet goes on.
            if let Err(e) = cache.get(&key).await {
                eprintln!("{}: {e}", cache.node_id());
            }
        }
    }
    Ok(())
}
