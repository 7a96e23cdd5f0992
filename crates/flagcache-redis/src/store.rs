use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use flagcache_core::{
    ttl_millis, Capabilities, Checked, Codec, Entry, Error, FlagKey, FlagStore, PutOutcome, Result,
    Version,
};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Script, Value};

use crate::{redact, scripts, BACKEND};

/// A connection: one multiplexed, auto-reconnecting connection to a single node, a
/// Redis Cluster connection that routes each key to its slot's node, or a connection to
/// whichever node Redis Sentinel says is the primary.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

/// The primary's connection, found through Sentinel and found again after a failure
/// (the primary may have changed).
pub(crate) struct SentinelConn {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The primary's connection and its generation: an error on a connection only
    /// forgets that very connection, not the one a rediscovery put in its place.
    current: std::sync::Mutex<Option<(u64, ConnectionManager)>>,
    generation: std::sync::atomic::AtomicU64,
    /// When the last rediscovery failed: callers that queued for it share its failure
    /// rather than each try again in turn.
    failed_at: std::sync::Mutex<Option<std::time::Instant>>,
    config: ConnectionManagerConfig,
    response_timeout: Duration,
}

impl SentinelConn {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(u64, ConnectionManager)>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The primary's connection (with its generation), asking Sentinel where the
    /// primary is if needed. One caller asks at a time; callers that waited for it
    /// take the connection it made rather than ask again, so a burst of requests
    /// after a failover costs one Sentinel query and one connection, not one each.
    pub(crate) async fn get(&self) -> redis::RedisResult<(u64, ConnectionManager)> {
        if let Some(c) = self.slot().clone() {
            return Ok(c);
        }
        let asked = std::time::Instant::now();
        let sentinel = &mut *self.sentinel.lock().await;
        if let Some(c) = self.slot().clone() {
            return Ok(c);
        }
        let failed_at = || {
            self.failed_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if failed_at().is_some_and(|t| t >= asked) {
            // The attempt this caller waited for failed: so does this call, at once.
            return Err(redis::RedisError::from(std::io::Error::other(
                "the primary's rediscovery through Sentinel just failed",
            )));
        }
        let found = async {
            let client = sentinel.async_get_client().await?;
            ConnectionManager::new_with_config(client, self.config.clone()).await
        };
        let conn = match found.await {
            Ok(conn) => conn,
            Err(e) => {
                *failed_at() = Some(std::time::Instant::now());
                return Err(e);
            }
        };
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.slot() = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// A client for the current primary (for a pub/sub connection).
    pub(crate) async fn primary_client(&self) -> redis::RedisResult<redis::Client> {
        self.sentinel.lock().await.async_get_client().await
    }

    /// Forgets connection `generation` after an error that may mean the primary
    /// moved (unless a rediscovery has replaced it already).
    pub(crate) fn check(&self, generation: u64, e: &redis::RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.code() == Some("READONLY")
        {
            self.forget(generation);
        }
    }

    /// Forgets connection `generation`, unless a rediscovery has replaced it already.
    fn forget(&self, generation: u64) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }
}

/// A call on a Sentinel-found connection, watched for being given up on: a caller's
/// own timeout (shorter than the connection's response timeout) drops the call before
/// redis-rs reports its timeout, and [`SentinelConn::check`] would never hear of a
/// primary gone silent. A call dropped after waiting 100 ms (or half the response
/// timeout, if shorter) — far beyond a healthy round trip — counts as one that timed
/// out: the connection is forgotten and the next call asks Sentinel again.
pub(crate) struct CallWatch<'a> {
    conn: &'a SentinelConn,
    generation: u64,
    started: std::time::Instant,
    done: bool,
}

impl<'a> CallWatch<'a> {
    pub(crate) fn new(conn: &'a SentinelConn, generation: u64) -> Self {
        CallWatch {
            conn,
            generation,
            started: std::time::Instant::now(),
            done: false,
        }
    }

