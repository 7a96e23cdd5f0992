//! Connecting securely to a real redis-server: a wrong password is a clear, permanent
//! error that leaks no secret; TLS with a trusted root certificate carries the store
//! and the invalidator, and an untrusted certificate is refused permanently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{assert_round_trip, key, next, on_both_flavors};
use flagcache_core::{Invalidation, Invalidator, Signal, Target};
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::{Flavor, RedisServer};

async fn a_wrong_password_is_a_clear_error_at_connect(flavor: Flavor) {
    let server = RedisServer::builder()
        .flavor(flavor)
        .password("right")
        .start()
        .unwrap();
    let url = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let err = RedisStore::connect(&url).await.unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.to_lowercase().contains("auth") || text.contains("WRONGPASS"),
        "{text}"
    );
    assert!(
        !text.contains("wrong@"),
        "the password leaked into the error: {text}"
    );
    let ok = RedisStore::connect(&server.url()).await.unwrap();
    assert!(
        !format!("{ok:?}").contains("right"),
        "Debug shows the password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_store_and_invalidator() {
    let server = RedisServer::builder().tls().start().unwrap();
    let (url, cert) = (server.tls_url().unwrap(), server.tls_root_cert().unwrap());
    let store = RedisStore::builder()
        .url(&url)
        .tls_root_cert(cert.clone())
        .build()
        .await
        .unwrap();
    let k = key("over-tls");
    assert_round_trip(&store, &k, 7).await;
    // It really went over the TLS port to the same server.
    assert_eq!(
        server.command(&["EXISTS", "flags:{over-tls}"]).unwrap(),
        "1"
    );
    let inv = RedisInvalidator::builder()
        .url(&url)
        .tls_root_cert(cert)
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    inv.publish(&Invalidation::key(k.clone())).await.unwrap();
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.target == Target::Key(k)));
    // Without trusting the certificate, the connection is refused, permanently.
    let err = RedisStore::connect(&url).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
}

on_both_flavors!(a_wrong_password_is_a_clear_error_at_connect,);
