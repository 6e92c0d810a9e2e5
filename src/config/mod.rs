//! Configuration: TOML text -> raw serde structs (`raw`, unknown keys rejected) -> `validate` ->
//! the typed [`Config`] the rest of pollmux reads.
//!
//! Every error is reported with its key path and line:column, and all of them at once: each named
//! table is deserialized on its own, so one bad route does not hide the problems of the next.
//! Callers may rely on a [`Config`] being internally consistent (names resolve, templates do not
//! conflict, TLS material loads).

mod path;
mod raw;
mod source;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use regex::Regex;
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

pub use path::PathTemplate;
use source::Source;
pub use source::{ConfigError, ConfigErrors};

/// The configuration `pollmux run` serves when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// Pattern a path parameter must match when its route names none: unreserved URI characters only,
/// so a default parameter can never carry a separator or an encoded byte into a topic or URL.
pub const PARAM_PATTERN_DEFAULT: &str = "[A-Za-z0-9._~-]{1,128}";
/// Pattern of a `{*tail}` parameter when its route names none: any text; the router still
/// rejects control characters, backslashes and `.`/`..` segments in every parameter.
pub const TAIL_PATTERN_DEFAULT: &str = ".{1,4096}";
/// Header read timeout: long enough for a slow mobile client, short enough to shed slowloris.
/// On HTTP/1 it also bounds how long an idle keep-alive connection waits for its next request.
pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// TLS handshake timeout, for the same reason.
pub const TLS_HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Header block limit; hyper answers 431 above it. hyper requires at least 8 KiB.
pub const MAX_HEADER_BYTES_DEFAULT: usize = 16 * 1024;
const MAX_HEADER_BYTES_MIN: usize = 8 * 1024;
/// Header count limit; hyper answers 431 above it.
pub const MAX_HEADERS_DEFAULT: usize = 64;
/// Request-target limit; pollmux answers 414 above it.
pub const MAX_URI_BYTES_DEFAULT: usize = 8 * 1024;
/// Polls one credential may hold on one topic at once: the protocol asks for one; a few more
/// absorb retries racing a poll that has not ended yet.
pub const MAX_POLLS_PER_CLIENT_DEFAULT: usize = 4;
/// A client that reads nothing of a response for this long is disconnected, so it cannot pin
/// a response's memory forever.
pub const WRITE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Message payload buffered over all topics (each topic also has its own `buffer` bound):
/// beyond it new topics are refused with 503 rather than the process running out of memory.
pub const MAX_BUFFERED_BYTES_DEFAULT: usize = 1024 * 1024 * 1024;
/// Connections one client IP may hold: generous for offices behind one NAT address, far
/// below what exhausts the server.
pub const MAX_CONNECTIONS_PER_IP_DEFAULT: usize = 1024;
/// New connections per second per client IP: off unless set. A rate that fits one client is
/// far too low for thousands behind one carrier-grade NAT address, so only the operator can
/// pick it (docs/configuration.md); the concurrent limit protects capacity meanwhile.
pub const NEW_CONNECTIONS_PER_IP_PER_SECOND_DEFAULT: usize = 0;
/// Concurrent streams per HTTP/2 connection: many polls per client, but bounded.
pub const HTTP2_MAX_CONCURRENT_STREAMS_DEFAULT: usize = 256;
/// HTTP/2 keep-alive ping interval (and the time a ping may take): finds dead connections
/// behind NATs and load balancers that drop idle flows.
pub const HTTP2_KEEP_ALIVE_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// Largest message payload: publishes above it get 413, source messages above it become gaps.
pub const MAX_MESSAGE_BYTES_DEFAULT: usize = 1024 * 1024;
/// Poll hold when the client gives no `timeout`.
pub const HOLD_DEFAULT: Duration = Duration::from_secs(25);
/// Longest hold a client may ask for; below the 60 s idle timeout common in load balancers.
pub const MAX_HOLD_DEFAULT: Duration = Duration::from_secs(55);
/// An upstream stream silent this long is reconnected (servers usually send keep-alive
/// comments every 15 to 30 s).
pub const SOURCE_IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// An upstream outage shorter than this is invisible to clients beyond a delay.
pub const UPSTREAM_GRACE_DEFAULT: Duration = Duration::from_secs(30);
/// Messages per poll response.
pub const MAX_BATCH_DEFAULT: usize = 100;
/// Per-topic retention: messages, bytes and age.
pub const BUFFER_MESSAGES_DEFAULT: usize = 1000;
pub const BUFFER_BYTES_DEFAULT: usize = 8 * 1024 * 1024;
pub const BUFFER_AGE_DEFAULT: Duration = Duration::from_secs(300);
/// Client headers a hook receives unless the route lists its own: the usual credentials.
pub const HOOK_HEADERS_DEFAULT: &[&str] = &["authorization", "cookie"];
/// How long an allow from a hook is cached without `Cache-Control: max-age`.
pub const HOOK_TTL_DEFAULT: Duration = Duration::from_secs(30);
/// A hook answer slower than this is a 503.
pub const HOOK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Clock skew tolerated on a JWT's `exp` and `nbf`.
pub const JWT_LEEWAY_DEFAULT: Duration = Duration::from_secs(5);
/// The JWT claim listing the topics a token may read.
pub const JWT_TOPICS_CLAIM_DEFAULT: &str = "topics";
/// Per topic, upstream requests at once for a collapse route whose answers are private.
pub const MAX_UNSHARED_DEFAULT: usize = 16;
/// A topic (and its source) lives this long after its last poll, so messages arriving between a
/// client's polls are kept.
pub const LINGER_DEFAULT: Duration = Duration::from_secs(60);
/// Live topics per route; beyond it new topics get 503.
pub const MAX_TOPICS_DEFAULT: usize = 10_000;
/// File descriptors kept back from `max_connections` for upstream connections, listeners, the
/// over-limit 503 answers and the process's own files.
pub const FD_RESERVE: u64 = 256;
/// Time between SIGTERM and the last held poll being answered (answers are spread over it).
pub const DRAIN_WINDOW_DEFAULT: Duration = Duration::from_secs(5);
/// Time after SIGTERM by which pollmux exits, whatever is still in flight.
pub const SHUTDOWN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);
/// Upstream TCP (and TLS) connect timeout.
pub const UPSTREAM_CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);
/// Time an upstream may take to send response headers before the client gets 504.
pub const UPSTREAM_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Idle pooled upstream connections are closed after this.
pub const UPSTREAM_POOL_IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(90);
/// Idle pooled connections kept per upstream host.
pub const UPSTREAM_POOL_MAX_IDLE_DEFAULT: usize = 64;
const ADMIN_ADDRESS_DEFAULT: &str = "127.0.0.1:9090";

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
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// The `listener` metric label.
    pub name: String,
    pub address: SocketAddr,
    /// Serve h2c with prior knowledge beside HTTP/1.1 (cleartext listeners only; TLS listeners
    /// pick h2 by ALPN).
    pub http2: bool,
    pub tls: Option<TlsConfig>,
}

#[derive(Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Loaded at validation, so `check` proves the files are usable.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// Bearer token for `/publish` and `/-/reload`; required unless the address is loopback.
    pub publish_token: Option<String>,
    /// Whether `POST /-/reload` reloads the configuration (as SIGHUP does).
    pub reload: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Concurrent client connections over all listeners; `None`: the fd limit minus
    /// [`FD_RESERVE`], computed at start after the limit is raised.
    pub max_connections: Option<u64>,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_message_bytes: usize,
    /// Polls one credential (`Authorization` value) may hold on one topic at once.
    pub max_polls_per_client: usize,
    /// A connection whose client reads nothing of a response for this long is closed.
    pub write_timeout: Duration,
    /// Message payload buffered over all topics; beyond it no new topic is made (503).
    pub max_buffered_bytes: usize,
    /// Connections one client IP may have open at once (requests, behind a trusted proxy);
    /// 0: no limit.
    pub max_connections_per_ip: usize,
    /// New connections (requests, behind a trusted proxy) per second per client IP; 0: no limit.
    pub new_connections_per_ip_per_second: u32,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 connections are pinged this often when idle; one not answering within the same
    /// time is closed.
    pub http2_keep_alive_interval: Duration,
    /// Peers whose `X-Forwarded-For` is extended rather than replaced.
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownConfig {
    pub drain_window: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// `http` or `https` base URL; its path, if any, prefixes every upstream path.
    pub url: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// pollmux's own headers (credentials) added to every request to this upstream.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// CA certificates trusted for this upstream instead of the system's (`ca_file`).
    pub ca_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// The `route` metric label.
    pub name: String,
    /// The path template: `{name}` parameters, `{*rest}` tail.
    pub path: PathTemplate,
    /// Every parameter of the template, in path order.
    pub params: Vec<Param>,
    pub kind: RouteKind,
}

