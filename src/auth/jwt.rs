//! JWT authorization (`auth = { jwt = ... }`): the client's bearer token must be signed by a
//! configured key (a PEM file, or a JWKS document picked by `kid`) with an allowed asymmetric
//! algorithm (never `none`, never HMAC), carry `iss`, `aud` and `exp` (and honour `nbf`), and
//! list the topic in its topics claim (exact names, or prefixes ending in `*`). A held poll ends
//! when its token expires.
//!
//! Refusals: no token 401 `WWW-Authenticate: Bearer`; a token that fails any check 401
//! `Bearer error="invalid_token"`; a topic it does not list 403
//! `Bearer error="insufficient_scope"`; keys that cannot be fetched 503 (fail closed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{AlgorithmFamily, DecodingKey, Validation};

use super::Decision;
use crate::config::{
    JwtConfig, JwtKeys, TopicTemplate, UPSTREAM_CONNECT_TIMEOUT_DEFAULT,
    UPSTREAM_POOL_IDLE_TIMEOUT_DEFAULT, UpstreamConfig,
};
use crate::upstream::Upstream;

/// A JWKS older than this is fetched again (on the next request that needs it).
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// Fetches of a JWKS are at least this far apart (an unknown `kid` cannot make pollmux hammer
/// the key server).
pub const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Time a JWKS fetch may take.
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const JWKS_MAX_BYTES: usize = 256 * 1024;

/// A route's JWT verifier.
pub struct Jwt {
    route: String,
    config: JwtConfig,
    /// One validation per key family among the allowed algorithms (jsonwebtoken checks a
    /// key against algorithms of its own family only).
    validations: Vec<(AlgorithmFamily, Validation)>,
    topic: TopicTemplate,
    keys: Keys,
}

enum Keys {
    File(Arc<DecodingKey>),
    Jwks(Arc<Jwks>),
}

struct Jwks {
    upstream: Upstream,
    path: PathAndQuery,
    /// The keys last fetched, by `kid`.
    set: Mutex<Option<Arc<KeySet>>>,
    /// One fetch at a time; holds when the last one was tried.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    /// The one key of a set that has exactly one (for tokens without `kid`).
    only: Option<DecodingKey>,
    fetched: Instant,
}

/// What a request's token check comes to: now, or after fetching keys.
pub enum JwtCheck {
    Now(Decision),
    /// The keys must be fetched first; then [`Jwt::decide`].
    Fetch(String),
}

