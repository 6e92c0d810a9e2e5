//! `kind = "proxy"` routes: a streaming reverse proxy. Bodies flow through in both directions
//! without being buffered whole; hop-by-hop headers are dropped both ways; `X-Forwarded-*` are
//! set by pollmux (extended only for trusted proxies); the upstream's own headers are added by
//! [`Upstream::send`](crate::upstream::Upstream::send).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use ipnet::IpNet;

use super::body_deadline::Deadline;
use crate::metrics::{Outcome, RouteMetrics, UpstreamResult};
use crate::per_ip::canonical_ip as canonical;
use crate::problem::Problem;
use crate::service::{ClientBody, ConnInfo};
use crate::upstream::{Body, BoxError, Upstream, UpstreamError};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers meaningful only for one connection (RFC 9110 7.6.1), plus the proxy credentials
/// meant for pollmux itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Forwards `req` to `upstream` and relays its answer; returns the response and its outcome.
/// The request's body must have arrived whole by `body_deadline` (else 408, and the upstream
/// request is cancelled), and the upstream request is opened once its first bytes are here.
pub async fn forward<B: ClientBody>(
    upstream: &Upstream,
    metrics: &RouteMetrics,
    req: Request<B>,
    conn: &ConnInfo,
    trusted_proxies: &[IpNet],
    body_deadline: Instant,
) -> (Response<Body>, Outcome) {
    let (mut parts, body) = req.into_parts();
    let mut body = Deadline::new(Box::pin(body), body_deadline);
    let timed_out = body.expired();
    if let Err(e) = body.first_frame().await {
        return body_failed(&e, &timed_out);
    }
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        let authority = parts.uri.authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    });
    remove_hop_by_hop(&mut parts.headers);
    set_forwarded(&mut parts.headers, conn, trusted_proxies, original_host);
    // The client derives Host from the upstream URI.
    parts.headers.remove(header::HOST);
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = upstream.uri_for(&pq);
    // The upstream connection negotiates its own protocol.
    parts.version = Version::HTTP_11;
    // A client whose body breaks (a malformed chunk, a connection cut mid-body) fails the
    // upstream request; the flag tells that apart from an upstream failure.
    let client_body_failed = Arc::new(AtomicBool::new(false));
    let flag = client_body_failed.clone();
    let body = body.map_err(move |e| {
        flag.store(true, Ordering::Release);
        e
    });
    let req = Request::from_parts(parts, BodyExt::boxed(body));

    let started = Instant::now();
    let result = upstream.send(req).await;
    let class = match &result {
        Ok(resp) => UpstreamResult::Status(resp.status().as_u16()),
        Err(UpstreamError::Timeout) => UpstreamResult::Timeout,
        Err(_) => UpstreamResult::Error,
    };
    metrics.upstream(class, started.elapsed());
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            let body = body.map_err(BoxError::from).boxed();
            (Response::from_parts(parts, body), Outcome::Response)
        }
        Err(e) if client_body_failed.load(Ordering::Acquire) => body_failed(&e, &timed_out),
        Err(e) => {
            tracing::debug!(upstream = %upstream.config.name, error = %e, "proxy request failed");
            let problem = match e {
                UpstreamError::Timeout => Problem::UpstreamTimeout,
                _ => Problem::UpstreamUnavailable,
            };
            (problem.response(None), problem.outcome())
        }
    }
}

/// The answer to a request whose body broke off or missed its deadline: the client's fault.
fn body_failed(e: &dyn std::fmt::Display, timed_out: &AtomicBool) -> (Response<Body>, Outcome) {
    let (problem, detail) = if timed_out.load(Ordering::Acquire) {
        let detail = "the request body did not arrive within body_read_timeout";
        (Problem::RequestTimeout, detail)
    } else {
        (
            Problem::InvalidRequest,
            "the request body could not be read",
        )
    };
    tracing::debug!(error = %e, "client request body failed while proxying");
    (problem.response(Some(detail)), problem.outcome())
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host`. A trusted proxy's values are kept and its
/// address appended to `X-Forwarded-For`; anyone else's are replaced, so clients cannot forge
/// their address or scheme.
fn set_forwarded(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    trusted_proxies: &[IpNet],
    host: Option<HeaderValue>,
) {
    let peer = canonical(conn.peer.ip());
    let trusted = trusted_proxies.iter().any(|net| net.contains(&peer));
    let prior: Vec<&str> = if trusted {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let mut xff = prior.join(", ");
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(&peer.to_string());
    let xff = HeaderValue::try_from(xff).expect("IP addresses and visible ASCII are valid");
    headers.insert(X_FORWARDED_FOR, xff);
    if !trusted {
        headers.remove(FORWARDED);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if conn.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(h) => headers.insert(X_FORWARDED_HOST, h),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
}

/// The client a trusted proxy `peer` forwards for: the last `X-Forwarded-For` address that is
/// not itself a trusted proxy (addresses to its left could be forged by the client), or the
/// peer when there is none.
pub fn forwarded_client(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let mut hops: Vec<IpAddr> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .collect();
    hops.reverse();
    hops.into_iter()
        .find(|ip| !trusted.iter().any(|n| n.contains(ip)))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str) -> ConnInfo {
        ConnInfo {
            peer: peer.parse().unwrap(),
            tls: false,
        }
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn untrusted_peer_replaces_forwarding() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("forwarded", "for=6.6.6.6".parse().unwrap());
        set_forwarded(
            &mut h,
            &conn("192.0.2.1:5000"),
            &[],
            Some("a.example".parse().unwrap()),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a.example");
        assert!(!h.contains_key("forwarded"));
    }

    #[test]
    fn trusted_peer_extends_forwarding() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        set_forwarded(&mut h, &conn("[::ffff:10.1.2.3]:5000"), &trusted, None);
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
