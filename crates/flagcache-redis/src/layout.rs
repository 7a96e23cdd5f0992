//! [`KeyLayout`]: where a flag lives in Redis — a template over the namespace and the
//! flag key — and where its companions (stampede lock, absence marker, fence) live: in
//! the flag's cluster slot, so that one script can touch a flag and its companions on a
//! Redis Cluster.

use std::fmt;

use flagcache_core::{Error, FlagKey, Result};

/// The forms a template may take, for errors.
const FORMS: &str = "a template with the flag key once (`{key}`, or `{{key}}` for the key \
                     in a hash tag) and the namespace at most once (`{ns}` or `{{ns}}`), \
                     nothing else in braces: `{ns}:{{key}}` (the default), `{ns}:{key}`, \
                     `{{ns}}:{key}`";

/// The key layout of a Redis store: a template in which `{ns}` is the namespace and
/// `{key}` the flag key; doubled braces, `{{ns}}` or `{{key}}`, put it in braces (a Redis
/// Cluster hash tag). No other braces are allowed.
///
/// | template | a flag's key | on a Redis Cluster |
/// |---|---|---|
/// | `{ns}:{{key}}` (default) | `flags:{checkout}` | the flag key is the hash tag: flags spread over the slots |
/// | `{ns}:{key}` | `flags:checkout` | each key hashes whole: flags spread over the slots |
/// | `{{ns}}:{key}` | `{flags}:checkout` | the namespace is the hash tag: **every flag in one slot**, on one node |
///
/// `{ns}:{key}` is what services in other languages commonly write
/// (`flags:<flagKey>`), `{{ns}}:{key}` what services that batch all flags on a cluster
/// write (`{flags}:<flagKey>`).
///
/// A flag's companions share its slot: with the flag's key hashed by `part` (its hash
/// tag, or the whole key when it has none), they are `<ns>:lock:{part}`,
/// `<ns>:absent:{part}` and `<ns>:fence:{part}` — with `:<flag's Redis key>` appended
/// when `part` is shared by other flags (the `{{ns}}` layout). A flag whose key hashes
/// whole and contains `}` cannot be wrapped in a hash tag: it has no marker and no
/// fence (its invalidation only deletes).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyLayout {
    template: String,
    namespace: String,
    /// The rendered template before and after the flag key.
    prefix: String,
    suffix: String,
}

