//! [`JsonCodec`]: the interop layout `{"flagConfig": …, "version": N}` of existing
//! services (plain or gzip'd), and their invalidation messages
//! `{"flagKey": "…", "version": N}`.

use bytes::Bytes;

use super::gzip::{self, GZIP_MAGIC};
use super::{EnvelopeCodec, JSON_MAX_VERSION};
use crate::{Entry, Error, FlagKey, Invalidation, NodeId, Result, Target, Version};

/// The JSON interop layout: entries `{"flagConfig": …, "version": N}` (this crate adds
/// `"stampMs"`, which other readers ignore) and events
/// `{"flagKey": "…", "version": N}`.
///
/// # What it reads
/// - A JSON object with a `flagConfig` member (any JSON value) and a `version`; other
///   members are ignored.
/// - The same document gzip'd, told by its first two bytes ([`GZIP_MAGIC`], which no
///   JSON text begins with), as services configured with `compression: gzip` store it.
///   Decompression stops at [`max_size`](JsonCodec::max_size), the envelope's cap by
///   default: a gzip bomb is corrupt, not an out-of-memory.
/// - A version is an integer from 0 to 2^53 − 1 ([`JSON_MAX_VERSION`]), written as a
///   JSON number (an integral float such as `3.0` too) or as a JSON string holding its
///   canonical decimal digits (`"5"`): ASCII digits only, no sign, no leading zero, no
///   spaces, fraction or exponent. Such a string names exactly one integer, and the
///   Redis scripts read it by the same rule, so the server-side version guard and the
///   reader agree on it. Any other version (`"v5"`, `"05"`, `" 5"`, `"5.0"`, `-1`,
///   `1.5`, 2^53) makes the entry corrupt: a miss, and it never guards a write.
///
/// Invalidation messages follow the same version rule.
///
/// # What it writes
/// Plain JSON with a numeric version, gzip'd only when the document is longer than
/// [`compress_above`](JsonCodec::compress_above) (never, by default) and gzip makes it
/// smaller. Messages are always plain JSON.
///
/// ```
/// use flagcache::codec::{Codec, JsonCodec};
/// use flagcache::store::Entry;
/// use flagcache::Version;
///
/// let codec = Codec::from(JsonCodec::new());
/// // Written by another service:
/// let stored = br#"{"flagConfig": {"enabled": true}, "version": 12}"#;
/// let entry = codec.decode_entry(stored.to_vec().into())?;
/// assert_eq!(entry.version, Version::new(12));
/// let value: serde_json::Value = codec.decode_value(&entry.payload)?;
/// assert_eq!(value["enabled"], true);
/// # Ok::<(), flagcache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonCodec {
    max_size: usize,
    compress_above: usize,
    level: u32,
}

impl Default for JsonCodec {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(serde::Deserialize)]
struct JsonEntryIn<'a> {
    #[serde(rename = "flagConfig", borrow)]
    flag_config: &'a serde_json::value::RawValue,
    version: JsonVersion,
    #[serde(rename = "stampMs", default)]
    stamp_ms: u64,
}

#[derive(serde::Serialize)]
struct JsonEntryOut<'a> {
    #[serde(rename = "flagConfig")]
    flag_config: &'a serde_json::value::RawValue,
    version: u64,
    #[serde(rename = "stampMs")]
    stamp_ms: u64,
}

/// A version as the JSON layout carries it: a number, or a string of its digits.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum JsonVersion {
    Number(serde_json::Number),
    Text(String),
}

/// The integer a version string names, when it is canonical decimal digits of at most
/// 16 digits (2^53 - 1 has 16).
fn decimal_version(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.len() <= 16
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

/// Reads a version: an integer, an integral float (JavaScript writers), or a string of
/// canonical decimal digits, below 2^53.
fn json_version(wire: &JsonVersion) -> Result<Version> {
    let v = match wire {
        JsonVersion::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Some(v),
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f <= JSON_MAX_VERSION as f64 => {
                Some(f as u64)
            }
            _ => None,
        },
        JsonVersion::Text(t) => decimal_version(t),
    };
    let Some(v) = v else {
        let shown = match wire {
            JsonVersion::Number(n) => n.to_string(),
            JsonVersion::Text(t) => format!("{t:?}"),
        };
        return Err(Error::corrupt(format!(
            "version {shown} is not a valid version"
        )));
    };
    if v > JSON_MAX_VERSION {
        return Err(Error::corrupt(format!("version {v} is above 2^53 - 1")));
    }
    Ok(Version(v))
}

