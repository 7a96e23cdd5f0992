#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod connection;
mod error;
mod fleet;
mod foreign;
mod invalidator;
mod layout;
mod lock;
mod raw;
mod scripts;
mod sentinel;
mod server_stats;
mod store;
mod target;
mod tls;
mod tracking;

pub use fleet::RedisFleet;
pub use foreign::ForeignMessages;
pub use invalidator::{RedisInvalidator, RedisInvalidatorBuilder};
pub use layout::KeyLayout;
pub use lock::RedisLock;
pub use store::{RedisStore, RedisStoreBuilder};
pub use tracking::{
    RedisTrackingInvalidator, RedisTrackingInvalidatorBuilder, TRACKING_CLIENT_NAME,
};

/// The backend name errors and metrics carry.
const BACKEND: &str = "redis";
