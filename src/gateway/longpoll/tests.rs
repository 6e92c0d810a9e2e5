//! Unit tests of poll routes: query and credential bookkeeping, and a held poll's timers on
//! tokio's paused clock (the hold, the upstream grace, the drain window), which the
//! integration tests can only watch in real time.

use super::*;

use bytes::Bytes;
use futures_util::FutureExt;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};

use crate::config::{Config, RouteKind};
use crate::metrics::Metrics;

#[test]
fn query_parsing() {
    let q = PollQuery::parse(Some("cursor=abc&timeout=5&_=123")).unwrap();
    assert_eq!(q.cursor, Some("abc"));
    assert_eq!(q.timeout, Some("5"));
    assert!(PollQuery::parse(Some("cursor=a&cursor=b")).is_err());
    assert_eq!(PollQuery::parse(None).unwrap(), PollQuery::default());
    assert_eq!(PollQuery::parse(Some("timeout")).unwrap().timeout, Some(""));
}

#[test]
fn client_polls_are_bounded_per_topic_and_client() {
    let polls = Arc::new(ClientPolls::new(2));
    let a = polls.acquire("r", "t", b"alice").unwrap();
    let b = polls.acquire("r", "t", b"alice").unwrap();
    assert!(polls.acquire("r", "t", b"alice").is_none());
    let other_client = polls.acquire("r", "t", b"bob").unwrap();
    let other_topic = polls.acquire("r", "u", b"alice").unwrap();
    drop(a);
    let again = polls.acquire("r", "t", b"alice").unwrap();
    assert_eq!(polls.len(), 3);
    drop((b, again, other_client, other_topic));
    assert!(polls.is_empty());
}

#[test]
fn jitter_is_bounded() {
    let hold = Duration::from_secs(16);
    for _ in 0..1000 {
        assert!(jitter(hold) <= Duration::from_secs(1));
    }
    assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
}

/// A poll route `news` (`/news/{channel}`, hold and max_hold 2 s, upstream_grace 300 ms)
/// whose source is never started: the tests play its part on the topic.
fn news() -> PollRoute {
    let text = "[listeners.p]\naddress = \"127.0.0.1:0\"\n\
                [upstreams.u]\nurl = \"http://127.0.0.1:1\"\n\
                [routes.news]\npath = \"/news/{channel}\"\nkind = \"poll\"\nauth = \"public\"\n\
                hold = \"2s\"\nmax_hold = \"2s\"\nupstream_grace = \"300ms\"\n\
                source = { type = \"upstream-sse\", upstream = \"u\", path = \"/s/{channel}\" }\n";
    let config = Config::from_toml(text, std::path::Path::new(".")).unwrap();
    let RouteKind::Poll(poll) = &config.routes[0].kind else {
        unreachable!("a poll route");
    };
    PollRoute::new(
        "news",
        poll,
        PollMetrics::new(&Metrics::new(&config), "news"),
        None,
    )
}

/// Prepares `GET path` on `route`: a poll that waits.
fn held(route: &PollRoute, hub: &Hub, path: &str) -> Held {
    let req = Request::get(path).body(Empty::<Bytes>::new()).unwrap();
    let params = [("channel".to_owned(), "t".to_owned())];
    let clients = Arc::new(ClientPolls::new(10));
    let Ok(held) = prepare(route, hub, &clients, req, &params, None) else {
        panic!("{path} is refused");
    };
    held
}

