//! The server list is parsed at build against real memcached servers: `host:port`,
//! `tcp://host:port` and `memcached://host:port` name the same server (and the same
//! place on the ring); a bad entry is refused at build, named, with the accepted forms;
//! a server that does not answer at build is kept in the ring.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flagcache_core::bytes::Bytes;
use flagcache_core::{Entry, Error, FlagStore, PutOutcome, Version};
use flagcache_memcached::MemcachedStore;

mod common;
use common::{keys, start_servers, TTL};

async fn build(servers: &[String]) -> Result<MemcachedStore, Error> {
    MemcachedStore::builder()
        .servers(servers.iter().cloned())
        .timeout(Duration::from_millis(500))
        .build()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_form_names_the_same_server_and_ring_place() {
    let servers = start_servers(2);
    let (a, b) = (servers[0].port(), servers[1].port());
    let plain = build(&[format!("127.0.0.1:{a}"), format!("localhost:{b}")])
        .await
        .unwrap();
    let schemes = build(&[
        format!("tcp://127.0.0.1:{a}"),
        format!("memcached://localhost:{b}/"),
    ])
    .await
    .unwrap();
    let entry = Entry::new(Version::new(3), Bytes::from_static(b"on"));
    for k in &keys("form", 20) {
        assert_eq!(plain.put(k, &entry, TTL).await.unwrap(), PutOutcome::Stored);
        // The other spelling finds every key on the server the first put it on.
        let read = schemes.get(k).await.unwrap();
        assert_eq!(read.map(|e| e.version), Some(Version::new(3)), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_is_refused_at_build_by_name() {
    let servers = start_servers(1);
    let good = servers[0].url();
    for bad in [
        "not a host",
        "127.0.0.1:99999",
        "",
        "127.0.0.1",
        "127.0.0.1:0",
        "http://127.0.0.1:11211",
        "tcp://:11211",
    ] {
        let err = build(&[good.clone(), bad.to_string()]).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {text}");
        assert!(!err.is_transient(), "{text}");
        assert!(
            text.contains(&format!("{bad:?}")),
            "entry not named: {text}"
        );
        assert!(
            text.contains("host:port") && text.contains("memcached://host:port"),
            "accepted forms not said: {text}"
        );
    }
}

/// A server that does not answer at build (nothing listens on port 1) is kept: the
/// store builds over the others, and that server's keys fail until it answers. Alone,
/// it fails the build, named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_answer_at_build_is_kept_in_the_ring() {
    let servers = start_servers(1);
    let good = format!("127.0.0.1:{}", servers[0].port());
    let store = build(&[good, "127.0.0.1:1".to_string()]).await.unwrap();
    let entry = Entry::new(Version::new(1), Bytes::from_static(b"v"));
    let mut stored = 0;
    for k in &keys("kept", 40) {
        if store.put(k, &entry, TTL).await.is_ok() {
            stored += 1;
        }
    }
    assert!((1..40).contains(&stored), "stored {stored} of 40");
    let err = build(&["127.0.0.1:1".to_string()]).await.unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(err.is_transient(), "{err}");
}
