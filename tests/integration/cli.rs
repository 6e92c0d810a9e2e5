//! The `pollmux` binary: check / print-default-config / version, exit codes, and SIGTERM.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_pollmux");

fn pollmux(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("POLLMUX_CONFIG")
        .output()
        .expect("run pollmux")
}

#[test]
fn check_warns_when_max_connections_exceeds_the_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pollmux.toml");
    // Far above any descriptor limit of this machine (whose hard limit is in the millions at
    // most): valid, served cut to the limit, and said so.
    let config = TestConfig::new()
        .limits("max_connections = 4000000000")
        .toml();
    std::fs::write(&file, config).unwrap();
    let check = pollmux(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("warning: limits.max_connections = 4000000000 is more than"),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&check.stdout), "configuration OK\n");
}

#[test]
fn print_default_config_passes_check() {
    let printed = pollmux(&["print-default-config"]);
    assert!(printed.status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &printed.stdout).unwrap();
    let check = pollmux(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&check.stdout), "configuration OK\n");
}

#[test]
fn check_reports_every_error_with_line_numbers_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[listeners.public]\naddress = \"127.0.0.1:99999\"\n\n[routes.r]\npath = \"/r\"\nkind = \"nope\"\ncolour = 5\n",
    )
    .unwrap();
    let check = pollmux(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(78));
    let err = String::from_utf8_lossy(&check.stderr);
    // One pass: the unknown key does not hide the unknown kind beside it.
    assert!(err.contains("3 configuration errors"), "{err}");
    assert!(
        err.contains("listeners.public.address (line 2, column 11)"),
        "{err}"
    );
    assert!(
        err.contains("routes.r.kind (line 6, column 8): unknown kind \"nope\""),
        "{err}"
    );
    assert!(
        err.contains("routes.r.colour (line 7, column 1): unknown field `colour`"),
        "{err}"
    );

    let run = pollmux(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(78));

    let syntax = dir.path().join("syntax.toml");
    std::fs::write(&syntax, "[admin\naddress = 1\n").unwrap();
    let check = pollmux(&["check", "--config", syntax.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&check.stderr).contains("line 1, column"));
}