/// One path parameter of a route template.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    /// The route's pattern for it, anchored at both ends.
    pub pattern: Regex,
    /// A `{*tail}` parameter: the rest of the path, the only kind that may contain `/`.
    pub tail: bool,
}

/// Patterns compare by their text: the same text is the same pattern.
impl PartialEq for Param {
    fn eq(&self, other: &Param) -> bool {
        self.name == other.name
            && self.pattern.as_str() == other.pattern.as_str()
            && self.tail == other.tail
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RouteKind {
    /// Plain reverse proxy to `upstreams[upstream]`.
    Proxy { upstream: usize },
    /// Managed long-poll (docs/protocol.md section 1).
    Poll(Box<PollConfig>),
    /// Transparent fan-in of an existing long-poll API (docs/protocol.md section 2).
    Collapse(Box<CollapseConfig>),
}

impl RouteKind {
    /// The `kind` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            RouteKind::Proxy { .. } => "proxy",
            RouteKind::Poll(_) => "poll",
            RouteKind::Collapse(_) => "collapse",
        }
    }
}

/// A `kind = "collapse"` route's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapseConfig {
    /// `upstreams[upstream]` answers the shared requests.
    pub upstream: usize,
    /// Groups a route's requests for `linger`, chaining and `max_topics`.
    pub topic: TopicTemplate,
    pub auth: AuthConfig,
    /// Requests to the upstream at once per topic while its answers are private (not shared).
    pub max_unshared: usize,
    /// The query parameter carrying the client's cursor; `None`: requests are only collapsed
    /// while identical ones are in flight.
    pub cursor: Option<String>,
    /// Where an upstream answer carries the next cursor; `None`: no chaining, no stored answers.
    pub next_cursor: Option<NextCursor>,
    /// `share = "public"`: the upstream's answer does not depend on who asks.
    pub share_public: bool,
    /// Request headers whose values are part of the key and sent upstream (lowercase names).
    pub vary: Vec<HeaderName>,
    /// Upstream response headers written to clients beside the standard ones.
    pub expose_headers: Vec<HeaderName>,
    pub linger: Duration,
    pub max_topics: usize,
}

/// Where an upstream answer of a collapse route carries the next cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextCursor {
    /// A JSON pointer into the response body (a string or number there).
    Json(String),
    /// A response header.
    Header(HeaderName),
}

/// Who may read a poll or collapse route's topics.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthConfig {
    /// Anyone.
    Public,
    /// An upstream URL decides per (topic, credential) (docs/protocol.md 1.5).
    Hook(HookConfig),
    /// A signed token names the topics its bearer may read.
    Jwt(JwtConfig),
}

/// `auth = { jwt = ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    pub keys: JwtKeys,
    /// Accepted `alg` values: asymmetric only, never `none` or HMAC.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The claim listing the topics the token may read.
    pub topics_claim: String,
}

/// Where a JWT route's verification keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtKeys {
    /// A public key file (PEM: RSA, EC or Ed25519).
    File(JwtKey),
    /// A JWKS document, fetched and refreshed (`kid` picks the key).
    Jwks(Uri),
}

/// A loaded verification key. Its `Debug` names no key material, so a key rotated in place
/// does not make a reload treat the route as changed (JWT verifiers are rebuilt every reload).
#[derive(Clone)]
pub struct JwtKey(pub Arc<jsonwebtoken::DecodingKey>);

/// Keys are equal for a reload's comparison: key material is reloaded with every
/// configuration and JWT verifiers are rebuilt every reload, so a key rotated in place must not
/// make a route count as changed (and lose its topics).
impl PartialEq for JwtKey {
    fn eq(&self, _: &JwtKey) -> bool {
        true
    }
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKey")
    }
}

/// `auth = { hook = ... }`: pollmux asks `upstreams[upstream]` at `path` whether a client may
/// read a topic, passing only the client's `headers`.
#[derive(Debug, Clone, PartialEq)]
pub struct HookConfig {
    pub upstream: usize,
    /// Path (and query) template over the topic's parameters.
    pub path: TopicTemplate,
    /// Client request headers passed to the hook (the credential), lowercase.
    pub headers: Vec<HeaderName>,
    /// How long an allow is cached when the hook's answer has no `Cache-Control: max-age`.
    pub ttl: Duration,
    /// A hook slower than this is a 503 (fail closed).
    pub timeout: Duration,
}

/// A `kind = "poll"` route's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PollConfig {
    pub topic: TopicTemplate,
    pub auth: AuthConfig,
    pub source: SourceConfig,
    pub hold: Duration,
    pub max_hold: Duration,
    pub max_batch: usize,
    pub start: Start,
    pub on_gap: OnGap,
    pub buffer: BufferConfig,
    pub linger: Duration,
    pub max_topics: usize,
    /// An upstream source failing for longer than this turns waiting polls into 503.
    pub upstream_grace: Duration,
    /// Who may read cross-origin (`cors`).
    pub cors: CorsConfig,
}

/// A poll route's CORS policy (docs/protocol.md 1.6).
#[derive(Debug, Clone, PartialEq)]
pub struct CorsConfig {
    /// Exact origins allowed; with neither these nor `any_origin`, no cross-origin access.
    pub origins: Vec<String>,
    /// `origins = ["*"]`: any origin may read, answered with `Access-Control-Allow-Origin: *`.
    pub any_origin: bool,
    /// Credentialed requests (cookies, `Authorization`) may read: the exact origin is
    /// reflected with `Access-Control-Allow-Credentials: true`. Never with `any_origin`.
    pub credentials: bool,
    /// `Access-Control-Allow-Headers` of a preflight answer.
    pub allow_headers: HeaderValue,
}

/// What feeds a poll route's topics.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// The backend publishes through the admin listener (`POST /publish/<route>/<topic>`).
    Publish,
    /// One long-poll in flight per topic to `upstreams[upstream]` at `path` (which may use
    /// `{cursor}`, the upstream's position).
    UpstreamPoll {
        upstream: usize,
        path: TopicTemplate,
        id_pointer: String,
        /// Where the array of messages is in an object answer; `None`: the answer is the array.
        items_pointer: Option<String>,
    },
    /// One streaming subscription per topic to `upstreams[upstream]` at `path`.
    UpstreamStream {
        format: StreamFormat,
        upstream: usize,
        /// Path (and query) template over the topic's parameters.
        path: TopicTemplate,
        /// A stream silent this long is treated as dead and reconnected.
        idle_timeout: Duration,
    },
}

/// The wire format of a streaming source and how it resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFormat {
    /// `text/event-stream`; resumes with `Last-Event-ID`.
    Sse,
    /// One JSON value per line; the id at `id_pointer`; resumes with `?<resume_param>=<id>`.
    Ndjson {
        id_pointer: String,
        resume_param: String,
    },
}

/// JSON pointer of an NDJSON message's upstream id, unless the route names one.
pub const ID_POINTER_DEFAULT: &str = "/id";
/// Query parameter carrying the last upstream id on an NDJSON reconnect, unless named.
pub const RESUME_PARAM_DEFAULT: &str = "last_id";

/// Where a poll without a cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Earliest,
    Latest,
}

/// What a client behind a gap gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnGap {
    /// 410 with `earliest_cursor` and `latest_cursor`.
    Error,
    /// 200 from after the gap, with `gap: true`.
    Resume,
}

/// Per-topic retention bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferConfig {
    pub messages: usize,
    pub bytes: usize,
    pub age: Duration,
}

/// A topic template such as `orders:{id}` over a route's path parameters.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    parts: Vec<TopicPart>,
    /// Matches a topic string back to its parameter values (publish), anchored.
    matcher: Regex,
}

/// The matcher is built from the parts: equal parts, equal templates.
impl PartialEq for TopicTemplate {
    fn eq(&self, other: &TopicTemplate) -> bool {
        self.parts == other.parts
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TopicPart {
    Literal(String),
    Param(String),
}

impl TopicTemplate {
    /// Parses a topic template; every `{name}` must be one of `params`, used once (a topic is
    /// matched back to its parameters when published).
    pub fn parse(template: &str, params: &[String]) -> Result<TopicTemplate, String> {
        TopicTemplate::parse_inner(template, params, false)
    }

    /// Parses the path template of a request pollmux makes (a source's, a hook's), which is
    /// only ever rendered: a parameter may appear more than once.
    pub fn parse_path(template: &str, params: &[String]) -> Result<TopicTemplate, String> {
        TopicTemplate::parse_inner(template, params, true)
    }

    fn parse_inner(
        template: &str,
        params: &[String],
        repeats: bool,
    ) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut pattern = String::from("^");
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed {{ in {template:?}"))?
                + open;
            let name = &rest[open + 1..close];
            if !params.iter().any(|p| p == name) {
                return Err(format!("{{{name}}} is not a parameter of the route's path"));
            }
            let seen = parts
                .iter()
                .any(|p| matches!(p, TopicPart::Param(n) if n == name));
            if seen && !repeats {
                return Err(format!(
                    "{{{name}}} appears twice; a topic uses each parameter once"
                ));
            }
            if open > 0 {
                parts.push(TopicPart::Literal(rest[..open].to_owned()));
                pattern.push_str(&regex::escape(&rest[..open]));
            }
            // Groups are numbered by occurrence: a parameter may appear twice, and parameter
            // names need not be valid group names.
            pattern.push_str(&format!("(?P<p{}>.+?)", parts.len()));
            parts.push(TopicPart::Param(name.to_owned()));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched }} in {template:?}"));
        }
        if !rest.is_empty() {
            parts.push(TopicPart::Literal(rest.to_owned()));
            pattern.push_str(&regex::escape(rest));
        }
        if parts.is_empty() {
            return Err("must not be empty".into());
        }
        pattern.push('$');
        let matcher = Regex::new(&pattern).map_err(|e| e.to_string())?;
        Ok(TopicTemplate { parts, matcher })
    }

