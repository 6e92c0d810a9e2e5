//! Upstream sources over real sockets: one subscription per topic however many clients,
//! credential isolation, reconnect with resume, linger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use crate::common::*;

/// A fake SSE upstream: per topic an append-only event log; each connection streams the log
/// from after its `Last-Event-ID` and then new events; `cut()` ends every open stream.
#[derive(Default)]
struct Feed {
    events: Mutex<HashMap<String, Vec<String>>>,
    open: Mutex<HashMap<String, usize>>,
    max_open: Mutex<HashMap<String, usize>>,
    /// Every request's target and headers.
    requests: Mutex<Vec<(String, HeaderMap)>>,
    cuts: AtomicU64,
    changed: watch::Sender<u64>,
    /// When not 0, every request is answered with this status instead of a stream.
    status: AtomicU16,
    /// Answer 410 to any request that tries to resume.
    gone_on_resume: std::sync::atomic::AtomicBool,
    /// When set, a topic's requests are answered 500 for this long after its first one.
    fail_for: Mutex<Option<std::time::Duration>>,
    first_request: Mutex<HashMap<String, std::time::Instant>>,
}

impl Feed {
    fn append(&self, topic: &str, n: usize) {
        let mut events = self.events.lock().unwrap();
        let log = events.entry(topic.to_owned()).or_default();
        for _ in 0..n {
            let id = log.len() + 1;
            log.push(id.to_string());
        }
        drop(events);
        self.changed.send_modify(|v| *v += 1);
    }

    fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::SeqCst);
        self.changed.send_modify(|v| *v += 1);
    }

    fn open_total(&self) -> usize {
        self.open.lock().unwrap().values().sum()
    }
}

/// Decrements the topic's open count when the upstream response body is dropped.
struct OpenGuard(Arc<Feed>, String);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        *self.0.open.lock().unwrap().get_mut(&self.1).unwrap() -= 1;
    }
}

/// The wire format the fake upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Sse,
    Ndjson,
    /// A long-poll API: `?cursor=N` answers the events after N as a JSON array, or 204.
    Poll,
}

async fn sse_upstream(feed: Arc<Feed>) -> Upstream {
    stream_upstream(feed, Format::Sse).await
}

async fn stream_upstream(feed: Arc<Feed>, format: Format) -> Upstream {
    Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let feed = feed.clone();
        async move {
            let target = req.uri().to_string();
            feed.requests
                .lock()
                .unwrap()
                .push((target, req.headers().clone()));
            let status = feed.status.load(Ordering::SeqCst);
            if status != 0 {
                return text_response(status, "no stream");
            }
            let topic = req.uri().path().trim_start_matches("/stream/").to_owned();
            if let Some(failing) = *feed.fail_for.lock().unwrap() {
                let mut first = feed.first_request.lock().unwrap();
                let first = first
                    .entry(topic.clone())
                    .or_insert_with(std::time::Instant::now);
                if first.elapsed() < failing {
                    return text_response(500, "failing");
                }
            }
            let resume = match format {
                Format::Sse => req
                    .headers()
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok().map(str::to_owned)),
                Format::Ndjson | Format::Poll => req.uri().query().and_then(|q| {
                    q.split('&').find_map(|kv| {
                        kv.strip_prefix("last_id=")
                            .or_else(|| kv.strip_prefix("cursor="))
                            .map(str::to_owned)
                    })
                }),
            };
            let next: usize = resume.and_then(|v| v.parse().ok()).unwrap_or(0);
            if next > 0 && feed.gone_on_resume.load(Ordering::SeqCst) {
                return text_response(410, "cannot resume");
            }
            {
                let mut open = feed.open.lock().unwrap();
                let n = open.entry(topic.clone()).or_default();
                *n += 1;
                let mut max = feed.max_open.lock().unwrap();
                let m = max.entry(topic.clone()).or_default();
                *m = (*m).max(*n);
            }
            let guard = OpenGuard(feed.clone(), topic.clone());
            if format == Format::Poll {
                return long_poll_answer(&feed, &topic, next, guard).await;
            }
            let cut_at_start = feed.cuts.load(Ordering::SeqCst);
            let changed = feed.changed.subscribe();
            let stream = futures_util::stream::unfold(
                (guard, feed.clone(), changed, next),
                move |(guard, feed, mut changed, mut next)| {
                    let topic = topic.clone();
                    async move {
                        loop {
                            if feed.cuts.load(Ordering::SeqCst) != cut_at_start {
                                return None;
                            }
                            let event = feed
                                .events
                                .lock()
                                .unwrap()
                                .get(&topic)
                                .and_then(|log| log.get(next).cloned());
                            if let Some(data) = event {
                                next += 1;
                                let text = match format {
                                    Format::Sse => format!("id: {next}\ndata: {data}\n\n"),
                                    Format::Ndjson | Format::Poll => {
                                        format!("{{\"id\":{next},\"n\":{data}}}\n")
                                    }
                                };
                                let frame = Frame::data(Bytes::from(text));
                                let item = Ok::<_, pollmux::upstream::BoxError>(frame);
                                return Some((item, (guard, feed, changed, next)));
                            }
                            changed.changed().await.ok()?;
                        }
                    }
                },
            );
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
    })
    .await
}

