//! The L2-hit scenario, whatever the backend: `FlagCache` with L1 off over a store,
//! against the backend's raw client reading the same stored bytes, and the store alone
//! between them (which splits `FlagCache`'s overhead between the adapter and the cache).
//!
//! Measured at 1 task (p50: latency) and at 50 tasks, each on its own key (ops/s:
//! throughput). The figures are ratios to the raw client's: `FlagCache`'s p50 at 1
//! task over the raw client's, its ops/s at 50 tasks over the raw client's. The loader
//! is never called: every read is an L2 hit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flagcache_core::{FlagCache, FlagKey, Version};

use super::rounds::{keyed_op, measure, Contenders, Op};
use super::{err, fresh_key, key, payload, Check, Plan, Res, Section};
use crate::source::Source;

/// Tasks in the throughput comparison; each reads its own key, so that `FlagCache`'s
/// coalescing of concurrent reads of one key does not flatter it.
const TASKS: usize = 50;

/// The size of every value read, in bytes.
const VALUE_LEN: usize = 1000;

/// One key per task, each holding a 1 KiB value in L2.
async fn l2_keys(cache: &FlagCache<String>, prefix: &str) -> Res<Vec<FlagKey>> {
    let run = fresh_key(prefix)?;
    let mut keys = Vec::new();
    for i in 0..TASKS {
        let k = key(&format!("{run}.{i}"))?;
        cache
            .set(&k, payload(VALUE_LEN), Version::new(1))
            .await
            .map_err(err)?;
        keys.push(k);
    }
    Ok(keys)
}

/// A raw client's answer, which must be a whole stored value; `what` names the read
/// in the error.
pub(super) fn raw_hit(value: Option<Vec<u8>>, what: &str) -> Res<()> {
    match value {
        Some(b) if b.len() >= VALUE_LEN => Ok(()),
        _ => Err(format!("{what} missed")),
    }
}

/// A store read of the task's key that must hit.
fn store_op<S: flagcache_core::FlagStore + Clone + 'static>(store: &S, keys: &[FlagKey]) -> Op {
    keyed_op(store.clone(), keys.to_vec(), |store, key| async move {
        match store.get(&key).await.map_err(err)? {
            Some(_) => Ok(()),
            None => Err(format!("{key}: not in the store")),
        }
    })
}

/// A `FlagCache` read of the task's key that must hit.
fn cache_op(cache: &FlagCache<String>, keys: &[FlagKey]) -> Op {
    keyed_op(cache.clone(), keys.to_vec(), |cache, key| async move {
        match cache.get(&key).await.map_err(err)? {
            Some(_) => Ok(()),
            None => Err(format!("{key}: no value")),
        }
    })
}

/// Builds the raw client's operation from each key's name in the store.
type MakeOp = Box<dyn FnOnce(Vec<String>) -> Op + Send>;

/// What an L2-hit scenario compares, and the source whose calls must stay at zero.
pub(super) struct L2Setup {
    contenders: Contenders,
    source: Arc<Source>,
}

/// Builds an [`L2Setup`] on the runtime it is awaited on (clients spawn their
/// connection drivers there).
pub(super) type MakeSetup =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Res<L2Setup>> + Send>> + Send + Sync>;

/// `FlagCache` with L1 off over `store`, beside the raw client (`raw`, given each
/// key's name in the store) and the store alone, on 50 fresh keys of 1 KiB.
pub(super) async fn l2_setup<S>(
    scenario: &str,
    store: S,
    name_of: impl Fn(&S, &FlagKey) -> String,
    raw: (&str, MakeOp),
) -> Res<L2Setup>
where
    S: flagcache_core::FlagStore + Clone + 'static,
{
    let source = Source::new(Duration::from_millis(5));
    let cache = FlagCache::<String>::builder(store.clone(), source.loader())
        .name(format!("bench {scenario}"))
        .l1(false)
        .build()
        .await
        .map_err(err)?;
    let keys = l2_keys(&cache, "l2").await?;
    let names = keys.iter().map(|k| name_of(&store, k)).collect();
    let (raw_name, make_raw) = raw;
    Ok(L2Setup {
        contenders: [
            (raw_name.to_string(), make_raw(names)),
            ("FlagCache (L1 off)".to_string(), cache_op(&cache, &keys)),
            (
                format!("the store alone ({})", store.name()),
                store_op(&store, &keys),
            ),
        ],
        source,
    })
}

/// An L2-hit scenario: 1 task (latency), then 50 tasks (throughput).
///
/// The 1-task rounds run on a one-thread runtime of their own, built for them with
/// their own clients: there, the reading task and the client's connection driver
/// always share the thread. On the multi-threaded runtime, whether they happen to
/// land on the same worker moves p50 by a factor of 3 either way — for the raw
/// client and ours alike — so a ratio measured there measures the scheduler, not
/// the code.
pub(super) async fn l2_hit(scenario: &str, plan: Plan, make: MakeSetup) -> Res<Section> {
    let mut section = Section::default();
    let (one, one_calls) = {
        let (make, scenario) = (make.clone(), scenario.to_string());
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(err)?;
            rt.block_on(async {
                let setup = make().await?;
                let figures = measure(
                    &scenario,
                    &setup.contenders,
                    1,
                    plan.n(20, 2),
                    plan.n(300, 25),
                )
                .await?;
                Ok::<_, String>((figures, setup.source.calls()))
            })
        })
        .await
        .map_err(err)??
    };
    let setup = make().await?;
    let many = measure(
        scenario,
        &setup.contenders,
        TASKS,
        plan.n(10, 1),
        plan.n(60, 5),
    )
    .await?;
    let ((rows1, fig1), (rows50, fig50)) = (one, many);
    section.rows.extend(rows1);
    section.rows.extend(rows50);
    section.checks.push(Check::at_most(
        &format!("{scenario}: p50 at 1 task ÷ raw client's"),
        fig1[1].1 / fig1[0].1.max(1e-9),
        1.10,
        "×",
    ));
    section.checks.push(Check::at_least(
        &format!("{scenario}: ops/s at 50 tasks ÷ raw client's"),
        fig50[1].0 / fig50[0].0.max(1e-9),
        0.90,
        "×",
    ));
    section.checks.push(
        Check::at_most(
            &format!("{scenario}: loader calls"),
            (one_calls + setup.source.calls()) as f64,
            0.0,
            "calls",
        )
        .correctness(),
    );
    Ok(section)
}
