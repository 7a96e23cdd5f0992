//! How values, entries and invalidation events become bytes, and back.
//!
//! Two layouts exist, and the layout is a setting of the *store* (server-side logic such
//! as a Redis script reads the version out of the stored bytes):
//!
//! - [`EnvelopeCodec`] (the default): a fixed 28-byte header, then the value serialized
//!   with MessagePack, gzip'd when larger than a threshold.
//!
//!   | offset | size | field                                               |
//!   |-------:|-----:|-----------------------------------------------------|
//!   | 0      | 2    | magic `F1 A6`                                       |
//!   | 2      | 1    | format (1)                                          |
//!   | 3      | 1    | flags (bit 0: payload is gzip'd; others must be 0)  |
//!   | 4      | 8    | version, big-endian ([`VERSION_OFFSET`])            |
//!   | 12     | 8    | stamp in ms since the Unix epoch, big-endian        |
//!   | 20     | 4    | stored payload length, big-endian                   |
//!   | 24     | 4    | CRC-32 of the stored payload, big-endian            |
//!   | 28     | …    | payload                                             |
//!
//!   Because the version sits at a fixed offset in big-endian, a server-side script can
//!   compare two versions as 8-byte strings, with no u64 → double precision loss.
//!
//! - [`JsonCodec`]: the interop layout `{"flagConfig": …, "version": N}` used by existing
//!   services, read plain or gzip'd (and written gzip'd above an opt-in threshold), with
//!   invalidation messages `{"flagKey": "…", "version": N}`. Versions must stay below
//!   2^53 (JavaScript numbers); a version may also be given as a string of its digits
//!   (see [`JsonCodec`] for the exact rule).
//!
//! Decoding treats its input as untrusted: any byte string decodes or returns
//! [`Error::Corrupt`] — it never panics, and decompression stops at a cap so that a gzip
//! bomb is refused rather than exhausting memory.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Entry, Error, Invalidation, Result, Version};

mod envelope;
mod gzip;
mod json;

pub use envelope::EnvelopeCodec;
pub use gzip::GZIP_MAGIC;
pub use json::JsonCodec;

/// The envelope's magic bytes.
pub const MAGIC: [u8; 2] = [0xF1, 0xA6];
/// The envelope format this crate writes.
pub const FORMAT: u8 = 1;
/// Offset of the 8-byte big-endian version in an envelope.
pub const VERSION_OFFSET: usize = 4;
/// Size of the envelope header.
pub const HEADER_LEN: usize = 28;
/// Flag bit: the payload is gzip'd.
pub const FLAG_GZIP: u8 = 0b0000_0001;
/// The largest version the JSON layout can carry exactly (2^53 - 1).
pub const JSON_MAX_VERSION: u64 = (1 << 53) - 1;

const EVENT_MAGIC: [u8; 2] = [0xF1, 0xA7];

/// How a store lays out what it writes (the layout: [`HEADER_LEN`], [`VERSION_OFFSET`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Codec {
    /// The binary envelope with a MessagePack payload (the default).
    Envelope(EnvelopeCodec),
    /// The JSON interop layout.
    Json(JsonCodec),
}

/// The default codec, for stores that do not choose one.
pub static DEFAULT_CODEC: Codec = Codec::Envelope(EnvelopeCodec::new());

impl Default for Codec {
    fn default() -> Self {
        DEFAULT_CODEC.clone()
    }
}

impl From<EnvelopeCodec> for Codec {
    fn from(c: EnvelopeCodec) -> Self {
        Codec::Envelope(c)
    }
}

impl From<JsonCodec> for Codec {
    fn from(c: JsonCodec) -> Self {
        Codec::Json(c)
    }
}

