//! The version-guarded [`FlagStore`] on Redis or Valkey ([`RedisStore`]) and its
//! builder: entry keys, the `put` and `get_checked` scripts, `MGET` batches.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use flagcache_core::{
    ttl_millis, Capabilities, Checked, Codec, Entry, Error, FillRead, FillToken, FlagKey,
    FlagStore, PutOutcome, Result, Version,
};
use redis::{Script, Value};

use crate::connection::Connection;
use crate::lock::LockKeys;
use crate::target::{connection_methods, Target};
use crate::KeyLayout;
use crate::{scripts, BACKEND};

mod put;

/// Configures a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    target: Target,
    namespace: String,
    key_layout: String,
    codec: Codec,
    max_value_size: usize,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        RedisStoreBuilder {
            target: Target::default(),
            namespace: "flags".to_string(),
            key_layout: KeyLayout::DEFAULT.to_string(),
            codec: Codec::default(),
            max_value_size: 512 << 20,
        }
    }
}

impl RedisStoreBuilder {
    connection_methods!();

    /// The namespace (default `flags`): entries live at `<namespace>:{<flag key>}` in
    /// the default [`key_layout`](Self::key_layout).
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Where a flag lives: a template over `{ns}` (the namespace) and `{key}` (the flag
    /// key), braces doubled for literal ones — `{ns}:{{key}}` (default:
    /// `flags:{checkout}`), `{ns}:{key}` (`flags:checkout`, as services in other
    /// languages commonly write) or `{{ns}}:{key}` (`{flags}:checkout`: on a cluster,
    /// every flag in one slot). See [`KeyLayout`] for what each means on a Redis
    /// Cluster and where the lock, marker and fence keys go. Checked at
    /// [`build`](Self::build).
    ///
    /// ```no_run
    /// # async fn demo() -> flagcache::Result<()> {
    /// use flagcache::redis::RedisStore;
    /// // Share `flags:<flagKey>` with the services already there.
    /// let store = RedisStore::builder()
    ///     .url("redis://127.0.0.1:6379")
    ///     .key_layout("{ns}:{key}")
    ///     .build()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    #[must_use]
    pub fn key_layout(mut self, template: impl Into<String>) -> Self {
        self.key_layout = template.into();
        self
    }

    /// The stored layout (default: the binary envelope; `JsonCodec` to share keys with
    /// services that use `{"flagConfig": …, "version": N}`).
    #[must_use]
    pub fn codec(mut self, codec: impl Into<Codec>) -> Self {
        self.codec = codec.into();
        self
    }

    /// Refuse encoded entries larger than this with `Error::ValueTooLarge` (default
    /// 512 MiB, Redis' own limit for a string).
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// Connects, authenticates, PINGs and loads the scripts: a store that builds can
    /// be used.
    ///
    /// # Errors
    /// `Error::Timeout` (with the connection timeout it waited) or a transient
    /// `Error::Backend` when the server cannot be reached; a permanent `Error::Backend`
    /// for a bad URL, a missing or wrong password (`NOAUTH`, `WRONGPASS`), a database
    /// index the server does not have, or an ACL user refused the scripts (`NOPERM`).
    /// Errors name the target, its password redacted.
    pub async fn build(self) -> Result<RedisStore> {
        let layout = KeyLayout::new(&self.key_layout, &self.namespace)?;
        let (put, get_checked, fence) = (scripts::put(), scripts::get_checked(), scripts::fence());
        let connection = Connection::open(self.target, &[&put, &get_checked, &fence]).await?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                connection,
                lock_keys: LockKeys::new(&self.namespace, layout.clone()),
                layout,
                codec: self.codec,
                max_value_size: self.max_value_size,
                put,
                get_checked,
                fence,
                delete_if_same: scripts::delete_if_same(),
            }),
        })
    }
}

struct Inner {
    connection: Connection,
    /// Where flags and their fences live.
    layout: KeyLayout,
    /// The keys of [`crate::RedisLock`]'s locks and absence markers.
    lock_keys: LockKeys,
    codec: Codec,
    max_value_size: usize,
    put: Script,
    get_checked: Script,
    /// Lays a fence and drops the entry.
    fence: Script,
    /// Deletes an entry only if it still holds the given bytes.
    delete_if_same: Script,
}

