//! Configuration: TOML text -> raw serde structs (`raw`, unknown keys rejected) -> `validate` ->
//! the typed [`Config`] the rest of pollmux reads.
//!
//! Every error is reported with its key path and line:column, and all of them at once: each named
//! table is deserialized on its own, so one bad route does not hide the problems of the next.
//! Callers may rely on a [`Config`] being internally consistent (names resolve, templates do not
//! conflict, TLS material loads).
//!
//! This file holds [`Config`], its loaders and the validator's core (locating errors,
//! deserializing tables key by key); each section has a file of its own with its types, defaults,
//! checks and tests: `listeners`, `limits` (and shutdown), `upstreams`, `routes`, `poll` (and
//! sources, CORS), `collapse`, `auth`; `topic` holds [`TopicTemplate`]. All is re-exported here.

mod auth;
mod cluster;
mod collapse;
mod limits;
mod listeners;
mod path;
mod poll;
mod poll_source;
mod raw;
mod routes;
mod source;
mod tls;
mod topic;
mod upstreams;

use std::path::Path;

use serde::de::DeserializeOwned;
use toml::de::{DeValue, ValueDeserializer};

pub use auth::{
    AuthConfig, HOOK_HEADERS_DEFAULT, HOOK_TIMEOUT_DEFAULT, HOOK_TTL_DEFAULT, HookConfig,
    JWT_LEEWAY_DEFAULT, JWT_TOPICS_CLAIM_DEFAULT, JwtConfig, JwtKey, JwtKeys,
};
pub use cluster::{
    BACKPLANE_GRACE_DEFAULT, ClusterConfig, FIREHOSE_RETENTION_DEFAULT, FIREHOSE_SHARDS_DEFAULT,
    LEASE_TTL_DEFAULT, PREFIX_DEFAULT, RedisConfig, SentinelConfig, sentinel_url,
};
pub use collapse::{CollapseConfig, MAX_UNSHARED_DEFAULT, NextCursor};
pub use limits::{
    DRAIN_WINDOW_DEFAULT, FD_RESERVE, HEADER_READ_TIMEOUT_DEFAULT,
    HTTP2_KEEP_ALIVE_INTERVAL_DEFAULT, HTTP2_MAX_CONCURRENT_STREAMS_DEFAULT, LimitsConfig,
    MAX_BUFFERED_BYTES_DEFAULT, MAX_CONNECTIONS_PER_IP_DEFAULT, MAX_HEADER_BYTES_DEFAULT,
    MAX_HEADERS_DEFAULT, MAX_MESSAGE_BYTES_DEFAULT, MAX_POLLS_PER_CLIENT_DEFAULT,
    MAX_URI_BYTES_DEFAULT, NEW_CONNECTIONS_PER_IP_PER_SECOND_DEFAULT, SHUTDOWN_TIMEOUT_DEFAULT,
    ShutdownConfig, TLS_HANDSHAKE_TIMEOUT_DEFAULT, WRITE_TIMEOUT_DEFAULT,
};
pub use listeners::{AdminConfig, ListenerConfig, TlsConfig};
pub use path::PathTemplate;
pub use poll::{
    BUFFER_AGE_DEFAULT, BUFFER_BYTES_DEFAULT, BUFFER_MESSAGES_DEFAULT, BufferConfig, CorsConfig,
    HOLD_DEFAULT, MAX_BATCH_DEFAULT, MAX_HOLD_DEFAULT, OnGap, PollConfig, Start,
    UPSTREAM_GRACE_DEFAULT,
};
pub use poll_source::{
    ID_POINTER_DEFAULT, INTERVAL_DEFAULT, InitialCursor, MIN_INTERVAL_DEFAULT,
    RESUME_PARAM_DEFAULT, SOURCE_IDLE_TIMEOUT_DEFAULT, SourceConfig, StreamFormat,
};
use routes::unknown_key_hint;
pub use routes::{
    LINGER_DEFAULT, MAX_TOPICS_DEFAULT, PARAM_PATTERN_DEFAULT, Param, RouteConfig, RouteKind,
    TAIL_PATTERN_DEFAULT,
};
use source::Source;
pub use source::{ConfigError, ConfigErrors};
pub use topic::{TopicTemplate, percent_encode};
pub use upstreams::{
    UPSTREAM_CONNECT_TIMEOUT_DEFAULT, UPSTREAM_POOL_IDLE_TIMEOUT_DEFAULT,
    UPSTREAM_POOL_MAX_IDLE_DEFAULT, UPSTREAM_TIMEOUT_DEFAULT, UpstreamConfig,
};

