//! The adapter traits: [`FlagStore`] (a tier that holds entries) and [`Invalidator`]
//! (a channel of invalidation events).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    BoxFuture, Capabilities, Checked, Codec, Entry, FillRead, FillToken, FlagKey, Invalidation,
    NodeId, PutOutcome, Result, Subscription, Version, DEFAULT_CODEC,
};

/// A store of versioned entries: the shared tier (L2) or process memory.
///
/// Adapters implement [`get`](FlagStore::get), [`put`](FlagStore::put),
/// [`delete`](FlagStore::delete) and [`capabilities`](FlagStore::capabilities); the
/// batch read ([`get_each`](FlagStore::get_each)) and the checked read have correct
/// default implementations that an adapter overrides when its backend can do them in
/// one round trip. Conveniences built on these (`get_many`, typed reads and writes)
/// live on [`FlagStoreExt`].
///
/// # The contract
/// The conformance suite (`flagcache_core::conformance`, feature `conformance`) checks
/// every point below; an adapter that passes it can back a `FlagCache`.
/// - `put` is **version-guarded** and atomic per key: it writes when the key is absent or
///   holds a lower version, and otherwise returns [`PutOutcome::Superseded`] and changes
///   nothing. N concurrent writers with distinct versions leave the highest.
/// - Every write carries a TTL; a zero TTL is refused with
///   [`Error::InvalidArgument`](crate::Error::InvalidArgument).
/// - `get_checked(key, expected)` is [`Checked::Hit`] only when the stored version equals
///   `expected`; older *or newer* is [`Checked::Stale`].
/// - A [`fence`](FlagStore::fence) refuses every [`put_fill`](FlagStore::put_fill) whose
///   token was read (with [`get_each_for_fill`](FlagStore::get_each_for_fill)) before it,
///   with [`PutOutcome::Fenced`], until the fence expires; a fill that read the new fence
///   writes, and so does a versioned `put`.
/// - Stored bytes that do not decode are reported as
///   [`Error::Corrupt`](crate::Error::Corrupt) or as a miss — never a panic — and a
///   `put` over them succeeds.
#[async_trait]
pub trait FlagStore: Send + Sync {
    /// The backend's name, used in errors, logs and metrics (`"redis"`, `"memory"`…).
    fn name(&self) -> &'static str {
        "custom"
    }

    /// What this store can do.
    fn capabilities(&self) -> Capabilities;

    /// The layout this store writes. `FlagCache` serializes values with it, so a store
    /// in the JSON interop layout gets JSON payloads.
    fn codec(&self) -> &Codec {
        &DEFAULT_CODEC
    }

    /// Reads one entry.
    ///
    /// # Errors
    /// A backend error, a timeout, or [`Error::Corrupt`](crate::Error::Corrupt) for stored
    /// bytes that do not decode.
    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>>;

    /// Reads several entries and answers each key as [`FlagStore::get`] would: its
    /// entry, its miss, or its own error (one corrupt entry fails only its own key).
    /// One slot per requested key, in order.
    ///
    /// [`FlagCache`](crate::FlagCache) gathers the L2 reads of concurrent misses that
    /// share a [`read_group`](FlagStore::read_group) into one call of this, so an
    /// adapter that gives read groups answers it in one round trip. The default issues
    /// the gets concurrently.
    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        futures_util::future::join_all(keys.iter().map(|k| self.get(k))).await
    }

    /// The batch a read of `key` may join: keys of one group are read by one server in
    /// one round trip (and fail together when it is down), so
    /// [`FlagCache`](crate::FlagCache) batches concurrent reads within a group, never
    /// across. `None` — the default — means reads of `key` are never batched: right
    /// for a store in process memory, or one whose batches could span servers.
    fn read_group(&self, key: &FlagKey) -> Option<u64> {
        let _ = key;
        None
    }

    /// Reads one entry only if its version is exactly `expected`.
    ///
    /// # Errors
    /// As for [`FlagStore::get`].
    async fn get_checked(&self, key: &FlagKey, expected: Version) -> Result<Checked> {
        Ok(match self.get(key).await? {
            None => Checked::Miss,
            Some(e) if e.version == expected => Checked::Hit(e),
            Some(e) => Checked::Stale { current: e.version },
        })
    }

    /// Writes `entry` unless the key holds an equal or higher version; see the contract
    /// above.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a zero TTL,
    /// [`Error::ValueTooLarge`](crate::Error::ValueTooLarge) over the backend's limit, a
    /// codec error when the entry does not fit the store's layout, or a backend error.
    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome>;

    /// Removes a key. Removing an absent key is not an error.
    ///
    /// # Errors
    /// A backend error or a timeout.
    async fn delete(&self, key: &FlagKey) -> Result<()>;

    /// The batched read of a fill: as [`get_each`](FlagStore::get_each), and with each
    /// answer the key's fence, read before the fill's load starts. A fill hands the
    /// token to [`put_fill`](FlagStore::put_fill), so that a fence laid meanwhile
    /// refuses its write. A store may leave the token of a key that hit as
    /// [`FillToken::NONE`] (the Redis store does, to keep a hit one round trip): such a
    /// token only makes a later write stricter, refused while any fence is up.
    ///
    /// The default reads no fence ([`FillToken::NONE`]): right only for a store with
    /// no [`fence`](FlagStore::fence) of its own, which the conformance suite refuses.
    async fn get_each_for_fill(&self, keys: &[FlagKey]) -> Vec<Result<FillRead>> {
        self.get_each(keys)
            .await
            .into_iter()
            .map(|r| {
                r.map(|entry| FillRead {
                    entry,
                    token: FillToken::NONE,
                })
            })
            .collect()
    }

    /// One key's [`get_each_for_fill`](FlagStore::get_each_for_fill): the read of a
    /// fill on its own, the usual case. The default asks `get_each_for_fill` for the
    /// one key; an adapter overrides it where one key costs less than a batch of one
    /// (the conformance suite checks that both read the same).
    ///
    /// # Errors
    /// As `get_each_for_fill`'s answer for the key; a transient backend error when
    /// that call answers other than one slot.
    async fn get_for_fill(&self, key: &FlagKey) -> Result<FillRead> {
        let mut answers = self.get_each_for_fill(std::slice::from_ref(key)).await;
        let slots = answers.len();
        match answers.pop() {
            Some(answer) if slots == 1 => answer,
            _ => Err(crate::Error::backend(
                self.name(),
                "get",
                true,
                std::io::Error::other(format!(
                    "get_each_for_fill answered {slots} slots for one key"
                )),
            )),
        }
    }

    /// The key's fence now: the token for a fill that read an entry it then could not
    /// serve (a version source, a tag or an announced version said it is outdated), and
    /// will load and write instead. A store that leaves a hit's token
    /// [`FillToken::NONE`] in [`get_each_for_fill`](FlagStore::get_each_for_fill)
    /// implements it; the default asks `get_each_for_fill`.
    ///
    /// # Errors
    /// A backend error or a timeout.
    async fn fence_token(&self, key: &FlagKey) -> Result<FillToken> {
        match self
            .get_each_for_fill(std::slice::from_ref(key))
            .await
            .pop()
        {
            Some(read) => read.map(|r| r.token),
            None => Ok(FillToken::NONE),
        }
    }

    /// The write of a fill (a value loaded after an L2 miss): as [`put`](FlagStore::put),
    /// and only while the key's fence is still `token`, the one the fill read with its
    /// miss; otherwise [`PutOutcome::Fenced`] and nothing changes. Atomic with the write
    /// (or, where the backend cannot compare two items atomically, undone before it
    /// answers: see the adapter's docs). A fence that expired meanwhile no longer
    /// refuses anything.
    ///
    /// # Errors
    /// As for [`FlagStore::put`].
    async fn put_fill(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        token: FillToken,
    ) -> Result<PutOutcome> {
        let _ = token;
        self.put(key, entry, ttl).await
    }

    /// A versionless invalidation of `key` in this tier: lays a new fence beside the key
    /// for `ttl` — every [`put_fill`](FlagStore::put_fill) carrying a token read before
    /// it is refused until it expires, so `ttl` must cover the longest fill (the cache
    /// passes twice the loader timeout plus twice the L2 timeout and a second) — and then
    /// drops the entry, so that reads miss as after [`delete`](FlagStore::delete).
    ///
    /// With `keep_stale`, a backend with cross-process stale-while-revalidate
    /// (memcached's `md … I`) keeps the value marked stale for that long instead, so
    /// that its [`Coalescer`](crate::Coalescer) serves it while one process refreshes
    /// it; a `put` of the same version revalidates it. Other backends drop it.
    /// [`put`](FlagStore::put) (a versioned write) is not refused by fences.
    ///
    /// The default only deletes: it fences nothing, which the conformance suite refuses.
    ///
    /// # Errors
    /// A backend error or a timeout.
    async fn fence(
        &self,
        key: &FlagKey,
        ttl: Duration,
        keep_stale: Option<Duration>,
    ) -> Result<()> {
        let _ = (ttl, keep_stale);
        self.delete(key).await
    }
}

