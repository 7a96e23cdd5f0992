//! The read path: L1, then L2, then the loader; what each tier answers, absent flags,
//! corrupt L2 bytes, L1 switched off, and `get_cached` (L1 only).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use flagcache::layer::Op;
use flagcache::memory::MemoryStore;
use flagcache::{store::FlagStoreExt, CacheStatus, Error, FlagCache, Version};
use flagcache_testkit::{Answer, CountingSource};

use common::*;

#[tokio::test]
async fn l2_hits_come_back_into_l1_and_never_call_the_loader() {
    let mem = MemoryStore::new();
    put(&mem, &key("k"), "from-l2", 4).await;
    let cache = FlagCache::<Config>::builder(mem, never_loads)
        .build()
        .await
        .unwrap();
    let first = cache.lookup(&key("k")).await.unwrap();
    assert_eq!(
        (value(&first), first.status, first.version),
        ("from-l2", CacheStatus::HitL2, Some(Version::new(4)))
    );
    let second = cache.lookup(&key("k")).await.unwrap();
    assert_eq!(second.status, CacheStatus::HitL1);
    // The same Arc: an L1 hit decodes nothing.
    assert!(Arc::ptr_eq(
        first.value.as_ref().unwrap(),
        second.value.as_ref().unwrap()
    ));
}

#[tokio::test]
async fn get_cached_answers_from_l1_only() {
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .fresh_for(Duration::from_millis(30))
        .stale_for(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let (a, gone) = (key("a"), key("gone"));
    assert_eq!(cache.get_cached(&a), None, "nothing loaded yet");
    cache.get(&a).await.unwrap();
    assert_eq!(
        cache
            .get_cached(&a)
            .flatten()
            .as_deref()
            .map(String::as_str),
        Some("a@1")
    );
    // A flag the source lacks is an answer too: Some(None).
    src.set_answer(Answer::Absent);
    assert_eq!(cache.get(&gone).await.unwrap(), None);
    assert_eq!(cache.get_cached(&gone), Some(None));
    // Invalidated, or past its freshness: only `get` can answer.
    cache.invalidate(&a).await.unwrap();
    assert_eq!(cache.get_cached(&a), None);
    src.set_answer(Answer::Value);
    cache.get(&a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(cache.get_cached(&a), None, "an expired entry was answered");
    assert_eq!(src.calls(), 3, "get_cached never loads");
}

#[tokio::test]
async fn with_l1_off_every_read_goes_to_l2() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let src = CountingSource::new(1);
    let cache = FlagCache::builder(store, src.clone())
        .l1(false)
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            cache.lookup(&key("k")).await.unwrap().status,
            CacheStatus::HitL2
        );
    }
    assert_eq!(faults.calls(Op::Read), 6);
    assert_eq!(src.calls(), 1);
}

#[tokio::test]
async fn absent_flags_are_remembered_briefly() {
    let src = CountingSource::new(1);
    src.set_answer(Answer::Absent);
    let cache = memory_cache(&src)
        .negative_ttl(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    assert_eq!(cache.get(&key("ghost")).await.unwrap(), None);
    let l = cache.lookup(&key("ghost")).await.unwrap();
    assert_eq!((l.value.is_none(), l.status), (true, CacheStatus::HitL1));
    assert_eq!(src.calls(), 1);
    tokio::time::sleep(Duration::from_millis(80)).await;
    src.set_answer(Answer::Value);
    assert!(cache.get(&key("ghost")).await.unwrap().is_some());
    assert_eq!(cache.stats().loads_absent, 1);
}

#[tokio::test]
async fn corrupt_l2_bytes_are_counted_deleted_and_reloaded() {
    let mem = MemoryStore::new();
    let k = key("k");
    mem.write_raw(
        &k,
        flagcache::store::bytes::Bytes::from_static(b"\xf1\xa6garbage"),
        Duration::from_secs(60),
    )
    .unwrap();
    let src = CountingSource::new(3);
    let cache = FlagCache::builder(mem.clone(), src.clone())
        .build()
        .await
        .unwrap();
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@3", CacheStatus::Miss));
    assert_eq!(cache.stats().corrupt, 1);
    assert_eq!(src.calls(), 1);
    // Deleted, then replaced by the loaded value.
    assert_eq!(
        mem.get_value::<Config>(&k).await.unwrap(),
        Some(("k@3".into(), Version::new(3)))
    );

    // A well-formed entry whose payload is not a `Config` is treated the same way.
    let k2 = key("wrong-type");
    mem.put_value(
        &k2,
        &vec![1u8, 2, 3],
        Version::new(1),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(
        cache.get(&k2).await.unwrap().as_deref().map(String::as_str),
        Some("wrong-type@3")
    );
    assert_eq!(cache.stats().corrupt, 2);
}

#[tokio::test]
async fn a_get_polled_after_it_answered_is_an_error_not_a_panic() {
    use futures_util::FutureExt;
    use std::task::{Context, Poll};
    let src = CountingSource::new(1);
    let cache = memory_cache(&src).build().await.unwrap();
    let k = key("a");
    cache.get(&k).await.unwrap();
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let mut hit = cache.get(&k);
    assert!(matches!(hit.poll_unpin(&mut cx), Poll::Ready(Ok(Some(_)))));
    assert!(matches!(
        hit.poll_unpin(&mut cx),
        Poll::Ready(Err(Error::Closed(_)))
    ));
}

/// A loader that fails with `?` on any boxed error: the error the reader sees is a
/// loader error that names the key it was loading.
#[tokio::test]
async fn a_loader_error_raised_with_question_mark_names_its_key() {
    async fn failing(_: flagcache::FlagKey) -> flagcache::Result<Option<(Config, Version)>> {
        let down: Box<dyn std::error::Error + Send + Sync> = "control plane down".into();
        Err(down)?
    }
    let cache = FlagCache::<Config>::builder(MemoryStore::new(), failing)
        .build()
        .await
        .unwrap();
    let e = cache.get(&key("checkout.beta")).await.unwrap_err();
    assert!(matches!(e, Error::Loader { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("checkout.beta"), "{text}");
    assert!(text.contains("control plane down"), "{text}");
}
