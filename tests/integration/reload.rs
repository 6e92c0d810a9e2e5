//! Live reload through `POST /-/reload` (SIGHUP takes the same path; see cli.rs): held polls of
//! unchanged routes survive, invalid configurations are refused and counted, removed and changed
//! routes answer their held polls, TLS certificates are re-read.

use std::net::SocketAddr;
use std::path::Path;

use http::Request;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::common::*;
use crate::listeners::{client_tls, pki, tls_config};

/// The route whose held polls must survive reloads.
const NEWS: &str = r#"
path = "/news/{topic}"
kind = "poll"
source.type = "publish"
auth = "public"
hold = "55s"
max_hold = "55s"
linger = "30s"
"#;

/// The news route, with reloads through the admin listener on.
fn base() -> TestConfig {
    TestConfig::new().admin("reload = true").route("news", NEWS)
}

/// A second route, changed between reloads: `variant` picks its settings.
fn with_other(variant: usize) -> TestConfig {
    let other = format!(
        r#"
path = "/other/{{topic}}"
kind = "poll"
source.type = "publish"
auth = "public"
max_batch = {}
"#,
        variant + 1
    );
    base().route("other", &other)
}

async fn reload(admin: SocketAddr) -> (u16, serde_json::Value) {
    let req = Request::post("/-/reload")
        .header("host", "admin")
        .body(full(""))
        .unwrap();
    let resp = send(admin, req).await;
    let status = resp.status().as_u16();
    (status, body_json(resp).await)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_polls_survive_twenty_reloads_and_lose_nothing() {
    const CLIENTS: usize = 1000;
    const ROUNDS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pollmux.toml");
    write(&path, &with_other(0).toml());
    let gw = Gateway::start_file(&path).await;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let topic = i % 10;
            let mut cursor = "latest".to_owned();
            let mut got = Vec::new();
            while got.len() < ROUNDS {
                let path = format!("/news/t{topic}?cursor={cursor}");
                let (status, _, body) = conn.get_json(&path).await;
                assert_eq!(status, 200, "{body}");
                for m in body["messages"].as_array().unwrap() {
                    got.push(m["data"].as_u64().unwrap());
                }
                cursor = body["cursor"].as_str().unwrap().to_owned();
            }
            got
        }));
    }
    let held = "pollmux_polls_active{route=\"news\"}";
    let mut failures = 0;
    for round in 0..ROUNDS {
        eventually("every client held", || async {
            gw.metric(held).await == CLIENTS as f64
        })
        .await;
        let invalid = round % 4 == 3;
        if invalid {
            write(&path, &with_other(round).route("broken", "kind = 7").toml());
            failures += 1;
        } else {
            write(&path, &with_other(round).toml());
        }
        let (status, body) = reload(gw.admin).await;
        if invalid {
            assert_eq!(status, 422, "{body}");
            assert_eq!(body["type"], "urn:pollmux:problem:invalid-config");
            assert!(body["detail"].as_str().unwrap().contains("routes.broken"));
        } else {
            assert_eq!(status, 200, "{body}");
            let replaced = body["replaced_routes"].as_array().unwrap();
            assert!(!replaced.iter().any(|r| r == "news"), "{body}");
        }
        for topic in 0..10 {
            let (status, _) = publish(
                gw.admin,
                &format!("news/t{topic}"),
                "application/json",
                &round.to_string(),
            )
            .await;
            assert_eq!(status, 202);
        }
    }
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(
            got,
            (0..ROUNDS as u64).collect::<Vec<_>>(),
            "lost or repeated"
        );
    }
    let text = gw.metrics_text().await;
    let failed = metric_value(&text, "pollmux_config_reloads_total{result=\"failure\"}");
    let succeeded = metric_value(&text, "pollmux_config_reloads_total{result=\"success\"}");
    assert_eq!(
        (failed, succeeded),
        (failures as f64, (ROUNDS - failures) as f64)
    );
    // The last reload (round 19) was an invalid one.
    assert_eq!(
        metric_value(&text, "pollmux_config_last_reload_successful"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_route_answers_its_held_polls_then_404s() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pollmux.toml");
    write(&path, &with_other(0).toml());
    let gw = Gateway::start_file(&path).await;
    let addr = gw.addr();
    let held = tokio::spawn(async move { Conn::open(addr).await.get_json("/other/a").await });
    eventually("the poll held", || async {
        gw.metric("pollmux_polls_active{route=\"other\"}").await == 1.0
    })
    .await;
    write(&path, &base().toml());
    let (status, body) = reload(gw.admin).await;
    assert_eq!(status, 200);
    assert_eq!(body["replaced_routes"], serde_json::json!(["other"]));
    let (status, _, body) = held.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["messages"], serde_json::json!([]));
    assert_eq!(get(addr, "/other/a").await.status(), 404);
    // The unchanged route serves on.
    assert_eq!(get(addr, "/news/a?timeout=0").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_route_starts_over_with_its_new_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pollmux.toml");
    write(&path, &with_other(2).toml()); // max_batch = 3
    let gw = Gateway::start_file(&path).await;
    let mut conn = Conn::open(gw.addr()).await;
    for n in 0..3 {
        publish(gw.admin, "other/a", "application/json", &n.to_string()).await;
    }
    let (_, _, body) = conn.get_json("/other/a?cursor=earliest&timeout=0").await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 3);
    let old_cursor = body["cursor"].as_str().unwrap().to_owned();

    write(&path, &with_other(0).toml()); // max_batch = 1
    let (status, body) = reload(gw.admin).await;
    assert_eq!(
        (status, &body["replaced_routes"]),
        (200, &serde_json::json!(["other"]))
    );
    // A new incarnation: the old cursor is expired, and batches follow the new max_batch.
    let (status, _, _) = conn
        .get_json(&format!("/other/a?cursor={old_cursor}&timeout=0"))
        .await;
    assert_eq!(status, 410);
    for n in 0..3 {
        publish(gw.admin, "other/a", "application/json", &n.to_string()).await;
    }
    let (_, _, body) = conn.get_json("/other/a?cursor=earliest&timeout=0").await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(body["more"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_tls_certificates() {
    let first = pki();
    let second = pki();
    let dir = first.dir.path();
    let text = tls_config().admin("reload = true").toml();
    let path = dir.join("pollmux.toml");
    write(&path, &text);
    let gw = Gateway::start_file(&path).await;
    let name = ServerName::try_from("localhost").unwrap();
    let handshake = |trusted: &crate::listeners::Pki| {
        let connector = client_tls(trusted, &[b"http/1.1"]);
        let name = name.clone();
        let addr = gw.addr();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect(name, tcp).await.is_ok()
        }
    };
    assert!(handshake(&first).await);
    assert!(!handshake(&second).await);
    for file in ["cert.pem", "key.pem"] {
        std::fs::copy(second.dir.path().join(file), dir.join(file)).unwrap();
    }
    assert_eq!(reload(gw.admin).await.0, 200);
    assert!(
        handshake(&second).await,
        "new connections get the new certificate"
    );
    assert!(!handshake(&first).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_endpoint_is_off_unless_enabled_and_needs_the_token_off_loopback() {
    let gw = Gateway::start(&TestConfig::new().route("news", NEWS).toml()).await;
    assert_eq!(reload(gw.admin).await.0, 404);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pollmux.toml");
    write(&path, &base().admin("publish_token = \"s3cret\"").toml());
    let gw = Gateway::start_file(&path).await;
    assert_eq!(reload(gw.admin).await.0, 401);
    let req = Request::post("/-/reload")
        .header("host", "admin")
        .header("authorization", "Bearer s3cret")
        .body(full(""))
        .unwrap();
    assert_eq!(send(gw.admin, req).await.status(), 200);
}
