//! Shared process plumbing: binaries, free ports, spawning and readiness, logs, and
//! the signals a test sends a running server.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::runs::Record;
use crate::{Error, Result};

/// How long a server may take to answer after spawning.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) struct Binary {
    pub name: &'static str,
    pub env: &'static str,
    pub install: &'static str,
    /// Where a fetch script leaves it, under the cargo target directory.
    pub fetched: Option<&'static str>,
}

pub(crate) const REDIS_SERVER: Binary = Binary {
    name: "redis-server",
    env: "FLAGCACHE_REDIS_SERVER",
    install: "apt-get install redis-server",
    fetched: None,
};
pub(crate) const VALKEY_SERVER: Binary = Binary {
    name: "valkey-server",
    env: "FLAGCACHE_VALKEY_SERVER",
    install: "scripts/fetch-valkey",
    fetched: Some("valkey/valkey-server"),
};
pub(crate) const REDIS_CLI: Binary = Binary {
    name: "redis-cli",
    env: "FLAGCACHE_REDIS_CLI",
    install: "apt-get install redis-tools",
    fetched: None,
};
pub(crate) const OPENSSL: Binary = Binary {
    name: "openssl",
    env: "FLAGCACHE_OPENSSL",
    install: "apt-get install openssl",
    fetched: None,
};
pub(crate) const MEMCACHED: Binary = Binary {
    name: "memcached",
    env: "FLAGCACHE_MEMCACHED",
    install: "apt-get install memcached",
    fetched: None,
};

impl Binary {
    /// The binary's path: `$ENV` if set, else the first match on `PATH`, else (for a
    /// fetched binary) where the fetch script leaves it in the cargo target directory.
    pub fn locate(&self) -> Result<PathBuf> {
        let missing = || Error::BinaryMissing {
            binary: self.name,
            env: self.env,
            install: self.install,
        };
        if let Some(p) = std::env::var_os(self.env) {
            let p = PathBuf::from(p);
            return if p.is_file() { Ok(p) } else { Err(missing()) };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let fetched = self
            .fetched
            .into_iter()
            .flat_map(|rel| target_dirs().into_iter().map(move |dir| dir.join(rel)));
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|dir| dir.join(self.name))
            .chain(fetched)
            .find(|p| p.is_file())
            .ok_or_else(missing)
    }
}

/// The cargo target directories a fetched binary may be in: `$CARGO_TARGET_DIR`, and
/// the workspace's own `target/`.
fn target_dirs() -> Vec<PathBuf> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace.join(d)
            }
        })
        .into_iter()
        .chain([workspace.join("target")])
        .collect()
}

/// A loopback port that was free a moment ago (and, with `also_plus`, so was
/// `port + also_plus`, for Redis Cluster's bus port).
pub(crate) fn free_port(also_plus: Option<u16>) -> Result<u16> {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        match also_plus {
            None => return Ok(port),
            Some(d) => {
                let Some(bus) = port.checked_add(d) else {
                    continue;
                };
                if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
                    return Ok(port);
                }
            }
        }
    }
    Err(Error::Io(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free loopback port pair found",
    )))
}

/// A spawned server process with its log file, recorded in this process's run
/// directory until it is killed.
pub(crate) struct Proc {
    pub child: Child,
    pub log: PathBuf,
    record: Option<Record>,
}

impl Proc {
    /// Sends `sig` (`-STOP`, `-CONT`, …) to the process.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("kill {sig} failed: {status}")).into())
        }
    }

    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()?;
        let record = Record::new(child.id(), cmd.get_current_dir());
        Ok(Proc { child, log, record })
    }

    /// Waits until `probe` succeeds against `addr`, failing early if the process exits.
    pub fn wait_ready(
        &mut self,
        what: &str,
        addr: SocketAddr,
        probe: impl Fn(&mut TcpStream) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.start_error(what, format!("exited with {status}")));
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                if probe(&mut s) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(self.start_error(what, format!("no answer within {READY_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_error(&self, what: &str, reason: String) -> Error {
        Error::Start {
            what: what.to_string(),
            reason,
            log: log_tail(&self.log),
        }
    }

    /// Kills the process (SIGKILL: a crash, as a fault test wants), reaps it, and
    /// removes its record.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.record = None;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server's process while it runs, and the signals a test sends it: pause and resume
/// (SIGSTOP, SIGCONT) and stop (SIGKILL). Empty when stopped.
#[derive(Default)]
pub(crate) struct Running(Option<Proc>);

impl Running {
    /// Takes `proc` as the running process.
    pub fn set(&mut self, proc: Proc) {
        self.0 = Some(proc);
    }

    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(|p| p.child.id())
    }

    /// Freezes the process (SIGSTOP).
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> Result<()> {
        match &self.0 {
            Some(p) => p.signal(sig),
            None => Err(std::io::Error::other("the server is not running").into()),
        }
    }

    /// Kills the process (SIGKILL, like a crash) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.0.take() {
            p.kill();
        }
    }
}

pub(crate) fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

pub(crate) fn temp_dir(kind: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("flagcache-testkit-{kind}-"))
        .tempdir()?)
}

/// Waits until nothing listens on `port` any more (after a kill), so a restart can bind it.
pub(crate) fn wait_port_released(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The process controls every test server has — `is_running`, `pid`, `pause`, `resume`,
/// `stop` (SIGKILL, like a crash) and `restart` (on the same port) — on a server type with
/// a `proc: Running`, a `port` and a `spawn()`, documented once here.
macro_rules! controls {
    ($server:ident, $builder:ident) => {
        impl $server {
            /// Whether the process is running (not stopped by `stop`).
            pub fn is_running(&self) -> bool {
                self.proc.is_running()
            }

            /// The server process's id, while it runs.
            pub fn pid(&self) -> Option<u32> {
                self.proc.pid()
            }

            /// Freezes the server (SIGSTOP): connections stay open and requests hang, as
            /// with a server that stopped answering, until `resume`.
            ///
            /// # Errors
            /// When the signal cannot be sent.
            pub fn pause(&self) -> $crate::Result<()> {
                self.proc.pause()
            }

            /// Lets a paused server run again (SIGCONT).
            ///
            /// # Errors
            /// When the signal cannot be sent.
            pub fn resume(&self) -> $crate::Result<()> {
                self.proc.resume()
            }

            /// Kills the server (SIGKILL, like a crash): its data is lost, its port stays
            /// reserved for `restart`.
            pub fn stop(&mut self) {
                self.proc.stop();
            }

            /// Starts the server again on the same port, after `stop`.
            ///
            /// # Errors
            #[doc = concat!("As for [`", stringify!($builder), "::start`].")]
            pub fn restart(&mut self) -> $crate::Result<()> {
                self.stop();
                $crate::process::wait_port_released(self.port);
                self.spawn()
            }
        }
    };
}
pub(crate) use controls;
