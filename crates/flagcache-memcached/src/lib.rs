#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod invalidator;
mod pool;
mod recache;
mod ring;
mod store;

pub use invalidator::MemcachedInvalidator;
pub use recache::MemcachedRecache;
pub use store::{MemcachedStore, MemcachedStoreBuilder};

const BACKEND: &str = "memcached";
