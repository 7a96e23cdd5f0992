//! `flagcache watch`: tails the invalidation channel (Redis pub/sub) or log
//! (memcached), each event with its origin, sequence and lag, resyncs flagged, and
//! lists the live nodes from the fleet presence.

use std::time::Duration;

use flagcache::{
    store::{now_ms, Invalidation, Signal, Target},
    Backend,
};
use serde_json::{json, Value};

use crate::report::{human, Failure, Report};

/// The live nodes (those that report their presence) as JSON, and as lines to print.
/// Presence is optional: when it cannot be read, there are none to list.
async fn live_nodes(backend: &Backend) -> (Vec<Value>, String) {
    let mut nodes = backend.fleet().nodes().await.unwrap_or_default();
    nodes.sort_by(|a, b| (&a.name, a.node).cmp(&(&b.name, b.node)));
    let mut text = format!("{} live nodes (reporting presence)\n", nodes.len());
    let json = nodes
        .iter()
        .map(|n| {
            let seen = now_ms().saturating_sub(n.seen_at_ms);
            let up = now_ms().saturating_sub(n.started_at_ms);
            text.push_str(&format!(
                "  {} {} pid {}{} up {} seen {} ago{}\n",
                n.node,
                n.name,
                n.pid,
                n.host
                    .as_ref()
                    .map_or_else(String::new, |h| format!(" on {h}")),
                human(Duration::from_millis(up)),
                human(Duration::from_millis(seen)),
                hears(n.subscribed, n.transport.as_deref()),
            ));
            json!({
                "node": n.node.to_string(),
                "name": n.name,
                "pid": n.pid,
                "host": n.host,
                "subscribed": n.subscribed,
                "transport": n.transport,
                "started_at_ms": n.started_at_ms,
                "seen_ago_ms": seen,
            })
        })
        .collect();
    (json, text)
}

/// How a node hears invalidations, for its line: its invalidator's transport (not
/// reported by nodes of versions before it was), or that it has none.
fn hears(subscribed: bool, transport: Option<&str>) -> String {
    match (subscribed, transport) {
        (false, _) => " (no invalidator)".to_string(),
        (true, Some(t)) => format!(" hears by {t}"),
        (true, None) => String::new(),
    }
}

/// One event as JSON and as a table row.
fn event(ev: &Invalidation) -> (Value, Vec<String>) {
    let (target, shown) = match &ev.target {
        Target::Key(k) => (json!({"key": k.as_str()}), k.to_string()),
        Target::Tag(t) => (json!({"tag": t}), format!("tag:{t}")),
        _ => (json!("all"), "*".to_string()),
    };
    let lag = (ev.sent_at_ms > 0).then(|| now_ms().saturating_sub(ev.sent_at_ms));
    let json = json!({
        "kind": "invalidated",
        "received_at_ms": now_ms(),
        "target": target,
        "version": ev.version.map(|v| v.get()),
        "origin": ev.origin.to_string(),
        "seq": ev.seq,
        "lag_ms": lag,
    });
    let dash = || "-".to_string();
    let row = vec![
        "event".to_string(),
        shown,
        ev.version.map_or_else(dash, |v| v.get().to_string()),
        ev.origin.to_string(),
        ev.seq.to_string(),
        lag.map_or_else(dash, |l| format!("{l}ms")),
    ];
    (json, row)
}

const HEADER: [&str; 6] = ["SIGNAL", "TARGET", "VERSION", "ORIGIN", "SEQ", "LAG"];

/// One row as it is printed on arrival, in fixed-width columns (the rows to come are
/// not known, so their widths cannot be measured).
fn line(cells: &[String]) -> String {
    const WIDTHS: [usize; 5] = [7, 24, 8, 17, 6];
    let mut out = String::new();
    for (i, cell) in cells.iter().enumerate() {
        match WIDTHS.get(i) {
            Some(w) if i + 1 < cells.len() => out.push_str(&format!("{cell:<w$} ")),
            _ => out.push_str(cell),
        }
    }
    out.trim_end().to_string()
}

/// Watches until `duration` passes (or Ctrl-C). In text mode each signal is printed as
/// it arrives; the report holds the summary (and, as JSON, every signal).
pub async fn run(
    backend: &Backend,
    duration: Option<Duration>,
    json_out: bool,
) -> Result<Report, Failure> {
    let mut sub = backend
        .invalidator()
        .subscribe()
        .await
        .map_err(Failure::connect)?;
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    if !json_out {
        println!("watching {} ({})", backend.url(), backend.name());
        print!("{}", live_nodes(backend).await.1);
        println!("{}", line(&HEADER.map(String::from)));
    }
    let (mut signals, mut events, mut resyncs) = (Vec::new(), 0u64, 0u64);
    loop {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let signal = tokio::select! {
            s = sub.recv() => s,
            () = until_deadline => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (json, row) = match signal {
            Some(Signal::Invalidated(ev)) => {
                events += 1;
                event(&ev)
            }
            Some(Signal::Resync(reason)) => {
                resyncs += 1;
                let json = json!({"kind": "resync", "received_at_ms": now_ms(), "reason": reason.to_string()});
                let mut row = vec!["RESYNC".to_string(), reason.to_string()];
                row.extend(std::iter::repeat(String::new()).take(4));
                (json, row)
            }
            Some(_) => continue,
            None => {
                resyncs += 1;
                let json = json!({"kind": "closed", "received_at_ms": now_ms()});
                (
                    json,
                    vec!["CLOSED".to_string(), "the subscription ended".to_string()],
                )
            }
        };
        let closed = json["kind"] == "closed";
        if !json_out {
            println!("{}", line(&row));
        }
        signals.push(json);
        if closed {
            break;
        }
    }
    let text = format!(
        "{events} events, {resyncs} resyncs{}\n",
        if resyncs > 0 {
            " (events may have been missed: replicas flush their L1)"
        } else {
            ""
        }
    );
    let (nodes, _) = live_nodes(backend).await;
    Ok(Report {
        json: json!({
            "url": backend.url(),
            "backend": backend.name(),
            "events": events,
            "resyncs": resyncs,
            "signals": signals,
            "nodes": nodes,
        }),
        text,
        finding: resyncs > 0,
    })
}