impl Codec {
    /// Serializes a value into an entry payload.
    ///
    /// # Errors
    /// [`Error::Codec`] when `value` cannot be serialized.
    pub fn encode_value<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes> {
        match self {
            Codec::Envelope(_) => rmp_serde::to_vec_named(value)
                .map(Bytes::from)
                .map_err(|e| Error::codec("MessagePack serialization failed", e)),
            Codec::Json(_) => serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(|e| Error::codec("JSON serialization failed", e)),
        }
    }

    /// Deserializes an entry payload.
    ///
    /// # Errors
    /// [`Error::Codec`] when the payload is not a valid `T`.
    pub fn decode_value<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T> {
        match self {
            Codec::Envelope(_) => rmp_serde::from_slice(payload)
                .map_err(|e| Error::codec("MessagePack payload does not decode", e)),
            Codec::Json(_) => serde_json::from_slice(payload)
                .map_err(|e| Error::codec("JSON payload does not decode", e)),
        }
    }

    /// Lays out an entry as the bytes a store writes.
    ///
    /// # Errors
    /// [`Error::Codec`] when the entry cannot be represented in this layout (a payload
    /// that is not JSON, or a version of 2^53 or more, in the JSON layout; a payload over
    /// 4 GiB in the envelope).
    pub fn encode_entry(&self, entry: &Entry) -> Result<Bytes> {
        match self {
            Codec::Envelope(c) => c.encode(entry),
            Codec::Json(c) => c.encode(entry),
        }
    }

    /// Reads an entry back from stored bytes.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for anything that is not a well-formed entry of this layout.
    pub fn decode_entry(&self, bytes: Bytes) -> Result<Entry> {
        match self {
            Codec::Envelope(c) => c.decode(bytes),
            Codec::Json(c) => c.decode(&bytes),
        }
    }

    /// Reads only the version from stored bytes, without touching the payload.
    ///
    /// # Errors
    /// [`Error::Corrupt`] as for [`Codec::decode_entry`].
    pub fn peek_version(&self, bytes: &[u8]) -> Result<Version> {
        match self {
            Codec::Envelope(_) => EnvelopeCodec::header(bytes).map(|h| h.version),
            Codec::Json(c) => c.decode(bytes).map(|e| e.version),
        }
    }

    /// Serializes an invalidation event for the wire.
    ///
    /// # Errors
    /// [`Error::Codec`] when the event cannot be represented (a version of 2^53 or more
    /// in the JSON layout).
    pub fn encode_invalidation(&self, event: &Invalidation) -> Result<Bytes> {
        match self {
            Codec::Envelope(_) => {
                let mut out = Vec::with_capacity(64);
                out.extend_from_slice(&EVENT_MAGIC);
                out.push(FORMAT);
                rmp_serde::encode::write_named(&mut out, event)
                    .map_err(|e| Error::codec("event serialization failed", e))?;
                Ok(out.into())
            }
            Codec::Json(_) => json::json_event::encode(event),
        }
    }

    /// Whether `bytes` present themselves as an invalidation event of this layout,
    /// whether or not they decode: in the envelope layout, they begin with the event
    /// magic; in the JSON layout, they are a JSON object with a `flagKey`, `tag` or
    /// `all` member. A subscriber on a shared channel uses it to tell another
    /// publisher's message (`product:123:updated`) from an invalidation it failed to
    /// read.
    ///
    /// ```
    /// use flagcache::codec::{Codec, JsonCodec};
    ///
    /// let json = Codec::from(JsonCodec::new());
    /// assert!(json.claims_invalidation(br#"{"flagKey": "not a key"}"#));
    /// assert!(!json.claims_invalidation(b"product:123:updated"));
    /// assert!(!json.claims_invalidation(br#"{"order": 7}"#));
    /// ```
    pub fn claims_invalidation(&self, bytes: &[u8]) -> bool {
        match self {
            Codec::Envelope(_) => bytes.starts_with(&EVENT_MAGIC),
            Codec::Json(_) => json::json_event::claims(bytes),
        }
    }

