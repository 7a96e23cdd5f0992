//! Run records, so that orphaned test servers can be stopped by PID and nothing else.
//!
//! Each process that starts servers gets a run directory under
//! `$TMPDIR/flagcache-testkit-runs-<uid>` (or `$FLAGCACHE_TESTKIT_RUNS`). Its `owner`
//! file records that process, and one `server-<pid>` file per server records the
//! server's PID, its start time and its working directory; the file goes when the
//! testkit stops the server. A process killed before it could stop its servers leaves
//! them running, recorded under a dead owner: [`reap_orphans`] stops exactly those.
//!
//! A process is identified by its PID and its start time, so a PID the system has
//! since given to another process is never taken for the one recorded.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a run directory may lack its `owner` file (it is being created) before it
/// counts as abandoned.
const UNOWNED_GRACE: Duration = Duration::from_secs(600);

/// A live process: its PID and the start time the system reports for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    pid: u32,
    start: String,
}

impl Identity {
    /// The process `pid`, when it exists and has not exited (a zombie has).
    fn of(pid: u32) -> Option<Self> {
        let start = if Path::new("/proc/self/stat").exists() {
            start_from_proc(pid)?
        } else {
            start_from_ps(pid)?
        };
        Some(Identity { pid, start })
    }

    /// Whether this very process still runs.
    fn is_alive(&self) -> bool {
        Identity::of(self.pid).as_ref() == Some(self)
    }

    /// The first two lines of a record file.
    fn to_lines(&self) -> String {
        format!("{}\n{}\n", self.pid, self.start)
    }

    /// The identity on the first two lines of `text`, and the rest.
    fn from_lines(text: &str) -> Option<(Self, Vec<&str>)> {
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let start = lines.next()?.to_string();
        Some((Identity { pid, start }, lines.collect()))
    }
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot), unless the
/// process is a zombie.
fn start_from_proc(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None;
    }
    fields.get(19).map(|s| s.to_string())
}

/// `ps -o stat=,lstart=` where there is no `/proc`, unless the process is a zombie.
fn start_from_ps(pid: u32) -> Option<String> {
    let out = Command::new("ps")
        .args(["-o", "stat=,lstart=", "-p", &pid.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (state, start) = text.trim().split_once(char::is_whitespace)?;
    if !out.status.success() || state.starts_with('Z') {
        return None;
    }
    Some(start.trim().to_string())
}

/// Where run directories live.
fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLAGCACHE_TESTKIT_RUNS") {
        return PathBuf::from(dir);
    }
    std::env::temp_dir().join(format!("flagcache-testkit-runs-{}", user()))
}

/// The real user id (from `/proc`), else `$USER`: each user has a root of their own.
fn user() -> String {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "shared".into())
}

/// This process's run directory, made (after reaping the orphans of dead runs) when
/// its first server starts. `None` when it cannot be made: servers then go unrecorded
/// and are still stopped on drop.
fn run_dir() -> Option<&'static Path> {
    static RUN: OnceLock<Option<PathBuf>> = OnceLock::new();
    RUN.get_or_init(|| {
        reap_orphans();
        make_run_dir()
    })
    .as_deref()
}

fn make_run_dir() -> Option<PathBuf> {
    let me = Identity::of(std::process::id())?;
    let root = root();
    fs::create_dir_all(&root).ok()?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = root.join(format!("run-{}-{nanos}", me.pid));
    fs::create_dir(&dir).ok()?;
    write_whole(&dir.join("owner"), &me.to_lines()).ok()?;
    Some(dir)
}

/// Writes `text` to `path` so that a reader sees all of it or no file.
fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

/// A server recorded in this process's run directory; dropping it (once the server is
/// stopped) removes the record.
#[derive(Debug)]
pub(crate) struct Record(PathBuf);

impl Record {
    /// Records the server process `pid`, which works in `dir`.
    pub fn new(pid: u32, dir: Option<&Path>) -> Option<Self> {
        let run = run_dir()?;
        let id = Identity::of(pid)?;
        let path = run.join(format!("server-{pid}"));
        let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
        write_whole(&path, &format!("{}{dir}\n", id.to_lines())).ok()?;
        Some(Record(path))
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Stops the servers that runs whose process has died left running, and removes those
/// runs' records and the servers' working directories. A server is stopped only when
/// its recorded PID is still that server (same start time); nothing of a live run is
/// touched. Returns the PIDs it stopped.
///
/// Every process runs this once, when it starts its first server;
/// `cargo run -p flagcache-testkit --bin flagcache-testkit-reap` runs it on its own.
pub fn reap_orphans() -> Vec<u32> {
    let Ok(runs) = fs::read_dir(root()) else {
        return Vec::new();
    };
    let mut orphans: Vec<(Identity, Option<PathBuf>)> = Vec::new();
    let mut dead_runs = Vec::new();
    for run in runs.flatten() {
        let path = run.path();
        if !run.file_name().to_string_lossy().starts_with("run-") {
            continue;
        }
        let owner = fs::read_to_string(path.join("owner")).ok();
        let owner = owner.as_deref().and_then(Identity::from_lines);
        match owner {
            Some((owner, _)) if owner.is_alive() => continue,
            Some(_) => {}
            None if unowned_too_long(&path) => {}
            None => continue,
        }
        for server in fs::read_dir(&path).into_iter().flatten().flatten() {
            if !server.file_name().to_string_lossy().starts_with("server-") {
                continue;
            }
            if let Some((id, rest)) = fs::read_to_string(server.path())
                .ok()
                .as_deref()
                .and_then(Identity::from_lines)
            {
                let dir = rest.first().filter(|d| !d.is_empty()).map(PathBuf::from);
                orphans.push((id, dir));
            }
        }
        dead_runs.push(path);
    }
    let mut stopped = Vec::new();
    for (id, _) in &orphans {
        if id.is_alive() && kill(id.pid) {
            stopped.push(id.clone());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while stopped.iter().any(Identity::is_alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for dir in orphans.iter().filter_map(|(_, dir)| dir.as_ref()) {
        remove_server_dir(dir);
    }
    for run in dead_runs {
        let _ = fs::remove_dir_all(run);
    }
    stopped.into_iter().map(|id| id.pid).collect()
}

/// A run directory with no `owner` file, older than [`UNOWNED_GRACE`]: its process
/// died while making it.
fn unowned_too_long(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > UNOWNED_GRACE)
}

/// SIGKILL to `pid`; whether it was sent.
fn kill(pid: u32) -> bool {
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Removes a server's working directory: one the testkit made (`flagcache-testkit-*`).
fn remove_server_dir(dir: &Path) {
    let ours = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("flagcache-testkit-"));
    if ours {
        let _ = fs::remove_dir_all(dir);
    }
}
