//! Idle fleet: N replicas subscribed to one Redis channel, each of which published one
//! event once and then does nothing — the background traffic an idle fleet costs the
//! server, at 50, 150 and 500 replicas (all subscriptions in this one process, each on
//! its own pub/sub connection, as separate processes would have).
//!
//! Two contenders per size, in the same run:
//! - heartbeats for the default 5 s window after a node's last event (measured once
//!   the window has passed);
//! - heartbeats for ever (a window of a year): every node that has ever published
//!   heartbeats every second, the behaviour a window replaces.
//!
//! The figures, over a measured interval: publishes/s (the server's `PUBLISH` count),
//! deliveries/s (messages a plain subscriber of the channel receives, times the
//! subscribers: every message reaches each of them), and the server's CPU (`INFO cpu`:
//! `used_cpu_sys` + `used_cpu_user`, as a percentage of one core), besides the resyncs
//! the replicas signalled. The target: no publishes at all once the window has passed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::{Invalidation, Invalidator, Signal};
use flagcache_redis::RedisInvalidator;
use futures_util::StreamExt;

use super::{err, fresh_key, redis_conn, Check, Plan, Res, Row, Section, Servers};
use crate::stats::Samples;

const SCENARIO: &str = "idle fleet";
/// A window no run outlives: heartbeats for ever.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// What one measured interval found.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    publishes_per_sec: f64,
    deliveries_per_sec: f64,
    cpu_percent: f64,
    resyncs: u64,
}

/// The server's CPU seconds (system + user) and `PUBLISH` calls so far.
async fn server_counters(conn: &mut redis::aio::MultiplexedConnection) -> Res<(f64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .arg("commandstats")
        .query_async(conn)
        .await
        .map_err(err)?;
    let field = |name: &str| -> Option<&str> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
    };
    let cpu = ["used_cpu_sys", "used_cpu_user"]
        .iter()
        .map(|f| field(f).and_then(|v| v.trim().parse::<f64>().ok()))
        .sum::<Option<f64>>()
        .ok_or("INFO cpu has no used_cpu_sys/used_cpu_user")?;
    // cmdstat_publish:calls=12,usec=…
    let publishes = field("cmdstat_publish")
        .and_then(|v| v.strip_prefix("calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((cpu, publishes))
}

/// `replicas` nodes on a fresh channel, heartbeating every `every` for `window` after
/// their last event: each subscribes, publishes one event, and then idles; after
/// `settle`, the traffic over `measure`.
async fn idle(
    url: &str,
    replicas: usize,
    every: Duration,
    window: Duration,
    settle: Duration,
    measure: Duration,
) -> Res<Traffic> {
    let channel = format!("idle-fleet.{:x}", fastrand::u64(..));
    let base = RedisInvalidator::builder()
        .url(url)
        .channel(&channel)
        .heartbeat(Some(every))
        .heartbeat_window(window)
        .build()
        .await
        .map_err(err)?;
    let resyncs = Arc::new(AtomicU64::new(0));
    let mut nodes = Vec::with_capacity(replicas);
    let mut listeners = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let node = base.peer();
        let mut sub = node.subscribe().await.map_err(err)?;
        let resyncs = resyncs.clone();
        // Each replica reads its subscription, as a cache's listener does.
        listeners.push(tokio::spawn(async move {
            while let Some(signal) = sub.recv().await {
                if matches!(signal, Signal::Resync(_)) {
                    resyncs.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        nodes.push(node);
    }
    // A plain subscriber counts the messages on the channel.
    let client = redis::Client::open(url).map_err(err)?;
    let mut plain = client.get_async_pubsub().await.map_err(err)?;
    plain.subscribe(&channel).await.map_err(err)?;
    let messages = Arc::new(AtomicU64::new(0));
    let counter = {
        let messages = messages.clone();
        tokio::spawn(async move {
            let mut stream = plain.into_on_message();
            while stream.next().await.is_some() {
                messages.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let k = fresh_key("idle")?;
    for node in &nodes {
        node.publish(&Invalidation::key(k.clone()))
            .await
            .map_err(err)?;
    }
    tokio::time::sleep(settle).await;

    let mut conn = redis_conn(url).await?;
    let resyncs_before = resyncs.load(Ordering::Relaxed);
    let messages_before = messages.load(Ordering::Relaxed);
    let (cpu_before, publishes_before) = server_counters(&mut conn).await?;
    let t0 = Instant::now();
    tokio::time::sleep(measure).await;
    let (cpu_after, publishes_after) = server_counters(&mut conn).await?;
    let secs = t0.elapsed().as_secs_f64();
    let received = messages.load(Ordering::Relaxed) - messages_before;
    let traffic = Traffic {
        publishes_per_sec: publishes_after.saturating_sub(publishes_before) as f64 / secs,
        // Every message reaches the plain subscriber and each replica's subscription.
        deliveries_per_sec: received as f64 * (replicas + 1) as f64 / secs,
        cpu_percent: (cpu_after - cpu_before) / secs * 100.0,
        resyncs: resyncs.load(Ordering::Relaxed) - resyncs_before,
    };
    counter.abort();
    for l in listeners {
        l.abort();
    }
    drop(nodes);
    // Let the server close the connections before the next size opens its own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(traffic)
}

/// Runs the idle fleet at each size, with a heartbeat window and for ever.
pub async fn idle_fleet(servers: &mut Servers, plan: Plan) -> Res<Section> {
    let url = servers.redis_url()?;
    let sizes: &[usize] = if plan.quick { &[4, 8] } else { &[50, 150, 500] };
    let every = if plan.quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let window = if plan.quick {
        Duration::from_millis(400)
    } else {
        Duration::from_secs(5)
    };
    let measure = plan.secs(5.0, 1.0);
    let mut section = Section::default();
    let mut worst_after_window: f64 = 0.0;
    for &n in sizes {
        let windowed = idle(
            &url,
            n,
            every,
            window,
            window + every + plan.secs(1.0, 0.3),
            measure,
        )
        .await?;
        worst_after_window = worst_after_window.max(windowed.publishes_per_sec);
        let forever = idle(&url, n, every, FOREVER, every * 2, measure).await?;
        for (contender, t) in [
            (
                format!(
                    "{n} replicas, heartbeats for {:?} after the last event",
                    window
                ),
                windowed,
            ),
            (format!("{n} replicas, heartbeats for ever"), forever),
        ] {
            section.rows.push(
                Row::new(SCENARIO, &contender, Samples::default().summary())
                    .count("publishes/s", t.publishes_per_sec.round())
                    .count("deliveries/s", t.deliveries_per_sec.round())
                    .count("server CPU %", (t.cpu_percent * 10.0).round() / 10.0)
                    .count("resyncs", t.resyncs as f64),
            );
        }
    }
    section.checks.push(
        Check::at_most(
            "idle fleet: publishes/s once the heartbeat window has passed",
            worst_after_window,
            0.0,
            "/s",
        )
        .correctness(),
    );
    Ok(section)
}
