//! The results of a run: rows (one per scenario and contender), target checks, and
//! their renderings — a table, JSON, an SVG chart and the block in `BENCHMARKS.md`.

mod chart;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::stats::Summary;

/// One contender in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub contender: String,
    /// Operations per second, for throughput scenarios.
    pub ops_per_sec: Option<f64>,
    pub latency: Summary,
    /// Scenario-specific counts (loader calls, stale reads, timeouts…).
    pub counts: BTreeMap<String, f64>,
}

impl Row {
    pub fn new(scenario: &str, contender: &str, latency: Summary) -> Self {
        Row {
            scenario: scenario.to_string(),
            contender: contender.to_string(),
            ops_per_sec: None,
            latency,
            counts: BTreeMap::new(),
        }
    }

    pub fn ops(mut self, per_sec: f64) -> Self {
        self.ops_per_sec = Some(per_sec);
        self
    }

    pub fn count(mut self, name: &str, value: f64) -> Self {
        self.counts.insert(name.to_string(), value);
        self
    }
}

/// A target of the benchmark suite and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub target: String,
    pub measured: f64,
    /// `measured` must be at most this (`at_least: false`) or at least this.
    pub bound: f64,
    pub at_least: bool,
    pub unit: String,
    pub met: bool,
    /// Whether the target is about correctness (a count), not speed: correctness
    /// targets must hold even in a smoke run.
    pub correctness: bool,
}

impl Check {
    pub fn at_most(target: &str, measured: f64, bound: f64, unit: &str) -> Self {
        Check {
            target: target.to_string(),
            measured,
            bound,
            at_least: false,
            unit: unit.to_string(),
            met: measured <= bound,
            correctness: false,
        }
    }

    pub fn at_least(target: &str, measured: f64, bound: f64, unit: &str) -> Self {
        Check {
            met: measured >= bound,
            at_least: true,
            ..Check::at_most(target, measured, bound, unit)
        }
    }

    pub fn correctness(mut self) -> Self {
        self.correctness = true;
        self
    }
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub quick: bool,
    pub cores: usize,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
}

fn fmt_us(us: f64) -> String {
    if us >= 1_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else if us >= 1.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.0} ns", us * 1_000.0)
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// The results table, in Markdown.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| scenario | contender | ops/s | p50 | p99 | max | counts |\n|---|---|---:|---:|---:|---:|---|\n",
        );
        for r in &self.rows {
            // A row without samples is one the run could not measure: no figures.
            let latency = |us: f64| {
                if r.latency.count == 0 {
                    "—".to_string()
                } else {
                    fmt_us(us)
                }
            };
            let counts: Vec<String> = r
                .counts
                .iter()
                .map(|(k, v)| format!("{k} {}", fmt_num(*v)))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.contender,
                r.ops_per_sec.map_or("".into(), |o| format!("{o:.0}")),
                latency(r.latency.p50_us),
                latency(r.latency.p99_us),
                latency(r.latency.max_us),
                counts.join(", ")
            );
        }
        out
    }

    /// The targets table, in Markdown.
    pub fn targets(&self) -> String {
        let mut out = String::from("| target | measured | bound | met |\n|---|---:|---:|:---:|\n");
        for c in &self.checks {
            let _ = writeln!(
                out,
                "| {} | {} {} | {} {} {} | {} |",
                c.target,
                fmt_num(c.measured),
                c.unit,
                if c.at_least { "≥" } else { "≤" },
                fmt_num(c.bound),
                c.unit,
                if c.met { "yes" } else { "**no**" }
            );
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The latency chart (see [`chart`]): one panel per scenario, latency against the
    /// percentile, ours and the baseline in the same two colours on every panel.
    pub fn write_svg(&self, path: &Path) -> Result<(), String> {
        std::fs::write(path, chart::svg(self)).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces the block between `<!-- bench:start -->` and `<!-- bench:end -->` in
    /// `file` (`BENCHMARKS.md`) with this run's tables.
    pub fn update_block(&self, file: &Path, command: &str) -> Result<(), String> {
        const START: &str = "<!-- bench:start -->";
        const END: &str = "<!-- bench:end -->";
        let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
        let (Some(a), Some(b)) = (text.find(START), text.find(END)) else {
            return Err(format!("{} has no {START} … {END} block", file.display()));
        };
        if b < a {
            return Err(format!("{END} comes before {START}"));
        }
        let block = format!(
            "{START}\nMeasured by `{command}` on {} cores (servers on loopback, in the same run).\n\n{}\n{}{END}",
            self.cores,
            self.targets(),
            self.every_figure()
        );
        let updated = format!("{}{}{}", &text[..a], block, &text[b + END.len()..]);
        std::fs::write(file, updated).map_err(|e| e.to_string())
    }

    /// Every figure, in a section the reader opens.
    fn every_figure(&self) -> String {
        format!(
            "<details><summary>Every figure</summary>\n\n{}\n</details>\n",
            self.table()
        )
    }
}
