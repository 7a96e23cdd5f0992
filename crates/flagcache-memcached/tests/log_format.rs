//! The invalidation log's published format ("The invalidation log format" in the crate
//! docs), against a real memcached: events appended byte by byte as the specification
//! says, with the classic protocol, are heard; what this crate writes is what it says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use flagcache_core::{
    FlagKey, Invalidation, Invalidator, JsonCodec, NodeId, Signal, Subscription, Target, Version,
};
use flagcache_memcached::{MemcachedInvalidator, MemcachedStore};
use flagcache_testkit::MemcachedServer;

/// One request with a binary data block (classic `set`), answered by one line.
fn set_bytes(server: &MemcachedServer, key: &str, value: &[u8], exptime: u64) -> String {
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("set {key} 0 {exptime} {}\r\n", value.len()).into_bytes();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap().trim_end().to_string()
}

/// Step 1 of an append with the classic protocol: `incr`, or `add` at 1 when missing.
fn take_number(server: &MemcachedServer, counter: &str) -> u64 {
    loop {
        let r = server.request(&format!("incr {counter} 1\r\n")).unwrap();
        if r != "NOT_FOUND" {
            return r.parse().unwrap();
        }
        if server
            .request(&format!("add {counter} 0 0 1\r\n1\r\n"))
            .unwrap()
            == "STORED"
        {
            return 1;
        }
    }
}

/// An append as the specification describes it: the number, then the slot.
fn append(server: &MemcachedServer, ns: &str, ring: u64, event: &[u8]) -> u64 {
    let n = take_number(server, &format!("{ns}!inv:seq"));
    let mut slot = n.to_be_bytes().to_vec();
    slot.extend_from_slice(event);
    let key = format!("{ns}!inv:{}", n % ring);
    assert_eq!(set_bytes(server, &key, &slot, 3600), "STORED");
    n
}

async fn subscribed(store: &MemcachedStore, ring: u64) -> (MemcachedInvalidator, Subscription) {
    let log = MemcachedInvalidator::builder(store)
        .ring_size(ring)
        .poll_interval(Duration::from_millis(20))
        .build();
    let sub = log.subscribe().await.unwrap();
    (log, sub)
}

async fn next_event(sub: &mut Subscription) -> Invalidation {
    match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
        Ok(Some(Signal::Invalidated(ev))) => ev,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_events_appended_by_the_specification_are_heard() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .namespace("svc")
        .codec(JsonCodec::new())
        .build()
        .await
        .unwrap();
    let (_log, mut sub) = subscribed(&store, 8).await;

    // The counter starts at 1, created by the first appender.
    let n = append(&server, "svc", 8, br#"{"flagKey":"a","version":3}"#);
    assert_eq!(n, 1);
    let ev = next_event(&mut sub).await;
    assert_eq!(ev.target, Target::Key(key("a")));
    assert_eq!(
        (ev.version, ev.origin),
        (Some(Version::new(3)), NodeId::UNKNOWN)
    );

    // Numbers go round the ring: events 2..=9, the last in slot 1 again.
    for i in 2..=9u64 {
        let body = format!(r#"{{"flagKey":"k{i}","unknown":"ignored"}}"#);
        assert_eq!(append(&server, "svc", 8, body.as_bytes()), i);
        let ev = next_event(&mut sub).await;
        assert_eq!(ev.target, Target::Key(key(&format!("k{i}"))));
    }
    let ev = {
        append(&server, "svc", 8, br#"{"all":true}"#);
        next_event(&mut sub).await
    };
    assert_eq!(ev.target, Target::All);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_events_appended_by_the_specification_are_heard() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let (_log, mut sub) = subscribed(&store, 1024).await;

    // F1 A7 01, then a MessagePack map written by hand: {"target": {"Key": "kill"},
    // "version": 5, "origin": 0, "seq": 0, "sent_at_ms": 0}.
    let mut ev = vec![0xF1, 0xA7, 0x01, 0x85];
    let s = |out: &mut Vec<u8>, text: &str| {
        out.push(0xA0 | text.len() as u8);
        out.extend_from_slice(text.as_bytes());
    };
    s(&mut ev, "target");
    ev.push(0x81);
    s(&mut ev, "Key");
    s(&mut ev, "kill");
    s(&mut ev, "version");
    ev.push(0x05);
    for field in ["origin", "seq", "sent_at_ms"] {
        s(&mut ev, field);
        ev.push(0x00);
    }
    append(&server, "flags", 1024, &ev);
    let got = next_event(&mut sub).await;
    assert_eq!(got.target, Target::Key(key("kill")));
    assert_eq!(got.version, Some(Version::new(5)));

    // "target": "All", no version, and purge_shared.
    let mut ev = vec![0xF1, 0xA7, 0x01, 0x85];
    s(&mut ev, "target");
    s(&mut ev, "All");
    for field in ["origin", "seq", "sent_at_ms"] {
        s(&mut ev, field);
        ev.push(0x00);
    }
    s(&mut ev, "purge_shared");
    ev.push(0xC3);
    append(&server, "flags", 1024, &ev);
    let got = next_event(&mut sub).await;
    assert_eq!(
        (got.target, got.version, got.purge_shared),
        (Target::All, None, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_this_crate_appends_is_what_the_specification_says() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .codec(JsonCodec::new())
        .build()
        .await
        .unwrap();
    let (log, _sub) = subscribed(&store, 1024).await;
    log.publish(&Invalidation::key(key("checkout")).with_version(Version::new(9)))
        .await
        .unwrap();

    assert_eq!(
        server.request("get flags!inv:seq\r\n").unwrap(),
        "VALUE flags!inv:seq 0 1\r\n1\r\nEND"
    );
    let epoch = server.request("get flags!inv:epoch\r\n").unwrap();
    assert!(epoch.starts_with("VALUE flags!inv:epoch 0 "), "{epoch}");
    // The slot: the number in 8 big-endian bytes, then the JSON event; an hour's TTL.
    let slot = server.request("mg flags!inv:1 v t\r\n").unwrap();
    let (head, value) = slot.split_once("\r\n").unwrap();
    let ttl: u64 = head
        .split_whitespace()
        .find_map(|f| f.strip_prefix('t'))
        .unwrap()
        .parse()
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "{head}");
    let (number, event) = value.as_bytes().split_at(8);
    assert_eq!(number, 1u64.to_be_bytes());
    let event = std::str::from_utf8(event).unwrap();
    for member in [
        r#""flagKey":"checkout""#.to_string(),
        r#""version":9"#.to_string(),
        format!(r#""origin":"{}""#, log.node_id()),
        r#""seq":1"#.to_string(),
    ] {
        assert!(event.contains(&member), "{member} in {event}");
    }
}
