//! Authorization hooks (docs/protocol.md 1.5): before a client joins a topic, pollmux asks an upstream
//! URL whether this credential may read it.
//!
//! - The hook request is `GET <hook path>` on the hook's upstream with only the route's
//!   allowlisted client headers (the credential), `X-Original-URI` (the client's path and query
//!   without its cursor), `X-Pollmux-Route` and `X-Pollmux-Topic` (percent-encoded), plus the
//!   upstream's own configured headers.
//! - 2xx allows; 401, 403 and 404 are passed to the client (status and `WWW-Authenticate`);
//!   anything else, a timeout or no answer is 503: fail closed.
//! - Decisions are cached per (topic, credential): allows for the route's `ttl`, or the
//!   answer's `Cache-Control: max-age` up to [`ALLOW_TTL_MAX`]; denials for [`DENY_TTL`].
//!   Concurrent identical checks share one hook request, run in a task of its own so a client
//!   going away does not fail the others. The cache holds at most [`CACHE_MAX`] decisions.

pub mod jwt;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use prometheus::IntCounter;
use tokio::sync::watch;

use crate::config::{HookConfig, TopicTemplate, percent_encode};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// Longest an allow is cached, whatever the hook's `max-age` says.
pub const ALLOW_TTL_MAX: Duration = Duration::from_secs(60);
/// How long a denial (401, 403, 404) is cached.
pub const DENY_TTL: Duration = Duration::from_secs(5);
/// Decisions cached per route; beyond it new decisions are not cached until old ones expire.
pub const CACHE_MAX: usize = 100_000;

const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
const X_POLLMUX_ROUTE: HeaderName = HeaderName::from_static("x-pollmux-route");
const X_POLLMUX_TOPIC: HeaderName = HeaderName::from_static("x-pollmux-topic");

/// What the hook said about one (topic, credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; a held poll ends at `until` (a token's expiry) if given.
    Allow { until: Option<Instant> },
    /// 401, 403 or 404, with the hook's `WWW-Authenticate` if any.
    Deny {
        status: StatusCode,
        challenge: Option<HeaderValue>,
    },
    /// No usable answer: the client gets 503.
    Unavailable,
}

/// A route's authorization: a hook or JWTs.
#[derive(Clone)]
pub enum Authorizer {
    Hook(Arc<Hook>),
    Jwt(Arc<jwt::Jwt>),
}

/// A decision now, or one that needs a request (a hook, a key fetch) first.
pub enum Check {
    Now(Decision),
    Later(Pin<Box<dyn Future<Output = Decision> + Send>>),
}

impl Authorizer {
    /// Decides synchronously when it can (a cached hook decision, a token and its key at
    /// hand), so most requests never wait.
    pub fn check<B>(&self, req: &Request<B>, params: &[(String, String)]) -> Check {
        match self {
            Authorizer::Hook(hook) => {
                let question = hook.question(req, params);
                match hook.cached(&question) {
                    Some(d) => Check::Now(d),
                    None => {
                        let hook = hook.clone();
                        Check::Later(Box::pin(async move { hook.decide(question).await }))
                    }
                }
            }
            Authorizer::Jwt(verifier) => match verifier.check(req, params) {
                jwt::JwtCheck::Now(d) => Check::Now(d),
                jwt::JwtCheck::Fetch(token) => {
                    let (verifier, params) = (verifier.clone(), params.to_vec());
                    Check::Later(Box::pin(
                        async move { verifier.decide(&token, &params).await },
                    ))
                }
            },
        }
    }
}

/// The cache key: a topic and the client's credential headers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    topic: String,
    credential: Vec<(HeaderName, HeaderValue)>,
}

/// One client's question to the hook, taken from its request.
pub struct Question {
    key: Key,
    original_uri: HeaderValue,
    /// The hook path, rendered from the topic's parameters.
    path: String,
}

struct Cached {
    decision: Decision,
    until: Instant,
}

/// A route's hook: its cache and its checks in flight.
pub struct Hook {
    route: String,
    config: HookConfig,
    /// The route's topic template.
    topic: TopicTemplate,
    /// The route's cursor query parameter, left out of `X-Original-URI`.
    cursor: Option<String>,
    upstream: Arc<Upstream>,
    cache: DashMap<Key, Cached>,
    asking: DashMap<Key, Arc<watch::Sender<Option<Decision>>>>,
    metrics: HookMetrics,
}

struct HookMetrics {
    allowed: IntCounter,
    denied: IntCounter,
    unavailable: IntCounter,
    cached: IntCounter,
}

impl Hook {
    pub fn new(
        route: &str,
        config: HookConfig,
        topic: TopicTemplate,
        cursor: Option<String>,
        upstream: Arc<Upstream>,
        metrics: &Metrics,
    ) -> Hook {
        let checks = |result: &str| metrics.auth_checks.with_label_values(&[route, result]);
        Hook {
            route: route.to_owned(),
            metrics: HookMetrics {
                allowed: checks("allow"),
                denied: checks("deny"),
                unavailable: checks("unavailable"),
                cached: metrics.auth_cache_hits.with_label_values(&[route]),
            },
            config,
            topic,
            cursor,
            upstream,
            cache: DashMap::new(),
            asking: DashMap::new(),
        }
    }

