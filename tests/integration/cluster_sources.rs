//! Cluster mode's upstream sources: one upstream subscription per topic for the whole
//! cluster, held by the node with the topic's lease, handed over when that node dies or is
//! paused past its lease. The nodes are child processes (so one can be killed or stopped) on a
//! Redis server of the test's own; the upstream counts its concurrent subscriptions.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pollmux::upstream::Body;
use serde_json::Value;
use tokio::sync::Notify;

use crate::common::*;
use crate::redis_server::Redis;

/// An upstream long-poll API (`GET /items?cursor=N`: the items after N, or `[]` after a short
/// hold) that records how many of its requests are in flight at once and which cursors it was
/// asked for.
#[derive(Default)]
struct Api {
    items: Mutex<Vec<u64>>,
    added: Notify,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    cursors: Mutex<Vec<String>>,
}

impl Api {
    fn add(&self, n: u64) {
        self.items.lock().unwrap().push(n);
        self.added.notify_waiters();
    }

    async fn answer(&self, cursor: &str) -> Vec<u64> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        self.cursors.lock().unwrap().push(cursor.to_owned());
        let after: u64 = cursor.parse().unwrap_or(0);
        let newer = || -> Vec<u64> {
            let items = self.items.lock().unwrap();
            items.iter().copied().filter(|n| *n > after).collect()
        };
        let added = self.added.notified();
        let mut found = newer();
        if found.is_empty() {
            // A short hold: a request of a killed node must not outlive its lease's handover.
            let _ = tokio::time::timeout(Duration::from_millis(200), added).await;
            found = newer();
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        found
    }
}

async fn start_api() -> (Upstream, Arc<Api>) {
    let api = Arc::new(Api::default());
    let state = api.clone();
    let upstream = Upstream::start(move |req| {
        let api = state.clone();
        async move {
            let cursor = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("cursor="))
                .unwrap_or("")
                .to_owned();
            let items: Vec<Value> = api
                .answer(&cursor)
                .await
                .into_iter()
                .map(|n| serde_json::json!({ "id": n, "n": n }))
                .collect();
            json_response(&Value::Array(items))
        }
    })
    .await;
    (upstream, api)
}

fn json_response(v: &Value) -> http::Response<Body> {
    http::Response::builder()
        .header("content-type", "application/json")
        .body(full(v.to_string()))
        .unwrap()
}

fn node(redis: &Redis, api: &Upstream, node: &str) -> String {
    TestConfig::new()
        .cluster(&format!(
            "backplane = \"redis\"\nnode_id = \"{node}\"\nlease_ttl = \"3s\"\n\
             backplane_grace = \"2s\"\n[cluster.redis]\nurl = \"{}\"",
            redis.url()
        ))
        .upstream("api", &api.url())
        .route(
            "feed",
            "path = \"/feed/{id}\"\nkind = \"poll\"\nauth = \"public\"\nhold = \"5s\"\n\
             start = \"earliest\"\n\
             source = { type = \"upstream-poll\", upstream = \"api\", path = \"/items?cursor={cursor}\" }",
        )
        .toml()
}

async fn leases_held(admin: SocketAddr) -> f64 {
    let text = body_string(get(admin, "/metrics").await).await;
    metric_value(&text, "pollmux_topic_leases_held{route=\"feed\"}")
}

/// Polls `addr` from `cursor` until `n` items have arrived; the items' numbers in order.
async fn follow(addr: SocketAddr, cursor: &mut String, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        let resp = get(addr, &format!("/feed/t?cursor={cursor}")).await;
        assert_eq!(resp.status(), 200);
        let body = body_json(resp).await;
        assert_ne!(body["gap"], true, "{body}");
        for m in body["messages"].as_array().unwrap() {
            // JSON messages are carried as JSON.
            got.push(m["data"]["n"].as_u64().expect("an item"));
        }
        *cursor = body["cursor"].as_str().unwrap().to_owned();
    }
    got
}

async fn head(addr: SocketAddr) -> String {
    let body = body_json(get(addr, "/feed/t?cursor=latest&timeout=0").await).await;
    body["cursor"].as_str().unwrap().to_owned()
}

/// Two nodes with waiters on one topic; which of them holds its lease (the other follows).
async fn two_nodes(redis: &Redis, upstream: &Upstream) -> (Child, Child, usize) {
    let a = Child::start(&node(redis, upstream, "n0")).await;
    let b = Child::start(&node(redis, upstream, "n1")).await;
    // A poll on each node makes the topic live on both: both want its lease.
    let (ha, hb) = (head(a.public).await, head(b.public).await);
    assert_eq!(ha, hb, "one topic, one cursor");
    let owner = Arc::new(Mutex::new(None));
    eventually("one node takes the lease", || {
        let owner = owner.clone();
        let (a, b) = (a.admin, b.admin);
        async move {
            let held = (leases_held(a).await, leases_held(b).await);
            let found = match held {
                (1.0, 0.0) => Some(0),
                (0.0, 1.0) => Some(1),
                _ => None,
            };
            *owner.lock().unwrap() = found;
            found.is_some()
        }
    })
    .await;
    let owner = owner.lock().unwrap().expect("found");
    (a, b, owner)
}

