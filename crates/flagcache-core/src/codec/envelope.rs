//! [`EnvelopeCodec`]: the binary layout — a fixed 28-byte header (version at a fixed
//! offset, CRC-32 of the payload), then the value in MessagePack, gzip'd above a threshold.

use bytes::{BufMut, Bytes, BytesMut};

use super::{gzip, FLAG_GZIP, FORMAT, HEADER_LEN, MAGIC, VERSION_OFFSET};
use crate::{Entry, Error, Result, Version};

/// The binary envelope layout: a [`HEADER_LEN`]-byte header (the version big-endian at
/// [`VERSION_OFFSET`]), then the payload.
///
/// ```
/// use flagcache::codec::{Codec, EnvelopeCodec};
/// use flagcache::store::Entry;
/// use flagcache::Version;
///
/// let codec = Codec::from(EnvelopeCodec::new().compress_above(512));
/// let payload = codec.encode_value(&vec!["on"; 400])?;
/// let stored = codec.encode_entry(&Entry::new(Version::new(3), payload.clone()))?;
/// assert!(stored.len() < payload.len()); // gzip'd: it was over 512 bytes
/// let back = codec.decode_entry(stored)?;
/// assert_eq!((back.version, back.payload), (Version::new(3), payload));
/// # Ok::<(), flagcache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeCodec {
    compress_above: usize,
    max_decompressed: usize,
    level: u32,
}

impl Default for EnvelopeCodec {
    fn default() -> Self {
        Self::new()
    }
}

pub(super) struct Header {
    pub(super) version: Version,
    pub(super) stamp_ms: u64,
    pub(super) flags: u8,
}

impl EnvelopeCodec {
    /// Default compression threshold: payloads larger than 1 KiB are gzip'd.
    pub const DEFAULT_COMPRESS_ABOVE: usize = 1024;
    /// Default cap on a decompressed payload: 16 MiB.
    pub const DEFAULT_MAX_DECOMPRESSED: usize = 16 << 20;

    /// The default settings.
    pub const fn new() -> Self {
        EnvelopeCodec {
            compress_above: Self::DEFAULT_COMPRESS_ABOVE,
            max_decompressed: Self::DEFAULT_MAX_DECOMPRESSED,
            level: 6,
        }
    }

    /// Gzip payloads larger than `bytes` (`usize::MAX` turns compression off). Below
    /// about 500 bytes gzip costs more than it saves.
    #[must_use]
    pub const fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = bytes;
        self
    }

    /// Refuse, as corrupt, a payload that decompresses to more than `bytes`.
    #[must_use]
    pub const fn max_decompressed(mut self, bytes: usize) -> Self {
        self.max_decompressed = bytes;
        self
    }

    /// The gzip level, 0 (none) to 9 (best); default 6.
    #[must_use]
    pub const fn level(mut self, level: u32) -> Self {
        self.level = if level > 9 { 9 } else { level };
        self
    }

    #[inline]
    pub(super) fn encode(&self, entry: &Entry) -> Result<Bytes> {
        let raw = &entry.payload[..];
        let gz = gzip::compress(raw, self.compress_above, self.level)?;
        let (flags, body) = match &gz {
            Some(z) => (FLAG_GZIP, &z[..]),
            None => (0, raw),
        };
        let len = u32::try_from(body.len()).map_err(|_| Error::Codec {
            reason: "payload over 4 GiB".into(),
            source: None,
        })?;
        let mut crc = flate2::Crc::new();
        crc.update(body);
        let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
        out.put_slice(&MAGIC);
        out.put_u8(FORMAT);
        out.put_u8(flags);
        out.put_u64(entry.version.get());
        out.put_u64(entry.stamp_ms);
        out.put_u32(len);
        out.put_u32(crc.sum());
        out.put_slice(body);
        Ok(out.freeze())
    }

    #[inline]
    pub(super) fn header(bytes: &[u8]) -> Result<Header> {
        let h = bytes
            .get(..HEADER_LEN)
            .ok_or_else(|| Error::corrupt("shorter than the envelope header"))?;
        if h[..2] != MAGIC {
            return Err(Error::corrupt("not a flagcache envelope (bad magic)"));
        }
        if h[2] != FORMAT {
            return Err(Error::corrupt(format!("unknown envelope format {}", h[2])));
        }
        let flags = h[3];
        if flags & !FLAG_GZIP != 0 {
            return Err(Error::corrupt(format!(
                "unknown envelope flags {flags:#04x}"
            )));
        }
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_be_bytes(b)
        };
        Ok(Header {
            version: Version(be64(VERSION_OFFSET)),
            stamp_ms: be64(12),
            flags,
        })
    }

    #[inline]
    pub(super) fn decode(&self, bytes: Bytes) -> Result<Entry> {
        let header = Self::header(&bytes)?;
        let mut be32 = [0u8; 4];
        be32.copy_from_slice(&bytes[20..24]);
        let len = u32::from_be_bytes(be32) as usize;
        be32.copy_from_slice(&bytes[24..28]);
        let want_crc = u32::from_be_bytes(be32);
        // Advanced, not sliced: a slice of bytes read into a `Vec` would allocate.
        let mut body = bytes;
        bytes::Buf::advance(&mut body, HEADER_LEN);
        if body.len() != len {
            return Err(Error::corrupt(format!(
                "payload is {} bytes, header says {len}",
                body.len()
            )));
        }
        let mut crc = flate2::Crc::new();
        crc.update(&body);
        if crc.sum() != want_crc {
            return Err(Error::corrupt("payload checksum mismatch"));
        }
        let payload = if header.flags & FLAG_GZIP != 0 {
            gzip::decompress(&body, self.max_decompressed)?
        } else {
            body
        };
        Ok(Entry {
            version: header.version,
            stamp_ms: header.stamp_ms,
            payload,
        })
    }
}
