//! The store property that unreadable entries never guard a key: the unreadable
//! entries of each layout, and the check that a `put` writes over every one of them.

use bytes::Bytes;

use super::{entry, fresh_key, RawAccess, TTL};
use crate::{Codec, FlagStore, PutOutcome, Version, FLAG_GZIP, FORMAT, HEADER_LEN};

/// The version every planted unreadable entry claims: far above any version a test
/// writes, and within the JSON layout's range.
const UNREADABLE_CLAIM: u64 = 1_000_000;

/// Unreadable entries of the store's layout, each claiming [`UNREADABLE_CLAIM`] where
/// the layout has a place for a version, and named for the check of a reader it fails.
fn layout_unreadable_entries(store: &dyn FlagStore) -> Vec<(&'static str, Bytes)> {
    if let Codec::Json(_) = store.codec() {
        return [
            (
                "a version string with a leading zero",
                &br#"{"flagConfig": "x", "version": "01000000"}"#[..],
            ),
            (
                "a version string that is not digits",
                br#"{"flagConfig": "x", "version": "v1000000"}"#,
            ),
            (
                "a version string with a fraction",
                br#"{"flagConfig": "x", "version": "1000000.0"}"#,
            ),
            ("no flagConfig", br#"{"version": 1000000}"#),
            (
                "truncated JSON",
                br#"{"flagConfig": "x", "version": 1000000"#,
            ),
            (
                "a fractional version",
                br#"{"flagConfig": "x", "version": 1000000.5}"#,
            ),
            // Well-formed JSON with a numeric version, which only the client rejects.
            (
                "a negative stampMs",
                br#"{"flagConfig": "x", "version": 1000000, "stampMs": -1}"#,
            ),
            ("binary bytes", b"\xf1\xa6\x01\x00"),
            ("the gzip magic before bytes that are not gzip", b"\x1f\x8b\x08\x00garbage"),
            // A whole gzip stream of the text `1000000`: it
            // decompresses, to a document that is not an entry.
            (
                "gzip'd text that is not an entry",
                b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03\x33\x34\x00\x03\x00\xdd\xd5\xfc\x1b\x07\x00\x00\x00",
            ),
        ]
        .into_iter()
        .map(|(what, bytes)| (what, Bytes::from_static(bytes)))
        .collect();
    }
    let good = store
        .codec()
        .encode_entry(&entry(store, UNREADABLE_CLAIM, "unreadable"))
        .expect("the claimed entry encodes")
        .to_vec();
    let altered = |what: &'static str, change: fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        change(&mut b);
        (what, Bytes::from(b))
    };
    vec![
        altered("bad magic", |b| b[0] = 0x00),
        altered("a bad format byte", |b| b[2] = FORMAT.wrapping_add(1)),
        altered("unknown flags", |b| b[3] = 0x80),
        altered("a byte more than the header's length", |b| b.push(0)),
        altered("a byte less than the header's length", |b| {
            b.pop();
        }),
        altered("the header alone", |b| b.truncate(HEADER_LEN)),
        altered("less than a header", |b| b.truncate(HEADER_LEN - 8)),
        altered("a CRC mismatch", |b| {
            if let Some(last) = b.last_mut() {
                *last ^= 0x40;
            }
        }),
        // Magic, format, length and CRC all hold: only decompression fails.
        altered("a gzip flag on a plain payload", |b| b[3] = FLAG_GZIP),
    ]
}

/// An entry a reader rejects does not guard its key. For each kind of unreadable entry —
/// the layout's (bad magic, format, flags, length, CRC, payload) and the backend's own
/// ([`RawAccess::backend_unreadable_entries`]) — claiming a version far above the
/// write's, `put(v5)` is `Stored` and a `get` then reads v5. A *readable* entry at a
/// higher version still guards.
pub async fn unreadable_entries_never_guard(store: &dyn FlagStore, raw: &dyn RawAccess) {
    let five = entry(store, 5, "five");
    let mut planted = layout_unreadable_entries(store);
    planted.extend(raw.backend_unreadable_entries(Version(UNREADABLE_CLAIM)));
    for (what, bytes) in planted {
        let key = fresh_key("unreadable");
        raw.write_raw(&key, bytes.clone(), TTL).await.unwrap();
        assert!(
            !matches!(store.get(&key).await, Ok(Some(_))),
            "unreadable: an entry with {what} ({bytes:?}) reads as an entry"
        );
        assert_eq!(
            store.put(&key, &five, TTL).await.unwrap(),
            PutOutcome::Stored,
            "unreadable: an entry with {what} guarded the key"
        );
        assert_eq!(
            store.get(&key).await.unwrap(),
            Some(five.clone()),
            "unreadable: read after a put over an entry with {what}"
        );
    }
    let key = fresh_key("unreadable_readable");
    let high = entry(store, UNREADABLE_CLAIM, "readable");
    assert_eq!(
        store.put(&key, &high, TTL).await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        store.put(&key, &five, TTL).await.unwrap(),
        PutOutcome::Superseded {
            current: Version(UNREADABLE_CLAIM)
        },
        "unreadable: a readable higher version did not guard"
    );
    assert_eq!(
        store.get(&key).await.unwrap(),
        Some(high),
        "unreadable: a refused write changed a readable entry"
    );
}