async fn json(resp: Response<Body>) -> serde_json::Value {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// What `timeout_parameter_and_last_event_id` (tests/integration/longpoll.rs) waits two real
/// seconds for: a timeout above max_hold is clamped to it, and the poll ends by itself with
/// an empty answer, at the hold less at most its jitter.
#[tokio::test(start_paused = true)]
async fn a_held_poll_ends_at_its_hold_clamped_to_max_hold() {
    let (route, hub) = (news(), Hub::new());
    let started = Instant::now();
    let mut poll = held(&route, &hub, "/news/t?timeout=3600");
    let (resp, outcome) = poll.wait(&route, &Drain::default(), Duration::ZERO).await;
    let waited = started.elapsed();
    let max_hold = Duration::from_secs(2);
    assert!(waited <= max_hold, "{waited:?}");
    assert!(waited >= max_hold - max_hold / JITTER_DIVISOR, "{waited:?}");
    assert_eq!((resp.status(), outcome), (StatusCode::OK, Outcome::Timeout));
    let body = json(resp).await;
    assert_eq!(body["messages"], serde_json::json!([]));
    assert_eq!(body["more"], false);
}

/// What `outage_longer_than_grace_is_503_then_recovers` (tests/integration/sources.rs) waits
/// for in real time: a poll held through an upstream outage keeps waiting while its source's
/// attempts fail within `upstream_grace`, whatever wakes it, even once the grace is over, and
/// answers 503 when an attempt fails after it.
#[tokio::test(start_paused = true)]
async fn a_poll_held_through_an_outage_answers_503_once_an_attempt_fails_after_the_grace() {
    let (route, hub) = (news(), Hub::new());
    let grace = Duration::from_millis(300);
    let mut poll = held(&route, &hub, "/news/t?timeout=30");
    let topic = poll.topic().clone();
    topic.upstream_failed(None, grace, Instant::now());
    let drain = Drain::default();
    let wait = poll.wait(&route, &drain, Duration::ZERO);
    let mut wait = std::pin::pin!(wait);
    assert!(wait.as_mut().now_or_never().is_none(), "within the grace");
    tokio::time::advance(Duration::from_millis(299)).await;
    topic.upstream_failed(None, grace, Instant::now());
    assert!(
        wait.as_mut().now_or_never().is_none(),
        "an attempt failed within the grace"
    );
    // The grace is over, but no attempt has failed since: the upstream may be back.
    tokio::time::advance(Duration::from_millis(100)).await;
    topic.wake();
    assert!(
        wait.as_mut().now_or_never().is_none(),
        "woken after the grace before any attempt failed"
    );
    topic.upstream_failed(None, grace, Instant::now());
    let Some((resp, outcome)) = wait.now_or_never() else {
        panic!("a poll still waits after an attempt failed past the grace");
    };
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(outcome, Outcome::UpstreamError);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    let body = json(resp).await;
    assert_eq!(body["type"], "urn:pollmux:problem:upstream-down");
}

/// The drain answers a held poll with its empty answer at a random moment within the drain
/// window, not at the end of its hold.
#[tokio::test(start_paused = true)]
async fn a_drain_answers_a_held_poll_within_the_drain_window() {
    let (route, hub) = (news(), Hub::new());
    let mut poll = held(&route, &hub, "/news/t?timeout=2");
    let topic = poll.topic().clone();
    let drain = Drain::default();
    let window = Duration::from_millis(500);
    let wait = poll.wait(&route, &drain, window);
    let mut wait = std::pin::pin!(wait);
    assert!(
        wait.as_mut().now_or_never().is_none(),
        "nothing to answer yet"
    );
    // What `Gateway::begin_drain` does: begin the drain, then wake every topic.
    let began = Instant::now();
    drain.begin();
    topic.wake();
    let (resp, outcome) = wait.await;
    let waited = began.elapsed();
    assert!(waited <= window, "{waited:?}");
    assert_eq!(
        (resp.status(), outcome),
        (StatusCode::OK, Outcome::Shutdown)
    );
    assert_eq!(resp.headers()[header::CONNECTION], "close");
    assert_eq!(json(resp).await["messages"], serde_json::json!([]));
}

/// Every answer with one batch carries its cursor in `Poll-Cursor` without a copy of its own:
/// the header is the batch's cursor bytes, which are the body's.
#[test]
fn batch_answers_share_the_batchs_cursor_bytes() {
    let (route, hub) = (news(), Hub::new());
    let message = NewMessage {
        id: None,
        content_type: Some("text/plain".into()),
        payload: Bytes::from_static(b"goal"),
        arrived: Instant::now(),
    };
    let published = route.publish(&hub, "t", message).unwrap();
    let subscription = hub.subscribe(&route.topics, "t").unwrap();
    let Poll::Batch(batch) = subscription
        .topic()
        .poll(Requested::Earliest, Instant::now())
    else {
        panic!("the message is there to read");
    };
    let body = batch.body.as_ptr_range();
    for _ in 0..2 {
        let resp = batch_response(&batch);
        let cursor = resp.headers()[POLL_CURSOR].as_bytes();
        assert_eq!(cursor, published.cursor.as_bytes());
        assert_eq!(
            cursor.as_ptr(),
            batch.cursor.as_ptr(),
            "a copy of the cursor"
        );
        assert!(
            body.contains(&cursor.as_ptr()),
            "the cursor is not the body's"
        );
    }
}