    /// Reads an invalidation event from the wire.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for anything that is not a well-formed event of this layout.
    pub fn decode_invalidation(&self, bytes: &[u8]) -> Result<Invalidation> {
        match self {
            Codec::Envelope(_) => {
                let body = bytes
                    .strip_prefix(&EVENT_MAGIC)
                    .and_then(|b| b.strip_prefix(&[FORMAT]))
                    .ok_or_else(|| Error::corrupt("not a flagcache invalidation event"))?;
                rmp_serde::from_slice(body)
                    .map_err(|e| Error::corrupt(format!("invalidation event: {e}")))
            }
            Codec::Json(_) => json::json_event::decode(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FlagKey, NodeId, Target};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::io::Write;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct FlagConfig {
        enabled: bool,
        rollout_percent: u8,
        variants: BTreeMap<String, i64>,
        rules: Vec<String>,
    }

    fn config() -> impl Strategy<Value = FlagConfig> {
        (
            any::<bool>(),
            0u8..=100,
            prop::collection::btree_map("[a-z]{1,8}", any::<i64>(), 0..8),
            prop::collection::vec(".{0,40}", 0..80),
        )
            .prop_map(|(enabled, rollout_percent, variants, rules)| FlagConfig {
                enabled,
                rollout_percent,
                variants,
                rules,
            })
    }

    fn envelope() -> Codec {
        Codec::default()
    }

    #[test]
    fn header_layout_is_fixed() {
        let e = Entry {
            version: Version(0x0102_0304_0506_0708),
            stamp_ms: 99,
            payload: Bytes::from_static(b"\x91\x01"),
        };
        let b = envelope().encode_entry(&e).unwrap();
        assert_eq!(&b[..2], &MAGIC);
        assert_eq!(b[2], FORMAT);
        assert_eq!(b[3], 0);
        assert_eq!(
            &b[VERSION_OFFSET..VERSION_OFFSET + 8],
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(&b[12..20], &99u64.to_be_bytes());
        assert_eq!(&b[20..24], &2u32.to_be_bytes());
        assert_eq!(&b[HEADER_LEN..], b"\x91\x01");
        assert_eq!(envelope().peek_version(&b).unwrap(), e.version);
    }

    #[test]
    fn compresses_only_above_threshold() {
        let codec = envelope();
        let small = Entry::new(Version(1), vec![b'a'; 1024]);
        let big = Entry::new(Version(1), vec![b'a'; 1025]);
        assert_eq!(codec.encode_entry(&small).unwrap()[3] & FLAG_GZIP, 0);
        let enc = codec.encode_entry(&big).unwrap();
        assert_eq!(enc[3] & FLAG_GZIP, FLAG_GZIP);
        assert!(
            enc.len() < 200,
            "1 KiB of one byte gzips small: {}",
            enc.len()
        );
        assert_eq!(codec.decode_entry(enc).unwrap(), big);
        // Incompressible data above the threshold is stored as is.
        let noise: Vec<u8> = (0..4096).map(|_| fastrand::u8(..)).collect();
        let enc = codec
            .encode_entry(&Entry::new(Version(1), noise.clone()))
            .unwrap();
        assert_eq!(enc[3] & FLAG_GZIP, 0);
        assert_eq!(&enc[HEADER_LEN..], &noise[..]);
    }

    #[test]
    fn gzip_bomb_is_refused() {
        // 64 MiB of zeros gzips to ~64 KiB; the cap is 16 MiB.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            enc.write_all(&zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let mut crc = flate2::Crc::new();
        crc.update(&bomb);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[FORMAT, FLAG_GZIP]);
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(bomb.len() as u32).to_be_bytes());
        b.extend_from_slice(&crc.sum().to_be_bytes());
        b.extend_from_slice(&bomb);
        let err = envelope().decode_entry(b.into()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("cap"), "{err}");
    }

    #[test]
    fn tampering_is_detected() {
        let codec = envelope();
        let enc = codec
            .encode_entry(&Entry::new(Version(5), &b"payload"[..]))
            .unwrap();
        for i in HEADER_LEN..enc.len() {
            let mut bad = enc.to_vec();
            bad[i] ^= 0x40;
            assert!(matches!(
                codec.decode_entry(bad.into()),
                Err(Error::Corrupt { .. })
            ));
        }
        let truncated = enc.slice(..enc.len() - 1);
        assert!(codec.decode_entry(truncated).is_err());
        assert!(codec.decode_entry(Bytes::new()).is_err());
        let mut flags = enc.to_vec();
        flags[3] = 0x80;
        assert!(codec.decode_entry(flags.into()).is_err());
    }

    #[test]
    fn json_layout_interop() {
        let codec = Codec::from(JsonCodec::new());
        let value = serde_json::json!({"enabled": true, "percent": 25});
        let payload = codec.encode_value(&value).unwrap();
        let stored = codec
            .encode_entry(&Entry {
                version: Version(9),
                stamp_ms: 5,
                payload,
            })
            .unwrap();
        let as_json: serde_json::Value = serde_json::from_slice(&stored).unwrap();
        assert_eq!(as_json["flagConfig"], value);
        assert_eq!(as_json["version"], 9);
        // Integral floats from JavaScript writers are versions too.
        let e = codec
            .decode_entry(Bytes::from_static(
                br#"{"version": 3.0, "flagConfig": [1]}"#,
            ))
            .unwrap();
        assert_eq!(e.version, Version(3));
        assert_eq!(&e.payload[..], b"[1]");
        for bad in [
            &br#"{"flagConfig": 1}"#[..],
            br#"{"version": 1}"#,
            br#"{"flagConfig": 1, "version": -1}"#,
            br#"{"flagConfig": 1, "version": 1.5}"#,
            br#"{"flagConfig": 1, "version": 9007199254740992}"#,
            b"\xff\xfe",
            b"",
        ] {
            assert!(
                matches!(
                    codec.decode_entry(Bytes::copy_from_slice(bad)),
                    Err(Error::Corrupt { .. })
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let too_big = Entry::new(Version(1 << 53), Bytes::from_static(b"1"));
        assert!(matches!(
            codec.encode_entry(&too_big),
            Err(Error::Codec { .. })
        ));
        let not_json = Entry::new(Version(1), Bytes::from_static(b"\x91\x01"));
        assert!(matches!(
            codec.encode_entry(&not_json),
            Err(Error::Codec { .. })
        ));
        let capped = Codec::from(JsonCodec::new().max_size(10));
        assert!(capped
            .decode_entry(Bytes::from_static(br#"{"flagConfig": 1, "version": 1}"#))
            .is_err());
    }

    #[test]
    fn json_events_interop() {
        let codec = Codec::from(JsonCodec::new());
        let ev = codec
            .decode_invalidation(br#"{"flagKey": "checkout", "version": 42}"#)
            .unwrap();
        assert_eq!(ev.target, Target::Key(FlagKey::new("checkout").unwrap()));
        assert_eq!(ev.version, Some(Version(42)));
        assert_eq!(ev.origin, NodeId::UNKNOWN);
        let mine = Invalidation::key(FlagKey::new("k").unwrap())
            .with_version(Version(3))
            .stamped(NodeId(u64::MAX), 7, 1_700_000_000_000);
        let wire = codec.encode_invalidation(&mine).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(v["flagKey"], "k");
        assert_eq!(v["version"], 3);
        assert_eq!(v["origin"], "ffffffffffffffff");
        assert_eq!(codec.decode_invalidation(&wire).unwrap(), mine);
        for ev in [
            Invalidation::tag("team-a"),
            Invalidation::all(),
            Invalidation::key(FlagKey::new("p").unwrap()).purging_shared(),
        ] {
            let wire = codec.encode_invalidation(&ev).unwrap();
            assert_eq!(codec.decode_invalidation(&wire).unwrap(), ev);
        }
        for bad in [
            &br#"{"version": 1}"#[..],
            br#"{"flagKey": "a b"}"#,
            br#"{"flagKey": "a", "all": true}"#,
            br#"{"flagKey": "a", "origin": "zz"}"#,
        ] {
            assert!(codec.decode_invalidation(bad).is_err());
        }
    }

    proptest! {
        #[test]
        fn envelope_round_trip(cfg in config(), version: u64, stamp: u64, threshold in 0usize..4096) {
            let codec = Codec::from(EnvelopeCodec::new().compress_above(threshold));
            let payload = codec.encode_value(&cfg).unwrap();
            let entry = Entry { version: Version(version), stamp_ms: stamp, payload };
            let stored = codec.encode_entry(&entry).unwrap();
            prop_assert_eq!(codec.peek_version(&stored).unwrap(), Version(version));
            let back = codec.decode_entry(stored).unwrap();
            prop_assert_eq!(&back, &entry);
            prop_assert_eq!(codec.decode_value::<FlagConfig>(&back.payload).unwrap(), cfg);
        }

        #[test]
        fn json_round_trip(cfg in config(), version in 0u64..=JSON_MAX_VERSION, stamp: u64, threshold in prop::option::of(0usize..4096)) {
            let codec = Codec::from(JsonCodec::new().compress_above(threshold.unwrap_or(usize::MAX)));
            let payload = codec.encode_value(&cfg).unwrap();
            let entry = Entry { version: Version(version), stamp_ms: stamp, payload };
            let back = codec.decode_entry(codec.encode_entry(&entry).unwrap()).unwrap();
            prop_assert_eq!(back.version, entry.version);
            prop_assert_eq!(codec.decode_value::<FlagConfig>(&back.payload).unwrap(), cfg);
        }

        #[test]
        fn event_round_trip(key in "[a-z0-9._-]{1,40}", version: Option<u64>, origin: u64, seq: u64, at: u64) {
            let codec = envelope();
            let mut ev = Invalidation::key(FlagKey::new(&key).unwrap()).stamped(NodeId(origin), seq, at);
            ev.version = version.map(Version);
            let wire = codec.encode_invalidation(&ev).unwrap();
            prop_assert_eq!(codec.decode_invalidation(&wire).unwrap(), ev);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            for codec in [envelope(), Codec::from(JsonCodec::new())] {
                let _ = codec.decode_entry(Bytes::from(bytes.clone()));
                let _ = codec.peek_version(&bytes);
                let _ = codec.decode_invalidation(&bytes);
                let _ = codec.decode_value::<FlagConfig>(&bytes);
            }
        }

        #[test]
        fn arbitrary_bytes_behind_the_gzip_magic_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut b = GZIP_MAGIC.to_vec();
            b.extend_from_slice(&body);
            let codec = Codec::from(JsonCodec::new());
            let _ = codec.decode_entry(Bytes::from(b.clone()));
            let _ = codec.peek_version(&b);
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_panic(
            body in prop::collection::vec(any::<u8>(), 0..512),
            gzip: bool,
        ) {
            // Valid magic, length and checksum: only the payload is hostile.
            let mut crc = flate2::Crc::new();
            crc.update(&body);
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC);
            b.extend_from_slice(&[FORMAT, if gzip { FLAG_GZIP } else { 0 }]);
            b.extend_from_slice(&[0; 16]);
            b.extend_from_slice(&(body.len() as u32).to_be_bytes());
            b.extend_from_slice(&crc.sum().to_be_bytes());
            b.extend_from_slice(&body);
            let codec = envelope();
            if let Ok(e) = codec.decode_entry(b.into()) {
                let _ = codec.decode_value::<FlagConfig>(&e.payload);
                let _ = codec.decode_value::<serde_json::Value>(&e.payload);
            }
        }
    }
}
