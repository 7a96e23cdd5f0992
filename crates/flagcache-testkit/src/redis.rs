use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{self, Proc, Running, REDIS_CLI, REDIS_SERVER};
use crate::{resp, Error, Result};

/// Extra `redis-server` settings, as `--name value` pairs.
#[derive(Debug, Clone, Default)]
pub struct RedisServerBuilder {
    args: Vec<String>,
    bus_port_offset: Option<u16>,
    tls: bool,
}

impl RedisServerBuilder {
    /// Adds `--<name> <value>` to the command line (e.g. `("maxmemory", "10mb")`).
    #[must_use]
    pub fn arg(mut self, name: &str, value: &str) -> Self {
        self.args.push(format!("--{name}"));
        self.args.push(value.to_string());
        self
    }

    /// Adds raw arguments (e.g. `["--replicaof", "127.0.0.1", "6379"]`).
    #[must_use]
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Also listens with TLS on a second port, with a certificate for 127.0.0.1 from a
    /// throwaway CA made by `openssl` (see [`RedisServer::tls_url`] and
    /// [`RedisServer::tls_root_cert`]).
    #[must_use]
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Requires a password (`--requirepass`).
    #[must_use]
    pub fn password(self, password: &str) -> Self {
        self.arg("requirepass", password)
    }

    /// Starts the server.
    ///
    /// # Errors
    /// [`Error::BinaryMissing`] when `redis-server` is not installed; [`Error::Start`]
    /// (with the log's tail) when it does not come up.
    pub fn start(self) -> Result<RedisServer> {
        let bin = REDIS_SERVER.locate()?;
        let dir = process::temp_dir("redis")?;
        if self.tls {
            make_certificate(dir.path())?;
        }
        let mut last = None;
        // A port found free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = process::free_port(self.bus_port_offset)?;
            let mut args = self.args.clone();
            let tls_port = if self.tls {
                let tls_port = process::free_port(None)?;
                let file = |f: &str| dir.path().join(f).display().to_string();
                args.extend([
                    "--tls-port".into(),
                    tls_port.to_string(),
                    "--tls-cert-file".into(),
                    file("cert.pem"),
                    "--tls-key-file".into(),
                    file("key.pem"),
                    "--tls-ca-cert-file".into(),
                    file("ca.pem"),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]);
                Some(tls_port)
            } else {
                None
            };
            let mut server = RedisServer {
                bin: bin.clone(),
                dir: dir.path().to_path_buf(),
                args,
                port,
                tls_port,
                proc: Running::default(),
                _dir: None,
            };
            match server.spawn() {
                Ok(()) => {
                    server._dir = Some(dir);
                    return Ok(server);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Command {
            what: "redis-server".into(),
            reason: "no attempt made".into(),
        }))
    }
}

/// A `redis-server` on a free loopback port, killed on drop.
pub struct RedisServer {
    bin: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    port: u16,
    tls_port: Option<u16>,
    proc: Running,
    _dir: Option<tempfile::TempDir>,
}

