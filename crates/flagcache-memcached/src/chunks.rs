//! Values over the item limit: split into chunks under keys of their version and of
//! their write, with a manifest (count, length, CRC-32) stored at the flag's own key,
//! and read back all or nothing.

use std::time::Duration;

use bytes::Bytes;
use flagcache_core::{Codec, Entry, Error, FlagKey, FlagStore, Result, Version};

use crate::meta::{exptime, Route, WireKey};
use crate::{MemcachedStore, BACKEND};

/// Each chunk starts with the value's version (8 bytes) and its index (4 bytes).
const CHUNK_HEADER: usize = 12;

/// What a chunked value's key holds, as the payload of an envelope carrying the
/// value's version (so the version guard works on it unchanged).
#[derive(Debug, Clone, Copy)]
struct Manifest {
    /// Names this write's chunks: two writers of the same version never share chunk
    /// keys, so a superseded writer cannot overwrite the chunks a manifest names.
    nonce: u64,
    count: u32,
    total: u64,
    crc: u32,
}

const MANIFEST_MAGIC: &[u8; 8] = b"\xF1\xACchunks";

impl Manifest {
    fn to_bytes(self) -> Bytes {
        let mut b = MANIFEST_MAGIC.to_vec();
        b.extend_from_slice(&self.nonce.to_be_bytes());
        b.extend_from_slice(&self.count.to_be_bytes());
        b.extend_from_slice(&self.total.to_be_bytes());
        b.extend_from_slice(&self.crc.to_be_bytes());
        b.into()
    }

    fn parse(payload: &[u8]) -> Option<Self> {
        let rest = payload.strip_prefix(MANIFEST_MAGIC)?;
        if rest.len() != 24 {
            return None;
        }
        let (nonce, rest) = rest.split_at(8);
        let (count, rest) = rest.split_at(4);
        let (total, crc) = rest.split_at(8);
        Some(Manifest {
            nonce: u64::from_be_bytes(nonce.try_into().ok()?),
            count: u32::from_be_bytes(count.try_into().ok()?),
            total: u64::from_be_bytes(total.try_into().ok()?),
            crc: u32::from_be_bytes(crc.try_into().ok()?),
        })
    }
}

