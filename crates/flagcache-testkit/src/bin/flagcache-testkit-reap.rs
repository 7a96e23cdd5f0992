//! Stops the test servers of runs whose process was killed before it could stop them:
//! by the PIDs those runs recorded, and only while their owner is gone (see
//! `flagcache_testkit::reap_orphans`).

fn main() {
    let stopped = flagcache_testkit::reap_orphans();
    if !stopped.is_empty() {
        eprintln!(
            "stopped {} test server(s) left by killed runs: PIDs {stopped:?}",
            stopped.len()
        );
    }
}
