//! Invalidation by the server itself ([`RedisTrackingInvalidator`]): RESP3 broadcast
//! client tracking (`CLIENT TRACKING ON BCAST PREFIX <namespace>:{`) turns every write
//! to an entry — by any client, and expiry, eviction and `FLUSHDB` — into a signal;
//! the connections of one generation (one node, or every cluster primary) live in
//! [`nodes`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use flagcache_core::{
    Codec, Error, Invalidation, Invalidator, NodeId, Result, ResyncReason, Signal, Subscription,
    Target as EventTarget,
};
use redis::{PushKind, Value};
use tokio::sync::mpsc;

use crate::connection::Connection;
use crate::target::{connection_methods, Target};
use crate::KeyLayout;
use crate::RedisInvalidator;

mod nodes;

use nodes::Generation;

/// The name the tracking connection gives itself (`CLIENT SETNAME`), as `CLIENT LIST`
/// shows it.
pub const TRACKING_CLIENT_NAME: &str = "flagcache-tracking";

/// Configures a [`RedisTrackingInvalidator`].
#[derive(Debug, Clone)]
pub struct RedisTrackingInvalidatorBuilder {
    target: Target,
    namespace: String,
    key_layout: String,
    codec: Codec,
    ping_every: Duration,
    alongside: Option<RedisInvalidator>,
}

impl Default for RedisTrackingInvalidatorBuilder {
    fn default() -> Self {
        RedisTrackingInvalidatorBuilder {
            target: Target::default(),
            namespace: "flags".to_string(),
            key_layout: KeyLayout::DEFAULT.to_string(),
            codec: Codec::default(),
            ping_every: Duration::from_secs(1),
            alongside: None,
        }
    }
}

impl RedisTrackingInvalidatorBuilder {
    connection_methods!();

    /// The store's namespace: entries at `<namespace>:{<flag key>}` are tracked
    /// (default `flags`, as `RedisStoreBuilder::namespace`). Its locks and absence
    /// markers (`<namespace>:lock:{…}`, `<namespace>:absent:{…}`) are not.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The store's key layout (default `{ns}:{{key}}`, as
    /// `RedisStoreBuilder::key_layout`): keys that begin with what the template puts
    /// before the flag key are tracked. In a layout where that is only the namespace
    /// (`{ns}:{key}`: `flags:`), the store's lock, marker and fence keys are tracked
    /// too; their pushes name no cached flag and evict nothing that matters.
    #[must_use]
    pub fn key_layout(mut self, template: impl Into<String>) -> Self {
        self.key_layout = template.into();
        self
    }

    /// The store's layout (default the binary envelope; `JsonCodec` for the JSON
    /// layout). Read only [`alongside`](Self::alongside) pub/sub, to learn the version
    /// an entry holds after a write.
    #[must_use]
    pub fn codec(mut self, codec: impl Into<Codec>) -> Self {
        self.codec = codec.into();
        self
    }

    /// How often the tracking connection is PINGed (default 1 s): one that does not
    /// answer within this or the response timeout, whichever is longer, is replaced,
    /// with `Resync`.
    #[must_use]
    pub fn ping_every(mut self, every: Duration) -> Self {
        self.ping_every = every;
        self
    }

    /// Runs beside a pub/sub invalidator: `publish` goes through it (events with
    /// versions, tags, namespace flushes), this invalidator takes its node id, and a
    /// subscription carries both its signals and the server's pushes. A push then
    /// carries the version the entry holds once the push arrived (one `MGET` per
    /// push), so a replica keeps an L1 copy at that version — the value this node just
    /// wrote is not evicted again by the push its own write caused — and drops any
    /// older one, as a pub/sub event would.
    #[must_use]
    pub fn alongside(mut self, pubsub: RedisInvalidator) -> Self {
        self.alongside = Some(pubsub);
        self
    }

