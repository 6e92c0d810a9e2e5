//! File-descriptor exhaustion: the real binary with a descriptor limit of its own far below
//! `max_connections`. pollmux serves no more public connections than the limit allows after
//! its reserve, so the admin listener still answers (health checks, metrics, the publishes
//! that wake held polls); and where even the reserve runs out, the accept loop counts the
//! failed accepts (EMFILE), keeps running and the polls it holds, and accepts again once
//! descriptors are free.
#![cfg(unix)]

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_pollmux");

/// The child's descriptor limit, soft and hard: pollmux raises its soft limit to the hard one at
/// start, so both are lowered. About 20 are in use before the first client (stdio, the log pipe,
/// two runtimes' epoll and wakers, the listeners), which leaves room for the held polls.
const FD_LIMIT: u64 = 64;
/// Polls held before the flood, on connections pollmux has accepted.
const HELD: usize = 16;
/// Connections opened on top: more than the descriptors left.
const FLOOD: usize = 80;

/// A poll route whose polls are held 30 s.
fn config_route() -> String {
    r#"
path = "/held/{topic}"
kind = "poll"
source.type = "publish"
auth = "public"
hold = "30s"
max_hold = "30s"
"#
    .to_owned()
}

fn config() -> String {
    let held = config_route();
    TestConfig::new()
        // Far above the descriptor limit (cut to half of it).
        .limits("max_connections = 1000")
        .route("held", &held)
        .toml()
}

/// A `pollmux run` child under the descriptor limit, its addresses read from its JSON log, and
/// every later log event forwarded.
struct Child {
    child: tokio::process::Child,
    public: SocketAddr,
    admin: SocketAddr,
    log: mpsc::UnboundedReceiver<serde_json::Value>,
    _dir: tempfile::TempDir,
}

impl Child {
    /// Starts `config` with a descriptor limit of `fd_limit`, soft and hard.
    async fn start(config: &str, fd_limit: u64) -> Child {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pollmux.toml");
        std::fs::write(&file, config).unwrap();
        let mut command = tokio::process::Command::new(BIN);
        command
            .args([
                "run",
                "--config",
                file.to_str().unwrap(),
                "--log-format",
                "json",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and the
        // closure allocates nothing.
        unsafe {
            command
                .pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, fd_limit, fd_limit));
        }
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (public, admin) = read_listening(&mut lines).await;
        // Keep draining the log (so the child never blocks on a full pipe), passing events on.
        let (tx, log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str(&line) {
                    let _ = tx.send(event);
                }
            }
        });
        Child {
            child,
            public,
            admin,
            log,
            _dir: dir,
        }
    }

    fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("child status");
        assert!(status.is_none(), "pollmux exited: {status:?}");
    }

    /// Waits for a log event whose fields satisfy `pred`; fails after [`WAIT`].
    async fn logged(&mut self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(event) = self.log.recv().await {
                if pred(&event["fields"]) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "pollmux did not log {what}");
    }
}

