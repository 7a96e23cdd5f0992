//! Propagation of a foreign writer's flips: a plain Redis client — another service,
//! in another language, that knows nothing of flagcache but the stored layout — writes
//! 500 flips of one flag with `SET`, and each of 8 replicas must serve every new
//! version. Over RESP3 client tracking the plain client only writes; over pub/sub it
//! must also `PUBLISH` an invalidation after each `SET` (a writer that does not is
//! never seen before the L1 freshness runs out).
//!
//! The figures: the p99 from the start of the write until a replica serves it (bound
//! 5 ms, as for `propagation`), and flips a replica never saw within 5 s (none
//! allowed).

use std::time::Duration;

use flagcache_core::{now_ms, Codec, Entry, FlagCache, FlagKey, Invalidation, Version};
use flagcache_redis::{RedisInvalidator, RedisTrackingInvalidator};

use super::propagation::{flip_and_wait, record};
use super::replicas::{redis_store, replica};
use super::{err, fresh_key, payload, redis_conn, Plan, Res, Section, Servers};
use crate::source::Source;

const READERS: usize = 8;

/// How the plain client tells the replicas, besides writing.
#[derive(Debug, Clone)]
enum Announce {
    /// Nothing: the server's tracking pushes do it.
    Nothing,
    /// A `PUBLISH` of the event on this channel after each `SET`.
    Publish(String),
}

/// The plain client: writes version `flip` of `k` as the store would lay it out, with
/// a raw `SET … PX`, and announces it as `announce` says.
struct PlainWriter {
    conn: redis::aio::MultiplexedConnection,
    redis_key: String,
    key: FlagKey,
    announce: Announce,
    codec: Codec,
}

impl PlainWriter {
    async fn write(&self, flip: u64) -> Res<()> {
        let entry = Entry {
            version: Version::new(flip),
            stamp_ms: now_ms(),
            payload: self.codec.encode_value(&payload(100)).map_err(err)?,
        };
        let bytes = self.codec.encode_entry(&entry).map_err(err)?;
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(&self.redis_key)
            .arg(&bytes[..])
            .arg("PX")
            .arg(300_000)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        if let Announce::Publish(channel) = &self.announce {
            let event = Invalidation::key(self.key.clone()).with_version(entry.version);
            let message = self.codec.encode_invalidation(&event).map_err(err)?;
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(&message[..])
                .query_async(&mut conn)
                .await
                .map_err(err)?;
        }
        Ok(())
    }
}

/// 8 replicas under `namespace`, each with the invalidator `invalidator` builds.
async fn replicas<I, F>(
    url: &str,
    namespace: &str,
    source: &std::sync::Arc<Source>,
    mut invalidator: impl FnMut() -> F,
) -> Res<Vec<FlagCache<String>>>
where
    I: flagcache_core::Invalidator + 'static,
    F: std::future::Future<Output = Res<I>>,
{
    let mut caches = Vec::with_capacity(READERS);
    for i in 0..READERS {
        let store = redis_store(url, namespace).await?;
        let inv = invalidator().await?;
        caches.push(replica(format!("{namespace}-{i}"), source, store, inv).await?);
    }
    Ok(caches)
}

/// Writes version 1 with the plain client, lets every replica read it into L1, then
/// times the flips.
async fn run_flips(
    section: &mut Section,
    url: &str,
    namespace: &str,
    readers: &[FlagCache<String>],
    (flips, announce, contender): (usize, Announce, &str),
) -> Res<()> {
    let key = fresh_key("foreign")?;
    let writer = PlainWriter {
        conn: redis_conn(url).await?,
        redis_key: redis_store(url, namespace).await?.redis_key(&key),
        key: key.clone(),
        announce,
        codec: Codec::default(),
    };
    writer.write(1).await?;
    for r in readers {
        r.get(&key).await.map_err(err)?;
    }
    let figures = flip_and_wait(readers, &key, flips, |flip| writer.write(flip)).await?;
    record(
        section,
        "foreign writer",
        figures,
        (flips, readers.len()),
        contender,
        5_000.0,
    );
    Ok(())
}

/// A plain client's flips reaching 8 replicas: over client tracking, and over pub/sub
/// with the client publishing too.
pub async fn foreign_writer(servers: &mut Servers, plan: Plan) -> Res<Section> {
    let flips = plan.n(500, 10);
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(1));
    let url = servers.redis_url()?;

    let ns = format!("bench-foreign-t{:x}", fastrand::u32(..));
    let caches = replicas(&url, &ns, &source, || async {
        RedisTrackingInvalidator::builder()
            .url(&url)
            .namespace(&ns)
            .build()
            .await
            .map_err(err)
    })
    .await?;
    let how = (flips, Announce::Nothing, "Redis client tracking (SET only)");
    run_flips(&mut section, &url, &ns, &caches, how).await?;
    drop(caches);

    let ns = format!("bench-foreign-p{:x}", fastrand::u32(..));
    let channel = format!("{ns}-events");
    let caches = replicas(&url, &ns, &source, || async {
        RedisInvalidator::builder()
            .url(&url)
            .channel(&channel)
            .build()
            .await
            .map_err(err)
    })
    .await?;
    let how = (
        flips,
        Announce::Publish(channel.clone()),
        "Redis pub/sub (SET + PUBLISH)",
    );
    run_flips(&mut section, &url, &ns, &caches, how).await?;
    Ok(section)
}