/// The long-poll API of the fake: the events after `after` as a JSON array, at once if there are
/// any, else when one arrives, else 204 after a second (the API's own hold).
async fn long_poll_answer(
    feed: &Arc<Feed>,
    topic: &str,
    after: usize,
    guard: OpenGuard,
) -> Response<pollmux::upstream::Body> {
    let mut changed = feed.changed.subscribe();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let events: Vec<serde_json::Value> = feed
            .events
            .lock()
            .unwrap()
            .get(topic)
            .map(|log| {
                log.iter()
                    .enumerate()
                    .skip(after)
                    .take(10)
                    .map(|(i, n)| serde_json::json!({"id": i + 1, "n": n.parse::<u64>().unwrap()}))
                    .collect()
            })
            .unwrap_or_default();
        if !events.is_empty() {
            drop(guard);
            return Response::builder()
                .header("content-type", "application/json")
                .body(full(serde_json::Value::Array(events).to_string()))
                .unwrap();
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            drop(guard);
            return text_response(204, "");
        }
    }
}

fn config(upstream: &Upstream) -> String {
    config_with(upstream, "")
}

fn config_with(upstream: &Upstream, extra: &str) -> String {
    config_for(upstream, Format::Sse, extra)
}

fn config_for(upstream: &Upstream, format: Format, extra: &str) -> String {
    let (kind, path) = match format {
        Format::Sse => ("upstream-sse", "/stream/{topic}"),
        Format::Ndjson => ("upstream-ndjson", "/stream/{topic}"),
        Format::Poll => ("upstream-poll", "/stream/{topic}?cursor={cursor}"),
    };
    let events = format!(
        r#"
path = "/events/{{topic}}"
kind = "poll"
source = {{ type = "{kind}", upstream = "feed", path = "{path}" }}
auth = "public"
hold = "30s"
max_hold = "30s"
linger = "300ms"
{extra}
"#
    );
    TestConfig::new()
        .upstream_with(
            "feed",
            &upstream.url(),
            r#"headers = { X-Pollmux-Token = "own" }"#,
        )
        .route("events", &events)
        .toml()
}

