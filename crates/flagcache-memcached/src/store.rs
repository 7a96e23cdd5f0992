use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_memcached::{MetaProtocol, MetaValue, Status};
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use flagcache_core::{
    now_ms, ttl_millis, Capabilities, Codec, Entry, Error, FlagKey, FlagStore, PutOutcome, Result,
};

use crate::pool::Pool;
use crate::ring::Ring;
use crate::BACKEND;

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

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// One meta command in flight on a borrowed connection.
type MetaCall<'c, R> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = std::result::Result<R, async_memcached::Error>>
            + Send
            + 'c,
    >,
>;

/// A decimal number as memcached stores counters (`ma`) and as the log keeps its epoch.
pub(crate) fn parse_number(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// Which server a raw command goes to.
#[derive(Clone, Copy)]
pub(crate) enum Route<'a> {
    /// The one the ring assigns to this key.
    Key(&'a WireKey),
    /// The first server given (where the invalidation log lives).
    First,
}

/// A chunked write found a version at least as new already stored (carried through
/// `write_chunks`' error path, turned back into `PutOutcome::Superseded`).
#[derive(Debug, thiserror::Error)]
#[error("superseded by {0}")]
struct Superseded(flagcache_core::Version);

impl Superseded {
    fn into_error(self) -> Error {
        Error::backend(BACKEND, "put", false, self)
    }

    fn from_error(e: &Error) -> Option<flagcache_core::Version> {
        match e {
            Error::Backend { source, .. } => source.downcast_ref::<Superseded>().map(|s| s.0),
            _ => None,
        }
    }
}

/// memcached's own limits.
const MAX_KEY: usize = 250;
const THIRTY_DAYS_SECS: u64 = 30 * 24 * 3600;

/// Converts an async-memcached error: connection and I/O failures are transient.
fn backend_error(operation: &'static str, e: async_memcached::Error) -> Error {
    let transient = matches!(
        e,
        async_memcached::Error::Connect(_)
            | async_memcached::Error::Io(_)
            | async_memcached::Error::ConnectionClosed
    );
    Error::backend(BACKEND, operation, transient, Wrapped(e.to_string()))
}

/// How long a plain read's finding (stale, token won) waits for the recache path,
/// which in `FlagCache` runs right after it.
const STALE_READ_KEPT_FOR: Duration = Duration::from_secs(2);

/// A plain read found an entry stale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StaleRead {
    at: std::time::Instant,
    /// It won the entry's recache token.
    pub won: bool,
    /// The stale entry's CAS.
    pub cas: Option<u64>,
}

/// The operation name of `ma`, which is never retried.
const RAW_INCR: &str = "raw incr";

/// How one attempt at a meta command failed.
enum Failed {
    /// An I/O error on a connection taken from the idle pool: worth one retry.
    OnIdleConnection(Error),
    Other(Error),
}

impl Failed {
    fn into_error(self) -> Error {
        match self {
            Failed::OnIdleConnection(e) | Failed::Other(e) => e,
        }
    }
}

/// async-memcached's error, kept as text (its type is not `Sync`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Wrapped(String);

#[derive(Debug, thiserror::Error)]
#[error("gave up after {0} CAS conflicts")]
struct Contention(u32);

/// Configures a [`MemcachedStore`].
#[derive(Debug, Clone)]
pub struct MemcachedStoreBuilder {
    servers: Vec<String>,
    namespace: String,
    codec: Codec,
    pool_size: usize,
    /// `None`: read from the servers at build.
    item_size_limit: Option<usize>,
    cas_attempts: u32,
    timeout: Duration,
    max_chunks: usize,
}

impl Default for MemcachedStoreBuilder {
    fn default() -> Self {
        MemcachedStoreBuilder {
            servers: vec!["tcp://127.0.0.1:11211".to_string()],
            namespace: "flags".to_string(),
            codec: Codec::default(),
            pool_size: 16,
            item_size_limit: None,
            cas_attempts: 16,
            timeout: Duration::from_millis(500),
            max_chunks: 16,
        }
    }
}

impl MemcachedStoreBuilder {
    /// One server, `tcp://host:port`.
    #[must_use]
    pub fn server(self, url: impl Into<String>) -> Self {
        self.servers([url])
    }

    /// Several servers, spread by a consistent-hash ring.
    #[must_use]
    pub fn servers<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> Self {
        self.servers = urls.into_iter().map(Into::into).collect();
        self
    }

    /// The key prefix: entries live at `<namespace>:<flag key>` (default `flags`).
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The stored layout (default: the binary envelope).
    #[must_use]
    pub fn codec(mut self, codec: impl Into<Codec>) -> Self {
        self.codec = codec.into();
        self
    }

