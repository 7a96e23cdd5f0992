//! Building a [`MemcachedStore`]: its settings, and the probe of every server at build
//! (reachable at all? its largest item, `item_size_max`).

use std::time::Duration;

use flagcache_core::{Codec, Error, Result};

use crate::meta::{backend_error, Meta};
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
        let meta = Meta::new(&self.servers, self.pool_size, self.timeout);
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
