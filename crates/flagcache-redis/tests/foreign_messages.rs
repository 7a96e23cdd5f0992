//! Foreign messages on a shared channel, against a real Redis: by default they make
//! subscribers `Resync`; under `ForeignMessages::Ignore` they are dropped and counted,
//! while invalidations — readable or not — are handled as ever.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flagcache_core::{
    Codec, FlagKey, Invalidation, Invalidator, JsonCodec, ResyncReason, Signal, Subscription,
    Target,
};
use flagcache_redis::{ForeignMessages, RedisInvalidator};
use flagcache_testkit::RedisServer;

const CHANNEL: &str = "shared_updates";

async fn invalidator(
    server: &RedisServer,
    codec: impl Into<Codec>,
    policy: ForeignMessages,
) -> RedisInvalidator {
    RedisInvalidator::builder()
        .url(server.url())
        .channel(CHANNEL)
        .codec(codec)
        .foreign_messages(policy)
        .build()
        .await
        .unwrap()
}

/// Publishes `message` as another publisher would, with a plain PUBLISH.
fn publish_raw(server: &RedisServer, message: &str) {
    let receivers = server.command(&["PUBLISH", CHANNEL, message]).unwrap();
    assert_eq!(receivers.trim(), "1", "one subscriber hears it");
}

async fn next(sub: &mut Subscription) -> Signal {
    tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .expect("a signal within 5 s")
        .expect("the subscription is open")
}

fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_resyncs_by_default() {
    let server = RedisServer::start().unwrap();
    let inv = invalidator(&server, JsonCodec::new(), ForeignMessages::default()).await;
    let mut sub = inv.subscribe().await.unwrap();
    publish_raw(&server, "product:123:updated");
    assert_eq!(
        next(&mut sub).await,
        Signal::Resync(ResyncReason::Undecodable)
    );
    assert_eq!(inv.foreign_messages_ignored(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_foreign_messages_are_counted_and_invalidations_still_arrive() {
    for codec in [Codec::from(JsonCodec::new()), Codec::default()] {
        let server = RedisServer::start().unwrap();
        let inv = invalidator(&server, codec.clone(), ForeignMessages::Ignore).await;
        let mut sub = inv.subscribe().await.unwrap();
        for message in ["product:123:updated", r#"{"order": 7}"#, "cart:9:emptied"] {
            publish_raw(&server, message);
        }
        // Messages arrive in order: had the three foreign ones resynced, the first
        // signal would be theirs.
        if matches!(codec, Codec::Json(_)) {
            // An invalidation this replica cannot read still resyncs.
            publish_raw(&server, r#"{"flagKey": "not a key"}"#);
            assert_eq!(
                next(&mut sub).await,
                Signal::Resync(ResyncReason::Undecodable)
            );
        }
        inv.peer()
            .publish(&Invalidation::key(key("kill-switch")))
            .await
            .unwrap();
        match next(&mut sub).await {
            Signal::Invalidated(ev) => assert_eq!(ev.target, Target::Key(key("kill-switch"))),
            other => panic!("{codec:?}: expected the invalidation, got {other:?}"),
        }
        assert_eq!(inv.foreign_messages_ignored(), 3, "{codec:?}");
    }
}
