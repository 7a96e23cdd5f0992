//! Plain data types shared by every crate.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The version of a flag configuration, as assigned by the source of truth.
///
/// Versions are totally ordered and only the source assigns them: a cache never invents
/// one. Every write to a store is guarded by it (an older version never replaces a newer
/// one), so the order must be meaningful across the whole fleet and must never go
/// backwards.
///
/// **A source that can roll back** — a counter reset by a redeploy, a restored backup —
/// must fold an epoch into the high bits (see [`Version::from_epoch`]) or use a change
/// timestamp (milliseconds since the Unix epoch fit comfortably). Otherwise the version
/// guard will refuse every write after the rollback until the old entries expire.
///
/// ```
/// use flagcache::Version;
///
/// assert!(Version::new(7) > Version::new(6));
/// // Epoch 2, counter 1 sorts after epoch 1, counter 1_000_000.
/// let before = Version::from_epoch(1, 1_000_000).unwrap();
/// let after = Version::from_epoch(2, 1).unwrap();
/// assert!(after > before);
/// assert_eq!(after.epoch(), 2);
/// assert_eq!(after.counter(), 1);
/// ```
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Version(pub u64);

impl Version {
    /// The number of low bits [`Version::from_epoch`] gives to the counter.
    pub const COUNTER_BITS: u32 = 48;

    /// A version from its raw value.
    pub const fn new(v: u64) -> Self {
        Version(v)
    }

    /// A version whose high 16 bits are `epoch` and low 48 bits are `counter`, so that
    /// every version of a later epoch sorts after every version of an earlier one.
    /// `None` when `counter` does not fit in 48 bits.
    pub const fn from_epoch(epoch: u16, counter: u64) -> Option<Self> {
        if counter >> Self::COUNTER_BITS != 0 {
            return None;
        }
        Some(Version(((epoch as u64) << Self::COUNTER_BITS) | counter))
    }

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The high 16 bits (meaningful for versions built by [`Version::from_epoch`]).
    pub const fn epoch(self) -> u16 {
        (self.0 >> Self::COUNTER_BITS) as u16
    }

    /// The low 48 bits (meaningful for versions built by [`Version::from_epoch`]).
    pub const fn counter(self) -> u64 {
        self.0 & ((1 << Self::COUNTER_BITS) - 1)
    }

    /// The version as 8 big-endian bytes: the form stored in the envelope header, which
    /// compares bytewise in the same order as the numbers.
    pub const fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl From<u64> for Version {
    fn from(v: u64) -> Self {
        Version(v)
    }
}

/// One versioned value as a store holds it.
///
/// `payload` is the value serialized by the store's [`Codec`](crate::Codec)
/// (uncompressed: compression is the envelope's business).
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// The source's version of this value.
    pub version: Version,
    /// When the source produced it, in milliseconds since the Unix epoch (source clock).
    pub stamp_ms: u64,
    /// The serialized value.
    pub payload: Bytes,
}

impl Entry {
    /// An entry stamped with the current wall-clock time.
    pub fn new(version: Version, payload: impl Into<Bytes>) -> Self {
        Entry {
            version,
            stamp_ms: now_ms(),
            payload: payload.into(),
        }
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("version", &self.version)
            .field("stamp_ms", &self.stamp_ms)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The answer of [`FlagStore::get_checked`](crate::FlagStore::get_checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The stored version equals the expected one.
    Hit(Entry),
    /// A value is stored but its version differs from the expected one — older, or
    /// newer (after a rollback, or when the caller's expectation is itself stale).
    Stale {
        /// The version that is stored.
        current: Version,
    },
    /// Nothing is stored under the key.
    Miss,
}

/// The answer of a version-guarded [`FlagStore::put`](crate::FlagStore::put).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The entry was written: the key was absent, or held a lower version.
    Stored,
    /// Nothing was written: the key holds `current`, which is equal to or higher than the
    /// version offered.
    Superseded {
        /// The version that stays stored.
        current: Version,
    },
    /// Nothing was written: the key was fenced ([`FlagStore::fence`](crate::FlagStore::fence))
    /// after the fill that offers this entry read it. The fill began before a versionless
    /// invalidation, so its value may be older than the source's: it answers the read that
    /// loaded it, and is neither stored nor installed anywhere. Only
    /// [`FlagStore::put_fill`](crate::FlagStore::put_fill) answers this.
    Fenced,
}

/// The fence a fill read with its L2 miss: [`FlagStore::put_fill`](crate::FlagStore::put_fill)
/// writes only while the key's fence is still the one read. Opaque: a store makes it from
/// what it holds beside the key ([`FillToken::NONE`] when no fence is there).
///
/// A versionless invalidation ([`FlagStore::fence`](crate::FlagStore::fence)) leaves a new
/// fence, so every fill that read before it — in any process, whether or not that process
/// has heard the invalidation — is refused its write (the memcache lease rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FillToken(pub u64);

impl FillToken {
    /// No fence at the key.
    pub const NONE: FillToken = FillToken(0);

