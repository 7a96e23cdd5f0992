//! Tests of [`LocalCoalescer`](super::LocalCoalescer): one fetch per burst, cancellation,
//! errors and panics shared and not remembered, `forget`.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::sync::Notify;

fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

/// Polls `cond` until it holds, for at most 10 s.
async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached in 10 s");
}

/// A fetch that counts its calls and finishes only when released.
fn gated(
    calls: &Arc<AtomicUsize>,
    gate: &Arc<Notify>,
    result: Result<u32>,
) -> impl Future<Output = Result<u32>> + Send + 'static {
    calls.fetch_add(1, Ordering::SeqCst);
    let gate = gate.clone();
    async move {
        gate.notified().await;
        result
    }
}

/// The future of a caller of `k` whose fetch is [`gated`].
fn gated_caller(
    c: &LocalCoalescer<u32>,
    calls: &Arc<AtomicUsize>,
    gate: &Arc<Notify>,
    k: &FlagKey,
    result: Result<u32>,
) -> impl Future<Output = Result<u32>> + Send + 'static {
    let (c, calls, gate, k) = (c.clone(), calls.clone(), gate.clone(), k.clone());
    async move { c.run(&k, || gated(&calls, &gate, result)).await }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_callers_one_fetch() {
    let c = LocalCoalescer::<u32>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let k = key("cold");
    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(gated_caller(&c, &calls, &gate, &k, Ok(7))))
        .collect();
    // Every caller has joined the one fetch before it is allowed to finish.
    until(|| c.coalesced_waits() == 999).await;
    assert_eq!(c.in_flight(), 1);
    gate.notify_one();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 7);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(c.fetches(), 1);
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_do_not_share() {
    let c = LocalCoalescer::<String>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let reads = (0..10).map(|i| {
        let calls = calls.clone();
        let k = key(&format!("k{i}"));
        let c = c.clone();
        async move {
            c.run(&k, move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(format!("v{i}"))
            })
            .await
        }
    });
    let got = futures_util::future::try_join_all(reads).await.unwrap();
    assert_eq!(got, (0..10).map(|i| format!("v{i}")).collect::<Vec<_>>());
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_caller_drives_the_fetch_in_its_own_task() {
    let c = LocalCoalescer::<Option<tokio::task::Id>>::new();
    let caller = tokio::spawn(async move {
        let fetched_in = c
            .run(&key("k"), || async { Ok(tokio::task::try_id()) })
            .await
            .unwrap();
        (tokio::task::id(), fetched_in)
    });
    let (caller, fetched_in) = caller.await.unwrap();
    assert_eq!(fetched_in, Some(caller), "no task hop on a miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_first_caller_does_not_cancel_the_fetch() {
    let c = LocalCoalescer::<u32>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let k = key("k");
    let first = tokio::spawn(gated_caller(&c, &calls, &gate, &k, Ok(42)));
    until(|| c.in_flight() == 1).await;
    let second = {
        let (c, k) = (c.clone(), k.clone());
        tokio::spawn(async move {
            c.run(&k, || async { unreachable!("a second fetch must not run") })
                .await
        })
    };
    until(|| c.coalesced_waits() == 1).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    gate.notify_one();
    assert_eq!(second.await.unwrap().unwrap(), 42);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_every_waiter_and_are_not_remembered() {
    let c = LocalCoalescer::<u32>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let k = key("k");
    let failing = Err(Error::Timeout {
        backend: "loader",
        operation: "load",
        after: Duration::from_millis(1),
    });
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (c, calls, gate, k) = (c.clone(), calls.clone(), gate.clone(), k.clone());
            let failing = failing.clone();
            tokio::spawn(async move { c.run(&k, || gated(&calls, &gate, failing)).await })
        })
        .collect();
    until(|| c.coalesced_waits() == 49).await;
    gate.notify_one();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Err(Error::Timeout { .. })));
    }
    assert_eq!(c.in_flight(), 0);
    // Not remembered: the next call fetches again, and succeeds.
    let v = c
        .run(&k, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok(5) }
        })
        .await
        .unwrap();
    assert_eq!(v, 5);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_fetch_is_an_error_for_all_and_the_coalescer_lives_on() {
    let c = LocalCoalescer::<u32>::new();
    let k = key("k");
    let gate = Arc::new(Notify::new());
    let leader = {
        let (c, k, gate) = (c.clone(), k.clone(), gate.clone());
        tokio::spawn(async move {
            c.run(&k, move || async move {
                gate.notified().await;
                panic!("loader bug");
            })
            .await
        })
    };
    until(|| c.in_flight() == 1).await;
    let waiter = {
        let (c, k) = (c.clone(), k.clone());
        tokio::spawn(async move { c.run(&k, || async { Ok(0) }).await })
    };
    until(|| c.coalesced_waits() == 1).await;
    gate.notify_one();
    for t in [leader, waiter] {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Loader { .. }), "{err}");
        assert!(err.to_string().contains("loader bug"), "{err}");
    }
    assert_eq!(c.in_flight(), 0);
    assert_eq!(c.run(&k, || async { Ok(1) }).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_detaches_the_fetch_in_flight() {
    let c = LocalCoalescer::<u32>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (old_gate, new_gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let k = key("k");
    let before = tokio::spawn(gated_caller(&c, &calls, &old_gate, &k, Ok(1)));
    until(|| c.in_flight() == 1).await;
    // A caller waiting on the old fetch when it is forgotten still gets its result.
    let waiter = {
        let (c, k) = (c.clone(), k.clone());
        tokio::spawn(async move { c.run(&k, || async { Ok(0) }).await })
    };
    until(|| c.coalesced_waits() == 1).await;
    c.forget(&k);
    assert_eq!(c.in_flight(), 0);
    let after = tokio::spawn(gated_caller(&c, &calls, &new_gate, &k, Ok(2)));
    until(|| c.in_flight() == 1).await;
    // The old fetch finishing must not remove the new one from the map.
    old_gate.notify_one();
    assert_eq!(before.await.unwrap().unwrap(), 1);
    let waited = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await;
    assert_eq!(waited.expect("the waiter was told").unwrap().unwrap(), 1);
    assert_eq!(c.in_flight(), 1);
    new_gate.notify_one();
    assert_eq!(after.await.unwrap().unwrap(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn no_runtime_is_an_error_not_a_panic() {
    let c = LocalCoalescer::<u32>::new();
    let k = key("k");
    let fut = c.run(&k, || async { Ok(1) });
    let r = futures_util::FutureExt::now_or_never(fut);
    assert!(matches!(r, Some(Err(Error::Closed(_)))));
    // Refused before it entered the map: nothing counted, nothing left in flight.
    assert_eq!(c.fetches(), 0);
    assert_eq!(c.in_flight(), 0);
}

/// Leads `key` on `c` and has one caller wait on the lease; returns the lease and the
/// waiter.
async fn lead_with_a_waiter(
    c: &LocalCoalescer,
    key: &FlagKey,
) -> (Lease, tokio::task::JoinHandle<Result<Turn>>) {
    let Ok(Turn::Load(lease)) = c.acquire(key).await else {
        panic!("the first caller leads");
    };
    let waits = c.coalesced_waits();
    let waiter = {
        let (c, key) = (c.clone(), key.clone());
        tokio::spawn(async move { c.acquire(&key).await })
    };
    until(|| c.coalesced_waits() > waits).await;
    (lease, waiter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_release_reaches_its_waiters() {
    let c = LocalCoalescer::new();
    let e = crate::Entry::new(crate::Version(3), &b"x"[..]);

    let (lease, waiter) = lead_with_a_waiter(&c, &key("stored")).await;
    lease.release(LoadOutcome::Stored(e.clone())).await;
    let got = waiter.await.unwrap().unwrap();
    assert!(matches!(got, Turn::Answered(Coalesced::Fresh(Some(ref g))) if *g == e));

    let (lease, waiter) = lead_with_a_waiter(&c, &key("absent")).await;
    lease.release(LoadOutcome::Absent).await;
    let got = waiter.await.unwrap().unwrap();
    assert!(matches!(got, Turn::Answered(Coalesced::Absent)));

    let (lease, waiter) = lead_with_a_waiter(&c, &key("failed")).await;
    lease
        .release(LoadOutcome::Failed(Error::Closed("source down")))
        .await;
    assert!(matches!(
        waiter.await.unwrap(),
        Err(Error::Closed("source down"))
    ));
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_lease_makes_its_waiter_lead() {
    let c = LocalCoalescer::new();
    let (lease, waiter) = lead_with_a_waiter(&c, &key("dropped")).await;
    drop(lease);
    let next = waiter.await.unwrap().unwrap();
    assert!(matches!(next, Turn::Load(_)), "got {next:?}");
    assert_eq!(c.in_flight(), 1, "the new lead holds the key");
    drop(next);
    assert_eq!(c.in_flight(), 0);
}

/// A waiter on a fetch that was forgotten is still told when that fetch's lease is
/// dropped unreleased: it leads rather than wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_lease_dropped_makes_its_waiter_lead() {
    let c = LocalCoalescer::new();
    let k = key("forgotten");
    let (lease, waiter) = lead_with_a_waiter(&c, &k).await;
    c.forget(&k);
    drop(lease);
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was told")
        .unwrap()
        .unwrap();
    assert!(matches!(next, Turn::Load(_)), "got {next:?}");
}

/// `forget_all` while callers wait: they still get the fetch's result, and callers
/// arriving afterwards start a fetch of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_all_keeps_the_waiters_of_the_fetches_in_flight() {
    let c = LocalCoalescer::<u32>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let k = key("all");
    let first = tokio::spawn(gated_caller(&c, &calls, &gate, &k, Ok(1)));
    until(|| c.in_flight() == 1).await;
    let waiter = {
        let (c, k) = (c.clone(), k.clone());
        tokio::spawn(async move { c.run(&k, || async { Ok(0) }).await })
    };
    until(|| c.coalesced_waits() == 1).await;
    c.forget_all();
    assert_eq!(c.in_flight(), 0);
    let after = c.run(&k, || async { Ok(2) }).await.unwrap();
    assert_eq!(after, 2, "a caller after forget_all fetches afresh");
    gate.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    let waited = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await;
    assert_eq!(waited.expect("the waiter was told").unwrap().unwrap(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A coalescer without a runtime of its own: a leading caller dropped outside any
/// runtime hands the rest of its fetch to the runtime it started on, and the waiter
/// gets the result.
#[test]
fn a_leader_dropped_outside_any_runtime_hands_its_fetch_to_its_callers_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let c = LocalCoalescer::<u32>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let k = key("moved");
    let mut leader = Box::pin(gated_caller(&c, &calls, &gate, &k, Ok(7)));
    rt.block_on(std::future::poll_fn(|cx| {
        assert!(leader.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    }));
    let waiter = {
        let (c, k) = (c.clone(), k.clone());
        rt.spawn(async move { c.run(&k, || async { Ok(0) }).await })
    };
    rt.block_on(until(|| c.coalesced_waits() == 1));
    drop(leader);
    gate.notify_one();
    let got = rt
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await });
    assert_eq!(got.expect("the waiter was told").unwrap().unwrap(), 7);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
