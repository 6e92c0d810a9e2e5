//! `kind = "poll"` routes fed by the publish source, over real sockets: docs/protocol.md sections 1
//! and 3, rule by rule.

use std::sync::Arc;

use http::Request;
use pollmux::hub::cursor::Cursor;
use serde_json::{Value, json};

use crate::common::*;

/// The poll route the tests poll, held at most `max_hold`, with `extra` keys.
fn news(max_hold: &str, extra: &str) -> String {
    format!(
        r#"
path = "/news/{{channel}}"
kind = "poll"
source.type = "publish"
auth = "public"
hold = "2s"
max_hold = "{max_hold}"
{extra}
"#
    )
}

async fn start(extra_route: &str) -> Gateway {
    let config = TestConfig::new().route("news", &news("2s", extra_route));
    Gateway::start(&config.toml()).await
}

/// A gateway on `config` whose polls hold long enough to all be held at once, however loaded
/// the machine.
async fn start_long_holds(config: TestConfig) -> Gateway {
    Gateway::start(&config.route("news", &news("60s", "")).toml()).await
}

fn cursor_of(body: &Value) -> String {
    body["cursor"].as_str().expect("cursor").to_owned()
}

fn datas(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["data"].clone())
        .collect()
}

#[tokio::test]
async fn held_poll_is_answered_by_a_publish() {
    let gw = start("").await;
    let addr = gw.addr();
    let waiting = tokio::spawn(async move {
        let mut c = Conn::open(addr).await;
        c.get_json("/news/sport?timeout=2").await
    });
    let held = r#"pollmux_polls_active{route="news"}"#;
    eventually("the poll to be held", || async {
        gw.metric(held).await == 1.0
    })
    .await;
    let (status, published) = publish(gw.admin, "news/sport", "text/plain", "goal").await;
    assert_eq!(status, 202);
    let (status, headers, body) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(headers.get("etag").is_none() && headers.get("last-modified").is_none());
    assert_eq!(headers["poll-cursor"], body["cursor"].as_str().unwrap());
    assert_eq!(body["cursor"], published["cursor"]);
    assert_eq!(body["more"], false);
    assert_eq!(
        body["messages"],
        json!([{"cursor": published["cursor"], "id": null, "data": "goal"}])
    );
    assert_eq!(
        gw.metric(r#"pollmux_messages_received_total{route="news"}"#)
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(r#"pollmux_messages_delivered_total{route="news"}"#)
            .await,
        1.0
    );
    assert_eq!(gw.metric(held).await, 0.0);
    let outcome = r#"pollmux_request_duration_seconds_count{outcome="message",route="news"}"#;
    assert_eq!(gw.metric(outcome).await, 1.0);
}

#[tokio::test]
async fn cursors_continue_without_loss_or_repeat() {
    let gw = start("max_batch = 2").await;
    let mut c = Conn::open(gw.addr()).await;
    let (_, _, first) = c.get_json("/news/a?timeout=0").await;
    assert_eq!(first["messages"], json!([]));
    let start = cursor_of(&first);
    for i in 0..5 {
        publish(
            gw.admin,
            "news/a",
            "application/json",
            &format!("{{\"n\":{i}}}"),
        )
        .await;
    }
    let mut cursor = start;
    let mut got = Vec::new();
    loop {
        let (status, headers, body) = c
            .get_json(&format!("/news/a?cursor={cursor}&timeout=0"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(headers["poll-cursor"], body["cursor"].as_str().unwrap());
        let msgs = body["messages"].as_array().unwrap();
        assert!(msgs.len() <= 2);
        if let Some(last) = msgs.last() {
            assert_eq!(last["cursor"], body["cursor"]);
        }
        got.extend(msgs.iter().map(|m| m["data"]["n"].as_i64().unwrap()));
        cursor = cursor_of(&body);
        if body["more"] == false {
            break;
        }
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    // Nothing newer: an empty answer that keeps the position.
    let (_, _, body) = c
        .get_json(&format!("/news/a?cursor={cursor}&timeout=0"))
        .await;
    assert_eq!(body["messages"], json!([]));
    assert_eq!(cursor_of(&body), cursor);
    // `earliest` returns everything retained.
    let (_, _, body) = c.get_json("/news/a?cursor=earliest&timeout=0").await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);
    assert_eq!(body["more"], true);
}

#[tokio::test]
async fn payload_forms() {
    let gw = start("start = \"earliest\"").await;
    publish(gw.admin, "news/f", "application/json", "{\"a\":1}").await;
    publish(gw.admin, "news/f", "text/plain; charset=utf-8", "plain").await;
    publish(gw.admin, "news/f", "application/octet-stream", "\u{1}bin").await;
    let mut c = Conn::open(gw.addr()).await;
    let (_, _, body) = c.get_json("/news/f?timeout=0").await;
    let m = &body["messages"];
    assert_eq!(m[0]["data"], json!({"a": 1}));
    assert_eq!(m[1]["data"], "plain");
    assert_eq!(m[2]["data_b64"], "AWJpbg==");
    assert!(m[2].get("data").is_none());
}

#[tokio::test]
async fn overflow_gives_410_then_the_client_continues_without_further_loss() {
    let gw = start("buffer = { messages = 3 }").await;
    let mut c = Conn::open(gw.addr()).await;
    let (_, _, first) = c.get_json("/news/o?timeout=0").await;
    let stale = cursor_of(&first);
    for i in 0..5 {
        publish(gw.admin, "news/o", "text/plain", &i.to_string()).await;
    }
    let (status, headers, body) = c
        .get_json(&format!("/news/o?cursor={stale}&timeout=0"))
        .await;
    assert_eq!(status, 410);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["type"], "urn:pollmux:problem:cursor-expired");
    let earliest = body["earliest_cursor"].as_str().unwrap().to_owned();
    let latest = body["latest_cursor"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.metric(r#"pollmux_cursor_expired_total{route="news"}"#)
            .await,
        1.0
    );
    let (_, _, retained) = c
        .get_json(&format!("/news/o?cursor={earliest}&timeout=0"))
        .await;
    assert_eq!(datas(&retained), [json!("2"), json!("3"), json!("4")]);

    // The client resynchronises and continues from latest_cursor: later messages all arrive.
    for i in 5..8 {
        publish(gw.admin, "news/o", "text/plain", &i.to_string()).await;
    }
    let (status, _, body) = c
        .get_json(&format!("/news/o?cursor={latest}&timeout=0"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(datas(&body), [json!("5"), json!("6"), json!("7")]);
}

#[tokio::test]
async fn resume_mode_answers_with_a_gap_flag() {
    let gw = start("buffer = { messages = 2 }\non_gap = \"resume\"").await;
    let mut c = Conn::open(gw.addr()).await;
    let (_, _, first) = c.get_json("/news/r?timeout=0").await;
    for i in 0..4 {
        publish(gw.admin, "news/r", "text/plain", &i.to_string()).await;
    }
    let path = format!("/news/r?cursor={}&timeout=0", cursor_of(&first));
    let (status, headers, body) = c.get_json(&path).await;
    assert_eq!(status, 200);
    assert_eq!(headers["poll-gap"], "1");
    assert_eq!(body["gap"], true);
    assert_eq!(datas(&body), [json!("2"), json!("3")]);
}

#[tokio::test]
async fn a_restart_turns_old_cursors_into_410() {
    let before = start("").await;
    let mut c = Conn::open(before.addr()).await;
    let (_, _, body) = c.get_json("/news/x?timeout=0").await;
    publish(before.admin, "news/x", "text/plain", "lost in the restart").await;
    let old = cursor_of(&body);
    before.shutdown().await;

    let after = start("").await;
    let mut c = Conn::open(after.addr()).await;
    let (status, _, body) = c.get_json(&format!("/news/x?cursor={old}&timeout=0")).await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["type"], "urn:pollmux:problem:cursor-expired");
}

#[tokio::test]
async fn invalid_cursors_are_400() {
    let gw = start("").await;
    let mut c = Conn::open(gw.addr()).await;
    let (_, _, sport) = c.get_json("/news/sport?timeout=0").await;
    let sport = cursor_of(&sport);
    let mut flipped = sport.clone().into_bytes();
    flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let mut ahead = Cursor::decode(&sport).unwrap();
    ahead.seq += 5;
    let cases = [
        format!("/news/weather?cursor={sport}&timeout=0"),
        format!("/news/sport?cursor={flipped}&timeout=0"),
        format!("/news/sport?cursor={}&timeout=0", ahead.encode()),
        "/news/sport?cursor=garbage&timeout=0".to_string(),
        format!("/news/sport?cursor={}&timeout=0", "A".repeat(300)),
    ];
    for path in cases {
        let (status, headers, body) = c.get_json(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(body["type"], "urn:pollmux:problem:invalid-cursor", "{path}");
    }
}

#[tokio::test]
async fn timeout_parameter_and_last_event_id() {
    let gw = start("").await;
    let mut c = Conn::open(gw.addr()).await;
    for bad in [
        "/news/t?timeout=abc",
        "/news/t?timeout=-1",
        "/news/t?timeout=1.5",
        "/news/t?timeout=0&timeout=1",
    ] {
        let (status, _, body) = c.get_json(bad).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["type"], "urn:pollmux:problem:invalid-request", "{bad}");
    }
    // Above max_hold (2 s) is clamped: the poll ends by itself with an empty answer.
    let (status, _, body) = c.get_json("/news/t?timeout=3600").await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"], json!([]));
    let cursor = cursor_of(&body);

    publish(gw.admin, "news/t", "text/plain", "via header").await;
    let req = Request::get("/news/t?timeout=0")
        .header("host", "t")
        .header("last-event-id", &cursor)
        .body(full(""))
        .unwrap();
    let body = body_json(c.send(req).await).await;
    assert_eq!(datas(&body), [json!("via header")]);

    let req = Request::get(format!("/news/t?timeout=0&cursor={cursor}"))
        .header("host", "t")
        .header("last-event-id", "latest")
        .body(full(""))
        .unwrap();
    assert_eq!(c.send(req).await.status(), 400);
}

#[tokio::test]
async fn methods_bodies_and_cors() {
    let gw = start("cors.origins = [\"https://app.example\"]").await;
    let mut c = Conn::open(gw.addr()).await;
    let req = Request::post("/news/m")
        .header("host", "t")
        .body(full("x"))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, OPTIONS");
    body_bytes(resp).await;

    let req = Request::get("/news/m?timeout=0")
        .header("host", "t")
        .body(full("body"))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 400);
    body_bytes(resp).await;

    let req = Request::options("/news/m")
        .header("host", "t")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .body(full(""))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-methods"], "GET");
    body_bytes(resp).await;

    let req = Request::get("/news/m?timeout=0")
        .header("host", "t")
        .header("origin", "https://app.example")
        .body(full(""))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["vary"], "Origin");
    assert_eq!(
        h["access-control-expose-headers"],
        "Poll-Cursor, Poll-Gap, Retry-After"
    );
    body_bytes(resp).await;

    let req = Request::get("/news/m?timeout=0")
        .header("host", "t")
        .header("origin", "https://evil.example")
        .body(full(""))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn publish_errors_and_dedupe() {
    let text = TestConfig::new()
        .limits("max_message_bytes = 16")
        .upstream("u", "http://127.0.0.1:9")
        .route(
            "plain",
            "path = \"/plain\"\nkind = \"proxy\"\nupstream = \"u\"",
        )
        .route("news", &news("2s", "buffer = { messages = 10 }"))
        .toml();
    let gw = Gateway::start(&text).await;
    assert_eq!(publish(gw.admin, "nope/x", "text/plain", "x").await.0, 404);
    assert_eq!(publish(gw.admin, "plain/x", "text/plain", "x").await.0, 404);
    assert_eq!(
        publish(gw.admin, "news/bad%2Fslash", "text/plain", "x")
            .await
            .0,
        400
    );
    let (status, body) = publish(gw.admin, "news/x", "text/plain", &"y".repeat(17)).await;
    assert_eq!(status, 413);
    assert_eq!(body["type"], "urn:pollmux:problem:payload-too-large");

    let send_with_id = |id: &'static str| {
        let req = Request::post("/publish/news/d")
            .header("host", "a")
            .header("message-id", id)
            .header("content-type", "text/plain")
            .body(full(id))
            .unwrap();
        send(gw.admin, req)
    };
    let first = body_json(send_with_id("m-1").await).await;
    let repeat = body_json(send_with_id("m-1").await).await;
    let other = body_json(send_with_id("m-2").await).await;
    assert_eq!(first["cursor"], repeat["cursor"]);
    assert_ne!(first["cursor"], other["cursor"]);
    let mut c = Conn::open(gw.addr()).await;
    let (_, _, body) = c.get_json("/news/d?cursor=earliest&timeout=0").await;
    assert_eq!(datas(&body), [json!("m-1"), json!("m-2")]);
    assert_eq!(body["messages"][0]["id"], "m-1");

    let req = Request::get("/publish/news/d")
        .header("host", "a")
        .body(full(""))
        .unwrap();
    assert_eq!(send(gw.admin, req).await.status(), 405);
}

#[tokio::test]
async fn publish_token_is_required_when_configured() {
    let text = TestConfig::new()
        .admin("publish_token = \"s3cret\"")
        .route("news", &news("2s", ""))
        .toml();
    let gw = Gateway::start(&text).await;
    let (status, body) = publish(gw.admin, "news/x", "text/plain", "x").await;
    assert_eq!(status, 401);
    assert_eq!(body["type"], "urn:pollmux:problem:unauthorized");
    for token in ["Bearer wrong", "Bearer s3cre", "s3cret"] {
        let req = Request::post("/publish/news/x")
            .header("host", "a")
            .header("authorization", token)
            .body(full("x"))
            .unwrap();
        assert_eq!(send(gw.admin, req).await.status(), 401, "{token}");
    }
    let req = Request::post("/publish/news/x")
        .header("host", "a")
        .header("authorization", "Bearer s3cret")
        .body(full("x"))
        .unwrap();
    assert_eq!(send(gw.admin, req).await.status(), 202);
}

#[tokio::test]
async fn max_topics_answers_503_and_linger_evicts() {
    let gw = start("max_topics = 1\nlinger = \"100ms\"").await;
    let mut c = Conn::open(gw.addr()).await;
    let (_, _, one) = c.get_json("/news/one?timeout=0").await;
    let (status, headers, body) = c.get_json("/news/two?timeout=0").await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(body["type"], "urn:pollmux:problem:too-many-topics");
    assert_eq!(
        publish(gw.admin, "news/three", "text/plain", "x").await.0,
        503
    );

    let topics = r#"pollmux_topics_active{route="news"}"#;
    assert_eq!(gw.metric(topics).await, 1.0);
    eventually("the idle topic to be evicted", || async {
        gw.metric(topics).await == 0.0
    })
    .await;
    // Memory returned: a new topic fits, and the evicted one's cursor is from a past incarnation.
    let (status, _, _) = c.get_json("/news/two?timeout=0").await;
    assert_eq!(status, 200);
    eventually("the second topic to be evicted", || async {
        gw.metric(topics).await == 0.0
    })
    .await;
    let (status, _, _) = c
        .get_json(&format!("/news/one?cursor={}&timeout=0", cursor_of(&one)))
        .await;
    assert_eq!(status, 410);
}

#[tokio::test]
async fn shutdown_answers_1000_held_polls_with_complete_200s() {
    let gw = start_long_holds(TestConfig::new().shutdown("drain_window = \"1s\"")).await;
    let addr = gw.addr();
    let mut polls = Vec::new();
    for i in 0..1000 {
        polls.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await;
            let req = Request::get(format!("/news/t{}?timeout=60", i % 10))
                .header("host", "t")
                .body(full(""))
                .unwrap();
            let resp = c.send(req).await;
            let status = resp.status();
            let close = resp.headers().get("connection").cloned();
            (status, close, body_json(resp).await)
        }));
    }
    let held = r#"pollmux_polls_active{route="news"}"#;
    eventually("1000 held polls", || async {
        gw.metric(held).await == 1000.0
    })
    .await;
    let admin = gw.admin;
    let metrics_before = get(admin, "/metrics").await.status();
    assert_eq!(metrics_before, 200);
    gw.shutdown().await;
    for p in polls {
        let (status, close, body) = p.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(close.unwrap(), "close");
        assert_eq!(body["messages"], json!([]));
        assert!(body["cursor"].is_string());
    }
}

