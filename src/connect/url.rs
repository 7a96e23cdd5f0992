//! A backend URL taken apart: its scheme, credentials, hosts, path and query settings,
//! with errors that name the input (password redacted) and the accepted forms.

#![cfg_attr(
    not(all(feature = "memory", feature = "redis", feature = "memcached")),
    allow(dead_code)
)]

use std::time::Duration;

use crate::{Error, Result};

/// The URL forms [`connect`](crate::connect()) accepts, for errors.
pub(crate) const ACCEPTED_FORMS: &str = "memory://, \
redis://[user:password@]host[:port][/db], rediss://… (TLS), \
redis+sentinel://[user:password@]host1:26379,host2:26379/<service>[/db], \
redis+cluster://[user:password@]host1:7000,host2:7001, \
memcached://host1:11211,host2:11211";

/// Which backend a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// `memory://`
    Memory,
    /// `redis://` or, with `tls`, `rediss://`
    Redis { tls: bool },
    /// `redis+sentinel://`
    Sentinel,
    /// `redis+cluster://`
    Cluster,
    /// `memcached://`
    Memcached,
}

impl Scheme {
    /// The cargo feature of `flagcache` that builds this backend.
    pub(crate) fn feature(self) -> &'static str {
        match self {
            Scheme::Memory => "memory",
            Scheme::Redis { .. } | Scheme::Sentinel | Scheme::Cluster => "redis",
            Scheme::Memcached => "memcached",
        }
    }

    /// The port a host without one gets.
    fn default_port(self) -> u16 {
        match self {
            Scheme::Memory => 0,
            Scheme::Redis { .. } | Scheme::Cluster => 6379,
            Scheme::Sentinel => 26379,
            Scheme::Memcached => 11211,
        }
    }
}

/// A backend URL, parsed. The settings in its query are taken one by one by the
/// backend that builds from it; [`Parsed::finish`] refuses any left over.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) scheme: Scheme,
    /// The URL as errors show it: its password replaced by `***`.
    pub(crate) shown: String,
    /// `user:password` as written (percent-encoded), if any.
    pub(crate) userinfo: Option<String>,
    /// `host:port` for every host, the default port added where none was given.
    pub(crate) hosts: Vec<String>,
    /// The non-empty path segments.
    pub(crate) path: Vec<String>,
    params: Vec<(String, String)>,
}

/// `url` with any password replaced by `***`: the one in the user info and the value
/// of a `sentinel_password` setting.
pub(crate) fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(parts) => parts,
        None => return url.to_string(),
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => format!("{userinfo}@{hosts}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name == "sentinel_password" => format!("{name}=***"),
                    _ => pair.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&");
            format!("{path}?{query}")
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The error for a URL that is not one of the accepted forms.
pub(crate) fn refuse(shown: &str, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(
        format!("backend URL {shown:?}: {why}; accepted forms: {ACCEPTED_FORMS}").into(),
    )
}

/// `%XX` escapes decoded; an escape that is not two hex digits or a result that is not
/// UTF-8 is `None`.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `url` into its parts; the scheme decides how many hosts and which path it may
/// have. Settings are checked later, by the backend that reads them.
pub(crate) fn parse(url: &str) -> Result<Parsed> {
    let shown = redact(url.trim());
    let fail = |why: &str| refuse(&shown, why);
    let text = url.trim();
    let (scheme_text, rest) = text
        .split_once("://")
        .ok_or_else(|| fail("no scheme (`<scheme>://…`)"))?;
    let scheme = match scheme_text.to_ascii_lowercase().as_str() {
        "memory" => Scheme::Memory,
        "redis" => Scheme::Redis { tls: false },
        "rediss" => Scheme::Redis { tls: true },
        "redis+sentinel" => Scheme::Sentinel,
        "redis+cluster" => Scheme::Cluster,
        "memcached" => Scheme::Memcached,
        other => return Err(refuse(&shown, format!("unknown scheme {other:?}"))),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, p),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, authority),
    };
    let hosts = if hosts.is_empty() {
        Vec::new()
    } else {
        hosts
            .split(',')
            .map(|h| {
                with_port(h.trim(), scheme.default_port())
                    .ok_or_else(|| fail(&format!("{h:?} is not host[:port]")))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let path = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s).ok_or_else(|| fail("bad %-escape in the path")))
        .collect::<Result<Vec<_>>>()?;
    let mut params = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| fail("bad %-escape in the query"))?;
        if params.iter().any(|(n, _)| n == name) {
            return Err(fail(&format!("setting `{name}` given twice")));
        }
        params.push((name.to_string(), value));
    }
    let parsed = Parsed {
        scheme,
        shown,
        userinfo,
        hosts,
        path,
        params,
    };
    parsed.check_shape()?;
    Ok(parsed)
}

