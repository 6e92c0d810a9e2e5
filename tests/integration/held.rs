//! The held-poll HTTP/1.1 path (src/server/h1.rs) over raw sockets: answers written in place
//! by the publisher, keep-alive and pipelining after them, the hand-over to hyper, clients that
//! leave, cross-origin answers and answers larger than the socket takes at once.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

fn config() -> String {
    let news = r#"
path = "/news/{channel}"
kind = "poll"
source.type = "publish"
auth = "public"
hold = "60s"
max_hold = "60s"
cors.origins = ["https://app.example"]
"#;
    TestConfig::new().route("news", news).toml()
}

const HELD: &str = r#"pollmux_polls_active{route="news"}"#;

/// One response read off a raw connection: status, headers (names lowercase) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// Reads one whole response (by `Content-Length`) from `stream`; bytes after it stay in `buf`.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Answer {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = resp.parse(buf).expect("a valid response") {
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    let value = String::from_utf8(h.value.to_vec()).unwrap();
                    (h.name.to_ascii_lowercase(), value)
                })
                .collect();
            let status = resp.code.unwrap();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            if buf.len() >= len + length {
                let body = buf[len..len + length].to_vec();
                buf.drain(..len + length);
                return Answer {
                    status,
                    headers,
                    body,
                };
            }
        }
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("the server answers")
            .expect("read");
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn wait_held(gw: &Gateway, n: f64) {
    eventually(&format!("{n} held polls"), || async {
        gw.metric(HELD).await == n
    })
    .await;
}

async fn wait_gone(gw: &Gateway, n: f64) {
    let gone = r#"pollmux_request_duration_seconds_count{outcome="client_gone",route="news"}"#;
    eventually(&format!("{n} polls counted as client_gone"), || async {
        gw.metric(gone).await == n
    })
    .await;
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").into_bytes()
}

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(gw.addr()).await.unwrap()
}

#[tokio::test]
async fn a_parked_poll_is_answered_in_place_and_the_connection_goes_on() {
    let gw = Gateway::start(&config()).await;
    let mut s = connect(&gw).await;
    let mut buf = Vec::new();
    s.write_all(&get("/news/a", "")).await.unwrap();
    wait_held(&gw, 1.0).await;
    let (status, _) = publish(gw.admin, "news/a", "text/plain", "one").await;
    assert_eq!(status, 202);

    let answer = read_answer(&mut s, &mut buf).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert!(answer.header("date").is_some_and(|d| d.ends_with(" GMT")));
    let body = answer.json();
    assert_eq!(body["messages"][0]["data"], "one");
    let cursor = body["cursor"].as_str().unwrap().to_owned();
    assert_eq!(answer.header("poll-cursor"), Some(cursor.as_str()));
    wait_held(&gw, 0.0).await;

    // The same connection polls on from the cursor: nothing new, so the hold (0 s) ends empty.
    let path = format!("/news/a?cursor={cursor}&timeout=0");
    s.write_all(&get(&path, "")).await.unwrap();
    let empty = read_answer(&mut s, &mut buf).await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json()["messages"], Value::Array(vec![]));
    assert_eq!(empty.json()["cursor"], cursor.as_str());

    // A request this path does not serve hands the connection to hyper, which answers it and
    // the requests after it.
    s.write_all(b"POST /news/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let refused = read_answer(&mut s, &mut buf).await;
    assert_eq!(refused.status, 405);
    assert_eq!(refused.header("allow"), Some("GET, OPTIONS"));
    s.write_all(&get(&path, "")).await.unwrap();
    assert_eq!(read_answer(&mut s, &mut buf).await.status, 200);
    let delivered = gw
        .metric(r#"pollmux_messages_delivered_total{route="news"}"#)
        .await;
    assert_eq!(delivered, 1.0);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let gw = Gateway::start(&config()).await;
    let mut s = connect(&gw).await;
    let mut buf = Vec::new();
    let mut both = get("/news/p", "");
    both.extend_from_slice(&get("/news/p?timeout=0", ""));
    s.write_all(&both).await.unwrap();
    wait_held(&gw, 1.0).await;
    publish(gw.admin, "news/p", "text/plain", "first").await;

    let first = read_answer(&mut s, &mut buf).await;
    assert_eq!(first.json()["messages"][0]["data"], "first");
    let second = read_answer(&mut s, &mut buf).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["messages"], Value::Array(vec![]));
    assert_eq!(second.json()["cursor"], first.json()["cursor"]);
}

