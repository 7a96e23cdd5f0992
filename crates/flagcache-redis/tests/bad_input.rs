//! Input the store refuses before it reaches Redis: values over the size limit, and
//! keys a text protocol could not carry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{key, on_both_flavors};
use flagcache_core::{Entry, Error, FlagKey, FlagStore, Version};
use flagcache_redis::RedisStore;
use flagcache_testkit::{Flavor, RedisServer};

async fn oversized_values_are_refused_and_nothing_is_written(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .max_value_size(4096)
        .build()
        .await
        .unwrap();
    let big: Vec<u8> = (0..8192).map(|_| fastrand::u8(..)).collect();
    let err = store
        .put(
            &key("big"),
            &Entry::new(Version::new(1), big),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(err, Err(Error::ValueTooLarge { limit: 4096, .. })),
        "{err:?}"
    );
    assert_eq!(server.command(&["EXISTS", "flags:{big}"]).unwrap(), "0");
    // Keys that a text protocol could not carry never get this far.
    assert!(matches!(
        FlagKey::new("a b\r\nFLUSHALL"),
        Err(Error::InvalidKey { .. })
    ));
}

on_both_flavors!(oversized_values_are_refused_and_nothing_is_written,);
