//! A Redis Cluster of N masters on loopback (Redis or Valkey nodes), formed with
//! `redis-cli --cluster create`, and grown by a primary that takes over a slot.

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use super::RedisServer;
use crate::process::REDIS_CLI;
use crate::{Error, Flavor, Result};

/// A Redis Cluster of N masters (no replicas) on loopback, torn down on drop.
pub struct RedisCluster {
    flavor: Flavor,
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
        let nodes = (0..masters)
            .map(|_| cluster_node(flavor))
            .collect::<Result<Vec<_>>>()?;
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
        let cluster = RedisCluster { flavor, nodes };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    fn wait_ok(&self) -> Result<()> {
        wait_for("cluster_state:ok on every node", || {
            self.nodes.iter().all(|n| {
                n.command(&["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        })
        .map_err(|e| match e {
            Error::Start { what, reason, .. } => Error::Start {
                what,
                reason,
                log: self
                    .nodes
                    .iter()
                    .map(RedisServer::log_tail)
                    .collect::<Vec<_>>()
                    .join("\n"),
            },
            e => e,
        })
    }

    /// Adds a primary: starts one more node, joins it (`CLUSTER MEET`) and moves
    /// `slot` — which must hold no keys — to it, telling every node, then waits until
    /// every node reports `cluster_state:ok`. A topology change, as resharding makes.
    ///
    /// # Errors
    /// [`Error::Start`] when the node does not join in time; [`Error::Command`] when
    /// the slot holds keys or a cluster command fails.
    pub fn add_primary(&mut self, slot: u16) -> Result<()> {
        let owner = self.owner_of(slot)?;
        let slot = slot.to_string();
        let first = self.nodes.first().ok_or_else(|| Error::Command {
            what: "add_primary".into(),
            reason: "the cluster has no nodes".into(),
        })?;
        let keys = first.command(&["CLUSTER", "COUNTKEYSINSLOT", &slot])?;
        if keys != "0" {
            return Err(Error::Command {
                what: format!("moving slot {slot}"),
                reason: format!("it holds {keys} keys"),
            });
        }
        let node = cluster_node(self.flavor)?;
        node.command(&["CLUSTER", "MEET", "127.0.0.1", &first.port.to_string()])?;
        let known = (self.nodes.len() + 1).to_string();
        let everyone = self.nodes.iter().chain([&node]).collect::<Vec<_>>();
        wait_for("the new node to join", || {
            everyone.iter().all(|n| {
                n.command(&["CLUSTER", "INFO"]).is_ok_and(|i| {
                    i.lines()
                        .any(|l| l.trim() == format!("cluster_known_nodes:{known}"))
                })
            })
        })?;
        let id = node.command(&["CLUSTER", "MYID"])?;
        let owner_node = self.nodes.get(owner.1).ok_or_else(|| Error::Command {
            what: format!("moving slot {slot}"),
            reason: "its owner is not a node of this cluster".into(),
        })?;
        node.command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &owner.0])?;
        owner_node.command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &id])?;
        for n in &everyone {
            n.command(&["CLUSTER", "SETSLOT", &slot, "NODE", &id])?;
        }
        self.nodes.push(node);
        self.wait_ok()
    }

    /// The id of the node serving `slot`, and its index in `nodes`.
    fn owner_of(&self, slot: u16) -> Result<(String, usize)> {
        for (i, n) in self.nodes.iter().enumerate() {
            let nodes = n.command(&["CLUSTER", "NODES"])?;
            let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
                continue;
            };
            let fields: Vec<&str> = me.split_whitespace().collect();
            let serves = fields.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
            });
            if serves {
                return Ok((fields.first().unwrap_or(&"").to_string(), i));
            }
        }
        Err(Error::Command {
            what: format!("slot {slot}"),
            reason: "no node serves it".into(),
        })
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

/// Starts one cluster-enabled node of `flavor` (its cluster config kept in its own
/// directory, for restarts).
fn cluster_node(flavor: Flavor) -> Result<RedisServer> {
    let mut b = RedisServer::builder()
        .flavor(flavor)
        .arg("cluster-enabled", "yes")
        .arg("cluster-node-timeout", "5000")
        .arg("cluster-require-full-coverage", "no");
    b.bus_port_offset = Some(10_000);
    let mut n = b.start()?;
    n.args.extend([
        "--cluster-config-file".into(),
        format!("nodes-{}.conf", n.port),
    ]);
    Ok(n)
}

/// Waits (up to 30 s) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::Start {
        what: what.to_string(),
        reason: "not reached within 30 s".into(),
        log: String::new(),
    })
}
