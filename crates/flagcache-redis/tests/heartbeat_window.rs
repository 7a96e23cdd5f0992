//! Heartbeats for a window after a node's last event, against a real redis-server: a
//! node that published once goes silent after the window, a publisher without a
//! subscription heartbeats too, and a lost last event is still revealed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{key, next, next_message, on_both_flavors, raw_subscriber};
use flagcache_core::{Invalidation, Invalidator, ResyncReason, Signal};
use flagcache_redis::RedisInvalidator;
use flagcache_testkit::{Flavor, RedisServer};
use futures_util::StreamExt;

const HEARTBEAT: [u8; 3] = [0xF1, 0xA8, 0x01];

async fn node(url: &str, every: Duration, window: Duration) -> RedisInvalidator {
    RedisInvalidator::builder()
        .url(url)
        .heartbeat(Some(every))
        .heartbeat_window(window)
        .build()
        .await
        .unwrap()
}

async fn a_node_that_published_once_stops_heartbeating_after_the_window(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let a = node(
        &server.url(),
        Duration::from_millis(100),
        Duration::from_millis(500),
    )
    .await;
    // A subscribing node: its subscription PINGs, and it must not heartbeat forever.
    let _a_sub = a.subscribe().await.unwrap();
    let mut stream = raw_subscriber(&server.url()).await;
    let published = Instant::now();
    a.publish(&Invalidation::key(key("k"))).await.unwrap();
    let (mut heartbeats, mut late) = (0, Vec::new());
    let until = published + Duration::from_millis(2500);
    while let Ok(Some(msg)) = tokio::time::timeout_at(until.into(), stream.next()).await {
        let is_heartbeat = msg.get_payload_bytes().starts_with(&HEARTBEAT);
        heartbeats += usize::from(is_heartbeat);
        if published.elapsed() > Duration::from_millis(1300) {
            late.push(is_heartbeat);
        }
    }
    assert!(heartbeats >= 2, "{heartbeats} heartbeats within the window");
    assert!(
        late.is_empty(),
        "{} messages more than 0.8 s after the window closed",
        late.len()
    );
    // The next event opens a new window.
    a.publish(&Invalidation::key(key("k"))).await.unwrap();
    let _event = next_message(&mut stream, Duration::from_secs(2)).await;
    let hb = next_message(&mut stream, Duration::from_secs(2)).await;
    assert!(hb.get_payload_bytes().starts_with(&HEARTBEAT));
}

async fn a_publisher_without_a_subscription_heartbeats_after_its_event(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let a = node(
        &server.url(),
        Duration::from_millis(100),
        Duration::from_secs(5),
    )
    .await;
    let mut stream = raw_subscriber(&server.url()).await;
    a.publish(&Invalidation::all()).await.unwrap();
    let _event = next_message(&mut stream, Duration::from_secs(2)).await;
    let hb = next_message(&mut stream, Duration::from_secs(2)).await;
    assert!(hb.get_payload_bytes().starts_with(&HEARTBEAT));
    assert_eq!(hb.get_payload_bytes()[3..11], a.node_id().0.to_be_bytes());
}

async fn a_lost_last_event_is_revealed_within_the_window(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let a = node(
        &server.url(),
        Duration::from_millis(200),
        Duration::from_secs(2),
    )
    .await;
    let b = a.peer();
    let mut sub = b.subscribe().await.unwrap();
    let publisher = a.peer();
    publisher
        .publish(&Invalidation::key(key("k")))
        .await
        .unwrap();
    assert!(matches!(next(&mut sub).await, Signal::Invalidated(ev) if ev.seq == 1));
    // The publisher's connection is cut under it: its next event spends a sequence
    // number and never reaches the channel (subscriptions are not cut: TYPE normal).
    let mut lost = None;
    for _ in 0..20 {
        server
            .command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
            .unwrap();
        match publisher.publish(&Invalidation::key(key("k"))).await {
            Err(_) => {
                lost = Some(Instant::now());
                break;
            }
            Ok(()) => assert!(matches!(next(&mut sub).await, Signal::Invalidated(_))),
        }
    }
    let lost = lost.expect("no publish failed after its connection was killed");
    match next(&mut sub).await {
        Signal::Resync(ResyncReason::SequenceGap { origin, .. }) => {
            assert_eq!(origin, publisher.node_id());
        }
        other => panic!("expected the gap a heartbeat reveals, got {other:?}"),
    }
    assert!(
        lost.elapsed() < Duration::from_secs(2),
        "revealed after {:?}",
        lost.elapsed()
    );
}

on_both_flavors!(
    a_node_that_published_once_stops_heartbeating_after_the_window,
    a_publisher_without_a_subscription_heartbeats_after_its_event,
    a_lost_last_event_is_revealed_within_the_window,
);
