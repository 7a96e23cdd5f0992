//! `flagcache doctor`: samples the server twice an interval apart while listening to
//! the invalidation channel, and reports what the figures show — a stampede, CAS
//! contention, evictions or memory pressure, a broken backplane, a flushed script
//! cache, an unreachable server — or that the deployment is healthy.

mod diagnose;
mod sample;

use std::time::{Duration, Instant};

use flagcache::{
    store::{ResyncReason, Signal},
    Backend,
};
use serde_json::json;

use crate::report::{human, table, Failure, Report};
use diagnose::{diagnose, rates, Finding, Thresholds};
use sample::Sample;

/// What the doctor's own subscription showed while it listened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heard {
    /// The resyncs seen.
    resyncs: u64,
    /// Whether the subscription is on the channel at the end.
    subscribed: bool,
}

impl Heard {
    fn new() -> Self {
        Heard {
            resyncs: 0,
            subscribed: true,
        }
    }

    /// Takes in one signal. A lost connection is signalled twice, with the same
    /// reason: when it is lost and when it is back.
    fn note(&mut self, signal: &Signal) {
        if let Signal::Resync(reason) = signal {
            self.resyncs += 1;
            match reason {
                ResyncReason::Reconnected | ResyncReason::HeartbeatMissed => {
                    self.subscribed = !self.subscribed;
                }
                ResyncReason::Closed => self.subscribed = false,
                _ => {}
            }
        }
    }

    /// The subscription ended: that too loses events.
    fn ended(&mut self) {
        self.resyncs += 1;
        self.subscribed = false;
    }
}

/// Listens to the invalidation channel until `deadline`.
async fn listen(sub: &mut flagcache::store::Subscription, deadline: tokio::time::Instant) -> Heard {
    let mut heard = Heard::new();
    loop {
        tokio::select! {
            s = sub.recv() => match s {
                Some(signal) => heard.note(&signal),
                None => {
                    heard.ended();
                    tokio::time::sleep_until(deadline).await;
                    return heard;
                }
            },
            () = tokio::time::sleep_until(deadline) => return heard,
        }
    }
}

/// Figures as table rows: name, first, second, and the rate per second for counters.
fn rows(a: &Sample, b: &Sample, secs: f64) -> Vec<Vec<String>> {
    let dash = || "-".to_string();
    let per = |x: u64, y: u64| format!("{:.1}", y.saturating_sub(x) as f64 / secs.max(1e-3));
    let mut rows = Vec::new();
    let mut counter = |name: &str, x: Option<u64>, y: Option<u64>| {
        if let (Some(x), Some(y)) = (x, y) {
            rows.push(vec![
                name.to_string(),
                x.to_string(),
                y.to_string(),
                per(x, y),
            ]);
        }
    };
    counter("hits", Some(a.hits), Some(b.hits));
    counter("misses", Some(a.misses), Some(b.misses));
    counter("gets", Some(a.gets), Some(b.gets));
    counter("evictions", Some(a.evictions), Some(b.evictions));
    counter("cas_hits", a.cas_hits, b.cas_hits);
    counter("cas_badval", a.cas_badval, b.cas_badval);
    counter("cas_misses", a.cas_misses, b.cas_misses);
    counter("script_calls", a.script_calls, b.script_calls);
    counter("script_failed", a.script_failed, b.script_failed);
    counter("sets", a.sets, b.sets);
    counter("noscript_errors", a.noscript_errors, b.noscript_errors);
    counter("script_flushes", a.script_flushes, b.script_flushes);
    let mut gauge = |name: &str, x: Option<u64>, y: Option<u64>| {
        if let (Some(x), Some(y)) = (x, y) {
            rows.push(vec![name.to_string(), x.to_string(), y.to_string(), dash()]);
        }
    };
    gauge("cached_scripts", a.cached_scripts, b.cached_scripts);
    gauge("used_memory", Some(a.used_memory), Some(b.used_memory));
    gauge("max_memory", Some(a.max_memory), Some(b.max_memory));
    gauge("keys", Some(a.keys), Some(b.keys));
    gauge("clients", Some(a.clients), Some(b.clients));
    gauge("subscribers", a.subscribers, b.subscribers);
    let n = |x: usize| Some(x as u64);
    gauge("live_nodes", n(a.live_nodes), n(b.live_nodes));
    gauge(
        "subscribed_nodes",
        n(a.subscribed_nodes),
        n(b.subscribed_nodes),
    );
    rows
}

