#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod invalidator;
mod store;

pub use invalidator::{MemoryInvalidator, MemoryInvalidatorBuilder};
pub use store::{MemoryStore, MemoryStoreBuilder};
