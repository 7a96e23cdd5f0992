//! The one error type of flagcache.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed, shareable error source.
///
/// Sources are kept behind an [`Arc`] so that [`Error`] is `Clone`: a single failed fetch
/// can hand the same error to every caller that was waiting on it.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, flagcache_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in flagcache.
///
/// Variants carry the context a caller needs to act (which backend, which operation,
/// which key) and keep the underlying error as [`std::error::Error::source`].
/// Use [`Error::is_transient`] to decide whether retrying — or serving a last known
/// value — makes sense.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A flag key failed validation (see [`FlagKey`](crate::FlagKey)).
    #[error("invalid flag key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key, truncated to 64 characters and with control characters
        /// escaped by `Debug`.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A caller-supplied argument other than a key was refused (a zero TTL, say).
    #[error("invalid argument: {0}")]
    InvalidArgument(Cow<'static, str>),

    /// The encoded value is larger than the backend accepts.
    #[error("value for {key} is {size} bytes, over the {limit}-byte limit of {backend}")]
    ValueTooLarge {
        /// The key being written.
        key: String,
        /// Encoded size in bytes.
        size: usize,
        /// The backend's limit in bytes.
        limit: usize,
        /// The backend that refused it.
        backend: &'static str,
    },

    /// Stored bytes could not be decoded: truncated, foreign, tampered with, or a
    /// decompression bomb. Callers treat the entry as a miss.
    #[error("corrupt entry{}: {reason}", OptKey(key))]
    Corrupt {
        /// The key the bytes were read from, when known.
        key: Option<String>,
        /// What was wrong with them.
        reason: Cow<'static, str>,
    },

    /// A remote call did not finish in time.
    #[error("{backend} {operation} timed out after {after:?}")]
    Timeout {
        /// The backend (or `"loader"`).
        backend: &'static str,
        /// The operation that timed out.
        operation: &'static str,
        /// The configured limit.
        after: Duration,
    },

    /// The backend failed (connection refused, protocol error, server error reply…).
    #[error("{backend} {operation} failed{}: {source}", OptKey(key))]
    Backend {
        /// The backend name (`"redis"`, `"memcached"`, `"memory"`, …).
        backend: &'static str,
        /// The operation that failed (`"get"`, `"put"`, …).
        operation: &'static str,
        /// The key involved, when there is one.
        key: Option<String>,
        /// Whether retrying may succeed (connection errors, overload) or not
        /// (authentication, a script error).
        transient: bool,
        /// The backend's own error.
        #[source]
        source: Source,
    },

    /// The loader (the source of truth) failed for a key.
    #[error("loader failed for {key}: {source}")]
    Loader {
        /// The key being loaded.
        key: String,
        /// The loader's error.
        #[source]
        source: Source,
    },

    /// A value could not be serialized or deserialized with the configured codec.
    #[error("codec error: {reason}")]
    Codec {
        /// What went wrong.
        reason: Cow<'static, str>,
        /// The serializer's error, when there is one.
        #[source]
        source: Option<Source>,
    },

    /// The component was shut down (a closed invalidation bus, a dropped cache, a
    /// runtime shutting down under an in-flight fetch).
    #[error("{0} is closed")]
    Closed(&'static str),
}

impl Error {
    /// Whether the same call may succeed later: timeouts, transient backend failures and
    /// loader failures are; invalid input, corrupt data and codec errors are not.
    ///
    /// `FlagCache` serves a last known value (fail-safe) on transient errors.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Loader { .. } => true,
            Error::Backend { transient, .. } => *transient,
            Error::InvalidKey { .. }
            | Error::InvalidArgument(_)
            | Error::ValueTooLarge { .. }
            | Error::Corrupt { .. }
            | Error::Codec { .. }
            | Error::Closed(_) => false,
        }
    }

    /// A [`Error::Corrupt`] without a key.
    pub fn corrupt(reason: impl Into<Cow<'static, str>>) -> Self {
        Error::Corrupt {
            key: None,
            reason: reason.into(),
        }
    }

    /// A [`Error::Codec`] from a serializer error.
    pub fn codec(
        reason: impl Into<Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Codec {
            reason: reason.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A [`Error::Backend`] from a backend's error.
    pub fn backend(
        backend: &'static str,
        operation: &'static str,
        transient: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Backend {
            backend,
            operation,
            key: None,
            transient,
            source: Arc::new(source),
        }
    }

    /// A [`Error::Loader`] for `key`.
    pub fn loader(
        key: &crate::FlagKey,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Loader {
            key: key.to_string(),
            source: Arc::new(source),
        }
    }

    /// Attaches `key` to the variants that carry one and have none yet.
    #[must_use]
    pub fn with_key(mut self, k: &crate::FlagKey) -> Self {
        match &mut self {
            Error::Corrupt { key, .. } | Error::Backend { key, .. } if key.is_none() => {
                *key = Some(k.to_string());
            }
            _ => {}
        }
        self
    }
}

/// Formats `" for <key>"` when a key is known.
struct OptKey<'a>(&'a Option<String>);

impl fmt::Display for OptKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(k) => write!(f, " for {k}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlagKey;

    #[test]
    fn transient_classification() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(Error::backend("redis", "get", true, io).is_transient());
        let auth = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "NOAUTH");
        assert!(!Error::backend("redis", "get", false, auth).is_transient());
        assert!(Error::Timeout {
            backend: "redis",
            operation: "get",
            after: Duration::from_millis(5)
        }
        .is_transient());
        assert!(!Error::corrupt("bad magic").is_transient());
        assert!(!Error::Closed("bus").is_transient());
    }

    #[test]
    fn display_carries_context_and_source_is_kept() {
        let key = FlagKey::new("checkout.v2").unwrap();
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let err = Error::backend("redis", "get", true, io).with_key(&key);
        assert_eq!(
            err.to_string(),
            "redis get failed for checkout.v2: reset by peer"
        );
        let src = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(src.as_deref(), Some("reset by peer"));
        // Cloning shares the source.
        let again = err.clone();
        assert_eq!(again.to_string(), err.to_string());
        assert_eq!(
            Error::corrupt("truncated").with_key(&key).to_string(),
            "corrupt entry for checkout.v2: truncated"
        );
    }
}