/// A [`FlagStore`] on Redis or Valkey, single node or cluster.
///
/// - Entries live at `<namespace>:{<flag key>}`: the hash tag is the flag key, so a
///   flag and its lock share a slot while flags spread over the cluster.
/// - `put` is one Lua script (loaded once, called by `EVALSHA`, reloaded on `NOSCRIPT`):
///   it compares versions on the server and writes with `PX` only when the key is
///   absent, older, or fails the checks the script makes (magic, format, flags, length;
///   in the JSON layout, that it parses with a numeric version) — atomic per key, one
///   round trip. When it answers Superseded, or that the key holds gzip'd JSON (which
///   Lua cannot read), the client reads the stored bytes; if a reader would reject them
///   (a checksum mismatch, say) or they are older, it deletes exactly those bytes and
///   runs the script again. Unreadable entries never guard; gzip'd JSON entries do.
/// - `get_checked` is one script too; `get_each` (the batched read) is one `MGET` (split per node by the
///   cluster client, answers back in request order).
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", self.inner.connection.target())
            .field("layout", &self.inner.layout)
            .field("codec", &self.inner.codec)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Configures a store.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to one server with default settings.
    ///
    /// # Errors
    /// See [`RedisStoreBuilder::build`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder().url(url).build().await
    }

    /// [`RedisStore::redis_key`] as a command argument, written straight into the
    /// command (no `String` per call).
    pub(crate) fn key_arg<'a>(&'a self, key: &'a FlagKey) -> KeyArg<'a> {
        KeyArg {
            layout: &self.inner.layout,
            key,
        }
    }

    /// The Redis key of a flag: `<namespace>:{<flag key>}` in the default
    /// [`KeyLayout`].
    pub fn redis_key(&self, key: &FlagKey) -> String {
        self.inner.layout.key(key)
    }

    /// The store's key layout.
    pub fn key_layout(&self) -> &KeyLayout {
        &self.inner.layout
    }

    /// The Redis key of a flag's fence (see [`FlagStore::fence`]), in the flag's
    /// cluster slot: `<namespace>:fence:{<flag key>}` in the default layout (see
    /// [`KeyLayout`] for the others). `None` when no key can share the flag's slot
    /// (in the default layout, a flag key beginning with `}`): such a flag is not
    /// fenced — its invalidation deletes, as without leases.
    pub fn fence_key(&self, key: &FlagKey) -> Option<String> {
        self.inner.layout.companion("fence", key)
    }

    /// The Redis key of a flag's stampede lock: `<namespace>:lock:{<flag key>}`, in
    /// the same cluster slot as the flag.
    pub fn lock_key(&self, key: &FlagKey) -> String {
        self.inner.lock_keys.lock(key)
    }

    /// The keys of the stampede locks over this store's entries.
    pub(crate) fn lock_keys(&self) -> &LockKeys {
        &self.inner.lock_keys
    }

    /// The connection commands and scripts go through.
    pub(crate) fn connection(&self) -> &Connection {
        &self.inner.connection
    }

    fn layout(&self) -> &'static str {
        match self.inner.codec {
            Codec::Json(_) => "json",
            _ => "env",
        }
    }

    /// The version as the scripts compare it.
    fn version_arg(&self, v: Version) -> Vec<u8> {
        match self.inner.codec {
            Codec::Json(_) => v.get().to_string().into_bytes(),
            _ => v.to_be_bytes().to_vec(),
        }
    }

    fn version_from(&self, v: &Value) -> Result<Version> {
        match v {
            Value::BulkString(b) if b.len() == 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Ok(Version(u64::from_be_bytes(a)))
            }
            Value::Int(n) => u64::try_from(*n)
                .map(Version)
                .map_err(|_| Error::corrupt(format!("negative version {n}"))),
            other => Err(Error::corrupt(format!(
                "unexpected version reply {other:?}"
            ))),
        }
    }

    pub(crate) fn decode(&self, key: &FlagKey, bytes: Vec<u8>) -> Result<Entry> {
        self.inner
            .codec
            .decode_entry(Bytes::from(bytes))
            .map_err(|e| e.with_key(key))
    }

    /// Runs `script` with `key`'s entry as `KEYS[1]`, the layout as `ARGV[1]`, then
    /// the arguments `args` adds.
    async fn run_script(
        &self,
        operation: &'static str,
        script: &Script,
        key: &FlagKey,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<Value> {
        let mut inv = script.prepare_invoke();
        inv.key(self.redis_key(key)).arg(self.layout());
        args(&mut inv);
        self.inner
            .connection
            .script(operation, inv)
            .await
            .map_err(|e| e.with_key(key))
    }

    /// The bytes at `key`'s entry (`GET`), for `operation`, which errors name.
    pub(crate) async fn get_bytes(
        &self,
        operation: &'static str,
        key: &FlagKey,
    ) -> Result<Option<Vec<u8>>> {
        self.inner
            .connection
            .query(operation, redis::cmd("GET").arg(self.key_arg(key)))
            .await
            .map_err(|e| e.with_key(key))
    }

    /// The entries of `keys` in one `MGET`, each key with its own answer.
    async fn get_entries(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        match self.mget("get", keys).await {
            Ok(raw) => keys
                .iter()
                .zip(raw)
                .map(|(k, b)| b.map(|b| self.decode(k, b)).transpose())
                .collect(),
            Err(e) => keys.iter().map(|k| Err(e.clone().with_key(k))).collect(),
        }
    }

    /// `MGET` of `keys`: one answer per key, in order.
    async fn mget(
        &self,
        operation: &'static str,
        keys: &[FlagKey],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        self.mget_args(operation, keys.iter().map(|k| self.key_arg(k)), keys.len())
            .await
    }

    /// `MGET` of `n` Redis keys: one answer per key, in order; a reply of another
    /// length is an error.
    async fn mget_args<A: redis::ToRedisArgs>(
        &self,
        operation: &'static str,
        args: impl Iterator<Item = A>,
        n: usize,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for a in args {
            cmd.arg(a);
        }
        let raw: Vec<Option<Vec<u8>>> = self.inner.connection.query(operation, &cmd).await?;
        if raw.len() != n {
            // A reply out of step with its request, not corrupt entries: nothing to
            // delete, and worth retrying.
            return Err(Error::backend(
                BACKEND,
                operation,
                true,
                std::io::Error::other(format!("MGET of {n} keys answered {} values", raw.len())),
            ));
        }
        Ok(raw)
    }
}

