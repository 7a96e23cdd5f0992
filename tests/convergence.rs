//! A kill switch is never silently dropped: a `set` that L2 refuses for a newer version
//! still tells the fleet, and every replica converges on L2's value.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flagcache::{PutOutcome, Version};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_set_makes_every_replica_serve_the_version_l2_holds() {
    let r = replicas().await;
    let k = key("kill");
    r.src.set_version(4);
    let l = r.b.lookup(&k).await.unwrap();
    assert_eq!(l.version, Some(Version::new(4)));
    // Another writer's newer value reached L2 without an event B heard.
    put(&r.store, &k, "planted", 9).await;
    assert_eq!(r.b.lookup(&k).await.unwrap().version, Some(Version::new(4)));

    let outcome = r.a.set(&k, "off".into(), Version::new(5)).await.unwrap();
    assert_eq!(
        outcome,
        PutOutcome::Superseded {
            current: Version::new(9)
        }
    );
    // B hears the event and reads L2 (its L1 copy would be fresh for 30 s).
    let t = Instant::now();
    loop {
        let l = r.b.lookup(&k).await.unwrap();
        if l.version == Some(Version::new(9)) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "B still serves {:?}",
            l.version
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let l = r.b.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.version), ("planted", Some(Version::new(9))));
    let l = r.a.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.version), ("planted", Some(Version::new(9))));
}
