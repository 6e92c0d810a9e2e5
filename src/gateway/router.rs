//! Path -> route. The most specific matching template wins (`config::PathTemplate` states the
//! rule); its parameters are then percent-decoded once and must match their route's anchored
//! pattern: a mismatch is a 400 before any other work is done, never a fall-through to a less
//! specific route.

use std::cmp::Ordering;
use std::collections::HashMap;

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

/// The routes indexed by their first segment, so a request is compared only with the routes
/// that can match it.
pub struct Router {
    /// Routes whose first segment is literal text, by that text.
    by_first_segment: HashMap<String, Vec<usize>>,
    /// Routes that start with a parameter or a tail: candidates for every path.
    starting_with_param: Vec<usize>,
}

impl Router {
    /// Indexes `routes`; config validation has refused ambiguous pairs of templates.
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut by_first_segment: HashMap<String, Vec<usize>> = HashMap::new();
        let mut starting_with_param = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match r.path.first_static() {
                Some(first) => by_first_segment
                    .entry(first.to_owned())
                    .or_default()
                    .push(i),
                None => starting_with_param.push(i),
            }
        }
        Router {
            by_first_segment,
            starting_with_param,
        }
    }

    pub fn resolve(&self, routes: &[RouteConfig], path: &str) -> Result<Matched, RouteError> {
        // `/db/_chang%65s` is `/db/_changes` (RFC 3986 6.2.2.2): matched as such, a spelling
        // cannot slip past a specific route to a catch-all proxy.
        let normalized = decode_unreserved(path);
        let path = normalized.as_deref().unwrap_or(path);
        let first = path
            .strip_prefix('/')
            .map(|p| p.split('/').next().unwrap_or_default())
            .ok_or(RouteError::NotFound)?;
        let literal = self.by_first_segment.get(first).map(Vec::as_slice);
        let mut best: Option<usize> = None;
        for &i in literal
            .unwrap_or_default()
            .iter()
            .chain(&self.starting_with_param)
        {
            let template = &routes[i].path;
            let wins = match best {
                None => true,
                // Equal only for pairs validation refuses: the first one stays.
                Some(b) => template.precedence(&routes[b].path) == Ordering::Greater,
            };
            if wins && template.matches(path) {
                best = Some(i);
            }
        }
        let index = best.ok_or(RouteError::NotFound)?;
        let route = &routes[index];
        let raw = route.path.captures(path).ok_or(RouteError::NotFound)?;
        let mut params = Vec::with_capacity(route.params.len());
        for (p, raw) in route.params.iter().zip(raw) {
            let value = percent_decode(raw)
                .filter(|v| valid_param(p, v))
                .ok_or_else(|| RouteError::InvalidParameter {
                    route: index,
                    name: p.name.clone(),
                })?;
            params.push((p.name.clone(), value));
        }
        Ok(Matched {
            route: index,
            params,
        })
    }
}