/// Polls `topic` from `cursor` until `want` messages arrived; returns their data in order.
async fn client(addr: std::net::SocketAddr, topic: String, want: usize) -> Vec<u64> {
    // Each client has a credential of its own, as users do.
    static CLIENTS: AtomicU64 = AtomicU64::new(0);
    let me = CLIENTS.fetch_add(1, Ordering::Relaxed);
    let mut c = Conn::open(addr).await;
    let mut cursor: Option<String> = None;
    let mut got = Vec::new();
    while got.len() < want {
        let path = match &cursor {
            Some(c) => format!("/events/{topic}?cursor={c}"),
            None => format!("/events/{topic}"),
        };
        let req = Request::get(path)
            .header("host", "t")
            .header("authorization", format!("Bearer client-secret-{me}"))
            .header("cookie", "session=client")
            .body(full(""))
            .unwrap();
        let body = body_json(c.send(req).await).await;
        for m in body["messages"].as_array().expect("a 200 poll answer") {
            // SSE events arrive as text, NDJSON lines as JSON objects.
            let n = match &m["data"] {
                serde_json::Value::String(s) => s.parse().unwrap(),
                object => object["n"].as_u64().unwrap(),
            };
            got.push(n);
        }
        cursor = body["cursor"].as_str().map(str::to_owned);
    }
    got
}

#[tokio::test]
async fn sse_one_subscription_per_topic_for_500_clients() {
    one_subscription_per_topic_for_500_clients(Format::Sse).await;
}

#[tokio::test]
async fn ndjson_one_subscription_per_topic_for_500_clients() {
    one_subscription_per_topic_for_500_clients(Format::Ndjson).await;
}

async fn one_subscription_per_topic_for_500_clients(format: Format) {
    const TOPICS: usize = 5;
    const PER_TOPIC: usize = 100;
    const EVENTS: usize = 20;
    let feed = Arc::new(Feed::default());
    let upstream = stream_upstream(feed.clone(), format).await;
    let gw = Gateway::start(&config_for(&upstream, format, "")).await;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for t in 0..TOPICS {
        for _ in 0..PER_TOPIC {
            clients.push(tokio::spawn(client(addr, format!("t{t}"), EVENTS)));
        }
    }
    let held = r#"pollmux_polls_active{route="events"}"#;
    eventually("every client held", || async {
        gw.metric(held).await == (TOPICS * PER_TOPIC) as f64
    })
    .await;
    eventually("one upstream subscription per topic", || async {
        feed.open_total() == TOPICS
    })
    .await;
    let subs = r#"pollmux_subscriptions_active{route="events"}"#;
    assert_eq!(gw.metric(subs).await, TOPICS as f64);
    for t in 0..TOPICS {
        feed.append(&format!("t{t}"), EVENTS);
    }
    let expected: Vec<u64> = (1..=EVENTS as u64).collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), expected);
    }
    for (topic, max) in feed.max_open.lock().unwrap().iter() {
        assert_eq!(*max, 1, "concurrent subscriptions to {topic}");
    }
    for (_, h) in feed.requests.lock().unwrap().iter() {
        assert!(
            h.get("authorization").is_none() && h.get("cookie").is_none(),
            "{h:?}"
        );
        assert_eq!(h["x-pollmux-token"], "own");
        let accept = match format {
            Format::Sse => "text/event-stream",
            Format::Ndjson => "application/x-ndjson",
            Format::Poll => "application/json",
        };
        assert_eq!(h["accept"], accept);
    }
    let received = r#"pollmux_messages_received_total{route="events"}"#;
    assert_eq!(gw.metric(received).await, (TOPICS * EVENTS) as f64);

    // Linger: with every client gone, each subscription is closed within linger (300ms) plus
    // the sweep interval; WAIT only bounds the test.
    eventually("subscriptions closed after linger", || async {
        feed.open_total() == 0
    })
    .await;
    assert_eq!(gw.metric(subs).await, 0.0);
}

#[tokio::test]
async fn poll_one_request_in_flight_per_topic_for_500_clients() {
    one_subscription_per_topic_for_500_clients(Format::Poll).await;
}

#[tokio::test]
async fn sse_reconnects_with_last_event_id_and_loses_nothing() {
    reconnects_resume_and_lose_nothing(Format::Sse).await;
}

