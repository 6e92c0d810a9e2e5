//! The APIs people actually have, over real sockets: a plain REST resource with validators
//! (`upstream-interval`, against a GitHub-style fake with `ETag`, `304` and
//! `X-Poll-Interval`), and CouchDB-style "changes since" feeds (`upstream-poll` with
//! `next_pointer`, `initial_cursor` and `min_interval`; `upstream-ndjson` whose path already
//! carries its resume parameter). 500 clients each, every change exactly once and in order,
//! and what the upstream was asked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::common::*;

/// Polls `path` (which has no query) from `cursor` until `want` messages came; their data.
async fn follow(addr: SocketAddr, path: String, cursor: &str, want: usize) -> Vec<Value> {
    let mut c = Conn::open(addr).await;
    let mut cursor = cursor.to_owned();
    let mut got = Vec::new();
    while got.len() < want {
        let (status, _, body) = c.get_json(&format!("{path}?cursor={cursor}")).await;
        assert_eq!(status, 200, "{path}: {body}");
        for m in body["messages"].as_array().unwrap() {
            got.push(m["data"].clone());
        }
        cursor = body["cursor"].as_str().unwrap().to_owned();
    }
    got
}

/// A GitHub-style REST resource: `GET /orders/<id>` is `{"id", "version"}` with an `ETag`
/// per version; `If-None-Match` with the current tag is `304`. Optionally sends
/// `X-Poll-Interval`. Records every request: topic, time, `If-None-Match`, status.
/// One request to the fake: topic, when, its `If-None-Match`, the status answered.
type OrderRequest = (String, Instant, Option<String>, u16);

#[derive(Default)]
struct Orders {
    versions: Mutex<HashMap<String, u64>>,
    poll_interval: Mutex<Option<&'static str>>,
    requests: Mutex<Vec<OrderRequest>>,
}

impl Orders {
    fn set_all(&self, version: u64) {
        for v in self.versions.lock().unwrap().values_mut() {
            *v = version;
        }
    }

    /// How many 200s each topic got, and its requests' times and validators.
    fn of(&self, topic: &str) -> Vec<(Instant, Option<String>, u16)> {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r.0 == topic)
            .map(|r| (r.1, r.2.clone(), r.3))
            .collect()
    }

    fn served(&self, topic: &str, version: u64) -> bool {
        let oks = self.of(topic).iter().filter(|r| r.2 == 200).count();
        oks as u64 >= version
    }
}

async fn orders_api(orders: Arc<Orders>) -> Upstream {
    Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let orders = orders.clone();
        async move {
            let topic = req.uri().path().trim_start_matches("/orders/").to_owned();
            let version = *orders
                .versions
                .lock()
                .unwrap()
                .entry(topic.clone())
                .or_insert(1);
            let etag = format!("\"v{version}\"");
            let asked = req
                .headers()
                .get("if-none-match")
                .map(|v| v.to_str().unwrap().to_owned());
            let mut resp = Response::builder().header("etag", &etag);
            if let Some(secs) = *orders.poll_interval.lock().unwrap() {
                resp = resp.header("x-poll-interval", secs);
            }
            let (status, resp) = if asked.as_deref() == Some(etag.as_str()) {
                (304, resp.status(304).body(full("")).unwrap())
            } else {
                let body = json!({"id": topic, "version": version}).to_string();
                let resp = resp.header("content-type", "application/json");
                (200, resp.body(full(body)).unwrap())
            };
            let record = (topic, Instant::now(), asked, status);
            orders.requests.lock().unwrap().push(record);
            resp
        }
    })
    .await
}

fn orders_config(api: &Upstream, extra: &str) -> String {
    TestConfig::new()
        .upstream("api", &api.url())
        .route(
            "orders",
            &format!(
                "path = \"/orders/{{id}}\"\nkind = \"poll\"\nauth = \"public\"\n\
                 start = \"earliest\"\nlinger = \"30s\"\n\
                 source = {{ type = \"upstream-interval\", upstream = \"api\", \
                 path = \"/orders/{{id}}\", interval = \"100ms\"{extra} }}"
            ),
        )
        .toml()
}

