//! One service, any backend: the backend is a cargo feature and an environment
//! variable, never a code change.
//!
//! ```text
//! cargo run --example swap_backends                                  # memory://
//! FLAGCACHE_URL=redis://127.0.0.1:6379 cargo run --example swap_backends --features redis
//! FLAGCACHE_URL=memcached://127.0.0.1:11211 cargo run --example swap_backends --features memcached
//! FLAGCACHE_URL='redis+cluster://h1:7000,h2:7001?namespace=checkout' cargo run --example swap_backends --features redis
//! ```

use flagcache::{Backend, FlagCache, FlagKey, Result, Version};

/// A flag's configuration, as the control plane serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Checkout {
    /// Whether the new checkout is on.
    pub enabled: bool,
    /// The share of users who get it.
    pub rollout_percent: u8,
}

/// The service: connects to `FLAGCACHE_URL` (`memory://` when unset), reads a flag,
/// flips it, and reads it again. Returns the backend's name and the flag's last value.
pub async fn run() -> Result<(&'static str, Checkout)> {
    let backend = Backend::from_env_or("memory://").await?;
    let control_plane = |_key: FlagKey| async move {
        let checkout = Checkout {
            enabled: true,
            rollout_percent: 25,
        };
        Ok(Some((checkout, Version::new(1))))
    };
    let cache: FlagCache<Checkout> = backend.cache_builder(control_plane).build().await?;

    let key = FlagKey::new(format!("checkout-{:x}", fastrand::u32(..)))?;
    let first = cache.lookup(&key).await?;
    println!(
        "{}: {key} = {:?} ({:?})",
        backend.url(),
        first.value,
        first.status
    );
    let kill = Checkout {
        enabled: false,
        rollout_percent: 0,
    };
    cache.set(&key, kill, Version::new(2)).await?;
    let now = cache.get(&key).await?;
    println!("{}: after the kill switch, {key} = {now:?}", backend.url());
    let last = now
        .map(|c| (*c).clone())
        .ok_or(flagcache::Error::Closed("flag"))?;
    cache.invalidate(&key).await?;
    Ok((backend.name(), last))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<()> {
    run().await.map(|_| ())
}
