//! `[routes.NAME]`: path, parameters and kind; the one list of the optional keys each kind
//! takes; what poll and collapse routes share (topic, linger, max_topics, header names); and the
//! check that no two path templates tie.

use std::time::Duration;

use http::HeaderName;
use regex::Regex;
use toml::de::{DeTable, DeValue};

use super::{
    CollapseConfig, PathTemplate, PollConfig, TopicTemplate, UpstreamConfig, Validator, raw,
};

/// Pattern a path parameter must match when its route names none: unreserved URI characters only,
/// so a default parameter can never carry a separator or an encoded byte into a topic or URL.
pub const PARAM_PATTERN_DEFAULT: &str = "[A-Za-z0-9._~-]{1,128}";
/// Pattern of a `{*tail}` parameter when its route names none: any text; the router still
/// rejects control characters, backslashes and `.`/`..` segments in every parameter.
pub const TAIL_PATTERN_DEFAULT: &str = ".{1,4096}";

/// A topic (and its source) lives this long after its last poll, so messages arriving between a
/// client's polls are kept.
pub const LINGER_DEFAULT: Duration = Duration::from_secs(60);
/// Live topics per route; beyond it new topics get 503.
pub const MAX_TOPICS_DEFAULT: usize = 10_000;

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

/// The optional route keys each kind takes, beside `path`, `kind` and `params`.
const PROXY_KEYS: &[&str] = &["upstream"];
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

/// The optional keys of a route of `kind`, `None` for an unknown kind: the one list both the
/// check for keys a kind does not use ([`Validator::route`]) and the hint for an unknown key
/// ([`unknown_key_hint`]) read.
fn kind_keys(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "proxy" => Some(PROXY_KEYS),
        "poll" => Some(POLL_KEYS),
        "collapse" => Some(COLLAPSE_KEYS),
        _ => None,
    }
}

impl Validator<'_, '_> {
    pub(super) fn route(
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
        // A route of an unknown kind (reported below) is checked as a proxy route.
        let used = kind_keys(&kind_name).unwrap_or(PROXY_KEYS);
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

    /// A route's topic template; without `topic`, the path parameters joined by `/`.
    pub(super) fn topic(
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

    pub(super) fn max_topics(&mut self, n: &str, value: Option<u64>) -> usize {
        let max_topics = value.map_or(MAX_TOPICS_DEFAULT, |v| v as usize);
        if max_topics == 0 {
            self.err(&["routes", n, "max_topics"], "must be at least 1");
        }
        max_topics
    }

    pub(super) fn header_name(&mut self, at: &[&str], name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(at, format!("{name:?} is not a header name"));
                None
            }
        }
    }

    /// Two templates that some path matches equally well are refused: neither could win.
    pub(super) fn distinct_templates(&mut self, routes: &[RouteConfig]) {
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
pub(super) fn unknown_key_hint(at: &[&str], table: &DeTable<'_>, message: &str) -> Option<String> {
    let ["routes", _] = at else {
        return None;
    };
    let unknown = message.strip_prefix("unknown field `")?.split('`').next()?;
    let kind = table.iter().find(|(k, _)| k.get_ref() == "kind")?.1;
    let DeValue::String(kind) = kind.get_ref() else {
        return None;
    };
    let own = kind_keys(kind.as_ref())?;
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

/// A query parameter name that needs no encoding: unreserved characters only.
pub(super) fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
}

/// The parameter names a topic template uses (none when the template was invalid).
pub(super) fn topic_param_names(topic: Option<&TopicTemplate>) -> Vec<String> {
    topic
        .map(|t| t.params().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

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
    fn params_are_anchored() {
        let text = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[upstreams.u]\nurl = \"http://x\"\n\
                    [routes.a]\npath = \"/x/{id}\"\nkind = \"proxy\"\nupstream = \"u\"\nparams.id = \"[0-9]+\"\n";
        let c = parse(text).unwrap();
        let re = &c.routes[0].params[0].pattern;
        assert!(re.is_match("42") && !re.is_match("42a") && !re.is_match("a42"));
    }
}
