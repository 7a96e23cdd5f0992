//! The primary's connection found through Redis Sentinel, found again after an error
//! that may mean the primary moved, or after a call given up on a silent primary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};

use crate::target::Target;

/// The primary's connection, found through Sentinel and found again after a failure
/// (the primary may have changed).
pub(crate) struct SentinelConn {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The primary's connection and its generation: an error on a connection only
    /// forgets that very connection, not the one a rediscovery put in its place.
    current: Mutex<Option<(u64, ConnectionManager)>>,
    generation: AtomicU64,
    /// When the last rediscovery failed: callers that queued for it share its failure
    /// rather than each try again in turn.
    failed_at: Mutex<Option<Instant>>,
    config: ConnectionManagerConfig,
    response_timeout: Duration,
}

impl SentinelConn {
    /// Asks `target`'s sentinels for the primary of `service` and connects to it.
    pub(crate) async fn open(target: &Target, service: &str) -> redis::RedisResult<Self> {
        let node = target.node_auth.as_ref().map(|a| {
            let mut info = redis::RedisConnectionInfo::default().set_db(a.db);
            if let Some(u) = &a.username {
                info = info.set_username(u);
            }
            if let Some(p) = &a.password {
                info = info.set_password(p);
            }
            SentinelNodeConnectionInfo::default().set_redis_connection_info(info)
        });
        let sentinel = SentinelClient::build(
            target.urls.clone(),
            service,
            node,
            SentinelServerType::Master,
        )?;
        let conn = SentinelConn {
            sentinel: tokio::sync::Mutex::new(sentinel),
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            failed_at: Mutex::new(None),
            config: target.manager_config(),
            response_timeout: target.response_timeout,
        };
        conn.get().await?;
        Ok(conn)
    }

    fn slot(&self) -> MutexGuard<'_, Option<(u64, ConnectionManager)>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The primary's connection (with its generation), asking Sentinel where the
    /// primary is if needed. One caller asks at a time; callers that waited for it
    /// take the connection it made rather than ask again, so a burst of requests
    /// after a failover costs one Sentinel query and one connection, not one each.
    pub(crate) async fn get(&self) -> redis::RedisResult<(u64, ConnectionManager)> {
        if let Some(c) = self.slot().clone() {
            return Ok(c);
        }
        let asked = Instant::now();
        let sentinel = &mut *self.sentinel.lock().await;
        if let Some(c) = self.slot().clone() {
            return Ok(c);
        }
        let failed_at = || {
            self.failed_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
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
                *failed_at() = Some(Instant::now());
                return Err(e);
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
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
    started: Instant,
    done: bool,
}

impl<'a> CallWatch<'a> {
    pub(crate) fn new(conn: &'a SentinelConn, generation: u64) -> Self {
        CallWatch {
            conn,
            generation,
            started: Instant::now(),
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
