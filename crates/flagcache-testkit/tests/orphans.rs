//! Orphaned servers: a server whose test process was killed before it could stop it is
//! stopped by the next reap — exactly that server, never one of a live process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flagcache_testkit::MemcachedServer;

/// Set for the child process: the file it reports its server's PID and port to.
const REPORT_TO: &str = "FLAGCACHE_TESTKIT_ORPHAN_REPORT";

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether the server on `port` stops listening within 5 s: a SIGKILL is delivered at
/// once, but the process closes its sockets as it exits, a moment later.
fn stops_listening(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening(port) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The child process: starts a memcached, reports its PID and port, and waits to be
/// killed. It runs only when started by the test below.
#[test]
#[ignore = "the child process of a_killed_runs_server_is_stopped_and_a_live_runs_is_not"]
fn child_starts_a_server_and_waits() {
    let Some(report) = std::env::var_os(REPORT_TO) else {
        return;
    };
    let server = MemcachedServer::start().unwrap();
    let line = format!("{} {}\n", server.pid().unwrap(), server.port());
    let tmp = PathBuf::from(&report).with_extension("tmp");
    std::fs::write(&tmp, line).unwrap();
    std::fs::rename(&tmp, &report).unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

/// A child process running [`child_starts_a_server_and_waits`], killed on drop.
struct Child {
    process: std::process::Child,
    server_pid: u32,
    server_port: u16,
}

impl Child {
    fn start(dir: &Path, name: &str) -> Self {
        let report = dir.join(name);
        let process = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_starts_a_server_and_waits", "--ignored"])
            .env(REPORT_TO, &report)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&report) {
                break text;
            }
            assert!(Instant::now() < deadline, "the child never reported");
            std::thread::sleep(Duration::from_millis(20));
        };
        let (pid, port) = text.trim().split_once(' ').unwrap();
        Child {
            process,
            server_pid: pid.parse().unwrap(),
            server_port: port.parse().unwrap(),
        }
    }

    /// SIGKILL: the child's testkit never gets to stop its server.
    fn kill(&mut self) {
        self.process.kill().unwrap();
        self.process.wait().unwrap();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[test]
fn a_killed_runs_server_is_stopped_and_a_live_runs_is_not() {
    let mine = MemcachedServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut killed = Child::start(dir.path(), "killed");
    let mut alive = Child::start(dir.path(), "alive");
    assert!(listening(killed.server_port) && listening(alive.server_port));

    killed.kill();
    let stopped = flagcache_testkit::reap_orphans();
    // Another process's start may have reaped the orphan first: what counts is that it
    // is gone, and that nothing of a live run was touched.
    assert!(
        stops_listening(killed.server_port),
        "the killed run's server still runs"
    );
    assert!(!stopped.contains(&alive.server_pid), "{stopped:?}");
    assert!(!stopped.contains(&mine.pid().unwrap()), "{stopped:?}");
    assert!(
        listening(alive.server_port),
        "a live run's server was stopped"
    );
    assert_eq!(
        mine.request("version\r\n").unwrap().split(' ').next(),
        Some("VERSION")
    );

    // Once its process is killed too, the other child's server goes the same way.
    alive.kill();
    flagcache_testkit::reap_orphans();
    assert!(
        stops_listening(alive.server_port),
        "the second orphan still runs"
    );
    assert!(listening(mine.port()));
}
