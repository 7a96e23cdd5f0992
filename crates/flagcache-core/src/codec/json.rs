//! [`JsonCodec`]: the interop layout `{"flagConfig": …, "version": N}` of existing
//! services, and their invalidation messages `{"flagKey": "…", "version": N}`.

use bytes::Bytes;

use super::JSON_MAX_VERSION;
use crate::{Entry, Error, FlagKey, Invalidation, NodeId, Result, Target, Version};

/// The JSON interop layout: entries `{"flagConfig": …, "version": N}` (this crate adds
/// `"stampMs"`, which other readers ignore) and events
/// `{"flagKey": "…", "version": N}`.
///
/// ```
/// use flagcache_core::{Codec, Entry, JsonCodec, Version};
///
/// let codec = Codec::from(JsonCodec::new());
/// // Written by another service:
/// let stored = br#"{"flagConfig": {"enabled": true}, "version": 12}"#;
/// let entry = codec.decode_entry(stored.to_vec().into())?;
/// assert_eq!(entry.version, Version::new(12));
/// let value: serde_json::Value = codec.decode_value(&entry.payload)?;
/// assert_eq!(value["enabled"], true);
/// # Ok::<(), flagcache_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonCodec {
    max_size: usize,
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
    version: serde_json::Number,
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

/// Reads a JSON number as a version: an integer, or an integral float (JavaScript
/// writers), below 2^53.
fn json_version(n: &serde_json::Number) -> Result<Version> {
    let v = match (n.as_u64(), n.as_f64()) {
        (Some(v), _) => v,
        (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f <= JSON_MAX_VERSION as f64 => f as u64,
        _ => {
            return Err(Error::corrupt(format!(
                "version {n} is not a valid version"
            )))
        }
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
    /// Default cap on a stored JSON document: 16 MiB.
    pub const DEFAULT_MAX_SIZE: usize = 16 << 20;

    /// The default settings.
    pub const fn new() -> Self {
        JsonCodec {
            max_size: Self::DEFAULT_MAX_SIZE,
        }
    }

    /// Refuse, as corrupt, a stored document larger than `bytes`.
    #[must_use]
    pub const fn max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
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
        Ok(out.into())
    }

    pub(super) fn decode(&self, bytes: &[u8]) -> Result<Entry> {
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
        version: Option<serde_json::Number>,
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
            w.version = Some(json_check_version(v)?.into());
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
        if let Some(n) = w.version {
            ev.version = Some(json_version(&n)?);
        }
        Ok(ev)
    }
}