/// The configuration `pollmux run` serves when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public listeners, sorted by name.
    pub listeners: Vec<ListenerConfig>,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub shutdown: ShutdownConfig,
    /// Upstreams, sorted by name; routes refer to them by index.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, sorted by name.
    pub routes: Vec<RouteConfig>,
    /// `[cluster]`: the backplane that makes several nodes one gateway.
    pub cluster: ClusterConfig,
}

impl Config {
    /// Parses and validates a configuration. Relative file names (TLS material) resolve against
    /// `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let src = Source::parse(text)?;
        let mut v = Validator {
            src: &src,
            base_dir,
            errors: Vec::new(),
            left_out: Vec::new(),
            declared_upstreams: Vec::new(),
        };
        let config = v.config();
        match (config, v.errors.is_empty()) {
            (Some(config), true) => Ok(config),
            _ => {
                v.errors
                    .sort_by_key(|e| e.position.unwrap_or((usize::MAX, usize::MAX)));
                Err(ConfigErrors(v.errors))
            }
        }
    }

    /// Reads and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                position: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, base)
    }

    /// The embedded default configuration.
    pub fn default_config() -> Config {
        Config::from_toml(DEFAULT_CONFIG, Path::new("."))
            .expect("the embedded default configuration is valid (tested)")
    }
}

struct Validator<'a, 'i> {
    src: &'a Source<'i>,
    base_dir: &'a Path,
    errors: Vec<ConfigError>,
    /// Dotted paths of keys already reported as bad and left out of their table.
    left_out: Vec<String>,
    /// Every name under [upstreams], valid or not: a reference to an invalid upstream is not
    /// also reported as unknown.
    declared_upstreams: Vec<String>,
}

const SECTIONS: &[&str] = &[
    "listeners",
    "admin",
    "limits",
    "shutdown",
    "upstreams",
    "routes",
    "cluster",
];

