//! The diagnosis rules on handmade samples: each finding at and below its bar.

use super::*;

fn redis() -> Sample {
    Sample {
        servers: 1,
        misses_per_fill: 5,
        hits: 1000,
        misses: 10,
        gets: 1010,
        script_calls: Some(50),
        script_failed: Some(0),
        sets: Some(5),
        noscript_errors: Some(0),
        script_flushes: Some(0),
        cached_scripts: Some(4),
        subscribers: Some(3),
        live_nodes: 3,
        subscribed_nodes: 3,
        max_memory: 1000,
        used_memory: 100,
        ..Sample::default()
    }
}

fn memcached() -> Sample {
    Sample {
        servers: 2,
        misses_per_fill: 1,
        hits: 500,
        misses: 5,
        cas_hits: Some(100),
        cas_badval: Some(1),
        cas_misses: Some(0),
        max_memory: 1000,
        used_memory: 10,
        ..Sample::default()
    }
}

fn kinds(a: &Sample, b: &Sample, resyncs: u64) -> Vec<&'static str> {
    diagnose(a, b, 1.0, resyncs, &Thresholds::default())
        .iter()
        .map(|f| f.kind)
        .collect()
}

#[test]
fn a_quiet_server_is_healthy() {
    let a = redis();
    let mut b = a.clone();
    b.hits += 400;
    b.misses += 20;
    b.script_calls = Some(60);
    assert!(kinds(&a, &b, 0).is_empty());
    assert!(kinds(&memcached(), &memcached(), 0).is_empty());
}

#[test]
fn many_misses_and_few_hits_are_a_stampede() {
    let a = redis();
    let mut b = a.clone();
    b.misses += 2000;
    b.hits += 10;
    let found = diagnose(&a, &b, 2.0, 0, &Thresholds::default());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].kind, "stampede");
    assert_eq!(found[0].figures["misses_per_sec"], 1000.0);
    assert_eq!(found[0].figures["miss_ratio"], 0.995);
    assert!(
        found[0].summary.contains("1000 misses/s"),
        "{}",
        found[0].summary
    );
}

#[test]
fn misses_below_the_rate_or_the_ratio_are_not() {
    let a = redis();
    let mut few = a.clone();
    few.misses += 999; // 999/s, all reads missing: under 200 fills/s × 5
    assert!(kinds(&a, &few, 0).is_empty());
    let mut many_hits = a.clone();
    many_hits.misses += 1000;
    many_hits.hits += 112; // under 90 % miss
    assert!(kinds(&a, &many_hits, 0).is_empty());
    let mut at = a.clone();
    at.misses += 1000;
    at.hits += 111;
    assert_eq!(kinds(&a, &at, 0), ["stampede"]);
}

#[test]
fn ordinary_fills_on_redis_are_not_a_stampede() {
    // Each fill of an absent key misses five times (entry, fence, lock script,
    // put script's fence and entry): 40 and 150 fills/s.
    let a = redis();
    for fills in [40, 150] {
        let mut b = a.clone();
        b.misses += fills * 5;
        assert!(kinds(&a, &b, 0).is_empty(), "{fills} fills/s");
    }
    // A busy cache whose misses do not outnumber its hits by far: 1500 misses/s
    // against 400 hits/s.
    let mut busy = a.clone();
    busy.misses += 1500;
    busy.hits += 400;
    assert!(kinds(&a, &busy, 0).is_empty());
    // On memcached a miss is a fill's only one: the bar stays at 200/s.
    let m = memcached();
    let mut storm = m.clone();
    storm.misses += 200;
    assert_eq!(kinds(&m, &storm, 0), ["stampede"]);
}

#[test]
fn a_polled_log_raises_the_bar_by_its_pollers() {
    let mut a = memcached();
    a.polled_log = true;
    a.live_nodes = 10;
    let mut b = a.clone();
    b.misses += 399; // 10 idle pollers: 200 + 10 × 20 misses/s expected at most
    assert!(kinds(&a, &b, 0).is_empty());
    b.misses += 1;
    assert_eq!(kinds(&a, &b, 0), ["stampede"]);
}

#[test]
fn lost_cas_writes_are_contention() {
    let a = memcached();
    let mut b = a.clone();
    b.cas_badval = Some(1 + 300);
    b.cas_hits = Some(100 + 50);
    let found = diagnose(&a, &b, 1.0, 0, &Thresholds::default());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, "cas_contention");
    assert_eq!(found[0].figures["cas_badval"], 300);
    assert_eq!(found[0].figures["cas_badval_ratio"], 0.857);
}

#[test]
fn few_or_rare_lost_cas_writes_are_not() {
    let a = memcached();
    let mut few = a.clone();
    few.cas_badval = Some(1 + 9); // all lost, but 9
    assert!(kinds(&a, &few, 0).is_empty());
    let mut rare = a.clone();
    rare.cas_badval = Some(1 + 10);
    rare.cas_hits = Some(100 + 200); // under 5 %
    assert!(kinds(&a, &rare, 0).is_empty());
    let mut at = a.clone();
    at.cas_badval = Some(1 + 10);
    at.cas_hits = Some(100 + 190); // 10 of 200: 5 %
    assert_eq!(kinds(&a, &at, 0), ["cas_contention"]);
}

