//! `put` over unreadable entries, counted in round trips: the script writes over what it
//! can check itself (magic, format, flags, length; JSON that does not parse) in one
//! `EVALSHA`, and over a checksum mismatch after the client's read and
//! compare-and-delete; a normal put, stored or superseded, stays one script run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{json_store, key, on_both_flavors, raw_conn};
use flagcache_core::{Entry, FlagKey, FlagStore, PutOutcome, Version};
use flagcache_redis::RedisStore;
use flagcache_testkit::{Flavor, RedisServer};
use redis::aio::MultiplexedConnection;

const TTL: Duration = Duration::from_secs(60);
const CLAIM: Version = Version::new(1_000_000);

/// How many `EVALSHA`s the server ran since the last [`reset_stats`].
async fn evalsha_calls(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

async fn reset_stats(conn: &mut MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .unwrap();
}

async fn plant(conn: &mut MultiplexedConnection, store: &RedisStore, k: &FlagKey, bytes: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(store.redis_key(k))
        .arg(bytes)
        .query_async(conn)
        .await
        .unwrap();
}

fn five(store: &RedisStore) -> Entry {
    Entry {
        version: Version::new(5),
        stamp_ms: 5,
        payload: store.codec().encode_value("five").unwrap(),
    }
}

/// A valid envelope at [`CLAIM`], altered by `change`.
fn altered(store: &RedisStore, change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let e = Entry::new(CLAIM, store.codec().encode_value("claim").unwrap());
    let mut b = store.codec().encode_entry(&e).unwrap().to_vec();
    change(&mut b);
    b
}

/// Puts `five` over `planted` and answers how many script runs it took.
async fn put_over(
    conn: &mut MultiplexedConnection,
    store: &RedisStore,
    name: &str,
    planted: &[u8],
) -> u64 {
    let k = key(&format!("unreadable.{name}"));
    plant(conn, store, &k, planted).await;
    reset_stats(conn).await;
    assert_eq!(
        store.put(&k, &five(store), TTL).await.unwrap(),
        PutOutcome::Stored,
        "{name}: the planted entry guarded the key"
    );
    let runs = evalsha_calls(conn).await;
    assert_eq!(store.get(&k).await.unwrap(), Some(five(store)), "{name}");
    runs
}

/// Loads the scripts, so that every later call is one `EVALSHA`.
async fn warm_up(store: &RedisStore) {
    let k = key("unreadable.warm-up");
    store.put(&k, &five(store), TTL).await.unwrap();
    store.put(&k, &five(store), TTL).await.unwrap();
}

async fn the_script_writes_over_what_it_checks_in_one_run(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw_conn(&server.url()).await;
    warm_up(&store).await;
    let cases: [(&str, Vec<u8>); 5] = [
        ("magic", altered(&store, |b| b[0] = 0)),
        ("format", altered(&store, |b| b[2] = 2)),
        ("flags", altered(&store, |b| b[3] = 0x80)),
        ("longer", altered(&store, |b| b.push(0))),
        ("shorter", altered(&store, |b| b.truncate(b.len() - 1))),
    ];
    for (name, bytes) in cases {
        assert_eq!(
            put_over(&mut conn, &store, name, &bytes).await,
            1,
            "{name}: the script did not write over it by itself"
        );
    }
}

async fn a_checksum_mismatch_is_deleted_by_the_client_and_written_over(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw_conn(&server.url()).await;
    warm_up(&store).await;
    let crc = altered(&store, |b| *b.last_mut().unwrap() ^= 0x40);
    let runs = put_over(&mut conn, &store, "crc", &crc).await;
    // The put script twice, and the compare-and-delete between them.
    assert!(runs >= 3, "{runs} script runs");
}

async fn json_the_script_does_not_read_is_repaired_by_the_client(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = json_store(&server.url()).await;
    let mut conn = raw_conn(&server.url()).await;
    warm_up(&store).await;
    assert_eq!(
        put_over(
            &mut conn,
            &store,
            "json-parse",
            br#"{"flagConfig": 1, "version": 10"#
        )
        .await,
        1
    );
    let stamp = br#"{"flagConfig": 1, "version": 1000000, "stampMs": -1}"#;
    assert!(put_over(&mut conn, &store, "json-stamp", stamp).await >= 3);
}

async fn a_normal_put_is_one_script_run_stored_or_superseded(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw_conn(&server.url()).await;
    warm_up(&store).await;
    let k = key("unreadable.normal");
    reset_stats(&mut conn).await;
    let high = Entry::new(CLAIM, store.codec().encode_value("high").unwrap());
    assert_eq!(store.put(&k, &high, TTL).await.unwrap(), PutOutcome::Stored);
    assert_eq!(evalsha_calls(&mut conn).await, 1, "a stored put");
    assert_eq!(
        store.put(&k, &five(&store), TTL).await.unwrap(),
        PutOutcome::Superseded { current: CLAIM }
    );
    // The client's read of a superseding entry is a plain GET, not a second run.
    assert_eq!(evalsha_calls(&mut conn).await, 2, "a superseded put");
    assert_eq!(store.get(&k).await.unwrap(), Some(high));
}

on_both_flavors!(
    the_script_writes_over_what_it_checks_in_one_run,
    a_checksum_mismatch_is_deleted_by_the_client_and_written_over,
    json_the_script_does_not_read_is_repaired_by_the_client,
    a_normal_put_is_one_script_run_stored_or_superseded,
);
