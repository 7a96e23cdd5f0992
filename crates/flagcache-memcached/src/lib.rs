#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod builder;
mod chunks;
mod fleet;
mod invalidator;
mod meta;
mod pool;
mod raw;
mod recache;
mod ring;
mod server_stats;
mod store;

pub use builder::MemcachedStoreBuilder;
pub use fleet::MemcachedFleet;
pub use invalidator::{MemcachedInvalidator, MemcachedInvalidatorBuilder};
pub use recache::MemcachedRecache;
pub use store::MemcachedStore;

const BACKEND: &str = "memcached";