    pub(crate) fn done(mut self) {
        self.done = true;
    }
}

impl Drop for CallWatch<'_> {
    fn drop(&mut self) {
        let suspect = (self.conn.response_timeout / 2).min(Duration::from_millis(100));
        if !self.done && self.started.elapsed() >= suspect {
            self.conn.forget(self.generation);
        }
    }
}

/// Runs `$body` (a `RedisResult`) with `$c` bound to the concrete connection.
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            Conn::Single(mut $c) => $body,
            Conn::Cluster(mut $c) => $body,
            Conn::Sentinel(s) => match s.get().await {
                Ok((generation, mut $c)) => {
                    let watch = $crate::store::CallWatch::new(&s, generation);
                    let r = $body;
                    watch.done();
                    if let Err(e) = &r {
                        s.check(generation, e);
                    }
                    r
                }
                Err(e) => Err(e),
            },
        }
    };
}
pub(crate) use with_conn;

/// Whether a TLS handshake refused the peer (a certificate problem) somewhere in the
/// error's chain.
fn tls_refused(e: &redis::RedisError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some()
            || err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        cur = err.source();
    }
    e.to_string().contains("certificate")
}

/// Converts a redis-rs error, keeping it as the source and classifying it.
pub(crate) fn backend_error(operation: &'static str, e: redis::RedisError) -> Error {
    // Credentials and configuration do not fix themselves: those are permanent even
    // where redis-rs would reconnect and try again.
    // So are certificates a TLS handshake refused.
    let bad_certificate = tls_refused(&e);
    let permanent = bad_certificate
        || matches!(
            e.kind(),
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig
        )
        || e.code()
            .is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS" || c == "NOPERM");
    // Server states that pass (a busy script, loading, out of memory, a failover).
    let busy = e.code().is_some_and(|c| {
        matches!(
            c,
            "BUSY"
                | "LOADING"
                | "OOM"
                | "MISCONF"
                | "NOREPLICAS"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "READONLY"
        )
    });
    let transient = !permanent
        && (busy
            || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
            || e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal());
    if e.is_timeout() {
        return Error::Timeout {
            backend: BACKEND,
            operation,
            after: Duration::ZERO,
        };
    }
    Error::backend(BACKEND, operation, transient, e)
}

