//! The admin listener's handler: `/metrics` (Prometheus text), `/healthz` (200 while the process
//! serves) and `/readyz` (200 while listeners are up and the config is loaded, 503 once draining).
//! Bound to loopback by default; never exposed on the public listeners.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::gateway::ConnInfo;
use crate::gateway::problem::Problem;
use crate::metrics::{self, Metrics};
use crate::server::Handler;
use crate::upstream::Body;

/// Readiness shared between the server (which flips it on drain) and the admin handler.
#[derive(Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

impl Handler for Admin {
    async fn call(&self, req: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
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
            "/readyz" if self.readiness.is_draining() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"draining\n".to_vec(),
            ),
            "/readyz" => text(StatusCode::OK, "text/plain", b"ready\n".to_vec()),
            _ => Problem::NotFound.response(None),
        }
    }
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
