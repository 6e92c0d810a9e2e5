//! CORS for poll routes (PROTOCOL.md 1.6): an exact per-route origin allowlist, preflight
//! answered by pollmux itself. A request from an origin not on the list gets 403.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty};

use crate::upstream::Body;

/// Response headers a cross-origin client may read.
const EXPOSE: HeaderValue = HeaderValue::from_static("Poll-Cursor, Poll-Gap, Retry-After");
/// How long browsers may cache a preflight answer (seconds).
const PREFLIGHT_MAX_AGE: HeaderValue = HeaderValue::from_static("600");

/// A request's `Origin` is not on the route's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginNotAllowed;

/// The request's origin if it may read: `Ok(None)` without an `Origin` header.
pub fn check(
    headers: &HeaderMap,
    allowed: &[String],
) -> Result<Option<HeaderValue>, OriginNotAllowed> {
    match headers.get(header::ORIGIN) {
        None => Ok(None),
        Some(origin) if allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) => {
            Ok(Some(origin.clone()))
        }
        Some(_) => Err(OriginNotAllowed),
    }
}

/// Adds the CORS response headers for an allowed origin.
pub fn apply(resp: &mut Response<Body>, origin: &HeaderValue) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
}

/// The answer to `OPTIONS`: a preflight for an allowed origin, or the plain method list.
pub fn preflight(origin: Option<&HeaderValue>) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static("GET, OPTIONS"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(origin) = origin {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Last-Event-ID"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE);
        apply(&mut resp, origin);
    }
    resp
}