/// Credentials and database for the data nodes found through Sentinel.
#[derive(Clone)]
pub(crate) struct NodeAuth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct Target {
    pub urls: Vec<String>,
    pub cluster: bool,
    /// With Sentinel: `urls` are the sentinels', and this is the monitored service.
    pub sentinel_service: Option<String>,
    /// A PEM root certificate to trust for `rediss://` instead of the system's.
    pub root_cert: Option<Vec<u8>>,
    /// With Sentinel: how to log in to the data nodes (the sentinels' own credentials
    /// come from their URLs).
    pub node_auth: Option<NodeAuth>,
    pub connection_timeout: Duration,
    pub response_timeout: Duration,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field("cluster", &self.cluster)
            .field("sentinel_service", &self.sentinel_service)
            .field("node_auth", &self.node_auth.as_ref().map(|_| "***"))
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

impl Default for Target {
    fn default() -> Self {
        Target {
            urls: vec!["redis://127.0.0.1:6379".to_string()],
            cluster: false,
            sentinel_service: None,
            root_cert: None,
            node_auth: None,
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_millis(500),
        }
    }
}

/// The connection settings both builders share (each has a `target: Target`), written
/// once so that they cannot drift apart.
macro_rules! connection_methods {
    () => {
        /// One server: `redis://[user:password@]host[:port][/db]`, or `rediss://…` for
        /// TLS (default `redis://127.0.0.1:6379`).
        #[must_use]
        pub fn url(mut self, url: impl Into<String>) -> Self {
            self.target.urls = vec![url.into()];
            self.target.cluster = false;
            self.target.sentinel_service = None;
            self
        }

        /// A Redis Cluster, from any of its nodes (seed URLs).
        #[must_use]
        pub fn cluster<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> Self {
            self.target.urls = urls.into_iter().map(Into::into).collect();
            self.target.cluster = true;
            self.target.sentinel_service = None;
            self
        }

        /// The primary of `service`, found through these Redis Sentinels, and found
        /// again after a failover.
        #[must_use]
        pub fn sentinel<I: IntoIterator<Item = S>, S: Into<String>>(
            mut self,
            sentinel_urls: I,
            service: impl Into<String>,
        ) -> Self {
            self.target.urls = sentinel_urls.into_iter().map(Into::into).collect();
            self.target.cluster = false;
            self.target.sentinel_service = Some(service.into());
            self
        }

        /// With [`sentinel`](Self::sentinel): the ACL user, password and database of
        /// the data nodes (the sentinels' own credentials go in their URLs).
        #[must_use]
        pub fn sentinel_node_auth(
            mut self,
            username: Option<&str>,
            password: Option<&str>,
            db: i64,
        ) -> Self {
            self.target.node_auth = Some($crate::store::NodeAuth {
                username: username.map(str::to_string),
                password: password.map(str::to_string),
                db,
            });
            self
        }

        /// Trusts this PEM root certificate for `rediss://` URLs (default: the
        /// system's trust store).
        #[must_use]
        pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
            self.target.root_cert = Some(pem.into());
            self
        }

        /// How long to wait for a connection (default 2 s).
        #[must_use]
        pub fn connection_timeout(mut self, d: std::time::Duration) -> Self {
            self.target.connection_timeout = d;
            self
        }

        /// How long to wait for a reply (default 500 ms).
        #[must_use]
        pub fn response_timeout(mut self, d: std::time::Duration) -> Self {
            self.target.response_timeout = d;
            self
        }
    };
}
pub(crate) use connection_methods;

impl Target {
    /// A client for one node, with TLS when the URL says `rediss://`.
    pub(crate) fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        install_tls_provider();
        match &self.root_cert {
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(url),
        }
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1))
    }

    pub(crate) async fn connect(&self) -> Result<Conn> {
        let fail = |e| backend_error("connect", e);
        if let Some(service) = &self.sentinel_service {
            let node = self.node_auth.as_ref().map(|a| {
                let mut info = redis::RedisConnectionInfo::default().set_db(a.db);
                if let Some(u) = &a.username {
                    info = info.set_username(u);
                }
                if let Some(p) = &a.password {
                    info = info.set_password(p);
                }
                redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info)
            });
            let sentinel = SentinelClient::build(
                self.urls.clone(),
                service.clone(),
                node,
                SentinelServerType::Master,
            )
            .map_err(fail)?;
            let conn = Arc::new(SentinelConn {
                sentinel: tokio::sync::Mutex::new(sentinel),
                current: std::sync::Mutex::new(None),
                generation: std::sync::atomic::AtomicU64::new(0),
                failed_at: std::sync::Mutex::new(None),
                config: self.manager_config(),
                response_timeout: self.response_timeout,
            });
            conn.get().await.map_err(fail)?;
            return Ok(Conn::Sentinel(conn));
        }
        if self.cluster {
            install_tls_provider();
            let mut builder = redis::cluster::ClusterClient::builder(self.urls.clone())
                .connection_timeout(self.connection_timeout)
                .response_timeout(self.response_timeout);
            if let Some(pem) = &self.root_cert {
                builder = builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                });
            }
            let client = builder.build().map_err(fail)?;
            Ok(Conn::Cluster(
                client.get_async_connection().await.map_err(fail)?,
            ))
        } else {
            let url = self
                .urls
                .first()
                .ok_or_else(|| Error::InvalidArgument("a Redis URL is required".into()))?;
            let client = self.client(url).map_err(fail)?;
            let config = self.manager_config();
            Ok(Conn::Single(
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(fail)?,
            ))
        }
    }
}

