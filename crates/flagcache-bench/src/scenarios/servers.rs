//! The servers the scenarios share: a Redis and a memcached given by URL, or each
//! started on loopback the first time a scenario asks for it and stopped when the run
//! ends.

use flagcache_testkit::{MemcachedServer, RedisServer};

use super::{err, Res};

/// The servers the scenarios share: given by URL, or started on loopback.
#[derive(Debug, Default)]
pub struct Servers {
    pub redis_url: Option<String>,
    pub memcached_url: Option<String>,
    redis: Option<RedisServer>,
    memcached: Option<MemcachedServer>,
}

impl Servers {
    pub fn new(redis_url: Option<String>, memcached_url: Option<String>) -> Self {
        Servers {
            redis_url,
            memcached_url,
            ..Servers::default()
        }
    }

    pub fn redis_url(&mut self) -> Res<String> {
        url_or_start(
            &mut self.redis_url,
            &mut self.redis,
            RedisServer::start,
            RedisServer::url,
        )
    }

    pub fn memcached_url(&mut self) -> Res<String> {
        url_or_start(
            &mut self.memcached_url,
            &mut self.memcached,
            MemcachedServer::start,
            MemcachedServer::url,
        )
    }
}

/// The URL in `url`, or that of a server started now and kept in `server` (and its URL
/// in `url`).
fn url_or_start<S, E: std::fmt::Display>(
    url: &mut Option<String>,
    server: &mut Option<S>,
    start: fn() -> Result<S, E>,
    url_of: fn(&S) -> String,
) -> Res<String> {
    if let Some(u) = url {
        return Ok(u.clone());
    }
    let started = tokio::task::block_in_place(start).map_err(err)?;
    let u = url_of(&started);
    *server = Some(started);
    *url = Some(u.clone());
    Ok(u)
}