/// The findings as text: each kind, its figures in a sentence, and the action.
fn describe(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!(
            "{}: {}\n  action: {}\n",
            f.kind, f.summary, f.action
        ));
    }
    out
}

/// Samples `backend`'s server, listens to its invalidation channel for `interval`,
/// samples it again, and reports the findings (exit 1) or a healthy deployment.
/// Progress goes to stderr, with or without `--json`.
pub async fn run(backend: &Backend, interval: Duration) -> Result<Report, Failure> {
    if interval.is_zero() {
        return Err(Failure::usage("--interval must be longer than 0"));
    }
    eprintln!(
        "doctor: sampling {} ({}): 1 of 2",
        backend.url(),
        backend.name()
    );
    let first = sample::take(backend, 0).await?;
    let started = Instant::now();
    let mut sub = backend
        .invalidator()
        .subscribe()
        .await
        .map_err(Failure::connect)?;
    eprintln!(
        "doctor: listening to the invalidation channel for {}",
        human(interval)
    );
    let heard = listen(&mut sub, tokio::time::Instant::now() + interval).await;
    let resyncs = heard.resyncs;
    // The doctor's own subscription is not counted among the subscribers — while it
    // is on the channel (Redis) at the second sample.
    let own = u64::from(backend.as_redis().is_some() && heard.subscribed);
    eprintln!("doctor: sampling: 2 of 2");
    let second = sample::take(backend, own).await?;
    let secs = started.elapsed().as_secs_f64();
    drop(sub);

    let findings = diagnose(&first, &second, secs, resyncs, &Thresholds::default());
    let r = rates(&first, &second, secs);
    let head = format!(
        "{} ({}, {} server{}), sampled {} apart\n",
        backend.url(),
        backend.name(),
        second.servers,
        if second.servers == 1 { "" } else { "s" },
        human(Duration::from_secs_f64(secs)),
    );
    let verdict = if findings.is_empty() {
        "healthy: no stampede, CAS contention, evictions, memory pressure, missing \
         subscribers, resyncs, script cache flush or unreachable server\n"
            .to_string()
    } else {
        format!(
            "{} finding{}:\n{}",
            findings.len(),
            if findings.len() == 1 { "" } else { "s" },
            describe(&findings)
        )
    };
    let header = ["FIGURE", "FIRST", "SECOND", "PER SECOND"];
    let text = format!(
        "{head}\n{}\nresyncs on the invalidation channel: {resyncs}\n\n{verdict}",
        table(&header, &rows(&first, &second, secs))
    );
    Ok(Report {
        json: json!({
            "url": backend.url(),
            "backend": backend.name(),
            "interval_ms": u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "elapsed_ms": (secs * 1000.0).round() as u64,
            "healthy": findings.is_empty(),
            "samples": [first, second],
            "rates": r,
            "resyncs": resyncs,
            "findings": findings,
        }),
        text,
        finding: !findings.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resync(reason: ResyncReason) -> Signal {
        Signal::Resync(reason)
    }

    #[test]
    fn a_lost_subscription_is_off_the_channel_until_it_is_back() {
        let mut heard = Heard::new();
        heard.note(&resync(ResyncReason::LogReset));
        assert_eq!((heard.resyncs, heard.subscribed), (1, true));
        heard.note(&resync(ResyncReason::Reconnected));
        assert!(!heard.subscribed, "lost");
        heard.note(&resync(ResyncReason::Reconnected));
        assert_eq!((heard.resyncs, heard.subscribed), (3, true));
        heard.note(&resync(ResyncReason::HeartbeatMissed));
        assert!(!heard.subscribed);
        let mut closed = Heard::new();
        closed.note(&resync(ResyncReason::Closed));
        assert!(!closed.subscribed);
        let mut ended = Heard::new();
        ended.ended();
        assert_eq!((ended.resyncs, ended.subscribed), (1, false));
    }
}
