//! The conformance suite: one `pub async fn` per guarantee of the [`FlagStore`],
//! [`Invalidator`](crate::Invalidator) and [`Coalescer`](crate::Coalescer) contracts.
//! The store's properties are here, but for those on unreadable and foreign JSON
//! entries; those,
//! the invalidator's and the coalescer's are in their own files. Every adapter's tests
//! call all of them against a real backend; a custom adapter that passes them can back
//! a `FlagCache`.
//!
//! Each function panics (like `assert!`) on the first violated guarantee, with a message
//! naming it. Keys are randomised per call, so the suite can run against a shared server
//! and in parallel with itself.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn flagcache::store::FlagStore>,
//! #               raw: &dyn flagcache::conformance::RawAccess) {
//! use flagcache::conformance;
//! // All store properties in sequence…
//! conformance::run_store_suite(store.clone(), raw).await;
//! // …or one at a time, one test each:
//! conformance::version_guard(&*store).await;
//! # }
//! ```
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod coalescer;
mod fences;
mod foreign_json;
mod invalidator;
mod unreadable;

pub use coalescer::{abandoned_lease_frees_the_key, one_load_per_burst};
pub use fences::{fences_refuse_older_fills, stale_fence_reads_as_a_miss};
pub use foreign_json::foreign_json_entries_guard;
pub use invalidator::{invalidation_reaches_every_subscriber, resync_after_gap};
pub use unreadable::unreadable_entries_never_guard;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    Checked, Codec, Entry, Error, FlagKey, FlagStore, FlagStoreExt, PutOutcome, Result, Version,
    JSON_MAX_VERSION,
};

/// A way to write bytes under a key *bypassing* the store's encoding, so that the suite
/// can plant corrupt entries. Adapters implement it in their tests with their raw
/// client (for Redis, a plain `SET` of the store's key name).
#[async_trait]
pub trait RawAccess: Send + Sync {
    /// Stores `bytes` exactly as given where the store keeps `key`'s entry.
    async fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) -> Result<()>;

    /// Entries this backend's own readers reject beyond the layout's checks, each
    /// claiming `version`, named for the failure messages: memcached, for one, gives a
    /// chunk manifest whose chunks are missing. [`unreadable_entries_never_guard`]
    /// plants them with [`write_raw`](RawAccess::write_raw) along with the layout's own
    /// unreadable entries. The default is none.
    fn backend_unreadable_entries(&self, version: Version) -> Vec<(&'static str, Bytes)> {
        let _ = version;
        Vec::new()
    }
}

const TTL: Duration = Duration::from_secs(60);
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A key unique to this call, so properties never see each other's data.
pub fn fresh_key(property: &str) -> FlagKey {
    FlagKey::new(format!("conformance.{property}.{:016x}", fastrand::u64(..)))
        .expect("conformance keys are valid")
}

/// An entry whose payload is `text` serialized with the store's own codec, so every
/// property holds in every layout (the JSON interop layout needs JSON payloads).
fn entry(store: &dyn FlagStore, version: u64, text: &str) -> Entry {
    Entry {
        version: Version(version),
        stamp_ms: 1_700_000_000_000u64.wrapping_add(version),
        payload: store
            .codec()
            .encode_value(text)
            .expect("a string always serializes"),
    }
}

/// The highest version the store's layout can carry.
fn max_version(store: &dyn FlagStore) -> u64 {
    match store.codec() {
        Codec::Json(_) => JSON_MAX_VERSION,
        _ => u64::MAX,
    }
}

/// Runs every store property, in sequence.
pub async fn run_store_suite(store: Arc<dyn FlagStore>, raw: &dyn RawAccess) {
    let s = &*store;
    round_trip(s).await;
    missing_key_is_a_miss(s).await;
    zero_ttl_is_refused(s).await;
    version_guard(s).await;
    concurrent_writers_leave_the_highest(store.clone()).await;
    get_checked_hit_stale_miss(s).await;
    get_many_keeps_order_and_misses(s).await;
    delete_removes(s).await;
    stale_fence_reads_as_a_miss(s).await;
    fences_refuse_older_fills(s).await;
    keys_at_the_edges(s).await;
    large_values(s).await;
    corrupt_bytes_are_a_miss_not_a_panic(s, raw).await;
    unreadable_entries_never_guard(s, raw).await;
    foreign_json_entries_guard(s, raw).await;
    ttl_expires(s).await;
}

