//! Writing your own adapter: a `FlagStore` over a plain locked map.
//!
//! This is the template to copy. It keeps entries encoded with the store's codec (as a
//! remote backend would), honours TTLs, and applies the version guard under one lock so
//! that `put` is atomic per key; an entry that does not decode never guards. Its test runs the whole conformance suite:
//!
//! ```text
//! cargo test --example custom_adapter --features conformance
//! ```

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use flagcache::bytes::Bytes;
use flagcache::{
    async_trait, ttl_millis, Capabilities, Codec, Entry, FlagKey, FlagStore, FlagStoreExt,
    PutOutcome, Result, Version,
};

/// Stored bytes and their deadline, per key.
#[derive(Debug, Default)]
pub struct LockedMapStore {
    map: Mutex<HashMap<FlagKey, (Bytes, Instant)>>,
    codec: Codec,
}

impl LockedMapStore {
    fn map(&self) -> MutexGuard<'_, HashMap<FlagKey, (Bytes, Instant)>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live bytes under `key`, dropping them if expired.
    fn live(&self, key: &FlagKey) -> Option<Bytes> {
        let mut map = self.map();
        match map.get(key) {
            Some((bytes, deadline)) if *deadline > Instant::now() => Some(bytes.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Plants raw bytes (used by the conformance suite's corrupt-data test).
    pub fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) {
        self.map()
            .insert(key.clone(), (bytes, Instant::now() + ttl));
    }
}

#[async_trait]
impl FlagStore for LockedMapStore {
    fn name(&self) -> &'static str {
        "locked-map"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn codec(&self) -> &Codec {
        &self.codec
    }

    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.live(key)
            .map(|bytes| self.codec.decode_entry(bytes).map_err(|e| e.with_key(key)))
            .transpose()
    }

    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        let ttl = Duration::from_millis(ttl_millis(ttl, Duration::from_millis(1))?);
        let bytes = self.codec.encode_entry(entry)?;
        let now = Instant::now();
        // Read, compare and write under one lock: that is what makes the guard atomic.
        let mut map = self.map();
        let held = map
            .get(key)
            .filter(|(_, deadline)| *deadline > now)
            .map(|(b, _)| b.clone());
        // Only an entry a reader would accept guards: bytes that fail any check of the
        // decoder (header, length, checksum) are written over, whatever version their
        // header claims. The header is read first, so a lower version costs no decode.
        let guarding = held
            .filter(|b| self.codec.peek_version(b).is_ok_and(|v| v >= entry.version))
            .and_then(|b| self.codec.decode_entry(b).ok());
        if let Some(current) = guarding {
            return Ok(PutOutcome::Superseded {
                current: current.version,
            });
        }
        map.insert(key.clone(), (bytes, now + ttl));
        Ok(PutOutcome::Stored)
    }

    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.map().remove(key);
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let store = LockedMapStore::default();
    let key = FlagKey::new("new-checkout")?;
    store
        .put_value(&key, &true, Version::new(1), Duration::from_secs(30))
        .await?;
    let value: Option<(bool, Version)> = store.get_value(&key).await?;
    println!("{key} = {value:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagcache::conformance::{self, RawAccess};
    use std::sync::Arc;

    struct Raw(Arc<LockedMapStore>);

    #[async_trait]
    impl RawAccess for Raw {
        async fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) -> Result<()> {
            self.0.write_raw(key, bytes, ttl);
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite() {
        let store = Arc::new(LockedMapStore::default());
        conformance::run_store_suite(store.clone(), &Raw(store)).await;
    }
}
