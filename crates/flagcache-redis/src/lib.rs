#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod invalidator;
mod lock;
mod scripts;
mod store;

pub use invalidator::{RedisInvalidator, RedisInvalidatorBuilder};
pub use lock::RedisLock;
pub use store::{RedisStore, RedisStoreBuilder};

const BACKEND: &str = "redis";

/// `url` with its password replaced by `***`, for logs and `Debug`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_debug_output() {
        assert_eq!(
            super::redact("redis://:s3cret@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(super::redact("rediss://app:p@ss@h"), "rediss://app:***@h");
        assert_eq!(super::redact("redis://h:6379"), "redis://h:6379");
    }
}