/// The synopsis is `pollmux [run] [--config FILE]`: `run` may be left out.
#[test]
fn config_without_run_is_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[listeners.public]\naddress = \"nowhere\"\n").unwrap();
    let file = file.to_str().unwrap();
    for args in [
        &["--config", file][..],
        &["-c", file],
        &["run", "--config", file],
    ] {
        let out = pollmux(args);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("listeners.public.address"), "{args:?}: {err}");
    }
    // A run option and another command together are a usage error, not a silent choice.
    let out = pollmux(&["--config", file, "check", "--config", file]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Global flags still go anywhere, before a subcommand too.
    let out = pollmux(&["--log-format", "json", "check", "--config", file]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let out = pollmux(&["--log-level", "debug", "--config", file]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
}

#[test]
fn check_refuses_credentials_with_a_wildcard_origin() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cors.toml");
    std::fs::write(
        &file,
        "[listeners.public]\naddress = \"127.0.0.1:0\"\n[routes.news]\npath = \"/news/{c}\"\n\
         kind = \"poll\"\nsource.type = \"publish\"\nauth = \"public\"\n\
         cors = { origins = [\"*\"], credentials = true }\n",
    )
    .unwrap();
    let check = pollmux(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(78));
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(
        err.contains("routes.news.cors.credentials (line 8"),
        "{err}"
    );
}

#[test]
fn version_is_printed() {
    let out = pollmux(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("pollmux {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_asks_the_admin_listener() {
    let gw = Gateway::start(&TestConfig::with_listener("p", "").toml()).await;
    let admin = gw.admin.to_string();
    let out = tokio::task::spawn_blocking(move || pollmux(&["health", "--address", &admin]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // An unspecified address is asked on loopback.
    let any = format!("0.0.0.0:{}", gw.admin.port());
    let out = tokio::task::spawn_blocking(move || pollmux(&["health", "--address", &any]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Nothing listening: unhealthy.
    let closed = closed_port().await.to_string();
    let out = tokio::task::spawn_blocking(move || pollmux(&["health", "--address", &closed]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));
}

#[tokio::test]
async fn sighup_reloads_and_an_invalid_file_keeps_the_running_config() {
    let child = Child::start(&TestConfig::new().toml()).await;
    assert_eq!(get(child.public, "/news/a?timeout=0").await.status(), 404);
    let failures = |admin: SocketAddr| async move {
        let text = body_string(get(admin, "/metrics").await).await;
        metric_value(&text, "pollmux_config_reloads_total{result=\"failure\"}")
    };
    std::fs::write(&child.file, "[listeners.public]\naddress = 7\n").unwrap();
    child.signal("-HUP");
    eventually("the refused reload to be counted", || async {
        failures(child.admin).await == 1.0
    })
    .await;
    assert_eq!(readyz_status(child.admin).await, 200, "still serving");
    let news =
        "path = \"/news/{topic}\"\nkind = \"poll\"\nsource.type = \"publish\"\nauth = \"public\"";
    std::fs::write(&child.file, TestConfig::new().route("news", news).toml()).unwrap();
    child.signal("-HUP");
    eventually("the added route to serve", || async {
        get(child.public, "/news/a?timeout=0").await.status() == 200
    })
    .await;
}

/// An upstream that reports each request's arrival and answers when released.
async fn gated_upstream() -> (Upstream, mpsc::Receiver<()>, watch::Sender<bool>) {
    let (arrived_tx, arrived) = mpsc::channel(8);
    let (release, release_rx) = watch::channel(false);
    let upstream = Upstream::start(move |_req| {
        let arrived_tx = arrived_tx.clone();
        let mut release_rx = release_rx.clone();
        async move {
            let _ = arrived_tx.send(()).await;
            let _ = release_rx.wait_for(|r| *r).await;
            text_response(200, "finished after SIGTERM")
        }
    })
    .await;
    (upstream, arrived, release)
}

/// A proxy route to the upstream `api`.
const API: &str = r#"
path = "/api/{*rest}"
kind = "proxy"
upstream = "api"
"#;

fn child_config(upstream: &Upstream, shutdown_timeout: &str) -> String {
    TestConfig::new()
        .shutdown(&format!(
            "drain_window = \"100ms\"\ntimeout = \"{shutdown_timeout}\""
        ))
        .upstream("api", &upstream.url())
        .route("api", API)
        .toml()
}

async fn readyz_status(admin: SocketAddr) -> u16 {
    get(admin, "/readyz").await.status().as_u16()
}

/// A running pollmux with one proxied request held at the upstream, after a SIGTERM that it
/// has acknowledged (`/readyz` says draining).
async fn draining_with_a_request_in_flight(
    shutdown_timeout: &str,
) -> (
    Child,
    tokio::task::JoinHandle<http::Response<hyper::body::Incoming>>,
    watch::Sender<bool>,
    Upstream,
) {
    let (upstream, mut arrived, release) = gated_upstream().await;
    let child = Child::start(&child_config(&upstream, shutdown_timeout)).await;
    assert_eq!(readyz_status(child.admin).await, 200);
    let public = child.public;
    let in_flight = tokio::spawn(async move { get(public, "/api/slow").await });
    tokio::time::timeout(WAIT, arrived.recv())
        .await
        .expect("request reaches the upstream");
    child.signal("-TERM");
    eventually("/readyz to report draining", || async {
        readyz_status(child.admin).await == 503
    })
    .await;
    (child, in_flight, release, upstream)
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let (mut child, in_flight, release, _upstream) = draining_with_a_request_in_flight("15s").await;
    let public = child.public;
    eventually("the public listener to stop accepting", || async {
        tokio::net::TcpStream::connect(public).await.is_err()
    })
    .await;

    release.send(true).unwrap();
    let resp = in_flight.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body_string(resp).await, "finished after SIGTERM");
    assert_eq!(child.exit_code().await, Some(0));
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let (mut child, _in_flight, _release, _upstream) =
        draining_with_a_request_in_flight("60s").await;
    child.signal("-INT");
    // Well before the 60 s shutdown timeout: the second signal does not wait for the drain.
    assert_eq!(child.exit_code().await, Some(1));
}

/// The load tool's smoke run (docs/BENCHMARKS.md): a few hundred connections over the real
/// binary, every scenario, and nothing lost, duplicated or reordered.
#[tokio::test]
async fn load_tool_smoke_run_loses_nothing() {
    let bench = r#"
path = "/bench/{topic}"
kind = "poll"
source.type = "publish"
auth = "public"
hold = "30s"
max_hold = "30s"
"#;
    let child = Child::start(&TestConfig::new().route("bench", bench).toml()).await;
    let pid = child.child.id().expect("running").to_string();
    let sub = format!("http://{}/bench/{{topic}}", child.public);
    let publish = format!("http://{}/publish/bench/{{topic}}", child.admin);
    let held = format!("http://{}/metrics", child.admin);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pollmux-load"))
            .args([
                "run", "--target", "pollmux", "--pid", &pid, "--scale", "0.02",
            ])
            .args([
                "--burst-messages",
                "5",
                "--sustained-secs",
                "2",
                "--sustained-rate",
                "50",
            ])
            .args([
                "--sub-url",
                &sub,
                "--pub-url",
                &publish,
                "--held-url",
                &held,
            ])
            .args(["--held-prefix", r#"pollmux_polls_active{route="bench"}"#])
            .output(),
    )
    .await
    .expect("the smoke run ends by itself")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(results.len(), 4, "{stdout}");
    for r in &results {
        assert_eq!(r["lost"], 0, "{r}");
        assert!(r["opened"].as_u64().unwrap() > 0, "{r}");
        for key in ["duplicated", "out_of_order", "error_answers"] {
            if let Some(v) = r.get(key) {
                assert_eq!(v, 0, "{key} in {r}");
            }
        }
        if let Some(received) = r["received"].as_u64()
            && r["scenario"].as_str().unwrap().starts_with("fanout")
        {
            assert_eq!(received, r["opened"].as_u64().unwrap(), "{r}");
        }
    }
}

/// A `pollmux` child writing its default text log to a pipe, as under systemd or a container
/// runtime, for tests that read that log line by line.
struct TextLog {
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl TextLog {
    async fn start(config: &str, extra_args: &[&str]) -> TextLog {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pollmux.toml");
        std::fs::write(&file, config).unwrap();
        let mut child = tokio::process::Command::new(BIN)
            .args(["--config", file.to_str().unwrap()])
            .args(extra_args)
            .env_remove("RUST_LOG")
            .env_remove("POLLMUX_LOG_FORMAT")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        TextLog {
            lines,
            _child: child,
            _dir: dir,
        }
    }

    async fn next_line(&mut self) -> String {
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("pollmux logs in time")
            .unwrap()
            .expect("pollmux is running")
    }
}

/// The public listener's address, when `line` is the text log's line saying it listens.
fn public_listening(line: &str) -> Option<SocketAddr> {
    if !(line.contains("listening") && line.contains("listener=public")) {
        return None;
    }
    let addr = line.split("address=").nth(1)?.split(' ').next()?;
    Some(addr.parse().expect("a socket address"))
}

/// Logs written to a pipe carry no colour codes, and a failing source names its route and
/// topic, not only its upstream.
#[tokio::test]
async fn logs_to_a_pipe_are_plain_and_name_the_route_and_topic() {
    let upstream = Upstream::start(|_req| async { text_response(500, "down") }).await;
    let feed = r#"
path = "/feed/{id}"
kind = "poll"
auth = "public"
source = { type = "upstream-sse", upstream = "api", path = "/events/{id}" }
"#;
    let config = TestConfig::new()
        .upstream("api", &upstream.url())
        .route("feed", feed)
        .toml();
    let mut log = TextLog::start(&config, &[]).await;
    let mut public = None;
    let mut seen = Vec::new();
    let failure = loop {
        let line = log.next_line().await;
        assert!(!line.contains('\x1b'), "colour codes in {line:?}");
        if let Some(addr) = public_listening(&line) {
            public = Some(addr);
            // Opening the topic starts its source, which the upstream refuses.
            tokio::spawn(async move { get(addr, "/feed/42?timeout=1").await });
        }
        if line.contains("upstream refused the source's request") {
            break line;
        }
        seen.push(line);
    };
    assert!(public.is_some(), "{seen:?}");
    assert!(failure.contains("route=feed"), "{failure}");
    assert!(failure.contains("topic=42"), "{failure}");
    assert!(failure.contains("upstream=api"), "{failure}");
}

/// At debug, what a request logs carries its connection's span (peer, listener, protocol) and
/// its own (route), and the connection's end says who closed it.
#[tokio::test]
async fn debug_logs_carry_connection_and_request_spans() {
    let closed = closed_port().await;
    let config = TestConfig::new()
        .upstream("api", &format!("http://{closed}"))
        .route("api", API)
        .toml();
    let mut log = TextLog::start(&config, &["--log-level", "pollmux=debug"]).await;
    let (mut failed, mut closed_line) = (None, None);
    while failed.is_none() || closed_line.is_none() {
        let line = log.next_line().await;
        if let Some(addr) = public_listening(&line) {
            // One request on a connection of its own, which then closes.
            tokio::spawn(async move { get(addr, "/api/x").await });
        }
        if line.contains("proxy request failed") {
            failed = Some(line);
        } else if line.contains("connection closed") {
            closed_line = Some(line);
        }
    }
    let failed = failed.unwrap();
    for part in [
        "conn{",
        "peer=127.0.0.1:",
        "listener=public",
        "protocol=http1",
        "request{route=api",
    ] {
        assert!(failed.contains(part), "{part} missing in {failed}");
    }
    assert!(closed_line.unwrap().contains("conn{"));
}
