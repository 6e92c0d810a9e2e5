//! `[cluster]` and `[cluster.redis]`: several nodes as one gateway on a Redis backplane, with
//! the defaults. Checked without connecting: `pollmux check` needs no Redis.

use std::time::Duration;

use super::{Validator, raw};

/// How long a node owns a topic's upstream source without renewing its lease.
pub const LEASE_TTL_DEFAULT: Duration = Duration::from_secs(10);
/// How long a Redis outage is hidden (commands retried) before polls of topics the node has
/// not loaded, and publishes, get 503.
pub const BACKPLANE_GRACE_DEFAULT: Duration = Duration::from_secs(10);
/// Prefix of every key pollmux writes.
pub const PREFIX_DEFAULT: &str = "pm";
/// Streams every message is announced on, each node reading all of them.
pub const FIREHOSE_SHARDS_DEFAULT: u16 = 16;
/// How long an announcement stays in its stream (which bounds the streams' memory); a node whose
/// reader was away catches up from each topic's own log.
pub const FIREHOSE_RETENTION_DEFAULT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterConfig {
    /// `None`: a single node (the default).
    pub redis: Option<RedisConfig>,
    /// This node's name in leases and interest sets; `None`: the host name, at start.
    pub node_id: Option<String>,
    pub lease_ttl: Duration,
    pub backplane_grace: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` or `unix://`; with `sentinel`, the master's database, user,
    /// password and TLS.
    pub url: String,
    pub sentinel: Option<SentinelConfig>,
    pub prefix: String,
    pub firehose_shards: u16,
    pub firehose_retention: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SentinelConfig {
    /// The monitored master's name.
    pub master: String,
    /// Sentinel addresses, `host:port` or `redis://host:port`.
    pub addrs: Vec<String>,
}

const SCHEMES: [&str; 3] = ["redis://", "rediss://", "unix://"];

impl Validator<'_, '_> {
    pub(super) fn cluster(&mut self, raw: raw::Cluster) -> ClusterConfig {
        let backplane = raw.backplane.map(|b| b.0);
        let on = match backplane.as_deref() {
            None | Some("none") => false,
            Some("redis") => true,
            Some(other) => {
                self.err(
                    &["cluster", "backplane"],
                    format!("unknown backplane {other:?}, expected \"none\" or \"redis\""),
                );
                false
            }
        };
        let node_id = raw.node_id.map(|n| n.0);
        if let Some(id) = &node_id
            && !valid_node_id(id)
        {
            self.err(
                &["cluster", "node_id"],
                "use 1 to 64 of A-Z, a-z, 0-9, '.', '_' and '-'",
            );
        }
        let lease_ttl = raw.lease_ttl.map_or(LEASE_TTL_DEFAULT, |d| d.0);
        if lease_ttl < Duration::from_secs(1) {
            self.err(&["cluster", "lease_ttl"], "must be at least 1s");
        }
        let backplane_grace = raw.backplane_grace.map_or(BACKPLANE_GRACE_DEFAULT, |d| d.0);
        // [cluster.redis] is checked even while the backplane is off, so a config ready to be
        // switched on is known to be valid.
        let given = raw.redis.is_some();
        let redis = raw.redis.and_then(|r| self.redis(r));
        if on && !given {
            self.err(
                &["cluster", "backplane"],
                "backplane = \"redis\" needs [cluster.redis] with its url",
            );
        }
        let redis = redis.filter(|_| on);
        ClusterConfig {
            redis,
            node_id,
            lease_ttl,
            backplane_grace,
        }
    }

    fn redis(&mut self, raw: raw::Redis) -> Option<RedisConfig> {
        let url = raw.url.0;
        let at = ["cluster", "redis", "url"];
        let mut valid = true;
        if !SCHEMES.iter().any(|s| url.starts_with(s)) {
            self.err(
                &at,
                format!("expected a redis://, rediss:// or unix:// URL, not {url:?}"),
            );
            valid = false;
        } else if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            self.err(&at, format!("invalid Redis URL: {e}"));
            valid = false;
        }
        let sentinel = raw.sentinel.and_then(|s| {
            let addrs: Vec<String> = s.addrs.into_iter().map(|a| a.0).collect();
            let at = ["cluster", "redis", "sentinel"];
            if addrs.is_empty() {
                self.err(&at, "addrs: at least one Sentinel address is required");
                return None;
            }
            for a in &addrs {
                if let Err(e) = redis::IntoConnectionInfo::into_connection_info(sentinel_url(a)) {
                    self.err(&at, format!("invalid Sentinel address {a:?}: {e}"));
                    return None;
                }
            }
            if s.master.0.is_empty() {
                self.err(&at, "master: the monitored master's name is required");
                return None;
            }
            Some(SentinelConfig {
                master: s.master.0,
                addrs,
            })
        });
        let prefix = raw
            .prefix
            .map_or_else(|| PREFIX_DEFAULT.to_owned(), |p| p.0);
        if prefix.is_empty() || prefix.len() > 64 || prefix.contains(['{', '}', ' ']) {
            self.err(
                &["cluster", "redis", "prefix"],
                "use 1 to 64 characters without braces or spaces",
            );
        }
        let shards = raw
            .firehose_shards
            .map_or(FIREHOSE_SHARDS_DEFAULT as u64, |n| n);
        if !(1..=1024).contains(&shards) {
            self.err(
                &["cluster", "redis", "firehose_shards"],
                "must be between 1 and 1024",
            );
        }
        let firehose_retention = raw
            .firehose_retention
            .map_or(FIREHOSE_RETENTION_DEFAULT, |d| d.0);
        if firehose_retention < Duration::from_secs(10) {
            self.err(
                &["cluster", "redis", "firehose_retention"],
                "must be at least 10s",
            );
        }
        valid.then_some(RedisConfig {
            url,
            sentinel,
            prefix,
            firehose_shards: shards.clamp(1, 1024) as u16,
            firehose_retention,
        })
    }
}

