//! Path templates -> route. Parameters are percent-decoded once and must then match their
//! route's anchored pattern; a mismatch is a 400 before any other work is done.

use matchit::Router as Matcher;

use crate::config::{Param, RouteConfig};

/// A request path resolved to a route and its validated parameters (in path order).
#[derive(Debug, PartialEq, Eq)]
pub struct Matched {
    pub route: usize,
    pub params: Vec<(String, String)>,
}

/// Why a path did not resolve.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The named parameter of the matched route is not valid UTF-8 after decoding, is unsafe,
    /// or fails its pattern.
    InvalidParameter {
        route: usize,
        name: String,
    },
}

pub struct Router {
    matcher: Matcher<usize>,
}

impl Router {
    /// Builds the router; templates were checked for conflicts by config validation.
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut matcher = Matcher::new();
        for (i, r) in routes.iter().enumerate() {
            matcher
                .insert(r.path.as_str(), i)
                .expect("config validation rejects conflicting templates");
        }
        Router { matcher }
    }

    pub fn resolve(&self, routes: &[RouteConfig], path: &str) -> Result<Matched, RouteError> {
        let m = self.matcher.at(path).map_err(|_| RouteError::NotFound)?;
        let route = &routes[*m.value];
        let mut params = Vec::with_capacity(route.params.len());
        for p in &route.params {
            let raw = m.params.get(&p.name).unwrap_or_default();
            let value = percent_decode(raw)
                .filter(|v| valid_param(p, v))
                .ok_or_else(|| RouteError::InvalidParameter {
                    route: *m.value,
                    name: p.name.clone(),
                })?;
            params.push((p.name.clone(), value));
        }
        Ok(Matched {
            route: *m.value,
            params,
        })
    }
}

/// Whether a decoded value is acceptable for parameter `p`.
pub fn valid_param(p: &Param, value: &str) -> bool {
    safe_value(value, p.tail) && p.pattern.is_match(value)
}

/// Whatever a route's pattern says, a parameter never carries control characters, backslashes,
/// `.` or `..` segments, or (unless it is the route's tail) a `/`: so no parameter can walk an
/// upstream path or split a topic.
fn safe_value(v: &str, is_tail: bool) -> bool {
    !v.is_empty()
        && !v.chars().any(|c| c.is_control() || c == '\\')
        && (is_tail || !v.contains('/'))
        && v.split('/').all(|seg| seg != "." && seg != "..")
}

/// Decodes `%XX` escapes once; `None` for a malformed escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn routes() -> Vec<RouteConfig> {
        let text = r#"
[listeners.p]
address = "127.0.0.1:0"
[upstreams.u]
url = "http://127.0.0.1:1"
[routes.orders]
path = "/orders/{id}/events"
kind = "proxy"
upstream = "u"
params.id = "[0-9]{1,20}"
[routes.files]
path = "/files/{*rest}"
kind = "proxy"
upstream = "u"
params.rest = ".+"
[routes.news]
path = "/news/{channel}"
kind = "proxy"
upstream = "u"
"#;
        Config::from_toml(text, std::path::Path::new("."))
            .unwrap()
            .routes
    }

    #[test]
    fn resolves_and_validates() {
        let routes = routes();
        let router = Router::new(&routes);
        let m = router.resolve(&routes, "/orders/42/events").unwrap();
        assert_eq!(routes[m.route].name, "orders");
        let orders = m.route;
        assert_eq!(m.params, [("id".to_string(), "42".to_string())]);
        assert_eq!(
            router.resolve(&routes, "/orders/x/events"),
            Err(RouteError::InvalidParameter {
                route: orders,
                name: "id".into()
            })
        );
        assert_eq!(router.resolve(&routes, "/nope"), Err(RouteError::NotFound));
        let m = router.resolve(&routes, "/files/a/b.txt").unwrap();
        assert_eq!(m.params[0].1, "a/b.txt");
    }

    #[test]
    fn default_pattern_rejects_encoded_separators() {
        let routes = routes();
        let router = Router::new(&routes);
        assert!(router.resolve(&routes, "/news/a%2Fb").is_err());
        assert!(router.resolve(&routes, "/news/%2e%2e").is_err());
        assert!(router.resolve(&routes, "/news/..").is_err());
        assert!(router.resolve(&routes, "/files/a/../b").is_err());
        assert!(router.resolve(&routes, "/files/a%00b").is_err());
        assert!(router.resolve(&routes, "/files/a%5Cb").is_err());
        assert!(router.resolve(&routes, "/news/%ff").is_err());
        assert!(router.resolve(&routes, "/news/a%2").is_err());
        assert_eq!(
            router.resolve(&routes, "/news/a%2Db").unwrap().params[0].1,
            "a-b"
        );
    }

    #[test]
    fn percent_decode_cases() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%C3"), None);
    }
}