#[tokio::test]
async fn ndjson_reconnects_with_the_resume_parameter_and_loses_nothing() {
    reconnects_resume_and_lose_nothing(Format::Ndjson).await;
}

async fn reconnects_resume_and_lose_nothing(format: Format) {
    let feed = Arc::new(Feed::default());
    let upstream = stream_upstream(feed.clone(), format).await;
    let gw = Gateway::start(&config_for(&upstream, format, "")).await;
    let addr = gw.addr();
    let clients: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client(addr, "r".into(), 30)))
        .collect();
    let received = r#"pollmux_messages_received_total{route="events"}"#;
    eventually("the subscription", || async { feed.open_total() == 1 }).await;
    for round in 1..=3u32 {
        if round > 1 {
            // The upstream drops the stream mid-way; the source reconnects and resumes.
            feed.cut();
            eventually("the reconnected subscription", || async {
                feed.open_total() == 1 && feed.requests.lock().unwrap().len() == round as usize
            })
            .await;
        }
        feed.append("r", 10);
        eventually("the source to take the events", || async {
            gw.metric(received).await == f64::from(round * 10)
        })
        .await;
    }
    let expected: Vec<u64> = (1..=30).collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), expected);
    }
    let resumed: Vec<String> = feed
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(target, h)| match format {
            Format::Sse => Some(h.get("last-event-id")?.to_str().ok()?.to_owned()),
            Format::Ndjson => Some(target.split_once("last_id=")?.1.to_owned()),
            Format::Poll => unreachable!("the poll API has no stream to cut"),
        })
        .collect();
    assert_eq!(
        resumed,
        ["10", "20"],
        "reconnects resume from the last event id"
    );
    assert_eq!(gw.metric(received).await, 30.0);
    assert!(
        gw.metric(r#"pollmux_upstream_reconnects_total{route="events"}"#)
            .await
            >= 2.0
    );
    assert_eq!(*feed.max_open.lock().unwrap().get("r").unwrap(), 1);
}

/// The config with a linger long enough that a topic and its source outlive the gaps between
/// a test's polls, however slow the machine.
fn long_linger(config: String) -> String {
    config.replace(r#"linger = "300ms""#, r#"linger = "30s""#)
}

async fn poll_once(
    addr: std::net::SocketAddr,
    path: &str,
) -> (u16, http::HeaderMap, serde_json::Value) {
    let mut c = Conn::open(addr).await;
    c.get_json(path).await
}

#[tokio::test]
async fn outage_longer_than_grace_is_503_then_recovers() {
    let feed = Arc::new(Feed::default());
    feed.status.store(503, Ordering::SeqCst);
    let upstream = sse_upstream(feed.clone()).await;
    let text = config_with(&upstream, "upstream_grace = \"300ms\"");
    let gw = Gateway::start(&long_linger(text)).await;
    // A poll held through the outage is answered 503 once the outage outlasts the grace.
    let (status, headers, body) = poll_once(gw.addr(), "/events/o?timeout=30").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:pollmux:problem:upstream-down");
    assert!(headers.contains_key("retry-after"));
    // Counted as the upstream's failure, not as pollmux refusing the client.
    let count = |outcome: &str| {
        format!(r#"pollmux_request_duration_seconds_count{{outcome="{outcome}",route="events"}}"#)
    };
    assert_eq!(gw.metric(&count("upstream_error")).await, 1.0);
    assert_eq!(gw.metric(&count("rejected")).await, 0.0);
    // The upstream comes back: the source reconnects by itself and polls work again.
    feed.status.store(0, Ordering::SeqCst);
    eventually("the source to reconnect", || async {
        feed.open_total() == 1
    })
    .await;
    let addr = gw.addr();
    let waiting = tokio::spawn(async move { poll_once(addr, "/events/o?timeout=30").await });
    eventually("the poll to be held", || async {
        gw.metric(r#"pollmux_polls_active{route="events"}"#).await == 1.0
    })
    .await;
    feed.append("o", 1);
    let (status, _, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["data"], "1");
}

/// An upstream failing for less than `upstream_grace` is never told to clients: with a grace
/// of 1 s and each topic's stream refused for 600 ms from its first request, polls on 20
/// topics held through the outage and past the grace's end get no 503, and then the first
/// message. (Before the source tried again at the grace's end, a topic whose next attempt
/// came after it answered its polls 503 with the upstream long back.)
#[tokio::test]
async fn an_outage_shorter_than_the_grace_is_never_a_503() {
    let feed = Arc::new(Feed::default());
    *feed.fail_for.lock().unwrap() = Some(std::time::Duration::from_millis(600));
    let upstream = sse_upstream(feed.clone()).await;
    let text = config_with(&upstream, "upstream_grace = \"1s\"");
    let gw = Gateway::start(&long_linger(text)).await;
    let addr = gw.addr();
    let clients: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Conn::open(addr).await;
                let mut cursor = String::from("latest");
                loop {
                    let path = format!("/events/s{i}?cursor={cursor}&timeout=1");
                    let (status, _, body) = c.get_json(&path).await;
                    assert_eq!(status, 200, "topic s{i}: {body}");
                    if let Some(m) = body["messages"].as_array().and_then(|m| m.first()) {
                        return m["data"].clone();
                    }
                    cursor = body["cursor"].as_str().unwrap().to_owned();
                }
            })
        })
        .collect();
    eventually("every topic's stream", || async { feed.open_total() == 20 }).await;
    for i in 0..20 {
        feed.append(&format!("s{i}"), 1);
    }
    for client in clients {
        assert_eq!(client.await.unwrap(), "1");
    }
}