/// `path` with every `%XX` that stands for an unreserved character (letters, digits, `-._~`)
/// decoded; `None` when there is none. Other escapes stay, to be decoded once with the value.
fn decode_unreserved(path: &str) -> Option<String> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let escaped = |i: usize| {
        let hex = path.get(i + 1..i + 3)?;
        u8::from_str_radix(hex, 16).ok().filter(|&b| unreserved(b))
    };
    let bytes = path.as_bytes();
    // A `%` that starts no escape could pair with decoded digits into a new one (`%%32%65`
    // would become `%2e`, decoded twice): such a path is matched as it is, and its values
    // then fail to decode.
    let hex = |i: usize| {
        path.get(i + 1..i + 3)
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    if (0..bytes.len()).any(|i| bytes[i] == b'%' && !hex(i)) {
        return None;
    }
    let first = (0..bytes.len()).find(|&i| bytes[i] == b'%' && escaped(i).is_some())?;
    let mut out = String::with_capacity(path.len());
    out.push_str(&path[..first]);
    let mut i = first;
    while i < bytes.len() {
        match (bytes[i], escaped(i)) {
            (b'%', Some(b)) => {
                out.push(char::from(b));
                i += 3;
            }
            _ => {
                let c = path[i..].chars().next().expect("i is on a char boundary");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    Some(out)
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

    /// "Specific routes plus a proxy for everything else", as CouchDB-style APIs need it.
    #[test]
    fn catch_all_beside_parameters_and_statics() {
        let mut text = String::from(
            "[listeners.p]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nurl = \"http://127.0.0.1:1\"\n",
        );
        let templates = [
            ("root", "/"),
            ("db", "/{db}"),
            ("db_slash", "/{db}/"),
            ("db_rest", "/{db}/{*rest}"),
            ("all", "/{*rest}"),
            ("changes", "/{db}/_changes"),
            ("feeds", "/feeds/poll/{db}"),
            ("img", "/img-{id}.png"),
        ];
        for (name, path) in templates {
            text.push_str(&format!(
                "[routes.{name}]\npath = \"{path}\"\nkind = \"proxy\"\nupstream = \"u\"\n"
            ));
        }
        let routes = Config::from_toml(&text, std::path::Path::new("."))
            .unwrap()
            .routes;
        let router = Router::new(&routes);
        let name = |path: &str| {
            let m = router.resolve(&routes, path).unwrap();
            (routes[m.route].name.as_str(), m.params)
        };
        let p = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(name("/"), ("root", p(&[])));
        assert_eq!(name("/a"), ("db", p(&[("db", "a")])));
        assert_eq!(name("/a/"), ("db_slash", p(&[("db", "a")])));
        assert_eq!(name("/a/_changes"), ("changes", p(&[("db", "a")])));
        assert_eq!(
            name("/a/b/c"),
            ("db_rest", p(&[("db", "a"), ("rest", "b/c")]))
        );
        assert_eq!(name("/feeds/poll/x"), ("feeds", p(&[("db", "x")])));
        // `/feeds/poll/x/y` is no `/feeds/poll/{db}`: the next most specific is `/{db}/{*rest}`.
        assert_eq!(
            name("/feeds/poll/x/y"),
            ("db_rest", p(&[("db", "feeds"), ("rest", "poll/x/y")]))
        );
        assert_eq!(name("/img-7.png"), ("img", p(&[("id", "7")])));
        assert_eq!(name("/img-7.jpg"), ("db", p(&[("db", "img-7.jpg")])));
        assert_eq!(
            name("/a/b/_changes"),
            ("db_rest", p(&[("db", "a"), ("rest", "b/_changes")]))
        );
        // An invalid value on the winning route is a 400 there, not a fall-through: an encoded
        // `/` stays inside its segment, and `{db}` refuses it once decoded.
        let db = routes.iter().position(|r| r.name == "db").unwrap();
        assert_eq!(
            router.resolve(&routes, "/a%2Fb"),
            Err(RouteError::InvalidParameter {
                route: db,
                name: "db".into()
            })
        );
        let changes = routes.iter().position(|r| r.name == "changes").unwrap();
        assert_eq!(
            router.resolve(&routes, "/a%ff/_changes"),
            Err(RouteError::InvalidParameter {
                route: changes,
                name: "db".into()
            })
        );
        assert_eq!(router.resolve(&routes, "nope"), Err(RouteError::NotFound));
        // Encoded unreserved characters are the characters: no way past a specific route.
        assert_eq!(name("/db/_chang%65s"), ("changes", p(&[("db", "db")])));
        assert_eq!(name("/fe%65ds/poll/x"), ("feeds", p(&[("db", "x")])));
        assert_eq!(name("/%61"), ("db", p(&[("db", "a")])));
        // Other escapes stay escapes, decoded once with their value.
        assert_eq!(
            name("/a/b%2520c"),
            ("db_rest", p(&[("db", "a"), ("rest", "b%20c")]))
        );
        assert_eq!(
            name("/a/%C3%A9"),
            ("db_rest", p(&[("db", "a"), ("rest", "é")]))
        );
    }

    #[test]
    fn truly_ambiguous_pairs_are_refused_by_check() {
        for (a, b) in [
            ("/x/{id}", "/x/{name}"),
            ("/{*a}", "/{*b}"),
            ("/f/{x}/{*r}", "/f/{y}/{*s}"),
            ("/v{x}", "/{y}w"),
        ] {
            let text = format!(
                "[listeners.p]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nurl = \"http://x\"\n\
                 [routes.a]\npath = \"{a}\"\nkind = \"proxy\"\nupstream = \"u\"\n\
                 [routes.b]\npath = \"{b}\"\nkind = \"proxy\"\nupstream = \"u\"\n"
            );
            let errs = Config::from_toml(&text, std::path::Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(
                errs.contains("routes.b.path") && errs.contains("conflicts with another route"),
                "{a} vs {b}: {errs}"
            );
        }
    }

    #[test]
    fn percent_decode_cases() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%C3"), None);
    }
}
