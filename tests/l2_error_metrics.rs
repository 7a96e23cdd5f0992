//! L2 errors reach the `metrics` facade by kind: `flagcache_l2_errors_total{kind=…}`.
//! Its own test binary, because a `metrics` recorder is process-global.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flagcache::layer::FaultyStore;
use flagcache::{FlagCache, Version};
use flagcache_testkit::CountingSource;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_l2_error_is_a_labelled_counter() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().unwrap();

    let store = Misconfigured::default();
    let (faulty, faults) = FaultyStore::new(store.clone());
    let cache = FlagCache::<Config>::builder(faulty, CountingSource::new(1))
        .name("kinds")
        .l2_timeout(Duration::from_millis(20))
        .circuit_breaker(1_000, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    store.mode.store(NOAUTH, Ordering::SeqCst);
    cache.get(&key("permanent")).await.unwrap(); // read + write-back
    store.mode.store(TOO_LARGE, Ordering::SeqCst);
    let _ = cache.set(&key("big"), "x".into(), Version::new(1)).await;
    store.mode.store(WORKING, Ordering::SeqCst);
    faults.fail_all(true);
    cache.get(&key("transient")).await.unwrap(); // read + write-back
    faults.fail_all(false);
    faults.set_latency(Duration::from_secs(5));
    cache.get(&key("timeout")).await.unwrap(); // read + write-back

    let mut kinds: HashMap<String, u64> = HashMap::new();
    for (key, _, _, value) in snap.snapshot().into_vec() {
        let k = key.key();
        let ours = k
            .labels()
            .any(|l| l.key() == "cache" && l.value() == "kinds");
        if k.name() != "flagcache_l2_errors_total" || !ours {
            continue;
        }
        if let (Some(kind), DebugValue::Counter(n)) =
            (k.labels().find(|l| l.key() == "kind"), value)
        {
            kinds.insert(kind.value().to_string(), n);
        }
    }
    for (kind, n) in [
        ("permanent", 2),
        ("refused", 1),
        ("transient", 2),
        ("timeout", 2),
    ] {
        assert_eq!(kinds.get(kind).copied(), Some(n), "{kind}: {kinds:?}");
    }
    let st = cache.stats();
    assert_eq!(
        (
            st.l2_permanent_errors,
            st.l2_refused,
            st.l2_transient_errors,
            st.l2_timeouts,
            st.l2_errors
        ),
        (2, 1, 2, 2, 7),
        "{st:?}"
    );
}
