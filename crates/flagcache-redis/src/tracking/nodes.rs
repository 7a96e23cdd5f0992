//! The tracking connections of one generation: one RESP3 connection with broadcast
//! tracking on to the server (or Sentinel's primary), or to every primary of a Redis
//! Cluster, all feeding one channel of pushes; and the cluster's primaries, read from
//! `CLUSTER NODES`, by which a changed topology is noticed.

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, ProtocolVersion, PushInfo};
use tokio::sync::mpsc;

use flagcache_core::{Error, Result};

use super::TRACKING_CLIENT_NAME;
use crate::connection::Connection;
use crate::error::build_error;

/// A cluster primary's address.
pub(super) type Primary = (String, u16);

/// The tracking connections opened together, and the pushes they receive. A push of
/// any of them arrives on `pushes`; the loss of any (a `Disconnection` push) ends the
/// generation.
pub(super) struct Generation {
    pub conns: Vec<MultiplexedConnection>,
    pub pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// On a cluster, the primaries tracked (sorted); `None` on one node.
    pub primaries: Option<Vec<Primary>>,
}

/// Opens a generation for `prefix`: on one node (or Sentinel's primary), a connection
/// to the `attempt`-th node given; on a cluster, one to every primary, as the
/// `attempt`-th seed's `CLUSTER NODES` lists them. Pushes sent from then on are
/// received.
pub(super) async fn open(
    connection: &Connection,
    prefix: &str,
    attempt: usize,
) -> Result<Generation> {
    let seed = connection
        .node_client("tracking", attempt)
        .await?
        .get_connection_info()
        .clone();
    let (tx, pushes) = mpsc::unbounded_channel();
    if !connection.is_cluster() {
        let conn = track(connection, seed, prefix, tx).await?;
        return Ok(Generation {
            conns: vec![conn],
            pushes,
            primaries: None,
        });
    }
    let primaries = primaries(connection).await?;
    if primaries.is_empty() {
        return Err(Error::InvalidArgument(
            format!(
                "no primary serving slots in {}",
                connection.target().describe()
            )
            .into(),
        ));
    }
    let mut conns = Vec::with_capacity(primaries.len());
    for (host, port) in &primaries {
        let info = at(&seed, host, *port);
        conns.push(track(connection, info, prefix, tx.clone()).await?);
    }
    Ok(Generation {
        conns,
        pushes,
        primaries: Some(primaries),
    })
}

/// The cluster's primaries that serve slots, sorted, from `CLUSTER NODES` (asked of
/// any node).
pub(super) async fn primaries(connection: &Connection) -> Result<Vec<Primary>> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("NODES");
    let nodes: String = connection.query("tracking topology", &cmd).await?;
    Ok(parse_primaries(&nodes))
}

/// The primaries in a `CLUSTER NODES` reply: lines `<id> <ip:port@bus[,host]>
/// <flags> <primary id> <ping> <pong> <epoch> <link> [<slot>…]` whose flags say
/// `master`, not `fail`, and which serve at least one slot.
fn parse_primaries(nodes: &str) -> Vec<Primary> {
    let mut out: Vec<Primary> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let is_primary = flags.split(',').any(|f| f == "master")
                && !flags.split(',').any(|f| f == "fail" || f == "noaddr");
            if !is_primary || fields.len() < 9 {
                return None;
            }
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `seed`'s settings (credentials, TLS) for the node at `host:port`.
fn at(seed: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_string(), port),
    };
    seed.clone().set_addr(addr)
}

/// Connects to `info` over RESP3 with pushes going to `tx`, names the connection
/// [`TRACKING_CLIENT_NAME`] and turns broadcast tracking on for `prefix`.
async fn track(
    connection: &Connection,
    info: ConnectionInfo,
    prefix: &str,
    tx: mpsc::UnboundedSender<PushInfo>,
) -> Result<MultiplexedConnection> {
    let target = connection.target();
    let at = target.describe();
    let fail = |e| build_error("tracking", &at, target.connection_timeout, e);
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(resp3)).map_err(fail)?;
    let config = target.single_attempt().set_push_sender(tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(fail)?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(TRACKING_CLIENT_NAME)
        .query_async::<()>(&mut conn)
        .await
        .map_err(fail)?;
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(prefix)
        .query_async::<()>(&mut conn)
        .await
        .map_err(fail)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::parse_primaries;

    #[test]
    fn primaries_serving_slots_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,host-b master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
e5 127.0.0.1:7005@17005 master - 0 0 0 connected
f6 :0@0 master,noaddr - 0 0 0 disconnected 1-2
";
        assert_eq!(
            parse_primaries(nodes),
            vec![
                ("127.0.0.1".to_string(), 7001),
                ("127.0.0.1".to_string(), 7002)
            ]
        );
    }
}