    /// Connections per server (default 16).
    #[must_use]
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// The largest item to write. By default it is read from the servers at build
    /// (`stats settings`, `item_size_max`: the smallest over the servers, less 512
    /// bytes of item overhead), or 1 MiB less that overhead — memcached's default
    /// `-I 1m` — when no server tells. Larger entries are chunked (binary layout) or
    /// refused with `Error::ValueTooLarge`.
    #[must_use]
    pub fn item_size_limit(mut self, bytes: usize) -> Self {
        self.item_size_limit = Some(bytes);
        self
    }

    /// How many times a version-guarded write retries after losing a CAS race before
    /// giving up with a transient error (default 16).
    #[must_use]
    pub fn cas_attempts(mut self, n: u32) -> Self {
        self.cas_attempts = n.max(1);
        self
    }

    /// Values over the item limit are split into at most this many chunks (default 16,
    /// so 16 MiB with the default limit); larger ones are refused with
    /// `Error::ValueTooLarge`. 1 turns chunking off.
    #[must_use]
    pub fn max_chunks(mut self, n: usize) -> Self {
        self.max_chunks = n.max(1);
        self
    }

    /// The time limit of each call, connecting included (default 500 ms). A connection
    /// that timed out is dropped, never reused.
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit.max(Duration::from_millis(1));
        self
    }

    /// Connects to every server once: to fail early when none can be reached (a wrong
    /// address), and to read each one's item size limit. Servers that are down are
    /// kept in the ring — their keys miss until they come back — and logged.
    ///
    /// # Errors
    /// A transient `Error::Backend` when no server can be reached;
    /// `Error::InvalidArgument` with no servers.
    pub async fn build(self) -> Result<MemcachedStore> {
        if self.servers.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one memcached server is required".into(),
            ));
        }
        let pools: Vec<Pool> = self
            .servers
            .iter()
            .map(|u| Pool::new(u.clone(), self.pool_size))
            .collect();
        // Every server probed at once: servers that are down cost one timeout in all,
        // not one each.
        let want_limit = self.item_size_limit.is_none();
        let probes = pools.iter().map(|pool| async move {
            match tokio::time::timeout(self.timeout, pool.get()).await {
                Ok(Ok(lease)) => {
                    lease.give_back();
                    let limit = if want_limit {
                        item_size_max(pool.url(), self.timeout).await
                    } else {
                        None
                    };
                    Ok(limit)
                }
                Ok(Err(e)) => {
                    tracing::warn!(server = pool.url(), error = %e,
                        "memcached server unreachable at start; its keys miss until it is back");
                    Err(backend_error("connect", e))
                }
                Err(_) => {
                    tracing::warn!(
                        server = pool.url(),
                        "memcached server did not answer at start; its keys miss until it is back"
                    );
                    Err(Error::Timeout {
                        backend: BACKEND,
                        operation: "connect",
                        after: self.timeout,
                    })
                }
            }
        });
        let mut reachable = 0;
        let mut last_error = None;
        let mut server_limit: Option<usize> = None;
        for probe in futures_util::future::join_all(probes).await {
            match probe {
                Ok(limit) => {
                    reachable += 1;
                    if let Some(max) = limit {
                        server_limit = Some(server_limit.map_or(max, |m| m.min(max)));
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
        if reachable == 0 {
            return Err(last_error.unwrap_or(Error::Closed("memcached servers")));
        }
        let item_size_limit = self
            .item_size_limit
            .unwrap_or_else(|| server_limit.unwrap_or(DEFAULT_ITEM_SIZE_MAX) - ITEM_OVERHEAD);
        Ok(MemcachedStore {
            inner: Arc::new(Inner {
                ring: Ring::new(&self.servers),
                pools,
                prefix: format!("{}:", self.namespace),
                codec: self.codec,
                item_size_limit,
                cas_attempts: self.cas_attempts,
                cas_retries: AtomicU64::new(0),
                timeout: self.timeout,
                max_chunks: self.max_chunks,
                stale_reads: std::sync::Mutex::default(),
            }),
        })
    }
}

/// memcached's default largest item (`-I 1m`).
const DEFAULT_ITEM_SIZE_MAX: usize = 1 << 20;
/// Room left in an item for memcached's own header and the key.
const ITEM_OVERHEAD: usize = 512;

/// The server's largest item (`stats settings` → `item_size_max`), over a short-lived
/// plain connection; `None` when the server does not say (or is not on TCP).
async fn item_size_max(url: &str, limit: Duration) -> Option<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.strip_prefix("tcp://").unwrap_or(url);
    if addr.contains("://") {
        return None;
    }
    let query = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(b"stats settings\r\n").await.ok()?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        // END closes the listing; a proxy that does not know the command says ERROR.
        while !reply.ends_with(b"END\r\n") && !reply.ends_with(b"ERROR\r\n") {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 || reply.len() > 64 << 10 {
                return None;
            }
            reply.extend_from_slice(chunk.get(..n)?);
        }
        parse_item_size_max(&reply)
    };
    tokio::time::timeout(limit, query).await.ok().flatten()
}

