//! The `flagcache` command: its arguments, connecting to the backend the URL names, and
//! the exit code each outcome gets.

mod doctor;
mod inspect;
mod report;
mod verify;
mod watch;
mod write;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use report::{Failure, Report};

/// Operate a flagcache deployment: look at what L2 holds, write and invalidate flags,
/// watch the invalidation channel, and verify that every replica applied a version.
///
/// Exit codes: 0 ok; 1 a finding (a key absent or unreadable, a write superseded, a
/// resync seen while watching, a replica that did not apply a version in time, a
/// problem the doctor found); 2 a usage or connection error.
#[derive(Debug, Parser)]
#[command(
    name = "flagcache",
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 ok; 1 a finding (a key absent or unreadable, a write \
                  superseded, a resync seen while watching, a replica that did not apply \
                  a version in time, a problem the doctor found); 2 a usage or \
                  connection error."
)]
struct Cli {
    /// The backend URL (see the help text).
    #[arg(
        long,
        env = "FLAGCACHE_URL",
        global = true,
        hide_env_values = true,
        help = "The backend: memory://, redis://[user:password@]host[:port][/db], rediss://…, \
                redis+sentinel://h1:26379,h2:26379/<service>[/db], \
                redis+cluster://h1:7000,h2:7001 or memcached://h1:11211,h2:11211, with \
                settings such as ?namespace=…&layout=json"
    )]
    url: Option<String>,

    /// Print one JSON document on stdout instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What L2 holds for each key: layout, version, age, TTL left, size, compression,
    /// chunks, checksum. Exit 1 when a key is absent or unreadable.
    Inspect {
        /// The flag keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// A version-guarded write, then an invalidation to the fleet. Prints Stored, or
    /// Superseded with the version L2 holds (exit 1).
    Set {
        /// The flag key.
        key: String,
        /// The value's version (from the source of truth).
        #[arg(long)]
        version: u64,
        /// The value, as JSON.
        #[arg(
            long,
            conflicts_with = "value_file",
            required_unless_present = "value_file"
        )]
        value: Option<String>,
        /// A file holding the value, as JSON.
        #[arg(long)]
        value_file: Option<std::path::PathBuf>,
    },
    /// Drops keys from L2 and from every replica's L1; with --all, drops every
    /// replica's L1 (L2 keeps its versioned entries).
    Invalidate {
        /// The flag keys.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        keys: Vec<String>,
        /// Every key of every replica's L1.
        #[arg(long)]
        all: bool,
    },
    /// Asks the fleet to reload keys from the source while serving the current value.
    Refresh {
        /// The flag keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Tails the invalidation channel (Redis pub/sub) or log (memcached): each event
    /// with its origin node, sequence and lag; resyncs (gaps, reconnects) flagged.
    /// Exit 1 when a resync was seen.
    Watch {
        /// Stop after this long (`30s`, `500ms`, `2m`); without it, stop on Ctrl-C.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Waits until every live replica (from the presence caches report with
    /// `report_to_fleet`) has applied VERSION or newer of KEY; prints each replica's
    /// lag. Exit 1 with the stragglers when the budget passes, or when no replica
    /// reports its presence.
    Verify {
        /// The flag key.
        key: String,
        /// The version every replica must serve (or a newer one).
        #[arg(long)]
        version: u64,
        /// How long to wait (`5s`, `500ms`, `1m`).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        within: Duration,
    },
    /// Samples the server twice, INTERVAL apart (Redis INFO and the subscribers of the
    /// invalidation channel; memcached stats on every server), listening to the
    /// invalidation channel in between, and tells apart a stampede, CAS contention,
    /// evictions or memory pressure, a broken backplane (fewer subscribers than live
    /// replicas, resyncs) and a flushed script cache, each with the figures that prove
    /// it and an action. Exit 1 with findings, 0 when healthy.
    Doctor {
        /// Time between the two samples (`5s`, `500ms`, `1m`).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        interval: Duration,
    },
}

/// `250ms`, `5s`, `2m`: a whole number and a unit.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(at);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 500ms, 5s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{text:?}: the units are ms, s and m")),
    }
}

async fn run(cli: Cli) -> Result<Report, Failure> {
    let url = cli.url.ok_or_else(|| {
        Failure::usage("no backend: pass --url or set FLAGCACHE_URL (e.g. redis://127.0.0.1:6379)")
    })?;
    let json = cli.json;
    let backend = flagcache::connect(&url).await.map_err(Failure::connect)?;
    match cli.command {
        Command::Inspect { keys } => inspect::run(&backend, &keys).await,
        Command::Set {
            key,
            version,
            value,
            value_file,
        } => {
            let text = match (value, value_file) {
                (Some(v), _) => v,
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .map_err(|e| Failure::usage(format!("--value-file {}: {e}", path.display())))?,
                (None, None) => return Err(Failure::usage("--value or --value-file is required")),
            };
            write::set(&backend, &key, version, &text).await
        }
        Command::Invalidate { keys, all } => write::invalidate(&backend, &keys, all).await,
        Command::Refresh { keys } => write::refresh(&backend, &keys).await,
        Command::Watch { duration } => watch::run(&backend, duration, json).await,
        Command::Verify {
            key,
            version,
            within,
        } => verify::run(&backend, &key, version, within, json).await,
        Command::Doctor { interval } => doctor::run(&backend, interval).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Failure::usage(format!("cannot start the runtime: {e}")).print(json),
    };
    match runtime.block_on(run(cli)) {
        Ok(report) => report.print(json),
        Err(failure) => failure.print(json),
    }
}
