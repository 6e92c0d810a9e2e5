//! RFC 9457 problem+json responses: the one shape of every error pollmux answers itself, with a
//! stable `type` URN per cause so clients can branch on it. The one place that maps a cause to
//! its status, its `Retry-After`, who it came from (client, pollmux or upstream) and the
//! metrics outcome that follows from that (as pingora's `ErrorSource` does).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::metrics::Outcome;
use crate::upstream::Body;

/// Media type of problem responses.
pub const CONTENT_TYPE: &str = "application/problem+json";
/// `Retry-After` seconds on 503 answers for capacity limits and upstream failures.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The causes pollmux reports; each has its own `type` URN and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    NotFound,
    MethodNotAllowed,
    InvalidParameter,
    InvalidCursor,
    InvalidRequest,
    /// A reload's configuration is invalid (422); the running one is kept.
    InvalidConfig,
    Unauthorized,
    /// The authorization hook said no (403).
    Forbidden,
    /// The authorization hook gave no usable answer: fail closed (503).
    AuthUnavailable,
    OriginNotAllowed,
    CursorExpired,
    PayloadTooLarge,
    /// The request's body did not arrive within `body_read_timeout` of its head (408).
    RequestTimeout,
    UriTooLong,
    Overloaded,
    TooManyTopics,
    TooManyPolls,
    /// A client IP over its connection (or request) limits: 429.
    TooManyConnections,
    Draining,
    UpstreamUnavailable,
    UpstreamTimeout,
    /// A topic's upstream source has been failing for longer than the route's grace.
    UpstreamDown,
    /// The upstream refused pollmux's own credential for a topic's source.
    UpstreamRefused,
    /// A collapse route's upstream answer was private and the route may not share it.
    UpstreamUnshareable,
    /// Cluster mode: the backplane (Redis) has been unreachable for longer than
    /// `backplane_grace`, and the answer needs it (a publish, a topic this node has not loaded).
    BackplaneUnavailable,
}

/// Who a problem came from: it decides the metrics outcome, and which side an operator looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The request itself: malformed, not allowed, over its client's limits.
    Client,
    /// pollmux's own capacity or state: a limit, the drain.
    Pollmux,
    /// An upstream (a proxied API, a source, an authorization hook) failed or refused pollmux.
    Upstream,
}

impl Problem {
    /// Who the problem came from.
    pub fn source(self) -> Source {
        match self {
            Problem::NotFound
            | Problem::MethodNotAllowed
            | Problem::InvalidParameter
            | Problem::InvalidCursor
            | Problem::InvalidRequest
            | Problem::InvalidConfig
            | Problem::Unauthorized
            | Problem::Forbidden
            | Problem::OriginNotAllowed
            | Problem::CursorExpired
            | Problem::PayloadTooLarge
            | Problem::RequestTimeout
            | Problem::UriTooLong
            | Problem::TooManyPolls
            | Problem::TooManyConnections => Source::Client,
            Problem::Overloaded
            | Problem::TooManyTopics
            | Problem::Draining
            | Problem::BackplaneUnavailable => Source::Pollmux,
            Problem::AuthUnavailable
            | Problem::UpstreamUnavailable
            | Problem::UpstreamTimeout
            | Problem::UpstreamDown
            | Problem::UpstreamRefused
            | Problem::UpstreamUnshareable => Source::Upstream,
        }
    }

    /// The request's metrics outcome when it is answered with this problem.
    pub fn outcome(self) -> Outcome {
        match (self, self.source()) {
            (Problem::Draining, _) => Outcome::Shutdown,
            (_, Source::Upstream) => Outcome::UpstreamError,
            (_, Source::Client | Source::Pollmux) => Outcome::Rejected,
        }
    }

    /// `Retry-After` seconds: for answers that a retry a moment later may not get.
    pub fn retry_after(self) -> Option<u64> {
        let status = self.status();
        (status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS)
            .then_some(RETRY_AFTER_SECS)
    }