#[test]
fn a_redis_write_storm_is_a_figure_not_a_finding() {
    // Redis scripts never retry: many versioned writes are volume, not contention.
    let a = redis();
    let mut b = a.clone();
    b.script_calls = Some(50 + 5000);
    b.script_failed = Some(3);
    let found = diagnose(&a, &b, 1.0, 0, &Thresholds::default());
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(rates(&a, &b, 1.0).script_calls_per_sec, Some(5000.0));
}

#[test]
fn evictions_and_memory_pressure() {
    let a = memcached();
    let mut b = a.clone();
    b.evictions += 1;
    let found = diagnose(&a, &b, 1.0, 0, &Thresholds::default());
    assert_eq!(found[0].kind, "evictions");
    assert_eq!(found[0].figures["evictions"], 1);
    let mut full = a.clone();
    full.used_memory = full.max_memory * 9 / 10;
    assert_eq!(kinds(&a, &full, 0), ["memory_pressure"]);
    full.used_memory -= 1;
    assert!(kinds(&a, &full, 0).is_empty());
    // No limit: no pressure.
    let mut unlimited = redis();
    unlimited.max_memory = 0;
    unlimited.used_memory = u64::MAX / 2;
    assert!(kinds(&unlimited, &unlimited, 0).is_empty());
}

#[test]
fn fewer_subscribers_than_live_nodes_is_a_broken_backplane() {
    let a = redis();
    let mut b = a.clone();
    b.subscribers = Some(2);
    // One sample with all of them: a reconnection, not a finding.
    assert!(kinds(&a, &b, 0).is_empty());
    let mut a2 = a.clone();
    a2.subscribers = Some(2);
    let found = diagnose(&a2, &b, 1.0, 0, &Thresholds::default());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].kind, "missing_subscribers");
    assert_eq!(found[0].figures["missing"], 1);
    // More subscribers than nodes (a watcher, replicas without presence): fine.
    let mut more = a.clone();
    more.subscribers = Some(9);
    assert!(kinds(&more, &more, 0).is_empty());
}

#[test]
fn resyncs_are_a_broken_backplane() {
    let found = diagnose(&memcached(), &memcached(), 1.0, 2, &Thresholds::default());
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].kind, &found[0].figures["resyncs"]),
        ("resyncs", &json!(2))
    );
}

#[test]
fn each_kind_has_one_shape_of_figures() {
    let a = Sample {
        subscribers: Some(1),
        ..redis()
    };
    let found = diagnose(&a, &a, 1.0, 1, &Thresholds::default());
    let shape = |kind: &str| {
        let f = found.iter().find(|f| f.kind == kind).unwrap();
        f.figures.keys().cloned().collect::<Vec<_>>()
    };
    assert_eq!(
        shape("missing_subscribers"),
        ["live_nodes", "missing", "subscribed_nodes", "subscribers"]
    );
    assert_eq!(shape("resyncs"), ["resyncs"]);
}

#[test]
fn an_unreachable_server_is_named() {
    let a = memcached();
    let mut b = a.clone();
    b.unreachable = vec!["tcp://10.0.0.2:11211".into()];
    let found = diagnose(&a, &b, 1.0, 0, &Thresholds::default());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, "server_down");
    assert_eq!(
        found[0].figures["unreachable"],
        json!(["tcp://10.0.0.2:11211"])
    );
    assert!(
        found[0].summary.contains("1 of 2 servers"),
        "{}",
        found[0].summary
    );
}

#[test]
fn counters_at_the_limit_do_not_overflow() {
    let mut a = memcached();
    a.hits = u64::MAX;
    a.misses = u64::MAX;
    a.cas_badval = Some(0);
    a.cas_hits = Some(0);
    let mut b = a.clone();
    b.cas_badval = Some(u64::MAX);
    b.cas_hits = Some(u64::MAX);
    let mut before = a.clone();
    before.hits = 0;
    before.misses = 0;
    let found = diagnose(&before, &a, 1.0, 0, &Thresholds::default());
    assert!(
        found.iter().all(|f| f.kind != "cas_contention"),
        "{found:?}"
    );
    assert!(rates(&before, &a, 1.0).miss_ratio.is_some());
    let found = diagnose(&a, &b, 1.0, 0, &Thresholds::default());
    assert_eq!(found[0].kind, "cas_contention");
}

#[test]
fn a_script_cache_flush() {
    let a = redis();
    let mut dropped = a.clone();
    dropped.cached_scripts = Some(0);
    assert_eq!(kinds(&a, &dropped, 0), ["script_cache_flush"]);
    let mut noscript = a.clone();
    noscript.noscript_errors = Some(3);
    let found = diagnose(&a, &noscript, 1.0, 0, &Thresholds::default());
    assert_eq!(found[0].kind, "script_cache_flush");
    assert_eq!(found[0].figures["noscript_errors"], 3);
    let mut grown = a.clone();
    grown.cached_scripts = Some(9);
    assert!(kinds(&a, &grown, 0).is_empty());
}

#[test]
fn a_restarted_server_counts_from_zero_without_a_finding() {
    let a = redis();
    let restarted = Sample {
        cached_scripts: Some(4),
        ..redis()
    };
    let mut b = restarted;
    b.hits = 0;
    b.misses = 0;
    assert!(kinds(&a, &b, 0).is_empty());
}