impl Validator<'_, '_> {
    fn err(&mut self, path: &[&str], message: impl Into<String>) {
        let joined = path.join(".");
        let reported = self.left_out.iter().any(|k| {
            joined
                .strip_prefix(k.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        });
        if reported {
            return;
        }
        let e = self.src.error_at_path(path, message);
        self.errors.push(e);
    }

    fn config(&mut self) -> Option<Config> {
        for (key, _) in self.src.root.iter() {
            if !SECTIONS.contains(&key.get_ref().as_ref()) {
                self.errors.push(ConfigError {
                    path: key.get_ref().to_string(),
                    position: Some(self.src.line_col(key.span().start)),
                    message: format!("unknown section, expected one of {}", SECTIONS.join(", ")),
                });
            }
        }
        let admin: raw::Admin = self.section("admin").unwrap_or_default();
        let limits: raw::Limits = self.section("limits").unwrap_or_default();
        let shutdown: raw::Shutdown = self.section("shutdown").unwrap_or_default();
        let listeners: Vec<(String, raw::Listener)> = self.named("listeners");
        self.declared_upstreams = self.table_names("upstreams");
        let upstreams: Vec<(String, raw::Upstream)> = self.named("upstreams");
        let routes: Vec<(String, raw::Route)> = self.named("routes");
        let cluster: raw::Cluster = self.section("cluster").unwrap_or_default();

        let admin = self.admin(admin);
        let limits = self.limits(limits);
        let shutdown = self.shutdown(shutdown);
        let listeners: Vec<_> = listeners
            .into_iter()
            .filter_map(|(name, l)| self.listener(name, l))
            .collect();
        if listeners.is_empty()
            && self
                .src
                .root
                .iter()
                .all(|(k, _)| k.get_ref() != "listeners")
        {
            self.err(&["listeners"], "at least one listener is required");
        }
        self.distinct_addresses(&listeners, admin.as_ref());
        let upstreams: Vec<_> = upstreams
            .into_iter()
            .filter_map(|(name, u)| self.upstream(name, u))
            .collect();
        let routes: Vec<_> = routes
            .into_iter()
            .filter_map(|(name, r)| self.route(name, r, &upstreams))
            .collect();
        self.distinct_templates(&routes);
        let cluster = self.cluster(cluster);
        Some(Config {
            listeners,
            admin: admin?,
            limits,
            shutdown,
            upstreams,
            routes,
            cluster,
        })
    }

    /// The names of the entries of a table of named tables.
    fn table_names(&self, section: &str) -> Vec<String> {
        match self.src.root.iter().find(|(k, _)| k.get_ref() == section) {
            Some((_, value)) => match value.get_ref() {
                DeValue::Table(t) => t.iter().map(|(k, _)| k.get_ref().to_string()).collect(),
                _ => Vec::new(),
            },
            None => Vec::new(),
        }
    }

    /// Deserializes one top-level table; absent is `None`.
    fn section<T: DeserializeOwned>(&mut self, name: &str) -> Option<T> {
        let (_, value) = self.src.root.iter().find(|(k, _)| k.get_ref() == name)?;
        self.deserialize(&[name], value.clone())
    }

    /// Deserializes every entry of a table of named tables, each on its own.
    fn named<T: DeserializeOwned>(&mut self, section: &str) -> Vec<(String, T)> {
        let Some((_, value)) = self.src.root.iter().find(|(k, _)| k.get_ref() == section) else {
            return Vec::new();
        };
        let DeValue::Table(table) = value.get_ref() else {
            let e = self.src.error_at_span(
                Some(value.span()),
                &format!("`{section}` must be a table of named tables, e.g. [{section}.NAME]"),
            );
            self.errors.push(e);
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, value) in table.iter() {
            let name = name.get_ref().to_string();
            if !valid_name(&name) {
                self.err(
                    &[section, &name],
                    format!(
                        "invalid name {name:?}: use 1 to 64 of a-z, 0-9 and _, starting with a letter"
                    ),
                );
                continue;
            }
            if let Some(parsed) = self.deserialize(&[section, &name], value.clone()) {
                out.push((name, parsed));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Deserializes the table at `at`, reporting every bad key rather than the first: a key
    /// that fails (unknown, wrong type, bad value) is reported and left out, and the rest is
    /// deserialized again, so that what the rest says (e.g. an unknown upstream) is checked in
    /// the same pass. Later errors at a left-out key are not reported twice ([`Self::err`]).
    fn deserialize<T: DeserializeOwned>(
        &mut self,
        at: &[&str],
        mut value: toml::Spanned<DeValue<'_>>,
    ) -> Option<T> {
        let mut left_out: Vec<String> = Vec::new();
        loop {
            let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            // A required key that was left out for its bad value: already reported.
            if left_out
                .iter()
                .any(|k| e.message() == format!("missing field `{k}`"))
            {
                return None;
            }
            let mut located = self.src.error_at_span(e.span(), e.message());
            let DeValue::Table(table) = value.get_mut() else {
                self.errors.push(located);
                return None;
            };
            let inner = e.span().map(|span| source::path_at(table, span.start));
            // A key of the route's own table (not of one nested in it, such as `cors`).
            let own_key = inner.as_ref().is_some_and(|p| p.len() == 1);
            if let Some(hint) = unknown_key_hint(at, table, e.message()).filter(|_| own_key) {
                located.message = hint;
            }
            self.errors.push(located);
            let key = inner.and_then(|p| p.into_iter().next());
            let key = key.filter(|k| !left_out.contains(k))?;
            table.remove(key.as_str());
            self.left_out.push(format!("{}.{key}", at.join(".")));
            left_out.push(key);
        }
    }
}

/// Route, listener and upstream names become metric labels: keep them short and plain.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, Path::new("."))
    }

    pub(super) const COLLAPSE: &str = "[listeners.p]\naddress = \"127.0.0.1:1\"\n\
                            [upstreams.api]\nurl = \"http://x\"\nheaders = { Authorization = \"Bearer own\" }\n\
                            [routes.status]\npath = \"/status/{id}\"\nkind = \"collapse\"\n\
                            upstream = \"api\"\nauth = \"public\"\n";

    #[test]
    fn default_config_is_valid() {
        let c = Config::default_config();
        assert_eq!(c.admin.address, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.listeners[0].address, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn reports_all_errors_with_positions() {
        let text = r#"
[listeners.public]
address = "nowhere"

[upstreams.api]
url = "ftp://x"
timeout = "3 parsecs"

[routes.a]
path = "/a/{id}"
kind = "proxy"
upstream = "missing"
params.other = "x"

[routes.b]
path = "/b"
kind = "proxy"
upstream = "api"
bogus = 1
"#;
        let errs = parse(text).unwrap_err();
        let rendered = errs.to_string();
        let expect = [
            "listeners.public.address (line 3, column 11)",
            "upstreams.api.timeout (line 7, column 11)",
            "routes.a.params.other (line 13, column 16)",
            "routes.b.bogus (line 19, column 1)",
        ];
        for e in expect {
            assert!(rendered.contains(e), "missing {e:?} in:\n{rendered}");
        }
        assert!(rendered.contains("unknown field `bogus`"), "{rendered}");
        assert!(rendered.contains("invalid duration"), "{rendered}");
    }

    /// Unknown keys, bad values and references come out in one pass, with nothing reported
    /// twice and no error invented for a key that was already reported.
    #[test]
    fn one_pass_reports_keys_values_and_references_together() {
        let text = r#"
[listeners.public]
address = "127.0.0.1:1"

[upstreams.broken]
url = "ftp://x"

[routes.feed]
path = "/feed/{id}"
kind = "poll"
source = { type = "upstream-sse", upstream = "nowhere", path = "/s/{id}" }
auth = "public"
hodl = "5s"
max_batch = "many"

[routes.api]
path = "/api/{*rest}"
kind = "proxy"
upstream = "broken"
share = "public"

[routes.other]
path = "/other"
kind = "proxy"
upstream = "missing"
"#;
        let errs = parse(text).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "upstreams.broken.url",
                "routes.feed.source.upstream",
                "routes.feed.hodl",
                "routes.feed.max_batch",
                "routes.api.share",
                "routes.other.upstream",
            ],
            "{errs}"
        );
        let hint = &errs.0[2].message;
        assert!(
            hint.contains("kind = \"poll\" takes path, kind, params, topic"),
            "{hint}"
        );
        assert!(hint.contains("(did you mean `hold`?)"), "{hint}");
        assert!(
            !hint.contains("share") && !hint.contains("next_cursor"),
            "{hint}"
        );
        assert!(
            errs.0[4].message.contains("not used by kind = \"proxy\""),
            "{errs}"
        );
    }

    #[test]
    fn semantic_errors_point_at_values() {
        let text = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[upstreams.u]\nurl = \"ftp://x\"\n\
                    [routes.r]\npath = \"/r\"\nkind = \"proxy\"\nupstream = \"nope\"\n";
        let errs = parse(text).unwrap_err().0;
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].path, "upstreams.u.url");
        assert_eq!(errs[0].position, Some((4, 7)));
        assert_eq!(errs[1].path, "routes.r.upstream");
        assert_eq!(errs[1].position, Some((8, 12)));
    }

    #[test]
    fn unknown_sections_and_bad_names() {
        let text =
            "[listenrs.p]\naddress = \"x\"\n[listeners.Bad-Name]\naddress = \"127.0.0.1:1\"\n";
        let errs = parse(text).unwrap_err().to_string();
        assert!(
            errs.contains("listenrs (line 1, column 2): unknown section"),
            "{errs}"
        );
        assert!(errs.contains("invalid name \"Bad-Name\""), "{errs}");
    }
}
