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
/// which key) and keep the underlying error in their `source` field.
/// Use [`Error::is_transient`] to decide whether retrying — or serving a last known
/// value — makes sense.
///
/// Each link of the [`std::error::Error::source`] chain is said once: `Backend` and
/// `Loader` print their source's text after their own, so their `source()` is that
/// source's own source, not the source again (the source itself is the variant's
/// `source` field, for downcasting); `Codec`, which does not print its source, returns
/// it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A flag key failed validation (see [`FlagKey`](crate::FlagKey)).
    InvalidKey {
        /// The offending key, truncated to 64 characters and with control characters
        /// escaped by `Debug`.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A caller-supplied argument other than a key was refused (a zero TTL, say).
    InvalidArgument(Cow<'static, str>),

    /// The encoded value is larger than the backend accepts.
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
    Corrupt {
        /// The key the bytes were read from, when known.
        key: Option<String>,
        /// What was wrong with them.
        reason: Cow<'static, str>,
    },

    /// A remote call did not finish in time.
    Timeout {
        /// The backend (or `"loader"`).
        backend: &'static str,
        /// The operation that timed out.
        operation: &'static str,
        /// The configured limit.
        after: Duration,
    },

    /// The backend failed (connection refused, protocol error, server error reply…).
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
        source: Source,
    },

    /// The loader (the source of truth) failed for a key.
    Loader {
        /// The key being loaded.
        key: String,
        /// The loader's error.
        source: Source,
    },

    /// A value could not be serialized or deserialized with the configured codec.
    Codec {
        /// What went wrong.
        reason: Cow<'static, str>,
        /// The serializer's error, when there is one.
        source: Option<Source>,
    },

    /// The component was shut down (a closed invalidation bus, a dropped cache, a
    /// runtime shutting down under an in-flight fetch).
    Closed(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidKey { key, reason } => write!(f, "invalid flag key {key:?}: {reason}"),
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::ValueTooLarge {
                key,
                size,
                limit,
                backend,
            } => write!(
                f,
                "value for {key} is {size} bytes, over the {limit}-byte limit of {backend}"
            ),
            Error::Corrupt { key, reason } => write!(f, "corrupt entry{}: {reason}", OptKey(key)),
            Error::Timeout {
                backend,
                operation,
                after,
            } => write!(f, "{backend} {operation} timed out after {after:?}"),
            Error::Backend {
                backend,
                operation,
                key,
                source,
                ..
            } => write!(f, "{backend} {operation} failed{}: {source}", OptKey(key)),
            Error::Loader { key, source } if key.is_empty() => {
                write!(f, "loader failed: {source}")
            }
            Error::Loader { key, source } => write!(f, "loader failed for {key}: {source}"),
            Error::Codec { reason, .. } => write!(f, "codec error: {reason}"),
            Error::Closed(what) => write!(f, "{what} is closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Their text is in this one's: the chain goes on from their own source.
            Error::Backend { source, .. } | Error::Loader { source, .. } => source.source(),
            Error::Codec {
                source: Some(source),
                ..
            } => Some(&**source),
            _ => None,
        }
    }
}

/// An error a loader returns with `?` when it is a `Box<dyn Error + Send + Sync>`: an
/// [`Error::Loader`] with no key yet ([`Error::with_key`] adds it; `FlagCache` does).
/// Other errors (`anyhow::Error`, `String`, any `std` error) convert with
/// `.map_err(Box::from)?`, or go through [`Error::loader`].
impl From<Box<dyn std::error::Error + Send + Sync + 'static>> for Error {
    fn from(source: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        Error::Loader {
            key: String::new(),
            source: Arc::from(source),
        }
    }
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

    /// A [`Error::Loader`] for `key`, from any error: a `std` error, a
    /// `Box<dyn Error + Send + Sync>`, an `anyhow::Error`, or a message (`&str`,
    /// `String`) — anything `Into<Box<dyn Error + Send + Sync>>`.
    pub fn loader(
        key: &crate::FlagKey,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Loader {
            key: key.to_string(),
            source: Arc::from(source.into()),
        }
    }

    /// Attaches `key` to the variants that carry one and have none yet.
    #[must_use]
    pub fn with_key(mut self, k: &crate::FlagKey) -> Self {
        match &mut self {
            Error::Corrupt { key, .. } | Error::Backend { key, .. } if key.is_none() => {
                *key = Some(k.to_string());
            }
            Error::Loader { key, .. } if key.is_empty() => *key = k.to_string(),
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
        // The source is kept, for downcasting.
        let Error::Backend { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        // Cloning shares the source.
        let again = err.clone();
        assert_eq!(again.to_string(), err.to_string());
        assert_eq!(
            Error::corrupt("truncated").with_key(&key).to_string(),
            "corrupt entry for checkout.v2: truncated"
        );
    }

    /// Every link of `err`'s source chain, as text.
    fn chain(err: &Error) -> Vec<String> {
        let mut links = vec![err.to_string()];
        let mut next = std::error::Error::source(err);
        while let Some(e) = next {
            links.push(e.to_string());
            next = e.source();
        }
        links
    }

    /// An error with a source of its own, whose text it does not repeat.
    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("handshake failed")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn no_link_of_the_chain_repeats_the_next() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let key = FlagKey::new("k").unwrap();
        for err in [
            Error::backend("redis", "put", true, Outer(io)),
            Error::loader(&key, Outer(std::io::Error::other("reset by peer"))),
        ] {
            let links = chain(&err);
            assert_eq!(links.len(), 2, "{links:?}");
            assert!(links[0].ends_with(": handshake failed"), "{links:?}");
            assert_eq!(links[1], "reset by peer");
        }
        let codec = Error::codec("bad JSON", std::io::Error::other("line 1"));
        assert_eq!(chain(&codec), ["codec error: bad JSON", "line 1"]);
    }

    #[test]
    fn a_loader_error_comes_from_any_boxable_error() {
        let key = FlagKey::new("k").unwrap();
        // A boxed error, a message, and (as an anyhow error would be) a boxed chain.
        let boxed: Box<dyn std::error::Error + Send + Sync> = "source down".into();
        assert_eq!(
            Error::loader(&key, boxed).to_string(),
            "loader failed for k: source down"
        );
        assert_eq!(
            Error::loader(&key, String::from("no row")).to_string(),
            "loader failed for k: no row"
        );
        let io = std::io::Error::other("refused");
        assert!(Error::loader(&key, io).is_transient());
        // `?` in a loader: a boxed error becomes a `Loader` error, keyed later.
        fn load() -> Result<u8> {
            let failed: std::result::Result<u8, Box<dyn std::error::Error + Send + Sync>> =
                Err(Box::new(Outer(std::io::Error::other("refused"))));
            Ok(failed?)
        }
        let err = load().unwrap_err();
        assert_eq!(err.to_string(), "loader failed: handshake failed");
        assert_eq!(
            err.with_key(&key).to_string(),
            "loader failed for k: handshake failed"
        );
    }
}
