//! Turning redis-rs errors into flagcache errors: permanent (credentials, configuration,
//! a refused certificate) or transient (connection loss, timeouts, passing server states).

use std::time::Duration;

use flagcache_core::Error;

use crate::{tls, BACKEND};

/// Converts a redis-rs error, keeping it as the source and classifying it.
pub(crate) fn backend_error(operation: &'static str, e: redis::RedisError) -> Error {
    // Credentials, configuration and certificates a TLS handshake refused do not fix
    // themselves: those are permanent even where redis-rs would reconnect and try again.
    let permanent = tls::refused(&e)
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
    let transient = !permanent
        && (busy
            || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
            || e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal());
    if e.is_timeout() {
        return Error::Timeout {
            backend: BACKEND,
            operation,
            after: Duration::ZERO,
        };
    }
    Error::backend(BACKEND, operation, transient, e)
}
