//! A Sentinel setup on loopback (Redis or Valkey): a primary, a replica and one
//! sentinel.

use std::fmt;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use super::RedisServer;
use crate::process::{self, Proc};
use crate::{resp, Error, Flavor, Result};

/// A Redis Sentinel setup on loopback: a primary, one replica, and one sentinel that
/// monitors the primary as `mymaster` (quorum 1, down after 1 s), torn down on drop.
pub struct RedisSentinel {
    primary: RedisServer,
    replica: RedisServer,
    sentinel: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl fmt::Debug for RedisSentinel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSentinel")
            .field("primary", &self.primary.port)
            .field("replica", &self.replica.port)
            .field("sentinel", &self.port)
            .finish()
    }
}

impl RedisSentinel {
    /// The monitored service's name.
    pub const SERVICE: &'static str = "mymaster";

    /// Starts the primary, the replica (waiting until it is in sync) and the sentinel
    /// (waiting until it knows the replica, so a failover can happen).
    ///
    /// # Errors
    /// [`Error::BinaryMissing`] when `redis-server` is missing; [`Error::Start`] when the
    /// setup does not come up.
    pub fn start() -> Result<Self> {
        Self::start_with(Flavor::Redis, None)
    }

    /// As [`RedisSentinel::start`], with `password` required by the primary and the
    /// replica (`requirepass`, `masterauth`) and known to the sentinel (`auth-pass`).
    ///
    /// # Errors
    /// As for [`RedisSentinel::start`].
    pub fn start_with_password(password: &str) -> Result<Self> {
        Self::start_with(Flavor::Redis, Some(password))
    }

    /// As [`RedisSentinel::start`] (or, with `password`,
    /// [`RedisSentinel::start_with_password`]), every process of `flavor`: the
    /// sentinel is `<flavor>-server --sentinel`.
    ///
    /// # Errors
    /// As for [`RedisSentinel::start`], for the flavor's server binary.
    pub fn start_with(flavor: Flavor, password: Option<&str>) -> Result<Self> {
        let bin = flavor.locate()?;
        let auth: Vec<String> = match password {
            Some(p) => vec![
                "--requirepass".into(),
                p.into(),
                "--masterauth".into(),
                p.into(),
            ],
            None => Vec::new(),
        };
        let primary = RedisServer::builder()
            .flavor(flavor)
            .args(auth.clone())
            .start()?;
        let replica = RedisServer::builder()
            .flavor(flavor)
            .args(auth)
            .args([
                "--replicaof".to_string(),
                "127.0.0.1".to_string(),
                primary.port.to_string(),
            ])
            .start()?;
        wait_until("replica in sync", Duration::from_secs(20), || {
            replica
                .command(&["INFO", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"))
        })?;
        let dir = process::temp_dir("sentinel")?;
        let mut last = None;
        for _ in 0..5 {
            let port = process::free_port(None)?;
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {svc} 127.0.0.1 {primary} 1\n\
                     sentinel down-after-milliseconds {svc} 1000\n\
                     sentinel failover-timeout {svc} 5000\n\
                     sentinel parallel-syncs {svc} 1\n{auth}",
                    dir = dir.path().display(),
                    svc = Self::SERVICE,
                    primary = primary.port,
                    auth = password
                        .map(|p| format!("sentinel auth-pass {} {p}\n", Self::SERVICE))
                        .unwrap_or_default(),
                ),
            )?;
            let mut cmd = Command::new(&bin);
            cmd.arg(&conf).arg("--sentinel").current_dir(dir.path());
            let mut proc = Proc::spawn(cmd, dir.path().join(format!("sentinel-{port}.log")))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match proc.wait_ready(
                &format!("{flavor} sentinel on port {port}"),
                addr,
                resp::pings,
            ) {
                Ok(()) => {
                    let setup = RedisSentinel {
                        primary,
                        replica,
                        sentinel: proc,
                        port,
                        _dir: dir,
                    };
                    wait_until(
                        "sentinel knows the replica",
                        Duration::from_secs(30),
                        || {
                            setup
                                .sentinel_command(&["SENTINEL", "REPLICAS", Self::SERVICE])
                                .is_ok_and(|r| r.contains(&setup.replica.port.to_string()))
                        },
                    )?;
                    return Ok(setup);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Command {
            what: "redis sentinel".into(),
            reason: "no attempt made".into(),
        }))
    }

    /// `redis://127.0.0.1:<sentinel port>`.
    pub fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The current primary (before any failover).
    pub fn primary_mut(&mut self) -> &mut RedisServer {
        &mut self.primary
    }

    /// The replica (the primary after a failover).
    pub fn replica(&self) -> &RedisServer {
        &self.replica
    }

    /// Sends one command to the sentinel.
    ///
    /// # Errors
    /// [`Error::Command`] on a connection failure or an error reply.
    pub fn sentinel_command(&self, args: &[&str]) -> Result<String> {
        resp::command(SocketAddr::from(([127, 0, 0, 1], self.port)), args).map_err(|reason| {
            Error::Command {
                what: format!("sentinel {:?}", args.first()),
                reason,
            }
        })
    }

    /// The address the sentinel currently reports for the primary's port.
    ///
    /// # Errors
    /// As for [`RedisSentinel::sentinel_command`].
    pub fn primary_port(&self) -> Result<u16> {
        let reply =
            self.sentinel_command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::SERVICE])?;
        reply
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| Error::Command {
                what: "sentinel get-master-addr-by-name".into(),
                reason: format!("unexpected reply {reply:?}"),
            })
    }

    /// Kills the primary and waits until the sentinel has promoted the replica.
    ///
    /// # Errors
    /// [`Error::Start`] when no failover completes within 30 s.
    pub fn fail_over(&mut self) -> Result<()> {
        self.primary.stop();
        let replica = self.replica.port;
        wait_until("failover to the replica", Duration::from_secs(30), || {
            self.primary_port().is_ok_and(|p| p == replica)
                && self
                    .replica
                    .command(&["ROLE"])
                    .is_ok_and(|r| r.starts_with("master"))
        })
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        self.sentinel.kill();
    }
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::Start {
        what: what.to_string(),
        reason: format!("not reached within {limit:?}"),
        log: String::new(),
    })
}
