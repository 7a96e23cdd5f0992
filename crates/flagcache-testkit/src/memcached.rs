//! `memcached` on a free loopback port: [`MemcachedServer`] and its builder.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Proc, Running, MEMCACHED};
use crate::{Error, Result};

/// Extra `memcached` settings.
#[derive(Debug, Clone, Default)]
pub struct MemcachedServerBuilder {
    args: Vec<String>,
}

impl MemcachedServerBuilder {
    /// Adds raw arguments to the command line (e.g. `["-I", "2m"]`).
    #[must_use]
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets the item size limit (`-I`), e.g. `"1m"` (the default) or `"512k"`.
    #[must_use]
    pub fn item_size_limit(self, limit: &str) -> Self {
        self.args(["-I", limit])
    }

    /// Starts the server.
    ///
    /// # Errors
    /// [`Error::BinaryMissing`] when `memcached` is not installed; [`Error::Start`] (with
    /// the log's tail) when it does not come up.
    pub fn start(self) -> Result<MemcachedServer> {
        let bin = MEMCACHED.locate()?;
        let dir = process::temp_dir("memcached")?;
        let mut last = None;
        for _ in 0..5 {
            let mut server = MemcachedServer {
                bin: bin.clone(),
                dir: dir.path().to_path_buf(),
                args: self.args.clone(),
                port: process::free_port(None)?,
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
            what: "memcached".into(),
            reason: "no attempt made".into(),
        }))
    }
}

/// A `memcached` on a free loopback port, killed on drop.
pub struct MemcachedServer {
    bin: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    port: u16,
    proc: Running,
    _dir: Option<tempfile::TempDir>,
}

impl fmt::Debug for MemcachedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemcachedServer")
            .field("port", &self.port)
            .field("running", &self.proc.is_running())
            .finish()
    }
}

impl MemcachedServer {
    /// Starts a server with default settings (64 MiB, 1 MiB item limit, 2 threads).
    ///
    /// # Errors
    /// See [`MemcachedServerBuilder::start`].
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// Configures a server before starting it.
    pub fn builder() -> MemcachedServerBuilder {
        MemcachedServerBuilder::default()
    }

    fn spawn(&mut self) -> Result<()> {
        let port = self.port.to_string();
        let log = self.dir.join(format!("memcached-{port}.log"));
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "0",
            "-m",
            "64",
            "-t",
            "2",
            "-c",
            "1024",
        ]);
        if process::is_root() {
            // memcached refuses to run as root unless told which user to be.
            cmd.args(["-u", "root"]);
        }
        cmd.args(&self.args).current_dir(&self.dir);
        let mut proc = Proc::spawn(cmd, log)?;
        proc.wait_ready(&format!("memcached on port {port}"), self.addr(), |s| {
            s.write_all(b"version\r\n").is_ok() && {
                let mut line = String::new();
                s.try_clone()
                    .map(|c| BufReader::new(c).read_line(&mut line).is_ok())
                    .unwrap_or(false)
                    && line.starts_with("VERSION ")
            }
        })?;
        self.proc.set(proc);
        Ok(())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `tcp://127.0.0.1:<port>`, the form `async-memcached` connects to.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Sends one request line (and, for a set, its data block: pass the whole request)
    /// and returns the response: one line, or for `VA <n>` the line and the value, or
    /// for classic `get` everything up to `END`. Line endings are stripped from the end.
    ///
    /// # Errors
    /// [`Error::Command`] on a connection failure or a truncated response.
    pub fn request(&self, raw: &str) -> Result<String> {
        let fail = |reason: String| Error::Command {
            what: format!("memcached {:?} on port {}", raw.lines().next(), self.port),
            reason,
        };
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(raw.as_bytes())?;
        let mut r = BufReader::new(s);
        let mut out = String::new();
        r.read_line(&mut out)?;
        if out.is_empty() {
            return Err(fail("connection closed".into()));
        }
        if let Some(rest) = out.strip_prefix("VA ") {
            let n: usize = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| fail(format!("bad VA line {out:?}")))?;
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            out.push_str(&String::from_utf8_lossy(&buf));
        } else if out.starts_with("VALUE ") {
            while !out.ends_with("END\r\n") {
                if r.read_line(&mut out)? == 0 {
                    return Err(fail("truncated response".into()));
                }
            }
        }
        Ok(out.trim_end_matches(['\r', '\n']).to_string())
    }
}

process::controls!(MemcachedServer, MemcachedServerBuilder);