fn parse_item_size_max(reply: &[u8]) -> Option<usize> {
    std::str::from_utf8(reply)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("STAT item_size_max ")?.trim().parse().ok())
        .filter(|&n: &usize| n > ITEM_OVERHEAD)
}

#[derive(Debug)]
struct Inner {
    ring: Ring,
    pools: Vec<Pool>,
    prefix: String,
    codec: Codec,
    item_size_limit: usize,
    cas_attempts: u32,
    cas_retries: AtomicU64,
    timeout: Duration,
    max_chunks: usize,
    /// Entries a plain read of this process just found stale — and whether it won
    /// their recache token (memcached hands it to the first reader of a stale item,
    /// whatever the command) — for this process's recache path, which runs next.
    stale_reads: std::sync::Mutex<std::collections::HashMap<String, StaleRead>>,
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
                &self.inner.pools.iter().map(Pool::url).collect::<Vec<_>>(),
            )
            .field("prefix", &self.inner.prefix)
            .field("cas_retries", &self.cas_retries())
            .finish_non_exhaustive()
    }
}

/// A key as sent: plain when it is printable ASCII, else base64 with the `b` flag.
pub(crate) struct WireKey {
    text: String,
    base64: bool,
}

impl MemcachedStore {
    /// Reads and decodes (and, for a chunked value, assembles) an entry. An entry
    /// marked stale (`md … I`) is a miss unless `stale_ok`. A read that won a stale
    /// entry's recache token (`W`) notes it, so that this process's recache path
    /// refreshes the entry.
    pub(crate) async fn read_entry(&self, key: &FlagKey, stale_ok: bool) -> Result<Option<Entry>> {
        let wire = self.wire_key(key)?;
        let Some(found) = self.read(&wire).await.map_err(|e| e.with_key(key))? else {
            return Ok(None);
        };
        if found.is_stale == Some(true) {
            self.note_stale_read(&wire, &found);
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
        match Manifest::parse(&entry.payload) {
            Some(m) => self.read_chunks(key, wire, entry.version, m).await,
            None => Ok(Some(entry)),
        }
    }

    /// Reads `keys` with one pipelined `mg … k` batch per server (and per key
    /// encoding), answering each key as `get` would: its entry, its miss (a stale
    /// entry included), or its own error.
    async fn read_each(
        &self,
        operation: &'static str,
        keys: &[FlagKey],
    ) -> Vec<Result<Option<Entry>>> {
        let mut out: Vec<Result<Option<Entry>>> = Vec::with_capacity(keys.len());
        let mut wires: Vec<Option<WireKey>> = Vec::with_capacity(keys.len());
        for k in keys {
            match self.wire_key(k) {
                Ok(w) => {
                    out.push(Ok(None));
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
                let server = self.inner.ring.server_for(w.text.as_bytes());
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
    ) -> Vec<(usize, Result<Option<Entry>>)> {
        let Some(&(first, route)) = group.first() else {
            return Vec::new();
        };
        // Each key asked once: a stale key asked twice would win its recache token on
        // the first answer and lose it to the second.
        let mut batch: Vec<String> = group.iter().map(|(_, w)| w.text.clone()).collect();
        batch.sort_unstable();
        batch.dedup();
        let flags: &'static [&'static str] = if base64 {
            &["v", "c", "b"]
        } else {
            &["v", "c"]
        };
        let found = match self
            .meta(operation, route, move |c| {
                let batch = batch.clone();
                Box::pin(async move { c.meta_get_multi(&batch, Some(flags)).await })
            })
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
                    self.note_stale_read(w, &v);
                }
                continue;
            }
            by_key.insert(k, Bytes::from(v.data.unwrap_or_default()));
        }
        let mut answers = Vec::with_capacity(group.len());
        for (i, w) in group {
            let answer = match by_key.get(w.text.as_bytes()) {
                Some(data) => self.entry_from(&keys[i], w, data.clone()).await,
                None => Ok(None),
            };
            answers.push((i, answer));
        }
        answers
    }

    /// `md <key> I [T<exptime>]`: marks the entry stale, keeping its value (for
    /// `exptime` when given), and re-arms its recache token. Absent: fine.
    async fn invalidate_in_place(&self, wire: &WireKey, exptime: Option<u64>) -> Result<()> {
        let mut flags = vec!["I".to_string()];
        flags.extend(exptime.map(|t| format!("T{t}")));
        self.delete_with("mark stale", wire, flags).await
    }

