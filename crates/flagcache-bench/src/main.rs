//! `flagcache-bench`: the load generator. Starts its own servers on loopback (or takes
//! URLs), runs every scenario beside its baseline in the same run, prints one table,
//! and writes `bench.json` (every figure) and `latency.svg` (latency by percentile).
//!
//! ```text
//! cargo run --release -p flagcache-bench -- [--quick] [--only NAME,…] [--out DIR]
//!     [--benchmarks BENCHMARKS.md] [--redis URL] [--memcached URL]
//! ```
//!
//! Scenarios: `l1`, `l2-redis`, `l2-memcached`, `storm`, `rollout`, `propagation`,
//! `foreign-writer`, `down`, `kill-switch`, `idle-fleet`. `--quick` runs each with tiny counts (a smoke run: figures
//! mean nothing, but every path runs and the correctness targets must hold). The exit status is
//! non-zero when a scenario fails or a correctness target is missed. `--benchmarks
//! FILE` rewrites the block between the bench markers in FILE with this run's tables.
//!
//! The runtime has one worker per core; `BENCH_WORKERS=N` overrides it.

mod report;
mod scenarios;
mod source;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use report::Report;
use scenarios::{Plan, Res, Section, Servers};

const ALL: [&str; 10] = [
    "l1",
    "l2-redis",
    "l2-memcached",
    "storm",
    "rollout",
    "propagation",
    "foreign-writer",
    "down",
    "kill-switch",
    "idle-fleet",
];

#[derive(Debug)]
struct Args {
    quick: bool,
    only: Vec<String>,
    out: PathBuf,
    benchmarks: Option<PathBuf>,
    redis: Option<String>,
    memcached: Option<String>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Res<Args> {
    let mut args = Args {
        quick: false,
        only: ALL.iter().map(|s| s.to_string()).collect(),
        out: PathBuf::from("target/bench"),
        benchmarks: None,
        redis: None,
        memcached: None,
    };
    while let Some(a) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => args.quick = true,
            "--only" => {
                args.only = value()?.split(',').map(str::to_string).collect();
                if let Some(bad) = args.only.iter().find(|s| !ALL.contains(&s.as_str())) {
                    return Err(format!("unknown scenario {bad:?}; known: {}", ALL.join(", ")));
                }
            }
            "--out" => args.out = PathBuf::from(value()?),
            "--benchmarks" => args.benchmarks = Some(PathBuf::from(value()?)),
            "--redis" => args.redis = Some(value()?),
            "--memcached" => args.memcached = Some(value()?),
            "-h" | "--help" => {
                return Err(format!(
                    "usage: flagcache-bench [--quick] [--only {}] [--out DIR] [--benchmarks FILE] [--redis URL] [--memcached URL]",
                    ALL.join(",")
                ))
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

async fn run(args: &Args) -> Res<Report> {
    let plan = Plan { quick: args.quick };
    let mut servers = Servers::new(args.redis.clone(), args.memcached.clone());
    let mut report = Report {
        quick: args.quick,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ..Report::default()
    };
    for name in ALL.iter().filter(|n| args.only.iter().any(|o| o == *n)) {
        eprintln!("running {name}…");
        let section: Section = match *name {
            "l1" => scenarios::l1_hit(plan).await,
            "l2-redis" => scenarios::l2_hit_redis(&mut servers, plan).await,
            "l2-memcached" => scenarios::l2_hit_memcached(&mut servers, plan).await,
            "storm" => scenarios::cold_storm(&mut servers, plan).await,
            "rollout" => scenarios::rollout_storm(&mut servers, plan).await,
            "propagation" => scenarios::propagation_both(&mut servers, plan).await,
            "foreign-writer" => scenarios::foreign_writer(&mut servers, plan).await,
            "down" => scenarios::cache_down(plan).await,
            "idle-fleet" => scenarios::idle_fleet(&mut servers, plan).await,
            _ => scenarios::kill_switch(plan).await,
        }
        .map_err(|e| format!("scenario {name}: {e}"))?;
        report.rows.extend(section.rows);
        report.checks.extend(section.checks);
    }
    Ok(report)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(&args)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}\n{}", report.table(), report.targets());
    let written = std::fs::create_dir_all(&args.out)
        .map_err(|e| e.to_string())
        .and_then(|()| report.write_json(&args.out.join("bench.json")))
        .and_then(|()| report.write_svg(&args.out.join("latency.svg")))
        .and_then(|()| match &args.benchmarks {
            Some(file) => report.update_block(file, "scripts/bench"),
            None => Ok(()),
        });
    if let Err(e) = written {
        eprintln!("cannot write the report: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "wrote {} and {}",
        args.out.join("bench.json").display(),
        args.out.join("latency.svg").display()
    );
    let missed: Vec<_> = report
        .checks
        .iter()
        .filter(|c| c.correctness && !c.met)
        .collect();
    if !missed.is_empty() {
        for c in missed {
            eprintln!("correctness target missed: {} = {}", c.target, c.measured);
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
