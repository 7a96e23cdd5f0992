//! The scenarios, each beside its baseline in the same run (one file per scenario),
//! and what they share: what a scenario is given ([`Plan`], [`Servers`]), what it adds
//! to the report ([`Section`]), the keys and payloads they read, and the raw Redis
//! connection of their baselines.

mod cache_down;
mod foreign_writer;
mod gate;
mod idle_fleet;
mod kill_switch;
mod l1;
mod l2;
mod l2_memcached;
mod l2_redis;
mod paced;
mod propagation;
mod replicas;
mod rollout;
mod rounds;
mod servers;
mod storm;

use std::time::Duration;

use flagcache_core::{FlagKey, Version};

use crate::report::{Check, Row};
use crate::source::Source;

pub use cache_down::cache_down;
pub use foreign_writer::foreign_writer;
pub use idle_fleet::idle_fleet;
pub use kill_switch::kill_switch;
pub use l1::l1_hit;
pub use l2_memcached::l2_hit_memcached;
pub use l2_redis::l2_hit_redis;
pub use propagation::propagation_both;
pub use rollout::rollout_storm;
pub use servers::Servers;
pub use storm::cold_storm;

pub type Res<T> = Result<T, String>;

pub fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// What a scenario adds to the report.
#[derive(Debug, Default)]
pub struct Section {
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
}

/// Counts: the full run, or a smoke run with tiny counts.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
}

impl Plan {
    fn n(self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    fn secs(self, full: f64, quick: f64) -> Duration {
        Duration::from_secs_f64(if self.quick { quick } else { full })
    }
}

/// A flag-configuration-like payload of `len` bytes.
fn payload(len: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(len as u64);
    let mut s = String::from("{\"rules\":[");
    while s.len() < len {
        s.push_str(&format!(
            "{{\"segment\":\"seg-{}\",\"variant\":\"{}\"}},",
            rng.u32(..100_000),
            ["on", "off", "control", "treatment"][rng.usize(..4)]
        ));
    }
    s.truncate(len);
    s
}

fn key(name: &str) -> Res<FlagKey> {
    FlagKey::new(name).map_err(err)
}

/// A unique key per run, so reruns against a given server start cold.
fn fresh_key(prefix: &str) -> Res<FlagKey> {
    key(&format!("{prefix}.{:x}", fastrand::u64(..)))
}

/// Keys `{prefix}.0` … `{prefix}.{count - 1}`, each set in `source` to a payload of
/// `len` bytes at version 1.
fn seeded_keys(source: &Source, prefix: &str, count: usize, len: usize) -> Res<Vec<FlagKey>> {
    let keys: Vec<FlagKey> = (0..count)
        .map(|i| key(&format!("{prefix}.{i}")))
        .collect::<Res<_>>()?;
    for k in &keys {
        source.set(k, payload(len), Version::new(1));
    }
    Ok(keys)
}

/// A raw `redis-rs` multiplexed connection to `url`: the baselines' client.
async fn redis_conn(url: &str) -> Res<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).map_err(err)?;
    client.get_multiplexed_async_connection().await.map_err(err)
}
