//! The cost of a coalesced miss: N concurrent callers of one key share one fetch
//! through `LocalCoalescer`, beside the same fetch awaited directly.
//!
//! ```text
//! cargo bench --bench coalescer
//! ```
//!
//! The fetch yields once to the runtime (as a real load would) and returns a shared
//! value. Each iteration is one whole burst: every caller has its answer.

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use flagcache::{coalesce::LocalCoalescer, FlagKey, Result};
use futures_util::future::join_all;

async fn fetch(value: Arc<String>) -> Result<Arc<String>> {
    tokio::task::yield_now().await;
    Ok(value)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let key = FlagKey::new("checkout.new-flow").expect("valid key");
    let value = Arc::new("x".repeat(100));
    let coalescer = LocalCoalescer::<Arc<String>>::new();

    let mut group = c.benchmark_group("coalescer");
    group.bench_function("direct_fetch", |b| {
        b.iter(|| black_box(rt.block_on(fetch(value.clone())).expect("fetched")))
    });
    for waiters in [1usize, 10, 100] {
        let burst = || {
            rt.block_on(join_all((0..waiters).map(|_| {
                let v = value.clone();
                coalescer.run(&key, move || fetch(v))
            })))
        };
        // What is measured is coalescing: one burst, one fetch.
        let before = coalescer.fetches();
        assert!(burst().iter().all(Result::is_ok));
        assert_eq!(
            coalescer.fetches() - before,
            1,
            "{waiters} callers, one fetch"
        );
        group.bench_function(BenchmarkId::new("coalesced_miss", waiters), |b| {
            b.iter(|| black_box(burst()))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
