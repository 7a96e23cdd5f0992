//! What a cache reads from past L2: the [`Loader`] (the source of truth) and the
//! [`VersionSource`] (the version a key should have, for version-stamped reads).

use std::future::Future;

use async_trait::async_trait;

use crate::{FlagKey, Result, Version};

/// The source of truth: a database, a flag service, a control plane.
///
/// `load` returns the current value with the version the source assigned to it, or
/// `None` when the source has no such flag. Any async closure
/// `Fn(FlagKey) -> impl Future<Output = Result<Option<(T, Version)>>>` is a loader.
///
/// ```
/// use flagcache::{FlagKey, Loader, Result, Version};
///
/// async fn from_control_plane(key: FlagKey) -> Result<Option<(bool, Version)>> {
///     Ok(Some((key.as_str() == "beta", Version::new(1))))
/// }
/// fn is_loader<L: Loader<bool>>(_: &L) {}
/// is_loader(&from_control_plane);
/// ```
///
/// Errors should be [`Error::Loader`](crate::Error::Loader) (see
/// [`Error::loader`](crate::Error::loader)); they are transient, so the cache serves a
/// last known value instead when it has one.
#[async_trait]
pub trait Loader<T>: Send + Sync + 'static {
    /// Loads `key` from the source of truth.
    ///
    /// # Errors
    /// Whatever the source reports; the cache shares it with every waiter and does not
    /// cache it.
    async fn load(&self, key: &FlagKey) -> Result<Option<(T, Version)>>;
}

#[async_trait]
impl<T, F, Fut> Loader<T> for F
where
    T: Send + 'static,
    F: Fn(FlagKey) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<(T, Version)>>> + Send + 'static,
{
    async fn load(&self, key: &FlagKey) -> Result<Option<(T, Version)>> {
        (self)(key.clone()).await
    }
}

/// Where [version-stamped reads](crate::FlagCacheBuilder::version_source) get the version a
/// key should have: a cheap metadata lookup (a version table, a control-plane
/// endpoint) that costs less than loading the value.
#[async_trait]
pub trait VersionSource: Send + Sync + 'static {
    /// The current version of `key`, or `None` if unknown (the read is then unchecked).
    ///
    /// # Errors
    /// Any; the read then proceeds unchecked.
    async fn current_version(&self, key: &FlagKey) -> Result<Option<Version>>;
}
