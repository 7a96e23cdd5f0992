//! `flagcache set`, `invalidate` and `refresh`: the writes a `FlagCache` makes, made
//! from the command line through one (the version guard and the invalidation
//! included).

use flagcache::{Backend, FlagCache, FlagKey, PutOutcome, Result, Version};
use serde_json::{json, Value};

use crate::report::{Failure, Report};

/// A cache over the backend that writes and publishes; it never loads (the command
/// line is not a source of truth). An operator's write may take its time (a large
/// value goes to memcached in chunks): its L2 calls are given 5 s, not a request
/// path's 250 ms.
async fn cache(backend: &Backend) -> Result<FlagCache<Value>, Failure> {
    let no_source = |_key: FlagKey| async { Ok(None) };
    backend
        .cache_builder(no_source)
        .name("flagcache-cli")
        .l2_timeout(std::time::Duration::from_secs(5))
        .build()
        .await
        .map_err(Failure::connect)
}

fn keys(texts: &[String]) -> Result<Vec<FlagKey>, Failure> {
    texts
        .iter()
        .map(|t| FlagKey::new(t.as_str()).map_err(|e| Failure::usage(e.to_string())))
        .collect()
}

/// `set KEY --version N --value JSON`: Stored, or Superseded by L2's version (a
/// finding).
pub async fn set(
    backend: &Backend,
    key: &str,
    version: u64,
    value: &str,
) -> Result<Report, Failure> {
    let value: Value = serde_json::from_str(value)
        .map_err(|e| Failure::usage(format!("the value is not JSON: {e}")))?;
    let key = FlagKey::new(key).map_err(|e| Failure::usage(e.to_string()))?;
    let cache = cache(backend).await?;
    let outcome = cache
        .set(&key, value, Version::new(version))
        .await
        .map_err(Failure::backend)?;
    let (json, text, finding) = match outcome {
        PutOutcome::Superseded { current } => (
            json!({"key": key.as_str(), "version": version, "outcome": "superseded", "current": current.get()}),
            format!("{key}: Superseded {{ current: {current} }} — L2 holds a newer version; the fleet was told\n"),
            true,
        ),
        _ => (
            json!({"key": key.as_str(), "version": version, "outcome": "stored", "current": version}),
            format!("{key}: Stored (version {version}), invalidation published\n"),
            false,
        ),
    };
    Ok(Report {
        json,
        text,
        finding,
    })
}

/// `invalidate KEY…` or `invalidate --all`.
pub async fn invalidate(backend: &Backend, texts: &[String], all: bool) -> Result<Report, Failure> {
    let cache = cache(backend).await?;
    if all {
        cache.invalidate_all().await.map_err(Failure::backend)?;
        return Ok(Report {
            json: json!({"invalidated": "all"}),
            text: "every replica's L1 dropped (L2 keeps its versioned entries)\n".into(),
            finding: false,
        });
    }
    let keys = keys(texts)?;
    let mut text = String::new();
    for key in &keys {
        cache.invalidate(key).await.map_err(Failure::backend)?;
        text.push_str(&format!("{key}: dropped from L2 and every replica's L1\n"));
    }
    Ok(Report {
        json: json!({"invalidated": texts}),
        text,
        finding: false,
    })
}

/// `refresh KEY…`.
pub async fn refresh(backend: &Backend, texts: &[String]) -> Result<Report, Failure> {
    let cache = cache(backend).await?;
    let keys = keys(texts)?;
    let mut text = String::new();
    for key in &keys {
        cache.refresh(key).await.map_err(Failure::backend)?;
        text.push_str(&format!(
            "{key}: marked for reload; replicas dropped their L1 copy\n"
        ));
    }
    Ok(Report {
        json: json!({"refreshed": texts}),
        text,
        finding: false,
    })
}
