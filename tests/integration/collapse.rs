//! Transparent fan-in routes against an in-process fake long-poll API: one upstream request per
//! key whatever the client count, identical bytes for every waiter, chaining, stored answers,
//! credential groups and pass-through of everything that is not a plain GET.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::common::*;

/// One request the fake API saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A fake API with its own long-poll endpoint, `GET /orders/{id}/status?version=N`: answers at
/// once with the order's state when its version is above N (or no version is given), else when
/// it changes, else 304 after `hold`. Order `broken` always answers 503.
struct Api {
    versions: Mutex<HashMap<String, u64>>,
    changed: watch::Sender<u64>,
    seen: Mutex<Vec<Seen>>,
    /// Requests in progress, by target.
    open: Mutex<HashMap<String, usize>>,
    hold: Duration,
}

impl Api {
    fn bump(&self, order: &str) -> u64 {
        let mut versions = self.versions.lock().unwrap();
        let v = versions.entry(order.to_owned()).or_default();
        *v += 1;
        let v = *v;
        drop(versions);
        self.changed.send_modify(|n| *n += 1);
        v
    }

    /// GET requests seen for `target`.
    fn gets(&self, target: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.method == "GET" && s.target == target)
            .count()
    }

    fn total_gets(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.method == "GET").count()
    }

    fn open(&self, target: &str) -> usize {
        self.open.lock().unwrap().get(target).copied().unwrap_or(0)
    }
}

struct Open(Arc<Api>, String);

impl Drop for Open {
    fn drop(&mut self) {
        *self.0.open.lock().unwrap().get_mut(&self.1).unwrap() -= 1;
    }
}

async fn start_api(hold: Duration) -> (Arc<Api>, Upstream) {
    let api = Arc::new(Api {
        versions: Mutex::default(),
        changed: watch::Sender::new(0),
        seen: Mutex::default(),
        open: Mutex::default(),
        hold,
    });
    let state = api.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let api = state.clone();
        async move { answer(api, req).await }
    })
    .await;
    (api, upstream)
}

async fn answer(api: Arc<Api>, req: Request<Incoming>) -> Response<pollmux::upstream::Body> {
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().unwrap().as_str().to_owned();
    let body = body.collect().await.unwrap().to_bytes();
    api.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if parts.method != http::Method::GET {
        return Response::builder()
            .status(201)
            .header("x-echo-method", parts.method.as_str())
            .body(full(body))
            .unwrap();
    }
    *api.open.lock().unwrap().entry(target.clone()).or_default() += 1;
    let _open = Open(api.clone(), target.clone());
    let order = parts.uri.path().split('/').nth(2).unwrap_or("").to_owned();
    if order == "broken" {
        return text_response(503, "the order service is down");
    }
    let after: Option<u64> = parts.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|p| p.strip_prefix("version="))
            .and_then(|v| v.parse().ok())
    });
    let user = parts
        .headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut changed = api.changed.subscribe();
    let deadline = tokio::time::Instant::now() + api.hold;
    loop {
        let version = api
            .versions
            .lock()
            .unwrap()
            .get(&order)
            .copied()
            .unwrap_or(0);
        if after.is_none_or(|a| version > a) {
            let state = serde_json::json!({"order": order, "version": version, "user": user});
            return Response::builder()
                .header("content-type", "application/json")
                .header("cache-control", "private, max-age=0")
                .header("etag", format!("\"v{version}\""))
                .header("set-cookie", "tracking=upstream-session; HttpOnly")
                .header("x-internal", "not for clients")
                .header("x-trace", format!("trace-{version}"))
                .body(full(state.to_string()))
                .unwrap();
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            return Response::builder()
                .status(304)
                .header("etag", format!("\"v{version}\""))
                .body(full(""))
                .unwrap();
        }
    }
}

fn config(upstream: &Upstream, extra: &str) -> TestConfig {
    let orders = r#"
path = "/orders/{id}/status"
kind = "collapse"
upstream = "api"
cursor.query = "version"
next_cursor.json = "/version"
expose_headers = ["x-trace"]
auth = "public"
linger = "30s"
"#;
    TestConfig::new()
        .upstream_with(
            "api",
            &upstream.url(),
            r#"headers = { X-Pollmux-Token = "own" }"#,
        )
        .route("orders", &format!("{orders}{extra}"))
}

