//! `kind = "proxy"` routes over real sockets: header hygiene, streaming both ways, upstream
//! failures, parameter checks, and the metrics they leave.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use crate::common::*;

fn config(upstream_url: &str) -> String {
    let upstream = r#"
timeout = "300ms"
headers = { Authorization = "Bearer pollmux-own" }
"#;
    let api = r#"
path = "/api/{*rest}"
kind = "proxy"
upstream = "api"
"#;
    let item = r#"
path = "/items/{id}"
params.id = "[0-9]{1,5}"
kind = "proxy"
upstream = "api"
"#;
    TestConfig::new()
        .limits(r#"trusted_proxies = ["10.0.0.0/8"]"#)
        .upstream_with("api", upstream_url, upstream)
        .route("api", api)
        .route("item", item)
        .toml()
}

/// A body whose frames the test sends one by one.
fn channel_body() -> (mpsc::Sender<Bytes>, pollmux::upstream::Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_stream(rx);
    (tx, StreamBody::new(stream).boxed())
}

fn futures_stream(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, pollmux::upstream::BoxError>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))))
}

#[tokio::test]
async fn forwards_with_header_hygiene_and_counts() {
    let seen: Arc<Mutex<Vec<(String, HeaderMap)>>> = Arc::default();
    let record = seen.clone();
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let pq = req.uri().path_and_query().unwrap().to_string();
            record.lock().unwrap().push((pq, req.headers().clone()));
            Response::builder()
                .header("connection", "x-upstream-private")
                .header("x-upstream-private", "secret")
                .header("keep-alive", "timeout=5")
                .header("x-upstream-public", "yes")
                .body(full("hello from upstream"))
                .unwrap()
        }
    })
    .await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    let ok = r#"pollmux_requests_total{kind="proxy",route="api",status="200"}"#;
    let up_ok = r#"pollmux_upstream_requests_total{result="2xx",route="api"}"#;
    let before = (gw.metric(ok).await, gw.metric(up_ok).await);

    let req = Request::get("/api/a/b?x=1&y=2")
        .header("host", "public.example")
        .header("connection", "x-client-private")
        .header("x-client-private", "1")
        .header("keep-alive", "timeout=1")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("authorization", "Bearer client")
        .header("x-custom", "kept")
        .body(full(""))
        .unwrap();
    let resp = send(gw.addr(), req).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-upstream-private").is_none());
    assert!(resp.headers().get("keep-alive").is_none());
    assert_eq!(resp.headers()["x-upstream-public"], "yes");
    assert_eq!(body_string(resp).await, "hello from upstream");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (pq, h) = &seen[0];
    assert_eq!(pq, "/api/a/b?x=1&y=2");
    assert!(h.get("x-client-private").is_none());
    assert!(h.get("keep-alive").is_none());
    assert!(h.get("proxy-authorization").is_none());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "public.example");
    assert_eq!(h["host"], upstream.addr.to_string());
    assert_eq!(h["authorization"], "Bearer pollmux-own");
    assert_eq!(h["x-custom"], "kept");

    assert_eq!(gw.metric(ok).await, before.0 + 1.0);
    assert_eq!(gw.metric(up_ok).await, before.1 + 1.0);
}

#[tokio::test]
async fn streams_response_body_before_upstream_finishes() {
    let (tx, body) = channel_body();
    let body = Arc::new(Mutex::new(Some(body)));
    let upstream = Upstream::start(move |_req| {
        let body = body.lock().unwrap().take().expect("one request");
        async move { Response::new(body) }
    })
    .await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    tx.send(Bytes::from_static(b"first;")).await.unwrap();
    let resp = get(gw.addr(), "/api/stream").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first chunk arrives while the upstream is still sending")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first;");
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
}

#[tokio::test]
async fn streams_request_body_before_client_finishes() {
    let (got_first_tx, mut got_first) = mpsc::channel::<Bytes>(1);
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let got_first_tx = got_first_tx.clone();
        async move {
            let mut body = req.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            got_first_tx.send(first.clone()).await.unwrap();
            let rest = body.collect().await.unwrap().to_bytes();
            let mut all = first.to_vec();
            all.extend_from_slice(&rest);
            Response::new(full(all))
        }
    })
    .await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    let (tx, body) = channel_body();
    let req = Request::post("/api/upload")
        .header("host", "x")
        .body(body)
        .unwrap();
    let addr = gw.addr();
    let call = tokio::spawn(async move { send(addr, req).await });
    tx.send(Bytes::from_static(b"part1,")).await.unwrap();
    let first = tokio::time::timeout(WAIT, got_first.recv())
        .await
        .expect("upstream sees the first part while the client still sends")
        .unwrap();
    assert_eq!(first, "part1,");
    tx.send(Bytes::from_static(b"part2")).await.unwrap();
    drop(tx);
    let resp = call.await.unwrap();
    assert_eq!(body_string(resp).await, "part1,part2");
}

