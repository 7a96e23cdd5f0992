//! [`ForeignMessages`]: what a subscriber does with a message on its channel that is
//! not an invalidation — another publisher's, on a shared channel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flagcache_core::{Codec, Error, ResyncReason, Signal};

use crate::BACKEND;

/// What a [`RedisInvalidator`](crate::RedisInvalidator)'s subscribers do with a
/// *foreign* message: one on the channel that does not present itself as an
/// invalidation — `product:123:updated` from another publisher sharing the channel.
///
/// A message is foreign when it is neither a heartbeat nor claims to be an event of
/// the channel's layout ([`Codec::claims_invalidation`]: the envelope's event magic; in
/// the JSON layout, an object with `flagKey`, `tag` or `all`). A message that claims to
/// be an invalidation but does not decode (a malformed key or version, say) is not
/// foreign: it may be an invalidation this replica failed to read, and it always
/// signals `Resync`, whatever the policy.
///
/// # Which to pick
/// - [`Resync`](ForeignMessages::Resync), the default, when the channel carries only
///   flag invalidations: there, an unknown message is most likely an event this
///   replica cannot read (a newer publisher, a misconfigured layout), and dropping the
///   whole L1 is the safe answer.
/// - [`Ignore`](ForeignMessages::Ignore) when the channel is shared with other
///   publishers (an existing `flag_updates` channel that also carries
///   `product:123:updated`): every such message would otherwise make every replica
///   drop its whole L1 and refill it from L2 at once. Nothing an invalidation needs is
///   lost: invalidations still claim to be invalidations, and this crate's own events
///   are numbered, so one lost in transit is still caught by the sequence gap or the
///   next heartbeat. Ignored messages are counted
///   ([`RedisInvalidator::foreign_messages_ignored`](crate::RedisInvalidator::foreign_messages_ignored),
///   and the `flagcache_foreign_messages_ignored_total{backend="redis"}` counter).
///
/// A channel of its own for flag invalidations needs neither.
///
/// ```no_run
/// # async fn demo() -> flagcache::Result<()> {
/// use flagcache::codec::JsonCodec;
/// use flagcache::redis::{ForeignMessages, RedisInvalidator};
///
/// let invalidator = RedisInvalidator::builder()
///     .url("redis://127.0.0.1:6379")
///     .channel("flag_updates_v1")
///     .codec(JsonCodec::new())
///     .foreign_messages(ForeignMessages::Ignore)
///     .build()
///     .await?;
/// # let _ = invalidator; Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForeignMessages {
    /// Signal `Resync` (every subscriber drops its whole L1): the default.
    #[default]
    Resync,
    /// Drop the message, and count it.
    Ignore,
}

/// The policy in force on one invalidator, with the count of messages it ignored
/// (shared by its subscriptions and clones).
#[derive(Debug, Clone, Default)]
pub(crate) struct ForeignFilter {
    policy: ForeignMessages,
    ignored: Arc<AtomicU64>,
}

impl ForeignFilter {
    pub(crate) fn new(policy: ForeignMessages) -> Self {
        ForeignFilter {
            policy,
            ignored: Arc::default(),
        }
    }

    pub(crate) fn policy(&self) -> ForeignMessages {
        self.policy
    }

    /// How many foreign messages were ignored.
    pub(crate) fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }

    /// The signal for a message that did not decode (`error`): `Resync`, unless it is
    /// foreign and the policy ignores those.
    pub(crate) fn undecodable(&self, codec: &Codec, bytes: &[u8], error: &Error) -> Option<Signal> {
        if self.policy == ForeignMessages::Ignore && !codec.claims_invalidation(bytes) {
            self.ignored.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("flagcache_foreign_messages_ignored_total", "backend" => BACKEND)
                .increment(1);
            tracing::debug!(len = bytes.len(), "foreign message on the channel ignored");
            return None;
        }
        tracing::warn!(%error, backend = BACKEND, "undecodable invalidation message");
        Some(Signal::Resync(ResyncReason::Undecodable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagcache_core::JsonCodec;

    fn signal(filter: &ForeignFilter, codec: &Codec, bytes: &[u8]) -> Option<Signal> {
        let error = codec.decode_invalidation(bytes).unwrap_err();
        filter.undecodable(codec, bytes, &error)
    }

    #[test]
    fn only_foreign_messages_are_ignored() {
        let json = Codec::from(JsonCodec::new());
        let envelope = Codec::default();
        let ignore = ForeignFilter::new(ForeignMessages::Ignore);
        let resync = ForeignFilter::default();
        let foreign: [&[u8]; 4] = [b"product:123:updated", br#"{"order": 7}"#, b"", b"\xff\x00"];
        for bytes in foreign {
            for codec in [&json, &envelope] {
                assert_eq!(signal(&ignore, codec, bytes), None, "{bytes:?}");
                assert!(matches!(
                    signal(&resync, codec, bytes),
                    Some(Signal::Resync(ResyncReason::Undecodable))
                ));
            }
        }
        assert_eq!(ignore.ignored(), 8);
        // Invalidations this replica cannot read resync under either policy.
        for (codec, bytes) in [
            (&json, &br#"{"flagKey": "not a key"}"#[..]),
            (&json, br#"{"flagKey": "k", "version": "v2"}"#),
            (&json, br#"{"all": "yes"}"#),
            (&envelope, b"\xf1\xa7\x01\x00"),
        ] {
            assert!(
                matches!(
                    signal(&ignore, codec, bytes),
                    Some(Signal::Resync(ResyncReason::Undecodable))
                ),
                "{bytes:?}"
            );
        }
        assert_eq!(ignore.ignored(), 8);
    }
}
