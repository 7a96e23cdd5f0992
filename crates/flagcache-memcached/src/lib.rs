#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod invalidator;
mod pool;
mod ring;
mod store;

pub use invalidator::MemcachedInvalidator;
pub use store::{MemcachedStore, MemcachedStoreBuilder};

const BACKEND: &str = "memcached";