impl Jwt {
    pub fn new(route: &str, config: JwtConfig, topic: TopicTemplate) -> Jwt {
        let mut validations: Vec<(AlgorithmFamily, Validation)> = Vec::new();
        for alg in &config.algorithms {
            if let Some((_, v)) = validations.iter_mut().find(|(f, _)| *f == alg.family()) {
                v.algorithms.push(*alg);
                continue;
            }
            let mut v = Validation::new(*alg);
            v.set_issuer(&[&config.issuer]);
            v.set_audience(&[&config.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.validate_exp = true;
            v.validate_nbf = true;
            v.leeway = config.leeway.as_secs();
            validations.push((alg.family(), v));
        }
        let keys = match &config.keys {
            JwtKeys::File(key) => Keys::File(key.0.clone()),
            JwtKeys::Jwks(url) => Keys::Jwks(Arc::new(Jwks::new(route, url))),
        };
        Jwt {
            route: route.to_owned(),
            config,
            validations,
            topic,
            keys,
        }
    }

    /// Checks `req`'s bearer token for the topic of `params`, if the keys are at hand.
    pub fn check<B>(&self, req: &Request<B>, params: &[(String, String)]) -> JwtCheck {
        let Some(token) = bearer(req) else {
            return JwtCheck::Now(Decision::Deny {
                status: StatusCode::UNAUTHORIZED,
                challenge: Some(HeaderValue::from_static("Bearer")),
            });
        };
        match &self.keys {
            Keys::File(key) => JwtCheck::Now(self.verify(token, key, params)),
            Keys::Jwks(jwks) => {
                let Ok(header) = jsonwebtoken::decode_header(token) else {
                    return JwtCheck::Now(invalid_token());
                };
                let set = jwks.current();
                let fresh = set
                    .as_ref()
                    .is_some_and(|s| s.fetched.elapsed() < JWKS_MAX_AGE);
                match set.as_deref().and_then(|s| s.key(header.kid.as_deref())) {
                    Some(key) if fresh => JwtCheck::Now(self.verify(token, key, params)),
                    _ => JwtCheck::Fetch(token.to_owned()),
                }
            }
        }
    }

    /// Fetches the JWKS (at most once per [`JWKS_MIN_INTERVAL`]) and checks `token`.
    pub async fn decide(&self, token: &str, params: &[(String, String)]) -> Decision {
        let Keys::Jwks(jwks) = &self.keys else {
            return Decision::Unavailable;
        };
        jwks.refresh(&self.route).await;
        let Some(set) = jwks.current() else {
            return Decision::Unavailable;
        };
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return invalid_token();
        };
        match set.key(header.kid.as_deref()) {
            Some(key) => self.verify(token, key, params),
            None => invalid_token(),
        }
    }

    fn verify(&self, token: &str, key: &DecodingKey, params: &[(String, String)]) -> Decision {
        let Some((_, validation)) = self.validations.iter().find(|(f, _)| *f == key.family())
        else {
            return invalid_token();
        };
        let claims = match jsonwebtoken::decode::<serde_json::Value>(token, key, validation) {
            Ok(data) => data.claims,
            Err(e) => {
                tracing::debug!(route = %self.route, error = %e, "token refused");
                return invalid_token();
            }
        };
        let topic = self.topic.render(params);
        let allowed = claims
            .get(&self.config.topics_claim)
            .and_then(|t| t.as_array())
            .is_some_and(|patterns| {
                patterns
                    .iter()
                    .filter_map(|p| p.as_str())
                    .any(|p| topic_matches(p, &topic))
            });
        if !allowed {
            return Decision::Deny {
                status: StatusCode::FORBIDDEN,
                challenge: Some(HeaderValue::from_static(
                    "Bearer error=\"insufficient_scope\"",
                )),
            };
        }
        // `exp` may be fractional; the token stays valid for `leeway` past it (as checked
        // above), so a poll is held until then and the next one is refused: never a loop of
        // instant empty answers.
        let exp = claims.get("exp").and_then(|e| e.as_f64()).unwrap_or(0.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let end = exp + self.config.leeway.as_secs_f64();
        let left = Duration::try_from_secs_f64(end - now).unwrap_or(Duration::ZERO);
        Decision::Allow {
            until: Some(Instant::now() + left),
        }
    }
}

/// A topics-claim entry matches a topic exactly, or as a prefix when it ends in `*`.
fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

fn invalid_token() -> Decision {
    Decision::Deny {
        status: StatusCode::UNAUTHORIZED,
        challenge: Some(HeaderValue::from_static("Bearer error=\"invalid_token\"")),
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl KeySet {
    fn key(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.only.as_ref(),
        }
    }
}

impl Jwks {
    fn new(route: &str, url: &Uri) -> Jwks {
        let mut base = url.clone().into_parts();
        let path = base
            .path_and_query
            .take()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        base.path_and_query = Some(PathAndQuery::from_static("/"));
        let base = Uri::from_parts(base).expect("scheme and authority of a validated URL");
        let upstream = Upstream::new(UpstreamConfig {
            name: format!("{route}-jwks"),
            url: base,
            connect_timeout: UPSTREAM_CONNECT_TIMEOUT_DEFAULT,
            timeout: JWKS_TIMEOUT,
            pool_idle_timeout: UPSTREAM_POOL_IDLE_TIMEOUT_DEFAULT,
            pool_max_idle_per_host: 1,
            headers: Vec::new(),
            ca_certs: None,
        });
        Jwks {
            upstream,
            path,
            set: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the set unless another fetch was tried within [`JWKS_MIN_INTERVAL`]; concurrent
    /// callers wait for one fetch. The fetch runs in a task of its own: a client going away
    /// must not cancel it (and with it the refresh) for everyone.
    async fn refresh(self: &Arc<Self>, route: &str) {
        let (this, route) = (self.clone(), route.to_owned());
        let _ = tokio::spawn(async move { this.refresh_now(&route).await }).await;
    }

    async fn refresh_now(&self, route: &str) {
        let mut last = self.fetching.lock().await;
        if last.is_some_and(|t| t.elapsed() < JWKS_MIN_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(set) => {
                *self.set.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
            }
            Err(e) => {
                tracing::warn!(route, error = %e, "cannot fetch the JWKS")
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = self.upstream.uri_for(&self.path);
        let resp = self.upstream.send(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("the key server answered {}", resp.status()));
        }
        let read = Limited::new(resp.into_body(), JWKS_MAX_BYTES).collect();
        let body = tokio::time::timeout(JWKS_TIMEOUT, read)
            .await
            .map_err(|_| "the key server did not answer in time".to_owned())?
            .map_err(|e| e.to_string())?
            .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut by_kid = HashMap::new();
        let mut all = Vec::new();
        for jwk in &set.keys {
            // Only asymmetric keys meant for signatures: never symmetric (oct) keys, never keys
            // published for encryption.
            let symmetric = matches!(
                jwk.algorithm,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
            );
            let encryption = matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            );
            if symmetric || encryption {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if let Some(kid) = &jwk.common.key_id {
                by_kid.insert(kid.clone(), key.clone());
            }
            all.push(key);
        }
        let only = if all.len() == 1 { all.pop() } else { None };
        Ok(KeySet {
            by_kid,
            only,
            fetched: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("orders:42", "orders:42"));
        assert!(!topic_matches("orders:42", "orders:420"));
        assert!(topic_matches("orders:*", "orders:420"));
        assert!(topic_matches("*", "anything"));
        assert!(!topic_matches("orders:*", "order"));
    }

    #[test]
    fn bearer_tokens() {
        let req = |v: &str| {
            Request::get("/")
                .header("authorization", v)
                .body(())
                .unwrap()
        };
        assert_eq!(bearer(&req("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&req("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&req("Basic abc")), None);
        assert_eq!(bearer(&req("Bearer ")), None);
    }
}
