//! Reading what memcached holds at a flag's key as stored — bytes, time to live, and
//! for a chunked value its chunk count and whether the set is whole — for tools that
//! inspect a cache ([`MemcachedStore::raw_entry`]).

use std::time::Duration;

use bytes::Bytes;
use flagcache_core::{FlagKey, FlagStore, RawEntry, Result};

use crate::MemcachedStore;

impl MemcachedStore {
    /// The bytes at `key`'s memcached key, undecoded (`mg <key> v t`), with their time
    /// to live left; for a chunk manifest, the chunk count and whether every chunk is
    /// there with a matching checksum. `None` when the key is absent (or holds only a
    /// recache placeholder). For inspection: reads decode through
    /// [`FlagStore::get`].
    ///
    /// # Errors
    /// `Error::Backend` or `Error::Timeout` when the key's server cannot be asked.
    pub async fn raw_entry(&self, key: &FlagKey) -> Result<Option<RawEntry>> {
        let wire = self.wire_key(key)?;
        let found = self
            .meta()
            .get_with("inspect", &wire, vec!["v".into(), "t".into()])
            .await
            .map_err(|e| e.with_key(key))?;
        let Some(found) = found else {
            return Ok(None);
        };
        let bytes = Bytes::from(found.data.unwrap_or_default());
        if bytes.is_empty() {
            return Ok(None);
        }
        let ttl_left = found
            .ttl_remaining
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs);
        let raw = RawEntry::new(bytes.clone()).with_ttl_left(ttl_left);
        let Ok(entry) = self.codec().decode_entry(bytes) else {
            return Ok(Some(raw));
        };
        match crate::chunks::manifest_count(&entry.payload) {
            Some(count) => {
                let whole = self
                    .assemble(key, &wire, entry)
                    .await
                    .ok()
                    .flatten()
                    .is_some();
                Ok(Some(raw.with_chunks(count, whole)))
            }
            None => Ok(Some(raw)),
        }
    }
}