    /// The question `req` asks about the topic its validated `params` name.
    pub fn question<B>(&self, req: &Request<B>, params: &[(String, String)]) -> Question {
        let cursor = self.cursor.as_deref();
        let credential = listed_headers(req.headers(), &self.config.headers);
        let mut original = req.uri().path().to_owned();
        let kept = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| cursor.is_none_or(|c| p.split_once('=').map_or(*p, |(n, _)| n) != c));
        for (i, p) in kept.enumerate() {
            original.push(if i == 0 { '?' } else { '&' });
            original.push_str(p);
        }
        Question {
            key: Key {
                topic: self.topic.render(params),
                credential,
            },
            // Made of a request target's characters, always a valid value.
            original_uri: HeaderValue::from_str(&original)
                .unwrap_or_else(|_| HeaderValue::from_static("/")),
            path: self.config.path.render_path(params),
        }
    }

    /// A cached decision for the question, if one is fresh.
    pub fn cached(&self, q: &Question) -> Option<Decision> {
        let hit = self.cache.get(&q.key)?;
        if hit.until <= Instant::now() {
            return None;
        }
        self.metrics.cached.inc();
        Some(hit.decision.clone())
    }

    /// The hook's decision: cached, or asked (sharing a check in flight for the same key).
    pub async fn decide(self: &Arc<Self>, q: Question) -> Decision {
        if let Some(d) = self.cached(&q) {
            return d;
        }
        let mut rx = match self.asking.entry(q.key.clone()) {
            Entry::Occupied(asking) => asking.get().subscribe(),
            Entry::Vacant(slot) => {
                let tx = Arc::new(watch::Sender::new(None));
                let rx = tx.subscribe();
                slot.insert(tx.clone());
                let this = self.clone();
                tokio::spawn(async move {
                    let (decision, ttl) = this.ask(&q).await;
                    if let Some(ttl) = ttl {
                        this.remember(q.key.clone(), decision.clone(), ttl);
                    }
                    this.asking.remove(&q.key);
                    tx.send_replace(Some(decision));
                });
                rx
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(d) => d.clone().unwrap_or(Decision::Unavailable),
            Err(_) => Decision::Unavailable,
        }
    }

    fn remember(&self, key: Key, decision: Decision, ttl: Duration) {
        let now = Instant::now();
        if self.cache.len() >= CACHE_MAX {
            self.cache.retain(|_, c| c.until > now);
            if self.cache.len() >= CACHE_MAX {
                return;
            }
        }
        self.cache.insert(
            key,
            Cached {
                decision,
                until: now + ttl,
            },
        );
    }

    /// Drops expired decisions.
    pub fn sweep(&self, now: Instant) {
        self.cache.retain(|_, c| c.until > now);
        crate::shrink::after_sweep(&self.cache);
    }

    /// One hook request; the decision and how long it may be cached.
    async fn ask(&self, q: &Question) -> (Decision, Option<Duration>) {
        let Ok(path) = PathAndQuery::try_from(q.path.as_str()) else {
            self.metrics.unavailable.inc();
            return (Decision::Unavailable, None);
        };
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = self.upstream.uri_for(&path);
        let headers = req.headers_mut();
        for (name, value) in &q.key.credential {
            headers.append(name.clone(), value.clone());
        }
        headers.insert(X_ORIGINAL_URI, q.original_uri.clone());
        if let Ok(route) = HeaderValue::from_str(&self.route) {
            headers.insert(X_POLLMUX_ROUTE, route);
        }
        if let Ok(topic) = HeaderValue::from_str(&percent_encode(&q.key.topic)) {
            headers.insert(X_POLLMUX_TOPIC, topic);
        }
        let resp = match tokio::time::timeout(self.config.timeout, self.upstream.send(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                tracing::warn!(route = %self.route, topic = %q.key.topic, error = %e, "authorization hook failed");
                self.metrics.unavailable.inc();
                return (Decision::Unavailable, None);
            }
            Err(_) => {
                tracing::warn!(route = %self.route, topic = %q.key.topic, "authorization hook timed out");
                self.metrics.unavailable.inc();
                return (Decision::Unavailable, None);
            }
        };
        let status = resp.status();
        let max_age = max_age(resp.headers().get(header::CACHE_CONTROL));
        let challenge = resp.headers().get(header::WWW_AUTHENTICATE).cloned();
        match status.as_u16() {
            200..=299 => {
                self.metrics.allowed.inc();
                let ttl = max_age.unwrap_or(self.config.ttl).min(ALLOW_TTL_MAX);
                let allow = Decision::Allow { until: None };
                (allow, (!ttl.is_zero()).then_some(ttl))
            }
            401 | 403 | 404 => {
                self.metrics.denied.inc();
                (Decision::Deny { status, challenge }, Some(DENY_TTL))
            }
            _ => {
                tracing::warn!(route = %self.route, topic = %q.key.topic, %status, "authorization hook answered neither yes nor no");
                self.metrics.unavailable.inc();
                (Decision::Unavailable, None)
            }
        }
    }
}

/// Every value of the `names` headers in `headers`, in the order of `names`: a client's
/// credential for a hook, or the values a collapse route varies by.
pub fn listed_headers(
    headers: &http::HeaderMap,
    names: &[HeaderName],
) -> Vec<(HeaderName, HeaderValue)> {
    names
        .iter()
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(move |v| (name.clone(), v.clone()))
        })
        .collect()
}

/// `max-age` of a `Cache-Control` value; `no-store` and `no-cache` count as 0.
fn max_age(value: Option<&HeaderValue>) -> Option<Duration> {
    let text = value?.to_str().ok()?;
    let mut age = None;
    for directive in text.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(secs) = lower.strip_prefix("max-age=") {
            age = secs.trim_matches('"').parse().ok().map(Duration::from_secs);
        }
    }
    age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_and_no_store_wins() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            max_age(Some(&v("max-age=10"))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            max_age(Some(&v("public, Max-Age=\"7\""))),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            max_age(Some(&v("no-store, max-age=10"))),
            Some(Duration::ZERO)
        );
        assert_eq!(max_age(Some(&v("public"))), None);
        assert_eq!(max_age(Some(&v("max-age=x"))), None);
        assert_eq!(max_age(None), None);
    }
}
