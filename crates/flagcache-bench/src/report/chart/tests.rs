//! Tests of the latency chart: roles, panels, colours, legend, targets and well-formed SVG.

use std::time::Duration;

use super::*;
use crate::stats::Samples;

fn row(scenario: &str, contender: &str, us: &[u64]) -> Row {
    let mut s = Samples::default();
    for &u in us {
        s.push(Duration::from_micros(u));
    }
    Row::new(scenario, contender, s.summary())
}

/// Tags balance: every opened element is closed, in order.
fn balanced(svg: &str) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = svg;
    while let Some(a) = rest.find('<') {
        let b = rest[a..].find('>').ok_or("an unclosed tag")? + a;
        let tag = &rest[a + 1..b];
        if let Some(name) = tag.strip_prefix('/') {
            if open.pop() != Some(name) {
                return Err(format!("</{name}> closes nothing open"));
            }
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().ok_or("an empty tag")?;
            open.push(name);
        }
        let text = &rest[b + 1..rest[b + 1..].find('<').map_or(rest.len(), |n| n + b + 1)];
        let entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"];
        let bare = text
            .match_indices('&')
            .any(|(i, _)| !entities.iter().any(|e| text[i..].starts_with(e)));
        if bare || text.contains('>') {
            return Err(format!("unescaped text {text:?}"));
        }
        rest = &rest[b + 1..];
    }
    if open.is_empty() {
        Ok(())
    } else {
        Err(format!("left open: {open:?}"))
    }
}

#[test]
fn contenders_are_ours_baseline_or_other() {
    for ours in [
        "FlagCache::get, L1 hit",
        "FlagCache (L1 off)",
        "FlagCache + RedisLock",
        "flagcache, every evaluation after kill",
    ] {
        assert_eq!(role(ours), Role::Ours, "{ours}");
    }
    for base in [
        "bare quick_cache get",
        "raw redis-rs GET",
        "raw async-memcached get (pooled)",
        "raw cache-aside (redis-rs)",
    ] {
        assert_eq!(role(base), Role::Baseline, "{base}");
    }
    for other in [
        "the store alone (redis)",
        "floor: a 20 ms wait per replica, no I/O",
        "Redis pub/sub",
    ] {
        assert_eq!(role(other), Role::Other, "{other}");
    }
}

#[test]
fn one_panel_per_scenario_with_legend_colours_and_targets() {
    let mut report = Report::default();
    let l2 = "L2 hit, Redis, 1 task";
    let storm = "cold-key storm, 100 requests, 8 replicas";
    report
        .rows
        .push(row(l2, "raw redis-rs GET", &[60, 62, 65, 90]));
    report
        .rows
        .push(row(l2, "FlagCache (L1 off)", &[70, 72, 75, 120]));
    report
        .rows
        .push(row(l2, "the store <alone> & co", &[66, 68, 70, 100]));
    report
        .rows
        .push(row(storm, "raw cache-aside (redis-rs)", &[20_000, 40_000]));
    report
        .rows
        .push(row(storm, "FlagCache + RedisLock", &[20_000, 21_000]));
    report.rows.push(row("idle fleet", "50 replicas", &[]));
    report.checks.push(Check::at_most(
        "L2 hit, Redis: p50 at 1 task ÷ raw client's",
        1.1,
        1.10,
        "×",
    ));
    report.checks.push(Check::at_most(
        "cold-key storm: p99",
        21_000.0,
        25_000.0,
        "µs",
    ));
    report
        .checks
        .push(Check::at_most("cold-key storm: loader calls", 1.0, 1.0, "calls").correctness());

    let svg = svg(&report);
    balanced(&svg).unwrap();
    assert!(svg.starts_with("<svg"));
    assert_eq!(svg.matches(r#"<g class="panel""#).count(), 2);
    for colour in [OURS, BASELINE, MUTED[0]] {
        assert!(svg.contains(&format!(r#"stroke="{colour}""#)), "{colour}");
    }
    for legend in [
        "raw redis-rs GET",
        "FlagCache (L1 off)",
        "FlagCache + RedisLock",
    ] {
        assert!(svg.contains(&format!(">{legend}</text>")), "{legend}");
    }
    assert!(svg.contains("the store &lt;alone&gt; &amp; co"));
    assert!(svg.contains("≤ 1.10× (measured 1.10×, met)"));
    assert_eq!(svg.matches(r#"<line class="bound""#).count(), 1);
    assert!(svg.contains("target: p99 ≤ 25 ms"));
    assert!(!svg.contains("loader calls"));
    assert!(svg.contains("Not drawn (no latency samples): idle fleet"));
    assert_eq!(
        svg,
        super::svg(&report),
        "the same report draws the same bytes"
    );
}

#[test]
fn checks_go_to_the_panel_they_name() {
    let check = |t: &str| Check::at_least(t, 1.0, 1.0, "×");
    let ops = check("L2 hit, Redis: ops/s at 50 tasks ÷ raw client's");
    assert!(affinity("L2 hit, Redis, 50 tasks", &ops) > affinity("L2 hit, Redis, 1 task", &ops));
    assert!(
        affinity("L2 hit, Redis, 50 tasks", &ops) > affinity("L2 hit, Memcached, 50 tasks", &ops)
    );
    let l1 = check("L1 hit (get) ÷ bare quick_cache get, 2 threads");
    assert!(
        affinity("L1 hit, 2 threads, best of 5", &l1)
            > affinity("L1 hit, 1 thread, best of 5", &l1)
    );
    let ks = check("kill switch, Redis, no fault: max time until all 8 serve it");
    assert!(affinity("kill switch under faults, 8 replicas", &ks).is_some());
    assert_eq!(affinity("propagation, 10 flips to 8 replicas", &ks), None);
}

#[test]
fn log_scale_only_for_wide_ranges() {
    let narrow = YAxis::new([20_000.0, 25_000.0].into_iter());
    assert!(!narrow.log);
    assert_eq!(narrow.lo, 0.0);
    assert!(narrow.hi >= 25_000.0);
    let wide = YAxis::new([0.2, 50_000.0].into_iter());
    assert!(wide.log);
    assert!(wide.lo <= 0.2 && wide.hi >= 50_000.0);
    assert_eq!(tick_label(2_500.0), "2.5 ms");
    assert_eq!(tick_label(0.03), "30 ns");
}
