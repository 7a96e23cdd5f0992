//! The [`Coalescer`] properties: one load per burst across processes, and a lease its
//! holder abandons never blocks the key.
//!
//! Each property takes one coalescer per simulated process, all over the same backend,
//! and the store they share: a lease holder writes its value there before releasing,
//! as `FlagCache` does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{entry, fresh_key, TTL};
use crate::{Coalesced, Coalescer, FlagStore, LoadOutcome, PutOutcome, Turn};

/// How long a property waits for an answer before it fails.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Concurrent misses of one key, one per coalescer (process), cost one load: exactly
/// one caller gets [`Turn::Load`]; it stores its value and releases the lease with
/// [`LoadOutcome::Stored`], and every other caller is answered with that very entry.
pub async fn one_load_per_burst(coalescers: &[Arc<dyn Coalescer>], store: Arc<dyn FlagStore>) {
    assert!(
        coalescers.len() >= 2,
        "one_load_per_burst: give two coalescers or more"
    );
    let key = fresh_key("one_load_per_burst");
    let loads = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = coalescers
        .iter()
        .map(|c| {
            let (c, store, key, loads) = (c.clone(), store.clone(), key.clone(), loads.clone());
            tokio::spawn(async move {
                match c.acquire(&key).await.expect("one_load_per_burst: acquire") {
                    Turn::Load(lease) => {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // Long enough for every other caller to arrive and wait.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let e = entry(&*store, 1, "the one load");
                        let put = store.put(&key, &e, TTL).await.expect("put");
                        assert_eq!(put, PutOutcome::Stored, "one_load_per_burst: put");
                        lease.release(LoadOutcome::Stored(e.clone())).await;
                        e
                    }
                    Turn::Answered(Coalesced::Fresh(Some(e))) => e,
                    Turn::Answered(other) => {
                        panic!("one_load_per_burst: a waiter was answered {other:?}")
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        let got = tokio::time::timeout(ANSWER_WITHIN, caller)
            .await
            .expect("one_load_per_burst: a caller was not answered in time")
            .expect("one_load_per_burst: a caller panicked");
        assert_eq!(
            got.payload,
            entry(&*store, 1, "the one load").payload,
            "one_load_per_burst: a caller got another value than the one load's"
        );
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one_load_per_burst: the burst cost more than one load"
    );
}

/// A lease dropped without a release (its holder crashed or was cancelled) frees the
/// key well before any backend expiry: a caller waiting on it gets the lease next.
pub async fn abandoned_lease_frees_the_key(first: Arc<dyn Coalescer>, second: Arc<dyn Coalescer>) {
    let key = fresh_key("abandoned_lease");
    let lease = match first.acquire(&key).await.expect("abandoned_lease: acquire") {
        Turn::Load(lease) => lease,
        Turn::Answered(a) => panic!("abandoned_lease: the first caller was answered {a:?}"),
    };
    let waiter = {
        let key = key.clone();
        tokio::spawn(async move { second.acquire(&key).await })
    };
    // The waiter is waiting on the lease (it cannot have been answered: nothing is stored).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "abandoned_lease: the waiter did not wait for the lease"
    );
    drop(lease);
    let turn = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("abandoned_lease: the key stayed blocked after its lease was dropped")
        .expect("abandoned_lease: the waiter panicked")
        .expect("abandoned_lease: acquire");
    assert!(
        matches!(turn, Turn::Load(_)),
        "abandoned_lease: the waiter should load next, got {turn:?}"
    );
}