    /// `md <key> <flags>`, where a refusal (NF: absent; EX: another CAS) is fine.
    async fn delete_with(
        &self,
        operation: &'static str,
        wire: &WireKey,
        mut flags: Vec<String>,
    ) -> Result<()> {
        if wire.base64 {
            flags.push("b".into());
        }
        let k = wire.text.clone();
        let r = self
            .meta(operation, wire, move |c| {
                let (k, flags) = (k.clone(), flags.clone());
                Box::pin(async move {
                    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
                    c.meta_delete(k.as_bytes(), false, None, Some(&f)).await
                })
            })
            .await;
        r.map(drop)
            .or_else(|e| if e.is_transient() { Err(e) } else { Ok(()) })
    }

    fn stale_reads(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, StaleRead>> {
        self.inner
            .stale_reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note_stale_read(&self, wire: &WireKey, found: &MetaValue) {
        let mut reads = self.stale_reads();
        if reads.len() >= 1024 {
            reads.retain(|_, r| r.at.elapsed() < STALE_READ_KEPT_FOR);
            if reads.len() >= 1024 {
                // Tokens nobody acted on pass with their entry's grace anyway.
                reads.clear();
            }
        }
        reads.insert(
            wire.text.clone(),
            StaleRead {
                at: std::time::Instant::now(),
                won: found.is_recache_winner == Some(true),
                cas: found.cas,
            },
        );
    }

    /// What a plain read of this process found a moment ago: `key` stale, and maybe
    /// its token won. Forgets it.
    pub(crate) fn take_stale_read(&self, key: &FlagKey) -> Option<StaleRead> {
        let wire = self.wire_key(key).ok()?;
        self.stale_reads()
            .remove(&wire.text)
            .filter(|r| r.at.elapsed() < STALE_READ_KEPT_FOR)
    }

    /// Hands back a stale entry's recache token (`md <key> I C<cas>`), so that
    /// another reader of the fleet refreshes it. The CAS keeps it from marking a value
    /// stored meanwhile.
    pub(crate) async fn rearm(&self, key: &FlagKey, cas: Option<u64>) {
        let Ok(wire) = self.wire_key(key) else {
            return;
        };
        let mut flags = vec!["I".to_string()];
        flags.extend(cas.map(|c| format!("C{c}")));
        if let Err(e) = self.delete_with("rearm", &wire, flags).await {
            tracing::debug!(error = %e, "could not hand back a recache token; it passes with the entry's grace");
        }
    }

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
        format!("{}{}", self.inner.prefix, key.as_str())
    }

    fn wire_key(&self, key: &FlagKey) -> Result<WireKey> {
        let raw = self.memcached_key(key);
        if raw.len() <= MAX_KEY && raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Ok(WireKey {
                text: raw,
                base64: false,
            });
        }
        let text = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
        if text.len() <= MAX_KEY {
            return Ok(WireKey { text, base64: true });
        }
        // Too long once prefixed or encoded: a fixed-length digest of the full key,
        // `<namespace>!#<32 hex digits>` (128 bits: two independent 64-bit hashes). The
        // `!` keeps it, like every internal key, out of the flags' `<namespace>:` space.
        Ok(WireKey {
            text: format!(
                "{}#{:016x}{:016x}",
                self.internal_prefix(),
                crate::ring::hash(raw.as_bytes()),
                crate::ring::hash(&[raw.as_bytes(), b"\x00flagcache"].concat()),
            ),
            base64: false,
        })
    }

    fn pool(&self, wire: &WireKey) -> &Pool {
        let i = self.inner.ring.server_for(wire.text.as_bytes());
        &self.inner.pools[i.min(self.inner.pools.len() - 1)]
    }

    fn route(&self, route: Route<'_>) -> &Pool {
        match route {
            Route::Key(w) => self.pool(w),
            Route::First => &self.inner.pools[0],
        }
    }

    /// A plain ASCII key that is not a flag (the invalidation log's).
    pub(crate) fn plain(text: String) -> WireKey {
        WireKey {
            text,
            base64: false,
        }
    }

    /// The largest encoded entry accepted: one item, or `max_chunks` of them in the
    /// binary layout (the JSON layout is not chunked).
    fn max_value_size(&self) -> usize {
        match self.inner.codec {
            Codec::Envelope(_) => self.chunk_capacity() * self.inner.max_chunks,
            _ => self.inner.item_size_limit,
        }
    }

