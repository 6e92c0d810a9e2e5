//! Who may read a poll or collapse route's topics (`auth`): public, an authorization hook, or
//! JWTs checked against a key file or a JWKS URL.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Uri};

use super::routes::topic_param_names;
use super::{TopicTemplate, UpstreamConfig, Validator, raw};

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

impl Validator<'_, '_> {
    /// A route's `auth`: `"public"` or `{ hook = { upstream, path, ttl, timeout, headers } }`.
    pub(super) fn auth(
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
}

/// `localhost` or a loopback IP (brackets of an IPv6 host allowed).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{COLLAPSE, parse};
    use crate::config::{Config, MAX_UNSHARED_DEFAULT, RouteKind};

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
}
