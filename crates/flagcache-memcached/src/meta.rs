//! The raw meta protocol: keys as they go on the wire, one command (`mg`, `ms`, `md`,
//! `ma`) run on the right server's pooled connection, and its reply or refusal mapped
//! to this crate's errors. The store, the invalidation log and the recache path all
//! send their commands through [`Meta`].

use std::time::Duration;

use async_memcached::{MetaProtocol, MetaValue, Status};
use base64::Engine;
use bytes::Bytes;
use flagcache_core::{now_ms, ttl_millis, Error, Result};

use crate::pool::Pool;
use crate::ring::Ring;
use crate::BACKEND;

/// memcached's longest key.
const MAX_KEY: usize = 250;
/// memcached reads an exptime beyond this as an absolute Unix time.
const THIRTY_DAYS_SECS: u64 = 30 * 24 * 3600;
/// The operation name of `ma`, which is never retried.
const RAW_INCR: &str = "raw incr";

/// A key as sent: plain when it is printable ASCII, else base64 with the `b` flag.
pub(crate) struct WireKey {
    pub(crate) text: String,
    pub(crate) base64: bool,
}

impl WireKey {
    /// A plain ASCII key that is not a flag (the invalidation log's, a chunk's).
    pub(crate) fn plain(text: String) -> Self {
        WireKey {
            text,
            base64: false,
        }
    }

    /// The wire form of `raw`: itself when memcached takes it as is, else base64, else
    /// (too long either way) a fixed-length digest `<internal prefix>#<32 hex digits>`
    /// (128 bits: two independent 64-bit hashes). The internal prefix, which
    /// `internal_prefix` gives only in that last case, keeps the digest, like every
    /// internal key, out of the flags' key space.
    pub(crate) fn encode(raw: String, internal_prefix: impl FnOnce() -> String) -> Self {
        if raw.len() <= MAX_KEY && raw.bytes().all(|b| b.is_ascii_graphic()) {
            return WireKey::plain(raw);
        }
        let text = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
        if text.len() <= MAX_KEY {
            return WireKey { text, base64: true };
        }
        WireKey::plain(format!(
            "{}#{:016x}{:016x}",
            internal_prefix(),
            crate::ring::hash(raw.as_bytes()),
            crate::ring::hash(&[raw.as_bytes(), b"\x00flagcache"].concat()),
        ))
    }

    /// `flags`, with `b` added when the key is base64.
    fn flags(&self, mut flags: Vec<String>) -> Vec<String> {
        if self.base64 {
            flags.push("b".into());
        }
        flags
    }
}

/// Which server a raw command goes to.
#[derive(Clone, Copy)]
pub(crate) enum Route<'a> {
    /// The one the ring assigns to this key.
    Key(&'a WireKey),
    /// The first server given (where the invalidation log lives).
    First,
}

