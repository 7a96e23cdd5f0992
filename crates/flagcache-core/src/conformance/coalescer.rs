//! The [`Coalescer`] properties: one load per burst across processes, answered at the
//! release (not at a backend expiry), and a lease its holder abandons hands the key to
//! exactly one waiter at once.
//!
//! Each property takes one coalescer per simulated process, all over the same backend,
//! and the store they share: a lease holder writes its value there before releasing,
//! as `FlagCache` does. Deadlines are generous (seconds), but shorter than the
//! backends' own expiries (10 s by default), so a release that does not work fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::{entry, fresh_key, TTL};
use crate::{Coalesced, Coalescer, FlagKey, FlagStore, LoadOutcome, PutOutcome, Turn};

/// How long after a release every waiter must have its answer.
const ANSWERED_WITHIN: Duration = Duration::from_secs(3);

/// Takes and releases a lease on a throwaway key with each coalescer, so that
/// connections are open before a property times anything.
async fn warm_up(coalescers: &[Arc<dyn Coalescer>]) {
    for c in coalescers {
        let key = fresh_key("warm_up");
        if let Ok(Turn::Load(lease)) = c.acquire(&key).await {
            lease.release(LoadOutcome::NotStored(None)).await;
        }
    }
}

/// Waits (at most 10 s) until `count` reaches `n`.
async fn until_count(count: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "{what}: callers never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Concurrent misses of one key, one per coalescer (process), cost one load: exactly
/// one caller gets [`Turn::Load`]; it stores its value and releases the lease with
/// [`LoadOutcome::Stored`], and every other caller is answered with that very entry
/// within 3 s of the release.
pub async fn one_load_per_burst(coalescers: &[Arc<dyn Coalescer>], store: Arc<dyn FlagStore>) {
    let n = coalescers.len();
    assert!(n >= 2, "one_load_per_burst: give two coalescers or more");
    warm_up(coalescers).await;
    let key = fresh_key("one_load_per_burst");
    let arrived = Arc::new(AtomicUsize::new(0));
    let loads = Arc::new(AtomicUsize::new(0));
    let released_at = Arc::new(OnceLock::<Instant>::new());
    let callers: Vec<_> = coalescers
        .iter()
        .map(|c| {
            let (c, store, key) = (c.clone(), store.clone(), key.clone());
            let (arrived, loads, released_at) =
                (arrived.clone(), loads.clone(), released_at.clone());
            tokio::spawn(async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                let turn = c.acquire(&key).await.expect("one_load_per_burst: acquire");
                let got = match turn {
                    Turn::Load(lease) => {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // Every other caller is in `acquire` before the load ends.
                        until_count(&arrived, n, "one_load_per_burst").await;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let e = entry(&*store, 1, "the one load");
                        let put = store.put(&key, &e, TTL).await.expect("put");
                        assert_eq!(put, PutOutcome::Stored, "one_load_per_burst: put");
                        lease.release(LoadOutcome::Stored(e.clone())).await;
                        let _ = released_at.set(Instant::now());
                        e
                    }
                    Turn::Answered(Coalesced::Fresh(Some(e))) => e,
                    Turn::Answered(other) => {
                        panic!("one_load_per_burst: a waiter was answered {other:?}")
                    }
                };
                (got, Instant::now())
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut answers = Vec::new();
    for caller in callers {
        let answer = tokio::time::timeout_at(deadline, caller)
            .await
            .expect("one_load_per_burst: a caller was not answered in time")
            .expect("one_load_per_burst: a caller panicked");
        answers.push(answer);
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one_load_per_burst: the burst cost more than one load"
    );
    let released_at = *released_at
        .get()
        .expect("one_load_per_burst: nobody loaded");
    let expected = entry(&*store, 1, "the one load").payload;
    for (got, at) in answers {
        assert_eq!(
            got.payload, expected,
            "one_load_per_burst: a caller got another value than the one load's"
        );
        assert!(
            at.saturating_duration_since(released_at) < ANSWERED_WITHIN,
            "one_load_per_burst: a waiter was answered {:?} after the release",
            at.saturating_duration_since(released_at)
        );
    }
}

/// A lease dropped without a release (its holder crashed or was cancelled) hands the
/// key to exactly one of the callers waiting on it, at once — well before any backend
/// expiry — and the others keep waiting for that one's lease.
pub async fn abandoned_lease_frees_the_key(
    first: Arc<dyn Coalescer>,
    second: Arc<dyn Coalescer>,
    third: Arc<dyn Coalescer>,
) {
    warm_up(&[first.clone(), second.clone(), third.clone()]).await;
    let key = fresh_key("abandoned_lease");
    let lease = match first.acquire(&key).await.expect("abandoned_lease: acquire") {
        Turn::Load(lease) => lease,
        Turn::Answered(a) => panic!("abandoned_lease: the first caller was answered {a:?}"),
    };
    let arrived = Arc::new(AtomicUsize::new(0));
    let wait = |c: Arc<dyn Coalescer>, key: FlagKey| {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            arrived.fetch_add(1, Ordering::SeqCst);
            c.acquire(&key).await
        })
    };
    let mut waiters = vec![wait(second, key.clone()), wait(third, key.clone())];
    until_count(&arrived, 2, "abandoned_lease").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "abandoned_lease: a caller did not wait for the lease"
    );
    drop(lease);
    // Exactly one waiter gets the key…
    let given_up = Instant::now() + ANSWERED_WITHIN;
    let next = loop {
        if let Some(i) = waiters
            .iter()
            .position(tokio::task::JoinHandle::is_finished)
        {
            break waiters.swap_remove(i);
        }
        assert!(
            Instant::now() < given_up,
            "abandoned_lease: the key stayed blocked after its lease was dropped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let second_lease = match next.await.expect("abandoned_lease: a waiter panicked") {
        Ok(Turn::Load(lease)) => lease,
        other => panic!("abandoned_lease: the next waiter should load, got {other:?}"),
    };
    // …while the other waits for that one's lease, and gets the key when it goes too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = waiters.pop().expect("two waiters");
    assert!(
        !last.is_finished(),
        "abandoned_lease: two waiters got the key at once"
    );
    drop(second_lease);
    let turn = tokio::time::timeout(ANSWERED_WITHIN, last)
        .await
        .expect("abandoned_lease: the last waiter stayed blocked")
        .expect("abandoned_lease: the last waiter panicked");
    assert!(
        matches!(turn, Ok(Turn::Load(_))),
        "abandoned_lease: the last waiter should load, got {turn:?}"
    );
}
