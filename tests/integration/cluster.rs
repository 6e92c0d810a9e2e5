//! Cluster mode on real Redis servers that the tests start themselves (`redis_server.rs`):
//! several pollmux nodes in this process as one gateway.

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::common::*;
use crate::redis_server::*;

#[tokio::test]
async fn a_publish_on_one_node_answers_polls_held_on_the_others() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let gws = nodes(&redis, 3, "").await;
    // Clients wait on nodes 1 and 2 from the topic's head.
    let mut held = Vec::new();
    for gw in &gws[1..] {
        let cursor = head_cursor(gw, "a").await;
        let addr = gw.addr();
        held.push(tokio::spawn(async move {
            let resp = get(addr, &format!("/feed/a?cursor={cursor}")).await;
            (resp.status().as_u16(), body_json(resp).await)
        }));
    }
    for gw in &gws[1..] {
        eventually("the poll is held", || async {
            gw.metric("pollmux_polls_active{route=\"feed\"}").await == 1.0
        })
        .await;
    }
    let (status, published) = publish_id(gws[0].admin, "a", "hello", None).await;
    assert_eq!(status, 202, "{published}");
    for h in held {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(data(&body), ["hello"]);
        assert_eq!(
            body["cursor"], published["cursor"],
            "one cursor on every node"
        );
    }
    // The node that published keeps no copy of a topic nobody polls there.
    let text = gws[0].metrics_text().await;
    assert_eq!(
        metric_value(&text, "pollmux_topics_active{route=\"feed\"}"),
        0.0
    );
    assert_eq!(metric_value(&text, "pollmux_backplane_up"), 1.0);
}

#[tokio::test]
async fn a_client_alternating_nodes_gets_every_message_once_in_order() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let gws = std::sync::Arc::new(nodes(&redis, 3, "buffer.messages = 2000").await);
    const N: usize = 1000;
    let mut cursor = head_cursor(&gws[0], "t").await;
    let publisher = {
        let admins: Vec<_> = gws.iter().map(|g| g.admin).collect();
        tokio::spawn(async move {
            for i in 0..N {
                let (status, body) =
                    publish_id(admins[i % admins.len()], "t", &i.to_string(), None).await;
                assert_eq!(status, 202, "{body}");
            }
        })
    };
    let mut received = Vec::with_capacity(N);
    let mut polls = 0;
    // Messages each node answered with: the client really was served by all of them.
    let mut served = [0usize; 3];
    while received.len() < N {
        let gw = &gws[polls % gws.len()];
        polls += 1;
        let (status, body) = poll(gw, &format!("/feed/t?cursor={cursor}")).await;
        assert_eq!(status, 200, "poll {polls} on node {}: {body}", polls % 3);
        assert_ne!(body["gap"], true, "{body}");
        served[(polls - 1) % 3] += data(&body).len();
        received.extend(data(&body));
        cursor = body["cursor"].as_str().unwrap().to_owned();
    }
    publisher.await.unwrap();
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(received, expected, "every message once, in order");
    assert!(
        served.iter().all(|n| *n > 0),
        "every node answered with messages: {served:?}"
    );
}

