//! [`MemcachedStore`]: the [`FlagStore`] on memcached's meta protocol — reads (one key,
//! or pipelined per server), the CAS-guarded version write, and deletes.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use flagcache_core::{
    Capabilities, Codec, Entry, Error, FillRead, FillToken, FlagKey, FlagStore, PutOutcome, Result,
    Version,
};

use crate::builder::MemcachedStoreBuilder;
use crate::chunks::ChunkedWrite;
use crate::meta::{self, Meta, WireKey};
use crate::pool::Pool;
use crate::recache::StaleReads;
use crate::BACKEND;

mod leases;

/// A store's settings, resolved at build.
pub(crate) struct Settings {
    /// Entries live at `<namespace>:<flag key>`.
    pub(crate) namespace: String,
    pub(crate) codec: Codec,
    /// The largest item written.
    pub(crate) item_size_limit: usize,
    /// Rounds without progress a version-guarded write tries before giving up.
    pub(crate) cas_attempts: u32,
    /// The most chunks a value is split into.
    pub(crate) max_chunks: usize,
}

#[derive(Debug)]
struct Inner {
    meta: Meta,
    /// `<namespace>:`
    prefix: String,
    codec: Codec,
    item_size_limit: usize,
    cas_attempts: u32,
    cas_retries: AtomicU64,
    max_chunks: usize,
    stale_reads: StaleReads,
}

/// A [`FlagStore`] on memcached's meta protocol. See the [crate docs](crate).
///
/// Cloning is cheap and shares the pools.
#[derive(Clone)]
pub struct MemcachedStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemcachedStore")
            .field(
                "servers",
                &self
                    .inner
                    .meta
                    .pools()
                    .iter()
                    .map(Pool::url)
                    .collect::<Vec<_>>(),
            )
            .field("prefix", &self.inner.prefix)
            .field("cas_retries", &self.cas_retries())
            .finish_non_exhaustive()
    }
}

/// A version-guarded write gave up after this many rounds in which nobody made
/// progress.
#[derive(Debug, thiserror::Error)]
#[error("gave up after {0} CAS conflicts")]
struct Contention(u32);

impl MemcachedStore {
    /// Configures a store.
    pub fn builder() -> MemcachedStoreBuilder {
        MemcachedStoreBuilder::default()
    }