const PUBLIC: &str = "share = \"public\"";

/// One client request: status, headers and body bytes.
async fn poll(conn: &mut Conn, path: &str, auth: Option<&str>) -> (u16, HeaderMap, Bytes) {
    let mut req = Request::get(path).header("host", "t");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = conn.send(req.body(full("")).unwrap()).await;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, body_bytes(resp).await)
}

fn version_of(body: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON state");
    v["version"].as_u64().expect("version")
}

const WAITING: &str = "pollmux_polls_active{route=\"orders\"}";

async fn wait_for_waiters(gw: &Gateway, n: usize) {
    eventually(&format!("{n} waiting clients"), || async {
        gw.metric(WAITING).await == n as f64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_share_one_upstream_request_and_get_identical_bytes() {
    let (api, upstream) = start_api(Duration::from_secs(30)).await;
    let gw = Gateway::start(&config(&upstream, PUBLIC).toml()).await;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for i in 0..1000 {
        // Parameters in another order are the same key.
        let path = if i % 2 == 0 {
            "/orders/42/status?version=0&fields=all"
        } else {
            "/orders/42/status?fields=all&version=0"
        };
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            poll(&mut conn, path, Some(&format!("Bearer user-{i}"))).await
        }));
    }
    wait_for_waiters(&gw, 1000).await;
    assert_eq!(api.gets("/orders/42/status?fields=all&version=0"), 1);
    assert_eq!(api.total_gets(), 1);
    api.bump("42");

    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    let (status, headers, body) = &answers[0];
    assert_eq!(*status, 200);
    assert_eq!(version_of(body), 1);
    assert_eq!(headers["etag"], "\"v1\"");
    assert_eq!(headers["x-trace"], "trace-1");
    assert_eq!(headers["cache-control"], "private, max-age=0");
    assert!(!headers.contains_key("x-internal"), "{headers:?}");
    for (s, h, b) in &answers {
        assert_eq!((s, b), (status, body), "every waiter gets the same bytes");
        assert!(
            !h.contains_key("set-cookie"),
            "a shared answer carried Set-Cookie"
        );
        assert_eq!(h["content-type"], "application/json");
    }
    // pollmux's own credential went upstream; no client's did.
    let seen = api.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.headers["x-pollmux-token"], "own");
    assert!(!seen.headers.contains_key("authorization"), "{seen:?}");
    assert_eq!(
        gw.metric("pollmux_collapsed_requests_total{route=\"orders\"}")
            .await,
        999.0
    );
    assert_eq!(
        gw.metric("pollmux_set_cookie_removed_total{route=\"orders\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("pollmux_requests_total{kind=\"collapse\",route=\"orders\",status=\"200\"}")
            .await,
        1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_requests_keep_one_upstream_request_per_event() {
    const CLIENTS: usize = 1000;
    const EVENTS: u64 = 10;
    let (api, upstream) = start_api(Duration::from_secs(30)).await;
    let gw = Gateway::start(&config(&upstream, PUBLIC).toml()).await;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut version = 0;
            let mut seen = Vec::new();
            while version < EVENTS {
                let path = format!("/orders/7/status?version={version}");
                let (status, _, body) = poll(&mut conn, &path, None).await;
                assert_eq!(status, 200);
                version = version_of(&body);
                seen.push(version);
            }
            seen
        }));
    }
    for event in 1..=EVENTS {
        // Every client is waiting on the current version, on a request already upstream.
        wait_for_waiters(&gw, CLIENTS).await;
        let target = format!("/orders/7/status?version={}", event - 1);
        assert_eq!(api.open(&target), 1, "one request in flight for {target}");
        api.bump("7");
        if event < EVENTS {
            // The next request is opened by pollmux itself, whether or not clients re-polled.
            let next = format!("/orders/7/status?version={event}");
            eventually("the chained request", || async { api.open(&next) == 1 }).await;
        }
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), (1..=EVENTS).collect::<Vec<_>>());
    }
    // One request per event, plus the chained request for the version after the last.
    let total = api.total_gets();
    assert!(total <= EVENTS as usize + 2, "{total} upstream requests");
    for v in 0..EVENTS {
        assert_eq!(api.gets(&format!("/orders/7/status?version={v}")), 1);
    }
    let requests = gw
        .metric("pollmux_requests_total{kind=\"collapse\",route=\"orders\",status=\"200\"}")
        .await;
    assert_eq!(requests, (CLIENTS as u64 * EVENTS) as f64);
    let upstream_2xx = gw
        .metric("pollmux_upstream_requests_total{result=\"2xx\",route=\"orders\"}")
        .await;
    assert_eq!(upstream_2xx, EVENTS as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_request_is_open_before_the_client_polls_again() {
    let (api, upstream) = start_api(Duration::from_secs(30)).await;
    let gw = Gateway::start(&config(&upstream, PUBLIC).toml()).await;
    let mut conn = Conn::open(gw.addr()).await;
    let addr = gw.addr();
    let first = tokio::spawn(async move {
        let mut conn = Conn::open(addr).await;
        poll(&mut conn, "/orders/8/status?version=0", None).await
    });
    wait_for_waiters(&gw, 1).await;
    api.bump("8");
    assert_eq!(version_of(&first.await.unwrap().2), 1);
    // No client has asked for version 1 yet; pollmux already has.
    let next = "/orders/8/status?version=1";
    eventually("the chained request", || async { api.open(next) == 1 }).await;
    assert_eq!(api.gets(next), 1);
    let again = tokio::spawn(async move { poll(&mut conn, next, None).await });
    wait_for_waiters(&gw, 1).await;
    api.bump("8");
    let (status, _, body) = again.await.unwrap();
    assert_eq!((status, version_of(&body)), (200, 2));
    assert_eq!(api.gets(next), 1, "the client joined the chained request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_client_is_answered_from_the_stored_response() {
    let (api, upstream) = start_api(Duration::from_secs(30)).await;
    let gw = Gateway::start(&config(&upstream, PUBLIC).toml()).await;
    let addr = gw.addr();
    let first = tokio::spawn(async move {
        let mut conn = Conn::open(addr).await;
        poll(&mut conn, "/orders/9/status?version=0", None).await
    });
    wait_for_waiters(&gw, 1).await;
    api.bump("9");
    let (status, _, body) = first.await.unwrap();
    assert_eq!((status, version_of(&body)), (200, 1));

    let mut late = Conn::open(addr).await;
    let (status, headers, late_body) = poll(&mut late, "/orders/9/status?version=0", None).await;
    assert_eq!(status, 200);
    assert_eq!(late_body, body, "the stored bytes");
    assert!(!headers.contains_key("set-cookie"));
    assert_eq!(api.gets("/orders/9/status?version=0"), 1);
    let hits = "pollmux_stored_hits_total{route=\"orders\"}";
    assert_eq!(gw.metric(hits).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_answers_and_errors_go_to_current_waiters_only() {
    let (api, upstream) = start_api(Duration::from_millis(300)).await;
    let gw = Gateway::start(&config(&upstream, PUBLIC).toml()).await;
    let mut conn = Conn::open(gw.addr()).await;

    // The upstream's own timeout answer (304, same version) is relayed, never stored.
    let target = "/orders/5/status?version=0";
    let (status, headers, _) = poll(&mut conn, target, None).await;
    assert_eq!(status, 304);
    assert_eq!(headers["etag"], "\"v0\"");
    let before = api.gets(target);
    let (status, _, _) = poll(&mut conn, target, None).await;
    assert_eq!(status, 304);
    assert!(api.gets(target) > before, "a timeout answer was stored");

    // An upstream error reaches the key's waiters as sent, and is asked again next time.
    let broken = "/orders/broken/status?version=0";
    let (status, _, body) = poll(&mut conn, broken, None).await;
    assert_eq!(
        (status, &body[..]),
        (503, &b"the order service is down"[..])
    );
    let (status, _, _) = poll(&mut conn, broken, None).await;
    assert_eq!(status, 503);
    assert_eq!(api.gets(broken), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_authorization_shares_only_within_one_credential() {
    let (api, upstream) = start_api(Duration::from_secs(30)).await;
    let gw = Gateway::start(&config(&upstream, "vary = [\"authorization\"]").toml()).await;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for i in 0..150 {
        let user = format!("Bearer user-{}", i % 3);
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let answer = poll(&mut conn, "/orders/1/status?version=0", Some(&user)).await;
            (user, answer)
        }));
    }
    wait_for_waiters(&gw, 150).await;
    assert_eq!(api.gets("/orders/1/status?version=0"), 3);
    api.bump("1");
    for c in clients {
        let (user, (status, _, body)) = c.await.unwrap();
        assert_eq!(status, 200);
        let state: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            state["user"],
            user.as_str(),
            "an answer crossed credentials"
        );
    }
    let seen = api.seen.lock().unwrap().clone();
    let mut creds: Vec<_> = seen
        .iter()
        .filter(|s| s.target == "/orders/1/status?version=0")
        .map(|s| s.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    creds.sort();
    assert_eq!(creds, ["Bearer user-0", "Bearer user-1", "Bearer user-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_and_bodies_pass_through() {
    let (api, upstream) = start_api(Duration::from_secs(30)).await;
    let gw = Gateway::start(&config(&upstream, PUBLIC).toml()).await;
    let addr: SocketAddr = gw.addr();
    for _ in 0..2 {
        let req = Request::post("/orders/3/status?version=0")
            .header("host", "t")
            .header("authorization", "Bearer writer")
            .body(full("{\"status\":\"shipped\"}"))
            .unwrap();
        let resp = send(addr, req).await;
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.headers()["x-echo-method"], "POST");
        assert_eq!(body_bytes(resp).await, "{\"status\":\"shipped\"}");
    }
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "each POST reached the upstream");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, "{\"status\":\"shipped\"}");
    assert_eq!(seen[0].headers["authorization"], "Bearer writer");
    assert_eq!(
        gw.metric("pollmux_collapsed_requests_total{route=\"orders\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_waiters_without_an_answer_get_503_after_the_drain_window() {
    let (_api, upstream) = start_api(Duration::from_secs(30)).await;
    let text = config(&upstream, PUBLIC)
        .shutdown("drain_window = \"200ms\"\ntimeout = \"5s\"")
        .toml();
    let gw = Gateway::start(&text).await;
    let addr = gw.addr();
    let waiter = tokio::spawn(async move {
        let mut conn = Conn::open(addr).await;
        poll(&mut conn, "/orders/4/status?version=0", None).await
    });
    wait_for_waiters(&gw, 1).await;
    gw.shutdown().await;
    let (status, headers, body) = waiter.await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:pollmux:problem:draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_topics_turns_new_topics_into_503() {
    let (_api, upstream) = start_api(Duration::from_secs(30)).await;
    let gw = Gateway::start(&config(&upstream, "share = \"public\"\nmax_topics = 1").toml()).await;
    let addr = gw.addr();
    let _held = tokio::spawn(async move {
        let mut conn = Conn::open(addr).await;
        poll(&mut conn, "/orders/1/status?version=0", None).await
    });
    wait_for_waiters(&gw, 1).await;
    let mut conn = Conn::open(addr).await;
    let (status, headers, body) = poll(&mut conn, "/orders/2/status?version=0", None).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:pollmux:problem:too-many-topics");
    assert_eq!(
        gw.metric("pollmux_topics_active{route=\"orders\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_a_sharing_rule_is_rejected() {
    let (_api, upstream) = start_api(Duration::from_secs(1)).await;
    let text = config(&upstream, "").toml();
    let err = pollmux::config::Config::from_toml(&text, std::path::Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(err.contains("routes.orders.share"), "{err}");
    assert!(err.contains("vary"), "{err}");
}