#[tokio::test]
async fn one_message_id_published_to_two_nodes_is_one_message() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let gws = nodes(&redis, 2, "start = \"earliest\"").await;
    let (s1, first) = publish_id(gws[0].admin, "d", "once", Some("m-1")).await;
    let (s2, second) = publish_id(gws[1].admin, "d", "once", Some("m-1")).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(
        first["cursor"], second["cursor"],
        "the same cursor from both"
    );
    publish_id(gws[1].admin, "d", "next", Some("m-2")).await;
    for gw in &gws {
        let (status, body) = poll(gw, "/feed/d?cursor=earliest&timeout=0").await;
        assert_eq!(status, 200);
        assert_eq!(data(&body), ["once", "next"]);
    }
    assert_eq!(
        gws[1]
            .metric("pollmux_backplane_dedupe_total{route=\"feed\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn cursors_survive_a_node_restart() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let gw = Gateway::start(&node_config(&redis, "n0", "")).await;
    let cursor = head_cursor(&gw, "r").await;
    publish_id(gw.admin, "r", "before", None).await;
    gw.shutdown().await;
    let again = Gateway::start(&node_config(&redis, "n0", "")).await;
    publish_id(again.admin, "r", "after", None).await;
    let (status, body) = poll(&again, &format!("/feed/r?cursor={cursor}&timeout=0")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(data(&body), ["before", "after"]);
}

#[tokio::test]
async fn a_redis_restart_without_persistence_expires_old_cursors() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let gws = nodes(&redis, 2, "").await;
    let cursor = head_cursor(&gws[1], "x").await;
    publish_id(gws[0].admin, "x", "one", None).await;
    let (_, body) = poll(&gws[1], &format!("/feed/x?cursor={cursor}")).await;
    assert_eq!(data(&body), ["one"]);
    let seen = body["cursor"].as_str().unwrap().to_owned();
    redis.restart().await;
    // The first publish after the restart may meet a node still reconnecting: it retries
    // within backplane_grace.
    let (status, body) = publish_id(gws[0].admin, "x", "two", None).await;
    assert_eq!(status, 202, "{body}");
    // The log started again: the cursor of before names a position of another epoch.
    eventually("node 1 sees the new epoch", || async {
        let resets = gws[1]
            .metric("pollmux_backplane_epoch_resets_total{cause=\"new_epoch\",route=\"feed\"}")
            .await;
        resets >= 1.0
    })
    .await;
    let (status, body) = poll(&gws[1], &format!("/feed/x?cursor={seen}&timeout=0")).await;
    assert_eq!(status, 410, "{body}");
    let latest = body["latest_cursor"].as_str().unwrap();
    assert!(body["earliest_cursor"].is_string());
    let (_, batch) = poll(&gws[1], "/feed/x?cursor=earliest&timeout=0").await;
    assert_eq!(data(&batch), ["two"], "only what the new log holds");
    assert_eq!(batch["cursor"], latest);
}

#[tokio::test]
async fn with_appendfsync_always_a_restart_keeps_every_cursor() {
    let Some(mut redis) = Redis::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .await
    else {
        return;
    };
    let gw = Gateway::start(&node_config(&redis, "n0", "")).await;
    let cursor = head_cursor(&gw, "p").await;
    for m in ["a", "b"] {
        publish_id(gw.admin, "p", m, None).await;
    }
    redis.restart().await;
    let (status, body) = publish_id(gw.admin, "p", "c", None).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = poll(&gw, &format!("/feed/p?cursor={cursor}&timeout=0")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(data(&body), ["a", "b", "c"], "same epoch, nothing lost");
    assert_eq!(
        gw.metric("pollmux_backplane_epoch_resets_total{cause=\"new_epoch\",route=\"feed\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn redis_unreachable_past_the_grace_and_back() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let gws = nodes(&redis, 2, "").await;
    // A warm topic on node 1 with a message, and a poll held there.
    let cursor = head_cursor(&gws[1], "w").await;
    publish_id(gws[0].admin, "w", "before", None).await;
    let (_, body) = poll(&gws[1], &format!("/feed/w?cursor={cursor}")).await;
    assert_eq!(data(&body), ["before"]);
    let at = body["cursor"].as_str().unwrap().to_owned();
    let held = {
        let addr = gws[1].addr();
        let at = at.clone();
        tokio::spawn(async move {
            let asked = tokio::time::Instant::now();
            let resp = get(addr, &format!("/feed/w?cursor={at}&timeout=3")).await;
            let held_for = asked.elapsed();
            (resp.status().as_u16(), body_json(resp).await, held_for)
        })
    };
    eventually("the poll is held", || async {
        gws[1].metric("pollmux_polls_active{route=\"feed\"}").await == 1.0
    })
    .await;
    redis.pause(true);
    // Publishes are retried for backplane_grace (2 s), then refused. Redis may still run
    // what it was sent when it answers again: a publisher retries with the same Message-Id.
    let (status, body) = publish_id(gws[0].admin, "w", "during", Some("w-1")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:pollmux:problem:backplane-unavailable");
    // The held poll kept holding, and timed out normally at its own deadline.
    let (status, body, held_for) = held.await.unwrap();
    assert_eq!((status, data(&body).len()), (200, 0), "{body}");
    // Its hold, less at most a sixteenth of jitter (docs/protocol.md 1.2): not cut short.
    assert!(
        held_for >= Duration::from_millis(3000 * 15 / 16),
        "{held_for:?}"
    );
    assert_eq!(body["cursor"], at.as_str());
    // A warm topic still answers from what it holds.
    let (status, body) = poll(&gws[1], &format!("/feed/w?cursor={cursor}&timeout=0")).await;
    assert_eq!((status, data(&body)), (200, vec!["before".to_owned()]));
    // A topic no node has loaded cannot be answered.
    let (status, body) = poll(&gws[1], "/feed/cold?timeout=5").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:pollmux:problem:backplane-unavailable");
    assert_eq!(gws[1].metric("pollmux_backplane_up").await, 0.0);
    redis.pause(false);
    // Within seconds: publishes, polls and cold topics work again, and nothing is repeated.
    for (m, id) in [("during", "w-1"), ("after", "w-2")] {
        let (status, body) = publish_id(gws[0].admin, "w", m, Some(id)).await;
        assert_eq!(status, 202, "{body}");
    }
    let mut got = Vec::new();
    let mut at = at;
    while got.len() < 2 {
        let (status, body) = poll(&gws[1], &format!("/feed/w?cursor={at}")).await;
        assert_eq!(status, 200, "{body}");
        got.extend(data(&body));
        at = body["cursor"].as_str().unwrap().to_owned();
    }
    assert_eq!(got, ["during", "after"], "each once");
    eventually("a topic that could not load loads", || async {
        poll(&gws[1], "/feed/cold?cursor=latest&timeout=0").await.0 == 200
    })
    .await;
    eventually("backplane_up says so", || async {
        gws[1].metric("pollmux_backplane_up").await == 1.0
    })
    .await;
    let timeouts = gws[1]
        .metric("pollmux_backplane_reconnects_total{reason=\"timeout\"}")
        .await;
    assert!(timeouts >= 1.0, "a silent server is found by its deadline");
}

#[tokio::test]
async fn the_log_is_bounded_and_a_reader_behind_it_gets_410() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let gws = nodes(&redis, 2, "buffer.messages = 3").await;
    let cursor = head_cursor(&gws[1], "b").await;
    for i in 0..250 {
        publish_id(gws[0].admin, "b", &i.to_string(), None).await;
    }
    // A node that never held the topic loads only what is retained.
    let (status, body) = poll(&gws[0], &format!("/feed/b?cursor={cursor}&timeout=0")).await;
    assert_eq!(status, 410, "{body}");
    let earliest = body["earliest_cursor"].as_str().unwrap().to_owned();
    let (_, batch) = poll(&gws[0], &format!("/feed/b?cursor={earliest}&timeout=0")).await;
    assert_eq!(data(&batch), ["247", "248", "249"]);
    let len = redis.command(&["XLEN", "pm:{feed/b}:s"]).await;
    let redis::Value::Int(len) = len else {
        panic!("{len:?}");
    };
    assert!(len < 250, "the log is trimmed: {len} entries");
}

/// The load tool's cluster fan-out (benches/compare-cluster.sh) on two nodes: the clients
/// spread over both, the publishes sent to the first, every client answered, and Redis's
/// commands counted per message.
#[tokio::test]
async fn load_tool_fans_out_over_a_cluster_and_counts_redis_commands() {
    use crate::common::Child as Pollmux;
    let Some(redis) = Redis::start().await else {
        return;
    };
    let a = Pollmux::start(&node_config(&redis, "n0", "")).await;
    let b = Pollmux::start(&node_config(&redis, "n1", "")).await;
    let pids = format!("{},{}", a.child.id().unwrap(), b.child.id().unwrap());
    let subs = format!(
        "http://{}/feed/{{topic}},http://{}/feed/{{topic}}",
        a.public, b.public
    );
    let held = format!("http://{}/metrics,http://{}/metrics", a.admin, b.admin);
    let publish = format!("http://{}/publish/feed/{{topic}}", a.admin);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        Command::new(env!("CARGO_BIN_EXE_pollmux-load"))
            .args(["run", "--target", "pollmux", "--label", "cluster"])
            .args(["--scenarios", "fanout_1topic=100,fanout_100topics=200"])
            .args(["--pid", &pids, "--sub-url", &subs, "--held-url", &held])
            .args(["--pub-url", &publish, "--redis-url", &redis.url()])
            .args(["--held-prefix", r#"pollmux_polls_active{route="feed"}"#])
            .output(),
    )
    .await
    .expect("the run ends by itself")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(results.len(), 2, "{stdout}");
    for (r, clients) in results.iter().zip([100, 200]) {
        assert_eq!(r["nodes"], 2, "{r}");
        assert_eq!(r["label"], "cluster", "{r}");
        assert_eq!(r["opened"], clients, "{r}");
        assert_eq!(r["received"], clients, "{r}");
        assert_eq!(r["lost"], 0, "{r}");
        // At least the publish script per message, as Redis itself counts.
        let per_msg = r["redis_calls_per_msg"].as_f64().expect("counted");
        assert!(per_msg >= 1.0, "{r}");
    }
}
