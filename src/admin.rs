//! The admin listener's handler: `/metrics` (Prometheus text), `/healthz` (200 while the process
//! serves), `/readyz` (200 while listeners are up and the config is loaded, 503 once draining)
//! and `POST /publish/<route>/<topic>` (the publish source, docs/protocol.md section 3).
//! Bound to loopback by default; never exposed on the public listeners. Off loopback the config
//! requires a publish token, compared in constant time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use tokio::time::Instant;

use http_body_util::{LengthLimitError, Limited};

use crate::gateway::longpoll;
use crate::gateway::router::percent_decode;
use crate::gateway::{Current, PublishError};
use crate::hub::NewMessage;
use crate::metrics::{self, Metrics};
use crate::problem::Problem;
use crate::reload::Reloader;
use crate::service::{ClientBody, ConnInfo, Drain, Handler, NoHeldPolls};
use crate::upstream::Body;

/// Asks a pollmux admin listener at `address` for `path` (a `GET`); its status. An unspecified
/// address (`0.0.0.0`, `::`) is asked on loopback.
pub async fn probe(
    address: SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> Result<StatusCode, String> {
    let mut address = address;
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let ask = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, address.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        Ok(resp.status())
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| Err(format!("{address} did not answer within {timeout:?}")))
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// The public listeners' drain: `/readyz` answers 503 once it has begun.
    pub public_drain: Drain,
    pub gateway: Arc<Current>,
    /// `POST /-/reload`, when the config enables it.
    pub reloader: Option<Arc<Reloader>>,
    /// Bearer token required by `/publish` and `/-/reload` when set.
    pub publish_token: Option<String>,
}

impl Handler for Admin {
    type Held = NoHeldPolls;

    fn call<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        _conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static + use<B> {
        let this = self.clone();
        async move { this.handle(req).await }
    }
}

impl Admin {
    async fn handle<B: ClientBody>(&self, req: Request<B>) -> Response<Body> {
        if let Some(rest) = req.uri().path().strip_prefix("/publish/") {
            let rest = rest.to_owned();
            return self.publish(req, &rest).await;
        }
        if req.uri().path() == "/-/reload"
            && let Some(reloader) = &self.reloader
        {
            return self.reload(&req, reloader.clone()).await;
        }
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        match req.uri().path() {
            "/metrics" | "/healthz" | "/readyz" if !get => {
                let mut resp = Problem::MethodNotAllowed.response(None);
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                resp
            }
            "/metrics" => text(StatusCode::OK, metrics::CONTENT_TYPE, self.metrics.encode()),
            "/healthz" => text(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.public_drain.is_draining() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"draining\n".to_vec(),
            ),
            "/readyz" => text(StatusCode::OK, "text/plain", b"ready\n".to_vec()),
            _ => Problem::NotFound.response(None),
        }
    }
}

impl Admin {
    /// Whether `req` carries the admin token (always, when none is configured).
    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.publish_token else {
            return true;
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
    }

    /// `POST /-/reload`: 200 with the routes whose state was replaced, or 422 with every
    /// configuration error (the running configuration is kept).
    async fn reload<B>(&self, req: &Request<B>, reloader: Arc<Reloader>) -> Response<Body> {
        if req.method() != Method::POST {
            let mut resp = Problem::MethodNotAllowed.response(Some("use POST"));
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        if !self.authorized(req) {
            return Problem::Unauthorized.response(Some("a valid admin token is required"));
        }
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(reloaded)) => {
                let body =
                    serde_json::json!({"reloaded": true, "replaced_routes": reloaded.replaced});
                text(
                    StatusCode::OK,
                    "application/json",
                    body.to_string().into_bytes(),
                )
            }
            Ok(Err(errors)) => Problem::InvalidConfig.response(Some(errors.to_string().trim())),
            Err(e) => {
                tracing::error!(error = %e, "reload task failed");
                Problem::InvalidConfig.response(Some("the reload did not complete"))
            }
        }
    }

    async fn publish<B: ClientBody>(&self, req: Request<B>, path: &str) -> Response<Body> {
        if req.method() != Method::POST {
            let mut resp = Problem::MethodNotAllowed.response(Some("use POST"));
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        if !self.authorized(&req) {
            return Problem::Unauthorized.response(Some("a valid publish token is required"));
        }
        let Some((route, raw_topic)) = path.split_once('/') else {
            return Problem::NotFound.response(Some("use /publish/<route>/<topic>"));
        };
        let Some(topic) = percent_decode(raw_topic) else {
            return Problem::InvalidParameter.response(Some("the topic is not valid UTF-8"));
        };
        let header_text = |name: &str| -> Result<Option<String>, ()> {
            match req.headers().get(name).map(|v| v.to_str()) {
                None => Ok(None),
                Some(Ok(v)) => Ok(Some(v.to_owned())),
                Some(Err(_)) => Err(()),
            }
        };
        let (Ok(content_type), Ok(id)) = (header_text("content-type"), header_text("message-id"))
        else {
            return Problem::InvalidRequest.response(Some("headers must be visible ASCII"));
        };
        let gateway = self.gateway.get();
        let limit = gateway.max_message_bytes();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return too_large(limit);
        }
        let payload = match Limited::new(req.into_body(), limit).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return too_large(limit),
            Err(_) => return Problem::InvalidRequest.response(Some("the body could not be read")),
        };
        let message = NewMessage {
            id,
            content_type,
            payload,
            arrived: Instant::now(),
        };
        match gateway.publish(route, &topic, message).await {
            Ok(published) => {
                let body = serde_json::json!({ "cursor": published.cursor }).to_string();
                text(StatusCode::ACCEPTED, "application/json", body.into_bytes())
            }
            Err(PublishError::NoSuchRoute) => Problem::NotFound
                .response(Some("no poll route with a publish source has that name")),
            Err(PublishError::InvalidTopic) => Problem::InvalidParameter
                .response(Some("the route's topic template cannot produce that topic")),
            Err(PublishError::Full(full)) => longpoll::rejected_full(full).0,
            Err(PublishError::Backplane(e)) => {
                tracing::warn!(%route, error = %e, "publish not taken by the backplane");
                Problem::BackplaneUnavailable.response(Some(&e.to_string()))
            }
        }
    }
}

fn too_large(limit: usize) -> Response<Body> {
    let detail = format!("the body is over the {limit}-byte limit");
    Problem::PayloadTooLarge.response(Some(&detail))
}

/// Compares without an early exit, so response time says nothing about how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len_differs = a.len() != b.len();
    let diff = a
        .iter()
        .zip(b.iter().cycle())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    !len_differs && diff == 0 && !b.is_empty()
}

fn text(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"", b""));
    }
}