    /// Connects to one server with default settings.
    ///
    /// # Errors
    /// As for [`MemcachedStoreBuilder::build`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder().server(url).build().await
    }

    pub(crate) fn new(meta: Meta, settings: Settings) -> Self {
        MemcachedStore {
            inner: Arc::new(Inner {
                meta,
                prefix: format!("{}:", settings.namespace),
                codec: settings.codec,
                item_size_limit: settings.item_size_limit,
                cas_attempts: settings.cas_attempts,
                cas_retries: AtomicU64::new(0),
                max_chunks: settings.max_chunks,
                stale_reads: StaleReads::default(),
            }),
        }
    }

    /// The largest item this store writes (see
    /// [`MemcachedStoreBuilder::item_size_limit`]).
    pub fn item_size_limit(&self) -> usize {
        self.inner.item_size_limit
    }

    /// How many times version-guarded writes retried after losing a CAS race, in total.
    pub fn cas_retries(&self) -> u64 {
        self.inner.cas_retries.load(Ordering::Relaxed)
    }

    /// The memcached key of a flag, as a client of another language would write it:
    /// `<namespace>:<flag key>`.
    pub fn memcached_key(&self, key: &FlagKey) -> String {
        let mut name = String::with_capacity(self.inner.prefix.len() + key.as_str().len());
        name.push_str(&self.inner.prefix);
        name.push_str(key.as_str());
        name
    }

    /// The prefix of keys that are not flags (`<namespace>!`): no flag key can
    /// produce it, since flags live at `<namespace>:…` and base64 has no `!`.
    pub(crate) fn internal_prefix(&self) -> String {
        let ns = self
            .inner
            .prefix
            .strip_suffix(':')
            .unwrap_or(&self.inner.prefix);
        format!("{ns}!")
    }

    /// The key of a flag as sent (see [`WireKey::encode`]).
    pub(crate) fn wire_key(&self, key: &FlagKey) -> Result<WireKey> {
        Ok(WireKey::encode(self.memcached_key(key), || {
            self.internal_prefix()
        }))
    }

    /// The servers and their connections.
    pub(crate) fn meta(&self) -> &Meta {
        &self.inner.meta
    }

    /// The most chunks a value is split into.
    pub(crate) fn max_chunks(&self) -> usize {
        self.inner.max_chunks
    }

    /// What plain reads of this process found stale, for the recache path.
    pub(crate) fn stale_reads(&self) -> &StaleReads {
        &self.inner.stale_reads
    }

    /// Reads and decodes (and, for a chunked value, assembles) an entry. An entry
    /// marked stale (`md … I`) is a miss unless `stale_ok`. A read that won a stale
    /// entry's recache token (`W`) notes it, so that this process's recache path
    /// refreshes the entry.
    pub(crate) async fn read_entry(&self, key: &FlagKey, stale_ok: bool) -> Result<Option<Entry>> {
        let wire = self.wire_key(key)?;
        let Some(found) = self
            .inner
            .meta
            .get("get", &wire)
            .await
            .map_err(|e| e.with_key(key))?
        else {
            return Ok(None);
        };
        if found.is_stale == Some(true) {
            self.inner.stale_reads.note(&wire, &found);
            if !stale_ok {
                return Ok(None);
            }
        }
        self.entry_from(key, &wire, Bytes::from(found.data.unwrap_or_default()))
            .await
    }

    /// Decodes the bytes read for `key` (assembling a chunked value).
    async fn entry_from(
        &self,
        key: &FlagKey,
        wire: &WireKey,
        data: Bytes,
    ) -> Result<Option<Entry>> {
        if data.is_empty() {
            // A placeholder vivified by a recache (`N`) read: no value yet.
            return Ok(None);
        }
        let entry = self
            .inner
            .codec
            .decode_entry(data)
            .map_err(|e| e.with_key(key))?;
        self.assemble(key, wire, entry).await
    }

    /// The version of `held` (the bytes at `key`) when it refuses a write of
    /// `version`: it reads as an entry a reader accepts (every check of the codec, and
    /// for a chunk manifest its whole chunk set) at `version` or higher. Unreadable bytes
    /// never guard. A chunk manifest that passes its own checks but lost a chunk (an
    /// eviction) guards only against *older* versions: its version is authenticated by
    /// its checksum, so a slow replica's older value must not replace it, while a load
    /// of the same version or newer repairs it. The header is compared first, so a
    /// write over a lower version decodes nothing.
    ///
    /// # Errors
    /// A backend error reading a manifest's chunks: whether they are all there is then
    /// unknown.
    pub(crate) async fn guarding_version(
        &self,
        key: &FlagKey,
        wire: &WireKey,
        held: &[u8],
        version: Version,
    ) -> Result<Option<Version>> {
        let codec = &self.inner.codec;
        if !codec
            .peek_version(held)
            .is_ok_and(|claimed| claimed >= version)
        {
            return Ok(None);
        }
        let Ok(entry) = codec.decode_entry(Bytes::copy_from_slice(held)) else {
            return Ok(None);
        };
        let claimed = entry.version;
        match self.assemble(key, wire, entry).await {
            Ok(Some(readable)) => Ok(Some(readable.version)),
            // A chunk set incomplete (a chunk missing) or unreadable.
            Ok(None) | Err(Error::Corrupt { .. }) => Ok((claimed > version).then_some(claimed)),
            Err(e) => Err(e),
        }
    }

    /// Reads `keys` with one pipelined `mg … k` batch per server (and per key
    /// encoding), answering each key as `get` would: its entry, its miss (a stale
    /// entry included), or its own error. Tokens are left empty: see
    /// `get_each_for_fill`.
    async fn read_each(&self, operation: &'static str, keys: &[FlagKey]) -> Vec<Result<FillRead>> {
        let mut out: Vec<Result<FillRead>> = Vec::with_capacity(keys.len());
        let mut wires: Vec<Option<WireKey>> = Vec::with_capacity(keys.len());
        for k in keys {
            match self.wire_key(k) {
                Ok(w) => {
                    out.push(Ok(FillRead::default()));
                    wires.push(Some(w));
                }
                Err(e) => {
                    out.push(Err(e));
                    wires.push(None);
                }
            }
        }
        let mut groups: std::collections::BTreeMap<(usize, bool), Vec<usize>> =
            std::collections::BTreeMap::new();
        for (i, w) in wires.iter().enumerate() {
            if let Some(w) = w {
                let server = self.inner.meta.server_for(w);
                groups.entry((server, w.base64)).or_default().push(i);
            }
        }
        // The servers are read concurrently: a slow one delays only its own keys'
        // answers being ready, not the others' being asked.
        let reads = groups.into_iter().map(|((_, base64), idx)| {
            let group: Vec<(usize, &WireKey)> = idx
                .iter()
                .filter_map(|&i| wires[i].as_ref().map(|w| (i, w)))
                .collect();
            self.read_server(operation, keys, group, base64)
        });
        for answers in futures_util::future::join_all(reads).await {
            for (i, answer) in answers {
                out[i] = answer;
            }
        }
        out
    }

    /// One server's part of [`MemcachedStore::read_each`]: `group` is (index into
    /// `keys`, wire key) for every key that server holds.
    async fn read_server(
        &self,
        operation: &'static str,
        keys: &[FlagKey],
        group: Vec<(usize, &WireKey)>,
        base64: bool,
    ) -> Vec<(usize, Result<FillRead>)> {
        let Some(&(first, route)) = group.first() else {
            return Vec::new();
        };
        // Each key asked once: a stale key asked twice would win its recache token on
        // the first answer and lose it to the second.
        let mut batch: Vec<String> = group.iter().map(|(_, w)| w.text.clone()).collect();
        batch.sort_unstable();
        batch.dedup();
        let found = match self
            .inner
            .meta
            .get_multi(operation, route, batch, base64)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, key = %keys[first], "a memcached server failed a batch read");
                return group
                    .into_iter()
                    .map(|(i, _)| (i, Err(e.clone().with_key(&keys[i]))))
                    .collect();
            }
        };
        let mut by_key: std::collections::HashMap<Vec<u8>, Bytes> =
            std::collections::HashMap::new();
        for mut v in found {
            let Some(k) = v.key.take() else { continue };
            if v.is_stale == Some(true) {
                // Stale reads as a miss, noted (with a won token) for the recache path.
                if let Some((_, w)) = group.iter().find(|(_, w)| w.text.as_bytes() == k) {
                    self.inner.stale_reads.note(w, &v);
                }
                continue;
            }
            by_key.insert(k, Bytes::from(v.data.unwrap_or_default()));
        }
        let mut answers = Vec::with_capacity(group.len());
        for (i, w) in group {
            let entry = match by_key.get(w.text.as_bytes()) {
                Some(data) => self.entry_from(&keys[i], w, data.clone()).await,
                None => Ok(None),
            };
            let token = FillToken::NONE;
            answers.push((i, entry.map(|entry| FillRead { entry, token })));
        }
        answers
    }
}

