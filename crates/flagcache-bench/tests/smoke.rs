//! A smoke run of every scenario with tiny counts, so the benchmarks cannot rot: each
//! runs against real servers, the report is written, and the correctness targets
//! (loader calls, errors, flips never seen) hold. Timing targets are not checked here
//! — timings are not tests; `scripts/bench` measures them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn every_scenario_runs_and_its_correctness_targets_hold() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_flagcache-bench"))
        .args(["--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "flagcache-bench --quick failed:\n{stderr}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    for scenario in [
        "L1 hit",
        "L2 hit, Redis",
        "L2 hit, Memcached",
        "cold-key storm",
        "rollout storm",
        "propagation",
        "foreign writer",
        "cache down",
    ] {
        let found: Vec<_> = rows
            .iter()
            .filter(|r| r["scenario"].as_str().unwrap().starts_with(scenario))
            .collect();
        assert!(
            found.len() >= 2,
            "{scenario}: expected a contender and its baseline"
        );
        assert!(
            found
                .iter()
                .all(|r| r["latency"]["count"].as_u64().unwrap() > 0),
            "{scenario}: a contender has no samples"
        );
    }
    let kill: Vec<_> = rows
        .iter()
        .filter(|r| {
            r["scenario"]
                .as_str()
                .unwrap()
                .starts_with("kill switch under faults")
        })
        .collect();
    let measured = kill
        .iter()
        .filter(|r| r["latency"]["count"].as_u64().unwrap() > 0)
        .count();
    assert_eq!(measured, 7, "kill switch: a fault row has no samples");
    assert_eq!(kill.len(), 7, "kill switch: a row that is not measured");
    assert!(
        kill.iter().any(|r| r["contender"]
            .as_str()
            .unwrap()
            .contains("invalidation racing a slow load")),
        "kill switch: the racing-load row is missing"
    );
    let checks = json["checks"].as_array().unwrap();
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["target"].as_str().unwrap() == name)
            .unwrap_or_else(|| panic!("no check {name:?}"))
    };
    assert_eq!(check("cold-key storm: loader calls")["measured"], 1.0);
    let correctness: Vec<_> = checks
        .iter()
        .filter(|c| c["correctness"].as_bool().unwrap())
        .collect();
    assert!(correctness.len() >= 13);
    for c in correctness {
        assert!(c["met"].as_bool().unwrap(), "missed: {c}");
    }
    let svg = std::fs::read_to_string(out.path().join("latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("cold-key storm"));
}
