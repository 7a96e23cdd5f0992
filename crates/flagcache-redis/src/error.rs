//! Turning redis-rs errors into flagcache errors: permanent (credentials, configuration,
//! a refused certificate) or transient (connection loss, timeouts, passing server states),
//! and naming the target an error at build was met at.

use std::fmt;
use std::time::Duration;

use flagcache_core::Error;

use crate::{tls, BACKEND};

/// Converts a redis-rs error met by `operation`, keeping it as the source and
/// classifying it; a timeout reports `limit`, the time limit the call ran under.
pub(crate) fn backend_error(
    operation: &'static str,
    limit: Duration,
    e: redis::RedisError,
) -> Error {
    if e.is_timeout() {
        return timeout(operation, limit);
    }
    let transient = is_transient(&e);
    Error::backend(BACKEND, operation, transient, e)
}

/// Converts a redis-rs error met while opening or checking a connection to `target`
/// (a description with any password redacted): as [`backend_error`], with the target
/// named in the error.
pub(crate) fn build_error(
    operation: &'static str,
    target: &str,
    limit: Duration,
    e: redis::RedisError,
) -> Error {
    if e.is_timeout() {
        return timeout(operation, limit);
    }
    let transient = is_transient(&e);
    let hint = (e.kind() == redis::ErrorKind::InvalidClientConfig).then_some(URL_FORMS);
    Error::backend(
        BACKEND,
        operation,
        transient,
        AtTarget {
            target: target.to_string(),
            error: e,
            hint,
        },
    )
}

/// The URL forms a target may be given in, for a URL that does not parse.
const URL_FORMS: &str = "accepted forms: redis://[user:password@]host[:port][/db], \
     rediss://… for TLS, redis+unix:///path[?db=N]";

/// A timeout of `operation` after `limit`.
fn timeout(operation: &'static str, limit: Duration) -> Error {
    Error::Timeout {
        backend: BACKEND,
        operation,
        after: limit,
    }
}

/// Whether retrying `e` may succeed.
fn is_transient(e: &redis::RedisError) -> bool {
    // Credentials, configuration and certificates a TLS handshake refused do not fix
    // themselves: those are permanent even where redis-rs would reconnect and try again.
    let permanent = tls::refused(e)
        || matches!(
            e.kind(),
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig
        )
        || e.code()
            .is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS" || c == "NOPERM");
    // Server states that pass (a busy script, loading, out of memory, a failover).
    let busy = e.code().is_some_and(|c| {
        matches!(
            c,
            "BUSY"
                | "LOADING"
                | "OOM"
                | "MISCONF"
                | "NOREPLICAS"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "READONLY"
        )
    });
    !permanent
        && (busy
            || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
            || e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal())
}

/// A redis-rs error and the target it was met at. Its text is the whole story (the
/// target, then redis-rs' own text, which already carries its cause), so it returns no
/// further source.
#[derive(Debug)]
struct AtTarget {
    target: String,
    error: redis::RedisError,
    /// What to fix, when redis-rs refused the configuration.
    hint: Option<&'static str>,
}

impl fmt::Display for AtTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.target, self.error)?;
        match self.hint {
            Some(hint) => write!(f, "; {hint}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for AtTarget {}