/// TTL as memcached wants it: seconds, or an absolute Unix time past 30 days.
pub(crate) fn exptime(ttl: Duration) -> Result<u64> {
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

/// A decimal number as memcached stores counters (`ma`) and as the log keeps its epoch.
pub(crate) fn parse_number(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// Converts an async-memcached error: connection and I/O failures are transient.
pub(crate) fn backend_error(operation: &'static str, e: async_memcached::Error) -> Error {
    let transient = is_transient(&e);
    Error::backend(BACKEND, operation, transient, Wrapped(e.to_string()))
}

/// As [`backend_error`], for an error met at `server` (named in the error).
pub(crate) fn backend_error_at(
    operation: &'static str,
    server: &str,
    e: async_memcached::Error,
) -> Error {
    let transient = is_transient(&e);
    Error::backend(
        BACKEND,
        operation,
        transient,
        Wrapped(format!("{server}: {e}")),
    )
}

/// Connection and I/O failures are transient; the rest are not.
fn is_transient(e: &async_memcached::Error) -> bool {
    matches!(
        e,
        async_memcached::Error::Connect(_)
            | async_memcached::Error::Io(_)
            | async_memcached::Error::ConnectionClosed
    )
}

/// async-memcached's error, kept as text (its type is not `Sync`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Wrapped(String);

/// A refusal status from the server, as an error source.
#[derive(Debug, thiserror::Error)]
#[error("memcached refused: {0:?}")]
struct Refused(Status);

fn protocol(operation: &'static str, status: Status) -> Error {
    Error::backend(BACKEND, operation, false, Refused(status))
}

/// The server refused the command with one of `statuses`.
fn refused_with(e: &Error, statuses: &[Status]) -> bool {
    match e {
        Error::Backend { source, .. } => source
            .downcast_ref::<Refused>()
            .is_some_and(|Refused(s)| statuses.contains(s)),
        _ => false,
    }
}

/// A refusal (absent, another CAS, not stored) is fine; a transient failure is not.
fn refusal_is_fine(r: Result<()>) -> Result<()> {
    r.or_else(|e| if e.is_transient() { Err(e) } else { Ok(()) })
}

/// One meta command in flight on a borrowed connection.
type MetaCall<'c, R> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = std::result::Result<R, async_memcached::Error>>
            + Send
            + 'c,
    >,
>;

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

fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// The servers, their pools and the time limit of each call: every meta command goes
/// through here.
#[derive(Debug)]
pub(crate) struct Meta {
    ring: Ring,
    pools: Vec<Pool>,
    timeout: Duration,
}

impl Meta {
    /// A pool of `pool_size` connections per server in `servers` (not connected yet),
    /// spread by a consistent-hash ring in the order given.
    pub(crate) fn new(servers: &[String], pool_size: usize, timeout: Duration) -> Self {
        Meta {
            ring: Ring::new(servers),
            pools: servers
                .iter()
                .map(|u| Pool::new(u.clone(), pool_size))
                .collect(),
            timeout,
        }
    }

    pub(crate) fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The index of the server that holds `wire`.
    pub(crate) fn server_for(&self, wire: &WireKey) -> usize {
        self.ring.server_for(wire.text.as_bytes())
    }

    fn pool(&self, route: Route<'_>) -> &Pool {
        match route {
            Route::Key(w) => &self.pools[self.server_for(w).min(self.pools.len() - 1)],
            Route::First => &self.pools[0],
        }
    }

    /// `mg <key> v c`: the entry and its CAS token, read for `operation` (`"get"`, or
    /// the `"put"` whose compare-and-swap reads it first), which errors name.
    pub(crate) async fn get(
        &self,
        operation: &'static str,
        wire: &WireKey,
    ) -> Result<Option<MetaValue>> {
        // Fixed flags, built once: each attempt allocates only its own copy of the
        // key (and the boxed call).
        let flags: &'static [&'static str] = if wire.base64 {
            &["v", "c", "b"]
        } else {
            &["v", "c"]
        };
        self.run(self.pool(Route::Key(wire)), operation, |c| {
            let k = wire.text.clone();
            Box::pin(async move { c.meta_get(k.as_bytes(), false, None, Some(flags)).await })
        })
        .await
    }

    /// `mg <key> <flags>` on the key's server.
    pub(crate) async fn get_with(
        &self,
        operation: &'static str,
        wire: &WireKey,
        flags: Vec<String>,
    ) -> Result<Option<MetaValue>> {
        self.mg(Route::Key(wire), operation, wire, flags).await
    }

    /// `mg <key> v c [b] k q` for every key of `batch` in one pipeline closed by `mn`,
    /// on `route`'s server (every key of the batch is on it, and `base64` says how
    /// they are all encoded): the entries found, each with its key.
    pub(crate) async fn get_multi(
        &self,
        operation: &'static str,
        route: &WireKey,
        batch: Vec<String>,
        base64: bool,
    ) -> Result<Vec<MetaValue>> {
        let flags: &'static [&'static str] = if base64 {
            &["v", "c", "b"]
        } else {
            &["v", "c"]
        };
        self.run(self.pool(Route::Key(route)), operation, move |c| {
            let batch = batch.clone();
            Box::pin(async move { c.meta_get_multi(&batch, Some(flags)).await })
        })
        .await
    }

    /// `ms <key> T<exptime> C<cas>`, or in add mode (`ME`) without a CAS: `false` when
    /// the server refuses it — the CAS does not match (`EX`) or the key is gone (`NF`),
    /// or in add mode the key exists (`NS`).
    pub(crate) async fn set(
        &self,
        wire: &WireKey,
        bytes: &Bytes,
        exptime: u64,
        cas: Option<u64>,
    ) -> Result<bool> {
        let mut flags = vec![format!("T{exptime}")];
        match cas {
            Some(c) => flags.push(format!("C{c}")),
            None => flags.push("ME".to_string()),
        }
        let written = self
            .ms(Route::Key(wire), "put", wire, bytes.to_vec(), flags)
            .await;
        match written {
            Ok(()) => Ok(true),
            Err(e) if refused_with(&e, &[Status::Exists, Status::NotStored, Status::NotFound]) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// `md <key>`: an absent key is fine.
    pub(crate) async fn delete(&self, wire: &WireKey) -> Result<()> {
        match self.md(Route::Key(wire), "delete", wire, Vec::new()).await {
            Err(e) if refused_with(&e, &[Status::NotFound]) => Ok(()),
            r => r,
        }
    }

    /// `md <key> <flags>`, where a refusal (NF: absent; EX: another CAS) is fine.
    pub(crate) async fn delete_with(
        &self,
        operation: &'static str,
        wire: &WireKey,
        flags: Vec<String>,
    ) -> Result<()> {
        refusal_is_fine(self.md(Route::Key(wire), operation, wire, flags).await)
    }

    /// `stats` on the `server`-th server: its statistics, by memcached's names.
    pub(crate) async fn stats(
        &self,
        server: usize,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let pool = self
            .pools
            .get(server)
            .ok_or_else(|| Error::InvalidArgument("no such memcached server".into()))?;
        self.run(pool, "stats", |c| {
            Box::pin(async move { Ok(c.stats().await?.into_iter().collect()) })
        })
        .await
    }

    /// `mg <key> v` on `route`'s server.
    pub(crate) async fn raw_get(&self, route: Route<'_>, key: &WireKey) -> Result<Option<Vec<u8>>> {
        self.mg(route, "raw get", key, vec!["v".into()])
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
        self.ms(route, "raw set", key, value, vec![format!("T{exptime}")])
            .await
    }

    /// `ms <key> ME` (add: only if absent; losing is fine) on `route`'s server, no TTL.
    pub(crate) async fn raw_add(
        &self,
        route: Route<'_>,
        key: &WireKey,
        value: Vec<u8>,
    ) -> Result<()> {
        let flags = vec!["ME".into(), "T0".into()];
        refusal_is_fine(self.ms(route, "raw add", key, value, flags).await)
    }

    /// `ma <key> N0 J1 v` on `route`'s server: the counter's new value (1 when it was
    /// created by this call).
    pub(crate) async fn raw_incr(&self, route: Route<'_>, key: &WireKey) -> Result<u64> {
        let k = key.text.clone();
        let v = self
            .run(self.pool(route), RAW_INCR, move |c| {
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

    /// `mg <key> <flags> [b]` on `route`'s server.
    async fn mg(
        &self,
        route: Route<'_>,
        operation: &'static str,
        key: &WireKey,
        flags: Vec<String>,
    ) -> Result<Option<MetaValue>> {
        let (k, flags) = (key.text.clone(), key.flags(flags));
        self.run(self.pool(route), operation, move |c| {
            let (k, flags) = (k.clone(), flags.clone());
            Box::pin(async move {
                c.meta_get(k.as_bytes(), false, None, Some(&as_strs(&flags)))
                    .await
            })
        })
        .await
    }

    /// `ms <key> <flags> [b]` on `route`'s server.
    async fn ms(
        &self,
        route: Route<'_>,
        operation: &'static str,
        key: &WireKey,
        value: Vec<u8>,
        flags: Vec<String>,
    ) -> Result<()> {
        let (k, flags) = (key.text.clone(), key.flags(flags));
        self.run(self.pool(route), operation, move |c| {
            let (k, value, flags) = (k.clone(), value.clone(), flags.clone());
            Box::pin(async move {
                c.meta_set(
                    k.as_bytes(),
                    value.as_slice(),
                    false,
                    None,
                    Some(&as_strs(&flags)),
                )
                .await
            })
        })
        .await
        .map(drop)
    }

    /// `md <key> <flags> [b]` on `route`'s server.
    async fn md(
        &self,
        route: Route<'_>,
        operation: &'static str,
        key: &WireKey,
        flags: Vec<String>,
    ) -> Result<()> {
        let (k, flags) = (key.text.clone(), key.flags(flags));
        self.run(self.pool(route), operation, move |c| {
            let (k, flags) = (k.clone(), flags.clone());
            Box::pin(async move {
                let f = as_strs(&flags);
                c.meta_delete(
                    k.as_bytes(),
                    false,
                    None,
                    if f.is_empty() { None } else { Some(&f) },
                )
                .await
            })
        })
        .await
        .map(drop)
    }

    /// Runs one meta command on `pool`'s server.
    ///
    /// A pooled connection may have died while idle (its server restarted): when the
    /// command fails on one with an I/O error, the pool's other idle connections are
    /// dropped (they died with it) and the command runs once more on a new connection.
    /// Never for `ma`, which is not idempotent.
    async fn run<F, R>(&self, pool: &Pool, operation: &'static str, f: F) -> Result<R>
    where
        F: for<'c> Fn(&'c mut async_memcached::Client) -> MetaCall<'c, R>,
    {
        match self.run_once(pool, operation, &f).await {
            Err(Failed::OnIdleConnection(e)) if operation != RAW_INCR => {
                tracing::debug!(server = pool.url(), error = %e,
                    "a pooled memcached connection was dead; retrying on a new one");
                pool.drain_idle();
                self.run_once(pool, operation, &f)
                    .await
                    .map_err(Failed::into_error)
            }
            r => r.map_err(Failed::into_error),
        }
    }

    async fn run_once<F, R>(
        &self,
        pool: &Pool,
        operation: &'static str,
        f: &F,
    ) -> std::result::Result<R, Failed>
    where
        F: for<'c> Fn(&'c mut async_memcached::Client) -> MetaCall<'c, R>,
    {
        let limit = self.timeout;
        let timed_out = || {
            Failed::Other(Error::Timeout {
                backend: BACKEND,
                operation,
                after: limit,
            })
        };
        // One limit for the wait for a connection and the call together. On a
        // timeout the lease is dropped with its connection: it may hold a half-read
        // reply.
        let attempt = async {
            let mut lease = pool
                .get()
                .await
                .map_err(|e| Failed::Other(backend_error(operation, e)))?;
            let Some(client) = lease.client() else {
                return Err(Failed::Other(Error::Closed("memcached connection")));
            };
            let answer = f(client).await;
            Ok((lease, answer))
        };
        let (lease, answer) = tokio::time::timeout(limit, attempt)
            .await
            .map_err(|_| timed_out())??;
        let reused = lease.reused();
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
}