/// Configures a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    target: Target,
    namespace: String,
    codec: Codec,
    max_value_size: usize,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        RedisStoreBuilder {
            target: Target::default(),
            namespace: "flags".to_string(),
            codec: Codec::default(),
            max_value_size: 512 << 20,
        }
    }
}

impl RedisStoreBuilder {
    connection_methods!();

    /// The key prefix: entries live at `<namespace>:{<flag key>}` (default `flags`).
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
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

    /// Connects (and authenticates).
    ///
    /// # Errors
    /// A transient `Error::Backend` when the server cannot be reached; a permanent one
    /// for a bad URL or refused credentials.
    pub async fn build(self) -> Result<RedisStore> {
        let conn = self.target.connect().await?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                target: self.target,
                prefix: format!("{}:{{", self.namespace),
                lock_prefix: format!("{}:lock:{{", self.namespace),
                absent_prefix: format!("{}:absent:{{", self.namespace),
                release_channel: format!("{}:lock:released", self.namespace),
                codec: self.codec,
                max_value_size: self.max_value_size,
                put: scripts::put(),
                get_checked: scripts::get_checked(),
            }),
        })
    }
}

/// A dedicated pub/sub connection subscribed to `channel`: on the `attempt`-th node
/// given (modulo their number — a reconnecting subscriber rotates through a cluster's
/// seeds), or on the current primary when connected through Sentinel.
pub(crate) async fn open_pubsub(
    conn: &Conn,
    target: &Target,
    attempt: usize,
    channel: &str,
) -> Result<redis::aio::PubSub> {
    let client = match conn {
        Conn::Sentinel(s) => s
            .primary_client()
            .await
            .map_err(|e| backend_error("subscribe", e))?,
        _ => {
            let url = target
                .urls
                .get(attempt % target.urls.len().max(1))
                .cloned()
                .ok_or_else(|| Error::InvalidArgument("a Redis URL is required".into()))?;
            target
                .client(&url)
                .map_err(|e| backend_error("subscribe", e))?
        }
    };
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|e| backend_error("subscribe", e))?;
    pubsub
        .subscribe(channel)
        .await
        .map_err(|e| backend_error("subscribe", e))?;
    Ok(pubsub)
}

struct Inner {
    conn: Conn,
    target: Target,
    prefix: String,
    lock_prefix: String,
    /// Of the markers a lock holder leaves when the source has no such flag.
    absent_prefix: String,
    /// Where lock holders announce a release (see [`crate::RedisLock`]).
    release_channel: String,
    codec: Codec,
    max_value_size: usize,
    put: Script,
    get_checked: Script,
}