/// A wrong endpoint is an error, not a silent loop: an `upstream-sse` source whose upstream
/// answers 200 with a page that is not an event stream, or with event streams that end at
/// once, again and again, is down after `upstream_grace` like one that refuses; the first
/// is counted as `unusable`, not as a 2xx.
#[tokio::test]
async fn a_200_that_is_not_an_event_stream_or_ends_at_once_is_503_after_the_grace() {
    for (content_type, body, unusable) in [
        ("text/html", "<html>login</html>", true),
        ("text/event-stream", "", false),
    ] {
        let upstream = Upstream::start(move |_req| async move {
            Response::builder()
                .header("content-type", content_type)
                .body(full(body))
                .unwrap()
        })
        .await;
        let text = config_with(&upstream, "upstream_grace = \"300ms\"");
        let gw = Gateway::start(&long_linger(text)).await;
        let (status, _, body) = poll_once(gw.addr(), "/events/wrong?timeout=30").await;
        assert_eq!(status, 503, "{content_type}: {body}");
        assert_eq!(body["type"], "urn:pollmux:problem:upstream-down");
        let series = |result: &str| {
            format!(r#"pollmux_upstream_requests_total{{result="{result}",route="events"}}"#)
        };
        let counted = gw.metric(&series("unusable")).await;
        assert_eq!(counted > 0.0, unusable, "{content_type}");
        assert_eq!(
            gw.metric(&series("2xx")).await > 0.0,
            !unusable,
            "{content_type}"
        );
    }
}

/// An `upstream-poll` endpoint answering 200 with something that is not its JSON is failing,
/// not recovering at every attempt: down after `upstream_grace`.
#[tokio::test]
async fn a_poll_source_answered_200_with_garbage_is_503_after_the_grace() {
    for body in ["<html>maintenance</html>", r#"{"no": "array"}"#] {
        let upstream = Upstream::start(move |_req| async move {
            Response::builder()
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap()
        })
        .await;
        let text = config_for(&upstream, Format::Poll, "upstream_grace = \"300ms\"");
        let gw = Gateway::start(&long_linger(text)).await;
        let (status, _, answer) = poll_once(gw.addr(), "/events/garbage?timeout=30").await;
        assert_eq!(status, 503, "{body}: {answer}");
        assert_eq!(answer["type"], "urn:pollmux:problem:upstream-down");
    }
}

/// `data = "json"`: an SSE event whose data is JSON is embedded as JSON; one that is not is
/// still delivered, as text.
#[tokio::test]
async fn sse_data_as_json_is_embedded() {
    let upstream = Upstream::start(|_req| async {
        let events = "id: 1\ndata: {\"price\": 7}\n\nid: 2\ndata: not json\n\n";
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(full(events))
            .unwrap()
    })
    .await;
    let text = config_with(&upstream, "").replace(
        r#"path = "/stream/{topic}" }"#,
        r#"path = "/stream/{topic}", data = "json" }"#,
    );
    assert!(text.contains("data = \"json\""), "{text}");
    let gw = Gateway::start(&long_linger(text)).await;
    let (status, _, body) = poll_once(gw.addr(), "/events/j?cursor=earliest&timeout=30").await;
    assert_eq!(status, 200, "{body}");
    let mut messages = body["messages"].as_array().unwrap().clone();
    if messages.len() < 2 {
        let cursor = body["cursor"].as_str().unwrap();
        let (_, _, more) = poll_once(gw.addr(), &format!("/events/j?cursor={cursor}")).await;
        messages.extend(more["messages"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(messages[0]["data"], serde_json::json!({"price": 7}));
    assert_eq!(messages[1]["data"], "not json");
}

#[tokio::test]
async fn upstream_404_passes_on_and_401_is_502() {
    for (upstream_status, client_status, kind) in [
        (404, 404, "not-found"),
        (401, 502, "upstream-refused"),
        (403, 502, "upstream-refused"),
    ] {
        let feed = Arc::new(Feed::default());
        feed.status.store(upstream_status, Ordering::SeqCst);
        let upstream = sse_upstream(feed.clone()).await;
        let gw = Gateway::start(&config(&upstream)).await;
        let (status, _, body) = poll_once(gw.addr(), "/events/missing?timeout=30").await;
        assert_eq!(status, client_status, "upstream {upstream_status}: {body}");
        assert_eq!(body["type"], format!("urn:pollmux:problem:{kind}"));
    }
}

#[tokio::test]
async fn an_upstream_that_cannot_resume_leaves_a_gap_not_a_hole() {
    let feed = Arc::new(Feed::default());
    let upstream = sse_upstream(feed.clone()).await;
    let gw = Gateway::start(&long_linger(config(&upstream))).await;
    let mut c = Conn::open(gw.addr()).await;
    let addr = gw.addr();
    // Hold a poll so the topic and its source exist, then let 10 events through.
    let first = tokio::spawn(async move { poll_once(addr, "/events/g?timeout=30").await });
    eventually("the subscription", || async { feed.open_total() == 1 }).await;
    feed.append("g", 10);
    let (_, _, body) = first.await.unwrap();
    let mut cursor = body["cursor"].as_str().unwrap().to_owned();
    loop {
        let (_, _, body) = c
            .get_json(&format!("/events/g?cursor={cursor}&timeout=0"))
            .await;
        cursor = body["cursor"].as_str().unwrap().to_owned();
        if body["messages"].as_array().unwrap().is_empty() {
            break;
        }
    }
    // The stream breaks and the upstream cannot resume after event 10.
    feed.gone_on_resume.store(true, Ordering::SeqCst);
    feed.cut();
    let gaps = r#"pollmux_gaps_total{cause="unresumable",route="events"}"#;
    eventually("the gap to be recorded", || async {
        gw.metric(gaps).await == 1.0
    })
    .await;
    let (status, _, body) = c
        .get_json(&format!("/events/g?cursor={cursor}&timeout=0"))
        .await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["type"], "urn:pollmux:problem:cursor-expired");
}

#[tokio::test]
async fn sources_honour_retry_after() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let record = times.clone();
    let upstream = Upstream::start(move |_req| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(std::time::Instant::now());
            Response::builder()
                .status(503)
                .header("retry-after", "1")
                .body(full("busy"))
                .unwrap()
        }
    })
    .await;
    let gw = Gateway::start(&config(&upstream)).await;
    let addr = gw.addr();
    let _held = tokio::spawn(async move { poll_once(addr, "/events/busy?timeout=30").await });
    eventually("a retry", || async { times.lock().unwrap().len() >= 2 }).await;
    let times = times.lock().unwrap().clone();
    // Without Retry-After the first retry comes within 250 ms (full jitter); asked for 1 s, it
    // waits at least that.
    let waited = times[1] - times[0];
    assert!(
        waited >= std::time::Duration::from_millis(950),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_silent_stream_is_reconnected_after_idle_timeout() {
    let feed = Arc::new(Feed::default());
    let upstream = sse_upstream(feed.clone()).await;
    let text = long_linger(config(&upstream).replace(
        r#"path = "/stream/{topic}" }"#,
        r#"path = "/stream/{topic}", idle_timeout = "300ms" }"#,
    ));
    let gw = Gateway::start(&text).await;
    let addr = gw.addr();
    let first = tokio::spawn(async move { poll_once(addr, "/events/quiet?timeout=30").await });
    eventually("the subscription", || async { feed.open_total() == 1 }).await;
    feed.append("quiet", 1);
    let (status, _, _) = first.await.unwrap();
    assert_eq!(status, 200);
    // The stream stays open but says nothing: after 300 ms pollmux gives up on it and resumes.
    eventually("a resumed request", || async {
        feed.requests
            .lock()
            .unwrap()
            .iter()
            .any(|(_, h)| h.get("last-event-id").is_some_and(|v| v == "1"))
    })
    .await;
}

/// An SSE stream where only some events carry an `id:` (the spec lets the last id stay in
/// force): every event is its own message, exactly once. Given the id in force, the later ones
/// would be dropped as repeats of the first; given no id, the ones the upstream sends again
/// after a reconnect (it resumes after the id in force) would be delivered twice.
#[tokio::test]
async fn sse_events_without_an_id_of_their_own_are_all_delivered() {
    let upstream = Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        // The first connection ends after c; the reconnect resumes after id 1, so b and c
        // come again, then d; after id 2 nothing is new.
        let resume = req
            .headers()
            .get("last-event-id")
            .map(|v| v.as_bytes().to_vec());
        let body = match resume.as_deref() {
            None => "id: 1\ndata: a\n\ndata: b\n\ndata: c\n\n",
            Some(b"1") => "data: b\n\ndata: c\n\nid: 2\ndata: d\n\n",
            Some(_) => "",
        };
        let mut resp = text_response(200, body);
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        resp
    })
    .await;
    let gw = Gateway::start(&long_linger(config_with(&upstream, "start = \"earliest\""))).await;
    let addr = gw.addr();
    let read_until_d = async move {
        let mut seen: Vec<String> = Vec::new();
        let mut cursor = "earliest".to_owned();
        while !seen.iter().any(|d| d == "d") {
            let (status, _, body) =
                poll_once(addr, &format!("/events/t?cursor={cursor}&timeout=5")).await;
            assert_eq!(status, 200, "{body}");
            for m in body["messages"].as_array().unwrap() {
                seen.push(m["data"].as_str().unwrap().to_owned());
            }
            cursor = body["cursor"].as_str().unwrap().to_owned();
        }
        seen
    };
    let seen = tokio::time::timeout(WAIT, read_until_d)
        .await
        .expect("the last event arrives");
    assert_eq!(seen, ["a", "b", "c", "d"]);
}