    /// Payload bytes per chunk (each chunk carries a 12-byte header).
    fn chunk_capacity(&self) -> usize {
        self.inner
            .item_size_limit
            .saturating_sub(CHUNK_HEADER)
            .max(1)
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

    fn chunk_key(
        &self,
        wire: &WireKey,
        version: flagcache_core::Version,
        nonce: u64,
        i: u32,
    ) -> WireKey {
        WireKey {
            text: format!(
                "{}chunk:{:016x}:{:x}:{nonce:016x}:{i}",
                self.internal_prefix(),
                crate::ring::hash(wire.text.as_bytes()),
                version.get()
            ),
            base64: false,
        }
    }

    /// Writes `bytes` as chunks under keys of this version (so a newer value never
    /// overwrites the chunks an older manifest names) and returns the manifest to
    /// store at the key itself, under the version guard.
    async fn write_chunks(
        &self,
        key: &FlagKey,
        wire: &WireKey,
        entry: &Entry,
        bytes: &Bytes,
        ttl: Duration,
    ) -> Result<Bytes> {
        let too_large = || Error::ValueTooLarge {
            key: key.to_string(),
            size: bytes.len(),
            limit: self.max_value_size(),
            backend: BACKEND,
        };
        if !matches!(self.inner.codec, Codec::Envelope(_)) || bytes.len() > self.max_value_size() {
            return Err(too_large());
        }
        // Only write chunks that a manifest may come to name: not when the stored
        // version already supersedes this one — unless it is this very version marked
        // stale, which this write revalidates (`put` stores the manifest again).
        if let Some(v) = self.read(wire).await? {
            let stale = v.is_stale == Some(true);
            let held = v
                .data
                .as_deref()
                .and_then(|d| self.inner.codec.peek_version(d).ok());
            if let Some(held) = held.filter(|h| *h >= entry.version) {
                if !(stale && held == entry.version) {
                    if stale && v.is_recache_winner == Some(true) {
                        // Won a newer stale entry's token without refreshing it.
                        self.rearm(key, v.cas).await;
                    }
                    return Err(Superseded(held).into_error());
                }
            }
        }
        let pieces: Vec<&[u8]> = bytes.chunks(self.chunk_capacity()).collect();
        let count = u32::try_from(pieces.len()).map_err(|_| too_large())?;
        let nonce = fastrand::u64(..);
        // Chunks outlive their manifest a little, so a read never finds the manifest
        // without them.
        let chunk_exptime = Self::exptime(ttl + Duration::from_secs(60))?;
        for (i, piece) in (0u32..).zip(pieces) {
            let mut value = Vec::with_capacity(CHUNK_HEADER + piece.len());
            value.extend_from_slice(&entry.version.get().to_be_bytes());
            value.extend_from_slice(&i.to_be_bytes());
            value.extend_from_slice(piece);
            let ck = self.chunk_key(wire, entry.version, nonce, i);
            self.raw_set(Route::Key(&ck), &ck, value, chunk_exptime)
                .await?;
        }
        let manifest = Manifest {
            nonce,
            count,
            total: bytes.len() as u64,
            crc: crc32(bytes),
        };
        self.inner.codec.encode_entry(&Entry {
            version: entry.version,
            stamp_ms: entry.stamp_ms,
            payload: manifest.to_bytes(),
        })
    }

    /// Reads a chunked value back, all or nothing: a missing or mismatched chunk, or a
    /// checksum that does not match, is a miss — never a torn value.
    async fn read_chunks(
        &self,
        key: &FlagKey,
        wire: &WireKey,
        version: flagcache_core::Version,
        m: Manifest,
    ) -> Result<Option<Entry>> {
        // The manifest is untrusted bytes too: bound it before allocating.
        if m.count as usize > self.inner.max_chunks || m.total > self.max_value_size() as u64 {
            return Err(Error::corrupt("chunk manifest out of bounds").with_key(key));
        }
        let mut whole = Vec::with_capacity(usize::try_from(m.total).unwrap_or(0));
        for i in 0..m.count {
            let ck = self.chunk_key(wire, version, m.nonce, i);
            let Some(chunk) = self.raw_get(Route::Key(&ck), &ck).await? else {
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
            .inner
            .codec
            .decode_entry(Bytes::from(whole))
            .map_err(|e| e.with_key(key))?;
        Ok((entry.version == version).then_some(entry))
    }

    /// `mg <key> v c N<ttl>`: reads the entry or, on a miss, vivifies an empty
    /// placeholder and tells exactly one caller it won the right to fill it (`W`); the
    /// others learn that the win was already given (`Z`).
    pub(crate) async fn recache_read(
        &self,
        key: &FlagKey,
        ttl_secs: u64,
    ) -> Result<Option<MetaValue>> {
        let wire = self.wire_key(key)?;
        let k = wire.text.clone();
        let mut flags = vec!["v".to_string(), "c".to_string(), format!("N{ttl_secs}")];
        if wire.base64 {
            flags.push("b".into());
        }
        self.meta("recache get", &wire, move |c| {
            let (k, flags) = (k.clone(), flags.clone());
            Box::pin(async move {
                let f: Vec<&str> = flags.iter().map(String::as_str).collect();
                c.meta_get(k.as_bytes(), false, None, Some(&f)).await
            })
        })
        .await
    }

    /// Removes the recache placeholder of `key` if it is still the one with `cas`
    /// (an abandoned fill), so that waiters elect a new winner at once.
    pub(crate) async fn drop_placeholder(&self, key: &FlagKey, cas: u64) -> Result<()> {
        let wire = self.wire_key(key)?;
        // Gone already, or filled meanwhile (CAS mismatch): both fine.
        self.delete_with("recache drop", &wire, vec![format!("C{cas}")])
            .await
    }

    /// `mg <key> v` on `route`'s server.
    pub(crate) async fn raw_get(&self, route: Route<'_>, key: &WireKey) -> Result<Option<Vec<u8>>> {
        let k = key.text.clone();
        self.meta_at(self.route(route), "raw get", move |c| {
            let k = k.clone();
            Box::pin(async move { c.meta_get(k.as_bytes(), false, None, Some(&["v"])).await })
        })
        .await
        .map(|v| v.map(|v| v.data.unwrap_or_default()))
    }

    /// `ms <key> T<exptime>` on `route`'s server.
    pub(crate) async fn raw_set(
        &self,
        route: Route<'_>,
        key: &WireKey,
        value: Vec<u8>,
        exptime: u64,
    ) -> Result<()> {
        let k = key.text.clone();
        let t = format!("T{exptime}");
        self.meta_at(self.route(route), "raw set", move |c| {
            let (k, value, t) = (k.clone(), value.clone(), t.clone());
            Box::pin(async move {
                c.meta_set(
                    k.as_bytes(),
                    value.as_slice(),
                    false,
                    None,
                    Some(&[t.as_str()]),
                )
                .await
            })
        })
        .await
        .map(drop)
    }

    /// `ms <key> ME` (add: only if absent; losing is fine) on `route`'s server, no TTL.
    pub(crate) async fn raw_add(
        &self,
        route: Route<'_>,
        key: &WireKey,
        value: Vec<u8>,
    ) -> Result<()> {
        let k = key.text.clone();
        let r = self
            .meta_at(self.route(route), "raw add", move |c| {
                let (k, value) = (k.clone(), value.clone());
                Box::pin(async move {
                    c.meta_set(
                        k.as_bytes(),
                        value.as_slice(),
                        false,
                        None,
                        Some(&["ME", "T0"]),
                    )
                    .await
                })
            })
            .await;
        r.map(drop)
            .or_else(|e| if e.is_transient() { Err(e) } else { Ok(()) })
    }

    /// `ma <key> N0 J1 v` on `route`'s server: the counter's new value (1 when it was
    /// created by this call).
    pub(crate) async fn raw_incr(&self, route: Route<'_>, key: &WireKey) -> Result<u64> {
        let k = key.text.clone();
        let v = self
            .meta_at(self.route(route), RAW_INCR, move |c| {
                let k = k.clone();
                Box::pin(async move {
                    c.meta_increment(k.as_bytes(), false, None, None, Some(&["N0", "J1", "v"]))
                        .await
                })
            })
            .await?;
        v.and_then(|v| v.data)
            .and_then(|d| parse_number(&d))
            .ok_or_else(|| Error::corrupt("the invalidation log counter is not a number"))
    }

    /// Runs one meta command on the key's server.
    async fn meta<F, R>(&self, operation: &'static str, wire: &WireKey, f: F) -> Result<R>
    where
        F: for<'c> Fn(&'c mut async_memcached::Client) -> MetaCall<'c, R>,
    {
        self.meta_at(self.pool(wire), operation, f).await
    }

    /// Runs one meta command on `pool`'s server.
    ///
    /// A pooled connection may have died while idle (its server restarted): when the
    /// command fails on one with an I/O error, the pool's other idle connections are
    /// dropped (they died with it) and the command runs once more on a new connection.
    /// Never for `ma`, which is not idempotent.
    async fn meta_at<F, R>(&self, pool: &Pool, operation: &'static str, f: F) -> Result<R>
    where
        F: for<'c> Fn(&'c mut async_memcached::Client) -> MetaCall<'c, R>,
    {
        match self.meta_once(pool, operation, &f).await {
            Err(Failed::OnIdleConnection(e)) if operation != RAW_INCR => {
                tracing::debug!(server = pool.url(), error = %e,
                    "a pooled memcached connection was dead; retrying on a new one");
                pool.drain_idle();
                self.meta_once(pool, operation, &f)
                    .await
                    .map_err(Failed::into_error)
            }
            r => r.map_err(Failed::into_error),
        }
    }

    async fn meta_once<F, R>(
        &self,
        pool: &Pool,
        operation: &'static str,
        f: &F,
    ) -> std::result::Result<R, Failed>
    where
        F: for<'c> Fn(&'c mut async_memcached::Client) -> MetaCall<'c, R>,
    {
        let limit = self.inner.timeout;
        let timed_out = || {
            Failed::Other(Error::Timeout {
                backend: BACKEND,
                operation,
                after: limit,
            })
        };
        let mut lease = tokio::time::timeout(limit, pool.get())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| Failed::Other(backend_error(operation, e)))?;
        let reused = lease.reused();
        let Some(client) = lease.client() else {
            return Err(Failed::Other(Error::Closed("memcached connection")));
        };
        // On a timeout the lease is dropped with its connection: it may hold a
        // half-read reply.
        let answer = tokio::time::timeout(limit, f(client))
            .await
            .map_err(|_| timed_out())?;
        match answer {
            Ok(r) => {
                lease.give_back();
                Ok(r)
            }
            // A refusal (EX, NS, EN) leaves the connection usable.
            Err(async_memcached::Error::Protocol(status))
                if !matches!(status, Status::Error(_)) =>
            {
                lease.give_back();
                Err(Failed::Other(protocol(operation, status)))
            }
            // The connection died under us; if it had been idle, its server may simply
            // have restarted since.
            Err(e @ (async_memcached::Error::Io(_) | async_memcached::Error::ConnectionClosed))
                if reused =>
            {
                Err(Failed::OnIdleConnection(backend_error(operation, e)))
            }
            // Anything else may have left bytes unread: drop the connection.
            Err(e) => Err(Failed::Other(backend_error(operation, e))),
        }
    }

    fn flags<'a>(wire: &WireKey, more: &'a [&'a str]) -> Vec<&'a str> {
        let mut v: Vec<&str> = more.to_vec();
        if wire.base64 {
            v.push("b");
        }
        v
    }

    /// Reads the entry and its CAS token.
    async fn read(&self, wire: &WireKey) -> Result<Option<MetaValue>> {
        let key = wire.text.clone();
        let flags = Self::flags(wire, &["v", "c"])
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        self.meta("get", wire, move |c| {
            let (key, flags) = (key.clone(), flags.clone());
            Box::pin(async move {
                let f: Vec<&str> = flags.iter().map(String::as_str).collect();
                c.meta_get(key.as_bytes(), false, None, Some(&f)).await
            })
        })
        .await
    }

    /// TTL as memcached wants it: seconds, or an absolute Unix time past 30 days.
    fn exptime(ttl: Duration) -> Result<u64> {
        let ms = ttl_millis(ttl, Duration::from_secs(1))?;
        let secs = ms / 1000;
        Ok(if secs > THIRTY_DAYS_SECS {
            // An absolute time, clamped to what memcached's 32-bit field holds.
            (now_ms() / 1000)
                .saturating_add(secs)
                .min(u64::from(u32::MAX))
        } else {
            secs
        })
    }

    async fn write(
        &self,
        wire: &WireKey,
        bytes: &Bytes,
        exptime: u64,
        cas: Option<u64>,
    ) -> Result<bool> {
        let key = wire.text.clone();
        let value = bytes.to_vec();
        let mut flags = vec![format!("T{exptime}")];
        match cas {
            Some(c) => flags.push(format!("C{c}")),
            None => flags.push("ME".to_string()),
        }
        if wire.base64 {
            flags.push("b".to_string());
        }
        let written = self
            .meta("put", wire, move |c| {
                let (key, value, flags) = (key.clone(), value.clone(), flags.clone());
                Box::pin(async move {
                    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
                    c.meta_set(key.as_bytes(), value.as_slice(), false, None, Some(&f))
                        .await
                })
            })
            .await;
        match written {
            Ok(_) => Ok(true),
            Err(Error::Backend { source, .. })
                if matches!(
                    source.downcast_ref::<Refused>(),
                    Some(Refused(
                        Status::Exists | Status::NotStored | Status::NotFound
                    ))
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// A refusal status from the server, as an error source.
#[derive(Debug, thiserror::Error)]
#[error("memcached refused: {0:?}")]
struct Refused(Status);

fn protocol(operation: &'static str, status: Status) -> Error {
    Error::backend(BACKEND, operation, false, Refused(status))
}

#[async_trait]
impl FlagStore for MemcachedStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_put: true,
            batch_get: true,
            native_get_checked: false,
            shared: true,
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

    async fn get_many(&self, keys: &[FlagKey]) -> Result<Vec<Option<Entry>>> {
        let each = self.read_each("get_many", keys).await;
        // One unreadable entry is a miss in its slot, and one server down costs its own
        // keys, not the whole batch; a refused request, or a batch no server answered,
        // is an error.
        let refused = each.iter().find_map(|r| match r {
            Err(e) if !e.is_transient() && !matches!(e, Error::Corrupt { .. }) => Some(e),
            _ => None,
        });
        if let Some(e) = refused {
            return Err(e.clone());
        }
        if let Some(Err(e)) = each.first() {
            if each
                .iter()
                .all(|r| r.as_ref().is_err_and(Error::is_transient))
            {
                return Err(e.clone());
            }
        }
        Ok(each.into_iter().map(|r| r.ok().flatten()).collect())
    }

    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        self.read_each("get", keys).await
    }

    /// The server that holds `key`: reads of one server's keys share a pipeline.
    fn read_group(&self, key: &FlagKey) -> Option<u64> {
        let wire = self.wire_key(key).ok()?;
        u64::try_from(self.inner.ring.server_for(wire.text.as_bytes())).ok()
    }

    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        let exptime = Self::exptime(ttl)?;
        let wire = self.wire_key(key)?;
        let bytes = self
            .inner
            .codec
            .encode_entry(entry)
            .map_err(|e| e.with_key(key))?;
        let bytes = if bytes.len() > self.inner.item_size_limit {
            match self.write_chunks(key, &wire, entry, &bytes, ttl).await {
                Ok(manifest) => manifest,
                Err(e) => match Superseded::from_error(&e) {
                    Some(current) => return Ok(PutOutcome::Superseded { current }),
                    None => return Err(e.with_key(key)),
                },
            }
        } else {
            bytes
        };
        // Only rounds in which nobody made progress use up the budget: among N writers
        // a legitimate one may lose N - 1 races, each to a lower version being stored.
        let mut stalled = 0;
        let mut round = 0u32;
        let mut last_seen: Option<Option<flagcache_core::Version>> = None;
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
            let current = self.read(&wire).await.map_err(|e| e.with_key(key))?;
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
                    let held = v
                        .data
                        .as_deref()
                        .and_then(|d| self.inner.codec.peek_version(d).ok());
                    if let Some(held) = held.filter(|h| *h >= entry.version) {
                        if v.is_stale == Some(true) {
                            if held == entry.version {
                                // The source confirms the stale value: store it again,
                                // which clears the mark (a lost race is fine: someone
                                // else wrote it).
                                if let Some(c) = v.cas {
                                    let _ = self.write(&wire, &bytes, exptime, Some(c)).await;
                                }
                            } else if v.is_recache_winner == Some(true) {
                                self.rearm(key, v.cas).await;
                            }
                        }
                        return Ok(PutOutcome::Superseded { current: held });
                    }
                    // Lower or unreadable: replace it, if nobody changed it meanwhile.
                    match v.cas {
                        Some(c) => Some(c),
                        None => return Err(Error::corrupt("memcached returned no CAS token")),
                    }
                }
            };
            if self
                .write(&wire, &bytes, exptime, cas)
                .await
                .map_err(|e| e.with_key(key))?
            {
                return Ok(PutOutcome::Stored);
            }
            tracing::debug!(%key, round, "lost a CAS race; retrying");
        }
        Err(Error::backend(BACKEND, "put", true, Contention(self.inner.cas_attempts)).with_key(key))
    }

    async fn mark_stale(&self, key: &FlagKey, grace: Duration) -> Result<()> {
        let wire = self.wire_key(key)?;
        let exptime = Self::exptime(grace)?;
        self.invalidate_in_place(&wire, Some(exptime))
            .await
            .map_err(|e| e.with_key(key))
    }

    async fn delete(&self, key: &FlagKey) -> Result<()> {
        let wire = self.wire_key(key)?;
        let k = wire.text.clone();
        let flags: Vec<String> = if wire.base64 {
            vec!["b".into()]
        } else {
            Vec::new()
        };
        let deleted = self
            .meta("delete", &wire, move |c| {
                let (k, flags) = (k.clone(), flags.clone());
                Box::pin(async move {
                    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
                    c.meta_delete(
                        k.as_bytes(),
                        false,
                        None,
                        if f.is_empty() { None } else { Some(&f) },
                    )
                    .await
                })
            })
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(Error::Backend { source, .. })
                if matches!(
                    source.downcast_ref::<Refused>(),
                    Some(Refused(Status::NotFound))
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e.with_key(key)),
        }
    }
}
