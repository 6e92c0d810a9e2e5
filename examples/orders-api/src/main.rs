//! A small stand-in for an existing API with its own long-poll endpoint, to try a collapse route
//! with (README, "Collapse an existing long-poll API"):
//!
//! - `GET /orders/{id}/status?version=N`: the order's state as JSON once its version is above N
//!   (at once if it already is, or without `version`), else `304 Not Modified` after 25 s;
//! - `POST /orders/{id}`: moves the order to its next version;
//! - `GET /stats`: how many status requests this API has served.
//!
//! Run: `cargo run -p orders-api` (listens on 127.0.0.1:3000, or the address given).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long a status request waits for a change before `304`.
const HOLD: Duration = Duration::from_secs(25);

#[derive(Default)]
struct Orders {
    versions: Mutex<HashMap<String, u64>>,
    changed: watch::Sender<()>,
    status_requests: AtomicU64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let listener = TcpListener::bind(&address).await?;
    println!("orders API on http://{address}");
    let orders = Arc::new(Orders::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let orders = orders.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let orders = orders.clone();
                async move { Ok::<_, Infallible>(handle(&orders, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(orders: &Orders, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = req.uri().path().split('/').skip(1).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["stats"]) => {
            let n = orders.status_requests.load(Ordering::Relaxed);
            json(StatusCode::OK, format!("{{\"status_requests\":{n}}}\n"))
        }
        (&Method::POST, ["orders", id]) => {
            let version = {
                let mut versions = orders.versions.lock().unwrap();
                let v = versions.entry((*id).to_owned()).or_default();
                *v += 1;
                *v
            };
            orders.changed.send_replace(());
            json(StatusCode::OK, format!("{{\"version\":{version}}}\n"))
        }
        (&Method::GET, ["orders", id, "status"]) => {
            orders.status_requests.fetch_add(1, Ordering::Relaxed);
            let after: Option<u64> = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|p| p.strip_prefix("version="))
                    .and_then(|v| v.parse().ok())
            });
            status(orders, id, after).await
        }
        _ => json(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}\n".into()),
    }
}

/// The order's state once its version is above `after`, or `304` after [`HOLD`].
async fn status(orders: &Orders, id: &str, after: Option<u64>) -> Response<Full<Bytes>> {
    let mut changed = orders.changed.subscribe();
    let deadline = tokio::time::Instant::now() + HOLD;
    loop {
        let version = orders
            .versions
            .lock()
            .unwrap()
            .get(id)
            .copied()
            .unwrap_or(0);
        if after.is_none_or(|a| version > a) {
            let state = if version == 0 { "placed" } else { "moving" };
            let body =
                format!("{{\"order\":\"{id}\",\"version\":{version},\"state\":\"{state}\"}}\n");
            return json(StatusCode::OK, body);
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            return resp;
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