/// A [`FlagStore`] on Redis or Valkey, single node or cluster.
///
/// - Entries live at `<namespace>:{<flag key>}`: the hash tag is the flag key, so a
///   flag and its lock share a slot while flags spread over the cluster.
/// - `put` is one Lua script (loaded once, called by `EVALSHA`, reloaded on `NOSCRIPT`):
///   it compares versions on the server and writes with `PX` only when the key is
///   absent, unreadable, or older — atomic per key.
/// - `get_checked` is one script too; `get_many` is one `MGET` (split per node by the
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
            .field("target", &self.inner.target)
            .field("prefix", &self.inner.prefix)
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
    fn key_arg<'a>(&'a self, key: &'a FlagKey) -> KeyArg<'a> {
        KeyArg {
            prefix: &self.inner.prefix,
            key,
        }
    }

    /// The Redis key of a flag: `<namespace>:{<flag key>}`.
    pub fn redis_key(&self, key: &FlagKey) -> String {
        let mut k = String::with_capacity(self.inner.prefix.len() + key.as_str().len() + 1);
        k.push_str(&self.inner.prefix);
        k.push_str(key.as_str());
        k.push('}');
        k
    }

    /// The Redis key of a flag's stampede lock: `<namespace>:lock:{<flag key>}`, in
    /// the same cluster slot as the flag.
    pub fn lock_key(&self, key: &FlagKey) -> String {
        format!("{}{}}}", self.inner.lock_prefix, key.as_str())
    }

    /// The key of the marker a lock holder leaves for a flag the source does not
    /// have: `<namespace>:absent:{<flag key>}`, in the flag's slot.
    pub(crate) fn absent_key(&self, key: &FlagKey) -> String {
        format!("{}{}}}", self.inner.absent_prefix, key.as_str())
    }

    /// Whether the flag's absence marker shares its entry's (and lock's) cluster slot:
    /// always, unless the key begins with `}` — an empty hash tag, under which each
    /// key hashes whole. Such keys get no marker.
    pub(crate) fn has_absent_marker(key: &FlagKey) -> bool {
        !key.as_str().starts_with('}')
    }

    /// The flag's entry, and whether a lock holder marked it absent — one round trip.
    pub(crate) async fn get_or_absent(&self, key: &FlagKey) -> Result<(Option<Entry>, bool)> {
        if !Self::has_absent_marker(key) {
            return Ok((self.get(key).await?, false));
        }
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.key_arg(key)).arg(self.absent_key(key));
        let raw: Vec<Option<Vec<u8>>> = self.query("get", &cmd).await?;
        let mut raw = raw.into_iter();
        let entry = raw
            .next()
            .flatten()
            .map(|b| self.decode(key, b))
            .transpose()?;
        Ok((entry, raw.next().flatten().is_some()))
    }

    /// The channel lock holders publish a released lock's key on.
    pub(crate) fn release_channel(&self) -> &str {
        &self.inner.release_channel
    }

    /// A pub/sub connection subscribed to `channel`, on this store's server (the
    /// `attempt`-th node given, modulo their number; the primary through Sentinel).
    pub(crate) async fn open_pubsub(
        &self,
        channel: &str,
        attempt: usize,
    ) -> Result<redis::aio::PubSub> {
        open_pubsub(&self.inner.conn, &self.inner.target, attempt, channel).await
    }

    /// The longest one call may take: connecting, then answering.
    pub(crate) fn call_limit(&self) -> Duration {
        self.inner.target.connection_timeout + self.inner.target.response_timeout
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

    fn decode(&self, key: &FlagKey, bytes: Vec<u8>) -> Result<Entry> {
        self.inner
            .codec
            .decode_entry(Bytes::from(bytes))
            .map_err(|e| e.with_key(key))
    }

    /// `MGET` of `keys`: one answer per key, in order.
    async fn mget(
        &self,
        operation: &'static str,
        keys: &[FlagKey],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for k in keys {
            cmd.arg(self.key_arg(k));
        }
        let raw: Vec<Option<Vec<u8>>> = self.query(operation, &cmd).await?;
        if raw.len() != keys.len() {
            // A reply out of step with its request, not corrupt entries: nothing to
            // delete, and worth retrying.
            return Err(Error::backend(
                BACKEND,
                operation,
                true,
                std::io::Error::other(format!(
                    "MGET of {} keys answered {} values",
                    keys.len(),
                    raw.len()
                )),
            ));
        }
        Ok(raw)
    }

    pub(crate) fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        with_conn!(self.conn(), c => cmd.query_async(&mut c).await)
            .map_err(|e| backend_error(operation, e))
    }

    pub(crate) async fn script(
        &self,
        operation: &'static str,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<Value> {
        async fn run(
            inv: &redis::ScriptInvocation<'_>,
            c: &mut impl ConnectionLike,
        ) -> redis::RedisResult<Value> {
            inv.invoke_async(c).await
        }
        with_conn!(self.conn(), c => run(&inv, &mut c).await)
            .map_err(|e| backend_error(operation, e))
    }
}