/// A channel of invalidation events between the nodes of a fleet.
///
/// `publish` stamps the event with this node's [`NodeId`], a per-node sequence number
/// (1, 2, 3…) and the send time. Every subscription receives every event published
/// after it was opened — this node's own included — in each publisher's order, and a
/// [`Signal::Resync`](crate::Signal::Resync) whenever it may have missed one.
#[async_trait]
pub trait Invalidator: Send + Sync {
    /// This node's identity, stamped on every event it publishes.
    fn node_id(&self) -> NodeId;

    /// How events reach this node, as its fleet presence reports it: `"pubsub"` when
    /// it subscribes to a pub/sub channel (which the server counts, and `flagcache
    /// doctor` compares with the live replicas), `"tracking"` for server-assisted
    /// invalidation alone, `"log"` for a polled log, `"memory"` in process. Default
    /// `"other"`: a custom invalidator the doctor does not count either way.
    fn transport(&self) -> &'static str {
        "other"
    }

    /// Sends an event to every subscriber.
    ///
    /// # Errors
    /// A backend error, a timeout, or [`Error::Closed`](crate::Error::Closed).
    async fn publish(&self, event: &Invalidation) -> Result<()>;

    /// Opens a subscription.
    ///
    /// # Errors
    /// A backend error or [`Error::Closed`](crate::Error::Closed).
    async fn subscribe(&self) -> Result<Subscription>;
}