    /// The parameter names the template uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            TopicPart::Param(name) => Some(name.as_str()),
            TopicPart::Literal(_) => None,
        })
    }

    /// Renders the template as a URL path: parameter values are percent-encoded, so no value
    /// can add a segment, a query or a fragment.
    pub fn render_path(&self, params: &[(String, String)]) -> String {
        self.render_with(params, |v, out| out.push_str(&percent_encode(v)))
    }

    /// The topic for validated parameter values.
    pub fn render(&self, params: &[(String, String)]) -> String {
        self.render_with(params, |v, out| out.push_str(v))
    }

    /// The template with each parameter's value written by `value`.
    fn render_with(
        &self,
        params: &[(String, String)],
        value: impl Fn(&str, &mut String),
    ) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TopicPart::Literal(l) => out.push_str(l),
                TopicPart::Param(name) => {
                    if let Some((_, v)) = params.iter().find(|(n, _)| n == name) {
                        value(v, &mut out);
                    }
                }
            }
        }
        out
    }

    /// The parameter values a topic string was rendered from, unvalidated; `None` if the
    /// template cannot produce it.
    /// A parameter that appears twice must have the same value at each place.
    pub fn capture(&self, topic: &str) -> Option<Vec<(String, String)>> {
        let caps = self.matcher.captures(topic)?;
        let mut values: Vec<(String, String)> = Vec::new();
        for (i, part) in self.parts.iter().enumerate() {
            let TopicPart::Param(name) = part else {
                continue;
            };
            let value = caps.name(&format!("p{i}"))?.as_str();
            match values.iter().find(|(n, _)| n == name) {
                Some((_, first)) if first != value => return None,
                Some(_) => {}
                None => values.push((name.clone(), value.to_owned())),
            }
        }
        Some(values)
    }
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

/// The optional route keys each kind takes (`upstream` alone for proxy routes).
const POLL_KEYS: &[&str] = &[
    "topic",
    "source",
    "auth",
    "hold",
    "max_hold",
    "max_batch",
    "start",
    "on_gap",
    "buffer",
    "linger",
    "max_topics",
    "upstream_grace",
    "cors",
];
const COLLAPSE_KEYS: &[&str] = &[
    "upstream",
    "topic",
    "auth",
    "linger",
    "max_topics",
    "cursor",
    "next_cursor",
    "share",
    "vary",
    "expose_headers",
    "max_unshared",
];

