//! Middleware over any [`FlagStore`](crate::FlagStore): small wrappers that compose.

mod fault;

pub use fault::{FaultControl, FaultyStore, Op};
