//! One URL picks the backend: [`connect`] builds the store, the invalidator and the
//! cross-process coalescer a [`FlagCache`](crate::FlagCache) needs; [`Backend`] hands them to a cache.

mod url;

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::coalesce::Coalescer;
use crate::fleet::FleetRegistry;
use crate::store::{FlagStore, Invalidator};
use crate::{Error, FlagCacheBuilder, Loader, Result};
use url::{Parsed, Scheme};

/// The environment variable [`Backend::from_env`] reads.
pub const URL_VAR: &str = "FLAGCACHE_URL";

/// Connects to the backend `url` names and returns what a [`FlagCache`](crate::FlagCache) needs.
///
/// | URL | backend (cargo feature) |
/// |---|---|
/// | `memory://` | a new in-process store and bus (`memory`) |
/// | `redis://[user:password@]host[:port][/db]` | one Redis or Valkey server (`redis`) |
/// | `rediss://…` | the same over TLS (`redis`) |
/// | `redis+sentinel://[user:password@]h1:26379,h2:26379/<service>[/db]` | the primary of `<service>`, found through Sentinel; the credentials and database are the data nodes' (`redis`) |
/// | `redis+cluster://[user:password@]h1:7000,h2:7001` | a Redis Cluster, from any of its nodes (`redis`) |
/// | `memcached://h1:11211,h2:11211` | memcached servers on a consistent-hash ring (`memcached`) |
///
/// Settings go in the query, `?namespace=checkout&layout=json`:
///
/// | setting | backends | meaning (default) |
/// |---|---|---|
/// | `namespace` | Redis, memcached | key prefix (`flags`) |
/// | `key_layout` | Redis | where a flag lives: `{ns}:{{key}}` (default), `{ns}:{key}` or `{{ns}}:{key}`, braces percent-escaped in the URL (`%7B`, `%7D`); see `redis::KeyLayout` |
/// | `layout` | all | `envelope` (default) or `json`: `{"flagConfig": …, "version": N}` and JSON invalidation messages |
/// | `channel` | Redis | the invalidation pub/sub channel (`flag_updates`) |
/// | `heartbeat` | Redis | heartbeat period, or `off` (`1s`; `off` with `layout=json`) |
/// | `heartbeat_window` | Redis | how long a node heartbeats after its last event (`5s`) |
/// | `connect_timeout`, `response_timeout` | Redis | `2s`, `500ms` |
/// | `tls_ca` | `rediss` | path of a PEM root certificate to trust instead of the system's |
/// | `sentinel_username`, `sentinel_password` | Sentinel | the sentinels' own credentials |
/// | `timeout` | memcached | per call, connecting included (`500ms`) |
/// | `pool_size` | memcached | connections per server (`16`) |
/// | `poll_interval` | memcached | how often the invalidation log is polled: the propagation bound (`100ms`) |
///
/// Durations are a whole number and a unit: `250ms`, `2s`, `1m`. Percent-escapes
/// (`%40` for `@`) work in the credentials and the settings.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> flagcache::Result<()> {
/// use flagcache::{FlagCache, FlagKey, Version};
///
/// let backend = flagcache::connect("memory://").await?;
/// let loader = |_key: FlagKey| async { Ok(Some((true, Version::new(1)))) };
/// let cache: FlagCache<bool> = backend.cache_builder(loader).build().await?;
/// assert_eq!(cache.get(&FlagKey::new("checkout")?).await?.as_deref(), Some(&true));
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::InvalidArgument`] for a URL that is not one of the forms above or an
/// unknown or malformed setting — naming the URL (its passwords redacted) and the
/// accepted forms or settings — and for a scheme whose cargo feature is off, naming
/// the feature. Otherwise what the backend's builder returns when it cannot connect,
/// authenticate or ping.
pub async fn connect(url: &str) -> Result<Backend> {
    let parsed = url::parse(url)?;
    let shown = parsed.shown.clone();
    let kind = match parsed.scheme {
        Scheme::Memory => memory(parsed)?,
        Scheme::Redis { .. } | Scheme::Sentinel | Scheme::Cluster => redis(parsed).await?,
        Scheme::Memcached => memcached(parsed).await?,
    };
    Ok(Backend { url: shown, kind })
}

/// The error for a scheme whose cargo feature is off.
#[allow(dead_code)] // every backend feature on
fn feature_off(parsed: &Parsed) -> Error {
    let feature = parsed.scheme.feature();
    Error::InvalidArgument(
        format!(
            "backend URL {:?} needs the cargo feature `{feature}` of flagcache: \
             flagcache = {{ features = [\"{feature}\"] }}",
            parsed.shown
        )
        .into(),
    )
}

/// A connected backend: the store (L2), an invalidator and, where the backend has one,
/// the cross-process coalescer. Cloning is cheap and shares the connections.
///
/// Build caches with [`cache_builder`](Backend::cache_builder): each cache gets its
/// own invalidation node, so several caches in one process hear each other's events.
#[derive(Clone)]
pub struct Backend {
    url: String,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    #[cfg(feature = "memory")]
    Memory {
        store: crate::memory::MemoryStore,
        bus: crate::memory::MemoryInvalidator,
        fleet: crate::memory::MemoryFleet,
    },
    #[cfg(feature = "redis")]
    Redis {
        store: crate::redis::RedisStore,
        bus: crate::redis::RedisInvalidator,
    },
    #[cfg(feature = "memcached")]
    Memcached {
        store: crate::memcached::MemcachedStore,
        log: crate::memcached::MemcachedInvalidator,
    },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Connects to the backend named by the environment variable `FLAGCACHE_URL`
    /// ([`URL_VAR`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the variable is unset or not UTF-8; otherwise as
    /// for [`connect`].
    pub async fn from_env() -> Result<Backend> {
        match std::env::var(URL_VAR) {
            Ok(url) => connect(&url).await,
            Err(e) => Err(Error::InvalidArgument(
                format!("{URL_VAR}: {e}; set it to a backend URL such as redis://host:6379").into(),
            )),
        }
    }

    /// As [`from_env`](Backend::from_env), connecting to `default` when
    /// `FLAGCACHE_URL` is unset.
    ///
    /// # Errors
    /// As for [`connect`].
    pub async fn from_env_or(default: &str) -> Result<Backend> {
        match std::env::var(URL_VAR) {
            Ok(url) => connect(&url).await,
            Err(std::env::VarError::NotPresent) => connect(default).await,
            Err(e) => Err(Error::InvalidArgument(format!("{URL_VAR}: {e}").into())),
        }
    }

    /// The URL it was built from, its passwords redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The backend's name: `memory`, `redis` or `memcached`.
    pub fn name(&self) -> &'static str {
        self.store().name()
    }

    /// The store (L2).
    pub fn store(&self) -> Arc<dyn FlagStore> {
        match self.kind {
            #[cfg(feature = "memory")]
            Kind::Memory { ref store, .. } => Arc::new(store.clone()),
            #[cfg(feature = "redis")]
            Kind::Redis { ref store, .. } => Arc::new(store.clone()),
            #[cfg(feature = "memcached")]
            Kind::Memcached { ref store, .. } => Arc::new(store.clone()),
        }
    }

    /// A new node on the backend's invalidation channel (its own node id and
    /// sequence): Redis pub/sub, memcached's invalidation log, or the in-process bus.
    pub fn invalidator(&self) -> Arc<dyn Invalidator> {
        match self.kind {
            #[cfg(feature = "memory")]
            Kind::Memory { ref bus, .. } => Arc::new(bus.peer()),
            #[cfg(feature = "redis")]
            Kind::Redis { ref bus, .. } => Arc::new(bus.peer()),
            #[cfg(feature = "memcached")]
            Kind::Memcached { ref log, .. } => Arc::new(log.peer()),
        }
    }

    /// The cross-process coalescer: `RedisLock` on Redis, `MemcachedRecache` on
    /// memcached; `None` in memory, where the cache's own coalescing covers the one
    /// process.
    pub fn coalescer(&self) -> Option<Arc<dyn Coalescer>> {
        match self.kind {
            #[cfg(feature = "memory")]
            Kind::Memory { .. } => None,
            #[cfg(feature = "redis")]
            Kind::Redis { ref store, .. } => Some(Arc::new(crate::redis::RedisLock::new(store))),
            #[cfg(feature = "memcached")]
            Kind::Memcached { ref store, .. } => {
                Some(Arc::new(crate::memcached::MemcachedRecache::new(store)))
            }
        }
    }

    /// The fleet registry beside the store, where caches built with
    /// [`report_to_fleet`](FlagCacheBuilder::report_to_fleet) record their presence and
    /// the versions they applied, and where `flagcache verify` reads them: `RedisFleet`,
    /// `MemcachedFleet`, or one `MemoryFleet` per backend in memory.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flagcache::Result<()> {
    /// use flagcache::{FlagCache, FlagKey, Version};
    ///
    /// let backend = flagcache::connect("memory://").await?;
    /// let loader = |_key: FlagKey| async { Ok(Some((true, Version::new(1)))) };
    /// let cache: FlagCache<bool> = backend
    ///     .cache_builder(loader)
    ///     .report_to_fleet(backend.fleet())
    ///     .build()
    ///     .await?;
    /// # drop(cache);
    /// # Ok(()) }
    /// ```
    pub fn fleet(&self) -> Arc<dyn FleetRegistry> {
        match self.kind {
            #[cfg(feature = "memory")]
            Kind::Memory { ref fleet, .. } => Arc::new(fleet.clone()),
            #[cfg(feature = "redis")]
            Kind::Redis { ref store, .. } => Arc::new(crate::redis::RedisFleet::new(store)),
            #[cfg(feature = "memcached")]
            Kind::Memcached { ref store, .. } => {
                Arc::new(crate::memcached::MemcachedFleet::new(store))
            }
        }
    }

    /// A [`FlagCache`](crate::FlagCache) builder over this backend: its store, a new invalidation node
    /// and its cross-process coalescer, the other settings at their defaults.
    #[cfg_attr(
        not(any(feature = "memory", feature = "redis", feature = "memcached")),
        allow(unused_variables)
    )]
    pub fn cache_builder<T>(&self, loader: impl Loader<T>) -> FlagCacheBuilder<T>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        // The concrete types, not the `Arc<dyn …>` of the accessors: no second
        // indirection on every call the cache makes.
        match self.kind {
            #[cfg(feature = "memory")]
            Kind::Memory {
                ref store, ref bus, ..
            } => crate::FlagCache::builder(store.clone(), loader).invalidator(bus.peer()),
            #[cfg(feature = "redis")]
            Kind::Redis { ref store, ref bus } => crate::FlagCache::builder(store.clone(), loader)
                .invalidator(bus.peer())
                .coalescer(crate::redis::RedisLock::new(store)),
            #[cfg(feature = "memcached")]
            Kind::Memcached { ref store, ref log } => {
                crate::FlagCache::builder(store.clone(), loader)
                    .invalidator(log.peer())
                    .coalescer(crate::memcached::MemcachedRecache::new(store))
            }
        }
    }

    /// The memory store, when the URL named `memory://`.
    #[cfg(feature = "memory")]
    pub fn as_memory(&self) -> Option<&crate::memory::MemoryStore> {
        #[allow(unreachable_patterns)]
        match self.kind {
            Kind::Memory { ref store, .. } => Some(store),
            _ => None,
        }
    }

    /// The Redis store, when the URL named a Redis backend.
    #[cfg(feature = "redis")]
    pub fn as_redis(&self) -> Option<&crate::redis::RedisStore> {
        #[allow(unreachable_patterns)]
        match self.kind {
            Kind::Redis { ref store, .. } => Some(store),
            _ => None,
        }
    }

    /// The Redis invalidator (its channel, say), when the URL named a Redis backend.
    #[cfg(feature = "redis")]
    pub fn as_redis_invalidator(&self) -> Option<&crate::redis::RedisInvalidator> {
        #[allow(unreachable_patterns)]
        match self.kind {
            Kind::Redis { ref bus, .. } => Some(bus),
            _ => None,
        }
    }

    /// The memcached store, when the URL named `memcached://`.
    #[cfg(feature = "memcached")]
    pub fn as_memcached(&self) -> Option<&crate::memcached::MemcachedStore> {
        #[allow(unreachable_patterns)]
        match self.kind {
            Kind::Memcached { ref store, .. } => Some(store),
            _ => None,
        }
    }
}

