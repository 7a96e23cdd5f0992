//! Where and how to connect: the settings both builders share ([`Target`]), the builder
//! methods that fill them, and the redis-rs clients they describe.

use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::AsyncConnectionConfig;

use crate::tls;

/// Credentials and database for the data nodes found through Sentinel.
#[derive(Clone)]
pub(crate) struct NodeAuth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct Target {
    pub urls: Vec<String>,
    pub cluster: bool,
    /// With Sentinel: `urls` are the sentinels', and this is the monitored service.
    pub sentinel_service: Option<String>,
    /// A PEM root certificate to trust for `rediss://` instead of the system's.
    pub root_cert: Option<Vec<u8>>,
    /// With Sentinel: how to log in to the data nodes (the sentinels' own credentials
    /// come from their URLs).
    pub node_auth: Option<NodeAuth>,
    pub connection_timeout: Duration,
    pub response_timeout: Duration,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field("cluster", &self.cluster)
            .field("sentinel_service", &self.sentinel_service)
            .field("node_auth", &self.node_auth.as_ref().map(|_| "***"))
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

impl Default for Target {
    fn default() -> Self {
        Target {
            urls: vec!["redis://127.0.0.1:6379".to_string()],
            cluster: false,
            sentinel_service: None,
            root_cert: None,
            node_auth: None,
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_millis(500),
        }
    }
}

impl Target {
    /// A client for one node, with TLS when the URL says `rediss://`.
    pub(crate) fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        tls::install_provider();
        match &self.root_cert {
            Some(pem) => redis::Client::build_with_tls(url, tls::trusting(pem)),
            None => redis::Client::open(url),
        }
    }

    /// A client for the Redis Cluster whose seeds are `urls`.
    pub(crate) fn cluster_client(&self) -> redis::RedisResult<redis::cluster::ClusterClient> {
        tls::install_provider();
        let mut builder = redis::cluster::ClusterClient::builder(self.urls.clone())
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.response_timeout);
        if let Some(pem) = &self.root_cert {
            builder = builder.certs(tls::trusting(pem));
        }
        builder.build()
    }

    /// The settings of a single connection attempt, bounded by the connection timeout.
    pub(crate) fn single_attempt(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
    }

    /// The settings of an auto-reconnecting connection to one node.
    pub(crate) fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1))
    }

    /// Where it connects, for errors and logs: the URL, the cluster's seeds, or the
    /// Sentinel service and its sentinels — passwords redacted, an empty URL as `""`.
    pub(crate) fn describe(&self) -> String {
        let urls = self
            .urls
            .iter()
            .map(|u| {
                if u.is_empty() {
                    "\"\"".to_string()
                } else {
                    redact(u)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        match &self.sentinel_service {
            Some(service) => format!("Sentinel service {service} via {urls}"),
            None if self.cluster => format!("Redis Cluster {urls}"),
            None => urls,
        }
    }

    /// The longest one call may take: connecting, then answering.
    pub(crate) fn call_limit(&self) -> Duration {
        self.connection_timeout + self.response_timeout
    }
}

/// The connection settings both builders share (each has a `target: Target`), written
/// once so that they cannot drift apart.
macro_rules! connection_methods {
    () => {
        /// One server: `redis://[user:password@]host[:port][/db]`, or `rediss://…` for
        /// TLS (default `redis://127.0.0.1:6379`).
        #[must_use]
        pub fn url(mut self, url: impl Into<String>) -> Self {
            self.target.urls = vec![url.into()];
            self.target.cluster = false;
            self.target.sentinel_service = None;
            self
        }

        /// A Redis Cluster, from any of its nodes (seed URLs).
        #[must_use]
        pub fn cluster<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> Self {
            self.target.urls = urls.into_iter().map(Into::into).collect();
            self.target.cluster = true;
            self.target.sentinel_service = None;
            self
        }

        /// The primary of `service`, found through these Redis Sentinels, and found
        /// again after a failover.
        #[must_use]
        pub fn sentinel<I: IntoIterator<Item = S>, S: Into<String>>(
            mut self,
            sentinel_urls: I,
            service: impl Into<String>,
        ) -> Self {
            self.target.urls = sentinel_urls.into_iter().map(Into::into).collect();
            self.target.cluster = false;
            self.target.sentinel_service = Some(service.into());
            self
        }

        /// With [`sentinel`](Self::sentinel): the ACL user, password and database of
        /// the data nodes (the sentinels' own credentials go in their URLs).
        #[must_use]
        pub fn sentinel_node_auth(
            mut self,
            username: Option<&str>,
            password: Option<&str>,
            db: i64,
        ) -> Self {
            self.target.node_auth = Some($crate::target::NodeAuth {
                username: username.map(str::to_string),
                password: password.map(str::to_string),
                db,
            });
            self
        }

        /// Trusts this PEM root certificate for `rediss://` URLs (default: the
        /// system's trust store).
        #[must_use]
        pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
            self.target.root_cert = Some(pem.into());
            self
        }

        /// How long to wait for a connection (default 2 s).
        #[must_use]
        pub fn connection_timeout(mut self, d: std::time::Duration) -> Self {
            self.target.connection_timeout = d;
            self
        }

        /// How long to wait for a reply (default 500 ms).
        #[must_use]
        pub fn response_timeout(mut self, d: std::time::Duration) -> Self {
            self.target.response_timeout = d;
            self
        }
    };
}
pub(crate) use connection_methods;

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

    #[test]
    fn a_target_is_described_without_its_passwords() {
        let mut target = super::Target {
            urls: vec!["redis://:pw@a:1".into(), "redis://u:pw@b:2".into()],
            ..super::Target::default()
        };
        assert_eq!(target.describe(), "redis://:***@a:1, redis://u:***@b:2");
        target.cluster = true;
        assert_eq!(
            target.describe(),
            "Redis Cluster redis://:***@a:1, redis://u:***@b:2"
        );
        target.sentinel_service = Some("mymaster".into());
        assert!(target
            .describe()
            .starts_with("Sentinel service mymaster via redis://:***@a:1"));
    }
}
