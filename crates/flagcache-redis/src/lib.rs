#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod connection;
mod error;
mod foreign;
mod invalidator;
mod lock;
mod raw;
mod scripts;
mod sentinel;
mod store;
mod target;
mod tls;

pub use foreign::ForeignMessages;
pub use invalidator::{RedisInvalidator, RedisInvalidatorBuilder};
pub use lock::RedisLock;
pub use store::{RedisStore, RedisStoreBuilder};

/// The backend name errors and metrics carry.
const BACKEND: &str = "redis";
