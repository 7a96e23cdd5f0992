//! Leases on memcached: the fence beside each entry (see [`FlagStore::fence`]), laid
//! before the entry is dropped, and a fill's write checked against it before and after
//! — memcached cannot compare two items in one step.

use std::time::Duration;

use flagcache_core::{Entry, FillToken, FlagKey, FlagStore, PutOutcome, Result};

use super::MemcachedStore;
use crate::meta::{self, Route, WireKey};

impl MemcachedStore {
    /// The key of the fence beside `entry` (see [`FlagStore::fence`]):
    /// `<namespace>!fence:<entry's wire key>`, or a digest of it when that is too long
    /// for memcached; always plain ASCII. It lives on the entry's server: commands on it
    /// are routed by the entry's key.
    pub(crate) fn fence_wire(&self, entry: &WireKey) -> WireKey {
        let internal = self.internal_prefix();
        let text = format!("{internal}fence:{}", entry.text);
        if text.len() <= 250 && text.bytes().all(|b| b.is_ascii_graphic()) {
            return WireKey::plain(text);
        }
        let raw = entry.text.as_bytes();
        WireKey::plain(format!(
            "{internal}fence#{:016x}{:016x}",
            crate::ring::hash(raw),
            crate::ring::hash(&[raw, b"\x00fence"].concat()),
        ))
    }

    /// The fences of `keys[i]` for each `i` in `which` (keys a fill missed), read in
    /// one pipeline per server. A key whose fence cannot be read gets none: its write
    /// is then refused while any fence is up.
    pub(crate) async fn fence_tokens(
        &self,
        keys: &[FlagKey],
        which: &[usize],
    ) -> Vec<(usize, FillToken)> {
        if let [i] = which {
            // One key (a fill on its own): one `mg`, not a pipeline.
            let Some(Ok(wire)) = keys.get(*i).map(|k| self.wire_key(k)) else {
                return Vec::new();
            };
            return match self.fence_now(&wire).await {
                Ok(token) => vec![(*i, token)],
                Err(e) => {
                    tracing::debug!(error = %e, "fence unread: that fill writes only where none is up");
                    Vec::new()
                }
            };
        }
        let mut groups: std::collections::BTreeMap<usize, Vec<(usize, WireKey, String)>> =
            std::collections::BTreeMap::new();
        for &i in which {
            let Some(Ok(wire)) = keys.get(i).map(|k| self.wire_key(k)) else {
                continue;
            };
            let fence = self.fence_wire(&wire).text;
            let server = self.inner.meta.server_for(&wire);
            groups.entry(server).or_default().push((i, wire, fence));
        }
        let reads = groups.into_values().map(|group| async move {
            let Some((_, route, _)) = group.first() else {
                return Vec::new();
            };
            let batch = group.iter().map(|(_, _, f)| f.clone()).collect();
            let found = match self.inner.meta.get_multi("get", route, batch, false).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(error = %e, "fences unread: those fills write only where none is up");
                    return Vec::new();
                }
            };
            let by_key: std::collections::HashMap<Vec<u8>, Vec<u8>> = found
                .into_iter()
                .filter_map(|mut v| Some((v.key.take()?, v.data.unwrap_or_default())))
                .collect();
            group
                .iter()
                .map(|(i, _, f)| {
                    let token = by_key
                        .get(f.as_bytes())
                        .map_or(FillToken::NONE, |t| FillToken::from_text(t));
                    (*i, token)
                })
                .collect::<Vec<_>>()
        });
        futures_util::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The fence beside `entry` now, read on the entry's server.
    pub(super) async fn fence_now(&self, entry: &WireKey) -> Result<FillToken> {
        let fence = self.fence_wire(entry);
        let held = self.inner.meta.raw_get(Route::Key(entry), &fence).await?;
        Ok(held.map_or(FillToken::NONE, |t| FillToken::from_text(&t)))
    }

    /// Memcached cannot compare two items in one step, so the fence is compared
    /// before and after the version-guarded write: a fence already changed refuses it
    /// outright; one that changed while it was written (the fence goes in before the
    /// entry is dropped, so a write the second look misses is dropped with the entry)
    /// has the write taken back — deleted only if the key still holds it, by its CAS.
    pub(super) async fn put_fill_checked(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        token: FillToken,
    ) -> Result<PutOutcome> {
        let wire = self.wire_key(key)?;
        let changed = |now: FillToken| now.is_some() && now != token;
        if changed(self.fence_now(&wire).await.map_err(|e| e.with_key(key))?) {
            return Ok(PutOutcome::Fenced);
        }
        let outcome = self.put(key, entry, ttl).await?;
        if outcome != PutOutcome::Stored
            || !changed(self.fence_now(&wire).await.map_err(|e| e.with_key(key))?)
        {
            return Ok(outcome);
        }
        let held = self
            .inner
            .meta
            .get("put", &wire)
            .await
            .map_err(|e| e.with_key(key))?;
        if let Some(held) = held {
            let ours = held
                .data
                .as_deref()
                .and_then(|d| self.inner.codec.peek_version(d).ok())
                == Some(entry.version);
            if let (true, Some(cas)) = (ours, held.cas) {
                self.inner
                    .meta
                    .delete_with("put", &wire, vec![format!("C{cas}")])
                    .await
                    .map_err(|e| e.with_key(key))?;
            }
        }
        Ok(PutOutcome::Fenced)
    }

    /// The new fence first (`ms`, on the entry's server), then the entry dropped
    /// (`md`) — or with `keep_stale`, marked stale for that long (`md … I T…`), so that
    /// `MemcachedRecache` serves it while one process refreshes it. That order is what
    /// [`MemcachedStore::put_fill_checked`]'s second look relies on.
    pub(super) async fn lay_fence(
        &self,
        key: &FlagKey,
        ttl: Duration,
        keep_stale: Option<Duration>,
    ) -> Result<()> {
        let wire = self.wire_key(key)?;
        let fence = self.fence_wire(&wire);
        let token = FillToken::random().to_text().into_bytes();
        self.inner
            .meta
            .raw_set(Route::Key(&wire), &fence, token, meta::exptime(ttl)?)
            .await
            .map_err(|e| e.with_key(key))?;
        match keep_stale {
            Some(grace) => self
                .invalidate_in_place(&wire, Some(meta::exptime(grace)?))
                .await
                .map_err(|e| e.with_key(key)),
            None => self.delete(key).await,
        }
    }
}