#[tokio::test]
async fn unreachable_upstream_is_502_problem() {
    let port = closed_port().await;
    let gw = Gateway::start(&config(&format!("http://{port}"))).await;
    let errors = r#"pollmux_upstream_requests_total{result="error",route="api"}"#;
    let before = gw.metric(errors).await;
    let resp = get(gw.addr(), "/api/x").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body = body_json(resp).await;
    assert_eq!(body["type"], "urn:pollmux:problem:upstream-unavailable");
    assert_eq!(gw.metric(errors).await, before + 1.0);
    let outcome = r#"pollmux_request_duration_seconds_count{outcome="upstream_error",route="api"}"#;
    assert_eq!(gw.metric(outcome).await, 1.0);
}

#[tokio::test]
async fn slow_upstream_is_504_problem() {
    let (_hold_tx, hold_rx) = tokio::sync::watch::channel(());
    let upstream = Upstream::start(move |_req| {
        let mut hold = hold_rx.clone();
        async move {
            // Never answers while the test runs: the gateway's 300ms timeout must fire.
            let _ = hold.changed().await;
            text_response(200, "too late")
        }
    })
    .await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    let resp = get(gw.addr(), "/api/slow").await;
    assert_eq!(resp.status(), 504);
    let body = body_json(resp).await;
    assert_eq!(body["type"], "urn:pollmux:problem:upstream-timeout");
    let timeouts = r#"pollmux_upstream_requests_total{result="timeout",route="api"}"#;
    assert_eq!(gw.metric(timeouts).await, 1.0);
}

#[tokio::test]
async fn bad_parameter_is_400_and_unknown_path_404() {
    let upstream = Upstream::start(|_req| async { text_response(200, "ok") }).await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    let resp = get(gw.addr(), "/items/12").await;
    assert_eq!(resp.status(), 200);
    for bad in [
        "/items/abc",
        "/items/123456",
        "/items/%2e%2e",
        "/items/1%00",
    ] {
        let resp = get(gw.addr(), bad).await;
        assert_eq!(resp.status(), 400, "{bad}");
        let body = body_json(resp).await;
        assert_eq!(
            body["type"], "urn:pollmux:problem:invalid-parameter",
            "{bad}"
        );
    }
    let resp = get(gw.addr(), "/nothing/here").await;
    assert_eq!(resp.status(), 404);
    let unmatched = r#"pollmux_requests_total{kind="none",route="_unmatched",status="404"}"#;
    assert_eq!(gw.metric(unmatched).await, 1.0);
    let rejected = r#"pollmux_requests_total{kind="proxy",route="item",status="400"}"#;
    assert_eq!(gw.metric(rejected).await, 4.0);
}

/// Sends `head` (and `partial` body bytes) on a raw connection and reads the answer's status
/// line; the rest of the body never comes.
async fn slow_body(addr: std::net::SocketAddr, head: &str, partial: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(partial).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 1024];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("an answer before the client's body is whole")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        out.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_body_not_whole_within_body_read_timeout_is_408_and_its_upstream_request_cancelled() {
    // What the upstream saw: (path, whether reading the request body succeeded).
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, bool)>();
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let path = req.uri().path().to_owned();
            let read = req.into_body().collect().await.is_ok();
            let _ = seen_tx.send((path, read));
            text_response(200, "done")
        }
    })
    .await;
    let config = TestConfig::new()
        .limits("body_read_timeout = \"1s\"")
        .upstream_with("api", &upstream.url(), "timeout = \"60s\"")
        .route(
            "api",
            "path = \"/api/{*rest}\"\nkind = \"proxy\"\nupstream = \"api\"\n",
        )
        .toml();
    let gw = Gateway::start(&config).await;
    let head =
        |path: &str| format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
    // A head and no body: answered 408, and no upstream request was opened for it.
    let status = slow_body(gw.addr(), &head("/api/silent"), b"").await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    // Part of the body, then nothing: 408, and the upstream's request is cut off.
    let status = slow_body(gw.addr(), &head("/api/partial"), &[b'x'; 10]).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    let (path, read) = tokio::time::timeout(WAIT, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((path.as_str(), read), ("/api/partial", false));
    // A whole body is forwarded as before.
    let req = Request::post("/api/whole").body(full("a body")).unwrap();
    assert_eq!(send(gw.addr(), req).await.status(), 200);
    let (path, read) = tokio::time::timeout(WAIT, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((path.as_str(), read), ("/api/whole", true));
    let text = gw.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            r#"pollmux_requests_total{kind="proxy",route="api",status="408"}"#
        ),
        2.0,
        "{text}"
    );
}