/// How many completed connections wait in the accept queue of the listener on `addr`
/// (127.0.0.1): the `rx_queue` of its LISTEN row in /proc/net/tcp.
fn accept_queue(addr: SocketAddr) -> u64 {
    let local = format!("0100007F:{:04X}", addr.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .find_map(|row| {
            let f: Vec<&str> = row.split_whitespace().collect();
            let queues = (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(4))??;
            u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
        })
        .expect("the listener's row")
}

async fn metrics(admin: SocketAddr) -> String {
    let resp = get(admin, "/metrics").await;
    assert_eq!(resp.status(), 200);
    body_string(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_survives_descriptor_exhaustion_and_resumes() {
    let mut child = Child::start(&config(), FD_LIMIT).await;
    let (public, admin) = (child.public, child.admin);
    let text = metrics(admin).await;
    assert_eq!(
        metric_value(&text, "process_max_fds"),
        FD_LIMIT as f64,
        "the child runs under the lowered limit"
    );

    // Polls held on accepted connections: answered only by the publish below (30 s hold).
    let held: Vec<_> = (0..HELD)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = Conn::open(public).await;
                conn.get_json("/held/news?timeout=30").await
            })
        })
        .collect();
    eventually("every poll to be held", || async move {
        metric_value(
            &metrics(admin).await,
            r#"pollmux_polls_active{route="held"}"#,
        ) == HELD as f64
    })
    .await;

    // The flood: connections that send nothing. The kernel completes every handshake (the
    // listen backlog is 1024); pollmux serves half its limit (32) and keeps up to 64 more
    // waiting for the request it would answer 503 (for the header read timeout), more than
    // the descriptors left: it accepts until it has none.
    let flood: Vec<TcpStream> = {
        let mut flood = Vec::with_capacity(FLOOD);
        for _ in 0..FLOOD {
            flood.push(TcpStream::connect(public).await.expect("connect"));
        }
        flood
    };
    child
        .logged("an EMFILE accept failure on the public listener", |f| {
            f["listener"] == "public"
                && f["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("accept failed"))
                && f["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("os error 24"))
        })
        .await;
    child.assert_running();
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "a held poll ended during the exhaustion"
    );

    // Free the descriptors: the flood's accepted connections close, and the ones still in the
    // backlog are accepted, read to their end and closed. The admin listener answers again.
    drop(flood);
    eventually("the flood's connections to be closed", || async move {
        // Read first: a connection accepted after this is counted open by the scrape below.
        let queued = accept_queue(public);
        let text = metrics(admin).await;
        queued == 0
            && metric_value(
                &text,
                r#"pollmux_connections_open{listener="public",protocol="http1"}"#,
            ) == HELD as f64
            && metric_value(&text, r#"pollmux_polls_active{route="held"}"#) == HELD as f64
    })
    .await;
    let text = metrics(admin).await;
    assert!(
        metric_value(&text, r#"pollmux_accept_errors_total{listener="public"}"#) > 0.0,
        "accept errors counted"
    );
    child.assert_running();

    // The polls held through the exhaustion get the next message.
    let (status, _) = publish(admin, "held/news", "text/plain", "after the flood").await;
    assert_eq!(status, 202);
    for h in held {
        let (status, _, body) = tokio::time::timeout(WAIT, h)
            .await
            .expect("held poll answered")
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["messages"][0]["data"], "after the flood", "{body}");
    }
    // Their clients are gone: the descriptors are free for as many new ones.
    eventually("the held polls' connections to be closed", || async move {
        let text = metrics(admin).await;
        metric_value(
            &text,
            r#"pollmux_connections_open{listener="public",protocol="http1"}"#,
        ) == 0.0
    })
    .await;

    // Accepting has resumed: new connections are served.
    let fresh: Vec<_> = (0..HELD)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = Conn::open(public).await;
                conn.get_json("/held/news?cursor=earliest&timeout=0").await
            })
        })
        .collect();
    for f in fresh {
        let (status, _, body) = f.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["messages"][0]["data"], "after the flood", "{body}");
    }
    child.assert_running();
}

/// A descriptor limit where the reserve is half of it: 300 public connections.
const SMALL_FD_LIMIT: u64 = 600;
/// Clients that each hold a poll: more than the whole limit.
const CROWD: usize = 700;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_when_clients_take_every_public_descriptor() {
    let config = TestConfig::new()
        .limits("max_connections = 10000")
        .route("held", &config_route())
        .toml();
    let mut child = Child::start(&config, SMALL_FD_LIMIT).await;
    let (public, admin) = (child.public, child.admin);
    child
        .logged("the max_connections warning", |f| {
            f["message"].as_str().is_some_and(|m| {
                m.contains("limits.max_connections = 10000") && m.contains("at most 300")
            })
        })
        .await;
    // A poll to wake at the end, then the crowd: every connection sends a held poll.
    let held = tokio::spawn(async move {
        let mut conn = Conn::open(public).await;
        conn.get_json("/held/news?timeout=30").await
    });
    let mut crowd = Vec::with_capacity(CROWD);
    for _ in 0..CROWD {
        let mut s = TcpStream::connect(public).await.expect("connect");
        s.write_all(b"GET /held/news?timeout=30 HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .expect("write");
        crowd.push(s);
    }
    // pollmux serves what the limit allows; the admin listener keeps its descriptors.
    eventually(
        "the public connections to reach the cut limit",
        || async move {
            let text = metrics(admin).await;
            metric_value(&text, r#"pollmux_polls_active{route="held"}"#) == 300.0
                && metric_value(
                    &text,
                    r#"pollmux_connections_rejected_total{listener="public"}"#,
                ) > 0.0
        },
    )
    .await;
    assert_eq!(get(admin, "/healthz").await.status(), 200);
    let (status, _) = publish(admin, "held/news", "text/plain", "woken").await;
    assert_eq!(status, 202);
    let (status, _, body) = tokio::time::timeout(WAIT, held)
        .await
        .expect("held poll answered")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["data"], "woken", "{body}");
    child.assert_running();
    drop(crowd);
}
