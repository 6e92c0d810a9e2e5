//! The configuration exactly as written: serde structs that reject unknown keys. Strings expand
//! `${VAR}` / `${VAR:-default}` from the environment as they are read, and durations are
//! humantime strings, so a bad value is reported at its own position.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{Deserializer, Error as _};

/// A string value after environment expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Str(pub String);

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw, |name| std::env::var(name).ok())
            .map(Str)
            .map_err(D::Error::custom)
    }
}

/// A humantime duration string ("250ms", "25s", "1m 30s"), after environment expansion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Str(text) = Str::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(Dur)
            .map_err(|e| D::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

/// Expands `${NAME}` (an error when unset) and `${NAME:-default}` (default when unset or
/// empty); `$$` is a literal `$`. Any other `$` is kept as is. Expanded values may not contain
/// newlines, so an environment variable can never smuggle structure into a header or a path.
pub fn expand_env(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in {input:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            let value = match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.to_owned(),
                (None, None) if lookup(name).is_some() => String::new(),
                (None, None) => return Err(format!("environment variable {name} is not set")),
            };
            if value.contains(['\n', '\r']) {
                return Err(format!("environment variable {name} contains a newline"));
            }
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: Str,
    #[serde(default)]
    pub http2: bool,
    pub tls: Option<Tls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: Str,
    pub key_file: Str,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Option<Str>,
    pub publish_token: Option<Str>,
    pub reload: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_connections: Option<u64>,
    pub header_read_timeout: Option<Dur>,
    pub tls_handshake_timeout: Option<Dur>,
    pub max_header_bytes: Option<u64>,
    pub max_headers: Option<u64>,
    pub max_uri_bytes: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub max_polls_per_client: Option<u64>,
    pub write_timeout: Option<Dur>,
    pub body_read_timeout: Option<Dur>,
    pub max_buffered_bytes: Option<u64>,
    pub max_connections_per_ip: Option<u64>,
    pub new_connections_per_ip_per_second: Option<u64>,
    pub http2_max_concurrent_streams: Option<u64>,
    pub http2_keep_alive_interval: Option<Dur>,
    pub trusted_proxies: Option<Vec<Str>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    pub drain_window: Option<Dur>,
    pub timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub url: Str,
    pub connect_timeout: Option<Dur>,
    pub timeout: Option<Dur>,
    pub pool_idle_timeout: Option<Dur>,
    pub pool_max_idle_per_host: Option<u64>,
    pub ca_file: Option<Str>,
    #[serde(default)]
    pub headers: BTreeMap<String, Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub path: Str,
    pub kind: Str,
    #[serde(default)]
    pub params: BTreeMap<String, Str>,
    pub upstream: Option<Str>,
    pub topic: Option<Str>,
    pub source: Option<Source>,
    pub auth: Option<toml::Value>,
    pub hold: Option<Dur>,
    pub max_hold: Option<Dur>,
    pub max_batch: Option<u64>,
    pub start: Option<Str>,
    pub on_gap: Option<Str>,
    pub buffer: Option<Buffer>,
    pub linger: Option<Dur>,
    pub max_topics: Option<u64>,
    pub upstream_grace: Option<Dur>,
    pub cors: Option<Cors>,
    pub cursor: Option<Cursor>,
    pub next_cursor: Option<NextCursor>,
    pub share: Option<Str>,
    pub vary: Option<Vec<Str>>,
    pub expose_headers: Option<Vec<Str>>,
    pub max_unshared: Option<u64>,
}

impl Route {
    /// Every key beside `path`, `kind` and `params`, with whether it is set.
    pub fn optional_keys(&self) -> [(&'static str, bool); 20] {
        [
            ("upstream", self.upstream.is_some()),
            ("topic", self.topic.is_some()),
            ("source", self.source.is_some()),
            ("auth", self.auth.is_some()),
            ("hold", self.hold.is_some()),
            ("max_hold", self.max_hold.is_some()),
            ("max_batch", self.max_batch.is_some()),
            ("start", self.start.is_some()),
            ("on_gap", self.on_gap.is_some()),
            ("buffer", self.buffer.is_some()),
            ("linger", self.linger.is_some()),
            ("max_topics", self.max_topics.is_some()),
            ("upstream_grace", self.upstream_grace.is_some()),
            ("cors", self.cors.is_some()),
            ("cursor", self.cursor.is_some()),
            ("next_cursor", self.next_cursor.is_some()),
            ("share", self.share.is_some()),
            ("vary", self.vary.is_some()),
            ("expose_headers", self.expose_headers.is_some()),
            ("max_unshared", self.max_unshared.is_some()),
        ]
    }
}

/// `auth = { hook = { ... } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub hook: Option<Hook>,
    pub jwt: Option<Jwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    pub issuer: Str,
    pub audience: Str,
    pub key_file: Option<Str>,
    pub jwks_url: Option<Str>,
    pub algorithms: Option<Vec<Str>>,
    pub leeway: Option<Dur>,
    pub topics_claim: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub upstream: Str,
    pub path: Str,
    pub ttl: Option<Dur>,
    pub timeout: Option<Dur>,
    pub headers: Option<Vec<Str>>,
}

/// Where a collapse route's clients carry their cursor.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    pub query: Str,
}