/// What is put is what is read back: version, stamp and payload, raw and typed.
pub async fn round_trip(store: &dyn FlagStore) {
    let key = fresh_key("round_trip");
    let e = entry(store, 3, "\u{0}\x01binary\u{ff}payload");
    assert_eq!(store.put(&key, &e, TTL).await.unwrap(), PutOutcome::Stored);
    let back = store
        .get(&key)
        .await
        .unwrap()
        .expect("round_trip: entry just written is missing");
    assert_eq!(
        back, e,
        "round_trip: read back differs from what was written"
    );

    let typed = fresh_key("round_trip_typed");
    let value = vec![("rollout".to_string(), 25u8), ("kill".to_string(), 0)];
    store
        .put_value(&typed, &value, Version(1), TTL)
        .await
        .unwrap();
    let got: Option<(Vec<(String, u8)>, Version)> = store.get_value(&typed).await.unwrap();
    assert_eq!(
        got,
        Some((value, Version(1))),
        "round_trip: typed value differs"
    );
}

/// An absent key is `None`, `Checked::Miss`, and a `None` slot.
pub async fn missing_key_is_a_miss(store: &dyn FlagStore) {
    let key = fresh_key("missing");
    assert_eq!(store.get(&key).await.unwrap(), None, "missing: get");
    assert_eq!(
        store.get_checked(&key, Version(1)).await.unwrap(),
        Checked::Miss,
        "missing: get_checked"
    );
    assert_eq!(
        store.get_many(std::slice::from_ref(&key)).await.unwrap(),
        vec![None]
    );
    store
        .delete(&key)
        .await
        .expect("missing: deleting an absent key is not an error");
}

/// Every write carries a TTL: zero is refused and writes nothing.
pub async fn zero_ttl_is_refused(store: &dyn FlagStore) {
    let key = fresh_key("zero_ttl");
    let err = store.put(&key, &entry(store, 1, "x"), Duration::ZERO).await;
    assert!(
        matches!(err, Err(Error::InvalidArgument(_))),
        "zero_ttl: expected InvalidArgument, got {err:?}"
    );
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "zero_ttl: something was written"
    );
}

/// The version guard: lower and equal versions are superseded and change nothing;
/// higher versions replace.
pub async fn version_guard(store: &dyn FlagStore) {
    let key = fresh_key("version_guard");
    assert_eq!(
        store
            .put(&key, &entry(store, 5, "five"), TTL)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    for (v, what) in [(3, "older"), (5, "equal")] {
        let out = store
            .put(&key, &entry(store, v, "intruder"), TTL)
            .await
            .unwrap();
        assert_eq!(
            out,
            PutOutcome::Superseded {
                current: Version(5)
            },
            "version_guard: an {what} version was not superseded"
        );
    }
    assert_eq!(
        store.get(&key).await.unwrap(),
        Some(entry(store, 5, "five")),
        "version_guard: a refused write changed the entry"
    );
    assert_eq!(
        store.put(&key, &entry(store, 6, "six"), TTL).await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(entry(store, 6, "six")));
    // The top of the layout's range orders correctly (no precision loss: the Redis
    // scripts compare versions as bytes, never as Lua numbers).
    let top = fresh_key("version_guard_top");
    let max = max_version(store);
    let below = entry(store, max - 1, "max-1");
    assert_eq!(
        store.put(&top, &below, TTL).await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        store
            .put(&top, &entry(store, max, "max"), TTL)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        store.put(&top, &below, TTL).await.unwrap(),
        PutOutcome::Superseded {
            current: Version(max)
        },
        "version_guard: {} replaced {max}",
        max - 1
    );
}

/// 32 concurrent writers with distinct versions, released at once, leave the highest —
/// over several rounds.
pub async fn concurrent_writers_leave_the_highest(store: Arc<dyn FlagStore>) {
    const WRITERS: u64 = 32;
    for round in 0..5 {
        let key = fresh_key("concurrent_writers");
        let mut versions: Vec<u64> = (1..=WRITERS).collect();
        fastrand::shuffle(&mut versions);
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS as usize));
        let tasks: Vec<_> = versions
            .into_iter()
            .map(|v| {
                let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .put(&key, &entry(&*store, v, &format!("v{v}")), TTL)
                        .await
                })
            })
            .collect();
        let mut stored = 0;
        for t in tasks {
            if t.await.expect("writer task").unwrap() == PutOutcome::Stored {
                stored += 1;
            }
        }
        let last = store.get(&key).await.unwrap();
        assert_eq!(
            last,
            Some(entry(&*store, WRITERS, &format!("v{WRITERS}"))),
            "concurrent_writers: round {round} left {last:?} ({stored} writes stored)"
        );
    }
}

