//! The [`Invalidator`] properties: every subscriber hears every event, and a gap is
//! always reported as a resync.

use std::future::Future;

use super::{fresh_key, RECV_TIMEOUT};
use crate::{now_ms, Invalidation, Invalidator, Signal, Subscription, Target, Version};

async fn next_signal(sub: &mut Subscription, what: &str) -> Signal {
    match tokio::time::timeout(RECV_TIMEOUT, sub.recv()).await {
        Ok(Some(s)) => s,
        Ok(None) => panic!("{what}: subscription ended"),
        Err(_) => panic!("{what}: nothing received within {RECV_TIMEOUT:?}"),
    }
}

/// Every subscriber — the publisher's own included, if listed — receives every event,
/// in order, stamped with the publisher's node id, increasing sequence numbers and a
/// send time.
pub async fn invalidation_reaches_every_subscriber(
    publisher: &dyn Invalidator,
    subscribers: &[&dyn Invalidator],
) {
    let mut subs = Vec::new();
    for s in subscribers {
        subs.push(s.subscribe().await.unwrap());
    }
    let key = fresh_key("invalidation");
    let events = [
        Invalidation::key(key.clone()).with_version(Version(7)),
        Invalidation::tag("team-checkout"),
        Invalidation::all(),
        Invalidation::key(key),
    ];
    let before = now_ms();
    for ev in &events {
        publisher.publish(ev).await.unwrap();
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let mut last_seq = 0;
        for ev in &events {
            let got = match next_signal(sub, "invalidation").await {
                Signal::Invalidated(got) => got,
                other => panic!("invalidation: subscriber {i} got {other:?}, expected {ev:?}"),
            };
            assert_eq!(
                (&got.target, got.version),
                (&ev.target, ev.version),
                "subscriber {i}"
            );
            assert_eq!(
                got.origin,
                publisher.node_id(),
                "invalidation: origin not stamped"
            );
            assert!(
                got.seq > last_seq,
                "invalidation: sequence did not increase"
            );
            last_seq = got.seq;
            assert!(
                got.sent_at_ms >= before.saturating_sub(1000) && got.sent_at_ms <= now_ms() + 1000,
                "invalidation: send time {} not stamped",
                got.sent_at_ms
            );
        }
    }
}

/// After a gap — events the subscriber cannot have received — the subscriber sees
/// `Signal::Resync` before any event published after the gap. `make_gap` causes the
/// gap by the backend's own means (overflowing a buffer, skipping a sequence number,
/// overwriting a log slot, a restart).
pub async fn resync_after_gap<F>(
    subscriber: &dyn Invalidator,
    publisher: &dyn Invalidator,
    make_gap: F,
) where
    F: Future<Output = ()>,
{
    let mut sub = subscriber.subscribe().await.unwrap();
    make_gap.await;
    let marker = fresh_key("after_gap");
    publisher
        .publish(&Invalidation::key(marker.clone()))
        .await
        .unwrap();
    let mut resynced = false;
    for _ in 0..1_000_000 {
        match next_signal(&mut sub, "resync_after_gap").await {
            Signal::Resync(_) => resynced = true,
            Signal::Invalidated(ev) if ev.target == Target::Key(marker.clone()) => {
                assert!(
                    resynced,
                    "resync_after_gap: an event after the gap arrived with no Resync before it"
                );
                return;
            }
            Signal::Invalidated(_) => {}
        }
    }
    panic!("resync_after_gap: the marker event never arrived");
}