/// Where a collapse route's upstream answer carries the next cursor: exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextCursor {
    pub json: Option<Str>,
    pub header: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    #[serde(rename = "type")]
    pub kind: Str,
    pub upstream: Option<Str>,
    pub path: Option<Str>,
    pub idle_timeout: Option<Dur>,
    pub id_pointer: Option<Str>,
    pub resume_param: Option<Str>,
    pub items_pointer: Option<Str>,
    pub next_pointer: Option<Str>,
    pub min_interval: Option<Dur>,
    pub initial_cursor: Option<InitialCursor>,
    pub data: Option<Str>,
    pub interval: Option<Dur>,
    pub interval_header: Option<Str>,
}

/// Where a source without a resume point starts: a literal cursor, or one read from the
/// upstream by a bootstrap request.
#[derive(Debug)]
pub enum InitialCursor {
    Literal(Str),
    Bootstrap(Bootstrap),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub path: Str,
    pub pointer: Str,
}

impl<'de> Deserialize<'de> for InitialCursor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = InitialCursor;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a cursor (\"now\") or { path = \"...\", pointer = \"/...\" }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InitialCursor, E> {
                let expanded = expand_env(v, |name| std::env::var(name).ok()).map_err(E::custom)?;
                Ok(InitialCursor::Literal(Str(expanded)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<InitialCursor, A::Error> {
                let inner = serde::de::value::MapAccessDeserializer::new(map);
                Bootstrap::deserialize(inner).map(InitialCursor::Bootstrap)
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    pub messages: Option<u64>,
    pub bytes: Option<u64>,
    pub age: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    #[serde(default)]
    pub origins: Vec<Str>,
    pub credentials: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            "NL" => Some("a\nb".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(expand_env("a${SET}b", env).unwrap(), "avalueb");
        assert_eq!(expand_env("${UNSET:-dflt}", env).unwrap(), "dflt");
        assert_eq!(expand_env("${EMPTY:-dflt}", env).unwrap(), "dflt");
        assert_eq!(expand_env("${EMPTY}", env).unwrap(), "");
        assert_eq!(expand_env("${UNSET:-}", env).unwrap(), "");
        assert_eq!(expand_env("$$5 and $x", env).unwrap(), "$5 and $x");
    }

    #[test]
    fn rejects_unset_bad_and_multiline() {
        assert!(
            expand_env("${UNSET}", env)
                .unwrap_err()
                .contains("UNSET is not set")
        );
        assert!(expand_env("${1A}", env).unwrap_err().contains("invalid"));
        assert!(
            expand_env("${SET", env)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(expand_env("${NL}", env).unwrap_err().contains("newline"));
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub backplane: Option<Str>,
    pub node_id: Option<Str>,
    pub lease_ttl: Option<Dur>,
    pub backplane_grace: Option<Dur>,
    pub redis: Option<Redis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub url: Str,
    pub sentinel: Option<Sentinel>,
    pub prefix: Option<Str>,
    pub firehose_shards: Option<u64>,
    pub firehose_retention: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sentinel {
    pub master: Str,
    pub addrs: Vec<Str>,
}