    /// Connects, and opens the tracking connections once (then lets go), so a server
    /// without RESP3 or client tracking is found now.
    ///
    /// # Errors
    /// As for `RedisStoreBuilder::build`, and a permanent `Error::Backend` when a
    /// server does not speak RESP3 (`HELLO 3`, before Redis 6) or refuses
    /// `CLIENT TRACKING` (an ACL user without it); on a cluster,
    /// `Error::InvalidArgument` when no primary serves slots.
    pub async fn build(self) -> Result<RedisTrackingInvalidator> {
        let layout = KeyLayout::new(&self.key_layout, &self.namespace)?;
        let connection = Connection::open(self.target, &[]).await?;
        let inner = Inner {
            connection,
            layout,
            codec: self.codec,
            ping_every: self.ping_every,
            node: self
                .alongside
                .as_ref()
                .map_or_else(NodeId::random, |p| p.node_id()),
            alongside: self.alongside,
        };
        drop(nodes::open(&inner.connection, inner.layout.prefix(), 0).await?);
        Ok(RedisTrackingInvalidator {
            inner: Arc::new(inner),
        })
    }
}

struct Inner {
    connection: Connection,
    /// Where the store's flags live: what it puts before a flag key
    /// (`<namespace>:{` by default) is the tracked prefix.
    layout: KeyLayout,
    codec: Codec,
    ping_every: Duration,
    node: NodeId,
    alongside: Option<RedisInvalidator>,
}

impl Inner {
    /// The signals one invalidation push stands for: a null key list (a flush) is a
    /// `Resync`; each tracked key an invalidation of its flag — versionless, or,
    /// alongside pub/sub, at the version the entry holds now.
    async fn signals(&self, data: &[Value]) -> Vec<Signal> {
        let keys = match data.first() {
            Some(Value::Array(keys)) | Some(Value::Set(keys)) => keys,
            _ => return vec![Signal::Resync(ResyncReason::LogReset)],
        };
        let mut redis_keys = Vec::with_capacity(keys.len());
        let mut flags = Vec::with_capacity(keys.len());
        for k in keys {
            let bytes = match k {
                Value::BulkString(b) => b.as_slice(),
                Value::SimpleString(s) => s.as_bytes(),
                _ => continue,
            };
            let flag = std::str::from_utf8(bytes)
                .ok()
                .and_then(|k| self.layout.flag_key(k));
            if let Some(flag) = flag {
                redis_keys.push(bytes.to_vec());
                flags.push(flag);
            }
        }
        let versions = match (&self.alongside, flags.is_empty()) {
            (Some(_), false) => self.stored_versions(&redis_keys).await,
            _ => vec![None; flags.len()],
        };
        flags
            .into_iter()
            .zip(versions)
            .map(|(flag, version)| {
                let ev = Invalidation::key(flag);
                Signal::Invalidated(match version {
                    Some(v) => ev.with_version(v),
                    None => ev,
                })
            })
            .collect()
    }

    /// The versions the entries hold now (one `MGET`); `None` for an absent or
    /// unreadable entry, and for all when the read fails (a versionless invalidation
    /// is always safe).
    async fn stored_versions(
        &self,
        redis_keys: &[Vec<u8>],
    ) -> Vec<Option<flagcache_core::Version>> {
        let mut cmd = redis::cmd("MGET");
        for k in redis_keys {
            cmd.arg(k.as_slice());
        }
        match self
            .connection
            .query::<Vec<Option<Vec<u8>>>>("tracking version read", &cmd)
            .await
        {
            Ok(values) if values.len() == redis_keys.len() => values
                .into_iter()
                .map(|v| v.and_then(|b| self.codec.peek_version(&b).ok()))
                .collect(),
            Ok(_) => vec![None; redis_keys.len()],
            Err(e) => {
                tracing::debug!(error = %e, "versions of tracked keys not read");
                vec![None; redis_keys.len()]
            }
        }
    }
}