/// The store's and the messages' layout.
#[allow(dead_code)] // without a backend feature
fn codec(json: bool) -> crate::codec::Codec {
    if json {
        crate::codec::JsonCodec::default().into()
    } else {
        crate::codec::Codec::default()
    }
}

#[cfg(feature = "memory")]
fn memory(mut parsed: Parsed) -> Result<Kind> {
    let json = parsed.take_json_layout()?;
    parsed.finish(&["layout"])?;
    Ok(Kind::Memory {
        store: crate::memory::MemoryStore::builder()
            .codec(codec(json))
            .build(),
        bus: crate::memory::MemoryInvalidator::new(),
        fleet: crate::memory::MemoryFleet::new(),
    })
}

#[cfg(not(feature = "memory"))]
fn memory(parsed: Parsed) -> Result<Kind> {
    Err(feature_off(&parsed))
}

#[cfg(feature = "redis")]
async fn redis(mut parsed: Parsed) -> Result<Kind> {
    use crate::redis::{RedisInvalidator, RedisStore};

    let json = parsed.take_json_layout()?;
    let namespace = parsed.take("namespace");
    let key_layout = parsed.take("key_layout");
    let channel = parsed.take("channel");
    let heartbeat = match parsed.take("heartbeat") {
        None => None,
        Some(off) if off == "off" => Some(None),
        Some(every) => Some(Some(parsed.duration("heartbeat", &every)?)),
    };
    let heartbeat_window = parsed.take_duration("heartbeat_window")?;
    let connect_timeout = parsed.take_duration("connect_timeout")?;
    let response_timeout = parsed.take_duration("response_timeout")?;
    let tls_ca = match (parsed.take("tls_ca"), parsed.scheme) {
        (None, _) => None,
        (Some(path), Scheme::Redis { tls: true }) => Some(std::fs::read(&path).map_err(|e| {
            Error::InvalidArgument(
                format!("backend URL {:?}: tls_ca {path:?}: {e}", parsed.shown).into(),
            )
        })?),
        (Some(_), _) => {
            return Err(url::refuse(&parsed.shown, "`tls_ca` is for rediss:// URLs"));
        }
    };
    let (sentinel_user, sentinel_password) = (
        parsed.take("sentinel_username"),
        parsed.take("sentinel_password"),
    );
    if parsed.scheme != Scheme::Sentinel && (sentinel_user.is_some() || sentinel_password.is_some())
    {
        return Err(url::refuse(
            &parsed.shown,
            "`sentinel_username` and `sentinel_password` are for redis+sentinel:// URLs",
        ));
    }
    let mut known = vec![
        "namespace",
        "key_layout",
        "channel",
        "layout",
        "heartbeat",
        "heartbeat_window",
        "connect_timeout",
        "response_timeout",
    ];
    match parsed.scheme {
        Scheme::Redis { tls: true } => known.push("tls_ca"),
        Scheme::Sentinel => known.extend(["sentinel_username", "sentinel_password"]),
        _ => {}
    }
    // The settings both builders share, written once.
    macro_rules! target {
        ($builder:expr) => {{
            let mut b = $builder;
            b = match parsed.scheme {
                Scheme::Sentinel => {
                    let (user, password) = parsed.credentials()?;
                    let sentinel_auth =
                        userinfo(sentinel_user.as_deref(), sentinel_password.as_deref());
                    let sentinels = parsed
                        .hosts
                        .iter()
                        .map(|h| format!("redis://{sentinel_auth}{h}"));
                    b.sentinel(sentinels, parsed.path[0].clone())
                        .sentinel_node_auth(user.as_deref(), password.as_deref(), parsed.db(1)?)
                }
                Scheme::Cluster => {
                    let auth = parsed
                        .userinfo
                        .as_ref()
                        .map(|u| format!("{u}@"))
                        .unwrap_or_default();
                    b.cluster(parsed.hosts.iter().map(|h| format!("redis://{auth}{h}")))
                }
                _ => {
                    let tls = matches!(parsed.scheme, Scheme::Redis { tls: true });
                    let auth = parsed
                        .userinfo
                        .as_ref()
                        .map(|u| format!("{u}@"))
                        .unwrap_or_default();
                    let scheme = if tls { "rediss" } else { "redis" };
                    b.url(format!(
                        "{scheme}://{auth}{}/{}",
                        parsed.hosts[0],
                        parsed.db(0)?
                    ))
                }
            };
            if let Some(d) = connect_timeout {
                b = b.connection_timeout(d);
            }
            if let Some(d) = response_timeout {
                b = b.response_timeout(d);
            }
            if let Some(pem) = &tls_ca {
                b = b.tls_root_cert(pem.clone());
            }
            b.codec(codec(json))
        }};
    }
    let mut store = target!(RedisStore::builder());
    if let Some(ns) = &namespace {
        store = store.namespace(ns);
    }
    if let Some(template) = &key_layout {
        store = store.key_layout(template);
    }
    let mut bus = target!(RedisInvalidator::builder());
    if let Some(channel) = &channel {
        bus = bus.channel(channel);
    }
    if let Some(every) = heartbeat {
        bus = bus.heartbeat(every);
    }
    if let Some(window) = heartbeat_window {
        bus = bus.heartbeat_window(window);
    }
    parsed.finish(&known)?;
    Ok(Kind::Redis {
        store: store.build().await?,
        bus: bus.build().await?,
    })
}

