//! A Redis Cluster of N masters on loopback (Redis or Valkey nodes), formed with
//! `redis-cli --cluster create`.

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use super::RedisServer;
use crate::process::REDIS_CLI;
use crate::{Error, Flavor, Result};

/// A Redis Cluster of N masters (no replicas) on loopback, torn down on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCluster")
            .field(
                "ports",
                &self.nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled `redis-server` nodes (at least 3), joins them
    /// with `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`.
    ///
    /// # Errors
    /// [`Error::BinaryMissing`] when `redis-server` or `redis-cli` is missing;
    /// [`Error::Start`] when the cluster does not form.
    pub fn start(masters: usize) -> Result<Self> {
        Self::start_with(Flavor::Redis, masters)
    }

    /// As [`RedisCluster::start`], with nodes of `flavor` (`redis-cli` forms a Valkey
    /// cluster as well: the cluster commands are the same).
    ///
    /// # Errors
    /// As for [`RedisCluster::start`], for the flavor's server binary.
    pub fn start_with(flavor: Flavor, masters: usize) -> Result<Self> {
        let masters = masters.max(3);
        let cli = REDIS_CLI.locate()?;
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let mut b = RedisServer::builder()
                .flavor(flavor)
                .arg("cluster-enabled", "yes")
                .arg("cluster-node-timeout", "5000")
                .arg("cluster-require-full-coverage", "no");
            b.bus_port_offset = Some(10_000);
            nodes.push(b.start()?);
        }
        for n in &mut nodes {
            // The node's cluster config lives in its own directory.
            n.args.extend([
                "--cluster-config-file".into(),
                format!("nodes-{}.conf", n.port),
            ]);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let out = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            return Err(Error::Start {
                what: format!("{flavor} cluster on {addrs:?}"),
                reason: format!("redis-cli --cluster create exited with {}", out.status),
                log: String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            });
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    fn wait_ok(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all_ok = self.nodes.iter().all(|n| {
                n.command(&["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if all_ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Start {
                    what: format!("redis cluster {:?}", self),
                    reason: "cluster_state did not become ok within 30 s".into(),
                    log: self
                        .nodes
                        .iter()
                        .map(RedisServer::log_tail)
                        .collect::<Vec<_>>()
                        .join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The nodes, in creation order.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One node, mutably (to stop or restart it).
    pub fn node_mut(&mut self, i: usize) -> Option<&mut RedisServer> {
        self.nodes.get_mut(i)
    }

    /// `redis://127.0.0.1:<port>` for every node: the seed list for a cluster client.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