/// 500 clients on 5 resources, each changed 4 times: every client gets each version exactly
/// once and in order, and each resource is asked once per interval at most (never sooner
/// than the interval after the last request), conditionally after its first answer, with one
/// 200 per version and 304s in between.
#[tokio::test]
async fn a_rest_resource_is_one_conditional_request_per_interval_for_500_clients() {
    let orders = Arc::new(Orders::default());
    let api = orders_api(orders.clone()).await;
    let gw = Gateway::start(&orders_config(&api, "")).await;
    let addr = gw.addr();
    let clients: Vec<_> = (0..500)
        .map(|i| tokio::spawn(follow(addr, format!("/orders/o{}", i % 5), "earliest", 5)))
        .collect();
    for version in 2..=5 {
        eventually("the version to be fetched", || async {
            (0..5).all(|t| orders.served(&format!("o{t}"), version - 1))
        })
        .await;
        orders.set_all(version);
    }
    for client in clients {
        let got: Vec<u64> = client
            .await
            .unwrap()
            .iter()
            .map(|d| d["version"].as_u64().unwrap())
            .collect();
        assert_eq!(got, [1, 2, 3, 4, 5]);
    }
    for t in 0..5 {
        let requests = orders.of(&format!("o{t}"));
        for pair in requests.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(
                gap >= Duration::from_millis(95),
                "o{t}: asked again after {gap:?}"
            );
        }
        assert!(
            requests[0].1.is_none(),
            "the first request is unconditional"
        );
        assert!(
            requests[1..].iter().all(|r| r.1.is_some()),
            "o{t}: every later request is conditional"
        );
        let oks = requests.iter().filter(|r| r.2 == 200).count();
        assert_eq!(oks, 5, "o{t}: one 200 per version");
    }
}

/// `X-Poll-Interval: 1` stretches a 100 ms interval to a second (GitHub's rule).
#[tokio::test]
async fn the_upstreams_poll_interval_header_stretches_the_interval() {
    let orders = Arc::new(Orders::default());
    *orders.poll_interval.lock().unwrap() = Some("1");
    let api = orders_api(orders.clone()).await;
    let extra = ", interval_header = \"X-Poll-Interval\"";
    let gw = Gateway::start(&orders_config(&api, extra)).await;
    let addr = gw.addr();
    let client = tokio::spawn(follow(addr, "/orders/slow".into(), "earliest", 1));
    assert_eq!(client.await.unwrap()[0]["version"], 1);
    eventually("three requests", || async { orders.of("slow").len() >= 3 }).await;
    for pair in orders.of("slow").windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(950),
            "asked again after {gap:?}"
        );
    }
}

/// A CouchDB-style database: changes with opaque `seq`s (`"<n>-g1"`), `GET /<db>` naming
/// `update_seq`, and `_changes` where an empty or missing `since` means "from the start",
/// `since=now` the current end, `feed=longpoll` holds for a second, `feed=normal` answers at
/// once, and `feed=continuous` streams `text/plain` NDJSON until cut. A request with `since`
/// twice stalls, as such servers do. Every request's target is recorded.
#[derive(Default)]
struct Couch {
    changes: Mutex<HashMap<String, u64>>,
    changed: watch::Sender<u64>,
    targets: Mutex<Vec<(String, Instant)>>,
    cuts: std::sync::atomic::AtomicU64,
}

fn seq(n: u64) -> String {
    format!("{n}-g1")
}

impl Couch {
    fn add(&self, db: &str, n: u64) {
        *self
            .changes
            .lock()
            .unwrap()
            .entry(db.to_owned())
            .or_default() += n;
        self.changed.send_modify(|v| *v += 1);
    }

    fn head(&self, db: &str) -> u64 {
        self.changes.lock().unwrap().get(db).copied().unwrap_or(0)
    }

    fn targets(&self) -> Vec<String> {
        let targets = self.targets.lock().unwrap();
        targets.iter().map(|t| t.0.clone()).collect()
    }

    fn times(&self) -> Vec<Instant> {
        self.targets.lock().unwrap().iter().map(|t| t.1).collect()
    }

    fn change(n: u64) -> Value {
        json!({"seq": seq(n), "id": format!("doc-{n}"), "changes": [{"rev": "1-a"}]})
    }
}