/// `get_checked` is Hit only on an exact version match; an older *or newer* stored
/// version is Stale.
pub async fn get_checked_hit_stale_miss(store: &dyn FlagStore) {
    let key = fresh_key("get_checked");
    assert_eq!(
        store.get_checked(&key, Version(5)).await.unwrap(),
        Checked::Miss
    );
    store
        .put(&key, &entry(store, 5, "five"), TTL)
        .await
        .unwrap();
    assert_eq!(
        store.get_checked(&key, Version(5)).await.unwrap(),
        Checked::Hit(entry(store, 5, "five")),
        "get_checked: exact match is not a Hit"
    );
    assert_eq!(
        store.get_checked(&key, Version(6)).await.unwrap(),
        Checked::Stale {
            current: Version(5)
        },
        "get_checked: an older stored version is not Stale"
    );
    assert_eq!(
        store.get_checked(&key, Version(4)).await.unwrap(),
        Checked::Stale {
            current: Version(5)
        },
        "get_checked: a newer stored version (rollback) is not Stale"
    );
}

/// `get_many` answers one slot per key, in request order, with misses and repeats.
pub async fn get_many_keeps_order_and_misses(store: &dyn FlagStore) {
    assert!(
        store.get_many(&[]).await.unwrap().is_empty(),
        "get_many: empty request"
    );
    let (a, b, gone) = (
        fresh_key("many_a"),
        fresh_key("many_b"),
        fresh_key("many_gone"),
    );
    store.put(&a, &entry(store, 1, "a"), TTL).await.unwrap();
    store.put(&b, &entry(store, 2, "b"), TTL).await.unwrap();
    let keys = [b.clone(), gone.clone(), a.clone(), b.clone()];
    let got = store.get_many(&keys).await.unwrap();
    assert_eq!(
        got,
        vec![
            Some(entry(store, 2, "b")),
            None,
            Some(entry(store, 1, "a")),
            Some(entry(store, 2, "b"))
        ],
        "get_many: wrong order or content"
    );
    assert!(
        store.get_each(&[]).await.is_empty(),
        "get_each: empty request"
    );
    let each: Vec<Option<Entry>> = store
        .get_each(&keys)
        .await
        .into_iter()
        .map(|r| r.expect("get_each: a readable key failed"))
        .collect();
    assert_eq!(each, got, "get_each: wrong order or content");
    // Enough keys to span shards / slots / servers.
    let many: Vec<FlagKey> = (0..64).map(|i| fresh_key(&format!("many{i}"))).collect();
    for (i, k) in many.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
        store
            .put(k, &entry(store, i as u64 + 1, &i.to_string()), TTL)
            .await
            .unwrap();
    }
    let got = store.get_many(&many).await.unwrap();
    for (i, slot) in got.iter().enumerate() {
        let want = (i % 3 != 0).then(|| entry(store, i as u64 + 1, &i.to_string()));
        assert_eq!(slot, &want, "get_many: slot {i} of 64");
    }
    let each = store.get_each(&many).await;
    assert_eq!(each.len(), many.len(), "get_each: one answer per key");
    for (i, slot) in each.into_iter().enumerate() {
        let want = (i % 3 != 0).then(|| entry(store, i as u64 + 1, &i.to_string()));
        assert_eq!(slot.ok(), Some(want), "get_each: slot {i} of 64");
    }
}

/// `delete` removes the entry and the version guard forgets it.
pub async fn delete_removes(store: &dyn FlagStore) {
    let key = fresh_key("delete");
    store
        .put(&key, &entry(store, 9, "nine"), TTL)
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "delete: entry still there"
    );
    assert_eq!(
        store.put(&key, &entry(store, 2, "two"), TTL).await.unwrap(),
        PutOutcome::Stored,
        "delete: the guard remembered a deleted version"
    );
    store.delete(&key).await.unwrap();
    store
        .delete(&key)
        .await
        .expect("delete: twice is not an error");
}

/// Invalid keys cannot be built; the longest and the oddest valid keys round trip and
/// stay distinct.
pub async fn keys_at_the_edges(store: &dyn FlagStore) {
    for bad in ["", "a b", "a\r\nb", "a\tb", "x\0y"] {
        assert!(
            matches!(FlagKey::new(bad), Err(Error::InvalidKey { .. })),
            "{bad:?} accepted"
        );
    }
    assert!(FlagKey::new("k".repeat(FlagKey::MAX_LEN + 1)).is_err());
    let tag = format!("{:08x}", fastrand::u32(..));
    let mut longest = format!("edge.{tag}.");
    while longest.len() < FlagKey::MAX_LEN {
        longest.push('x');
    }
    let keys: Vec<FlagKey> = [
        longest,
        format!("edge.{tag}.unicode-ü-€-🚀"),
        format!("edge.{tag}.{{braces}}:colon/slash"),
        format!("edge.{tag}.%00\\x41"),
    ]
    .iter()
    .map(|k| FlagKey::new(k).unwrap())
    .collect();
    for (i, k) in keys.iter().enumerate() {
        store
            .put(k, &entry(store, i as u64 + 1, k.as_str()), TTL)
            .await
            .unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            store.get(k).await.unwrap(),
            Some(entry(store, i as u64 + 1, k.as_str())),
            "keys_at_the_edges: {k:?}"
        );
    }
}