#[async_trait]
impl FlagStore for MemcachedStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_value_size: Some(self.max_value_size()),
            ttl_resolution: Duration::from_secs(1),
        }
    }

    fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.read_entry(key, false).await
    }

    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        self.read_each("get", keys)
            .await
            .into_iter()
            .map(|r| r.map(|read| read.entry))
            .collect()
    }

    /// The entries first; then, for the keys that missed (absent, or stale: a fill
    /// will write them), their fences, before their loads start. A key that hit gets
    /// no token, which only makes a write stricter (refused while any fence is up).
    async fn get_each_for_fill(&self, keys: &[FlagKey]) -> Vec<Result<FillRead>> {
        let mut reads = match keys {
            [key] => return vec![self.get_for_fill(key).await],
            _ => self.read_each("get", keys).await,
        };
        let missed: Vec<usize> = reads
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Ok(FillRead { entry: None, .. })))
            .map(|(i, _)| i)
            .collect();
        if !missed.is_empty() {
            for (i, token) in self.fence_tokens(keys, &missed).await {
                if let Some(Ok(read)) = reads.get_mut(i) {
                    read.token = token;
                }
            }
        }
        reads
    }

    /// One `mg` for the entry; for a miss, one more for the fence.
    async fn get_for_fill(&self, key: &FlagKey) -> Result<FillRead> {
        let entry = self.read_entry(key, false).await?;
        let mut token = FillToken::NONE;
        if entry.is_none() {
            if let Some((_, t)) = self
                .fence_tokens(std::slice::from_ref(key), &[0])
                .await
                .pop()
            {
                token = t;
            }
        }
        Ok(FillRead { entry, token })
    }

    async fn fence_token(&self, key: &FlagKey) -> Result<FillToken> {
        let wire = self.wire_key(key)?;
        self.fence_now(&wire).await.map_err(|e| e.with_key(key))
    }

    /// Memcached cannot compare two items in one step: the fence is compared before
    /// and after the version-guarded write, and a write the first look missed a new
    /// fence for is taken back (deleted by its CAS, only if the key still holds it).
    async fn put_fill(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        token: FillToken,
    ) -> Result<PutOutcome> {
        self.put_fill_checked(key, entry, ttl, token).await
    }

    /// The new fence first (`ms`, on the entry's server), then the entry dropped
    /// (`md`) — or with `keep_stale`, marked stale for that long (`md … I T…`), so that
    /// `MemcachedRecache` serves it while one process refreshes it.
    async fn fence(
        &self,
        key: &FlagKey,
        ttl: Duration,
        keep_stale: Option<Duration>,
    ) -> Result<()> {
        self.lay_fence(key, ttl, keep_stale).await
    }

    /// The server that holds `key`: reads of one server's keys share a pipeline.
    fn read_group(&self, key: &FlagKey) -> Option<u64> {
        let wire = self.wire_key(key).ok()?;
        u64::try_from(self.inner.meta.server_for(&wire)).ok()
    }

    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        let exptime = meta::exptime(ttl)?;
        let wire = self.wire_key(key)?;
        let bytes = self
            .inner
            .codec
            .encode_entry(entry)
            .map_err(|e| e.with_key(key))?;
        let bytes = if bytes.len() > self.inner.item_size_limit {
            match self
                .write_chunks(key, &wire, entry, &bytes, ttl)
                .await
                .map_err(|e| e.with_key(key))?
            {
                ChunkedWrite::Manifest(manifest) => manifest,
                ChunkedWrite::Superseded(current) => return Ok(PutOutcome::Superseded { current }),
            }
        } else {
            bytes
        };
        // Only rounds in which nobody made progress use up the budget: among N writers
        // a legitimate one may lose N - 1 races, each to a lower version being stored.
        let mut stalled = 0;
        let mut round = 0u32;
        let mut last_seen: Option<Option<Version>> = None;
        loop {
            if round > 0 {
                self.inner.cas_retries.fetch_add(1, Ordering::Relaxed);
                // The client-side twin of memcached's `cas_badval`.
                metrics::counter!("flagcache_memcached_cas_retries_total").increment(1);
                // Jittered exponential back-off: up to 100 µs · 2^n, capped at 10 ms.
                let cap = 100u64 << stalled.min(7);
                tokio::time::sleep(Duration::from_micros(fastrand::u64(10..=cap.min(10_000))))
                    .await;
            }
            round += 1;
            let current = self
                .inner
                .meta
                .get("put", &wire)
                .await
                .map_err(|e| e.with_key(key))?;
            let seen = current
                .as_ref()
                .map(|v| {
                    v.data
                        .as_deref()
                        .and_then(|d| self.inner.codec.peek_version(d).ok())
                })
                .unwrap_or(None);
            if last_seen.is_some_and(|prev| prev == seen) {
                stalled += 1;
                if stalled >= self.inner.cas_attempts {
                    break;
                }
            }
            last_seen = Some(seen);
            let cas = match &current {
                None => None,
                Some(v) => {
                    let held = match v.data.as_deref() {
                        Some(d) => self
                            .guarding_version(key, &wire, d, entry.version)
                            .await
                            .map_err(|e| e.with_key(key))?,
                        None => None,
                    };
                    if let Some(held) = held {
                        if v.is_stale == Some(true) {
                            if held == entry.version {
                                // The source confirms the stale value: store it again,
                                // which clears the mark (a lost race is fine: someone
                                // else wrote it).
                                if let Some(c) = v.cas {
                                    let _ =
                                        self.inner.meta.set(&wire, &bytes, exptime, Some(c)).await;
                                }
                            } else if v.is_recache_winner == Some(true) {
                                self.rearm(key, v.cas).await;
                            }
                        }
                        return Ok(PutOutcome::Superseded { current: held });
                    }
                    // Lower, unreadable, or a manifest whose chunk set is incomplete:
                    // replace it, if nobody changed it meanwhile.
                    match v.cas {
                        Some(c) => Some(c),
                        None => return Err(Error::corrupt("memcached returned no CAS token")),
                    }
                }
            };
            if self
                .inner
                .meta
                .set(&wire, &bytes, exptime, cas)
                .await
                .map_err(|e| e.with_key(key))?
            {
                return Ok(PutOutcome::Stored);
            }
            tracing::debug!(%key, round, "lost a CAS race; retrying");
        }
        Err(Error::backend(BACKEND, "put", true, Contention(self.inner.cas_attempts)).with_key(key))
    }

    async fn delete(&self, key: &FlagKey) -> Result<()> {
        let wire = self.wire_key(key)?;
        self.inner
            .meta
            .delete(&wire)
            .await
            .map_err(|e| e.with_key(key))
    }
}