#[tokio::test]
async fn one_subscription_for_the_cluster_and_a_handover_when_its_owner_is_killed() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (upstream, api) = start_api().await;
    let (a, b, owner) = two_nodes(&redis, &upstream).await;
    let (dead, alive) = if owner == 0 { (a, b) } else { (b, a) };
    let mut cursor = head(alive.public).await;
    for n in 1..=10 {
        api.add(n);
    }
    assert_eq!(
        follow(alive.public, &mut cursor, 10).await,
        (1..=10).collect::<Vec<_>>()
    );
    dead.signal("-KILL");
    for n in 11..=20 {
        api.add(n);
    }
    // The other node takes the lease within lease_ttl, and its source resumes after the last
    // item logged: nothing lost, nothing twice.
    assert_eq!(
        follow(alive.public, &mut cursor, 10).await,
        (11..=20).collect::<Vec<_>>()
    );
    assert_eq!(leases_held(alive.admin).await, 1.0);
    assert_eq!(
        api.most_in_flight.load(Ordering::SeqCst),
        1,
        "never two subscriptions at once"
    );
    let cursors = api.cursors.lock().unwrap().clone();
    let resumed: BTreeSet<&str> = cursors.iter().map(String::as_str).collect();
    assert!(
        resumed.contains("10"),
        "the new owner resumed from the last logged id: {resumed:?}"
    );
}

#[tokio::test]
async fn an_owner_paused_past_its_lease_is_fenced() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (upstream, api) = start_api().await;
    let (a, b, owner) = two_nodes(&redis, &upstream).await;
    let (paused, other) = if owner == 0 { (a, b) } else { (b, a) };
    let mut cursor = head(other.public).await;
    api.add(1);
    assert_eq!(follow(other.public, &mut cursor, 1).await, [1]);
    paused.signal("-STOP");
    // The other node takes the lease once it expires, and carries on.
    eventually("the other node takes the lease", || async {
        leases_held(other.admin).await == 1.0
    })
    .await;
    for n in 2..=6 {
        api.add(n);
    }
    assert_eq!(follow(other.public, &mut cursor, 5).await, [2, 3, 4, 5, 6]);
    // The paused owner wakes up holding a lease that is no longer its own: it writes nothing.
    paused.signal("-CONT");
    let gone = |admin: SocketAddr| async move {
        let text = body_string(get(admin, "/metrics").await).await;
        ["lost", "fenced", "renewal_failed"]
            .iter()
            .map(|e| {
                let series = format!(
                    "pollmux_topic_lease_transitions_total{{event=\"{e}\",route=\"feed\"}}"
                );
                metric_value(&text, &series)
            })
            .sum::<f64>()
    };
    eventually("the woken owner gives its source up", || async {
        gone(paused.admin).await >= 1.0 && leases_held(paused.admin).await == 0.0
    })
    .await;
    api.add(7);
    assert_eq!(follow(other.public, &mut cursor, 1).await, [7], "no repeat");
    let body = body_json(get(other.public, "/feed/t?cursor=earliest&timeout=0").await).await;
    let all: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"]["n"].as_u64().expect("an item"))
        .collect();
    assert_eq!(all, [1, 2, 3, 4, 5, 6, 7], "the log holds each item once");
}

/// The node running a topic's source tells the others what its upstream says: a topic the
/// upstream does not have is a 404 on every node, not only on the one that asked; and an
/// upstream failing past `upstream_grace` is a 503 on every node.
#[tokio::test]
async fn an_upstream_refusal_or_outage_reaches_polls_on_every_node() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    for (upstream_status, status, kind) in [(404, 404, "not-found"), (500, 503, "upstream-down")] {
        let upstream =
            Upstream::start(move |_req| async move { text_response(upstream_status, "no feed") })
                .await;
        let config = |name: &str| {
            let grace = "hold = \"5s\"\nupstream_grace = \"300ms\"";
            node(&redis, &upstream, name).replace("hold = \"5s\"", grace)
        };
        let (a, b) = (
            Gateway::start(&config("n0")).await,
            Gateway::start(&config("n1")).await,
        );
        let topic = format!("/feed/missing-{upstream_status}?timeout=20");
        let polls: Vec<_> = [a.addr(), b.addr()]
            .into_iter()
            .map(|addr| {
                let topic = topic.clone();
                tokio::spawn(async move {
                    let resp = get(addr, &topic).await;
                    (resp.status().as_u16(), body_json(resp).await)
                })
            })
            .collect();
        for poll in polls {
            let (got, body) = poll.await.unwrap();
            assert_eq!(got, status, "{body}");
            assert_eq!(body["type"], format!("urn:pollmux:problem:{kind}"));
        }
        let owners = a.metric("pollmux_topic_leases_held{route=\"feed\"}").await
            + b.metric("pollmux_topic_leases_held{route=\"feed\"}").await;
        assert_eq!(owners, 1.0, "one source for the cluster");
    }
}
