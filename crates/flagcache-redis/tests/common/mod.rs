//! What the integration tests share: keys, waiting for signals and raw messages,
//! stores and invalidators with short timeouts, and a raw client that plays another
//! process (a foreign publisher, a plain subscriber).

// Each test binary uses only some of these.
#![allow(dead_code)]

use std::time::Duration;

use flagcache_core::{
    Codec, FlagKey, FlagStoreExt, Invalidation, NodeId, Signal, Subscription, Version,
};
use flagcache_redis::{RedisInvalidator, RedisStore};
use futures_util::{Stream, StreamExt};

/// The channel invalidators use by default.
pub const CHANNEL: &str = "flag_updates";

/// The node id of the foreign publisher [`foreign_event`] and [`foreign_heartbeat`]
/// speak for.
pub const FOREIGN: NodeId = NodeId(99);

pub fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

/// The subscription's next signal, within 10 s.
pub async fn next(sub: &mut Subscription) -> Signal {
    next_within(sub, Duration::from_secs(10)).await
}

/// The subscription's next signal, within `limit`.
pub async fn next_within(sub: &mut Subscription, limit: Duration) -> Signal {
    tokio::time::timeout(limit, sub.recv())
        .await
        .unwrap_or_else(|_| panic!("no signal within {limit:?}"))
        .expect("subscription ended")
}

/// A store on `url` whose connection and response timeouts are both `timeout`.
/// A store on `url` in the JSON interop layout.
pub async fn json_store(url: &str) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .codec(flagcache_core::JsonCodec::new())
        .build()
        .await
        .unwrap()
}

pub async fn store_with_timeouts(url: &str, timeout: Duration) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .response_timeout(timeout)
        .connection_timeout(timeout)
        .build()
        .await
        .unwrap()
}

/// An invalidator on `url` with a heartbeat every `every`.
pub async fn invalidator_with_heartbeat(url: &str, every: Duration) -> RedisInvalidator {
    RedisInvalidator::builder()
        .url(url)
        .heartbeat(Some(every))
        .build()
        .await
        .unwrap()
}

/// Writes `value` at version 1 under `k`, and reads it back.
pub async fn assert_round_trip(store: &RedisStore, k: &FlagKey, value: u32) {
    store
        .put_value(k, &value, Version::new(1), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store.get_value::<u32>(k).await.unwrap(),
        Some((value, Version::new(1)))
    );
}

/// A plain redis-rs connection to `url`, as another process has.
pub async fn raw_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Publishes raw messages on the invalidation channel, as another process would.
pub async fn raw_publish(url: &str, messages: Vec<Vec<u8>>) {
    let mut c = raw_conn(url).await;
    for m in messages {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(m)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

/// A plain redis-rs subscriber to the invalidation channel, as another language's
/// would be.
pub async fn raw_subscriber(url: &str) -> impl Stream<Item = redis::Msg> + Unpin {
    let client = redis::Client::open(url).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe(CHANNEL).await.unwrap();
    ps.into_on_message()
}

/// The next raw message, within `limit`.
pub async fn next_message(
    stream: &mut (impl Stream<Item = redis::Msg> + Unpin),
    limit: Duration,
) -> redis::Msg {
    tokio::time::timeout(limit, stream.next())
        .await
        .unwrap()
        .unwrap()
}

/// Event `seq` of the foreign publisher (an invalidation of key `x`), in the core
/// codec.
pub fn foreign_event(seq: u64) -> Vec<u8> {
    let ev = Invalidation::key(key("x")).stamped(FOREIGN, seq, 1);
    Codec::default().encode_invalidation(&ev).unwrap().to_vec()
}

/// The foreign publisher's heartbeat: "I have published `seq` events".
pub fn foreign_heartbeat(seq: u64) -> Vec<u8> {
    let mut b = vec![0xF1, 0xA8, 0x01];
    b.extend_from_slice(&FOREIGN.0.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b
}

/// Turns each `async fn name(flavor: Flavor)` named into two tests, `name::redis` and
/// `name::valkey`: the same body against `redis-server` and against `valkey-server`.
/// The Valkey one returns early, with the reason printed, when `valkey-server` is
/// missing on a developer's machine, and fails under CI (`Flavor::available`).
macro_rules! on_both_flavors {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$test(flagcache_testkit::Flavor::Redis).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn valkey() {
                if flagcache_testkit::Flavor::Valkey.available().unwrap() {
                    super::$test(flagcache_testkit::Flavor::Valkey).await;
                }
            }
        }
    )*};
}
pub(crate) use on_both_flavors;

/// Plants raw bytes with a plain `SET` from another client: over `C`, a plain or a
/// cluster connection.
pub struct Raw<C> {
    store: RedisStore,
    conn: tokio::sync::Mutex<C>,
}

impl<C> Raw<C> {
    pub fn new(store: &RedisStore, conn: C) -> Self {
        Raw {
            store: store.clone(),
            conn: tokio::sync::Mutex::new(conn),
        }
    }
}

#[flagcache_core::async_trait]
impl<C: redis::aio::ConnectionLike + Send + Sync> flagcache_core::conformance::RawAccess
    for Raw<C>
{
    async fn write_raw(
        &self,
        key: &FlagKey,
        bytes: flagcache_core::bytes::Bytes,
        ttl: Duration,
    ) -> flagcache_core::Result<()> {
        let mut c = self.conn.lock().await;
        let _: () = redis::cmd("SET")
            .arg(self.store.redis_key(key))
            .arg(&bytes[..])
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut *c)
            .await
            .map_err(|e| flagcache_core::Error::backend("redis", "raw set", true, e))?;
        Ok(())
    }
}
