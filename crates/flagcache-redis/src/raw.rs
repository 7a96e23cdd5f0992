//! Reading what Redis holds at a flag's key as stored — bytes and time to live — for
//! tools that inspect a cache ([`RedisStore::raw_entry`]).

use std::time::Duration;

use bytes::Bytes;
use flagcache_core::{FlagKey, RawEntry, Result};

use crate::RedisStore;

impl RedisStore {
    /// The bytes at `key`'s Redis key, undecoded, with their time to live left
    /// (`GET`, then `PTTL`); `None` when the key is absent. For inspection: reads
    /// decode through [`FlagStore::get`](flagcache_core::FlagStore::get).
    ///
    /// # Errors
    /// `Error::Backend` or `Error::Timeout` when Redis cannot be asked.
    pub async fn raw_entry(&self, key: &FlagKey) -> Result<Option<RawEntry>> {
        let connection = self.connection();
        let bytes: Option<Vec<u8>> = connection
            .query("inspect", redis::cmd("GET").arg(self.key_arg(key)))
            .await
            .map_err(|e| e.with_key(key))?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let pttl: i64 = connection
            .query("inspect", redis::cmd("PTTL").arg(self.key_arg(key)))
            .await
            .map_err(|e| e.with_key(key))?;
        // -1: no expiry; -2: gone since the GET.
        let ttl_left = u64::try_from(pttl).ok().map(Duration::from_millis);
        Ok(Some(
            RawEntry::new(Bytes::from(bytes)).with_ttl_left(ttl_left),
        ))
    }
}
