//! Building a [`MemcachedStore`]: its settings, the server list parsed at build, and
//! the probe of every server at build (reachable at all? its largest item,
//! `item_size_max`).

use std::time::Duration;

use flagcache_core::{Codec, Error, Result};

use crate::meta::{backend_error_at, Meta};
use crate::store::Settings;
use crate::{MemcachedStore, BACKEND};

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
    /// One server: `host:port`, `tcp://host:port`, `memcached://host:port` (the three
    /// name the same server, and the same place on the ring), or `unix:///path`.
    /// Checked by [`build`](Self::build).
    #[must_use]
    pub fn server(self, url: impl Into<String>) -> Self {
        self.servers([url])
    }

    /// Several servers, each as for [`server`](Self::server), spread by a
    /// consistent-hash ring.
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

    /// Parses the server list, then connects to every server once: to fail early when
    /// none can be reached (a wrong address), and to read each one's item size limit.
    /// A server that does not answer at build is kept in the ring and logged: its
    /// keys fail (and trip that server's own breaker in `FlagCache`) until it answers — a replica that starts while one server restarts must
    /// not place keys differently from the others.
    ///
    /// # Errors
    /// A permanent `Error::InvalidArgument` with no servers, or for an entry that is
    /// not one of the accepted forms (the entry and the forms are named); a transient
    /// `Error::Backend` (naming the server) or `Error::Timeout` when no server can be
    /// reached.
    pub async fn build(self) -> Result<MemcachedStore> {
        if self.servers.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one memcached server is required".into(),
            ));
        }
        let servers = self
            .servers
            .iter()
            .map(|s| parse_server(s))
            .collect::<Result<Vec<_>>>()?;
        let meta = Meta::new(&servers, self.pool_size, self.timeout);
        // Every server probed at once: servers that are down cost one timeout in all,
        // not one each.
        let want_limit = self.item_size_limit.is_none();
        let probes = meta.pools().iter().map(|pool| async move {
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
                    Err(backend_error_at("connect", pool.url(), e))
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
        Ok(MemcachedStore::new(
            meta,
            Settings {
                namespace: self.namespace,
                codec: self.codec,
                item_size_limit,
                cas_attempts: self.cas_attempts,
                max_chunks: self.max_chunks,
            },
        ))
    }
}

/// The forms a server entry may take, for errors.
const ACCEPTED_FORMS: &str = "host:port, tcp://host:port, memcached://host:port or unix:///path";

/// A server entry in the form the client connects to and the ring hashes:
/// `tcp://host:port` for the three TCP forms, so that they name the same server and
/// the same place on the ring; `unix://…` as given.
fn parse_server(entry: &str) -> Result<String> {
    let refuse = |why: &str| {
        Error::InvalidArgument(
            format!("memcached server {entry:?}: {why}; accepted forms: {ACCEPTED_FORMS}").into(),
        )
    };
    let text = entry.trim();
    if text.is_empty() {
        return Err(refuse("empty"));
    }
    if let Some(path) = text.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(refuse("no socket path"));
        }
        return Ok(text.to_string());
    }
    let addr = text
        .strip_prefix("tcp://")
        .or_else(|| text.strip_prefix("memcached://"))
        .unwrap_or(text);
    if addr.contains("://") {
        return Err(refuse("unknown scheme"));
    }
    let addr = addr.strip_suffix('/').unwrap_or(addr);
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(refuse("no port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(refuse("the port is not a number from 1 to 65535")),
    }
    if !is_host(host) {
        return Err(refuse("not a host name or IP address"));
    }
    Ok(format!("tcp://{host}:{port}"))
}

/// Whether `host` is an IPv4 address, a bracketed IPv6 address, or a DNS name
/// (dot-separated labels of letters, digits, `-` and `_`).
fn is_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
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