/// An [`Invalidator`] fed by the server: RESP3 broadcast client tracking.
///
/// Each subscription holds a dedicated RESP3 connection (named
/// [`TRACKING_CLIENT_NAME`]) with `CLIENT TRACKING ON BCAST PREFIX <namespace>:{`.
/// The server then pushes the key of every entry that changes — written by any
/// client, in any language, with or without publishing; expired; evicted; deleted —
/// and each push becomes `Signal::Invalidated` for its flag, without a version (but
/// see [`alongside`](RedisTrackingInvalidatorBuilder::alongside)). A flush (a push
/// with no keys: `FLUSHDB`, `FLUSHALL`) is `Resync(LogReset)`. The connection's
/// loss (a closed socket, `CLIENT KILL`, a server restart, `tracking-redir-broken`)
/// or silence (no answer to the PING it gets every second) is `Resync` at once,
/// and again once a new tracking connection is in place, before any signal it
/// carries: entries filled while it was away are never trusted after it. A new
/// connection refused for good — a server that no longer speaks RESP3 after a
/// failover, a user no longer allowed `CLIENT TRACKING` — ends the subscription
/// instead (`FlagCache` then serves no L1 entry as fresh until it has subscribed
/// again); transient failures are retried with back-off.
///
/// Alone it publishes nothing: a key written through `FlagCache` is announced by the
/// server. What the server cannot see — a tag invalidation, a namespace flush, a
/// `purge_shared` request — needs pub/sub, and `publish` refuses it with
/// `Error::InvalidArgument` instead of dropping it. Run it
/// [`alongside`](RedisTrackingInvalidatorBuilder::alongside) a [`RedisInvalidator`]
/// for both.
///
/// Tracking is per node. On a Redis Cluster a subscription holds one tracking
/// connection to every primary that serves slots, reads the primaries again
/// (`CLUSTER NODES`) at every PING, and when they changed — a primary added, failed
/// or moved — signals `Resync` and tracks the new set (`Resync` again once it is in
/// place). Through Sentinel the connection follows the primary (a failover is a
/// reconnect: `Resync`). The servers must speak RESP3 (Redis 6+, Valkey).
///
/// ```no_run
/// # async fn demo() -> flagcache::Result<()> {
/// use flagcache::redis::{RedisInvalidator, RedisStore, RedisTrackingInvalidator};
///
/// let url = "redis://127.0.0.1:6379";
/// let store = RedisStore::builder().url(url).build().await?;
/// let pubsub = RedisInvalidator::connect(url).await?;
/// let invalidator = RedisTrackingInvalidator::builder()
///     .url(url)
///     .alongside(pubsub)
///     .build()
///     .await?;
/// # let _ = (store, invalidator); Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisTrackingInvalidator {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisTrackingInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTrackingInvalidator")
            .field("node", &self.inner.node)
            .field("prefix", &self.inner.layout.prefix())
            .field("target", self.inner.connection.target())
            .field("alongside", &self.inner.alongside)
            .finish_non_exhaustive()
    }
}

impl RedisTrackingInvalidator {
    /// Configures a tracking invalidator.
    pub fn builder() -> RedisTrackingInvalidatorBuilder {
        RedisTrackingInvalidatorBuilder::default()
    }

    /// Connects to one server with default settings (namespace `flags`, alone).
    ///
    /// # Errors
    /// As for [`RedisTrackingInvalidatorBuilder::build`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder().url(url).build().await
    }
}

#[async_trait]
impl Invalidator for RedisTrackingInvalidator {
    fn node_id(&self) -> NodeId {
        self.inner.node
    }

    fn transport(&self) -> &'static str {
        if self.inner.alongside.is_some() {
            "tracking+pubsub"
        } else {
            "tracking"
        }
    }

    async fn publish(&self, event: &Invalidation) -> Result<()> {
        if let Some(pubsub) = &self.inner.alongside {
            return pubsub.publish(event).await;
        }
        match event.target {
            EventTarget::Key(_) if !event.purge_shared => Ok(()),
            _ => Err(Error::InvalidArgument(
                "client tracking sees only writes to entries: tag and namespace \
                 invalidations and purge_shared need pub/sub (RedisTrackingInvalidatorBuilder::alongside)"
                    .into(),
            )),
        }
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let generation = nodes::open(&self.inner.connection, self.inner.layout.prefix(), 0).await?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(listen(self.inner.clone(), generation, tx));
        let pushes = Subscription::from_receiver(rx);
        match &self.inner.alongside {
            None => Ok(pushes),
            Some(pubsub) => {
                let events = pubsub.subscribe().await?;
                Ok(Subscription::from_stream(futures_util::stream::select(
                    pushes, events,
                )))
            }
        }
    }
}

