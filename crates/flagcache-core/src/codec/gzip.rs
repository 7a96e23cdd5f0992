//! Gzip for both layouts: compression above a threshold, and capped decompression of
//! untrusted bytes.

use std::io::{Read, Write};

use bytes::Bytes;

use crate::{Error, Result};

/// The first two bytes of every gzip stream (RFC 1952), by which the JSON layout tells
/// a gzip'd document from a plain one (a JSON text cannot begin with byte `0x1F`).
pub const GZIP_MAGIC: [u8; 2] = [0x1F, 0x8B];

/// `raw` gzip'd at `level` when it is longer than `above` and compression makes it
/// smaller; `None` otherwise.
pub(super) fn compress(raw: &[u8], above: usize, level: u32) -> Result<Option<Vec<u8>>> {
    if raw.len() <= above {
        return Ok(None);
    }
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 2),
        flate2::Compression::new(level),
    );
    enc.write_all(raw)
        .and_then(|()| enc.finish())
        .map(|z| (z.len() < raw.len()).then_some(z))
        .map_err(|e| Error::codec("gzip failed", e))
}

/// Decompresses `body`, refusing as [`Error::Corrupt`] a stream that is not gzip or
/// that decompresses to more than `cap` bytes (it stops reading past the cap: a gzip
/// bomb costs `cap` bytes, not its full size).
pub(super) fn decompress(body: &[u8], cap: usize) -> Result<Bytes> {
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(cap));
    flate2::read::GzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| Error::corrupt(format!("gzip payload: {e}")))?;
    if out.len() > cap {
        return Err(Error::corrupt(format!(
            "payload decompresses to more than the {cap}-byte cap"
        )));
    }
    Ok(out.into())
}
