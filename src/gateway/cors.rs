//! CORS for poll routes (docs/protocol.md 1.6): a per-route allowlist of exact origins, or any
//! origin (`"*"`); with `credentials`, the exact origin is reflected with
//! `Access-Control-Allow-Credentials: true` (never with a wildcard: config validation refuses
//! the pair). Preflight is answered by pollmux itself. A request from an origin not on the list
//! gets 403.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty};

use crate::config::CorsConfig;
use crate::upstream::Body;

/// Response headers a cross-origin client may read.
const EXPOSE: HeaderValue = HeaderValue::from_static("Poll-Cursor, Poll-Gap, Retry-After");
/// How long browsers may cache a preflight answer (seconds).
const PREFLIGHT_MAX_AGE: HeaderValue = HeaderValue::from_static("600");
const ANY_ORIGIN: HeaderValue = HeaderValue::from_static("*");
const TRUE: HeaderValue = HeaderValue::from_static("true");

/// A request's `Origin` is not on the route's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginNotAllowed;

/// What an allowed cross-origin request's answers say: the `Access-Control-Allow-Origin`
/// value, and whether credentials are allowed.
#[derive(Debug, Clone)]
pub struct Grant {
    allow_origin: HeaderValue,
    credentials: bool,
}

/// The grant for the request's origin: `Ok(None)` without an `Origin` header.
pub fn check(headers: &HeaderMap, policy: &CorsConfig) -> Result<Option<Grant>, OriginNotAllowed> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(None);
    };
    if policy.any_origin && !policy.credentials {
        return Ok(Some(Grant {
            allow_origin: ANY_ORIGIN,
            credentials: false,
        }));
    }
    let listed = policy
        .origins
        .iter()
        .any(|a| a.as_bytes() == origin.as_bytes());
    if !listed {
        return Err(OriginNotAllowed);
    }
    Ok(Some(Grant {
        allow_origin: origin.clone(),
        credentials: policy.credentials,
    }))
}

/// Adds the CORS response headers of an allowed request.
pub fn apply(h: &mut HeaderMap, grant: &Grant) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        grant.allow_origin.clone(),
    );
    if grant.allow_origin != ANY_ORIGIN {
        // The answer depends on who asks: caches must keep one per origin.
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    if grant.credentials {
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
    }
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
}

/// The answer to `OPTIONS`: a preflight for an allowed origin, or the plain method list.
pub fn preflight(grant: Option<&Grant>, policy: &CorsConfig) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static("GET, OPTIONS"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(grant) = grant {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            policy.allow_headers.clone(),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE);
        apply(h, grant);
    }
    resp
}