    /// A fresh random fence (never [`FillToken::NONE`]).
    pub fn random() -> Self {
        FillToken(fastrand::u64(1..))
    }

    /// Whether a fence was read.
    pub fn is_some(self) -> bool {
        self != FillToken::NONE
    }

    /// The fence as stores write it: decimal digits (empty for none).
    pub fn to_text(self) -> String {
        if self.is_some() {
            self.0.to_string()
        } else {
            String::new()
        }
    }

    /// Reads a fence written by [`FillToken::to_text`]. Bytes that are not one read as a
    /// fence no fill holds (`u64::MAX`): a fill that read them is refused until they expire,
    /// never let through.
    pub fn from_text(bytes: &[u8]) -> Self {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|&n| n != 0)
            .map_or(FillToken(u64::MAX), FillToken)
    }
}

/// What a fill's L2 read found: the entry (or a miss) and the key's fence, read together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FillRead {
    /// The entry, or `None` for a miss.
    pub entry: Option<Entry>,
    /// The fence beside the key when it was read.
    pub token: FillToken,
}

/// A store's limits, as data: the conformance suite reads them to choose the tests
/// that apply (values at the size limit, TTLs at the store's granularity).
///
/// What every store must do — an atomic version-guarded `put`, batched and checked
/// reads — is the [`FlagStore`](crate::FlagStore) contract, not a capability. How reads
/// batch is [`FlagStore::read_group`](crate::FlagStore::read_group).
///
/// Build it with `..Default::default()` so that new fields do not break adapters:
///
/// ```
/// use flagcache::store::Capabilities;
/// let caps = Capabilities { max_value_size: Some(1 << 20), ..Default::default() };
/// assert_eq!(caps.ttl_resolution, std::time::Duration::from_millis(1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The largest encoded entry the store accepts, when it has a limit.
    pub max_value_size: Option<usize>,
    /// The granularity of TTLs: a TTL is rounded up to a multiple of it.
    pub ttl_resolution: Duration,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_value_size: None,
            ttl_resolution: Duration::from_millis(1),
        }
    }
}

/// The identity of one cache node (one replica's invalidator), carried in every event it
/// publishes so that receivers can recognise their own events and detect gaps in each
/// publisher's sequence.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The origin of events published by foreign publishers that carry no node id
    /// (another language's service writing the JSON layout, `redis-cli`).
    pub const UNKNOWN: NodeId = NodeId(0);

    /// A fresh random node id (never [`NodeId::UNKNOWN`]).
    pub fn random() -> Self {
        loop {
            let id = fastrand::u64(..);
            if id != 0 {
                return NodeId(id);
            }
        }
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node:{:016x}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Milliseconds since the Unix epoch by the local wall clock (0 if the clock is before
/// 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks a write's TTL and returns it in whole milliseconds, rounded up to
/// `resolution`.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a zero TTL: every write
/// carries a TTL, and zero would mean "never expires" to some servers.
pub fn ttl_millis(ttl: Duration, resolution: Duration) -> crate::Result<u64> {
    if ttl.is_zero() {
        return Err(crate::Error::InvalidArgument(
            "a write's TTL must be greater than zero".into(),
        ));
    }
    let res = resolution.as_millis().max(1);
    let ms = ttl.as_nanos().div_ceil(1_000_000).div_ceil(res) * res;
    Ok(u64::try_from(ms).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ttl_rounding_and_zero() {
        let ms = Duration::from_millis(1);
        assert!(ttl_millis(Duration::ZERO, ms).is_err());
        assert_eq!(ttl_millis(Duration::from_micros(1), ms).unwrap(), 1);
        assert_eq!(ttl_millis(Duration::from_millis(1500), ms).unwrap(), 1500);
        let s = Duration::from_secs(1);
        assert_eq!(ttl_millis(Duration::from_millis(1500), s).unwrap(), 2000);
        assert_eq!(ttl_millis(Duration::from_millis(1), s).unwrap(), 1000);
    }

    #[test]
    fn epoch_overflow_is_refused() {
        assert!(Version::from_epoch(1, 1 << 48).is_none());
        assert_eq!(
            Version::from_epoch(u16::MAX, (1 << 48) - 1),
            Some(Version(u64::MAX))
        );
    }

    proptest! {
        #[test]
        fn big_endian_bytes_sort_like_numbers(a: u64, b: u64) {
            let (va, vb) = (Version(a), Version(b));
            prop_assert_eq!(va.cmp(&vb), va.to_be_bytes().cmp(&vb.to_be_bytes()));
        }
    }
}
