//! Authorization hooks: decided before a client joins a topic, cached per (topic, credential),
//! concurrent checks collapsed, failing closed; cross-user isolation on shared subscriptions.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use crate::common::*;

/// User `u` may read topic `t` when this holds: about a quarter of all pairs.
fn may_read(user: u64, topic: u64) -> bool {
    (user * 7 + topic).is_multiple_of(4)
}

/// The fake backend: an authorization endpoint and an SSE stream per topic.
#[derive(Default)]
struct Backend {
    /// Hook requests: (topic, headers).
    hook_calls: Mutex<Vec<(String, HeaderMap)>>,
    /// Stream requests: (topic, headers).
    streams: Mutex<Vec<(String, HeaderMap)>>,
    /// When not 0, the hook answers this status to everyone.
    hook_status: AtomicU16,
    /// Hook answers are held this long (milliseconds).
    hook_delay_ms: AtomicU64,
}

async fn start_backend() -> (Arc<Backend>, Upstream) {
    let backend = Arc::new(Backend::default());
    let state = backend.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let backend = state.clone();
        async move { serve(backend, req).await }
    })
    .await;
    (backend, upstream)
}

async fn serve(backend: Arc<Backend>, req: Request<Incoming>) -> Response<pollmux::upstream::Body> {
    let path = req.uri().path().to_owned();
    let topic = path.rsplit('/').next().unwrap_or("").to_owned();
    if path.starts_with("/can-read/") {
        backend
            .hook_calls
            .lock()
            .unwrap()
            .push((topic.clone(), req.headers().clone()));
        let delay = backend.hook_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let forced = backend.hook_status.load(Ordering::SeqCst);
        if forced != 0 {
            return Response::builder()
                .status(forced)
                .header("www-authenticate", "Bearer realm=\"orders\"")
                .body(full(""))
                .unwrap();
        }
        let user: Option<u64> = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer user-")?.parse().ok());
        let allowed = match (user, topic.parse::<u64>()) {
            (Some(u), Ok(t)) => may_read(u, t),
            _ => false,
        };
        return text_response(if allowed { 204 } else { 403 }, "");
    }
    // /stream/{topic}: one event naming the topic, then the stream stays open.
    backend
        .streams
        .lock()
        .unwrap()
        .push((topic.clone(), req.headers().clone()));
    let first = Frame::data(Bytes::from(format!(
        "id: 1\ndata: {{\"topic\":\"{topic}\"}}\n\n"
    )));
    let events = futures_util::StreamExt::chain(
        futures_util::stream::iter([Ok::<_, pollmux::upstream::BoxError>(first)]),
        futures_util::stream::pending(),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(events).boxed())
        .unwrap()
}

fn config(upstream: &Upstream, extra_hook: &str) -> TestConfig {
    let private = format!(
        r#"
path = "/private/{{topic}}"
params.topic = "^[0-9]{{1,4}}$"
kind = "poll"
source = {{ type = "upstream-sse", upstream = "backend", path = "/stream/{{topic}}" }}
auth = {{ hook = {{ upstream = "backend", path = "/can-read/{{topic}}"{extra_hook} }} }}
start = "earliest"
hold = "10s"
max_hold = "10s"
linger = "30s"
"#
    );
    TestConfig::new()
        .upstream_with(
            "backend",
            &upstream.url(),
            r#"headers = { X-Pollmux-Token = "own" }"#,
        )
        .route("private", &private)
}

