//! Validated flag keys.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use crate::{Error, Result};

/// A validated flag key.
///
/// A key is non-empty, at most [`FlagKey::MAX_LEN`] bytes of UTF-8, and contains no
/// whitespace and no control characters — so a key can never smuggle `\r\n` into a text
/// protocol such as memcached's. Cloning is cheap (the text is shared).
///
/// ```
/// use flagcache::{Error, FlagKey};
///
/// let key = FlagKey::new("checkout.new-flow")?;
/// assert_eq!(key.as_str(), "checkout.new-flow");
///
/// assert!(matches!(FlagKey::new("two words"), Err(Error::InvalidKey { .. })));
/// assert!(matches!(FlagKey::new("evil\r\nflush_all"), Err(Error::InvalidKey { .. })));
/// # Ok::<(), Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlagKey(Arc<str>);

impl FlagKey {
    /// The longest key accepted, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Validates `key`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] when the key is empty, longer than [`FlagKey::MAX_LEN`]
    /// bytes, or contains whitespace or a control character.
    pub fn new(key: impl AsRef<str>) -> Result<Self> {
        let key = key.as_ref();
        Self::check(key)?;
        Ok(FlagKey(Arc::from(key)))
    }

    fn check(key: &str) -> Result<()> {
        let reason = if key.is_empty() {
            "empty"
        } else if key.len() > Self::MAX_LEN {
            "longer than 200 bytes"
        } else if key.chars().any(char::is_whitespace) {
            "contains whitespace"
        } else if key.chars().any(char::is_control) {
            "contains a control character"
        } else {
            return Ok(());
        };
        Err(Error::InvalidKey {
            key: key.chars().take(64).collect(),
            reason,
        })
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FlagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FlagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for FlagKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for FlagKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for FlagKey {
    type Error = Error;
    fn try_from(value: &str) -> Result<Self> {
        FlagKey::new(value)
    }
}

impl TryFrom<String> for FlagKey {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::check(&value)?;
        Ok(FlagKey(Arc::from(value)))
    }
}

impl std::str::FromStr for FlagKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        FlagKey::new(s)
    }
}

impl serde::Serialize for FlagKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for FlagKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        FlagKey::try_from(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_what_a_text_protocol_cannot_carry() {
        for bad in [
            "",
            " ",
            "a b",
            "tab\tkey",
            "line\nfeed",
            "crlf\r\nset x 0 0 1",
            "nul\0byte",
            "del\u{7f}",
            "nbsp\u{a0}key",
            "ideographic\u{3000}space",
        ] {
            let err = FlagKey::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidKey { .. }), "{bad:?}: {err}");
        }
        assert!(FlagKey::new("a".repeat(201)).is_err());
        assert!(FlagKey::new("a".repeat(200)).is_ok());
        // 67 three-byte characters = 201 bytes: the limit is bytes, not characters.
        assert!(FlagKey::new("€".repeat(67)).is_err());
        assert!(FlagKey::new("€".repeat(66)).is_ok());
    }

    #[test]
    fn accepts_ordinary_keys() {
        for good in ["a", "checkout.v2", "team/flag-1", "flag:{x}", "café"] {
            assert_eq!(FlagKey::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn deserialize_validates() {
        let ok: FlagKey = serde_json::from_str("\"k1\"").unwrap();
        assert_eq!(ok.as_str(), "k1");
        assert!(serde_json::from_str::<FlagKey>("\"a b\"").is_err());
    }

    proptest! {
        #[test]
        fn valid_keys_never_contain_protocol_breakers(s in "\\PC{0,220}") {
            if let Ok(k) = FlagKey::new(&s) {
                prop_assert!(!k.as_str().is_empty() && k.as_str().len() <= 200);
                prop_assert!(!k.as_str().bytes().any(|b| b == b'\r' || b == b'\n' || b == b' ' || b < 0x20));
            }
        }
    }
}