/// Forwards both traits through a smart pointer, so `Arc<S>`, `Box<S>` and `&S` are
/// stores and invalidators whenever `S` is — including `S = dyn FlagStore`. One macro,
/// so the forwarding impls cannot drift apart.
macro_rules! forward_impls {
    ($($ptr:ty),+ $(,)?) => {$(
        // The async methods hand on the pointee's boxed future as it is: no second
        // box and no second state machine per call. A method with a default that is
        // not forwarded here would silently run the default instead of the pointee's
        // override: the lint makes that a compile error.
        #[deny(clippy::missing_trait_methods)]
        impl<T: FlagStore + ?Sized> FlagStore for $ptr {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            fn codec(&self) -> &Codec {
                (**self).codec()
            }
            fn get<'s, 'k, 'f>(&'s self, key: &'k FlagKey) -> BoxFuture<'f, Result<Option<Entry>>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).get(key)
            }
            fn get_each<'s, 'k, 'f>(
                &'s self,
                keys: &'k [FlagKey],
            ) -> BoxFuture<'f, Vec<Result<Option<Entry>>>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).get_each(keys)
            }
            fn read_group(&self, key: &FlagKey) -> Option<u64> {
                (**self).read_group(key)
            }
            fn get_checked<'s, 'k, 'f>(
                &'s self,
                key: &'k FlagKey,
                expected: Version,
            ) -> BoxFuture<'f, Result<Checked>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).get_checked(key, expected)
            }
            fn put<'s, 'k, 'e, 'f>(
                &'s self,
                key: &'k FlagKey,
                entry: &'e Entry,
                ttl: Duration,
            ) -> BoxFuture<'f, Result<PutOutcome>>
            where
                's: 'f,
                'k: 'f,
                'e: 'f,
                Self: 'f,
            {
                (**self).put(key, entry, ttl)
            }
            fn delete<'s, 'k, 'f>(&'s self, key: &'k FlagKey) -> BoxFuture<'f, Result<()>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).delete(key)
            }
            fn get_each_for_fill<'s, 'k, 'f>(
                &'s self,
                keys: &'k [FlagKey],
            ) -> BoxFuture<'f, Vec<Result<FillRead>>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).get_each_for_fill(keys)
            }
            fn get_for_fill<'s, 'k, 'f>(&'s self, key: &'k FlagKey) -> BoxFuture<'f, Result<FillRead>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).get_for_fill(key)
            }
            fn fence_token<'s, 'k, 'f>(&'s self, key: &'k FlagKey) -> BoxFuture<'f, Result<FillToken>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).fence_token(key)
            }
            fn put_fill<'s, 'k, 'e, 'f>(
                &'s self,
                key: &'k FlagKey,
                entry: &'e Entry,
                ttl: Duration,
                token: FillToken,
            ) -> BoxFuture<'f, Result<PutOutcome>>
            where
                's: 'f,
                'k: 'f,
                'e: 'f,
                Self: 'f,
            {
                (**self).put_fill(key, entry, ttl, token)
            }
            fn fence<'s, 'k, 'f>(
                &'s self,
                key: &'k FlagKey,
                ttl: Duration,
                keep_stale: Option<Duration>,
            ) -> BoxFuture<'f, Result<()>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).fence(key, ttl, keep_stale)
            }
        }

        #[deny(clippy::missing_trait_methods)]
        impl<T: Invalidator + ?Sized> Invalidator for $ptr {
            fn node_id(&self) -> NodeId {
                (**self).node_id()
            }
            fn transport(&self) -> &'static str {
                (**self).transport()
            }
            fn publish<'s, 'e, 'f>(&'s self, event: &'e Invalidation) -> BoxFuture<'f, Result<()>>
            where
                's: 'f,
                'e: 'f,
                Self: 'f,
            {
                (**self).publish(event)
            }
            fn subscribe<'s, 'f>(&'s self) -> BoxFuture<'f, Result<Subscription>>
            where
                's: 'f,
                Self: 'f,
            {
                (**self).subscribe()
            }
        }
    )+};
}

