//! The conformance property of leases: a versionless invalidation
//! ([`FlagStore::fence`]) refuses the L2 write of every fill that read the key before
//! it ([`FlagStore::put_fill`] answers [`PutOutcome::Fenced`]), while fills that read
//! after it, and versioned writes, go through; and a fence that keeps the value stale
//! reads as a miss until a `put` revalidates it.

use std::time::Duration;

use super::{entry, fresh_key, TTL};
use crate::{FillRead, FillToken, FlagKey, FlagStore, FlagStoreExt, PutOutcome};

/// How long the property's fences live: longer than the property takes.
const FENCE_TTL: Duration = Duration::from_secs(30);

/// One key's fill read, both ways `FlagCache` reads: on its own
/// ([`FlagStore::get_for_fill`]) and in a batch with another key
/// ([`FlagStore::get_each_for_fill`]), which must agree on the entry and the fence.
async fn read_for_fill(store: &dyn FlagStore, key: &FlagKey) -> FillRead {
    let other = fresh_key("fence-other");
    let mut answers = store.get_each_for_fill(&[key.clone(), other]).await;
    assert_eq!(answers.len(), 2, "get_each_for_fill: one answer per key");
    answers.truncate(1);
    let batched = answers.pop().unwrap().expect("get_each_for_fill");
    let alone = store.get_for_fill(key).await.expect("get_for_fill");
    assert_eq!(
        alone, batched,
        "get_for_fill and get_each_for_fill read the same"
    );
    alone
}

/// A fence refuses every fill that read the key before it — over an absent key, over
/// an entry (even with a higher version), after a second fence, and with the value
/// kept stale — and the fill that read after it writes; a versioned `put` is never
/// fenced, and a fenced fill never replaces what that `put` stored. The batched read
/// gives each key its own fence. A fence that expired refuses nothing.
pub async fn fences_refuse_older_fills(store: &dyn FlagStore) {
    let key = fresh_key("fence");
    let at = |n| entry(store, n, &format!("v{n}"));

    // An absent key: the fill reads a miss, then the key is invalidated.
    let before = read_for_fill(store, &key).await;
    assert_eq!(before.entry, None, "fence: a fresh key is not a miss");
    store.fence(&key, FENCE_TTL, None).await.unwrap();
    assert_eq!(
        store
            .put_fill(&key, &at(7), TTL, before.token)
            .await
            .unwrap(),
        PutOutcome::Fenced,
        "fence: a fill that read an absent key before the fence wrote after it"
    );
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "fence: a fenced fill left an entry"
    );

    // The fill that read after the fence writes.
    let after = read_for_fill(store, &key).await;
    assert_eq!(
        after.entry, None,
        "fence: a fenced key does not read as a miss"
    );
    assert_ne!(after.token, before.token, "fence: the token did not change");
    assert_eq!(
        store
            .put_fill(&key, &at(8), TTL, after.token)
            .await
            .unwrap(),
        PutOutcome::Stored,
        "fence: a fill that read the fence was refused"
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(at(8)));

    // Over an entry: the fence drops it, and a fill that read before it is refused
    // whatever its version.
    let read = read_for_fill(store, &key).await;
    assert_eq!(read.entry, Some(at(8)), "get_each_for_fill: the entry");
    store.fence(&key, FENCE_TTL, None).await.unwrap();
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "fence: the entry is still read"
    );
    assert_eq!(
        store.get_many(std::slice::from_ref(&key)).await.unwrap(),
        vec![None],
        "fence: a batch read still returns the entry"
    );
    assert_eq!(
        store.put_fill(&key, &at(9), TTL, read.token).await.unwrap(),
        PutOutcome::Fenced,
        "fence: a fill that read the entry before the fence wrote after it"
    );

    // A second fence refuses the readers of the first.
    let first = read_for_fill(store, &key).await;
    store.fence(&key, FENCE_TTL, None).await.unwrap();
    assert_eq!(
        store
            .put_fill(&key, &at(9), TTL, first.token)
            .await
            .unwrap(),
        PutOutcome::Fenced,
        "fence: a fill that read an earlier fence wrote after a later one"
    );

    // A versioned write is not fenced, and an older fill never replaces it.
    let racing = read_for_fill(store, &key).await;
    store.fence(&key, FENCE_TTL, None).await.unwrap();
    assert_eq!(
        store.put(&key, &at(10), TTL).await.unwrap(),
        PutOutcome::Stored,
        "fence: a versioned put was refused"
    );
    let late = store
        .put_fill(&key, &at(9), TTL, racing.token)
        .await
        .unwrap();
    assert_ne!(
        late,
        PutOutcome::Stored,
        "fence: an older fill replaced a set"
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(at(10)));

    // A fill that read an entry it cannot serve (a tag or a version source outdates
    // it) asks for the fence now: with that token its write goes in, without one it
    // is refused while the fence is up.
    let outdated = fresh_key("fence-outdated");
    store.put(&outdated, &at(1), TTL).await.unwrap();
    store.fence(&outdated, FENCE_TTL, None).await.unwrap();
    store.put(&outdated, &at(2), TTL).await.unwrap();
    let now = store.fence_token(&outdated).await.unwrap();
    assert_ne!(
        now,
        FillToken::NONE,
        "fence_token: no fence read while one is up"
    );
    assert_eq!(
        store
            .put_fill(&outdated, &at(4), TTL, FillToken::NONE)
            .await
            .unwrap(),
        PutOutcome::Fenced,
        "fence: a fill with no token wrote while a fence was up"
    );
    assert_eq!(
        store.put_fill(&outdated, &at(3), TTL, now).await.unwrap(),
        PutOutcome::Stored,
        "fence_token: a fill with the fence read now was refused"
    );

    // Kept stale: a miss to readers, and a fence all the same.
    let stale_read = read_for_fill(store, &key).await;
    store
        .fence(&key, FENCE_TTL, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "fence: a stale entry reads as fresh"
    );
    assert_eq!(
        store
            .put_fill(&key, &at(11), TTL, stale_read.token)
            .await
            .unwrap(),
        PutOutcome::Fenced,
        "fence (keep stale): a fill that read before it wrote after it"
    );
    let refill = read_for_fill(store, &key).await;
    assert_eq!(
        refill.entry, None,
        "fence (keep stale): the stale entry is a fill's hit"
    );
    assert_eq!(
        store
            .put_fill(&key, &at(11), TTL, refill.token)
            .await
            .unwrap(),
        PutOutcome::Stored,
        "fence (keep stale): the refresh's fill was refused"
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(at(11)));

    // The batched read: each key its own fence.
    let other = fresh_key("fence-other");
    store.fence(&other, FENCE_TTL, None).await.unwrap();
    let unfenced = fresh_key("fence-none");
    let both = store
        .get_each_for_fill(&[other.clone(), unfenced.clone()])
        .await;
    let [Ok(fenced_read), Ok(plain_read)] = &both[..] else {
        panic!("get_each_for_fill: {both:?}");
    };
    assert_ne!(
        fenced_read.token, plain_read.token,
        "get_each_for_fill: a fenced and an unfenced key read the same token"
    );
    assert_eq!(
        store
            .put_fill(&other, &at(1), TTL, fenced_read.token)
            .await
            .unwrap(),
        PutOutcome::Stored,
        "get_each_for_fill: a batched read's token was refused"
    );
    assert_eq!(
        store
            .put_fill(&unfenced, &at(1), TTL, plain_read.token)
            .await
            .unwrap(),
        PutOutcome::Stored
    );

    // An expired fence refuses nothing.
    let expiring = fresh_key("fence-expiring");
    let old = read_for_fill(store, &expiring).await;
    let resolution = store.capabilities().ttl_resolution;
    let short = resolution.max(Duration::from_millis(200));
    store.fence(&expiring, short, None).await.unwrap();
    tokio::time::sleep(short * 2 + resolution).await;
    assert_eq!(
        store
            .put_fill(&expiring, &at(3), TTL, old.token)
            .await
            .unwrap(),
        PutOutcome::Stored,
        "fence: an expired fence still refused a fill"
    );

    for k in [&key, &other, &unfenced, &expiring] {
        store.delete(k).await.unwrap();
    }
}

