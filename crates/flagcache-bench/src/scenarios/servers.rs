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
        if let Some(u) = &self.redis_url {
            return Ok(u.clone());
        }
        let server = tokio::task::block_in_place(RedisServer::start).map_err(err)?;
        let url = server.url();
        self.redis = Some(server);
        self.redis_url = Some(url.clone());
        Ok(url)
    }

    pub fn memcached_url(&mut self) -> Res<String> {
        if let Some(u) = &self.memcached_url {
            return Ok(u.clone());
        }
        let server = tokio::task::block_in_place(MemcachedServer::start).map_err(err)?;
        let url = server.url();
        self.memcached = Some(server);
        self.memcached_url = Some(url.clone());
        Ok(url)
    }
}