async fn couch(couch: Arc<Couch>) -> Upstream {
    Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let couch = couch.clone();
        async move {
            let target = (req.uri().to_string(), Instant::now());
            couch.targets.lock().unwrap().push(target);
            let path = req.uri().path().trim_start_matches('/').to_owned();
            let query: Vec<(String, String)> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let Some((db, "_changes")) = path.split_once('/') else {
                let body = json!({"db_name": path, "update_seq": seq(couch.head(&path))});
                return Response::new(full(body.to_string()));
            };
            let db = db.to_owned();
            let since: Vec<&str> = query
                .iter()
                .filter(|(k, _)| k == "since")
                .map(|(_, v)| v.as_str())
                .collect();
            if since.len() > 1 {
                std::future::pending::<()>().await;
            }
            let after = match since.first().copied().unwrap_or("") {
                "" => 0,
                "now" => couch.head(&db),
                s => s.split('-').next().unwrap().parse().unwrap(),
            };
            let feed = query
                .iter()
                .find(|(k, _)| k == "feed")
                .map(|(_, v)| v.clone());
            match feed.as_deref() {
                Some("continuous") => continuous(couch, db, after),
                longpoll => {
                    let mut changed = couch.changed.subscribe();
                    let hold = tokio::time::Instant::now() + Duration::from_secs(1);
                    while longpoll == Some("longpoll") && couch.head(&db) <= after {
                        if tokio::time::timeout_at(hold, changed.changed())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    let head = couch.head(&db).max(after);
                    let results: Vec<Value> = (after + 1..=head).map(Couch::change).collect();
                    let body = json!({"results": results, "last_seq": seq(head), "pending": 0});
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(full(body.to_string()))
                        .unwrap()
                }
            }
        }
    })
    .await
}