/// The chunk count of a chunk manifest's payload; `None` for any other payload.
pub(crate) fn manifest_count(payload: &[u8]) -> Option<u32> {
    Manifest::parse(payload).map(|m| m.count)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// What a chunked write leaves for the version-guarded write of the key itself.
pub(crate) enum ChunkedWrite {
    /// The chunks are stored: this manifest goes at the key.
    Manifest(Bytes),
    /// The key already holds this version or a newer one: no chunk was written.
    Superseded(Version),
}

impl MemcachedStore {
    /// The largest encoded entry accepted: one item, or `max_chunks` of them in the
    /// binary layout (the JSON layout is not chunked).
    pub(crate) fn max_value_size(&self) -> usize {
        match self.codec() {
            Codec::Envelope(_) => self.chunk_capacity() * self.max_chunks(),
            _ => self.item_size_limit(),
        }
    }

    /// Payload bytes per chunk (each chunk carries a 12-byte header).
    fn chunk_capacity(&self) -> usize {
        self.item_size_limit().saturating_sub(CHUNK_HEADER).max(1)
    }

    fn chunk_key(&self, wire: &WireKey, version: Version, nonce: u64, i: u32) -> WireKey {
        WireKey::plain(format!(
            "{}chunk:{:016x}:{:x}:{nonce:016x}:{i}",
            self.internal_prefix(),
            crate::ring::hash(wire.text.as_bytes()),
            version.get()
        ))
    }

    /// Writes `bytes` as chunks under keys of this version (so a newer value never
    /// overwrites the chunks an older manifest names) and returns the manifest to
    /// store at the key itself, under the version guard.
    pub(crate) async fn write_chunks(
        &self,
        key: &FlagKey,
        wire: &WireKey,
        entry: &Entry,
        bytes: &Bytes,
        ttl: Duration,
    ) -> Result<ChunkedWrite> {
        let too_large = || Error::ValueTooLarge {
            key: key.to_string(),
            size: bytes.len(),
            limit: self.max_value_size(),
            backend: BACKEND,
        };
        if !matches!(self.codec(), Codec::Envelope(_)) || bytes.len() > self.max_value_size() {
            return Err(too_large());
        }
        // Only write chunks that a manifest may come to name: not when the stored
        // version already supersedes this one — unless it is this very version marked
        // stale, which this write revalidates (`put` stores the manifest again).
        // Unreadable bytes and incomplete chunk sets supersede nothing.
        if let Some(v) = self.meta().get("put", wire).await? {
            let stale = v.is_stale == Some(true);
            let held = match v.data.as_deref() {
                Some(d) => self.guarding_version(key, wire, d, entry.version).await?,
                None => None,
            };
            if let Some(held) = held {
                if !(stale && held == entry.version) {
                    if stale && v.is_recache_winner == Some(true) {
                        // Won a newer stale entry's token without refreshing it.
                        self.rearm(key, v.cas).await;
                    }
                    return Ok(ChunkedWrite::Superseded(held));
                }
            }
        }
        let pieces: Vec<&[u8]> = bytes.chunks(self.chunk_capacity()).collect();
        let count = u32::try_from(pieces.len()).map_err(|_| too_large())?;
        let nonce = fastrand::u64(..);
        // Chunks outlive their manifest a little, so a read never finds the manifest
        // without them.
        let chunk_exptime = exptime(ttl + Duration::from_secs(60))?;
        for (i, piece) in (0u32..).zip(pieces) {
            let mut value = Vec::with_capacity(CHUNK_HEADER + piece.len());
            value.extend_from_slice(&entry.version.get().to_be_bytes());
            value.extend_from_slice(&i.to_be_bytes());
            value.extend_from_slice(piece);
            let ck = self.chunk_key(wire, entry.version, nonce, i);
            self.meta()
                .raw_set(Route::Key(&ck), &ck, value, chunk_exptime)
                .await?;
        }
        let manifest = Manifest {
            nonce,
            count,
            total: bytes.len() as u64,
            crc: crc32(bytes),
        };
        self.codec()
            .encode_entry(&Entry {
                version: entry.version,
                stamp_ms: entry.stamp_ms,
                payload: manifest.to_bytes(),
            })
            .map(ChunkedWrite::Manifest)
    }

    /// `entry` as read at `key`, or, when it is a manifest, the value its chunks
    /// assemble to.
    pub(crate) async fn assemble(
        &self,
        key: &FlagKey,
        wire: &WireKey,
        entry: Entry,
    ) -> Result<Option<Entry>> {
        match Manifest::parse(&entry.payload) {
            Some(m) => self.read_chunks(key, wire, entry.version, m).await,
            None => Ok(Some(entry)),
        }
    }

    /// Reads a chunked value back, all or nothing: a missing or mismatched chunk, or a
    /// checksum that does not match, is a miss — never a torn value.
    async fn read_chunks(
        &self,
        key: &FlagKey,
        wire: &WireKey,
        version: Version,
        m: Manifest,
    ) -> Result<Option<Entry>> {
        // The manifest is untrusted bytes too: bound it before allocating.
        if m.count as usize > self.max_chunks() || m.total > self.max_value_size() as u64 {
            return Err(Error::corrupt("chunk manifest out of bounds").with_key(key));
        }
        let mut whole = Vec::with_capacity(usize::try_from(m.total).unwrap_or(0));
        for i in 0..m.count {
            let ck = self.chunk_key(wire, version, m.nonce, i);
            let Some(chunk) = self.meta().raw_get(Route::Key(&ck), &ck).await? else {
                tracing::debug!(%key, chunk = i, "chunk missing: a miss");
                return Ok(None);
            };
            let Some((head, body)) = chunk.split_first_chunk::<CHUNK_HEADER>() else {
                return Ok(None);
            };
            let (v, idx) = head.split_at(8);
            if v != version.get().to_be_bytes() || idx != i.to_be_bytes() {
                return Ok(None);
            }
            whole.extend_from_slice(body);
        }
        if whole.len() as u64 != m.total || crc32(&whole) != m.crc {
            return Ok(None);
        }
        let entry = self
            .codec()
            .decode_entry(Bytes::from(whole))
            .map_err(|e| e.with_key(key))?;
        Ok((entry.version == version).then_some(entry))
    }
}
