#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod fleet;
mod invalidator;
mod store;

pub use fleet::MemoryFleet;
pub use invalidator::{MemoryInvalidator, MemoryInvalidatorBuilder};
pub use store::{MemoryStore, MemoryStoreBuilder};