    pub fn status(self) -> StatusCode {
        match self {
            Problem::NotFound => StatusCode::NOT_FOUND,
            Problem::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Problem::InvalidParameter | Problem::InvalidCursor | Problem::InvalidRequest => {
                StatusCode::BAD_REQUEST
            }
            Problem::Unauthorized => StatusCode::UNAUTHORIZED,
            Problem::InvalidConfig => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::Forbidden => StatusCode::FORBIDDEN,
            Problem::OriginNotAllowed => StatusCode::FORBIDDEN,
            Problem::CursorExpired => StatusCode::GONE,
            Problem::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Problem::UriTooLong => StatusCode::URI_TOO_LONG,
            Problem::Overloaded
            | Problem::Draining
            | Problem::TooManyTopics
            | Problem::AuthUnavailable
            | Problem::BackplaneUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Problem::TooManyPolls | Problem::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            Problem::UpstreamUnavailable
            | Problem::UpstreamRefused
            | Problem::UpstreamUnshareable => StatusCode::BAD_GATEWAY,
            Problem::UpstreamDown => StatusCode::SERVICE_UNAVAILABLE,
            Problem::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Problem::NotFound => "not-found",
            Problem::MethodNotAllowed => "method-not-allowed",
            Problem::InvalidParameter => "invalid-parameter",
            Problem::InvalidCursor => "invalid-cursor",
            Problem::InvalidRequest => "invalid-request",
            Problem::Unauthorized => "unauthorized",
            Problem::InvalidConfig => "invalid-config",
            Problem::Forbidden => "forbidden",
            Problem::AuthUnavailable => "authorization-unavailable",
            Problem::OriginNotAllowed => "origin-not-allowed",
            Problem::CursorExpired => "cursor-expired",
            Problem::PayloadTooLarge => "payload-too-large",
            Problem::RequestTimeout => "request-timeout",
            Problem::UriTooLong => "uri-too-long",
            Problem::Overloaded => "overloaded",
            Problem::TooManyTopics => "too-many-topics",
            Problem::TooManyPolls => "too-many-polls",
            Problem::TooManyConnections => "too-many-connections",
            Problem::Draining => "draining",
            Problem::UpstreamUnavailable => "upstream-unavailable",
            Problem::UpstreamTimeout => "upstream-timeout",
            Problem::UpstreamDown => "upstream-down",
            Problem::UpstreamRefused => "upstream-refused",
            Problem::UpstreamUnshareable => "upstream-unshareable",
            Problem::BackplaneUnavailable => "backplane-unavailable",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Problem::NotFound => "not found",
            Problem::MethodNotAllowed => "method not allowed",
            Problem::InvalidParameter => "invalid parameter",
            Problem::InvalidCursor => "invalid cursor",
            Problem::InvalidRequest => "invalid request",
            Problem::Unauthorized => "unauthorized",
            Problem::InvalidConfig => "invalid configuration",
            Problem::Forbidden => "forbidden",
            Problem::AuthUnavailable => "authorization unavailable",
            Problem::OriginNotAllowed => "origin not allowed",
            Problem::CursorExpired => "cursor expired",
            Problem::PayloadTooLarge => "payload too large",
            Problem::RequestTimeout => "request body timed out",
            Problem::UriTooLong => "URI too long",
            Problem::Overloaded => "server at capacity",
            Problem::TooManyTopics => "too many topics",
            Problem::TooManyPolls => "too many polls",
            Problem::TooManyConnections => "too many connections",
            Problem::Draining => "server shutting down",
            Problem::UpstreamUnavailable => "upstream unavailable",
            Problem::UpstreamTimeout => "upstream timed out",
            Problem::UpstreamDown => "upstream down",
            Problem::UpstreamRefused => "upstream refused pollmux's credential",
            Problem::UpstreamUnshareable => "upstream answer not shareable",
            Problem::BackplaneUnavailable => "backplane unavailable",
        }
    }

    /// The problem response, with `detail` when given.
    pub fn response(self, detail: Option<&str>) -> Response<Body> {
        self.response_with(detail, &[])
    }

    /// The problem response with extension members (e.g. `earliest_cursor`).
    pub fn response_with(self, detail: Option<&str>, extra: &[(&str, &str)]) -> Response<Body> {
        let (headers, body) = self.render(detail, extra);
        let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *resp.status_mut() = self.status();
        *resp.headers_mut() = headers;
        resp
    }

    /// The problem's headers and problem+json body.
    pub fn render(self, detail: Option<&str>, extra: &[(&str, &str)]) -> (HeaderMap, Bytes) {
        let status = self.status();
        let mut body = serde_json::json!({
            "type": format!("urn:pollmux:problem:{}", self.slug()),
            "title": self.title(),
            "status": status.as_u16(),
        });
        if let Some(d) = detail {
            body["detail"] = d.into();
        }
        for (k, v) in extra {
            body[*k] = (*v).into();
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        (headers, Bytes::from(body.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_is_problem_json() {
        let resp = Problem::Overloaded.response(Some("max_connections reached"));
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "urn:pollmux:problem:overloaded");
        assert_eq!(v["status"], 503);
        assert_eq!(v["detail"], "max_connections reached");
    }

    /// The 502/503/504 answers that come from an upstream are counted as `upstream_error`,
    /// whichever route kind gives them; pollmux's own limits as `rejected`.
    #[test]
    fn the_source_decides_the_outcome() {
        for p in [
            Problem::UpstreamDown,
            Problem::UpstreamRefused,
            Problem::UpstreamUnavailable,
            Problem::UpstreamTimeout,
            Problem::AuthUnavailable,
        ] {
            assert_eq!(p.outcome(), Outcome::UpstreamError, "{p:?}");
        }
        for p in [
            Problem::Overloaded,
            Problem::TooManyPolls,
            Problem::InvalidCursor,
            Problem::BackplaneUnavailable,
        ] {
            assert_eq!(p.outcome(), Outcome::Rejected, "{p:?}");
        }
        assert_eq!(Problem::Draining.outcome(), Outcome::Shutdown);
        assert_eq!(Problem::UpstreamTimeout.retry_after(), None);
        assert_eq!(Problem::UpstreamDown.retry_after(), Some(RETRY_AFTER_SECS));
        assert_eq!(
            Problem::BackplaneUnavailable.retry_after(),
            Some(RETRY_AFTER_SECS)
        );
    }
}
