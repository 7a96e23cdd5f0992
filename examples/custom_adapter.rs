//! Writing your own adapter: a `FlagStore` over a plain locked map.
//!
//! This is the template to copy. It keeps entries encoded with the store's codec (as a
//! remote backend would), honours TTLs, and applies the version guard under one lock so
//! that `put` is atomic per key; an entry that does not decode never guards; and it
//! keeps fences (leases) under the same lock, so that a fill that read the key before an
//! invalidation cannot write after it. Its test runs the whole conformance suite:
//!
//! ```text
//! cargo test --example custom_adapter --features conformance
//! ```

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use flagcache::store::bytes::Bytes;
use flagcache::{
    codec::Codec,
    store::{
        async_trait, ttl_millis, Capabilities, Entry, FillRead, FillToken, FlagStore, FlagStoreExt,
    },
    FlagKey, PutOutcome, Result, Version,
};

/// Stored bytes and fences, each with its deadline, per key.
#[derive(Debug, Default)]
struct State {
    entries: HashMap<FlagKey, (Bytes, Instant)>,
    fences: HashMap<FlagKey, (FillToken, Instant)>,
}

impl State {
    /// The live bytes under `key`, dropping them if expired.
    fn live(&mut self, key: &FlagKey) -> Option<Bytes> {
        match self.entries.get(key) {
            Some((bytes, deadline)) if *deadline > Instant::now() => Some(bytes.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// The key's live fence, [`FillToken::NONE`] when there is none.
    fn fence(&self, key: &FlagKey) -> FillToken {
        match self.fences.get(key) {
            Some((token, deadline)) if *deadline > Instant::now() => *token,
            _ => FillToken::NONE,
        }
    }
}

/// A store over one locked map.
#[derive(Debug, Default)]
pub struct LockedMapStore {
    state: Mutex<State>,
    codec: Codec,
}

impl LockedMapStore {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Plants raw bytes (used by the conformance suite's corrupt-data test).
    pub fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) {
        self.state()
            .entries
            .insert(key.clone(), (bytes, Instant::now() + ttl));
    }

    /// The version guard, with the lock held: read, compare and write in one step.
    fn put_locked(
        &self,
        state: &mut State,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
    ) -> Result<PutOutcome> {
        let ttl = Duration::from_millis(ttl_millis(ttl, Duration::from_millis(1))?);
        let bytes = self.codec.encode_entry(entry)?;
        // Only an entry a reader would accept guards: bytes that fail any check of the
        // decoder (header, length, checksum) are written over, whatever version their
        // header claims. The header is read first, so a lower version costs no decode.
        let guarding = state
            .live(key)
            .filter(|b| self.codec.peek_version(b).is_ok_and(|v| v >= entry.version))
            .and_then(|b| self.codec.decode_entry(b).ok());
        if let Some(current) = guarding {
            return Ok(PutOutcome::Superseded {
                current: current.version,
            });
        }
        state
            .entries
            .insert(key.clone(), (bytes, Instant::now() + ttl));
        Ok(PutOutcome::Stored)
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
        let live = self.state().live(key);
        live.map(|bytes| self.codec.decode_entry(bytes).map_err(|e| e.with_key(key)))
            .transpose()
    }

    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.put_locked(&mut self.state(), key, entry, ttl)
    }

    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.state().entries.remove(key);
        Ok(())
    }

    // Leases: a fill reads the key's fence with its miss, and writes only while the
    // fence is still that one; an invalidation lays a new fence and drops the entry.

    async fn get_each_for_fill(&self, keys: &[FlagKey]) -> Vec<Result<FillRead>> {
        let mut state = self.state();
        keys.iter()
            .map(|key| {
                let token = state.fence(key);
                let entry = state
                    .live(key)
                    .map(|b| self.codec.decode_entry(b).map_err(|e| e.with_key(key)))
                    .transpose()?;
                Ok(FillRead { entry, token })
            })
            .collect()
    }

    async fn put_fill(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        token: FillToken,
    ) -> Result<PutOutcome> {
        let mut state = self.state();
        let fence = state.fence(key);
        if fence.is_some() && fence != token {
            return Ok(PutOutcome::Fenced);
        }
        self.put_locked(&mut state, key, entry, ttl)
    }

    async fn fence(
        &self,
        key: &FlagKey,
        ttl: Duration,
        _keep_stale: Option<Duration>,
    ) -> Result<()> {
        let mut state = self.state();
        state
            .fences
            .insert(key.clone(), (FillToken::random(), Instant::now() + ttl));
        state.entries.remove(key);
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
