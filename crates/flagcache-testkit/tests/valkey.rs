//! The testkit's Valkey flavor: a single node, a cluster and a sentinel setup come up on
//! `valkey-server` and say so. Without the binary these skip on a developer's machine
//! and fail under CI (`Flavor::available`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flagcache_testkit::{Flavor, RedisCluster, RedisSentinel, RedisServer};

fn valkey() -> bool {
    Flavor::Valkey.available().unwrap()
}

#[test]
fn a_valkey_server_is_valkey_and_restarts() {
    if !valkey() {
        return;
    }
    let mut server = RedisServer::start_with(Flavor::Valkey).unwrap();
    assert_eq!(server.flavor(), Flavor::Valkey);
    let info = server.command(&["INFO", "server"]).unwrap();
    assert!(info.contains("server_name:valkey"), "{info}");
    assert!(info.contains("valkey_version:"), "{info}");
    assert_eq!(server.command(&["SET", "k", "v"]).unwrap(), "OK");
    server.restart().unwrap();
    assert_eq!(server.command(&["GET", "k"]).unwrap(), "(nil)");
}

#[test]
fn a_redis_server_is_not_valkey() {
    let server = RedisServer::start().unwrap();
    let info = server.command(&["INFO", "server"]).unwrap();
    assert!(!info.contains("server_name:valkey"), "{info}");
}

#[test]
fn a_valkey_cluster_forms_with_redis_cli() {
    if !valkey() {
        return;
    }
    let cluster = RedisCluster::start_with(Flavor::Valkey, 3).unwrap();
    for node in cluster.nodes() {
        assert_eq!(node.flavor(), Flavor::Valkey);
        let info = node.command(&["CLUSTER", "INFO"]).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
    }
}

#[test]
fn valkey_sentinel_promotes_the_replica_when_the_primary_dies() {
    if !valkey() {
        return;
    }
    let mut s = RedisSentinel::start_with(Flavor::Valkey, None).unwrap();
    let info = s.sentinel_command(&["INFO", "server"]).unwrap();
    assert!(info.contains("server_name:valkey"), "{info}");
    s.fail_over().unwrap();
    assert_eq!(s.primary_port().unwrap(), s.replica().port());
}

#[test]
fn a_missing_valkey_fails_under_ci_and_skips_otherwise() {
    // In a child process, so the environment change cannot leak into other tests.
    if let Some(ci) = std::env::var_os("FLAGCACHE_TESTKIT_CHILD") {
        let available = Flavor::Valkey.available();
        if ci == "ci" {
            let err = available.unwrap_err().to_string();
            assert!(err.contains("scripts/fetch-valkey"), "{err}");
        } else {
            assert!(!available.unwrap());
        }
        return;
    }
    for ci in ["ci", "local"] {
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new(exe)
            .args([
                "--exact",
                "a_missing_valkey_fails_under_ci_and_skips_otherwise",
                "--nocapture",
            ])
            .env("FLAGCACHE_TESTKIT_CHILD", ci)
            .env("FLAGCACHE_VALKEY_SERVER", "/nonexistent/valkey-server")
            .env("CI", if ci == "ci" { "true" } else { "false" })
            .status()
            .unwrap();
        assert!(status.success(), "{ci}");
    }
}