fn json_check_version(v: Version) -> Result<u64> {
    if v.get() > JSON_MAX_VERSION {
        return Err(Error::Codec {
            reason: format!("version {v} does not fit the JSON layout (max 2^53 - 1)").into(),
            source: None,
        });
    }
    Ok(v.get())
}

impl JsonCodec {
    /// Default cap on a stored JSON document, gzip'd or once decompressed: 16 MiB, the
    /// envelope's decompression cap.
    pub const DEFAULT_MAX_SIZE: usize = EnvelopeCodec::DEFAULT_MAX_DECOMPRESSED;

    /// The default settings: documents written plain, read plain or gzip'd.
    pub const fn new() -> Self {
        JsonCodec {
            max_size: Self::DEFAULT_MAX_SIZE,
            compress_above: usize::MAX,
            level: 6,
        }
    }

    /// Refuse, as corrupt, a stored document larger than `bytes`, as stored or once
    /// decompressed (decompression stops there).
    #[must_use]
    pub const fn max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// Gzip stored documents longer than `bytes` (default `usize::MAX`: never). Turn it
    /// on only when every reader of the keys reads gzip'd JSON (this crate does; the
    /// services of the reference articles with `compression: gzip` do). Below about
    /// 500 bytes gzip costs more than it saves.
    ///
    /// On Redis, the `put` script cannot decompress, so a write over a gzip'd entry
    /// takes two more round trips: the client reads the entry, compares versions, and
    /// deletes it (only if unchanged) when it is older, before writing.
    ///
    /// ```
    /// use flagcache::codec::{Codec, JsonCodec, GZIP_MAGIC};
    /// use flagcache::store::Entry;
    /// use flagcache::Version;
    ///
    /// let codec = Codec::from(JsonCodec::new().compress_above(512));
    /// let payload = codec.encode_value(&vec!["variant-a"; 100])?;
    /// let stored = codec.encode_entry(&Entry::new(Version::new(4), payload.clone()))?;
    /// assert_eq!(stored[..2], GZIP_MAGIC);
    /// assert_eq!(codec.decode_entry(stored)?.payload, payload);
    /// # Ok::<(), flagcache::Error>(())
    /// ```
    #[must_use]
    pub const fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = bytes;
        self
    }

    pub(super) fn encode(&self, entry: &Entry) -> Result<Bytes> {
        let version = json_check_version(entry.version)?;
        let text = std::str::from_utf8(&entry.payload)
            .map_err(|e| Error::codec("JSON layout payload is not UTF-8", e))?;
        let raw: &serde_json::value::RawValue = serde_json::from_str(text)
            .map_err(|e| Error::codec("JSON layout payload is not a JSON value", e))?;
        let out = serde_json::to_vec(&JsonEntryOut {
            flag_config: raw,
            version,
            stamp_ms: entry.stamp_ms,
        })
        .map_err(|e| Error::codec("JSON serialization failed", e))?;
        match gzip::compress(&out, self.compress_above, self.level)? {
            Some(z) => Ok(z.into()),
            None => Ok(out.into()),
        }
    }

    pub(super) fn decode(&self, bytes: &[u8]) -> Result<Entry> {
        if bytes.starts_with(&GZIP_MAGIC) && bytes.len() <= self.max_size {
            return self.decode_plain(&gzip::decompress(bytes, self.max_size)?);
        }
        self.decode_plain(bytes)
    }

    fn decode_plain(&self, bytes: &[u8]) -> Result<Entry> {
        if bytes.len() > self.max_size {
            return Err(Error::corrupt(format!(
                "JSON document of {} bytes is over the {}-byte cap",
                bytes.len(),
                self.max_size
            )));
        }
        let wire: JsonEntryIn<'_> = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("JSON layout entry: {e}")))?;
        Ok(Entry {
            version: json_version(&wire.version)?,
            stamp_ms: wire.stamp_ms,
            payload: Bytes::copy_from_slice(wire.flag_config.get().as_bytes()),
        })
    }
}