#[tokio::test]
async fn no_loss_2000_clients_20_topics_under_fast_publishing() {
    const TOPICS: usize = 20;
    const CLIENTS_PER_TOPIC: usize = 100;
    const MESSAGES: usize = 60;
    // 2,000 clients from one address: more than the per-IP default allows.
    let gw =
        Arc::new(start_long_holds(TestConfig::new().limits("max_connections_per_ip = 0")).await);
    let addr = gw.addr();
    let mut clients = Vec::new();
    for t in 0..TOPICS {
        for _ in 0..CLIENTS_PER_TOPIC {
            clients.push(tokio::spawn(async move {
                let mut c = Conn::open(addr).await;
                let mut cursor = "earliest".to_string();
                let mut got: Vec<u64> = Vec::with_capacity(MESSAGES);
                while got.len() < MESSAGES {
                    let path = format!("/news/t{t}?cursor={cursor}&timeout=60");
                    let (status, _, body) = c.get_json(&path).await;
                    assert_eq!(status, 200, "{body}");
                    for m in body["messages"].as_array().unwrap() {
                        got.push(m["data"].as_str().unwrap().parse().unwrap());
                    }
                    cursor = cursor_of(&body);
                }
                got
            }));
        }
    }
    let held = r#"pollmux_polls_active{route="news"}"#;
    let total = (TOPICS * CLIENTS_PER_TOPIC) as f64;
    eventually("every client to be held", || async {
        gw.metric(held).await == total
    })
    .await;
    let mut publishers = Vec::new();
    for t in 0..TOPICS {
        let admin = gw.admin;
        publishers.push(tokio::spawn(async move {
            let mut c = Conn::open(admin).await;
            for i in 0..MESSAGES {
                let req = Request::post(format!("/publish/news/t{t}"))
                    .header("host", "a")
                    .header("content-type", "text/plain")
                    .body(full(i.to_string()))
                    .unwrap();
                assert_eq!(c.send(req).await.status(), 202);
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let expected: Vec<u64> = (0..MESSAGES as u64).collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), expected);
    }
    let delivered = gw
        .metric(r#"pollmux_messages_delivered_total{route="news"}"#)
        .await;
    assert_eq!(delivered, (TOPICS * CLIENTS_PER_TOPIC * MESSAGES) as f64);
}

#[tokio::test]
async fn one_client_cannot_hold_a_topic_hostage() {
    let config = TestConfig::new()
        .limits("max_polls_per_client = 2")
        .route("news", &news("2s", ""));
    let gw = Gateway::start(&config.toml()).await;
    let addr = gw.addr();
    let hold = |credential: &'static str, topic: &'static str| {
        tokio::spawn(async move {
            let mut c = Conn::open(addr).await;
            let req = Request::get(format!("/news/{topic}?timeout=2"))
                .header("host", "t")
                .header("authorization", credential)
                .body(full(""))
                .unwrap();
            c.send(req).await.status()
        })
    };
    let held = r#"pollmux_polls_active{route="news"}"#;
    let first = [hold("Bearer alice", "t"), hold("Bearer alice", "t")];
    eventually("two polls held", || async { gw.metric(held).await == 2.0 }).await;
    let mut c = Conn::open(addr).await;
    let req = Request::get("/news/t?timeout=2")
        .header("host", "t")
        .header("authorization", "Bearer alice")
        .body(full(""))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        body_json(resp).await["type"],
        "urn:pollmux:problem:too-many-polls"
    );
    // Another credential, the same one on another topic, or requests without one (many
    // clients behind one address) are not affected.
    let others = [hold("Bearer bob", "t"), hold("Bearer alice", "u")];
    let anonymous = [
        hold_anonymous(addr),
        hold_anonymous(addr),
        hold_anonymous(addr),
    ];
    eventually("the other polls held", || async {
        gw.metric(held).await == 7.0
    })
    .await;
    for p in first.into_iter().chain(others).chain(anonymous) {
        assert_eq!(p.await.unwrap(), 200);
    }
}

fn hold_anonymous(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<http::StatusCode> {
    tokio::spawn(async move {
        let mut c = Conn::open(addr).await;
        let req = Request::get("/news/t?timeout=2")
            .header("host", "t")
            .body(full(""))
            .unwrap();
        c.send(req).await.status()
    })
}
