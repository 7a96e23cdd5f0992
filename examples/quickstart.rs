//! flagcache on the embedded memory backend — no server needed.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! A simulated control plane (the source of truth, a few ms per call), a shared store,
//! and three things every fleet needs: a cold burst that costs the control plane one
//! call, a slow replica's stale write refused, and an invalidation reaching every
//! replica.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    FlagKey, FlagStore, FlagStoreExt, Invalidation, Invalidator, LocalCoalescer, PutOutcome,
    Result, Signal, Version,
};

/// A flag's configuration, as the control plane serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct FlagConfig {
    enabled: bool,
    rollout_percent: u8,
    variants: BTreeMap<String, u32>,
}

/// The source of truth: slow, and counted, so we can see what each step costs it.
struct ControlPlane {
    calls: AtomicUsize,
}

impl ControlPlane {
    async fn load(&self, _key: &FlagKey) -> Result<(FlagConfig, Version)> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let variants = BTreeMap::from([("control".to_string(), 50), ("treatment".to_string(), 50)]);
        let config = FlagConfig {
            enabled: true,
            rollout_percent: 25,
            variants,
        };
        Ok((config, Version::new(7)))
    }
}

const TTL: Duration = Duration::from_secs(300);

/// One read: the store first, then — coalesced per key — the control plane, whose
/// answer is written back under the version guard.
async fn read(
    store: &MemoryStore,
    plane: &Arc<ControlPlane>,
    coalescer: &LocalCoalescer<Arc<FlagConfig>>,
    key: &FlagKey,
) -> Result<Arc<FlagConfig>> {
    if let Some((config, _)) = store.get_value::<FlagConfig>(key).await? {
        return Ok(Arc::new(config));
    }
    let (store, plane, k) = (store.clone(), plane.clone(), key.clone());
    coalescer
        .run(key, move || async move {
            let (config, version) = plane.load(&k).await?;
            store.put_value(&k, &config, version, TTL).await?;
            Ok(Arc::new(config))
        })
        .await
}

#[tokio::main]
async fn main() -> Result<()> {
    let store = MemoryStore::new();
    let plane = Arc::new(ControlPlane {
        calls: AtomicUsize::new(0),
    });
    let coalescer = LocalCoalescer::new();
    let key = FlagKey::new("checkout.new-flow")?;

    // 1. A cold burst: 500 concurrent reads of a flag nobody has cached yet.
    let started = Instant::now();
    let reads = (0..500).map(|_| read(&store, &plane, &coalescer, &key));
    let results = futures_util::future::try_join_all(reads).await?;
    assert!(results.iter().all(|c| c.enabled));
    println!(
        "500 concurrent cold reads of {key}: {} control-plane call(s), {:?}",
        plane.calls.load(Ordering::SeqCst),
        started.elapsed()
    );

    // 2. A slow replica tries to write the version it loaded long ago.
    let old = FlagConfig {
        enabled: false,
        rollout_percent: 0,
        variants: BTreeMap::new(),
    };
    match store.put_value(&key, &old, Version::new(3), TTL).await? {
        PutOutcome::Superseded { current } => {
            println!("stale write of v3 refused: the store keeps {current}")
        }
        PutOutcome::Stored => println!("BUG: a stale write replaced a newer version"),
    }

    // 3. A kill switch: replica A publishes, replicas B and C both hear it.
    let a = MemoryInvalidator::new();
    let (b, c) = (a.peer(), a.peer());
    let (mut sub_b, mut sub_c) = (b.subscribe().await?, c.subscribe().await?);
    let killed = FlagConfig {
        enabled: false,
        ..results[0].as_ref().clone()
    };
    store.put_value(&key, &killed, Version::new(8), TTL).await?;
    a.publish(&Invalidation::key(key.clone()).with_version(Version::new(8)))
        .await?;
    for (name, sub) in [("B", &mut sub_b), ("C", &mut sub_c)] {
        if let Some(Signal::Invalidated(ev)) = sub.recv().await {
            println!(
                "replica {name} got invalidation #{} of {:?} at {:?} from node {}",
                ev.seq, ev.target, ev.version, ev.origin
            );
        }
    }
    let now: Option<(FlagConfig, Version)> = store.get_value(&key).await?;
    println!("{key} is now {now:?}");
    println!(
        "store holds {} entr(ies) via backend {:?}",
        store.len(),
        store.name()
    );
    Ok(())
}
