#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod pool;
mod ring;
mod store;

pub use store::{MemcachedStore, MemcachedStoreBuilder};

const BACKEND: &str = "memcached";