/// `feed=continuous`: one line per change after `after`, then each new one, until cut.
fn continuous(couch: Arc<Couch>, db: String, after: u64) -> Response<pollmux::upstream::Body> {
    let cut_at_start = couch.cuts.load(std::sync::atomic::Ordering::SeqCst);
    let changed = couch.changed.subscribe();
    let stream = futures_util::stream::unfold(
        (couch, changed, after),
        move |(couch, mut changed, mut next)| {
            let db = db.clone();
            async move {
                loop {
                    if couch.cuts.load(std::sync::atomic::Ordering::SeqCst) != cut_at_start {
                        return None;
                    }
                    if couch.head(&db) > next {
                        next += 1;
                        let line = format!("{}\n", Couch::change(next));
                        let frame =
                            Ok::<_, pollmux::upstream::BoxError>(Frame::data(Bytes::from(line)));
                        return Some((frame, (couch, changed, next)));
                    }
                    changed.changed().await.ok()?;
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

fn couch_config(api: &Upstream, source: &str) -> String {
    TestConfig::new()
        .upstream("couch", &api.url())
        .route(
            "changes",
            &format!(
                "path = \"/changes/{{db}}\"\nkind = \"poll\"\nauth = \"public\"\nlinger = \"30s\"\n\
                 source = {{ upstream = \"couch\", {source} }}"
            ),
        )
        .toml()
}

const LONGPOLL: &str = "type = \"upstream-poll\", \
     path = \"/{db}/_changes?feed=longpoll&since={cursor}\", items_pointer = \"/results\", \
     id_pointer = \"/seq\", next_pointer = \"/last_seq\"";

/// 500 clients on 5 databases with 50 changes of history each, starting from now (a literal
/// `since=now`, or the `update_seq` a bootstrap request read): every client gets the 10 new
/// changes exactly once and in order, none of the history; every request has one `since`.
#[tokio::test]
async fn a_changes_feed_starts_from_now_and_follows_last_seq_for_500_clients() {
    for initial in [
        "initial_cursor = \"now\"",
        "initial_cursor = { path = \"/{db}\", pointer = \"/update_seq\" }",
    ] {
        let db = Arc::new(Couch::default());
        for d in 0..5 {
            db.add(&format!("db{d}"), 50);
        }
        let api = couch(db.clone()).await;
        let config = couch_config(&api, &format!("{LONGPOLL}, {initial}"));
        let gw = Gateway::start(&config).await;
        let addr = gw.addr();
        let clients: Vec<_> = (0..500)
            .map(|i| tokio::spawn(follow(addr, format!("/changes/db{}", i % 5), "latest", 10)))
            .collect();
        eventually("every client's poll to be held", || async {
            gw.metric(r#"pollmux_polls_active{route="changes"}"#).await == 500.0
        })
        .await;
        eventually("every database followed from its end", || async {
            let targets = db.targets();
            (0..5).all(|d| {
                let from_end = ["since=now".to_owned(), format!("since={}", seq(50))];
                targets.iter().any(|t| {
                    t.starts_with(&format!("/db{d}/_changes"))
                        && from_end.iter().any(|s| t.ends_with(s.as_str()))
                })
            })
        })
        .await;
        for d in 0..5 {
            db.add(&format!("db{d}"), 10);
        }
        let want: Vec<String> = (51..=60).map(seq).collect();
        for client in clients {
            let got: Vec<String> = client
                .await
                .unwrap()
                .iter()
                .map(|c| c["seq"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(got, want, "{initial}");
        }
        for t in db.targets().iter().filter(|t| t.contains("_changes")) {
            assert_eq!(t.matches("since=").count(), 1, "{t}");
            assert!(!t.ends_with("since="), "asked from the start: {t}");
        }
    }
}

/// A "changes since" endpoint that answers at once (`feed=normal`) is asked no more often
/// than `min_interval` while it has nothing new: no busy loop.
#[tokio::test]
async fn an_endpoint_that_answers_at_once_is_not_asked_in_a_busy_loop() {
    let db = Arc::new(Couch::default());
    let api = couch(db.clone()).await;
    let source = LONGPOLL.replace("feed=longpoll", "feed=normal") + ", min_interval = \"200ms\"";
    let gw = Gateway::start(&couch_config(&api, &source)).await;
    let addr = gw.addr();
    let client = tokio::spawn(follow(addr, "/changes/quiet".into(), "latest", 1));
    eventually("five requests", || async { db.times().len() >= 5 }).await;
    // The first answer names the position (`last_seq`), so the second request follows at
    // once; from then on nothing is new.
    for pair in db.times()[1..].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(190),
            "asked again after {gap:?}"
        );
    }
    // A change is still taken at the next request.
    db.add("quiet", 1);
    assert_eq!(client.await.unwrap()[0]["seq"], seq(1));
}

/// A continuous feed whose path already carries `since=now`: after its stream is cut, the
/// source resumes with `since=<last seq>` in place of `since=now` (a second `since` would
/// stall the server), and 500 clients get every change exactly once and in order.
#[tokio::test]
async fn a_continuous_feed_resumes_by_replacing_its_since_parameter() {
    let db = Arc::new(Couch::default());
    for d in 0..5 {
        db.add(&format!("db{d}"), 20);
    }
    let api = couch(db.clone()).await;
    let source = "type = \"upstream-ndjson\", \
                  path = \"/{db}/_changes?feed=continuous&since=now\", \
                  resume_param = \"since\", id_pointer = \"/seq\"";
    let gw = Gateway::start(&couch_config(&api, source)).await;
    let addr = gw.addr();
    let clients: Vec<_> = (0..500)
        .map(|i| tokio::spawn(follow(addr, format!("/changes/db{}", i % 5), "latest", 10)))
        .collect();
    eventually("every client's poll to be held", || async {
        gw.metric(r#"pollmux_polls_active{route="changes"}"#).await == 500.0
            && gw
                .metric(r#"pollmux_subscriptions_active{route="changes"}"#)
                .await
                == 5.0
    })
    .await;
    for d in 0..5 {
        db.add(&format!("db{d}"), 5);
    }
    eventually("the first five changes to be taken", || async {
        gw.metric(r#"pollmux_messages_received_total{route="changes"}"#)
            .await
            == 25.0
    })
    .await;
    db.cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    db.changed.send_modify(|v| *v += 1);
    for d in 0..5 {
        db.add(&format!("db{d}"), 5);
    }
    let want: Vec<String> = (21..=30).map(seq).collect();
    for client in clients {
        let got: Vec<String> = tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("every change within 30 s (a stalled resume never delivers)")
            .unwrap()
            .iter()
            .map(|c| c["seq"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, want);
    }
    let resumed: Vec<String> = db.targets();
    for t in &resumed {
        assert_eq!(t.matches("since=").count(), 1, "{t}");
    }
    for d in 0..5 {
        let resume = format!("/db{d}/_changes?feed=continuous&since={}", seq(25));
        assert!(resumed.contains(&resume), "{resumed:?}");
    }
}
