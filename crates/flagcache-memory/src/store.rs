//! [`MemoryStore`]: the embedded store — entries in process memory, encoded as a shared
//! store would hold them, version-guarded, with a TTL each.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flagcache_core::{
    ttl_millis, Capabilities, Checked, Codec, Entry, Error, FillRead, FillToken, FlagKey,
    FlagStore, PutOutcome, Result, Version,
};
use moka::ops::compute::Op;
use moka::policy::Expiry;

const BACKEND: &str = "memory";

/// What the store keeps per key: the encoded entry and its TTL.
#[derive(Clone)]
struct Stored {
    bytes: Bytes,
    ttl: Duration,
}

/// Each slot expires its own TTL after its last write.
struct StoredTtl;

impl Expiry<FlagKey, Stored> for StoredTtl {
    fn expire_after_create(&self, _: &FlagKey, slot: &Stored, _: Instant) -> Option<Duration> {
        Some(slot.ttl)
    }
    fn expire_after_update(
        &self,
        _: &FlagKey,
        slot: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.ttl)
    }
}

struct Inner {
    map: moka::sync::Cache<FlagKey, Stored>,
    /// Each fenced key's fence (its token as text), for the fence's own TTL.
    fences: moka::sync::Cache<FlagKey, Stored>,
    /// Held by a fence and by a fill's write, so the write's look at the fence and the
    /// write itself are one step as far as a fence is concerned.
    fencing: std::sync::Mutex<()>,
    codec: Codec,
    max_value_size: Option<usize>,
}

/// A [`FlagStore`] in process memory.
///
/// Cloning is cheap and shares the same entries, so one store can back several
/// `FlagCache`s (simulated replicas) in one process. See the [crate docs](crate) for an
/// example.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.map.entry_count())
            .field("codec", &self.inner.codec)
            .field("max_value_size", &self.inner.max_value_size)
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone, Default)]
pub struct MemoryStoreBuilder {
    codec: Codec,
    max_entries: Option<u64>,
    max_value_size: Option<usize>,
}

impl MemoryStoreBuilder {
    /// The layout entries are kept in (default: the binary envelope).
    #[must_use]
    pub fn codec(mut self, codec: impl Into<Codec>) -> Self {
        self.codec = codec.into();
        self
    }

    /// Evict (least recently used first) beyond this many entries. Unbounded by default:
    /// flag sets are finite, and TTLs bound them in time.
    #[must_use]
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = Some(n);
        self
    }

    /// Refuse encoded entries larger than this with
    /// [`Error::ValueTooLarge`]. Unlimited by default.
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = Some(bytes);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let mut map = moka::sync::Cache::builder().expire_after(StoredTtl);
        if let Some(n) = self.max_entries {
            map = map.max_capacity(n);
        }
        MemoryStore {
            inner: Arc::new(Inner {
                map: map.build(),
                fences: moka::sync::Cache::builder().expire_after(StoredTtl).build(),
                fencing: std::sync::Mutex::new(()),
                codec: self.codec,
                max_value_size: self.max_value_size,
            }),
        }
    }
}

impl MemoryStore {
    /// An unbounded store in the default layout.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// How many entries are held (approximate while writes are in flight; expired
    /// entries may count until they are swept).
    pub fn len(&self) -> u64 {
        self.inner.map.run_pending_tasks();
        self.inner.map.entry_count()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `bytes` under `key` exactly as given, bypassing encoding and the version
    /// guard. For fault-injection tests: plant corrupt or foreign bytes and watch what
    /// the reading side does with them.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero TTL.
    pub fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) -> Result<()> {
        let ttl = Duration::from_millis(ttl_millis(ttl, Duration::from_millis(1))?);
        self.inner.map.insert(key.clone(), Stored { bytes, ttl });
        Ok(())
    }

    fn decode(&self, key: &FlagKey, slot: Stored) -> Result<Entry> {
        self.inner
            .codec
            .decode_entry(slot.bytes)
            .map_err(|e| e.with_key(key))
    }
}

/// The version of `held` when it refuses a write of `entry`: it reads as an entry (the
/// reader's every check: header, length, checksum, payload) at `entry`'s version or
/// higher. Unreadable bytes never guard. The header is compared first, so a write over
/// a lower version costs no decode.
fn guarding_version(codec: &Codec, held: &Bytes, entry: &Entry) -> Option<Version> {
    let claimed = codec.peek_version(held).ok()?;
    if claimed < entry.version {
        return None;
    }
    codec.decode_entry(held.clone()).ok().map(|e| e.version)
}

