//! `kind = "poll"` routes: hold and batch, where a poll starts and what a gap does, per-topic
//! buffers and CORS. The source that feeds the topics is in `poll_source.rs`.

use std::time::Duration;

use http::{HeaderValue, Uri};

use super::{
    AuthConfig, LINGER_DEFAULT, SourceConfig, TopicTemplate, UpstreamConfig, Validator, raw,
};

/// Poll hold when the client gives no `timeout`.
pub const HOLD_DEFAULT: Duration = Duration::from_secs(25);
/// Longest hold a client may ask for; below the 60 s idle timeout common in load balancers.
pub const MAX_HOLD_DEFAULT: Duration = Duration::from_secs(55);
/// An upstream outage shorter than this is invisible to clients beyond a delay.
pub const UPSTREAM_GRACE_DEFAULT: Duration = Duration::from_secs(30);
/// Messages per poll response.
pub const MAX_BATCH_DEFAULT: usize = 100;
/// Per-topic retention: messages, bytes and age.
pub const BUFFER_MESSAGES_DEFAULT: usize = 1000;
pub const BUFFER_BYTES_DEFAULT: usize = 8 * 1024 * 1024;
pub const BUFFER_AGE_DEFAULT: Duration = Duration::from_secs(300);

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

impl Validator<'_, '_> {
    pub(super) fn poll(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteKind;
    use crate::config::tests::parse;

    const POLL: &str = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[routes.orders]\n\
                        path = \"/o/{region}/{id}\"\nkind = \"poll\"\nsource.type = \"publish\"\n\
                        auth = \"public\"\n";

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
}
