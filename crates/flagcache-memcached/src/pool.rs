//! A small connection pool per server: connections are checked out for one operation
//! and returned only if the operation left them usable.

use std::sync::{Mutex, PoisonError};

use async_memcached::Client;
use tokio::sync::{Semaphore, SemaphorePermit};

pub(crate) struct Pool {
    url: String,
    idle: Mutex<Vec<Client>>,
    slots: Semaphore,
}

/// A checked-out connection; `give_back` returns it to the pool, dropping it does not.
pub(crate) struct Lease<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    /// Taken from the idle list (not connected for this operation).
    reused: bool,
    _permit: SemaphorePermit<'a>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("url", &self.url)
            .field("free_slots", &self.slots.available_permits())
            .finish()
    }
}

impl Pool {
    pub fn new(url: String, size: usize) -> Self {
        Pool {
            url,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(size.max(1)),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection: an idle one, or a new one. Waits while `size` are in use.
    pub async fn get(&self) -> Result<Lease<'_>, async_memcached::Error> {
        let permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| async_memcached::Error::ConnectionClosed)?;
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let reused = idle.is_some();
        let client = match idle {
            Some(c) => c,
            None => Client::new(&self.url).await?,
        };
        Ok(Lease {
            pool: self,
            client: Some(client),
            reused,
            _permit: permit,
        })
    }
}

impl Pool {
    /// Drops every idle connection (after one turned out dead: the others most likely
    /// died with it).
    pub fn drain_idle(&self) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl Lease<'_> {
    pub fn reused(&self) -> bool {
        self.reused
    }

    pub fn client(&mut self) -> Option<&mut Client> {
        self.client.as_mut()
    }

    /// Returns the connection for reuse (after an operation that completed).
    pub fn give_back(mut self) {
        if let Some(c) = self.client.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(c);
        }
    }
}
