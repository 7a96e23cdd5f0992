//! The version-guarded write of [`RedisStore`]: the `put` script (with a fill's fence
//! compared in the same step), and the client's judgement of what the script cannot
//! read — an entry whose checksum fails, gzip'd JSON — with a compare-and-delete of
//! exactly the bytes it judged unreadable.

use std::time::Duration;

use bytes::Bytes;
use flagcache_core::{ttl_millis, Entry, Error, FillToken, FlagKey, PutOutcome, Result, Version};
use redis::Value;

use super::RedisStore;
use crate::BACKEND;

impl RedisStore {
    /// One run of the `put` script: writes `bytes` unless the key holds `version` or
    /// higher in an entry that passes the script's checks, or gzip'd JSON (which the
    /// script cannot read: [`Scripted::Opaque`]) — or, for a fill's write (`fence`
    /// given), unless the key's fence is no longer the one the fill read.
    async fn put_script(
        &self,
        key: &FlagKey,
        bytes: &[u8],
        version: Version,
        ttl_ms: u64,
        fence: Option<&(String, FillToken)>,
    ) -> Result<Scripted> {
        let reply = self
            .run_script("put", &self.inner.put, key, |inv| {
                inv.arg(bytes).arg(self.version_arg(version)).arg(ttl_ms);
                if let Some((fence_key, token)) = fence {
                    inv.key(fence_key).arg(token.to_text());
                }
            })
            .await?;
        let done = |o| Ok(Scripted::Done(o));
        match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(1)] => done(PutOutcome::Stored),
                [Value::Int(2)] => done(PutOutcome::Fenced),
                [Value::Int(0), v] => done(PutOutcome::Superseded {
                    current: self.version_from(v)?,
                }),
                [Value::Int(3)] => Ok(Scripted::Opaque),
                other => Err(Error::corrupt(format!("unexpected put reply {other:?}"))),
            },
            other => Err(Error::corrupt(format!("unexpected put reply {other:?}"))),
        }
    }

    /// What `put` answers when the script found an equal or higher version at the key,
    /// or gzip'd JSON it cannot read. The script cannot tell every unreadable entry (the
    /// checksum, decompression and the JSON fields it does not read are the client's to
    /// check), nor read a gzip'd JSON entry's version, so the client reads the stored
    /// bytes: a readable entry at `version` or higher is the answer; bytes a reader
    /// would reject, or an older entry, are deleted — exactly those bytes, so a write
    /// that landed since is kept — and the script runs again. A few rounds at most: a
    /// key rewritten with gzip'd JSON faster than that is a transient error.
    async fn put_over_unreadable(
        &self,
        key: &FlagKey,
        bytes: &[u8],
        version: Version,
        ttl_ms: u64,
        fence: Option<&(String, FillToken)>,
    ) -> Result<PutOutcome> {
        for _ in 0..3 {
            let held = self.get_bytes("put", key).await?;
            if let Some(held) = held {
                match self.inner.codec.decode_entry(Bytes::from(held.clone())) {
                    Ok(e) if e.version >= version => {
                        return Ok(PutOutcome::Superseded { current: e.version })
                    }
                    found => {
                        if let Err(e) = found {
                            tracing::debug!(%key, error = %e, "put over an unreadable entry");
                        }
                        let mut inv = self.inner.delete_if_same.prepare_invoke();
                        inv.key(self.redis_key(key)).arg(held);
                        let _: Value = self
                            .inner
                            .connection
                            .script("put", inv)
                            .await
                            .map_err(|e| e.with_key(key))?;
                    }
                }
            }
            if let Scripted::Done(outcome) =
                self.put_script(key, bytes, version, ttl_ms, fence).await?
            {
                return Ok(outcome);
            }
        }
        Err(Error::backend(
            BACKEND,
            "put",
            true,
            std::io::Error::other("the key kept being rewritten with gzip'd JSON"),
        )
        .with_key(key))
    }

    /// [`FlagStore::put`] and [`FlagStore::put_fill`]: the `put` script, and when it
    /// answers Superseded, the client's check of the bytes that guard.
    pub(super) async fn put_guarded(
        &self,
        key: &FlagKey,
        entry: &Entry,
        ttl: Duration,
        fence: Option<(String, FillToken)>,
    ) -> Result<PutOutcome> {
        let ttl = ttl_millis(ttl, Duration::from_millis(1))?;
        let bytes = self
            .inner
            .codec
            .encode_entry(entry)
            .map_err(|e| e.with_key(key))?;
        if bytes.len() > self.inner.max_value_size {
            return Err(Error::ValueTooLarge {
                key: key.to_string(),
                size: bytes.len(),
                limit: self.inner.max_value_size,
                backend: BACKEND,
            });
        }
        let fence = fence.as_ref();
        match self
            .put_script(key, &bytes, entry.version, ttl, fence)
            .await?
        {
            Scripted::Done(PutOutcome::Superseded { .. }) | Scripted::Opaque => {
                self.put_over_unreadable(key, &bytes, entry.version, ttl, fence)
                    .await
            }
            Scripted::Done(outcome) => Ok(outcome),
        }
    }
}

/// What one run of the `put` script answers.
enum Scripted {
    /// The outcome, as the script decided it.
    Done(PutOutcome),
    /// The key holds gzip'd JSON, whose version the script cannot read: nothing
    /// changed, and the client judges.
    Opaque,
}
