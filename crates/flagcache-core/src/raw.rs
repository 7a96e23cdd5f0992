//! What a store holds at a key, as stored ([`RawEntry`]), and what a reader makes of
//! it ([`EntryReport`]): for tools that inspect a cache, never on the read path.

use std::time::Duration;

use bytes::Bytes;

use crate::{now_ms, Codec, Version, FLAG_GZIP, HEADER_LEN, MAGIC};

/// The bytes a store holds at a flag's key, read without decoding, with what the
/// backend says about them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RawEntry {
    /// The stored bytes.
    pub bytes: Bytes,
    /// The time to live left, when the backend tells (`None`: unknown or no expiry).
    pub ttl_left: Option<Duration>,
    /// For a value split into chunks (memcached): how many, and whether every chunk is
    /// there and their checksum matches.
    pub chunks: Option<(u32, bool)>,
}

impl RawEntry {
    /// Bytes with no more known about them.
    pub fn new(bytes: Bytes) -> Self {
        RawEntry {
            bytes,
            ttl_left: None,
            chunks: None,
        }
    }

    /// With the time to live left.
    #[must_use]
    pub fn with_ttl_left(mut self, ttl_left: Option<Duration>) -> Self {
        self.ttl_left = ttl_left;
        self
    }

    /// With the chunk count of a chunked value and whether the set is whole.
    #[must_use]
    pub fn with_chunks(mut self, count: u32, whole: bool) -> Self {
        self.chunks = Some((count, whole));
        self
    }

    /// What a reader with `codec` makes of these bytes. Never fails: an entry a reader
    /// would refuse is reported with the reason.
    ///
    /// ```
    /// use flagcache::codec::Codec;
    /// use flagcache::store::{Entry, RawEntry};
    /// use flagcache::Version;
    ///
    /// let codec = Codec::default();
    /// let bytes = codec.encode_entry(&Entry::new(Version::new(7), codec.encode_value(&true)?))?;
    /// let report = RawEntry::new(bytes).describe(&codec);
    /// assert_eq!((report.version, report.problem), (Some(Version::new(7)), None));
    /// let report = RawEntry::new("garbage".into()).describe(&codec);
    /// assert!(report.problem.is_some());
    /// # Ok::<(), flagcache::Error>(())
    /// ```
    pub fn describe(&self, codec: &Codec) -> EntryReport {
        let layout = match codec {
            Codec::Json(_) => "json",
            _ => "envelope",
        };
        let compressed = layout == "envelope"
            && self.bytes.starts_with(&MAGIC)
            && self.bytes.get(3).is_some_and(|f| f & FLAG_GZIP != 0);
        let mut report = EntryReport {
            layout,
            stored_size: self.bytes.len(),
            version: None,
            stamp_ms: None,
            payload_size: None,
            compressed,
            ttl_left: self.ttl_left,
            chunks: self.chunks.map(|(n, _)| n),
            checksum_ok: match layout {
                "envelope" => envelope_checksum_ok(&self.bytes),
                _ => None,
            }
            .map(|ok| ok && !matches!(self.chunks, Some((_, false)))),
            problem: None,
        };
        match codec.decode_entry(self.bytes.clone()) {
            Ok(entry) => {
                report.version = Some(entry.version);
                report.stamp_ms = (entry.stamp_ms > 0).then_some(entry.stamp_ms);
                report.payload_size = Some(entry.payload.len());
                if self.chunks.is_some_and(|(_, whole)| !whole) {
                    report.problem =
                        Some("a chunk is missing or its checksum does not match".into());
                }
            }
            Err(e) => {
                report.version = codec.peek_version(&self.bytes).ok();
                report.problem = Some(e.to_string());
            }
        }
        report
    }
}

/// Whether the CRC-32 at offset 24 of an envelope (see the layout in
/// [`Codec`]'s module docs) matches the payload after the header; `None` when the
/// bytes are shorter than the header.
fn envelope_checksum_ok(bytes: &[u8]) -> Option<bool> {
    let want = u32::from_be_bytes(bytes.get(24..HEADER_LEN)?.try_into().ok()?);
    let mut crc = flate2::Crc::new();
    crc.update(bytes.get(HEADER_LEN..)?);
    Some(crc.sum() == want)
}

/// What a reader makes of a [`RawEntry`] ([`RawEntry::describe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryReport {
    /// `envelope` or `json`.
    pub layout: &'static str,
    /// The stored size in bytes (of the manifest, for a chunked value).
    pub stored_size: usize,
    /// The version, when the header or the JSON can be read.
    pub version: Option<Version>,
    /// When the source wrote it (ms since the Unix epoch), when the entry says.
    pub stamp_ms: Option<u64>,
    /// The value's size after decompression, when readable.
    pub payload_size: Option<usize>,
    /// Whether the payload is gzip'd.
    pub compressed: bool,
    /// The time to live left, when the backend tells.
    pub ttl_left: Option<Duration>,
    /// How many chunks a chunked value has.
    pub chunks: Option<u32>,
    /// Whether the envelope's CRC-32 matches its payload (and, for a chunked value,
    /// every chunk is there and the whole value's checksum matches); `None` for the
    /// JSON layout, which carries no checksum, or bytes too short to carry one.
    pub checksum_ok: Option<bool>,
    /// Why a reader would refuse it (`None`: readable, checksum included).
    pub problem: Option<String>,
}

impl EntryReport {
    /// How long ago the source wrote it, when the entry carries a stamp.
    pub fn age(&self) -> Option<Duration> {
        self.stamp_ms
            .map(|s| Duration::from_millis(now_ms().saturating_sub(s)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Entry, JsonCodec};

    fn stored(codec: &Codec, value: &impl serde::Serialize) -> Bytes {
        let payload = codec.encode_value(value).unwrap();
        codec
            .encode_entry(&Entry::new(Version::new(9), payload))
            .unwrap()
    }

    #[test]
    fn a_flipped_payload_byte_fails_the_checksum_and_keeps_its_version() {
        let codec = Codec::default();
        let mut bytes = stored(&codec, &"on").to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        let r = RawEntry::new(bytes.into()).describe(&codec);
        assert_eq!(r.checksum_ok, Some(false));
        assert_eq!(r.version, Some(Version::new(9)));
        assert!(r.problem.as_deref().unwrap().contains("checksum"));
    }

    #[test]
    fn compression_chunks_and_the_json_layout_are_reported() {
        let codec = Codec::default();
        let big = vec!["the same words again"; 500];
        let r = RawEntry::new(stored(&codec, &big))
            .with_chunks(3, false)
            .describe(&codec);
        assert!(r.compressed);
        assert_eq!((r.chunks, r.checksum_ok), (Some(3), Some(false)));
        assert!(r.problem.is_some());
        let json = Codec::from(JsonCodec::default());
        let r = RawEntry::new(stored(&json, &true)).describe(&json);
        assert_eq!(
            (r.layout, r.checksum_ok, r.problem.as_deref()),
            ("json", None, None)
        );
        assert!(r.age().unwrap() < Duration::from_secs(60));
    }
}