/// A test CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by it
/// (`cert.pem`, `key.pem`) in `dir`, made with `openssl`.
fn make_certificate(dir: &std::path::Path) -> Result<()> {
    let openssl = process::OPENSSL.locate()?;
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )?;
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=flagcache-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ],
    ];
    for args in steps {
        let out = Command::new(&openssl)
            .args(args)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            return Err(Error::Start {
                what: "a TLS certificate".into(),
                reason: format!("openssl {} exited with {}", args[0], out.status),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    Ok(())
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("running", &self.proc.is_running())
            .field("dir", &self.dir)
            .finish()
    }
}

impl RedisServer {
    /// Starts a plain server with default settings.
    ///
    /// # Errors
    /// See [`RedisServerBuilder::start`].
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// Configures a server before starting it.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    fn spawn(&mut self) -> Result<()> {
        let port = self.port.to_string();
        let log = self.dir.join(format!("redis-{port}.log"));
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--protected-mode", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&self.dir)
        .args(&self.args)
        .current_dir(&self.dir);
        let mut proc = Proc::spawn(cmd, log)?;
        let what = format!("redis-server on port {port}");
        let password = self.password();
        proc.wait_ready(&what, self.addr(), |s| match &password {
            None => resp::pings(s),
            // With requirepass, an auth error still proves the server is up.
            Some(_) => resp::send(s, &["PING"]).is_ok(),
        })?;
        self.proc.set(proc);
        Ok(())
    }

    fn password(&self) -> Option<String> {
        self.args
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.args.get(i + 1).cloned())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `rediss://127.0.0.1:<tls port>`, for a server started with
    /// [`RedisServerBuilder::tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}"))
    }

    /// The PEM CA certificate a TLS client must trust, for a server started with
    /// [`RedisServerBuilder::tls`].
    pub fn tls_root_cert(&self) -> Option<Vec<u8>> {
        self.tls_port?;
        std::fs::read(self.dir.join("ca.pem")).ok()
    }

    /// `redis://127.0.0.1:<port>` (with the password, if one is required).
    pub fn url(&self) -> String {
        match self.password() {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The server's working directory (its log is there).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Whether the process is running (not stopped by [`RedisServer::stop`]).
    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// Sends one command and returns the reply as text (see the crate docs).
    ///
    /// # Errors
    /// [`Error::Command`] on a connection failure or an error reply.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        let mut full: Vec<&str> = Vec::new();
        let password = self.password();
        if let Some(p) = &password {
            // One connection per command: authenticate inline with HELLO-less AUTH.
            return self.command_authed(p, args);
        }
        full.extend_from_slice(args);
        resp::command(self.addr(), &full).map_err(|reason| Error::Command {
            what: format!("redis {:?} on port {}", args.first(), self.port),
            reason,
        })
    }

    fn command_authed(&self, password: &str, args: &[&str]) -> Result<String> {
        use std::io::BufReader;
        let fail = |reason: String| Error::Command {
            what: format!("redis {:?} on port {}", args.first(), self.port),
            reason,
        };
        let mut s = std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        resp::send(&mut s, &["AUTH", password])?;
        resp::send(&mut s, args)?;
        let mut r = BufReader::new(s);
        resp::read_reply(&mut r).map_err(fail)?;
        resp::read_reply(&mut r).map_err(fail)
    }

    /// Freezes the server (SIGSTOP): connections stay open and requests hang, as
    /// with a server that stopped answering, until [`RedisServer::resume`].
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn pause(&self) -> Result<()> {
        self.proc.pause()
    }

    /// Lets a paused server run again (SIGCONT).
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn resume(&self) -> Result<()> {
        self.proc.resume()
    }

    /// Kills the server (SIGKILL, like a crash). Its port stays reserved for
    /// [`RedisServer::restart`]; data is lost (no persistence).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts the server again on the same port, after [`RedisServer::stop`].
    ///
    /// # Errors
    /// As for [`RedisServerBuilder::start`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        process::wait_port_released(self.port);
        self.spawn()
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        process::log_tail(&self.dir.join(format!("redis-{}.log", self.port)))
    }
}

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
    /// Starts `masters` cluster-enabled nodes (at least 3), joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`.
    ///
    /// # Errors
    /// [`Error::BinaryMissing`] when `redis-server` or `redis-cli` is missing;
    /// [`Error::Start`] when the cluster does not form.
    pub fn start(masters: usize) -> Result<Self> {
        let masters = masters.max(3);
        let cli = REDIS_CLI.locate()?;
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let mut b = RedisServer::builder()
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
                what: format!("redis cluster on {addrs:?}"),
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
        Self::start_inner(None)
    }

    /// As [`RedisSentinel::start`], with `password` required by the primary and the
    /// replica (`requirepass`, `masterauth`) and known to the sentinel (`auth-pass`).
    ///
    /// # Errors
    /// As for [`RedisSentinel::start`].
    pub fn start_with_password(password: &str) -> Result<Self> {
        Self::start_inner(Some(password))
    }

    fn start_inner(password: Option<&str>) -> Result<Self> {
        let bin = REDIS_SERVER.locate()?;
        let auth: Vec<String> = match password {
            Some(p) => vec![
                "--requirepass".into(),
                p.into(),
                "--masterauth".into(),
                p.into(),
            ],
            None => Vec::new(),
        };
        let primary = RedisServer::builder().args(auth.clone()).start()?;
        let replica = RedisServer::builder()
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
            match proc.wait_ready(&format!("redis sentinel on port {port}"), addr, resp::pings) {
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