impl fmt::Debug for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLayout")
            .field("template", &self.template)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl KeyLayout {
    /// The default template: the flag key is the cluster hash tag.
    pub const DEFAULT: &'static str = "{ns}:{{key}}";

    /// Parses `template` for `namespace`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the template and the accepted forms: the key
    /// missing or repeated, the namespace repeated, an unknown placeholder, or a lone
    /// brace.
    pub fn new(template: &str, namespace: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidArgument(
                format!("Redis key layout {template:?}: {why}; expected {FORMS}").into(),
            )
        };
        let (mut prefix, mut suffix) = (String::new(), String::new());
        let (mut keys, mut namespaces) = (0, 0);
        let mut rest = template;
        while let Some(c) = rest.chars().next() {
            let out = if keys == 0 { &mut prefix } else { &mut suffix };
            if let Some(r) = rest.strip_prefix("{{key}}") {
                out.push('{');
                keys += 1;
                suffix.push('}');
                rest = r;
            } else if let Some(r) = rest.strip_prefix("{key}") {
                keys += 1;
                rest = r;
            } else if let Some(r) = rest.strip_prefix("{{ns}}") {
                namespaces += 1;
                out.push('{');
                out.push_str(namespace);
                out.push('}');
                rest = r;
            } else if let Some(r) = rest.strip_prefix("{ns}") {
                namespaces += 1;
                out.push_str(namespace);
                rest = r;
            } else if c == '{' || c == '}' {
                return Err(bad("an unknown placeholder or a lone brace"));
            } else {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        match (keys, namespaces) {
            (0, _) => Err(bad("no `{key}`")),
            (1, 0 | 1) => Ok(KeyLayout {
                template: template.to_string(),
                namespace: namespace.to_string(),
                prefix,
                suffix,
            }),
            (1, _) => Err(bad("`{ns}` more than once")),
            _ => Err(bad("`{key}` more than once")),
        }
    }

    /// The template.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// The rendered template before the flag key.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The rendered template after the flag key.
    pub(crate) fn suffix(&self) -> &str {
        &self.suffix
    }

    /// A flag's Redis key.
    pub fn key(&self, key: &FlagKey) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.as_str().len() + 1);
        k.push_str(&self.prefix);
        k.push_str(key.as_str());
        k.push_str(&self.suffix);
        k
    }

    /// The flag key of a Redis key in this layout, if it is one.
    pub fn flag_key(&self, redis_key: &str) -> Option<FlagKey> {
        let inner = redis_key
            .strip_prefix(&self.prefix)?
            .strip_suffix(&self.suffix)?;
        FlagKey::new(inner).ok()
    }

    /// The key of a flag's companion `kind` (`lock`, `absent`, `fence`), in the flag's
    /// cluster slot; `None` when no key can share that slot (see the type's docs).
    pub(crate) fn companion(&self, kind: &str, key: &FlagKey) -> Option<String> {
        let entry = self.key(key);
        let part = hashed_part(&entry);
        if part.contains('}') {
            return None;
        }
        let mut k = format!("{}:{kind}:{{{part}}}", self.namespace);
        if part != key.as_str() && part != entry {
            // Other flags hash by the same part: the flag's key keeps this one apart.
            k.push(':');
            k.push_str(&entry);
        }
        Some(k)
    }
}

/// What Redis Cluster hashes of `key`: the content of its first `{…}` when that is not
/// empty, else the whole key.
fn hashed_part(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(s: &str) -> FlagKey {
        FlagKey::new(s).unwrap()
    }

    #[test]
    fn templates_render_keys_and_companions_in_the_flags_slot() {
        let default = KeyLayout::new(KeyLayout::DEFAULT, "flags").unwrap();
        assert_eq!(default.key(&key("checkout")), "flags:{checkout}");
        assert_eq!(
            default.companion("lock", &key("checkout")).unwrap(),
            "flags:lock:{checkout}"
        );
        let plain = KeyLayout::new("{ns}:{key}", "flags").unwrap();
        assert_eq!(plain.key(&key("checkout")), "flags:checkout");
        assert_eq!(
            plain.companion("fence", &key("checkout")).unwrap(),
            "flags:fence:{flags:checkout}"
        );
        let one_slot = KeyLayout::new("{{ns}}:{key}", "flags").unwrap();
        assert_eq!(one_slot.key(&key("checkout")), "{flags}:checkout");
        assert_eq!(
            one_slot.companion("absent", &key("checkout")).unwrap(),
            "flags:absent:{flags}:{flags}:checkout"
        );
        for layout in [&default, &plain, &one_slot] {
            for k in ["checkout", "a{b}c", "x}y", "{z"] {
                let entry = layout.key(&key(k));
                assert_eq!(layout.flag_key(&entry), Some(key(k)), "{entry}");
                if let Some(c) = layout.companion("lock", &key(k)) {
                    assert_eq!(hashed_part(&c), hashed_part(&entry), "{c} vs {entry}");
                }
            }
        }
        // A default-layout key beginning with `}` has an empty hash tag: no companion.
        assert_eq!(default.companion("fence", &key("}x")), None);
    }

    #[test]
    fn bad_templates_are_refused_with_the_accepted_forms() {
        for bad in [
            "{ns}:",
            "{key}{key}",
            "{ns}{ns}{key}",
            "{foo}:{key}",
            "{ns}:{key",
            "a}{key}",
        ] {
            let e = KeyLayout::new(bad, "flags").unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("{ns}:{{key}}"), "{bad}: {e}");
        }
    }
}