const SECTIONS: &[&str] = &[
    "listeners",
    "admin",
    "limits",
    "shutdown",
    "upstreams",
    "routes",
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

        let admin = self.admin(admin);
        let limits = self.limits(limits);
        let shutdown = ShutdownConfig {
            drain_window: shutdown.drain_window.map_or(DRAIN_WINDOW_DEFAULT, |d| d.0),
            timeout: shutdown.timeout.map_or(SHUTDOWN_TIMEOUT_DEFAULT, |d| d.0),
        };
        if shutdown.drain_window > shutdown.timeout {
            self.err(
                &["shutdown", "drain_window"],
                "must not be longer than shutdown.timeout",
            );
        }
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
        Some(Config {
            listeners,
            admin: admin?,
            limits,
            shutdown,
            upstreams,
            routes,
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

    fn admin(&mut self, raw: raw::Admin) -> Option<AdminConfig> {
        let text = raw
            .address
            .map_or(ADMIN_ADDRESS_DEFAULT.to_owned(), |s| s.0);
        let address = self.socket_addr(&["admin", "address"], &text)?;
        let publish_token = raw.publish_token.map(|s| s.0).filter(|t| !t.is_empty());
        if publish_token.is_none() && !address.ip().is_loopback() {
            self.err(
                &["admin", "publish_token"],
                "required when the admin listener is not bound to loopback",
            );
        }
        Some(AdminConfig {
            address,
            publish_token,
            reload: raw.reload.unwrap_or(false),
        })
    }

    fn limits(&mut self, raw: raw::Limits) -> LimitsConfig {
        let mut size = |key: &str, value: Option<u64>, default: usize, min: usize| -> usize {
            let v = value.map_or(default, |v| usize::try_from(v).unwrap_or(usize::MAX));
            if v < min {
                self.err(&["limits", key], format!("must be at least {min}"));
            }
            v
        };
        let max_header_bytes = size(
            "max_header_bytes",
            raw.max_header_bytes,
            MAX_HEADER_BYTES_DEFAULT,
            MAX_HEADER_BYTES_MIN,
        );
        let max_headers = size("max_headers", raw.max_headers, MAX_HEADERS_DEFAULT, 8);
        let max_uri_bytes = size(
            "max_uri_bytes",
            raw.max_uri_bytes,
            MAX_URI_BYTES_DEFAULT,
            256,
        );
        let max_message_bytes = size(
            "max_message_bytes",
            raw.max_message_bytes,
            MAX_MESSAGE_BYTES_DEFAULT,
            1,
        );
        let max_polls_per_client = size(
            "max_polls_per_client",
            raw.max_polls_per_client,
            MAX_POLLS_PER_CLIENT_DEFAULT,
            1,
        );
        let max_buffered_bytes = size(
            "max_buffered_bytes",
            raw.max_buffered_bytes,
            MAX_BUFFERED_BYTES_DEFAULT,
            1,
        );
        let max_connections_per_ip = size(
            "max_connections_per_ip",
            raw.max_connections_per_ip,
            MAX_CONNECTIONS_PER_IP_DEFAULT,
            0,
        );
        let new_connections_per_ip_per_second = size(
            "new_connections_per_ip_per_second",
            raw.new_connections_per_ip_per_second,
            NEW_CONNECTIONS_PER_IP_PER_SECOND_DEFAULT,
            0,
        );
        let http2_max_concurrent_streams = size(
            "http2_max_concurrent_streams",
            raw.http2_max_concurrent_streams,
            HTTP2_MAX_CONCURRENT_STREAMS_DEFAULT,
            1,
        );
        if raw.max_connections == Some(0) {
            self.err(&["limits", "max_connections"], "must be at least 1");
        }
        let mut positive = |key: &str, value: Option<raw::Dur>, default: Duration| {
            let d = value.map_or(default, |d| d.0);
            if d.is_zero() {
                self.err(&["limits", key], "must be above zero");
            }
            d
        };
        let write_timeout = positive("write_timeout", raw.write_timeout, WRITE_TIMEOUT_DEFAULT);
        let http2_keep_alive_interval = positive(
            "http2_keep_alive_interval",
            raw.http2_keep_alive_interval,
            HTTP2_KEEP_ALIVE_INTERVAL_DEFAULT,
        );
        let mut trusted_proxies = Vec::new();
        for (i, entry) in raw.trusted_proxies.unwrap_or_default().iter().enumerate() {
            let text = entry.0.trim();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => self.err(
                    &["limits", "trusted_proxies"],
                    format!("entry {i}: {text:?} is not an IP address or CIDR network"),
                ),
            }
        }
        LimitsConfig {
            max_connections: raw.max_connections,
            header_read_timeout: raw
                .header_read_timeout
                .map_or(HEADER_READ_TIMEOUT_DEFAULT, |d| d.0),
            tls_handshake_timeout: raw
                .tls_handshake_timeout
                .map_or(TLS_HANDSHAKE_TIMEOUT_DEFAULT, |d| d.0),
            max_header_bytes,
            max_headers,
            max_uri_bytes,
            max_message_bytes,
            max_polls_per_client,
            write_timeout,
            max_buffered_bytes,
            max_connections_per_ip,
            new_connections_per_ip_per_second: u32::try_from(new_connections_per_ip_per_second)
                .unwrap_or(u32::MAX),
            http2_max_concurrent_streams: u32::try_from(http2_max_concurrent_streams)
                .unwrap_or(u32::MAX),
            http2_keep_alive_interval,
            trusted_proxies,
        }
    }

    fn socket_addr(&mut self, path: &[&str], text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("{text:?} is not an IP:port address (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"),
                );
                None
            }
        }
    }

    fn listener(&mut self, name: String, raw: raw::Listener) -> Option<ListenerConfig> {
        let address = self.socket_addr(&["listeners", &name, "address"], &raw.address.0);
        let tls = match raw.tls {
            None => None,
            Some(t) => {
                let cert_file = self.base_dir.join(&t.cert_file.0);
                let key_file = self.base_dir.join(&t.key_file.0);
                match tls::load_server_config(&cert_file, &key_file) {
                    Ok(server_config) => Some(TlsConfig {
                        cert_file,
                        key_file,
                        server_config,
                    }),
                    Err(e) => {
                        self.err(&["listeners", &name, "tls", e.key()], e.to_string());
                        None
                    }
                }
            }
        };
        Some(ListenerConfig {
            name,
            address: address?,
            http2: raw.http2,
            tls,
        })
    }

    fn distinct_addresses(&mut self, listeners: &[ListenerConfig], admin: Option<&AdminConfig>) {
        let mut seen: BTreeMap<SocketAddr, String> = BTreeMap::new();
        if let Some(a) = admin {
            seen.insert(a.address, "admin".into());
        }
        for l in listeners {
            if l.address.port() == 0 {
                continue;
            }
            if let Some(other) = seen.insert(l.address, l.name.clone()) {
                self.err(
                    &["listeners", &l.name, "address"],
                    format!("{} is already used by {other}", l.address),
                );
            }
        }
    }

    fn upstream(&mut self, name: String, raw: raw::Upstream) -> Option<UpstreamConfig> {
        let n = name.as_str();
        let path = ["upstreams", n, "url"];
        let url = match raw.url.0.parse::<Uri>() {
            Ok(u) => {
                let scheme_ok = matches!(u.scheme_str(), Some("http" | "https"));
                if !scheme_ok || u.authority().is_none() {
                    self.err(&path, "must be an absolute http:// or https:// URL");
                    None
                } else if u.query().is_some() {
                    self.err(&path, "must not have a query");
                    None
                } else {
                    Some(u)
                }
            }
            Err(e) => {
                self.err(&path, format!("invalid URL {:?}: {e}", raw.url.0));
                None
            }
        };
        let mut headers = Vec::new();
        for (key, value) in &raw.headers {
            let hpath = ["upstreams", name.as_str(), "headers", key.as_str()];
            match (
                HeaderName::try_from(key.as_str()),
                HeaderValue::try_from(value.0.as_str()),
            ) {
                (Ok(k), Ok(mut v)) => {
                    v.set_sensitive(true);
                    headers.push((k, v));
                }
                (Err(_), _) => self.err(&hpath, "invalid header name"),
                (_, Err(_)) => self.err(&hpath, "invalid header value"),
            }
        }
        let ca_certs = raw.ca_file.and_then(|f| {
            let file = self.base_dir.join(&f.0);
            match tls::load_certs(&file) {
                Ok(certs) => Some(Arc::new(certs)),
                Err(e) => {
                    self.err(&["upstreams", n, "ca_file"], e.to_string());
                    None
                }
            }
        });
        Some(UpstreamConfig {
            url: url?,
            ca_certs,
            connect_timeout: raw
                .connect_timeout
                .map_or(UPSTREAM_CONNECT_TIMEOUT_DEFAULT, |d| d.0),
            timeout: raw.timeout.map_or(UPSTREAM_TIMEOUT_DEFAULT, |d| d.0),
            pool_idle_timeout: raw
                .pool_idle_timeout
                .map_or(UPSTREAM_POOL_IDLE_TIMEOUT_DEFAULT, |d| d.0),
            pool_max_idle_per_host: raw
                .pool_max_idle_per_host
                .map_or(UPSTREAM_POOL_MAX_IDLE_DEFAULT, |n| n as usize),
            headers,
            name,
        })
    }

    fn route(
        &mut self,
        name: String,
        raw: raw::Route,
        upstreams: &[UpstreamConfig],
    ) -> Option<RouteConfig> {
        let n = name.as_str();
        let path = match PathTemplate::parse(&raw.path.0) {
            Ok(path) => path,
            Err(e) => {
                self.err(&["routes", n, "path"], e);
                return None;
            }
        };
        let names = path.params().to_vec();
        for key in raw.params.keys() {
            if !names.iter().any(|(name, _)| name == key) {
                self.err(
                    &["routes", n, "params", key],
                    format!("the path {:?} has no parameter {{{key}}}", path.as_str()),
                );
            }
        }
        let mut params = Vec::new();
        for (p, tail) in names {
            let default = if tail {
                TAIL_PATTERN_DEFAULT
            } else {
                PARAM_PATTERN_DEFAULT
            };
            let pattern = raw.params.get(&p).map_or(default, |s| s.0.as_str());
            match Regex::new(&format!("^(?:{pattern})$")) {
                Ok(pattern) => params.push(Param {
                    name: p,
                    pattern,
                    tail,
                }),
                Err(e) => self.err(
                    &["routes", n, "params", &p],
                    format!("invalid pattern: {e}"),
                ),
            }
        }
        let kind_name = raw.kind.0.clone();
        let used: &[&str] = match kind_name.as_str() {
            "poll" => POLL_KEYS,
            "collapse" => COLLAPSE_KEYS,
            _ => &["upstream"],
        };
        for (key, set) in raw.optional_keys() {
            if set && !used.contains(&key) {
                let hint = if key == "upstream" && kind_name == "poll" {
                    " (its source names the upstream)"
                } else {
                    ""
                };
                self.err(
                    &["routes", n, key],
                    format!("not used by kind = {kind_name:?}{hint}"),
                );
            }
        }
        let names: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        let kind = match raw.kind.0.as_str() {
            "poll" => RouteKind::Poll(Box::new(self.poll(n, raw, &names, upstreams)?)),
            "collapse" => RouteKind::Collapse(Box::new(self.collapse(n, raw, &names, upstreams)?)),
            "proxy" => {
                let at = ["routes", n, "upstream"];
                let index = self.upstream_ref(&at, "kind = \"proxy\"", raw.upstream, upstreams)?;
                RouteKind::Proxy { upstream: index }
            }
            other => {
                self.err(
                    &["routes", n, "kind"],
                    format!("unknown kind {other:?}, expected \"proxy\", \"poll\" or \"collapse\""),
                );
                return None;
            }
        };
        Some(RouteConfig {
            name,
            path,
            params,
            kind,
        })
    }

    fn source(
        &mut self,
        n: &str,
        s: raw::Source,
        topic: Option<&TopicTemplate>,
        upstreams: &[UpstreamConfig],
    ) -> Option<SourceConfig> {
        let at = |key: &'static str| ["routes", n, "source", key];
        match s.kind.0.as_str() {
            "publish" => {
                for (key, set) in [
                    ("upstream", s.upstream.is_some()),
                    ("path", s.path.is_some()),
                    ("idle_timeout", s.idle_timeout.is_some()),
                    ("id_pointer", s.id_pointer.is_some()),
                    ("resume_param", s.resume_param.is_some()),
                    ("items_pointer", s.items_pointer.is_some()),
                ] {
                    if set {
                        self.err(&at(key), "not used by type = \"publish\"");
                    }
                }
                Some(SourceConfig::Publish)
            }
            "upstream-poll" => {
                for (key, set) in [
                    ("resume_param", s.resume_param.is_some()),
                    ("idle_timeout", s.idle_timeout.is_some()),
                ] {
                    if set {
                        let msg = "not used by type = \"upstream-poll\" (its path takes {cursor})";
                        self.err(&at(key), msg);
                    }
                }
                let upstream = self.upstream_ref(
                    &at("upstream"),
                    "type = \"upstream-poll\"",
                    s.upstream,
                    upstreams,
                );
                let mut allowed = topic_param_names(topic);
                allowed.push("cursor".to_owned());
                let path = self.source_path(n, "upstream-poll", s.path, &allowed);
                let id_pointer = self.pointer(n, "id_pointer", s.id_pointer)?;
                let items_pointer = match s.items_pointer {
                    None => None,
                    Some(p) => Some(self.pointer(n, "items_pointer", Some(p))?),
                };
                Some(SourceConfig::UpstreamPoll {
                    upstream: upstream?,
                    path: path?,
                    id_pointer,
                    items_pointer,
                })
            }
            kind @ ("upstream-sse" | "upstream-ndjson") => {
                let format = if kind == "upstream-sse" {
                    for (key, set) in [
                        ("id_pointer", s.id_pointer.is_some()),
                        ("resume_param", s.resume_param.is_some()),
                        ("items_pointer", s.items_pointer.is_some()),
                    ] {
                        if set {
                            let msg = "not used by type = \"upstream-sse\" (ids come from id:)";
                            self.err(&at(key), msg);
                        }
                    }
                    StreamFormat::Sse
                } else {
                    let id_pointer = self.pointer(n, "id_pointer", s.id_pointer)?;
                    let resume_param = s
                        .resume_param
                        .map_or(RESUME_PARAM_DEFAULT.to_owned(), |p| p.0);
                    if !plain_name(&resume_param) {
                        self.err(&at("resume_param"), "use letters, digits and -._~ only");
                    }
                    StreamFormat::Ndjson {
                        id_pointer,
                        resume_param,
                    }
                };
                let upstream = self.upstream_ref(
                    &at("upstream"),
                    &format!("type = {kind:?}"),
                    s.upstream,
                    upstreams,
                );
                let path = self.source_path(n, kind, s.path, &topic_param_names(topic));
                Some(SourceConfig::UpstreamStream {
                    format,
                    upstream: upstream?,
                    path: path?,
                    idle_timeout: s.idle_timeout.map_or(SOURCE_IDLE_TIMEOUT_DEFAULT, |d| d.0),
                })
            }
            other => {
                self.err(
                    &at("type"),
                    format!(
                        "unknown source type {other:?}: use \"publish\", \"upstream-poll\", \"upstream-sse\" or \"upstream-ndjson\""
                    ),
                );
                None
            }
        }
    }

    /// The index of the upstream a route or source names at `at` (required for `what`).
    fn upstream_ref(
        &mut self,
        at: &[&str],
        what: &str,
        name: Option<raw::Str>,
        upstreams: &[UpstreamConfig],
    ) -> Option<usize> {
        let Some(name) = name else {
            self.err(at, format!("required for {what}"));
            return None;
        };
        let found = upstreams.iter().position(|u| u.name == name.0);
        if found.is_none() && !self.declared_upstreams.contains(&name.0) {
            self.err(at, format!("no upstream named {:?} in [upstreams]", name.0));
        }
        found
    }

    /// A source's path template. It may use only `allowed` parameters (the topic's, and
    /// `cursor` for upstream-poll): two clients of one topic must never ask the upstream
    /// different things.
    fn source_path(
        &mut self,
        n: &str,
        kind: &str,
        path: Option<raw::Str>,
        allowed: &[String],
    ) -> Option<TopicTemplate> {
        self.upstream_path(&["routes", n, "source", "path"], kind, path, allowed)
    }

    /// A path template of a request pollmux makes (a source's, a hook's), over `allowed`
    /// parameters only.
    fn upstream_path(
        &mut self,
        at: &[&str],
        kind: &str,
        path: Option<raw::Str>,
        allowed: &[String],
    ) -> Option<TopicTemplate> {
        let at = at.to_vec();
        let Some(path) = path else {
            self.err(&at, format!("required for type = {kind:?}"));
            return None;
        };
        if !path.0.starts_with('/') {
            self.err(&at, "must start with /");
            return None;
        }
        match TopicTemplate::parse_path(&path.0, allowed) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(&at, format!("{e} (the topic's parameters only)"));
                None
            }
        }
    }

    /// A JSON pointer key of a source (`/id` when absent for `id_pointer`).
    fn pointer(&mut self, n: &str, key: &str, value: Option<raw::Str>) -> Option<String> {
        let pointer = value.map_or(ID_POINTER_DEFAULT.to_owned(), |p| p.0);
        if pointer.is_empty() || pointer.starts_with('/') {
            Some(pointer)
        } else {
            self.err(
                &["routes", n, "source", key],
                "a JSON pointer starts with / (e.g. \"/id\")",
            );
            None
        }
    }

    fn poll(
        &mut self,
        n: &str,
        raw: raw::Route,
        params: &[String],
        upstreams: &[UpstreamConfig],
    ) -> Option<PollConfig> {
        let topic = self.topic(n, raw.topic.clone(), params);
        let source = match raw.source {
            None => {
                self.err(
                    &["routes", n, "source"],
                    "required for kind = \"poll\", e.g. { type = \"publish\" }",
                );
                None
            }
            Some(s) => self.source(n, s, topic.as_ref(), upstreams),
        };
        let auth = self.auth(n, "poll", raw.auth.clone(), topic.as_ref(), upstreams);
        let hold = raw.hold.map_or(HOLD_DEFAULT, |d| d.0);
        let max_hold = raw.max_hold.map_or(MAX_HOLD_DEFAULT, |d| d.0);
        if hold > max_hold {
            self.err(&["routes", n, "hold"], "must not be longer than max_hold");
        }
        let max_batch = raw.max_batch.map_or(MAX_BATCH_DEFAULT, |v| v as usize);
        if max_batch == 0 {
            self.err(&["routes", n, "max_batch"], "must be at least 1");
        }
        let start = match raw.start.as_ref().map(|s| s.0.as_str()) {
            None | Some("latest") => Start::Latest,
            Some("earliest") => Start::Earliest,
            Some(other) => {
                self.err(
                    &["routes", n, "start"],
                    format!("{other:?} is not \"latest\" or \"earliest\""),
                );
                Start::Latest
            }
        };
        let on_gap = match raw.on_gap.as_ref().map(|s| s.0.as_str()) {
            None | Some("error") => OnGap::Error,
            Some("resume") => OnGap::Resume,
            Some(other) => {
                self.err(
                    &["routes", n, "on_gap"],
                    format!("{other:?} is not \"error\" or \"resume\""),
                );
                OnGap::Error
            }
        };
        let b = raw.buffer.unwrap_or_default();
        let buffer = BufferConfig {
            messages: b.messages.map_or(BUFFER_MESSAGES_DEFAULT, |v| v as usize),
            bytes: b.bytes.map_or(BUFFER_BYTES_DEFAULT, |v| v as usize),
            age: b.age.map_or(BUFFER_AGE_DEFAULT, |d| d.0),
        };
        if buffer.messages == 0 || buffer.bytes == 0 || buffer.age.is_zero() {
            self.err(
                &["routes", n, "buffer"],
                "messages, bytes and age must all be above zero",
            );
        }
        let max_topics = self.max_topics(n, raw.max_topics);
        let cors = self.cors(n, raw.cors, auth.as_ref());
        Some(PollConfig {
            topic: topic?,
            auth: auth?,
            source: source?,
            hold,
            max_hold,
            max_batch,
            start,
            on_gap,
            buffer,
            linger: raw.linger.map_or(LINGER_DEFAULT, |d| d.0),
            max_topics,
            upstream_grace: raw.upstream_grace.map_or(UPSTREAM_GRACE_DEFAULT, |d| d.0),
            cors,
        })
    }

    /// A poll route's `cors` table. Credentials with a wildcard would let any site read with
    /// its visitors' cookies and tokens: refused.
    fn cors(&mut self, n: &str, raw: Option<raw::Cors>, auth: Option<&AuthConfig>) -> CorsConfig {
        let raw = raw.unwrap_or_default();
        let mut cors = CorsConfig {
            origins: Vec::new(),
            any_origin: false,
            credentials: raw.credentials.unwrap_or(false),
            allow_headers: HeaderValue::from_static("Authorization, Last-Event-ID"),
        };
        for origin in raw.origins {
            if origin.0 == "*" {
                cors.any_origin = true;
                continue;
            }
            let ok = origin.0.parse::<Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && u.path_and_query()
                        .is_none_or(|pq| pq.as_str() == "/" || pq.as_str().is_empty())
                    && !origin.0.ends_with('/')
            });
            if ok {
                cors.origins.push(origin.0);
            } else {
                self.err(
                    &["routes", n, "cors", "origins"],
                    format!(
                        "{:?} is not \"*\" or an origin like \"https://app.example\"",
                        origin.0
                    ),
                );
            }
        }
        if cors.credentials && cors.origins.is_empty() && !cors.any_origin {
            self.err(
                &["routes", n, "cors", "credentials"],
                "allows credentials for no origin: list the origins in cors.origins",
            );
        }
        if cors.any_origin && cors.credentials {
            self.err(
                &["routes", n, "cors", "credentials"],
                "cannot be used with origins = [\"*\"]: list the exact origins that may send \
                 credentials",
            );
        }
        // Request headers a preflight allows: the credential a poll may carry, the SSE resume
        // header, and whatever the hook is given. Cookies need no listing (and may not be).
        let mut allow = vec!["Authorization".to_owned(), "Last-Event-ID".to_owned()];
        if let Some(AuthConfig::Hook(hook)) = auth {
            for h in &hook.headers {
                let listed = allow.iter().any(|a| a.eq_ignore_ascii_case(h.as_str()));
                if !listed && *h != http::header::COOKIE {
                    allow.push(h.as_str().to_owned());
                }
            }
        }
        cors.allow_headers = HeaderValue::from_str(&allow.join(", "))
            .expect("header names are valid header value text");
        cors
    }

    /// A route's topic template; without `topic`, the path parameters joined by `/`.
    fn topic(
        &mut self,
        n: &str,
        topic: Option<raw::Str>,
        params: &[String],
    ) -> Option<TopicTemplate> {
        let template = match topic {
            Some(t) => t.0,
            None if params.is_empty() => {
                self.err(
                    &["routes", n, "topic"],
                    "required when the path has no parameters",
                );
                return None;
            }
            None => params
                .iter()
                .map(|p| format!("{{{p}}}"))
                .collect::<Vec<_>>()
                .join("/"),
        };
        match TopicTemplate::parse(&template, params) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(&["routes", n, "topic"], e);
                None
            }
        }
    }

    /// A route's `auth`: `"public"` or `{ hook = { upstream, path, ttl, timeout, headers } }`.
    fn auth(
        &mut self,
        n: &str,
        kind: &str,
        auth: Option<toml::Value>,
        topic: Option<&TopicTemplate>,
        upstreams: &[UpstreamConfig],
    ) -> Option<AuthConfig> {
        let at = |key: &'static str| ["routes", n, "auth", "hook", key];
        let raw: raw::Auth = match auth {
            None => {
                self.err(
                    &["routes", n, "auth"],
                    format!(
                        "required for kind = {kind:?}: \"public\" lets anyone read, \
                         {{ hook = {{ upstream, path }} }} asks an upstream"
                    ),
                );
                return None;
            }
            Some(toml::Value::String(s)) if s == "public" => return Some(AuthConfig::Public),
            Some(value @ toml::Value::Table(_)) => match value.try_into() {
                Ok(raw) => raw,
                Err(e) => {
                    self.err(&["routes", n, "auth"], e.message().to_owned());
                    return None;
                }
            },
            Some(_) => {
                self.err(
                    &["routes", n, "auth"],
                    "use \"public\" or { hook = { upstream, path } }",
                );
                return None;
            }
        };
        let hook = match (raw.hook, raw.jwt) {
            (Some(hook), None) => hook,
            (None, Some(jwt)) => return self.jwt(n, jwt).map(AuthConfig::Jwt),
            _ => {
                self.err(
                    &["routes", n, "auth"],
                    "give exactly one of hook = { ... } or jwt = { ... }",
                );
                return None;
            }
        };
        let upstream = self.upstream_ref(&at("upstream"), "a hook", Some(hook.upstream), upstreams);
        let path = self.upstream_path(
            &at("path"),
            "a hook",
            Some(hook.path),
            &topic_param_names(topic),
        );
        let mut headers = Vec::new();
        let names = hook.headers.unwrap_or_else(|| {
            HOOK_HEADERS_DEFAULT
                .iter()
                .map(|h| raw::Str((*h).to_owned()))
                .collect()
        });
        for name in names {
            let Some(h) = self.header_name(&at("headers"), &name.0) else {
                continue;
            };
            if upstream.is_some_and(|u: usize| upstreams[u].headers.iter().any(|(n, _)| *n == h)) {
                self.err(
                    &at("headers"),
                    format!(
                        "{h} is set by the upstream's own headers, so the client's cannot be \
                         passed; give the hook an [upstreams] entry of its own without it"
                    ),
                );
            }
            headers.push(h);
        }
        let ttl = hook.ttl.map_or(HOOK_TTL_DEFAULT, |d| d.0);
        let timeout = hook.timeout.map_or(HOOK_TIMEOUT_DEFAULT, |d| d.0);
        if timeout.is_zero() {
            self.err(&at("timeout"), "must be above zero");
        }
        Some(AuthConfig::Hook(HookConfig {
            upstream: upstream?,
            path: path?,
            headers,
            ttl,
            timeout,
        }))
    }

    /// `auth = { jwt = { issuer, audience, key_file | jwks_url, algorithms, leeway,
    /// topics_claim } }`.
    fn jwt(&mut self, n: &str, raw: raw::Jwt) -> Option<JwtConfig> {
        use jsonwebtoken::Algorithm;
        let at = |key: &'static str| ["routes", n, "auth", "jwt", key];
        const RSA: &[Algorithm] = &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ];
        const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
        const ED: &[Algorithm] = &[Algorithm::EdDSA];
        let (keys, family): (JwtKeys, Vec<Algorithm>) = match (raw.key_file, raw.jwks_url) {
            (Some(file), None) => {
                let path = self.base_dir.join(&file.0);
                let pem = match std::fs::read(&path) {
                    Ok(pem) => pem,
                    Err(e) => {
                        self.err(
                            &at("key_file"),
                            format!("cannot read {}: {e}", path.display()),
                        );
                        return None;
                    }
                };
                let loaded = jsonwebtoken::DecodingKey::from_rsa_pem(&pem)
                    .map(|k| (k, RSA))
                    .or_else(|_| jsonwebtoken::DecodingKey::from_ec_pem(&pem).map(|k| (k, EC)))
                    .or_else(|_| jsonwebtoken::DecodingKey::from_ed_pem(&pem).map(|k| (k, ED)));
                match loaded {
                    Ok((key, family)) => (JwtKeys::File(JwtKey(Arc::new(key))), family.to_vec()),
                    Err(_) => {
                        self.err(
                            &at("key_file"),
                            format!(
                                "{} holds no RSA, EC or Ed25519 public key (PEM)",
                                path.display()
                            ),
                        );
                        return None;
                    }
                }
            }
            (None, Some(url)) => match url.0.parse::<Uri>() {
                // Keys decide who may read: fetched over TLS, or from this machine.
                Ok(uri)
                    if uri.scheme_str() == Some("https")
                        || (uri.scheme_str() == Some("http")
                            && uri.host().is_some_and(is_loopback_host)) =>
                {
                    (JwtKeys::Jwks(uri), [RSA, EC, ED].concat())
                }
                _ => {
                    self.err(
                        &at("jwks_url"),
                        format!("{:?} is not an https URL (http only on loopback)", url.0),
                    );
                    return None;
                }
            },
            _ => {
                self.err(
                    &["routes", n, "auth", "jwt"],
                    "give exactly one of key_file (a PEM public key) or jwks_url",
                );
                return None;
            }
        };
        let algorithms = match raw.algorithms {
            None => family,
            Some(names) => {
                let mut algorithms = Vec::new();
                for name in names {
                    match name.0.parse::<Algorithm>() {
                        Ok(a) if family.contains(&a) => algorithms.push(a),
                        _ => self.err(
                            &at("algorithms"),
                            format!(
                                "{:?} is not allowed here: use asymmetric algorithms matching the key ({})",
                                name.0,
                                family.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
                            ),
                        ),
                    }
                }
                algorithms
            }
        };
        if algorithms.is_empty() {
            self.err(&at("algorithms"), "at least one algorithm is required");
        }
        let topics_claim = raw
            .topics_claim
            .map_or(JWT_TOPICS_CLAIM_DEFAULT.to_owned(), |c| c.0);
        Some(JwtConfig {
            issuer: raw.issuer.0,
            audience: raw.audience.0,
            keys,
            algorithms,
            leeway: raw.leeway.map_or(JWT_LEEWAY_DEFAULT, |d| d.0),
            topics_claim,
        })
    }

    fn max_topics(&mut self, n: &str, value: Option<u64>) -> usize {
        let max_topics = value.map_or(MAX_TOPICS_DEFAULT, |v| v as usize);
        if max_topics == 0 {
            self.err(&["routes", n, "max_topics"], "must be at least 1");
        }
        max_topics
    }

    fn collapse(
        &mut self,
        n: &str,
        raw: raw::Route,
        params: &[String],
        upstreams: &[UpstreamConfig],
    ) -> Option<CollapseConfig> {
        let at = |key: &'static str| ["routes", n, key];
        let upstream = self.upstream_ref(
            &at("upstream"),
            "kind = \"collapse\"",
            raw.upstream.clone(),
            upstreams,
        );
        let topic = self.topic(n, raw.topic.clone(), params);
        let auth = self.auth(n, "collapse", raw.auth.clone(), topic.as_ref(), upstreams);
        let cursor = raw.cursor.map(|c| c.query.0);
        if cursor.as_deref().is_some_and(|c| !plain_name(c)) {
            self.err(
                &["routes", n, "cursor", "query"],
                "use letters, digits and -._~ only",
            );
        }
        let next_cursor = match raw.next_cursor {
            None => None,
            Some(next) => match (next.json, next.header) {
                (Some(p), None) if p.0.starts_with('/') => Some(NextCursor::Json(p.0)),
                (Some(_), None) => {
                    self.err(
                        &["routes", n, "next_cursor", "json"],
                        "a JSON pointer starts with / (e.g. \"/version\")",
                    );
                    None
                }
                (None, Some(h)) => self
                    .header_name(&["routes", n, "next_cursor", "header"], &h.0)
                    .map(NextCursor::Header),
                _ => {
                    self.err(
                        &["routes", n, "next_cursor"],
                        "give exactly one of json (a JSON pointer) or header",
                    );
                    None
                }
            },
        };
        if next_cursor.is_some() && cursor.is_none() {
            self.err(
                &at("next_cursor"),
                "needs cursor.query: the parameter the next cursor goes into",
            );
        }
        let share_public = match raw.share.as_ref().map(|s| s.0.as_str()) {
            None => false,
            Some("public") => true,
            Some(other) => {
                self.err(&at("share"), format!("{other:?} is not \"public\""));
                false
            }
        };
        let mut vary = Vec::new();
        for name in raw.vary.unwrap_or_default() {
            let Some(h) = self.header_name(&["routes", n, "vary"], &name.0) else {
                continue;
            };
            let set_by_upstream = upstream
                .is_some_and(|u: usize| upstreams[u].headers.iter().any(|(name, _)| *name == h));
            if set_by_upstream {
                self.err(
                    &["routes", n, "vary"],
                    format!("{h} is set by the upstream's headers, so it cannot vary"),
                );
            }
            vary.push(h);
        }
        // Clients authorized one by one (hook or JWT) may share the answer of their topic.
        let hooked = matches!(auth, Some(AuthConfig::Hook(_) | AuthConfig::Jwt(_)));
        if !share_public && vary.is_empty() && !hooked && auth.is_some() {
            self.err(
                &at("share"),
                "a collapse route shares upstream answers between clients: say share = \"public\" \
                 (the answer does not depend on who asks), list the headers it depends on in vary \
                 (e.g. vary = [\"authorization\"]), or authorize each client with auth = { hook }",
            );
        }
        let max_unshared = raw
            .max_unshared
            .map_or(MAX_UNSHARED_DEFAULT, |v| v as usize);
        if max_unshared == 0 {
            self.err(&at("max_unshared"), "must be at least 1");
        }
        let mut expose_headers = Vec::new();
        for name in raw.expose_headers.unwrap_or_default() {
            let Some(h) = self.header_name(&["routes", n, "expose_headers"], &name.0) else {
                continue;
            };
            if h == http::header::SET_COOKIE {
                self.err(
                    &["routes", n, "expose_headers"],
                    "set-cookie is never shared between clients",
                );
            }
            expose_headers.push(h);
        }
        let max_topics = self.max_topics(n, raw.max_topics);
        Some(CollapseConfig {
            upstream: upstream?,
            topic: topic?,
            auth: auth?,
            max_unshared,
            cursor,
            next_cursor,
            share_public,
            vary,
            expose_headers,
            linger: raw.linger.map_or(LINGER_DEFAULT, |d| d.0),
            max_topics,
        })
    }

    fn header_name(&mut self, at: &[&str], name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(at, format!("{name:?} is not a header name"));
                None
            }
        }
    }

    /// Two templates that some path matches equally well are refused: neither could win.
    fn distinct_templates(&mut self, routes: &[RouteConfig]) {
        for (i, r) in routes.iter().enumerate() {
            if let Some(other) = routes[..i].iter().find(|o| o.path.ambiguous_with(&r.path)) {
                self.err(
                    &["routes", &r.name, "path"],
                    format!(
                        "conflicts with another route: {:?} and {:?} (routes.{}) match the same \
                         paths equally well, so neither can win",
                        r.path.as_str(),
                        other.path.as_str(),
                        other.name
                    ),
                );
            }
        }
    }
}

