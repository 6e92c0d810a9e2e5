//! `kind = "collapse"` routes: how requests to an existing long-poll API are shared (cursor,
//! next cursor, share, vary) and what of the upstream's answers reaches clients.

use std::time::Duration;

use http::HeaderName;

use super::routes::plain_name;
use super::{AuthConfig, LINGER_DEFAULT, TopicTemplate, UpstreamConfig, Validator, raw};

/// Per topic, upstream requests at once for a collapse route whose answers are private.
pub const MAX_UNSHARED_DEFAULT: usize = 16;

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

impl Validator<'_, '_> {
    pub(super) fn collapse(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteKind;
    use crate::config::tests::{COLLAPSE, parse};

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
}