/// `host` with `default` appended when it has no port; `None` when it is empty or its
/// port is not a number from 1 to 65535.
fn with_port(host: &str, default: u16) -> Option<String> {
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    // A bracketed IPv6 address carries colons of its own.
    let port_at = match host.rfind(']') {
        Some(end) => host.get(end..)?.find(':').map(|i| end + i),
        None => host.rfind(':'),
    };
    match port_at {
        Some(i) => {
            let (name, port) = (host.get(..i)?, host.get(i + 1..)?);
            let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
            (!name.is_empty()).then(|| format!("{name}:{port}"))
        }
        None => Some(format!("{host}:{default}")),
    }
}

impl Parsed {
    /// Checks the hosts, credentials and path the scheme allows.
    fn check_shape(&self) -> Result<()> {
        let fail = |why: &str| refuse(&self.shown, why);
        match self.scheme {
            Scheme::Memory => {
                if !self.hosts.is_empty() || self.userinfo.is_some() || !self.path.is_empty() {
                    return Err(fail("memory:// takes no host, credentials or path"));
                }
            }
            Scheme::Redis { .. } => {
                if self.hosts.len() != 1 {
                    return Err(fail(
                        "redis:// takes one host (several: redis+cluster:// or redis+sentinel://)",
                    ));
                }
                if self.path.len() > 1 {
                    return Err(fail("the path is the database number only"));
                }
                self.db(0)?;
            }
            Scheme::Sentinel => {
                if self.hosts.is_empty() {
                    return Err(fail("at least one sentinel host is required"));
                }
                if self.path.is_empty() || self.path.len() > 2 {
                    return Err(fail(
                        "the path is the monitored service, then the database number",
                    ));
                }
                self.db(1)?;
            }
            Scheme::Cluster => {
                if self.hosts.is_empty() {
                    return Err(fail("at least one cluster node is required"));
                }
                if !self.path.is_empty() {
                    return Err(fail("a Redis Cluster has no database number"));
                }
            }
            Scheme::Memcached => {
                if self.hosts.is_empty() {
                    return Err(fail("at least one memcached server is required"));
                }
                if self.userinfo.is_some() || !self.path.is_empty() {
                    return Err(fail("memcached:// takes no credentials or path"));
                }
            }
        }
        Ok(())
    }

    /// The database number at path segment `at` (0 when absent).
    pub(crate) fn db(&self, at: usize) -> Result<i64> {
        match self.path.get(at) {
            None => Ok(0),
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| refuse(&self.shown, format!("database {db:?} is not a number"))),
        }
    }

    /// The user name and password of the user info, percent-decoded.
    pub(crate) fn credentials(&self) -> Result<(Option<String>, Option<String>)> {
        let Some(info) = &self.userinfo else {
            return Ok((None, None));
        };
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| refuse(&self.shown, "bad %-escape in the user info"))
        };
        let (user, password) = match info.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (info.as_str(), None),
        };
        let user = (!user.is_empty()).then(|| decode(user)).transpose()?;
        let password = password.map(decode).transpose()?;
        Ok((user, password))
    }

    /// Takes the setting `name` out of the query.
    pub(crate) fn take(&mut self, name: &str) -> Option<String> {
        let at = self.params.iter().position(|(n, _)| n == name)?;
        Some(self.params.remove(at).1)
    }

    /// Takes the duration setting `name` (`250ms`, `2s`, `1m`).
    pub(crate) fn take_duration(&mut self, name: &str) -> Result<Option<Duration>> {
        match self.take(name) {
            Some(text) => self.duration(name, &text).map(Some),
            None => Ok(None),
        }
    }

    /// `text`, the value of the setting `name`, as a duration.
    pub(crate) fn duration(&self, name: &str, text: &str) -> Result<Duration> {
        parse_duration(text).ok_or_else(|| {
            refuse(
                &self.shown,
                format!("`{name}={text}` is not a duration such as 250ms, 2s or 1m"),
            )
        })
    }

    /// Takes the whole-number setting `name`.
    pub(crate) fn take_number(&mut self, name: &str) -> Result<Option<u64>> {
        let Some(text) = self.take(name) else {
            return Ok(None);
        };
        text.parse().map(Some).map_err(|_| {
            refuse(
                &self.shown,
                format!("`{name}={text}` is not a whole number"),
            )
        })
    }

    /// Takes `layout`: `true` for `json`, `false` for `envelope` (the default).
    pub(crate) fn take_json_layout(&mut self) -> Result<bool> {
        match self.take("layout").as_deref() {
            None | Some("envelope") => Ok(false),
            Some("json") => Ok(true),
            Some(other) => Err(refuse(
                &self.shown,
                format!("`layout={other}`: the layouts are `envelope` and `json`"),
            )),
        }
    }

    /// Refuses settings no one took, naming them and the ones `known` to this scheme.
    pub(crate) fn finish(self, known: &[&str]) -> Result<()> {
        match self.params.first() {
            None => Ok(()),
            Some((name, _)) => Err(Error::InvalidArgument(
                format!(
                    "backend URL {:?}: unknown setting `{name}`; {} URLs take: {}",
                    self.shown,
                    self.scheme_name(),
                    known.join(", ")
                )
                .into(),
            )),
        }
    }

    fn scheme_name(&self) -> &'static str {
        match self.scheme {
            Scheme::Memory => "memory://",
            Scheme::Redis { tls: false } => "redis://",
            Scheme::Redis { tls: true } => "rediss://",
            Scheme::Sentinel => "redis+sentinel://",
            Scheme::Cluster => "redis+cluster://",
            Scheme::Memcached => "memcached://",
        }
    }
}

