//! The testkit's own tests: each server starts, answers, stops, restarts, and goes away
//! on drop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpStream;
use std::time::Duration;

use flagcache_testkit::{MemcachedServer, RedisCluster, RedisServer};

fn listening(addr: std::net::SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

#[test]
fn redis_starts_answers_restarts_and_dies_on_drop() {
    let mut redis = RedisServer::start().unwrap();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    assert_eq!(redis.command(&["SET", "greeting", "hello"]).unwrap(), "OK");
    assert_eq!(redis.command(&["GET", "greeting"]).unwrap(), "hello");
    assert_eq!(redis.command(&["GET", "absent"]).unwrap(), "(nil)");
    assert!(redis.command(&["NOSUCHCOMMAND"]).is_err());

    redis.stop();
    assert!(!redis.is_running());
    assert!(!listening(redis.addr()), "still listening after stop");
    assert!(redis.command(&["PING"]).is_err());

    redis.restart().unwrap();
    assert_eq!(redis.command(&["PING"]).unwrap(), "PONG");
    // No persistence: a restart is a fresh, empty server.
    assert_eq!(redis.command(&["GET", "greeting"]).unwrap(), "(nil)");

    let addr = redis.addr();
    drop(redis);
    assert!(!listening(addr), "still listening after drop");
}

#[test]
fn two_redis_servers_get_distinct_ports() {
    let a = RedisServer::start().unwrap();
    let b = RedisServer::start().unwrap();
    assert_ne!(a.port(), b.port());
    a.command(&["SET", "k", "a"]).unwrap();
    assert_eq!(b.command(&["GET", "k"]).unwrap(), "(nil)");
}

#[test]
fn redis_with_a_password() {
    let redis = RedisServer::builder().password("s3cret").start().unwrap();
    assert!(redis.url().contains(":s3cret@"));
    assert_eq!(redis.command(&["SET", "k", "v"]).unwrap(), "OK");
}

#[test]
fn memcached_starts_answers_meta_commands_and_restarts() {
    let mut mc = MemcachedServer::start().unwrap();
    assert!(mc.request("version\r\n").unwrap().starts_with("VERSION 1."));
    assert_eq!(mc.request("ms flag 5 T60\r\nhello\r\n").unwrap(), "HD");
    assert_eq!(mc.request("mg flag v\r\n").unwrap(), "VA 5\r\nhello");
    assert_eq!(mc.request("mg missing v\r\n").unwrap(), "EN");
    // The meta protocol's recache flags are there: N vivifies a miss and wins once.
    assert!(mc.request("mg cold v N30\r\n").unwrap().contains('W'));
    assert!(!mc.request("mg cold v N30\r\n").unwrap().contains('W'));

    mc.stop();
    assert!(!listening(mc.addr()));
    mc.restart().unwrap();
    assert_eq!(mc.request("mg flag v\r\n").unwrap(), "EN");
    let addr = mc.addr();
    drop(mc);
    assert!(!listening(addr));
}

#[test]
fn memcached_item_size_limit_is_configurable() {
    let mc = MemcachedServer::builder()
        .item_size_limit("2m")
        .start()
        .unwrap();
    let stats = mc.request("stats settings\r\n").unwrap();
    // `stats settings` is multi-line; the first line is enough to prove it answers.
    assert!(stats.starts_with("STAT "), "{stats}");
    let big = "x".repeat(1_500_000);
    assert_eq!(
        mc.request(&format!("ms big {} T60\r\n{big}\r\n", big.len()))
            .unwrap(),
        "HD"
    );
}

#[test]
fn redis_cluster_of_three_masters_forms_and_routes() {
    let cluster = RedisCluster::start(3).unwrap();
    assert_eq!(cluster.nodes().len(), 3);
    for node in cluster.nodes() {
        let info = node.command(&["CLUSTER", "INFO"]).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
    }
    // Every slot is served, by exactly one of the three masters.
    let slots = cluster.nodes()[0].command(&["CLUSTER", "SHARDS"]).unwrap();
    assert!(!slots.is_empty());
    // A key lands on exactly one node; the others redirect with MOVED.
    let mut owners = 0;
    for node in cluster.nodes() {
        match node.command(&["SET", "flags:{checkout}", "v"]) {
            Ok(r) => {
                assert_eq!(r, "OK");
                owners += 1;
            }
            Err(e) => assert!(e.to_string().contains("MOVED"), "{e}"),
        }
    }
    assert_eq!(owners, 1);
}

#[test]
fn a_primary_added_to_a_cluster_serves_the_slot_it_was_given() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let slot: u16 = cluster.nodes()[0]
        .command(&["CLUSTER", "KEYSLOT", "flags:{moved}"])
        .unwrap()
        .parse()
        .unwrap();
    cluster.add_primary(slot).unwrap();
    assert_eq!(cluster.nodes().len(), 4);
    let new = &cluster.nodes()[3];
    assert_eq!(new.command(&["SET", "flags:{moved}", "v"]).unwrap(), "OK");
    for old in &cluster.nodes()[..3] {
        let err = old.command(&["SET", "flags:{moved}", "v"]).unwrap_err();
        assert!(err.to_string().contains(&format!("MOVED {slot}")), "{err}");
    }
}

#[test]
fn a_missing_binary_names_the_install_command() {
    // Point the lookup at a path that does not exist, in a child process so the
    // environment change cannot leak into other tests.
    if std::env::var_os("FLAGCACHE_TESTKIT_CHILD").is_some() {
        let err = RedisServer::start().unwrap_err().to_string();
        assert!(err.contains("apt-get install redis-server"), "{err}");
        let err = MemcachedServer::start().unwrap_err().to_string();
        assert!(err.contains("apt-get install memcached"), "{err}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new(exe)
        .args([
            "--exact",
            "a_missing_binary_names_the_install_command",
            "--nocapture",
        ])
        .env("FLAGCACHE_TESTKIT_CHILD", "1")
        .env("FLAGCACHE_REDIS_SERVER", "/nonexistent/redis-server")
        .env("FLAGCACHE_MEMCACHED", "/nonexistent/memcached")
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sentinel_promotes_the_replica_when_the_primary_dies() {
    let mut s = flagcache_testkit::RedisSentinel::start().unwrap();
    let before = s.primary_port().unwrap();
    assert_ne!(before, s.replica().port());
    s.fail_over().unwrap();
    assert_eq!(s.primary_port().unwrap(), s.replica().port());
    assert_eq!(s.replica().command(&["SET", "k", "v"]).unwrap(), "OK");
}
