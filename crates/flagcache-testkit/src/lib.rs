#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod flavor;
mod memcached;
mod process;
mod redis;
mod resp;
mod runs;
mod source;
mod spawn;

pub use flavor::Flavor;
pub use memcached::{MemcachedServer, MemcachedServerBuilder};
pub use redis::{RedisCluster, RedisSentinel, RedisServer, RedisServerBuilder};
pub use runs::reap_orphans;
pub use source::{Answer, CountingSource};
pub use spawn::spawn_from_a_task;

/// Why a test server could not be provided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server's binary is not installed.
    #[error("`{binary}` was not found on PATH (or in ${env}): install it with `{install}`")]
    BinaryMissing {
        /// The binary looked for.
        binary: &'static str,
        /// The environment variable that can point at it.
        env: &'static str,
        /// The command that installs it.
        install: &'static str,
    },
    /// The server did not come up.
    #[error("{what} did not start: {reason}\n--- last lines of its log ---\n{log}")]
    Start {
        /// Which server.
        what: String,
        /// What went wrong.
        reason: String,
        /// The tail of its log.
        log: String,
    },
    /// A command sent to the server failed.
    #[error("{what}: {reason}")]
    Command {
        /// Which server and command.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// An I/O error (temp dir, spawn, socket).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `Result` with the testkit's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