/// A 256 KiB, poorly compressible value round trips (or, over the store's limit, is refused
/// with `ValueTooLarge` and nothing is written — never dropped silently).
pub async fn large_values(store: &dyn FlagStore) {
    let key = fresh_key("large");
    // Random alphanumerics: compresses poorly, and is a valid value in every layout.
    let big: String = (0..256 * 1024).map(|_| fastrand::alphanumeric()).collect();
    let e = entry(store, 1, &big);
    match store.capabilities().max_value_size {
        Some(limit) if limit < big.len() + 64 => {
            let err = store.put(&key, &e, TTL).await;
            assert!(
                matches!(err, Err(Error::ValueTooLarge { .. })),
                "large_values: over the limit of {limit}, got {err:?}"
            );
            assert_eq!(
                store.get(&key).await.unwrap(),
                None,
                "large_values: partial write"
            );
        }
        _ => {
            assert_eq!(store.put(&key, &e, TTL).await.unwrap(), PutOutcome::Stored);
            assert_eq!(
                store.get(&key).await.unwrap(),
                Some(e),
                "large_values: differs"
            );
        }
    }
}

/// Bytes that do not decode are reported as `Corrupt` or a miss by `get`, as a miss by
/// `get_checked` and `get_many` — never a panic — and a `put` over them succeeds.
pub async fn corrupt_bytes_are_a_miss_not_a_panic(store: &dyn FlagStore, raw: &dyn RawAccess) {
    let good = fresh_key("corrupt_neighbour");
    store
        .put(&good, &entry(store, 1, "fine"), TTL)
        .await
        .unwrap();
    let garbage: [&[u8]; 5] = [
        b"",
        b"\xf1",
        b"{\"flagConfig\": ",
        b"\xf1\xa6\x01\x00\x00\x00\x00\x00\x00\x00\x00\x07 truncated",
        b"\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad",
    ];
    for bytes in garbage {
        let key = fresh_key("corrupt");
        raw.write_raw(&key, Bytes::from_static(bytes), TTL)
            .await
            .unwrap();
        match store.get(&key).await {
            Ok(None) | Err(Error::Corrupt { .. }) => {}
            other => panic!("corrupt: get of {bytes:?} gave {other:?}"),
        }
        match store.get_checked(&key, Version(7)).await {
            Ok(Checked::Miss) | Err(Error::Corrupt { .. }) => {}
            other => panic!("corrupt: get_checked of {bytes:?} gave {other:?}"),
        }
        let many = store.get_many(&[good.clone(), key.clone()]).await.unwrap();
        assert_eq!(
            many,
            vec![Some(entry(store, 1, "fine")), None],
            "corrupt: get_many"
        );
        // Each key answered on its own: the neighbour of a corrupt entry still reads.
        match &store.get_each(&[good.clone(), key.clone()]).await[..] {
            [Ok(Some(fine)), Ok(None) | Err(Error::Corrupt { .. })]
                if *fine == entry(store, 1, "fine") => {}
            other => panic!("corrupt: get_each of {bytes:?} gave {other:?}"),
        }
        assert_eq!(
            store
                .put(&key, &entry(store, 1, "repaired"), TTL)
                .await
                .unwrap(),
            PutOutcome::Stored,
            "corrupt: a put over corrupt bytes must replace them"
        );
        assert_eq!(
            store.get(&key).await.unwrap(),
            Some(entry(store, 1, "repaired"))
        );
    }
}

/// Entries expire after their TTL (rounded to the store's TTL resolution).
pub async fn ttl_expires(store: &dyn FlagStore) {
    let res = store.capabilities().ttl_resolution;
    let ttl = res.max(Duration::from_millis(150));
    let key = fresh_key("ttl");
    store
        .put(&key, &entry(store, 1, "short-lived"), ttl)
        .await
        .unwrap();
    let long = fresh_key("ttl_long");
    store
        .put(&long, &entry(store, 1, "long-lived"), TTL)
        .await
        .unwrap();
    assert!(
        store.get(&key).await.unwrap().is_some(),
        "ttl: expired at once"
    );
    tokio::time::sleep(ttl + res + Duration::from_millis(250)).await;
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "ttl: still there after {ttl:?}"
    );
    assert!(
        store.get(&long).await.unwrap().is_some(),
        "ttl: a long TTL expired early"
    );
    // An expired entry does not guard: a lower version may now be written.
    assert_eq!(
        store
            .put(&key, &entry(store, 0, "again"), TTL)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
}
