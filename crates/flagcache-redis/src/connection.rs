//! The connection a store or an invalidator opens from its [`Target`] — to one node, to
//! a Redis Cluster, or to the primary Sentinel names — the commands and scripts run on
//! it, and the dedicated pub/sub connections opened beside it.

use std::sync::Arc;
use std::time::Duration;

use flagcache_core::{Error, Result};
use redis::aio::{ConnectionLike, ConnectionManager, PubSub, PubSubSink};
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};

use crate::error::{backend_error, build_error};
use crate::sentinel::{CallWatch, SentinelConn};
use crate::target::Target;

/// The connection commands go through: one multiplexed, auto-reconnecting connection
/// to a single node, a Redis Cluster connection that routes each key to its slot's
/// node, or a connection to whichever node Redis Sentinel says is the primary.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

/// Runs `$body` (a `RedisResult`) with `$c` bound to the concrete connection; on a
/// Sentinel-found connection, an error or a call given up on that may mean the
/// primary moved makes the next call ask Sentinel again.
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            Conn::Single(mut $c) => $body,
            Conn::Cluster(mut $c) => $body,
            Conn::Sentinel(s) => match s.get().await {
                Ok((generation, mut $c)) => {
                    let watch = CallWatch::new(&s, generation);
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

/// A connection and the [`Target`] it was opened from (which the pub/sub connections
/// opened beside it and the callers' timeouts read). Clones share the connection.
#[derive(Clone)]
pub(crate) struct Connection {
    conn: Conn,
    target: Target,
}

impl Connection {
    /// Connects to `target`, authenticates, and checks that the connection is usable:
    /// it answers PING (a missing password, say, is refused only then) and loads
    /// `scripts` (an ACL user refused the scripts is found now, not at the first write).
    /// Errors name the target, passwords redacted.
    pub(crate) async fn open(target: Target, scripts: &[&Script]) -> Result<Self> {
        let at = target.describe();
        let limit = target.connection_timeout;
        let fail = |e| build_error("connect", &at, limit, e);
        let conn = if let Some(service) = &target.sentinel_service {
            let sentinel = SentinelConn::open(&target, service).await.map_err(fail)?;
            Conn::Sentinel(Arc::new(sentinel))
        } else if target.cluster {
            let client = target.cluster_client().map_err(fail)?;
            Conn::Cluster(client.get_async_connection().await.map_err(fail)?)
        } else {
            let url = target
                .urls
                .first()
                .ok_or_else(|| Error::InvalidArgument("a Redis URL is required".into()))?;
            let client = target.client(url).map_err(fail)?;
            // One attempt within the connection timeout first: the manager retries a
            // failed connect (twice, with back-off), which suits a reconnect but would
            // triple the time a build takes to report an unreachable server.
            client
                .get_multiplexed_async_connection_with_config(&target.single_attempt())
                .await
                .map_err(fail)?;
            let config = target.manager_config();
            Conn::Single(
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(fail)?,
            )
        };
        let connection = Connection { conn, target };
        let limit = connection.target.response_timeout;
        with_conn!(connection.conn.clone(), c => redis::cmd("PING").query_async::<()>(&mut c).await)
            .map_err(|e| build_error("connect", &at, limit, e))?;
        for script in scripts {
            with_conn!(connection.conn.clone(), c => script.load_async(&mut c).await)
                .map_err(|e| build_error("script load", &at, limit, e))?;
        }
        Ok(connection)
    }

    /// Where and how it connects.
    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// Whether it is a Redis Cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// Runs `cmd`; an error is reported as `operation`'s.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        with_conn!(self.conn.clone(), c => cmd.query_async(&mut c).await)
            .map_err(|e| backend_error(operation, self.target.response_timeout, e))
    }

    /// Runs a script (by `EVALSHA`, loading it on `NOSCRIPT`); an error is reported as
    /// `operation`'s.
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
        with_conn!(self.conn.clone(), c => run(&inv, &mut c).await)
            .map_err(|e| backend_error(operation, self.target.response_timeout, e))
    }

    /// A dedicated pub/sub connection subscribed to `channel`: on the `attempt`-th node
    /// given (modulo their number — a subscriber that reconnects rotates through a
    /// cluster's seeds, so the loss of one node does not leave it deaf), or on the
    /// current primary when connected through Sentinel. Errors name the target,
    /// passwords redacted.
    pub(crate) async fn subscribe(&self, channel: &str, attempt: usize) -> Result<PubSub> {
        let at = self.target.describe();
        let fail = |e| build_error("subscribe", &at, self.target.connection_timeout, e);
        let client = self.node_client("subscribe", attempt).await?;
        let mut pubsub = client.get_async_pubsub().await.map_err(fail)?;
        pubsub.subscribe(channel).await.map_err(fail)?;
        Ok(pubsub)
    }

    /// A client for the node a dedicated connection goes to: the `attempt`-th node
    /// given (modulo their number), or the current primary when connected through
    /// Sentinel. Errors are reported as `operation`'s, naming the target.
    pub(crate) async fn node_client(
        &self,
        operation: &'static str,
        attempt: usize,
    ) -> Result<redis::Client> {
        let at = self.target.describe();
        let fail = |e| build_error(operation, &at, self.target.connection_timeout, e);
        match &self.conn {
            Conn::Sentinel(s) => s.primary_client().await.map_err(fail),
            _ => {
                let urls = &self.target.urls;
                let url = urls
                    .get(attempt % urls.len().max(1))
                    .ok_or_else(|| Error::InvalidArgument("a Redis URL is required".into()))?;
                self.target.client(url).map_err(fail)
            }
        }
    }
}

/// Whether a pub/sub connection answers a PING within `limit`: one that does not is
/// dead or silent, whether or not it was closed.
pub(crate) async fn answers_ping(sink: &mut PubSubSink, limit: Duration) -> bool {
    let alive = tokio::time::timeout(limit, sink.ping::<Value>()).await;
    matches!(alive, Ok(Ok(_)))
}
