//! The store property that entries other services write in the JSON layout — gzip'd,
//! or with the version as a string — guard and are read like the store's own.

use std::io::Write;

use bytes::Bytes;

use super::{entry, fresh_key, RawAccess, TTL};
use crate::{Checked, Codec, FlagStore, PutOutcome, Version};

fn gzipped(doc: &[u8]) -> Bytes {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(doc).expect("gzip into memory");
    enc.finish().expect("gzip into memory").into()
}

/// In the JSON layout (other layouts pass at once), for each foreign form of an entry
/// at version 1,000,000 — gzip'd, a string version, both — planted raw: `get` reads it,
/// `get_checked` agrees, `put(v5)` is `Superseded { current: 1,000,000 }` and changes
/// nothing, and `put(v2,000,000)` replaces it. A store whose server-side guard cannot
/// read gzip (Redis' scripts) must still refuse the older write.
pub async fn foreign_json_entries_guard(store: &dyn FlagStore, raw: &dyn RawAccess) {
    if !matches!(store.codec(), Codec::Json(_)) {
        return;
    }
    let claim = Version(1_000_000);
    let plain_text = br#"{"flagConfig": "foreign", "version": "1000000"}"#;
    let numeric = br#"{"flagConfig": "foreign", "version": 1000000}"#;
    let planted = [
        ("a gzip'd entry", gzipped(numeric)),
        ("a string version", Bytes::from_static(plain_text)),
        ("a gzip'd entry with a string version", gzipped(plain_text)),
    ];
    for (what, bytes) in planted {
        let key = fresh_key("foreign_json");
        raw.write_raw(&key, bytes, TTL).await.unwrap();
        let read = store.get(&key).await.unwrap();
        assert_eq!(
            read.as_ref().map(|e| (e.version, &e.payload[..])),
            Some((claim, &br#""foreign""#[..])),
            "foreign_json: {what} does not read"
        );
        assert!(
            matches!(
                store.get_checked(&key, claim).await.unwrap(),
                Checked::Hit(_)
            ),
            "foreign_json: get_checked of {what} at its version is not a hit"
        );
        assert_eq!(
            store.get_checked(&key, Version(5)).await.unwrap(),
            Checked::Stale { current: claim },
            "foreign_json: get_checked of {what} at another version"
        );
        assert_eq!(
            store
                .put(&key, &entry(store, 5, "older"), TTL)
                .await
                .unwrap(),
            PutOutcome::Superseded { current: claim },
            "foreign_json: {what} did not guard against an older write"
        );
        assert_eq!(
            store.get(&key).await.unwrap().map(|e| e.version),
            Some(claim),
            "foreign_json: a refused write changed {what}"
        );
        let newer = entry(store, 2_000_000, "newer");
        assert_eq!(
            store.put(&key, &newer, TTL).await.unwrap(),
            PutOutcome::Stored,
            "foreign_json: a newer write over {what}"
        );
        assert_eq!(
            store.get(&key).await.unwrap(),
            Some(newer),
            "foreign_json: read after a newer write over {what}"
        );
    }
}