#[async_trait]
impl FlagStore for RedisStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_value_size: Some(self.inner.max_value_size),
            ..Default::default()
        }
    }

    fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        let raw = self.get_bytes("get", key).await?;
        raw.map(|b| self.decode(key, b)).transpose()
    }

    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        self.get_entries(keys).await
    }

    /// One server (a primary, found through Sentinel or not) answers every key: one
    /// group. A cluster's `MGET` would span nodes and fail together when one is down,
    /// so on a cluster reads are not batched.
    fn read_group(&self, _key: &FlagKey) -> Option<u64> {
        (!self.inner.connection.is_cluster()).then_some(0)
    }

    async fn get_checked(&self, key: &FlagKey, expected: Version) -> Result<Checked> {
        let reply = self
            .run_script("get_checked", &self.inner.get_checked, key, |inv| {
                inv.arg(self.version_arg(expected));
            })
            .await?;
        match reply {
            Value::Nil => Ok(Checked::Miss),
            Value::Array(items) => match items.as_slice() {
                [Value::Int(1), Value::BulkString(b)] => {
                    Ok(Checked::Hit(self.decode(key, b.clone())?))
                }
                [Value::Int(0), v] => Ok(Checked::Stale {
                    current: self.version_from(v)?,
                }),
                [Value::Int(2)] => {
                    Err(Error::corrupt("stored bytes are not an entry").with_key(key))
                }
                [Value::Int(3), Value::BulkString(b)] => {
                    let e = self.decode(key, b.clone())?;
                    Ok(if e.version == expected {
                        Checked::Hit(e)
                    } else {
                        Checked::Stale { current: e.version }
                    })
                }
                other => Err(Error::corrupt(format!(
                    "unexpected get_checked reply {other:?}"
                ))),
            },
            other => Err(Error::corrupt(format!(
                "unexpected get_checked reply {other:?}"
            ))),
        }
    }

    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.put_guarded(key, entry, ttl, None).await
    }

    /// The entries in one `MGET`, then the fences of the keys that missed in another
    /// (a key and its fence share a slot, so on a cluster — where reads are not
    /// batched — each is one node's command too).
    async fn get_each_for_fill(&self, keys: &[FlagKey]) -> Vec<Result<FillRead>> {
        // An `MGET` even for one key: it answers a key of another type as absent,
        // where a `GET` fails (and would count against the server's breaker).
        let entries = self.get_entries(keys).await;
        // Only a fill that missed writes what it loads: the fences of the keys that
        // missed are read next, before their loads start. A key that hit gets no
        // token, which is safe: a write with no token is refused while any fence is
        // up. A read of the fences that fails leaves those keys without a token too.
        let missed: Vec<(usize, String)> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Ok(None)))
            .filter_map(|(i, _)| self.fence_key(&keys[i]).map(|f| (i, f)))
            .collect();
        // Allocated only when a key missed.
        let mut tokens = Vec::new();
        if !missed.is_empty() {
            tokens = vec![FillToken::NONE; keys.len()];
            let fences = missed.iter().map(|(_, fence)| fence);
            match self.mget_args("get", fences, missed.len()).await {
                Ok(raw) => {
                    for ((i, _), t) in missed.iter().zip(raw) {
                        tokens[*i] = t.map_or(FillToken::NONE, |t| FillToken::from_text(&t));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "flagcache: fences unread; fills write only where none is up")
                }
            }
        }
        entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let token = tokens.get(i).copied().unwrap_or(FillToken::NONE);
                entry.map(|entry| FillRead { entry, token })
            })
            .collect()
    }

    /// A one-key `MGET`; for a miss, a one-key `MGET` of the fence (as the batched
    /// read: a key of another type reads as absent).
    async fn get_for_fill(&self, key: &FlagKey) -> Result<FillRead> {
        let raw = self.mget("get", std::slice::from_ref(key)).await;
        let entry = match raw.map_err(|e| e.with_key(key))?.pop().flatten() {
            Some(b) => Some(self.decode(key, b)?),
            None => None,
        };
        let mut token = FillToken::NONE;
        if let (None, Some(fence)) = (&entry, self.fence_key(key)) {
            match self.mget_args("get", std::iter::once(fence), 1).await {
                Ok(mut raw) => {
                    if let Some(t) = raw.pop().flatten() {
                        token = FillToken::from_text(&t);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "flagcache: fence unread; the fill writes only where none is up")
                }
            }
        }
        Ok(FillRead { entry, token })
    }

    async fn fence_token(&self, key: &FlagKey) -> Result<FillToken> {
        let Some(fence) = self.fence_key(key) else {
            return Ok(FillToken::NONE);
        };
        let held: Option<Vec<u8>> = self
            .inner
            .connection
            .query("get", redis::cmd("GET").arg(fence))
            .await
            .map_err(|e| e.with_key(key))?;
        Ok(held.map_or(FillToken::NONE, |t| FillToken::from_text(&t)))
    }

    /// The `put` script with the fence compared in the same step.
    async fn put_fill(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        token: FillToken,
    ) -> Result<PutOutcome> {
        let fence = self.fence_key(key).map(|f| (f, token));
        self.put_guarded(key, entry, ttl, fence).await
    }

    /// One script: the new fence (`SET … PX`), then the entry and the flag's absence
    /// marker deleted. Redis keeps no stale values: `keep_stale` drops the entry too.
    async fn fence(
        &self,
        key: &FlagKey,
        ttl: Duration,
        _keep_stale: Option<Duration>,
    ) -> Result<()> {
        let ttl = ttl_millis(ttl, Duration::from_millis(1))?;
        let Some(fence_key) = self.fence_key(key) else {
            return self.delete(key).await;
        };
        let mut inv = self.inner.fence.prepare_invoke();
        inv.key(self.redis_key(key))
            .key(fence_key)
            .arg(FillToken::random().to_text())
            .arg(ttl);
        if let Some(marker) = self.inner.lock_keys.absent(key) {
            inv.key(marker);
        }
        let _: Value = self
            .inner
            .connection
            .script("fence", inv)
            .await
            .map_err(|e| e.with_key(key))?;
        Ok(())
    }

    async fn delete(&self, key: &FlagKey) -> Result<()> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.redis_key(key));
        if let Some(marker) = self.inner.lock_keys.absent(key) {
            // A flag dropped everywhere (just created, say) is no longer "absent".
            cmd.arg(marker);
        }
        let _: i64 = self
            .inner
            .connection
            .query("delete", &cmd)
            .await
            .map_err(|e| e.with_key(key))?;
        Ok(())
    }
}

/// A flag's Redis key (see [`RedisStore::redis_key`]) as one command argument.
pub(crate) struct KeyArg<'a> {
    layout: &'a KeyLayout,
    key: &'a FlagKey,
}

impl redis::ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writes into the command's own buffer, which cannot fail.
        let _ = arg.write_all(self.layout.prefix().as_bytes());
        let _ = arg.write_all(self.key.as_str().as_bytes());
        let _ = arg.write_all(self.layout.suffix().as_bytes());
    }
}
