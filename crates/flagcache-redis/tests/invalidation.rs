//! What a `RedisInvalidator` subscription signals, against a real redis-server: gaps in
//! a publisher's sequence (from its events and its heartbeats), a silent subscription,
//! heartbeats only from nodes that publish, a steady state without `Resync`, and JSON
//! events shared with other languages' clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{
    foreign_event, foreign_heartbeat, invalidator_with_heartbeat, key, next, next_message,
    on_both_flavors, raw_publish, raw_subscriber, CHANNEL, FOREIGN,
};
use flagcache_core::{
    Invalidation, Invalidator, JsonCodec, ResyncReason, Signal, Subscription, Target, Version,
};
use flagcache_redis::RedisInvalidator;
use flagcache_testkit::{Flavor, RedisServer};
use futures_util::StreamExt;

/// A subscription on `server`, and the invalidator it belongs to.
async fn subscription(server: &RedisServer) -> (RedisInvalidator, Subscription) {
    let inv = RedisInvalidator::connect(&server.url()).await.unwrap();
    let sub = inv.subscribe().await.unwrap();
    (inv, sub)
}

/// The `Resync` that a gap in the foreign publisher's sequence signals.
fn foreign_gap(expected: u64, got: u64) -> Signal {
    Signal::Resync(ResyncReason::SequenceGap {
        origin: FOREIGN,
        expected,
        got,
    })
}

async fn a_skipped_sequence_number_names_the_gap(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let (_inv, mut sub) = subscription(&server).await;
    raw_publish(&server.url(), vec![foreign_event(1), foreign_event(3)]).await;
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.seq == 1));
    assert_eq!(next(&mut sub).await, foreign_gap(2, 3));
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.seq == 3));
}

async fn a_lost_last_event_is_revealed_by_the_next_heartbeat(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let (_inv, mut sub) = subscription(&server).await;
    // Event 1 arrives; event 2 is lost; the publisher's heartbeat says it sent 2.
    raw_publish(
        &server.url(),
        vec![foreign_event(1), foreign_heartbeat(1), foreign_heartbeat(2)],
    )
    .await;
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.seq == 1));
    assert_eq!(next(&mut sub).await, foreign_gap(2, 2));
}

async fn a_silent_subscription_is_noticed_by_missing_heartbeats(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = invalidator_with_heartbeat(&server.url(), Duration::from_millis(100)).await;
    let mut sub = inv.subscribe().await.unwrap();
    // The server stops answering everyone for 1.5 s: nothing arrives, not even our
    // own heartbeats, yet no connection is closed.
    server.command(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap();
    match next(&mut sub).await {
        Signal::Resync(ResyncReason::HeartbeatMissed) => {}
        other => panic!("expected a heartbeat Resync, got {other:?}"),
    }
}

async fn quiet_subscribers_publish_no_heartbeats(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = invalidator_with_heartbeat(&server.url(), Duration::from_millis(50)).await;
    let _sub = inv.subscribe().await.unwrap();
    let mut stream = raw_subscriber(&server.url()).await;
    // Nothing published yet: the channel stays silent.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );
    inv.publish(&Invalidation::all()).await.unwrap();
    // The event, then heartbeats carrying seq 1.
    let first = next_message(&mut stream, Duration::from_secs(2)).await;
    assert_eq!(first.get_payload_bytes()[..2], [0xF1, 0xA7]);
    let hb = next_message(&mut stream, Duration::from_secs(2)).await;
    assert_eq!(hb.get_payload_bytes()[..3], [0xF1, 0xA8, 0x01]);
}

async fn a_healthy_subscription_never_resyncs(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let a = invalidator_with_heartbeat(&server.url(), Duration::from_millis(20)).await;
    let b = a.peer();
    let mut sub = b.subscribe().await.unwrap();
    let _a_sub = a.subscribe().await.unwrap(); // so A sends heartbeats too
    for i in 0..20 {
        a.publish(&Invalidation::key(key(&format!("k{i}"))))
            .await
            .unwrap();
        b.publish(&Invalidation::key(key(&format!("b{i}"))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut events = 0;
    while let Ok(Some(signal)) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await
    {
        match signal {
            Signal::Invalidated(_) => events += 1,
            other => panic!("spurious {other:?} in steady state"),
        }
    }
    assert_eq!(events, 40);
}

async fn json_events_from_redis_cli_are_received(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let inv = RedisInvalidator::builder()
        .url(server.url())
        .codec(JsonCodec::new())
        .heartbeat(None)
        .build()
        .await
        .unwrap();
    let mut sub = inv.subscribe().await.unwrap();
    let cli = std::env::var("FLAGCACHE_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
    let out = std::process::Command::new(cli)
        .args(["-p", &server.port().to_string(), "PUBLISH", CHANNEL])
        .arg(r#"{"flagKey": "checkout", "version": 42}"#)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success());
    match next(&mut sub).await {
        Signal::Invalidated(ev) => {
            assert_eq!(ev.target, Target::Key(key("checkout")));
            assert_eq!(ev.version, Some(Version::new(42)));
        }
        other => panic!("{other:?}"),
    }
    // And what this crate publishes in JSON, another language reads as such.
    let mut stream = raw_subscriber(&server.url()).await;
    inv.publish(&Invalidation::key(key("k")).with_version(Version::new(3)))
        .await
        .unwrap();
    let msg = next_message(&mut stream, Duration::from_secs(5)).await;
    let text: String = msg.get_payload().unwrap();
    assert!(
        text.contains(r#""flagKey":"k""#) && text.contains(r#""version":3"#),
        "{text}"
    );
}

on_both_flavors!(
    a_skipped_sequence_number_names_the_gap,
    a_lost_last_event_is_revealed_by_the_next_heartbeat,
    a_silent_subscription_is_noticed_by_missing_heartbeats,
    quiet_subscribers_publish_no_heartbeats,
    a_healthy_subscription_never_resyncs,
    json_events_from_redis_cli_are_received,
);
