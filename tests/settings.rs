//! Settings checked at build: bad or overflowing values are refused, not a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use flagcache::Error;
use flagcache_testkit::CountingSource;

use common::*;

#[tokio::test]
async fn bad_settings_are_refused_at_build() {
    let src = CountingSource::new(1);
    for b in [
        memory_cache(&src).ttl_jitter(0.9),
        memory_cache(&src).l2_ttl(Duration::ZERO),
        memory_cache(&src).l2_timeout(Duration::ZERO),
        memory_cache(&src).l1_capacity(0),
        memory_cache(&src).xfetch(-1.0),
    ] {
        assert!(matches!(b.build().await, Err(Error::InvalidArgument(_))));
    }
}

#[tokio::test]
async fn huge_durations_are_refused_not_a_panic() {
    let src = CountingSource::new(1);
    let b = memory_cache(&src).fresh_for(Duration::MAX);
    assert!(matches!(b.build().await, Err(Error::InvalidArgument(_))));
}