#[async_trait]
impl FlagStore for MemoryStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_value_size: self.inner.max_value_size,
            ..Default::default()
        }
    }

    fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.inner
            .map
            .get(key)
            .map(|slot| self.decode(key, slot))
            .transpose()
    }

    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        keys.iter()
            .map(|k| self.inner.map.get(k).map(|s| self.decode(k, s)).transpose())
            .collect()
    }

    async fn get_checked(&self, key: &FlagKey, expected: Version) -> Result<Checked> {
        let Some(slot) = self.inner.map.get(key) else {
            return Ok(Checked::Miss);
        };
        // Compare the header first: a mismatch costs no payload decode.
        let current = self
            .inner
            .codec
            .peek_version(&slot.bytes)
            .map_err(|e| e.with_key(key))?;
        if current != expected {
            return Ok(Checked::Stale { current });
        }
        self.decode(key, slot).map(Checked::Hit)
    }

    async fn get_each_for_fill(&self, keys: &[FlagKey]) -> Vec<Result<FillRead>> {
        // Under the fence lock: the entry and the fence are read as of one moment.
        let _fencing = self.fencing();
        keys.iter()
            .map(|k| {
                let token = self.fence_of(k);
                let entry = self
                    .inner
                    .map
                    .get(k)
                    .map(|s| self.decode(k, s))
                    .transpose()?;
                Ok(FillRead { entry, token })
            })
            .collect()
    }

    /// As [`put`](FlagStore::put), under the fence lock, when the key's fence is still
    /// `token`.
    async fn put_fill(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        token: FillToken,
    ) -> Result<PutOutcome> {
        let _fencing = self.fencing();
        let fence = self.fence_of(key);
        if fence.is_some() && fence != token {
            return Ok(PutOutcome::Fenced);
        }
        self.put_unfenced(key, entry, ttl)
    }

    /// Lays a new fence for `ttl` and drops the entry (this store keeps no stale
    /// values), under the fence lock.
    async fn fence(
        &self,
        key: &FlagKey,
        ttl: Duration,
        _keep_stale: Option<Duration>,
    ) -> Result<()> {
        let ttl = Duration::from_millis(ttl_millis(ttl, Duration::from_millis(1))?);
        let token = FillToken::random();
        let _fencing = self.fencing();
        self.inner.fences.insert(
            key.clone(),
            Stored {
                bytes: Bytes::from(token.to_text()),
                ttl,
            },
        );
        self.inner.map.invalidate(key);
        Ok(())
    }

    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.put_unfenced(key, entry, ttl)
    }

    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.inner.map.invalidate(key);
        Ok(())
    }
}

impl MemoryStore {
    fn fencing(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data: a poisoned one is as good.
        self.inner
            .fencing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key's fence, [`FillToken::NONE`] when there is none.
    fn fence_of(&self, key: &FlagKey) -> FillToken {
        self.inner
            .fences
            .get(key)
            .map_or(FillToken::NONE, |f| FillToken::from_text(&f.bytes))
    }

    /// The version-guarded write: under the key's lock when the key is absent, holds a
    /// lower version, or holds bytes a reader rejects (whatever version their header
    /// claims).
    fn put_unfenced(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        let ttl = Duration::from_millis(ttl_millis(ttl, Duration::from_millis(1))?);
        let bytes = self
            .inner
            .codec
            .encode_entry(entry)
            .map_err(|e| e.with_key(key))?;
        if let Some(limit) = self.inner.max_value_size {
            if bytes.len() > limit {
                return Err(Error::ValueTooLarge {
                    key: key.to_string(),
                    size: bytes.len(),
                    limit,
                    backend: BACKEND,
                });
            }
        }
        let codec = &self.inner.codec;
        let mut outcome = PutOutcome::Stored;
        // Atomic per key: moka runs the closure under the key's lock.
        self.inner
            .map
            .entry(key.clone())
            .and_compute_with(|current| {
                let held = current.and_then(|c| guarding_version(codec, &c.value().bytes, entry));
                match held {
                    Some(v) => {
                        outcome = PutOutcome::Superseded { current: v };
                        Op::Nop
                    }
                    // Absent, lower, or unreadable.
                    None => Op::Put(Stored { bytes, ttl }),
                }
            });
        Ok(outcome)
    }
}
