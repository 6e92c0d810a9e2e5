//! Operational surface: the admin endpoints, metric names accepted by promtool, every example
//! config loading, and the in-process drain.

use std::io::Write;
use std::process::{Command, Stdio};

use tokio::io::AsyncReadExt;

use crate::common::*;

/// A route of each kind.
fn config() -> String {
    let api = r#"
path = "/api/{*rest}"
kind = "proxy"
upstream = "api"
"#;
    let news = r#"
path = "/news/{topic}"
kind = "poll"
source.type = "publish"
auth = "public"
"#;
    let status = r#"
path = "/status/{id}"
kind = "collapse"
upstream = "api"
share = "public"
auth = "public"
"#;
    TestConfig::new()
        .upstream("api", "http://127.0.0.1:9")
        .route("api", api)
        .route("news", news)
        .route("status", status)
        .toml()
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let gw = Gateway::start(&config()).await;
    let resp = get(gw.admin, "/healthz").await;
    assert_eq!(resp.status(), 200);
    let resp = get(gw.admin, "/readyz").await;
    assert_eq!(resp.status(), 200);
    let resp = get(gw.admin, "/metrics").await;
    assert_eq!(resp.headers()["content-type"], "text/plain; version=0.0.4");
    let text = body_string(resp).await;
    for series in [
        "pollmux_build_info{version=",
        r#"pollmux_requests_total{kind="proxy",route="api",status="200"} 0"#,
        r#"pollmux_upstream_requests_total{result="5xx",route="api"} 0"#,
        r#"pollmux_request_duration_seconds_bucket{outcome="response",route="api",le="120"} 0"#,
        r#"pollmux_upstream_request_duration_seconds_count{route="api"} 0"#,
        r#"pollmux_polls_active{route="news"} 0"#,
        r#"pollmux_collapsed_requests_total{route="status"} 0"#,
        r#"pollmux_stored_hits_total{route="status"} 0"#,
        r#"pollmux_set_cookie_removed_total{route="status"} 0"#,
        "process_open_fds ",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    let resp = get(gw.admin, "/nope").await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let gw = Gateway::start(&config()).await;
    assert_eq!(get(gw.addr(), "/api/x").await.status(), 502);
    assert_eq!(get(gw.addr(), "/elsewhere").await.status(), 404);
    assert_eq!(get(gw.addr(), "/status/1").await.status(), 502);
    let text = gw.metrics_text().await;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        // CI installs Debian's `prometheus` package (see .ci/run) and must run this check.
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI (apt-get install prometheus)"
        );
        eprintln!("promtool not installed: metric-name lint not run here");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            pollmux::config::Config::from_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the example configs in {}",
        dir.display()
    );
}

#[tokio::test]
async fn drain_closes_idle_keep_alive_connections() {
    let gw = Gateway::start(&config()).await;
    let stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn.without_shutdown());
    let req = http::Request::get("/none")
        .header("host", "x")
        .body(full(""))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 404);
    drop(sender);
    gw.shutdown().await;
    // The server closed the idle connection: the client sees EOF.
    let mut parts = conn.await.unwrap().unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, parts.io.inner_mut().read_to_end(&mut rest))
        .await
        .expect("closed by the server")
        .unwrap();
    assert_eq!(n, 0);
}