#[cfg(not(feature = "redis"))]
async fn redis(parsed: Parsed) -> Result<Kind> {
    Err(feature_off(&parsed))
}

/// `user:password@`, percent-encoded, for a URL's user info; empty without either.
#[cfg(feature = "redis")]
fn userinfo(user: Option<&str>, password: Option<&str>) -> String {
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    match (user, password) {
        (None, None) => String::new(),
        (user, None) => format!("{}@", encode(user.unwrap_or_default())),
        (user, Some(p)) => format!("{}:{}@", encode(user.unwrap_or_default()), encode(p)),
    }
}

#[cfg(feature = "memcached")]
async fn memcached(mut parsed: Parsed) -> Result<Kind> {
    use crate::memcached::{MemcachedInvalidator, MemcachedStore};

    let mut store = MemcachedStore::builder()
        .servers(parsed.hosts.clone())
        .codec(codec(parsed.take_json_layout()?));
    if let Some(ns) = parsed.take("namespace") {
        store = store.namespace(ns);
    }
    if let Some(d) = parsed.take_duration("timeout")? {
        store = store.timeout(d);
    }
    if let Some(n) = parsed.take_number("pool_size")? {
        store = store.pool_size(usize::try_from(n).unwrap_or(usize::MAX));
    }
    let poll = parsed.take_duration("poll_interval")?;
    parsed.finish(&[
        "namespace",
        "layout",
        "timeout",
        "pool_size",
        "poll_interval",
    ])?;
    let store = store.build().await?;
    let mut log = MemcachedInvalidator::builder(&store);
    if let Some(every) = poll {
        log = log.poll_interval(every);
    }
    Ok(Kind::Memcached {
        log: log.build(),
        store,
    })
}

#[cfg(not(feature = "memcached"))]
async fn memcached(parsed: Parsed) -> Result<Kind> {
    Err(feature_off(&parsed))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn a_scheme_whose_feature_is_off_names_the_feature() {
        let parsed = super::url::parse("memcached://:pw@m1,m2").unwrap_err();
        assert!(parsed.to_string().contains("credentials"));
        let parsed = super::url::parse("redis+cluster://:pw@h1,h2").unwrap();
        let text = super::feature_off(&parsed).to_string();
        assert!(text.contains("cargo feature `redis`"), "{text}");
        assert!(
            text.contains("redis+cluster://:***@h1:6379,h2:6379") || text.contains(":***@"),
            "{text}"
        );
        assert!(!text.contains("pw"), "{text}");
    }
}
