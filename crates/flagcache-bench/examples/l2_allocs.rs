//! The reads of `l2_profile`, counting their allocations (through dhat's allocator,
//! which makes them slower: the rates it prints are not for comparing).
//!
//! ```text
//! cargo run --release -p flagcache-bench --example l2_allocs -- cache redis://127.0.0.1:6379 20000
//! ```

#[path = "l2_profile.rs"]
mod profile;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> profile::Res<()> {
    let _profiler = dhat::Profiler::builder().testing().build();
    profile::runtime()?.block_on(profile::run(Some(|| dhat::HeapStats::get().total_blocks)))
}
