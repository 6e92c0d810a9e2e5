//! Hostile input against what exists so far: request smuggling attempts on a proxy route, and
//! garbage on the wire. Each gets a clear answer (or a closed connection), nothing smuggled
//! reaches the upstream, and the gateway keeps serving.

use std::sync::{Arc, Mutex};

use crate::common::*;

/// A proxy route to `url`, with `limits`.
fn api_config(url: &str, limits: &str) -> String {
    let api = r#"
path = "/api/{*rest}"
kind = "proxy"
upstream = "api"
"#;
    TestConfig::new()
        .limits(limits)
        .upstream("api", url)
        .route("api", api)
        .toml()
}

async fn setup() -> (Gateway, Arc<Mutex<Vec<String>>>, Upstream) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let upstream = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(req.uri().path().to_owned());
            text_response(200, "upstream")
        }
    })
    .await;
    let config = api_config(&upstream.url(), "header_read_timeout = \"1s\"");
    (Gateway::start(&config).await, seen, upstream)
}

const SMUGGLING: &[(&str, &str)] = &[
    (
        "CL.TE",
        "POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "TE.CL",
        "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "two differing Content-Length",
        "POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "obfuscated Transfer-Encoding",
        "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "malformed chunk",
        "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
];

#[tokio::test]
async fn smuggled_requests_never_reach_the_upstream() {
    let (gw, seen, _upstream) = setup().await;
    for (name, attempt) in SMUGGLING {
        let answer = raw_exchange(gw.addr(), attempt.as_bytes()).await;
        let statuses: Vec<&str> = answer.lines().filter(|l| l.starts_with("HTTP/")).collect();
        // One answer, then the connection ends: the smuggled request is never read as a
        // request of its own (hyper closes after a message with both Content-Length and
        // Transfer-Encoding, and refuses ambiguous framing with 400).
        assert_eq!(statuses.len(), 1, "{name}: {answer}");
        if *name == "malformed chunk" {
            // The client's broken body is the client's fault, not the upstream's.
            assert!(statuses[0].starts_with("HTTP/1.1 400"), "{answer}");
        }
        assert!(
            !seen.lock().unwrap().iter().any(|p| p.contains("smuggled")),
            "{name}: the smuggled request reached the upstream ({:?}); answer: {answer}",
            seen.lock().unwrap()
        );
    }
    // Still serving.
    assert_eq!(get(gw.addr(), "/api/ok").await.status(), 200);
}

#[tokio::test]
async fn garbage_gets_400_or_a_close_and_serving_goes_on() {
    let (gw, _seen, _upstream) = setup().await;
    for garbage in [
        &b"\x00\x01\x02\x03 not http at all\r\n\r\n"[..],
        b"GET /api/x HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /api/\x7fx HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    ] {
        let answer = raw_exchange(gw.addr(), garbage).await;
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 4")
                || answer.starts_with("HTTP/1.1 505"),
            "{:?}: {answer}",
            String::from_utf8_lossy(garbage)
        );
    }
    assert_eq!(get(gw.addr(), "/api/ok").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_at_the_write_timeout() {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    // An upstream with an endless body: only the client's reading could ever finish it.
    let upstream = Upstream::start(|_req: http::Request<hyper::body::Incoming>| async {
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        let endless = futures_util::stream::repeat_with(move || {
            Ok::<_, pollmux::upstream::BoxError>(hyper::body::Frame::data(chunk.clone()))
        });
        http::Response::new(http_body_util::StreamBody::new(endless).boxed())
    })
    .await;
    let config = api_config(&upstream.url(), "write_timeout = \"300ms\"");
    let gw = Gateway::start(&config).await;
    let open = "pollmux_connections_open{listener=\"public\",protocol=\"http1\"}";
    let mut stalled = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    stalled
        .write_all(b"GET /api/endless HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    eventually("the stalled connection to open", || async {
        gw.metric(open).await == 1.0
    })
    .await;
    // Normal clients are served while it stalls.
    assert_eq!(get(gw.addr(), "/elsewhere").await.status(), 404);
    // pollmux gives up on it although its socket stays open and unread.
    eventually("the stalled connection to be closed", || async {
        gw.metric(open).await == 0.0
    })
    .await;
    assert_eq!(get(gw.addr(), "/elsewhere").await.status(), 404);
    drop(stalled);
}

/// A poll route with `extra` keys, with `limits`.
fn per_ip_config(limits: &str, extra: &str) -> String {
    let news = r#"
path = "/news/{topic}"
kind = "poll"
source.type = "publish"
auth = "public"
hold = "30s"
max_hold = "30s"
"#;
    TestConfig::new()
        .limits(limits)
        .route("news", &format!("{news}{extra}"))
        .toml()
}

/// Holds a poll on a connection of its own; the task ends when the poll is answered.
fn hold(addr: std::net::SocketAddr, xff: Option<&str>) -> tokio::task::JoinHandle<u16> {
    let xff = xff.map(str::to_owned);
    tokio::spawn(async move {
        let mut conn = Conn::open(addr).await;
        let mut req = http::Request::get("/news/a").header("host", "t");
        if let Some(x) = xff {
            req = req.header("x-forwarded-for", x);
        }
        conn.send(req.body(full("")).unwrap())
            .await
            .status()
            .as_u16()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let gw = Gateway::start(&per_ip_config("max_connections_per_ip = 3", "")).await;
    let held: Vec<_> = (0..3).map(|_| hold(gw.addr(), None)).collect();
    let polls = "pollmux_polls_active{route=\"news\"}";
    eventually("3 held polls", || async { gw.metric(polls).await == 3.0 }).await;
    let resp = get(gw.addr(), "/news/a?timeout=0").await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        body_json(resp).await["type"],
        "urn:pollmux:problem:too-many-connections"
    );
    // One answered and closed: the address may connect again.
    publish(gw.admin, "news/a", "text/plain", "x").await;
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    eventually("a new connection to be served", || async {
        get(gw.addr(), "/news/a?timeout=0").await.status() == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_second_are_limited_per_address() {
    let gw = Gateway::start(&per_ip_config("new_connections_per_ip_per_second = 5", "")).await;
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(gw.addr(), "/news/a?timeout=0").await.status().as_u16());
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(served + refused, 20, "{statuses:?}");
    // Within one second at most 5 are served; 20 attempts can straddle one window boundary.
    let windows = started.elapsed().as_secs() as usize + 2;
    assert!(served <= 5 * windows, "{statuses:?}");
    assert!(refused >= 20 - 5 * windows, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_clients_are_counted_by_forwarded_address() {
    let limits = "max_connections_per_ip = 2\ntrusted_proxies = [\"127.0.0.1\"]";
    let gw = Gateway::start(&per_ip_config(limits, "")).await;
    // The proxy itself is exempt: its connections carry many clients.
    let held: Vec<_> = ["198.51.100.7", "6.6.6.6, 198.51.100.7"]
        .into_iter()
        .map(|x| hold(gw.addr(), Some(x)))
        .collect();
    let polls = "pollmux_polls_active{route=\"news\"}";
    eventually("2 held polls", || async { gw.metric(polls).await == 2.0 }).await;
    let addr = gw.addr();
    let ask = move |xff: &'static str| async move {
        let req = http::Request::get("/news/a?timeout=0")
            .header("host", "t")
            .header("x-forwarded-for", xff)
            .body(full(""))
            .unwrap();
        send(addr, req).await.status().as_u16()
    };
    // The forged left-hand entry does not make it another client.
    assert_eq!(ask("9.9.9.9, 198.51.100.7").await, 429);
    assert_eq!(ask("198.51.100.8").await, 200);
    publish(gw.admin, "news/a", "text/plain", "x").await;
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(ask("198.51.100.7").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_memory_limit_turns_new_topics_into_503() {
    let config = per_ip_config(
        "max_buffered_bytes = 100",
        "linger = \"2s\"\nstart = \"earliest\"",
    );
    let gw = Gateway::start(&config).await;
    let (status, _) = publish(gw.admin, "news/a", "text/plain", &"x".repeat(150)).await;
    assert_eq!(status, 202);
    let resp = get(gw.addr(), "/news/b?timeout=0").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body = body_json(resp).await;
    assert_eq!(body["type"], "urn:pollmux:problem:overloaded");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("max_buffered_bytes")
    );
    // The topic that holds the bytes is served as usual.
    let resp = get(gw.addr(), "/news/a?timeout=0").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        body_json(resp).await["messages"].as_array().unwrap().len(),
        1
    );
    eventually("the buffered bytes to show", || async {
        gw.metric("pollmux_buffered_bytes").await == 150.0
    })
    .await;
    // Once it lingers out, its bytes are free and new topics are made again.
    eventually("a new topic to be served", || async {
        get(gw.addr(), "/news/b?timeout=0").await.status() == 200
    })
    .await;
}

/// The status line of the first answer on a fresh connection to `addr` (the connection may
/// stay open after it).
async fn first_status(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let head = async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed without an answer: {:?}",
                String::from_utf8_lossy(request)
            );
            out.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, head).await.expect("an answer");
    let text = String::from_utf8_lossy(&out);
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn two_host_headers_and_connect_are_refused_before_any_route() {
    let upstream_seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = upstream_seen.clone();
    let upstream = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .push(format!("{} {}", req.method(), req.uri()));
            text_response(200, "upstream")
        }
    })
    .await;
    let config = TestConfig::new()
        .upstream("api", &upstream.url())
        .route("api", "path = \"/{*rest}\"\nkind = \"proxy\"\nupstream = \"api\"\n")
        .route(
            "news",
            "path = \"/news/{topic}\"\nkind = \"poll\"\nauth = \"public\"\nsource = { type = \"publish\" }\n",
        )
        .toml();
    let gw = Gateway::start(&config).await;
    for (request, status) in [
        // A poll (the held-poll path) and a proxied request, each with two Hosts.
        (
            &b"GET /news/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"[..],
            "400",
        ),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "400"),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "400",
        ),
        // CONNECT in origin form (hyper hands it over) and in authority form.
        (b"CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
        (b"CONNECT /x HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
        (
            b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
            "405",
        ),
    ] {
        let line = first_status(gw.addr(), request).await;
        assert!(
            line.starts_with(&format!("HTTP/1.1 {status}")),
            "{:?}: {line}",
            String::from_utf8_lossy(request)
        );
    }
    assert!(
        upstream_seen.lock().unwrap().is_empty(),
        "{:?}",
        upstream_seen.lock().unwrap()
    );
    // One Host is served as before.
    assert_eq!(get(gw.addr(), "/x").await.status(), 200);
    assert_eq!(upstream_seen.lock().unwrap().len(), 1);
}