/// For an unknown key of a route, the keys its own kind takes (serde would offer every route
/// key of every kind), and the nearest of them when one is close.
fn unknown_key_hint(at: &[&str], table: &DeTable<'_>, message: &str) -> Option<String> {
    let ["routes", _] = at else {
        return None;
    };
    let unknown = message.strip_prefix("unknown field `")?.split('`').next()?;
    let kind = table.iter().find(|(k, _)| k.get_ref() == "kind")?.1;
    let DeValue::String(kind) = kind.get_ref() else {
        return None;
    };
    let own: &[&str] = match kind.as_ref() {
        "poll" => POLL_KEYS,
        "collapse" => COLLAPSE_KEYS,
        "proxy" => &["upstream"],
        _ => return None,
    };
    let keys: Vec<&str> = ["path", "kind", "params"]
        .into_iter()
        .chain(own.iter().copied())
        .collect();
    let nearest = keys
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .filter(|(d, k)| *d <= 2 && *d < k.len())
        .min();
    let mut hint = format!(
        "unknown field `{unknown}`; kind = {kind:?} takes {}",
        keys.join(", ")
    );
    if let Some((_, k)) = nearest {
        hint.push_str(&format!(" (did you mean `{k}`?)"));
    }
    Some(hint)
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a value placed in a
/// URL path segment or query.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `localhost` or a loopback IP (brackets of an IPv6 host allowed).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A query parameter name that needs no encoding: unreserved characters only.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
}

