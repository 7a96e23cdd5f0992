//! flagcache on the embedded memory backend — no server needed.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Two replicas of a service share one store (L2) and one invalidation bus, and load
//! flag configs from a simulated control plane (a few ms per call). The story:
//!
//! 1. a cold burst of 500 concurrent reads costs the control plane one call;
//! 2. a slow replica's stale write is refused by the version guard;
//! 3. a kill switch flipped on replica A is served by replica B within milliseconds;
//! 4. the control plane goes down, and reads keep being served (fail-safe);
//! 5. the counters of both replicas.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    store::FlagStoreExt, CacheStatus, Error, FlagCache, FlagKey, PutOutcome, Result, Version,
};

/// A flag's configuration, as the control plane serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct FlagConfig {
    enabled: bool,
    rollout_percent: u8,
    variants: BTreeMap<String, u32>,
}

/// The source of truth: slow, counted, and able to go down.
#[derive(Default)]
struct ControlPlane {
    calls: AtomicUsize,
    version: AtomicU64,
    down: AtomicBool,
}

impl ControlPlane {
    async fn load(&self, key: FlagKey) -> Result<Option<(FlagConfig, Version)>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::loader(
                &key,
                std::io::Error::other("control plane unreachable"),
            ));
        }
        let variants = BTreeMap::from([("control".into(), 50), ("treatment".into(), 50)]);
        let config = FlagConfig {
            enabled: true,
            rollout_percent: 25,
            variants,
        };
        Ok(Some((
            config,
            Version::new(self.version.load(Ordering::SeqCst)),
        )))
    }
}

async fn replica(
    name: &str,
    store: &MemoryStore,
    bus: &MemoryInvalidator,
    plane: &Arc<ControlPlane>,
) -> Result<FlagCache<FlagConfig>> {
    let plane = plane.clone();
    FlagCache::builder(store.clone(), move |key| {
        let plane = plane.clone();
        async move { plane.load(key).await }
    })
    .name(name)
    .invalidator(bus.peer())
    // Short freshness so that step 4 shows the fail-safe; the defaults suit production.
    .fresh_for(Duration::from_millis(100))
    .stale_for(Duration::ZERO)
    .l2_ttl(Duration::from_millis(100))
    .build()
    .await
}

#[tokio::main]
async fn main() -> Result<()> {
    let store = MemoryStore::new();
    let bus = MemoryInvalidator::new();
    let plane = Arc::new(ControlPlane::default());
    plane.version.store(7, Ordering::SeqCst);
    let a = replica("replica-a", &store, &bus, &plane).await?;
    let b = replica("replica-b", &store, &bus, &plane).await?;
    let key = FlagKey::new("checkout.new-flow")?;

    // 1. A cold burst: 500 concurrent reads of a flag nobody has cached yet.
    let started = Instant::now();
    let reads = (0..500).map(|_| a.get(&key));
    let results = futures_util::future::try_join_all(reads).await?;
    assert!(results
        .iter()
        .all(|c| c.as_ref().is_some_and(|c| c.enabled)));
    println!(
        "1. 500 concurrent cold reads of {key}: {} control-plane call(s), {:?}",
        plane.calls.load(Ordering::SeqCst),
        started.elapsed()
    );
    let b_read = b.lookup(&key).await?;
    println!(
        "   replica B's first read: {:?} (from the shared store)",
        b_read.status
    );

    // 2. A slow replica tries to write the version it loaded long ago.
    let old = FlagConfig {
        enabled: false,
        rollout_percent: 0,
        variants: BTreeMap::new(),
    };
    match store
        .put_value(&key, &old, Version::new(3), Duration::from_secs(60))
        .await?
    {
        PutOutcome::Superseded { current } => {
            println!("2. stale write of v3 refused: the store keeps {current}")
        }
        PutOutcome::Stored => println!("2. BUG: a stale write replaced a newer version"),
        // Only a fill's write (`put_fill`) is fenced by an invalidation.
        PutOutcome::Fenced => println!("2. BUG: a versioned write was fenced"),
    }

    // 3. Kill switch: replica A turns the flag off; how soon does B serve it?
    let current = results[0].as_deref().cloned().unwrap_or(old);
    let killed = FlagConfig {
        enabled: false,
        ..current
    };
    let flipped = Instant::now();
    a.set(&key, killed, Version::new(8)).await?;
    let mut polls = 0;
    let lag = loop {
        polls += 1;
        let seen = b.get(&key).await?;
        if seen.is_some_and(|c| !c.enabled) {
            break flipped.elapsed();
        }
        if flipped.elapsed() > Duration::from_secs(1) {
            println!("3. BUG: replica B still serves the old config after 1 s");
            break flipped.elapsed();
        }
        tokio::task::yield_now().await;
    };
    println!("3. kill switch set on A at v8; replica B served it after {lag:?} ({polls} read(s))");

    // 4. The control plane goes down (and the shared entry expires): reads keep working.
    plane.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = b.lookup(&key).await?;
    let served = during.value.as_ref().map(|c| c.enabled);
    println!(
        "4. control plane down: replica B still answers enabled={served:?} at {:?}, status {:?}",
        during.version, during.status
    );
    assert_eq!(
        during.status,
        CacheStatus::Stale(flagcache::StaleReason::FailSafe)
    );
    plane.down.store(false, Ordering::SeqCst);

    // 5. What it cost.
    for (name, cache) in [("A", &a), ("B", &b)] {
        let s = cache.stats();
        println!(
            "5. replica {name}: {} L1 hits, {} L2 hits, {} reads answered by the loader \
             through {} load(s), {} coalesced waits, {} invalidations applied, \
             {} fail-safe answers, hit rate {:.1} %",
            s.hits_l1,
            s.hits_l2,
            s.misses,
            s.loads,
            s.coalesced_waits,
            s.invalidations,
            s.stale_fail_safe,
            s.hit_rate() * 100.0
        );
    }
    Ok(())
}
