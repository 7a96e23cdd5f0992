//! Building a store or an invalidator fails fast and loud against a real redis-server:
//! missing or wrong credentials, a database index the server does not have, and an ACL
//! user refused the scripts or the channel are permanent errors at build that name the
//! target (password redacted); a connection timeout is kept to its configured length.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::on_both_flavors;
use flagcache_core::Error;
use flagcache_redis::{RedisInvalidator, RedisStore};
use flagcache_testkit::{Flavor, RedisServer};

/// The error's text with every source's.
fn chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(" | ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A permanent error at build that names `port`, leaks no `secret`, and says `reason`
/// (in any case: Valkey capitalizes some of the messages Redis does not, such as
/// "No permissions to access a channel"; the error kinds are the same).
fn assert_loud(err: &Error, port: u16, secret: &str, reason: &str) {
    let text = chain(err);
    assert!(!err.is_transient(), "a transient error: {text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port}")),
        "no target named: {text}"
    );
    assert!(!text.contains(secret), "the password leaked: {text}");
    assert!(
        text.to_lowercase().contains(&reason.to_lowercase()),
        "{reason} not said: {text}"
    );
}

async fn store(url: &str) -> Result<RedisStore, Error> {
    RedisStore::builder().url(url).build().await
}

async fn invalidator(url: &str) -> Result<RedisInvalidator, Error> {
    RedisInvalidator::builder().url(url).build().await
}

async fn a_url_without_the_password_fails_at_build(flavor: Flavor) {
    let server = RedisServer::builder()
        .flavor(flavor)
        .password("s3cret")
        .start()
        .unwrap();
    let url = format!("redis://127.0.0.1:{}", server.port());
    let err = store(&url).await.unwrap_err();
    assert_loud(&err, server.port(), "s3cret", "NOAUTH");
    let err = invalidator(&url).await.unwrap_err();
    assert_loud(&err, server.port(), "s3cret", "NOAUTH");
    // With the password, both build.
    store(&server.url()).await.unwrap();
    invalidator(&server.url()).await.unwrap();
}

async fn a_wrong_password_fails_at_build_and_is_redacted(flavor: Flavor) {
    let server = RedisServer::builder()
        .flavor(flavor)
        .password("right")
        .start()
        .unwrap();
    let url = format!("redis://:wr0ng@127.0.0.1:{}", server.port());
    let err = store(&url).await.unwrap_err();
    assert_loud(&err, server.port(), "wr0ng", "authentication failed");
    let err = invalidator(&url).await.unwrap_err();
    assert_loud(&err, server.port(), "wr0ng", "authentication failed");
}

async fn a_database_the_server_does_not_have_fails_at_build(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let url = format!("redis://127.0.0.1:{}/99", server.port());
    let err = store(&url).await.unwrap_err();
    assert_loud(&err, server.port(), "\u{0}", "DB index");
    let err = invalidator(&url).await.unwrap_err();
    assert_loud(&err, server.port(), "\u{0}", "DB index");
}

async fn an_acl_user_refused_the_scripts_or_the_channel_fails_at_build(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let acl = |args: &[&str]| {
        let mut full = vec!["ACL", "SETUSER"];
        full.extend_from_slice(args);
        assert_eq!(server.command(&full).unwrap(), "OK");
    };
    acl(&[
        "noscripts",
        "on",
        ">pw1",
        "~*",
        "&*",
        "+@all",
        "-@scripting",
    ]);
    acl(&[
        "otherchan",
        "on",
        ">pw2",
        "~*",
        "resetchannels",
        "&other",
        "+@all",
    ]);
    let port = server.port();
    let err = store(&format!("redis://noscripts:pw1@127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert_loud(&err, port, "pw1", "no permissions");
    let err = invalidator(&format!("redis://otherchan:pw2@127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert_loud(&err, port, "pw2", "no permissions");
    // Each builds what it is allowed: scripts without the channel, and the reverse.
    store(&format!("redis://otherchan:pw2@127.0.0.1:{port}"))
        .await
        .unwrap();
    invalidator(&format!("redis://noscripts:pw1@127.0.0.1:{port}"))
        .await
        .unwrap();
}

/// A server that accepts connections and never answers: the build gives up after its
/// connection timeout (not after one per retry), and says how long it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_timeout_is_kept_and_printed() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("redis://:pw@127.0.0.1:{port}");
    let started = Instant::now();
    let err = RedisStore::builder()
        .url(&url)
        .connection_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap_err();
    let took = started.elapsed();
    let text = chain(&err);
    assert!(
        took < Duration::from_millis(2500),
        "build took {took:?}: {text}"
    );
    assert!(matches!(err, Error::Timeout { .. }), "{text}");
    assert!(text.contains("timed out after 1s"), "{text}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_does_not_parse_is_named_with_the_accepted_forms() {
    for url in [
        "127.0.0.1:6379",
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:99999",
        "redis://:pw@127.0.0.1:6379/x",
        "",
    ] {
        let err = store(url).await.unwrap_err();
        let text = chain(&err);
        assert!(!err.is_transient(), "{text}");
        let named = if url.is_empty() { "\"\"" } else { url };
        assert!(
            text.contains(&named.replace(":pw@", ":***@")),
            "{url:?} not named: {text}"
        );
        assert!(!text.contains(":pw@"), "the password leaked: {text}");
        assert!(
            text.contains("redis://[user:password@]host[:port][/db]"),
            "accepted forms not said: {text}"
        );
    }
}

on_both_flavors!(
    a_url_without_the_password_fails_at_build,
    a_wrong_password_fails_at_build_and_is_redacted,
    a_database_the_server_does_not_have_fails_at_build,
    an_acl_user_refused_the_scripts_or_the_channel_fails_at_build,
);
