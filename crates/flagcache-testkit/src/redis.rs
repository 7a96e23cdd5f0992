//! `redis-server` (or `valkey-server`) on a free loopback port: [`RedisServer`] and
//! its builder; a cluster and a sentinel setup made of such servers live in the
//! submodules.

mod cluster;
mod sentinel;
mod tls;

pub use cluster::RedisCluster;
pub use sentinel::RedisSentinel;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Proc, Running};
use crate::{resp, Error, Flavor, Result};

/// Extra `redis-server` settings, as `--name value` pairs.
#[derive(Debug, Clone, Default)]
pub struct RedisServerBuilder {
    flavor: Flavor,
    args: Vec<String>,
    bus_port_offset: Option<u16>,
    tls: bool,
}

impl RedisServerBuilder {
    /// Which server binary runs (default [`Flavor::Redis`]).
    #[must_use]
    pub fn flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

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
    /// [`Error::BinaryMissing`] when the flavor's server binary is not installed;
    /// [`Error::Start`] (with the log's tail) when it does not come up.
    pub fn start(self) -> Result<RedisServer> {
        let bin = self.flavor.locate()?;
        let dir = process::temp_dir("redis")?;
        if self.tls {
            tls::make_certificate(dir.path())?;
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
                flavor: self.flavor,
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
            what: format!("{}-server", self.flavor),
            reason: "no attempt made".into(),
        }))
    }
}

/// A `redis-server` (or `valkey-server`) on a free loopback port, killed on drop.
pub struct RedisServer {
    flavor: Flavor,
    bin: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    port: u16,
    tls_port: Option<u16>,
    proc: Running,
    _dir: Option<tempfile::TempDir>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("flavor", &self.flavor)
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

    /// Starts a plain server of `flavor` with default settings.
    ///
    /// # Errors
    /// See [`RedisServerBuilder::start`].
    pub fn start_with(flavor: Flavor) -> Result<Self> {
        Self::builder().flavor(flavor).start()
    }

    /// Configures a server before starting it.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// Which server binary it runs.
    pub fn flavor(&self) -> Flavor {
        self.flavor
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
        let what = format!("{}-server on port {port}", self.flavor);
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
            what: format!("{} {:?} on port {}", self.flavor, args.first(), self.port),
            reason,
        })
    }

    fn command_authed(&self, password: &str, args: &[&str]) -> Result<String> {
        use std::io::BufReader;
        let fail = |reason: String| Error::Command {
            what: format!("{} {:?} on port {}", self.flavor, args.first(), self.port),
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

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        process::log_tail(&self.dir.join(format!("redis-{}.log", self.port)))
    }
}

process::controls!(RedisServer, RedisServerBuilder);