#[tokio::test]
async fn clients_that_leave_parked_polls_free_them() {
    let gw = Gateway::start(&config()).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut s = connect(&gw).await;
        s.write_all(&get("/news/gone", "")).await.unwrap();
        clients.push(s);
    }
    wait_held(&gw, 50.0).await;
    drop(clients);
    wait_gone(&gw, 50.0).await;
    wait_held(&gw, 0.0).await;
    // Nobody is left to answer: a publish now writes nowhere and loses nothing for later
    // readers.
    publish(gw.admin, "news/gone", "text/plain", "late").await;
    let resp = get_json_once(gw.addr(), "/news/gone?timeout=0").await;
    assert_eq!(resp["messages"], Value::Array(vec![]));
}

async fn get_json_once(addr: SocketAddr, path: &str) -> Value {
    let mut conn = Conn::open(addr).await;
    conn.get_json(path).await.2
}

#[tokio::test]
async fn cross_origin_polls_answered_in_place_carry_their_cors_headers() {
    let gw = Gateway::start(&config()).await;
    let mut s = connect(&gw).await;
    let mut buf = Vec::new();
    s.write_all(&get("/news/x", "Origin: https://app.example\r\n"))
        .await
        .unwrap();
    wait_held(&gw, 1.0).await;
    publish(gw.admin, "news/x", "text/plain", "hello").await;
    let answer = read_answer(&mut s, &mut buf).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(answer.header("vary"), Some("Origin"));
    assert_eq!(answer.json()["messages"][0]["data"], "hello");
}

#[tokio::test]
async fn an_answer_larger_than_the_socket_takes_at_once_arrives_whole() {
    let gw = Gateway::start(&config()).await;
    // A client that reads slowly, with a small receive buffer: the publisher cannot write the
    // whole answer at once, and the connection writes the rest.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.addr()).await.unwrap();
    s.write_all(&get("/news/big", "")).await.unwrap();
    wait_held(&gw, 1.0).await;
    let payload = "x".repeat(900_000);
    let (status, _) = publish(gw.admin, "news/big", "text/plain", &payload).await;
    assert_eq!(status, 202);
    let mut buf = Vec::new();
    let answer = read_answer(&mut s, &mut buf).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["messages"][0]["data"], payload.as_str());
    // The connection goes on afterwards.
    let cursor = answer.json()["cursor"].as_str().unwrap().to_owned();
    s.write_all(&get(&format!("/news/big?cursor={cursor}&timeout=0"), ""))
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s, &mut buf).await.status, 200);
}

#[tokio::test]
async fn a_client_that_leaves_while_its_authorized_poll_waits_frees_it() {
    // Every poll asks the hook (nothing cached): its wait begins after the hook's answer.
    let hook = Upstream::start(|_| async { text_response(200, "") }).await;
    let news = r#"
path = "/news/{channel}"
kind = "poll"
source.type = "publish"
auth = { hook = { upstream = "auth", path = "/can-read/{channel}", ttl = "0s" } }
hold = "60s"
max_hold = "60s"
"#;
    let config = TestConfig::new()
        .upstream("auth", &hook.url())
        .route("news", news)
        .toml();
    let gw = Gateway::start(&config).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut s = connect(&gw).await;
        let credential = format!("Authorization: Bearer t{i}\r\n");
        s.write_all(&get("/news/private", &credential))
            .await
            .unwrap();
        clients.push(s);
    }
    wait_held(&gw, 20.0).await;
    drop(clients);
    wait_gone(&gw, 20.0).await;
    wait_held(&gw, 0.0).await;
}

#[tokio::test]
async fn bytes_that_are_no_http_get_hypers_answer_at_once() {
    let gw = Gateway::start(&config()).await;
    // The start of a TLS ClientHello on the cleartext port: no end of head will ever come, and
    // the client keeps its side open waiting for an answer. It gets hyper's 400, not the silent
    // close at the header read timeout (10 s here).
    let hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03";
    let text = raw_exchange(gw.addr(), hello).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}