forward_impls!(Arc<T>, Box<T>, &T);

/// Conveniences over any [`FlagStore`]: a batch read with misses for corrupt entries,
/// and typed reads and writes that serialize with the store's own
/// [`codec`](FlagStore::codec).
///
/// ```
/// use std::time::Duration;
/// use flagcache::{FlagKey, PutOutcome, Version};
/// use flagcache::store::{FlagStore, FlagStoreExt};
///
/// async fn publish_rollout(store: &dyn FlagStore) -> flagcache::Result<()> {
///     let key = FlagKey::new("checkout")?;
///     let ttl = Duration::from_secs(60);
///     store.put_value(&key, &true, Version::new(2), ttl).await?;
///     // A slow replica's older write is refused.
///     let late = store.put_value(&key, &false, Version::new(1), ttl).await?;
///     assert_eq!(late, PutOutcome::Superseded { current: Version::new(2) });
///     assert_eq!(store.get_value::<bool>(&key).await?, Some((true, Version::new(2))));
///     Ok(())
/// }
/// ```
///
/// (`flagcache-memory`'s `MemoryStore` runs this very example.)
#[async_trait]
pub trait FlagStoreExt: FlagStore {
    /// Reads several entries in one batched read ([`FlagStore::get_each`]): one answer
    /// per requested key, in order. An entry that does not decode is its key's miss,
    /// and so is a key whose own read failed transiently while others were answered
    /// (one server of a ring down costs its own keys, not the batch).
    ///
    /// # Errors
    /// A permanent error other than [`Error::Corrupt`](crate::Error::Corrupt) (a
    /// refused request), or a transient one when no key was answered at all.
    async fn get_many(&self, keys: &[FlagKey]) -> Result<Vec<Option<Entry>>> {
        let each = self.get_each(keys).await;
        let refused = each.iter().find_map(|r| match r {
            Err(e) if !e.is_transient() && !matches!(e, crate::Error::Corrupt { .. }) => Some(e),
            _ => None,
        });
        if let Some(e) = refused {
            return Err(e.clone());
        }
        if let Some(Err(e)) = each.first() {
            if each
                .iter()
                .all(|r| r.as_ref().is_err_and(crate::Error::is_transient))
            {
                return Err(e.clone());
            }
        }
        Ok(each.into_iter().map(|r| r.ok().flatten()).collect())
    }

    /// Reads and deserializes a value with its version.
    ///
    /// # Errors
    /// As for [`FlagStore::get`], plus [`Error::Codec`](crate::Error::Codec) when the
    /// payload is not a `T`.
    async fn get_value<T: DeserializeOwned>(&self, key: &FlagKey) -> Result<Option<(T, Version)>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(e) => Ok(Some((self.codec().decode_value(&e.payload)?, e.version))),
        }
    }

    /// Serializes and writes a value under the version guard.
    ///
    /// # Errors
    /// As for [`FlagStore::put`], plus [`Error::Codec`](crate::Error::Codec) when the
    /// value cannot be serialized.
    async fn put_value<T: Serialize + Sync + ?Sized>(
        &self,
        key: &FlagKey,
        value: &T,
        version: Version,
        ttl: Duration,
    ) -> Result<PutOutcome> {
        let entry = Entry::new(version, self.codec().encode_value(value)?);
        self.put(key, &entry, ttl).await
    }
}

impl<S: FlagStore + ?Sized> FlagStoreExt for S {}

#[cfg(test)]
mod tests {
    use super::*;

    // Object safety is checked by the compiler, not hoped for.
    fn _store_is_object_safe(_: Box<dyn FlagStore>, _: Arc<dyn FlagStore>, _: &dyn FlagStore) {}
    fn _invalidator_is_object_safe(_: Box<dyn Invalidator>, _: Arc<dyn Invalidator>) {}
    fn _coalescer_is_object_safe(_: Box<dyn crate::Coalescer>) {}
    fn _wrappers_are_stores<S: FlagStore>(s: S) {
        fn is_store<T: FlagStore + ?Sized>(_: &T) {}
        is_store(&s);
        is_store(&&s);
        let boxed: Box<dyn FlagStore> = Box::new(s);
        is_store(&boxed);
        let arc: Arc<dyn FlagStore> = Arc::from(boxed);
        is_store(&arc);
    }
}