/// A Sentinel address as a URL (`host:port` is taken as `redis://host:port`).
pub fn sentinel_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}")
    }
}

fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use super::*;

    const BASE: &str = "[listeners.p]\naddress = \"127.0.0.1:0\"\n";

    #[test]
    fn defaults_to_a_single_node() {
        let c = parse(BASE).unwrap();
        assert_eq!(
            c.cluster,
            ClusterConfig {
                redis: None,
                node_id: None,
                lease_ttl: LEASE_TTL_DEFAULT,
                backplane_grace: BACKPLANE_GRACE_DEFAULT,
            }
        );
    }

    #[test]
    fn redis_backplane_with_short_values() {
        let c = parse(&format!(
            "{BASE}[cluster]\nbackplane = \"redis\"\nnode_id = \"pollmux-1\"\n\
             lease_ttl = \"3s\"\nbackplane_grace = \"2s\"\n\
             [cluster.redis]\nurl = \"redis://127.0.0.1:6379/0\"\n\
             sentinel = {{ master = \"mymaster\", addrs = [\"127.0.0.1:26379\"] }}\n"
        ))
        .unwrap();
        let redis = c.cluster.redis.unwrap();
        assert_eq!(redis.url, "redis://127.0.0.1:6379/0");
        assert_eq!(redis.sentinel.unwrap().addrs, ["127.0.0.1:26379"]);
        assert_eq!(redis.prefix, PREFIX_DEFAULT);
        assert_eq!(c.cluster.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.cluster.backplane_grace, Duration::from_secs(2));
        assert_eq!(c.cluster.node_id.as_deref(), Some("pollmux-1"));
        for url in ["rediss://cache.internal:6380", "unix:///run/redis.sock"] {
            let c = parse(&format!(
                "{BASE}[cluster]\nbackplane = \"redis\"\n[cluster.redis]\nurl = \"{url}\"\n"
            ))
            .unwrap();
            assert_eq!(c.cluster.redis.unwrap().url, url);
        }
    }

    #[test]
    fn bad_cluster_settings_are_reported_together() {
        let e = parse(&format!(
            "{BASE}[cluster]\nbackplane = \"redis\"\nnode_id = \"a b\"\nlease_ttl = \"10ms\"\n\
             [cluster.redis]\nurl = \"http://127.0.0.1:6379\"\nfirehose_shards = 0\n"
        ))
        .unwrap_err()
        .to_string();
        for expected in [
            "cluster.node_id",
            "must be at least 1s",
            "expected a redis://, rediss:// or unix:// URL",
            "cluster.redis.firehose_shards",
        ] {
            assert!(e.contains(expected), "{expected:?} not in {e}");
        }
        let e = parse(&format!("{BASE}[cluster]\nbackplane = \"redis\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs [cluster.redis]"), "{e}");
        // Checked while the backplane is off too.
        let e = parse(&format!(
            "{BASE}[cluster]\nbackplane = \"none\"\n[cluster.redis]\nurl = \"http://x\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("expected a redis://"), "{e}");
        let e = parse(&format!("{BASE}[cluster]\nbackplane = \"nats\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown backplane \"nats\""), "{e}");
    }
}
