//! `flagcache inspect KEY…`: what L2 holds for each key, read as stored and described
//! as a reader would judge it.

use flagcache::{
    store::{EntryReport, RawEntry},
    Backend, FlagKey,
};
use serde_json::{json, Value};

use crate::report::{human, table, Failure, Report};

/// Reads `key`'s stored bytes from the backend's own raw read.
async fn raw(backend: &Backend, key: &FlagKey) -> Result<Option<RawEntry>, Failure> {
    let read = if let Some(store) = backend.as_redis() {
        store.raw_entry(key).await
    } else if let Some(store) = backend.as_memcached() {
        store.raw_entry(key).await
    } else {
        return Err(Failure::usage(format!(
            "inspect reads a shared backend (redis://, memcached://); {} holds nothing \
             outside the process that made it",
            backend.url()
        )));
    };
    read.map_err(Failure::backend)
}

/// One key's JSON object and table row.
fn describe(key: &FlagKey, report: Option<&EntryReport>) -> (Value, Vec<String>) {
    let Some(r) = report else {
        let json = json!({"key": key.as_str(), "present": false});
        let mut row = vec![key.to_string()];
        row.extend(std::iter::repeat("-".to_string()).take(8));
        row.push("absent".into());
        return (json, row);
    };
    let age = r.age();
    let json = json!({
        "key": key.as_str(),
        "present": true,
        "readable": r.problem.is_none(),
        "problem": r.problem,
        "layout": r.layout,
        "version": r.version.map(|v| v.get()),
        "written_at_ms": r.stamp_ms,
        "age_ms": age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
        "ttl_left_ms": r.ttl_left.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        "stored_bytes": r.stored_size,
        "value_bytes": r.payload_size,
        "compressed": r.compressed,
        "chunks": r.chunks,
        "checksum_ok": r.checksum_ok,
    });
    let dash = || "-".to_string();
    let row = vec![
        key.to_string(),
        r.layout.to_string(),
        r.version.map_or_else(dash, |v| v.get().to_string()),
        age.map_or_else(dash, human),
        r.ttl_left.map_or_else(dash, human),
        format!("{} B", r.stored_size),
        if r.compressed { "yes" } else { "no" }.to_string(),
        r.chunks.map_or_else(dash, |c| c.to_string()),
        match r.checksum_ok {
            Some(true) => "ok".to_string(),
            Some(false) => "BAD".to_string(),
            None => dash(),
        },
        match &r.problem {
            None => "readable".to_string(),
            Some(p) => format!("UNREADABLE: {p}"),
        },
    ];
    (json, row)
}

/// Inspects every key; a finding when any is absent or unreadable.
pub async fn run(backend: &Backend, keys: &[String]) -> Result<Report, Failure> {
    let codec = backend.store().codec().clone();
    let (mut entries, mut rows, mut finding) = (Vec::new(), Vec::new(), false);
    for text in keys {
        let key = FlagKey::new(text.as_str()).map_err(|e| Failure::usage(e.to_string()))?;
        let report = raw(backend, &key).await?.map(|raw| raw.describe(&codec));
        finding |= !matches!(&report, Some(r) if r.problem.is_none());
        let (json, row) = describe(&key, report.as_ref());
        entries.push(json);
        rows.push(row);
    }
    let header = [
        "KEY", "LAYOUT", "VERSION", "AGE", "TTL LEFT", "STORED", "GZIP", "CHUNKS", "CHECKSUM",
        "STATUS",
    ];
    Ok(Report {
        json: json!({"url": backend.url(), "backend": backend.name(), "entries": entries}),
        text: table(&header, &rows),
        finding,
    })
}