/// `250ms`, `2s`, `1m`, `1h` (a whole number and a unit).
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses() {
        let p = parse("redis://u:p%40ss@cache:6380/2?namespace=svc").unwrap();
        assert_eq!(p.scheme, Scheme::Redis { tls: false });
        assert_eq!(p.hosts, ["cache:6380"]);
        assert_eq!(p.db(0).unwrap(), 2);
        assert_eq!(
            p.credentials().unwrap(),
            (Some("u".into()), Some("p@ss".into()))
        );
        let p = parse("rediss://cache").unwrap();
        assert_eq!(
            (p.scheme, p.hosts),
            (Scheme::Redis { tls: true }, vec!["cache:6379".into()])
        );
        let p = parse("redis+sentinel://s1,s2:26380/mymaster/3").unwrap();
        assert_eq!(p.hosts, ["s1:26379", "s2:26380"]);
        assert_eq!((p.path[0].as_str(), p.db(1).unwrap()), ("mymaster", 3));
        let p = parse("redis+cluster://[::1]:7000,h:7001").unwrap();
        assert_eq!(p.hosts, ["[::1]:7000", "h:7001"]);
        let p = parse("memcached://m1,m2:11212").unwrap();
        assert_eq!(p.hosts, ["m1:11211", "m2:11212"]);
        assert_eq!(parse("memory://").unwrap().scheme, Scheme::Memory);
    }

    #[test]
    fn bad_urls_name_the_input_without_its_password_and_list_the_forms() {
        for bad in [
            "redis://:hunter2@h:notaport",
            "redis://:hunter2@h/x",
            "redis://:hunter2@a,b",
            "postgres://:hunter2@h",
            "redis+sentinel://:hunter2@h",
            "redis+cluster://:hunter2@h/1",
            "memcached://:hunter2@h",
            "memory://h",
            "no-scheme",
        ] {
            let text = parse(bad).unwrap_err().to_string();
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("accepted forms: memory://"), "{text}");
            assert!(text.contains(&redact(bad)), "{text}");
        }
    }

    #[test]
    fn settings_are_read_once_and_unknown_ones_refused() {
        let mut p = parse("redis://h?channel=c&response_timeout=250ms&layout=json").unwrap();
        assert_eq!(p.take("channel").as_deref(), Some("c"));
        assert_eq!(
            p.take_duration("response_timeout").unwrap(),
            Some(Duration::from_millis(250))
        );
        assert!(p.take_json_layout().unwrap());
        p.finish(&[]).unwrap();
        let mut p = parse("redis://h?timeout=fast&colour=red").unwrap();
        assert!(p.take_duration("timeout").is_err());
        let text = p.finish(&["channel"]).unwrap_err().to_string();
        assert!(
            text.contains("`colour`") && text.contains("channel"),
            "{text}"
        );
        assert!(parse("redis://h?a=1&a=2").is_err());
    }

    #[test]
    fn redaction_covers_the_sentinel_password_setting() {
        assert_eq!(
            redact("redis+sentinel://u:pw@h/m?sentinel_password=x&namespace=n"),
            "redis+sentinel://u:***@h/m?sentinel_password=***&namespace=n"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