/// A key fenced with its value kept stale reads as a miss (single and batch reads); a
/// `put` of the same version revalidates it, and a newer one replaces it.
pub async fn stale_fence_reads_as_a_miss(store: &dyn FlagStore) {
    let key = fresh_key("stale");
    let five = entry(store, 5, "five");
    store.put(&key, &five, TTL).await.unwrap();
    store
        .fence(&key, Duration::from_secs(30), Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "fence (keep stale): the stale entry is still read as fresh"
    );
    assert_eq!(
        store.get_many(std::slice::from_ref(&key)).await.unwrap(),
        vec![None],
        "fence (keep stale): a batch read returns the stale entry"
    );
    // Stored where the entry was deleted, Superseded where it was kept: either way the
    // source's confirmation makes it readable again.
    store.put(&key, &five, TTL).await.unwrap();
    assert_eq!(
        store.get(&key).await.unwrap(),
        Some(five),
        "fence (keep stale): a put of the same version did not revalidate it"
    );
    store
        .fence(&key, Duration::from_secs(30), Some(Duration::from_secs(30)))
        .await
        .unwrap();
    let six = entry(store, 6, "six");
    assert_eq!(
        store.put(&key, &six, TTL).await.unwrap(),
        PutOutcome::Stored,
        "fence (keep stale): a newer version was refused"
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(six));
    store
        .fence(
            &fresh_key("stale-absent"),
            Duration::from_secs(30),
            Some(Duration::from_secs(30)),
        )
        .await
        .expect("fence: an absent key is not an error");
    store.delete(&key).await.unwrap();
}