pub(super) mod json_event {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Default)]
    struct Wire {
        #[serde(rename = "flagKey", default, skip_serializing_if = "Option::is_none")]
        flag_key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        all: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<JsonVersion>,
        /// Hex, so that JavaScript readers do not round it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        #[serde(rename = "sentAtMs", default, skip_serializing_if = "is_zero")]
        sent_at_ms: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        purge: bool,
    }

    fn is_zero(v: &u64) -> bool {
        *v == 0
    }

    pub(in crate::codec) fn encode(ev: &Invalidation) -> Result<Bytes> {
        let mut w = Wire::default();
        match &ev.target {
            Target::Key(k) => w.flag_key = Some(k.to_string()),
            Target::Tag(t) => w.tag = Some(t.clone()),
            Target::All => w.all = true,
        }
        if let Some(v) = ev.version {
            w.version = Some(JsonVersion::Number(json_check_version(v)?.into()));
        }
        if ev.origin != NodeId::UNKNOWN {
            w.origin = Some(ev.origin.to_string());
        }
        w.seq = ev.seq;
        w.sent_at_ms = ev.sent_at_ms;
        w.purge = ev.purge_shared;
        serde_json::to_vec(&w)
            .map(Bytes::from)
            .map_err(|e| Error::codec("JSON serialization failed", e))
    }

    /// The members that make a JSON object an invalidation, whatever their values.
    #[derive(serde::Deserialize)]
    struct Claim {
        #[serde(rename = "flagKey")]
        flag_key: Option<serde::de::IgnoredAny>,
        tag: Option<serde::de::IgnoredAny>,
        all: Option<serde::de::IgnoredAny>,
    }

    pub(in crate::codec) fn claims(bytes: &[u8]) -> bool {
        serde_json::from_slice::<Claim>(bytes)
            .is_ok_and(|c| c.flag_key.is_some() || c.tag.is_some() || c.all.is_some())
    }

    pub(in crate::codec) fn decode(bytes: &[u8]) -> Result<Invalidation> {
        let w: Wire = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("JSON invalidation event: {e}")))?;
        let target = match (w.flag_key, w.tag, w.all) {
            (Some(k), None, false) => Target::Key(FlagKey::new(k)?),
            (None, Some(t), false) => Target::Tag(t),
            (None, None, true) => Target::All,
            _ => {
                return Err(Error::corrupt(
                    "JSON invalidation event needs exactly one of flagKey, tag, all",
                ))
            }
        };
        let origin = match w.origin {
            None => NodeId::UNKNOWN,
            Some(hex) => u64::from_str_radix(&hex, 16)
                .map(NodeId)
                .map_err(|_| Error::corrupt(format!("origin {hex:?} is not a hex node id")))?,
        };
        let mut ev = Invalidation {
            target,
            version: None,
            origin,
            seq: w.seq,
            sent_at_ms: w.sent_at_ms,
            purge_shared: w.purge,
        };
        if let Some(v) = &w.version {
            ev.version = Some(json_version(v)?);
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::{Codec, GZIP_MAGIC, JSON_MAX_VERSION};
    use super::*;

    fn gzipped(doc: &[u8]) -> Bytes {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(doc).unwrap();
        enc.finish().unwrap().into()
    }

    #[test]
    fn json_layout_reads_gzipped_documents() {
        let codec = Codec::from(JsonCodec::new());
        let e = codec
            .decode_entry(gzipped(br#"{"flagConfig": {"a": 1}, "version": 7}"#))
            .unwrap();
        assert_eq!(
            (e.version, &e.payload[..]),
            (Version(7), &br#"{"a": 1}"#[..])
        );
        assert_eq!(
            codec
                .peek_version(&gzipped(br#"{"flagConfig": 1, "version": "8"}"#))
                .unwrap(),
            Version(8)
        );
        // Not gzip behind the magic, gzip of something else, a cut stream: corrupt.
        let cut = gzipped(br#"{"flagConfig": 1, "version": 1}"#);
        for bad in [
            Bytes::from_static(b"\x1f\x8b\x08\x00garbage"),
            gzipped(b"not json"),
            cut.slice(..cut.len() - 4),
        ] {
            assert!(
                matches!(codec.decode_entry(bad.clone()), Err(Error::Corrupt { .. })),
                "{bad:?}"
            );
        }
        // Decompression stops at the cap: 1 MiB of JSON whitespace against 64 KiB.
        let mut big = br#"{"flagConfig": 1, "version": 1"#.to_vec();
        big.resize(1 << 20, b' ');
        big.push(b'}');
        let bomb = gzipped(&big);
        assert!(bomb.len() < 64 << 10);
        let capped = Codec::from(JsonCodec::new().max_size(64 << 10));
        let err = capped.decode_entry(bomb.clone()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("cap"), "{err}");
        assert_eq!(codec.decode_entry(bomb).unwrap().version, Version(1));
    }

    #[test]
    fn json_layout_writes_gzip_above_its_threshold() {
        let codec = Codec::from(JsonCodec::new().compress_above(256));
        let small = Entry::new(Version(2), Bytes::from_static(br#"{"on": true}"#));
        let plain = codec.encode_entry(&small).unwrap();
        assert_eq!(plain[0], b'{');
        let big_value: Vec<String> = (0..100).map(|i| format!("rule-{}", i % 7)).collect();
        let big = Entry::new(Version(3), codec.encode_value(&big_value).unwrap());
        let stored = codec.encode_entry(&big).unwrap();
        assert_eq!(stored[..2], GZIP_MAGIC);
        assert!(stored.len() < big.payload.len() / 2, "{}", stored.len());
        let back = codec.decode_entry(stored).unwrap();
        assert_eq!(back.version, Version(3));
        assert_eq!(
            codec.decode_value::<Vec<String>>(&back.payload).unwrap(),
            big_value
        );
        // The default never compresses.
        let default = Codec::from(JsonCodec::new());
        assert_eq!(default.encode_entry(&big).unwrap()[0], b'{');
    }

    #[test]
    fn json_versions_as_strings_follow_one_rule() {
        let codec = Codec::from(JsonCodec::new());
        let version_of = |v: &str| {
            let doc = format!(r#"{{"flagConfig": 1, "version": {v}}}"#);
            codec
                .decode_entry(Bytes::from(doc))
                .map(|e| e.version.get())
        };
        for (text, want) in [
            (r#""0""#, 0),
            (r#""5""#, 5),
            (r#""9007199254740991""#, JSON_MAX_VERSION),
        ] {
            assert_eq!(version_of(text).unwrap(), want, "{text}");
        }
        for text in [
            r#""""#,
            r#""05""#,
            r#""00""#,
            r#""+5""#,
            r#""-5""#,
            r#"" 5""#,
            r#""5 ""#,
            r#""5.0""#,
            r#""1e3""#,
            r#""v5""#,
            r#""0x10""#,
            r#""9007199254740992""#,
            r#""99999999999999999999""#,
            r#""５""#,
        ] {
            assert!(
                matches!(version_of(text), Err(Error::Corrupt { .. })),
                "{text} read as a version"
            );
        }
        let ev = codec
            .decode_invalidation(br#"{"flagKey": "k", "version": "42"}"#)
            .unwrap();
        assert_eq!(ev.version, Some(Version(42)));
        assert!(codec
            .decode_invalidation(br#"{"flagKey": "k", "version": "v42"}"#)
            .is_err());
        // What this crate writes carries numbers.
        let wire = codec
            .encode_invalidation(&Invalidation::all().with_version(Version(3)))
            .unwrap();
        assert!(std::str::from_utf8(&wire)
            .unwrap()
            .contains(r#""version":3"#));
    }
}