/// Turns pushes into signals until the `Subscription` is dropped; on the tracking
/// connection's loss or silence, signals `Resync` at once, opens a new one (rotating
/// through the nodes given, back-off 50 ms doubling to 2 s), and signals `Resync` again
/// before anything it carries. A permanent error on reopening ends the subscription.
async fn listen(inner: Arc<Inner>, generation: Generation, tx: mpsc::Sender<Signal>) {
    let mut tracked = generation;
    let mut attempt = 0usize;
    loop {
        let Some(reason) = watch(&inner, &mut tracked, &tx).await else {
            return;
        };
        tracing::warn!(%reason, prefix = %inner.layout.prefix(), "tracking connection lost; reconnecting");
        if tx.send(Signal::Resync(reason.clone())).await.is_err() {
            return;
        }
        let mut backoff = Duration::from_millis(50);
        tracked = loop {
            tokio::select! {
                _ = tx.closed() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            attempt += 1;
            let opened = tokio::select! {
                _ = tx.closed() => return,
                r = tokio::time::timeout(
                    inner.connection.target().call_limit() * 2,
                    nodes::open(&inner.connection, inner.layout.prefix(), attempt),
                ) => r,
            };
            match opened {
                Ok(Ok(t)) => break t,
                // A server that no longer speaks RESP3 or lets this user track: the
                // subscription ends, and the cache stops trusting L1 until a new one.
                Ok(Err(e)) if !e.is_transient() => {
                    tracing::error!(error = %e, "tracking cannot be turned on again; subscription ends");
                    return;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "tracking reconnect failed"),
                Err(_) => tracing::debug!("tracking reconnect timed out"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        };
        if tx.send(Signal::Resync(reason)).await.is_err() {
            return;
        }
    }
}

/// Forwards one generation's pushes until one of its connections is lost or silent,
/// or the cluster's primaries change (the reason), or the receiver is gone (`None`).
async fn watch(
    inner: &Inner,
    tracked: &mut Generation,
    tx: &mpsc::Sender<Signal>,
) -> Option<ResyncReason> {
    let reply_limit = inner
        .connection
        .target()
        .response_timeout
        .max(inner.ping_every);
    let mut ticker = tokio::time::interval(inner.ping_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = tx.closed() => return None,
            push = tracked.pushes.recv() => {
                let Some(push) = push else { return Some(ResyncReason::Reconnected) };
                match push.kind {
                    PushKind::Invalidate => {
                        for signal in inner.signals(&push.data).await {
                            if tx.send(signal).await.is_err() {
                                return None;
                            }
                        }
                    }
                    PushKind::Disconnection => return Some(ResyncReason::Reconnected),
                    PushKind::Other(kind) if kind == "tracking-redir-broken" => {
                        return Some(ResyncReason::Reconnected);
                    }
                    _ => {}
                }
            }
            _ = ticker.tick() => {
                for conn in &mut tracked.conns {
                    let cmd = redis::cmd("PING");
                    let ping = cmd.query_async::<Value>(conn);
                    if !matches!(tokio::time::timeout(reply_limit, ping).await, Ok(Ok(_))) {
                        return Some(ResyncReason::HeartbeatMissed);
                    }
                }
                if let Some(tracked_primaries) = &tracked.primaries {
                    // A primary added, gone or moved: writes there may be unseen.
                    match nodes::primaries(&inner.connection).await {
                        Ok(now) if &now != tracked_primaries => {
                            return Some(ResyncReason::Reconnected);
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "cluster topology not read"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::KeyLayout;

    #[test]
    fn tracked_keys_map_back_to_flag_keys() {
        let layout = KeyLayout::new(KeyLayout::DEFAULT, "flags").unwrap_or_else(|e| panic!("{e}"));
        let flag = |key: &str| layout.flag_key(key).map(|k| k.as_str().to_string());
        assert_eq!(flag("flags:{checkout}"), Some("checkout".into()));
        assert_eq!(flag("flags:{a}b}"), Some("a}b".into()));
        assert_eq!(flag("flags:{x}y"), None, "not an entry's shape");
        assert_eq!(flag("flags:{}"), None, "no flag key is empty");
        assert_eq!(flag("other:{x}"), None);
    }
}
