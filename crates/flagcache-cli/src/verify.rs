//! `flagcache verify`: waits until every live replica has applied a version of a key —
//! read from the fleet presence replicas report — and prints each replica's lag, or the
//! stragglers when the budget passes.

use std::time::{Duration, Instant};

use flagcache::fleet::{NodeReport, Verdict};
use flagcache::{store::now_ms, Backend, FlagKey, Version};
use serde_json::{json, Value};

use crate::report::{human, table, Failure, Report};

/// How often the fleet is read while waiting.
const POLL: Duration = Duration::from_millis(100);

/// One replica's row: its verdict as JSON and as table cells.
fn replica(node: &NodeReport, verdict: Verdict) -> (Value, Vec<String>) {
    let dash = || "-".to_string();
    let (state, version, lag) = match verdict {
        Verdict::Applied(a) => ("applied", Some(a.version), a.lag_ms),
        Verdict::StartedAfter => ("started_after", None, None),
        Verdict::Behind(v) => ("behind", v.map(Version::get), None),
        _ => ("unknown", None, None),
    };
    let seen_ago = now_ms().saturating_sub(node.seen_at_ms);
    let json = json!({
        "node": node.node.to_string(),
        "name": node.name,
        "pid": node.pid,
        "host": node.host,
        "subscribed": node.subscribed,
        "state": state,
        "applied_version": version,
        "lag_ms": lag,
        "seen_ago_ms": seen_ago,
    });
    let row = vec![
        node.node.to_string(),
        node.name.clone(),
        node.host
            .as_ref()
            .map_or_else(|| node.pid.to_string(), |h| format!("{h}/{}", node.pid)),
        state.replace('_', " "),
        version.map_or_else(dash, |v| v.to_string()),
        lag.map_or_else(dash, |l| human(Duration::from_millis(l))),
        human(Duration::from_millis(seen_ago)),
    ];
    (json, row)
}

/// When L2 was written at `version` or newer, if it was (a replica started after that
/// never held an older value).
async fn written_at(backend: &Backend, key: &FlagKey, version: Version) -> Option<u64> {
    match backend.store().get(key).await {
        Ok(Some(e)) if e.version >= version && e.stamp_ms > 0 => Some(e.stamp_ms),
        _ => None,
    }
}

/// Waits up to `within` for every live replica to apply `version` of `key`.
pub async fn run(
    backend: &Backend,
    key: &str,
    version: u64,
    within: Duration,
    json_out: bool,
) -> Result<Report, Failure> {
    let key = FlagKey::new(key).map_err(|e| Failure::usage(e.to_string()))?;
    let version = Version::new(version);
    let fleet = backend.fleet();
    let started = Instant::now();
    let mut shown = None;
    let (nodes, verdicts, done) = loop {
        let written = written_at(backend, &key, version).await;
        let mut nodes = fleet.nodes().await.map_err(Failure::backend)?;
        nodes.sort_by(|a, b| (&a.name, a.node).cmp(&(&b.name, b.node)));
        let verdicts: Vec<Verdict> = nodes
            .iter()
            .map(|n| n.verdict(&key, version, written))
            .collect();
        let applied = verdicts.iter().filter(|v| v.is_done()).count();
        let done = !nodes.is_empty() && applied == nodes.len();
        if done || started.elapsed() >= within {
            break (nodes, verdicts, done);
        }
        if !json_out && shown != Some((applied, nodes.len())) {
            eprintln!(
                "waiting: {applied} of {} live replicas serve {key} >= {version} ({})",
                nodes.len(),
                human(started.elapsed())
            );
            shown = Some((applied, nodes.len()));
        }
        tokio::time::sleep(POLL.min(within.saturating_sub(started.elapsed()))).await;
    };
    let elapsed = started.elapsed();
    let (rows_json, rows): (Vec<Value>, Vec<Vec<String>>) = nodes
        .iter()
        .zip(&verdicts)
        .map(|(n, v)| replica(n, *v))
        .unzip();
    let stragglers: Vec<String> = nodes
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| !v.is_done())
        .map(|(n, _)| n.node.to_string())
        .collect();
    let summary = if done {
        let max_lag = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Applied(a) => a.lag_ms,
                _ => None,
            })
            .max();
        format!(
            "all {} live replicas serve {key} >= {version}{}\n",
            nodes.len(),
            max_lag.map_or_else(String::new, |l| format!(
                " (slowest applied it {} after it was sent)",
                human(Duration::from_millis(l))
            ))
        )
    } else if nodes.is_empty() {
        "no live replica reports its presence: build caches with report_to_fleet\n".to_string()
    } else {
        format!(
            "{} of {} live replicas did not apply {key} {version} within {}: {}\n",
            stragglers.len(),
            nodes.len(),
            human(within),
            stragglers.join(", ")
        )
    };
    let text = if nodes.is_empty() {
        summary
    } else {
        let header = ["NODE", "NAME", "PROCESS", "STATE", "VERSION", "LAG", "SEEN"];
        format!("{}{summary}", table(&header, &rows))
    };
    Ok(Report {
        json: json!({
            "url": backend.url(),
            "backend": backend.name(),
            "key": key.as_str(),
            "version": version.get(),
            "within_ms": u64::try_from(within.as_millis()).unwrap_or(u64::MAX),
            "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            "done": done,
            "live": nodes.len(),
            "replicas": rows_json,
            "stragglers": stragglers,
        }),
        text,
        finding: !done,
    })
}