/// The parameter names a topic template uses (none when the template was invalid).
fn topic_param_names(topic: Option<&TopicTemplate>) -> Vec<String> {
    topic
        .map(|t| t.params().map(str::to_owned).collect())
        .unwrap_or_default()
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

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, Path::new("."))
    }

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
    fn cors_wildcard_and_credentials() {
        let route = |cors: &str| format!("{POLL}cors = {cors}\n");
        let c = parse(&route("{ origins = [\"*\"] }")).unwrap();
        let RouteKind::Poll(p) = &c.routes[0].kind else {
            panic!("a poll route")
        };
        assert!(p.cors.any_origin && !p.cors.credentials);
        let c = parse(&route(
            "{ origins = [\"https://a.example\"], credentials = true }",
        ))
        .unwrap();
        let RouteKind::Poll(p) = &c.routes[0].kind else {
            panic!("a poll route")
        };
        assert_eq!(p.cors.origins, ["https://a.example"]);
        assert!(p.cors.credentials);
        let errs = parse(&route("{ credentials = true }"))
            .unwrap_err()
            .to_string();
        assert!(errs.contains("for no origin"), "{errs}");
        // A typo inside `cors` gets serde's list of cors keys, not the route's.
        let errs = parse(&route("{ origins = [], credential = true }"))
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("routes.orders.cors.credential") && errs.contains("`credentials`"),
            "{errs}"
        );
        assert!(!errs.contains("takes path"), "{errs}");
        let errs = parse(&route("{ origins = [\"*\"], credentials = true }"))
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("routes.orders.cors.credentials") && errs.contains("exact origins"),
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
    fn conflicting_templates_are_rejected() {
        let text = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[upstreams.u]\nurl = \"http://x\"\n\
                    [routes.a]\npath = \"/x/{id}\"\nkind = \"proxy\"\nupstream = \"u\"\n\
                    [routes.b]\npath = \"/x/{name}\"\nkind = \"proxy\"\nupstream = \"u\"\n";
        let errs = parse(text).unwrap_err().to_string();
        assert!(
            errs.contains("routes.b.path") && errs.contains("conflict"),
            "{errs}"
        );
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

    #[test]
    fn public_admin_needs_a_token() {
        let text = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[admin]\naddress = \"0.0.0.0:9\"\n";
        let errs = parse(text).unwrap_err().to_string();
        assert!(errs.contains("admin.publish_token"), "{errs}");
    }

    const POLL: &str = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[routes.orders]\n\
                        path = \"/o/{region}/{id}\"\nkind = \"poll\"\nsource.type = \"publish\"\n\
                        auth = \"public\"\n";

    #[test]
    fn poll_route_defaults() {
        let c = parse(POLL).unwrap();
        let RouteKind::Poll(p) = &c.routes[0].kind else {
            panic!("poll route")
        };
        assert_eq!(p.hold, HOLD_DEFAULT);
        assert_eq!(p.max_batch, MAX_BATCH_DEFAULT);
        assert_eq!(p.start, Start::Latest);
        let params = [
            ("region".to_string(), "eu".to_string()),
            ("id".to_string(), "42".to_string()),
        ];
        assert_eq!(p.topic.render(&params), "eu/42");
        assert_eq!(p.topic.capture("eu/42").unwrap(), params);
    }

    #[test]
    fn poll_route_errors() {
        let text = format!(
            "{POLL}topic = \"x:{{nope}}\"\nhold = \"60s\"\non_gap = \"skip\"\ncors.origins = [\"app.example\"]\n\
             [upstreams.u]\nurl = \"http://x\"\n[routes.p]\npath = \"/p\"\nkind = \"proxy\"\nupstream = \"u\"\nhold = \"1s\"\n"
        );
        let errs = parse(&text).unwrap_err().to_string();
        for e in [
            "routes.orders.topic",
            "routes.orders.hold",
            "routes.orders.on_gap",
            "routes.orders.cors.origins",
            "routes.p.hold",
        ] {
            assert!(errs.contains(e), "missing {e} in {errs}");
        }
    }

    const COLLAPSE: &str = "[listeners.p]\naddress = \"127.0.0.1:1\"\n\
                            [upstreams.api]\nurl = \"http://x\"\nheaders = { Authorization = \"Bearer own\" }\n\
                            [routes.status]\npath = \"/status/{id}\"\nkind = \"collapse\"\n\
                            upstream = \"api\"\nauth = \"public\"\n";

    #[test]
    fn collapse_route_settings() {
        let text = format!(
            "{COLLAPSE}topic = \"status:{{id}}\"\ncursor.query = \"version\"\n\
             next_cursor.json = \"/version\"\nvary = [\"X-Tenant\"]\nexpose_headers = [\"x-trace\"]\n"
        );
        let c = parse(&text).unwrap();
        let RouteKind::Collapse(r) = &c.routes[0].kind else {
            panic!("collapse route")
        };
        assert_eq!(r.cursor.as_deref(), Some("version"));
        assert_eq!(r.next_cursor, Some(NextCursor::Json("/version".into())));
        assert_eq!(r.vary, [HeaderName::from_static("x-tenant")]);
        assert!(!r.share_public);
        assert_eq!(r.linger, LINGER_DEFAULT);
        assert_eq!(r.topic.render(&[("id".into(), "42".into())]), "status:42");
        let text = format!(
            "{COLLAPSE}share = \"public\"\nnext_cursor.header = \"X-Version\"\ncursor.query = \"v\"\n"
        );
        let c = parse(&text).unwrap();
        let RouteKind::Collapse(r) = &c.routes[0].kind else {
            panic!("collapse route")
        };
        assert!(r.share_public);
        assert_eq!(
            r.next_cursor,
            Some(NextCursor::Header(HeaderName::from_static("x-version")))
        );
    }

    #[test]
    fn collapse_route_errors() {
        let cases = [
            ("", "routes.status.share"),
            ("share = \"everyone\"\n", "routes.status.share"),
            (
                "share = \"public\"\nnext_cursor.json = \"/v\"\n",
                "routes.status.next_cursor",
            ),
            (
                "share = \"public\"\ncursor.query = \"v\"\nnext_cursor = { json = \"/v\", header = \"x-v\" }\n",
                "routes.status.next_cursor",
            ),
            (
                "share = \"public\"\ncursor.query = \"a&b\"\n",
                "routes.status.cursor.query",
            ),
            ("vary = [\"authorization\"]\n", "routes.status.vary"),
            (
                "share = \"public\"\nexpose_headers = [\"Set-Cookie\"]\n",
                "routes.status.expose_headers",
            ),
            (
                "share = \"public\"\nvary = [\"bad header\"]\n",
                "routes.status.vary",
            ),
            ("share = \"public\"\nhold = \"1s\"\n", "routes.status.hold"),
            (
                "share = \"public\"\nsource.type = \"publish\"\n",
                "routes.status.source",
            ),
        ];
        for (extra, path) in cases {
            let errs = parse(&format!("{COLLAPSE}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(errs.contains(path), "{extra:?}: missing {path} in {errs}");
        }
    }

    #[test]
    fn auth_hooks() {
        let hook = "auth = { hook = { upstream = \"authz\", path = \"/can-read/{id}?x=1\", ttl = \"10s\" } }\n\
                    [upstreams.authz]\nurl = \"http://x\"\n";
        let text = format!("{COLLAPSE}{hook}").replace("auth = \"public\"\n", "");
        let c = parse(&text).unwrap();
        let RouteKind::Collapse(r) = &c.routes[0].kind else {
            panic!("collapse route")
        };
        let AuthConfig::Hook(h) = &r.auth else {
            panic!("hook")
        };
        assert_eq!(h.ttl, Duration::from_secs(10));
        assert_eq!(h.timeout, HOOK_TIMEOUT_DEFAULT);
        assert_eq!(h.headers, ["authorization", "cookie"]);
        assert_eq!(
            h.path.render_path(&[("id".into(), "a b".into())]),
            "/can-read/a%20b?x=1"
        );
        assert_eq!(r.max_unshared, MAX_UNSHARED_DEFAULT);
        let cases = [
            (
                "auth = { hook = { upstream = \"nope\", path = \"/x\" } }",
                "routes.status.auth.hook.upstream",
            ),
            (
                "auth = { hook = { upstream = \"api\", path = \"/x/{other}\" } }",
                "routes.status.auth.hook.path",
            ),
            // The upstream's own Authorization would overwrite the client's.
            (
                "auth = { hook = { upstream = \"api\", path = \"/x\", headers = [\"authorization\"] } }",
                "routes.status.auth.hook.headers",
            ),
            (
                "auth = { hook = { upstream = \"api\", path = \"/x\", bogus = 1 } }",
                "routes.status.auth",
            ),
            ("auth = { jwt = {} }", "routes.status.auth"),
            ("auth = 3", "routes.status.auth"),
        ];
        for (auth, path) in cases {
            let text = format!("{COLLAPSE}share = \"public\"\n").replace("auth = \"public\"", auth);
            let errs = parse(&text).unwrap_err().to_string();
            assert!(errs.contains(path), "{auth}: missing {path} in {errs}");
        }
    }

    #[test]
    fn jwt_auth() {
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("ec.pem"), pair.public_key_pem()).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not a key").unwrap();
        let route = |auth: &str| {
            let text = COLLAPSE.replace("auth = \"public\"", auth);
            Config::from_toml(&text, dir.path())
        };
        let c =
            route("auth = { jwt = { issuer = \"i\", audience = \"a\", key_file = \"ec.pem\" } }")
                .unwrap();
        let RouteKind::Collapse(r) = &c.routes[0].kind else {
            panic!("collapse route")
        };
        let AuthConfig::Jwt(j) = &r.auth else {
            panic!("jwt")
        };
        use jsonwebtoken::Algorithm;
        assert_eq!(j.algorithms, [Algorithm::ES256, Algorithm::ES384]);
        assert_eq!(j.leeway, JWT_LEEWAY_DEFAULT);
        assert_eq!(j.topics_claim, "topics");
        let cases = [
            (
                "key_file = \"ec.pem\", algorithms = [\"HS256\"]",
                "auth.jwt.algorithms",
            ),
            (
                "key_file = \"ec.pem\", algorithms = [\"RS256\"]",
                "auth.jwt.algorithms",
            ),
            (
                "key_file = \"ec.pem\", algorithms = [\"none\"]",
                "auth.jwt.algorithms",
            ),
            ("key_file = \"junk.pem\"", "auth.jwt.key_file"),
            ("key_file = \"missing.pem\"", "auth.jwt.key_file"),
            ("jwks_url = \"ftp://x/keys\"", "auth.jwt.jwks_url"),
            ("jwks_url = \"http://id.example/keys\"", "auth.jwt.jwks_url"),
            (
                "key_file = \"ec.pem\", jwks_url = \"https://x/keys\"",
                "routes.status.auth.jwt",
            ),
        ];
        for (keys, path) in cases {
            let auth = format!("auth = {{ jwt = {{ issuer = \"i\", audience = \"a\", {keys} }} }}");
            let errs = route(&auth).unwrap_err().to_string();
            assert!(errs.contains(path), "{keys}: missing {path} in {errs}");
        }
    }

    #[test]
    fn topic_templates() {
        let names = ["id".to_string()];
        let t = TopicTemplate::parse("orders:{id}", &names).unwrap();
        assert_eq!(t.render(&[("id".into(), "42".into())]), "orders:42");
        assert_eq!(
            t.capture("orders:42").unwrap(),
            [("id".to_string(), "42".to_string())]
        );
        assert!(t.capture("order:42").is_none());
        // A parameter used twice, and a name that is no regex group name.
        let names = ["id".to_string(), "1d".to_string()];
        assert!(TopicTemplate::parse("{id}:{id}", &names).is_err());
        let t = TopicTemplate::parse_path("/o/{id}/s?id={id}&x={1d}", &names).unwrap();
        let params = [
            ("id".to_string(), "7".to_string()),
            ("1d".to_string(), "x".to_string()),
        ];
        assert_eq!(t.render(&params), "/o/7/s?id=7&x=x");
        assert_eq!(t.capture("/o/7/s?id=7&x=x").unwrap(), params);
        assert!(t.capture("/o/7/s?id=8&x=x").is_none());
        assert!(TopicTemplate::parse("x{other}", &names).is_err());
        assert!(TopicTemplate::parse("", &names).is_err());
        assert!(TopicTemplate::parse("a}", &names).is_err());
    }

    #[test]
    fn params_are_anchored() {
        let text = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[upstreams.u]\nurl = \"http://x\"\n\
                    [routes.a]\npath = \"/x/{id}\"\nkind = \"proxy\"\nupstream = \"u\"\nparams.id = \"[0-9]+\"\n";
        let c = parse(text).unwrap();
        let re = &c.routes[0].params[0].pattern;
        assert!(re.is_match("42") && !re.is_match("42a") && !re.is_match("a42"));
    }
}