#[async_trait]
impl FlagStore for RedisStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_put: true,
            batch_get: true,
            native_get_checked: true,
            shared: true,
            max_value_size: Some(self.inner.max_value_size),
            ..Default::default()
        }
    }

    fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        let raw: Option<Vec<u8>> = self
            .query("get", redis::cmd("GET").arg(self.key_arg(key)))
            .await
            .map_err(|e| e.with_key(key))?;
        raw.map(|b| self.decode(key, b)).transpose()
    }

    async fn get_many(&self, keys: &[FlagKey]) -> Result<Vec<Option<Entry>>> {
        let raw = self.mget("get_many", keys).await?;
        // One unreadable entry is a miss in its slot, not a failed batch.
        Ok(keys
            .iter()
            .zip(raw)
            .map(|(k, b)| b.and_then(|b| self.decode(k, b).ok()))
            .collect())
    }

    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        match self.mget("get", keys).await {
            Ok(raw) => keys
                .iter()
                .zip(raw)
                .map(|(k, b)| b.map(|b| self.decode(k, b)).transpose())
                .collect(),
            Err(e) => keys.iter().map(|k| Err(e.clone().with_key(k))).collect(),
        }
    }

    /// One server (a primary, found through Sentinel or not) answers every key: one
    /// group. A cluster's `MGET` would span nodes and fail together when one is down,
    /// so on a cluster reads are not batched.
    fn read_group(&self, _key: &FlagKey) -> Option<u64> {
        (!matches!(self.inner.conn, Conn::Cluster(_))).then_some(0)
    }

    async fn get_checked(&self, key: &FlagKey, expected: Version) -> Result<Checked> {
        let script = &self.inner.get_checked;
        let mut inv = script.prepare_invoke();
        inv.key(self.redis_key(key))
            .arg(self.layout())
            .arg(self.version_arg(expected));
        let reply = self
            .script("get_checked", inv)
            .await
            .map_err(|e| e.with_key(key))?;
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
        let ttl = ttl_millis(ttl, Duration::from_millis(1))?;
        let bytes = self
            .inner
            .codec
            .encode_entry(entry)
            .map_err(|e| e.with_key(key))?;
        if bytes.len() > self.inner.max_value_size {
            return Err(Error::ValueTooLarge {
                key: key.to_string(),
                size: bytes.len(),
                limit: self.inner.max_value_size,
                backend: BACKEND,
            });
        }
        let script = &self.inner.put;
        let mut inv = script.prepare_invoke();
        inv.key(self.redis_key(key))
            .arg(self.layout())
            .arg(&bytes[..])
            .arg(self.version_arg(entry.version))
            .arg(ttl);
        let reply = self.script("put", inv).await.map_err(|e| e.with_key(key))?;
        match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(1)] => Ok(PutOutcome::Stored),
                [Value::Int(0), v] => Ok(PutOutcome::Superseded {
                    current: self.version_from(v)?,
                }),
                other => Err(Error::corrupt(format!("unexpected put reply {other:?}"))),
            },
            other => Err(Error::corrupt(format!("unexpected put reply {other:?}"))),
        }
    }

    async fn delete(&self, key: &FlagKey) -> Result<()> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.redis_key(key));
        if Self::has_absent_marker(key) {
            // A flag dropped everywhere (just created, say) is no longer "absent".
            cmd.arg(self.absent_key(key));
        }
        let _: i64 = self
            .query("delete", &cmd)
            .await
            .map_err(|e| e.with_key(key))?;
        Ok(())
    }
}

/// redis-rs uses rustls without choosing a crypto provider: install ring's once.
fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another provider installed by the application is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A flag's Redis key (see [`RedisStore::redis_key`]) as one command argument.
struct KeyArg<'a> {
    prefix: &'a str,
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
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.key.as_str().as_bytes());
        let _ = arg.write_all(b"}");
    }
}