async fn poll_as(conn: &mut Conn, path: &str, user: &str) -> (u16, HeaderMap, Bytes) {
    let req = Request::get(path)
        .header("host", "t")
        .header("authorization", format!("Bearer {user}"))
        .header("cookie", format!("session={user}"))
        .header("x-not-a-credential", "kept back")
        .body(full(""))
        .unwrap();
    let resp = conn.send(req).await;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, body_bytes(resp).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_reaches_a_client_the_hook_did_not_allow() {
    let (backend, upstream) = start_backend().await;
    let gw = Gateway::start(&config(&upstream, "").toml()).await;
    let addr = gw.addr();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut plan = Vec::new();
    for user in 0..200u64 {
        for _ in 0..3 {
            plan.push((user, rng.u64(0..200)));
        }
    }
    let mut polls = Vec::new();
    for &(user, topic) in &plan {
        polls.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let path = format!("/private/{topic}");
            poll_as(&mut conn, &path, &format!("user-{user}")).await
        }));
    }
    let mut allowed_topics = HashSet::new();
    for (&(user, topic), poll) in plan.iter().zip(polls) {
        let (status, _, body) = poll.await.unwrap();
        if may_read(user, topic) {
            assert_eq!(status, 200, "user {user} topic {topic}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let messages = v["messages"].as_array().unwrap();
            assert!(!messages.is_empty());
            for m in messages {
                // SSE data reaches clients as text.
                let data: serde_json::Value =
                    serde_json::from_str(m["data"].as_str().unwrap()).unwrap();
                assert_eq!(data["topic"], topic.to_string(), "a message crossed topics");
            }
            allowed_topics.insert(topic.to_string());
        } else {
            assert_eq!(status, 403, "user {user} topic {topic}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["type"], "urn:pollmux:problem:forbidden");
            assert!(v.get("messages").is_none());
        }
    }
    // Subscriptions exist only for topics someone was allowed to read, without any client
    // header; the hook saw credentials and nothing else of the client's.
    let streams = backend.streams.lock().unwrap().clone();
    let streamed: HashSet<String> = streams.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(
        streamed, allowed_topics,
        "a denied client created a subscription"
    );
    for (_, headers) in &streams {
        assert!(!headers.contains_key("authorization") && !headers.contains_key("cookie"));
        assert_eq!(headers["x-pollmux-token"], "own");
    }
    let calls = backend.hook_calls.lock().unwrap().clone();
    for (topic, headers) in &calls {
        assert!(headers.contains_key("authorization") && headers.contains_key("cookie"));
        assert!(!headers.contains_key("x-not-a-credential"));
        assert_eq!(headers["x-pollmux-topic"], topic.as_str());
        assert_eq!(
            headers["x-original-uri"],
            format!("/private/{topic}").as_str()
        );
    }
    // One hook request per distinct (user, topic), however many polls asked it.
    let distinct: HashSet<_> = plan.iter().collect();
    assert_eq!(calls.len(), distinct.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_share_one_hook_request_and_decisions_are_cached() {
    let (backend, upstream) = start_backend().await;
    backend.hook_delay_ms.store(300, Ordering::SeqCst);
    let text = config(&upstream, "")
        .limits("max_polls_per_client = 64")
        .toml();
    let gw = Gateway::start(&text).await;
    let addr = gw.addr();
    // User 0 may read topic 0; 50 of its polls at once ask the hook once.
    let mut polls = Vec::new();
    for _ in 0..50 {
        polls.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            poll_as(&mut conn, "/private/0?cursor=earliest&timeout=0", "user-0").await
        }));
    }
    for p in polls {
        assert_eq!(p.await.unwrap().0, 200);
    }
    assert_eq!(backend.hook_calls.lock().unwrap().len(), 1);
    // Later polls are decided from the cache; a denial is cached too.
    let mut conn = Conn::open(addr).await;
    for _ in 0..3 {
        let (status, _, _) = poll_as(&mut conn, "/private/0?timeout=0", "user-0").await;
        assert_eq!(status, 200);
        let (status, _, _) = poll_as(&mut conn, "/private/1?timeout=0", "user-0").await;
        assert_eq!(status, 403);
    }
    assert_eq!(backend.hook_calls.lock().unwrap().len(), 2);
    let hits = gw
        .metric("pollmux_auth_cache_hits_total{route=\"private\"}")
        .await;
    assert_eq!(hits, 5.0);
    let allows = "pollmux_auth_checks_total{result=\"allow\",route=\"private\"}";
    assert_eq!(gw.metric(allows).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_refusals_pass_through_and_failures_fail_closed() {
    let (backend, upstream) = start_backend().await;
    let gw = Gateway::start(&config(&upstream, ", timeout = \"200ms\"").toml()).await;
    let mut conn = Conn::open(gw.addr()).await;
    let cases: [(u16, u16, &str); 3] = [
        (401, 401, "urn:pollmux:problem:unauthorized"),
        (404, 404, "urn:pollmux:problem:not-found"),
        (500, 503, "urn:pollmux:problem:authorization-unavailable"),
    ];
    for (i, (hook, client, kind)) in cases.into_iter().enumerate() {
        backend.hook_status.store(hook, Ordering::SeqCst);
        // A user of its own per case: denials are cached.
        let (status, headers, body) = poll_as(
            &mut conn,
            "/private/3?timeout=0",
            &format!("user-{}", 100 + i),
        )
        .await;
        assert_eq!(status, client, "hook {hook}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], kind);
        if hook == 401 {
            assert_eq!(headers["www-authenticate"], "Bearer realm=\"orders\"");
        }
        if client == 503 {
            assert_eq!(headers["retry-after"], "1");
        }
    }
    // A hook slower than its timeout is 503 as well, and nothing was subscribed.
    backend.hook_status.store(0, Ordering::SeqCst);
    backend.hook_delay_ms.store(2_000, Ordering::SeqCst);
    let (status, _, _) = poll_as(&mut conn, "/private/3?timeout=0", "user-1").await;
    assert_eq!(status, 503);
    assert!(backend.streams.lock().unwrap().is_empty());
    let unavailable = "pollmux_auth_checks_total{result=\"unavailable\",route=\"private\"}";
    assert_eq!(gw.metric(unavailable).await, 2.0);
}

/// A collapse route behind a hook whose upstream marks its answers private: not shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_answers_are_not_shared_on_a_hook_route() {
    // The upstream's n-th answer waits until the test has released n answers.
    let served = Arc::new(AtomicU64::new(0));
    let released = Arc::new(tokio::sync::watch::Sender::new(0u64));
    let credentials: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let (counter, gate, seen) = (served.clone(), released.clone(), credentials.clone());
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let (counter, mut gate, seen) = (counter.clone(), gate.subscribe(), seen.clone());
        async move {
            if req.uri().path().starts_with("/can-read/") {
                return text_response(204, "");
            }
            let auth = req.headers().get("authorization");
            seen.lock()
                .unwrap()
                .push(auth.map(|v| v.to_str().unwrap().to_owned()));
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            gate.wait_for(|r| *r >= n).await.unwrap();
            Response::builder()
                .header("cache-control", "private")
                .body(full(format!("{{\"n\":{n}}}")))
                .unwrap()
        }
    })
    .await;
    let inbox = r#"
path = "/inbox/{id}"
kind = "collapse"
upstream = "api"
auth = { hook = { upstream = "api", path = "/can-read/{id}" } }
max_unshared = 2
"#;
    let text = TestConfig::new()
        .upstream("api", &upstream.url())
        .route("inbox", inbox)
        .toml();
    let gw = Gateway::start(&text).await;
    let addr = gw.addr();
    let ask = move |user: u64| async move {
        let mut conn = Conn::open(addr).await;
        poll_as(&mut conn, "/inbox/1", &format!("user-{user}")).await
    };
    let waiting = "pollmux_polls_active{route=\"inbox\"}";
    // Shared at first: three users wait on one request, and its private answer reaches nobody.
    let first: Vec<_> = (0..3).map(|u| tokio::spawn(ask(u))).collect();
    eventually("3 waiters", || async { gw.metric(waiting).await == 3.0 }).await;
    assert_eq!(served.load(Ordering::SeqCst), 1);
    released.send_replace(1);
    for f in first {
        let (status, _, body) = f.await.unwrap();
        assert_eq!(status, 502);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "urn:pollmux:problem:upstream-unshareable");
    }
    let unshareable = "pollmux_unshareable_answers_total{route=\"inbox\"}";
    assert_eq!(gw.metric(unshareable).await, 1.0);
    // Then one by one: each request its own upstream request, at most max_unshared at once.
    let next: Vec<_> = (0..2).map(|u| tokio::spawn(ask(u))).collect();
    eventually("2 upstream requests", || async {
        served.load(Ordering::SeqCst) == 3
    })
    .await;
    let (status, _, _) = ask(2).await;
    assert_eq!(status, 503, "beyond max_unshared");
    released.send_replace(3);
    let mut bodies = HashSet::new();
    for f in next {
        let (status, _, body) = f.await.unwrap();
        assert_eq!(status, 200);
        bodies.insert(body);
    }
    assert_eq!(bodies.len(), 2, "each got an answer of its own");
    // The shared request carried no client credential; each one-by-one request its client's.
    let mut seen = credentials.lock().unwrap().clone();
    assert_eq!(seen.remove(0), None);
    seen.sort();
    let own = |u: u64| Some(format!("Bearer user-{u}"));
    assert_eq!(seen, [own(0), own(1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_on_a_collapse_route_is_authorized_first() {
    let (backend, upstream) = start_backend().await;
    let c = r#"
path = "/c/{topic}"
kind = "collapse"
upstream = "backend"
auth = { hook = { upstream = "backend", path = "/can-read/{topic}" } }
"#;
    let text = TestConfig::new()
        .upstream("backend", &upstream.url())
        .route("c", c)
        .toml();
    let gw = Gateway::start(&text).await;
    // User 0 may not read topic 1: no method gets through to the upstream.
    for method in ["POST", "DELETE", "HEAD", "GET"] {
        let req = Request::builder()
            .method(method)
            .uri("/c/1")
            .header("host", "t")
            .header("authorization", "Bearer user-0")
            .body(full(""))
            .unwrap();
        assert_eq!(send(gw.addr(), req).await.status(), 403, "{method}");
    }
    assert!(
        backend.streams.lock().unwrap().is_empty(),
        "a refused request reached the upstream"
    );
}
