//! The Redis harness of the cluster tests: real redis-server (and redis-sentinel) processes
//! that the tests start themselves, on a unix socket in a temporary directory (or on a
//! loopback port where Sentinel needs one), without persistence unless the test is about it;
//! and the helpers the tests of several pollmux nodes share.
//!
//! Without `redis-server` on the PATH these tests are skipped, unless `POLLMUX_REQUIRE_REDIS`
//! is set (CI sets it), when a missing server is a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use http::Request;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::common::*;

/// A master waits 5 s by default for more replicas before it starts a sync.
pub const REPLICATE_AT_ONCE: [&str; 2] = ["--repl-diskless-sync-delay", "0"];

/// A redis-server of the test's own.
pub struct Redis {
    child: Child,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// The loopback TCP port it also listens on (0: none).
    port: u16,
}

impl Redis {
    /// A server without persistence; `None` when redis-server is not installed and the run
    /// does not require it.
    pub async fn start() -> Option<Redis> {
        Redis::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    pub async fn start_with(args: &[&str]) -> Option<Redis> {
        Redis::start_on(0, args).await
    }

    /// A server without persistence that also listens on 127.0.0.1:`port` (for Sentinel,
    /// which names servers by address), and starts a replica's sync at once.
    pub async fn start_on_port(port: u16, args: &[&str]) -> Option<Redis> {
        let mut all = vec!["--save", "", "--appendonly", "no"];
        all.extend_from_slice(&REPLICATE_AT_ONCE);
        all.extend_from_slice(args);
        Redis::start_on(port, &all).await
    }

    async fn start_on(port: u16, args: &[&str]) -> Option<Redis> {
        if !installed("redis-server") {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let child = spawn(dir.path(), port, &args);
        let redis = Redis {
            child,
            dir,
            args,
            port,
        };
        redis.wait_ready().await;
        Some(redis)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    async fn wait_ready(&self) {
        let url = self.url();
        eventually("redis-server answers", || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
    }

    /// Kills the server and starts it again on the same socket and directory (with its
    /// persistence files, if it writes any).
    pub async fn restart(&mut self) {
        self.restart_with(&[]).await;
    }

    /// [`Redis::restart`] with `extra` arguments after the ones it was started with.
    pub async fn restart_with(&mut self, extra: &[&str]) {
        self.kill().await;
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        self.child = spawn(self.dir.path(), self.port, &args);
        self.wait_ready().await;
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill redis-server");
    }

    /// SIGSTOP / SIGCONT: the server keeps its connections open and answers nothing.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.id().expect("running").to_string();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub async fn command(&self, args: &[&str]) -> redis::Value {
        self.try_command(args).await.unwrap()
    }

    /// A command that may meet a server closing its clients (a demotion does): its result.
    pub async fn try_command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        command_at(&self.url(), args).await
    }

    /// A command whose answer is text (a bulk or simple string; nil: "").
    pub async fn text(&self, args: &[&str]) -> String {
        match self.command(args).await {
            redis::Value::BulkString(b) => String::from_utf8(b).expect("utf-8"),
            redis::Value::SimpleString(s) => s,
            redis::Value::VerbatimString { text, .. } => text,
            redis::Value::Nil => String::new(),
            other => panic!("{args:?} answered {other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Never leave a stopped server behind.
        let _ = self.child.start_kill();
    }
}

/// Whether `program` is on the PATH; when it is not, a failure if the run requires Redis, else
/// a skip (false).
pub fn installed(program: &str) -> bool {
    if which(program).is_some() {
        return true;
    }
    assert!(
        std::env::var_os("POLLMUX_REQUIRE_REDIS").is_none(),
        "POLLMUX_REQUIRE_REDIS is set but {program} is not installed"
    );
    eprintln!("{program} is not installed: cluster test skipped");
    false
}

fn spawn(dir: &Path, port: u16, args: &[String]) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.arg("--port").arg(port.to_string());
    if port != 0 {
        cmd.arg("--bind").arg("127.0.0.1");
    }
    cmd.arg("--unixsocket")
        .arg(dir.join("redis.sock"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts")
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// A node of the cluster on `redis`: a publish route `feed` with topics `/feed/{id}`.
pub fn node_config(redis: &Redis, node: &str, extra_route: &str) -> String {
    node_config_at(&format!("url = \"{}\"", redis.url()), node, extra_route)
}

/// [`node_config`] with `redis_keys` as the keys of `[cluster.redis]`.
pub fn node_config_at(redis_keys: &str, node: &str, extra_route: &str) -> String {
    TestConfig::new()
        .cluster(&format!(
            "backplane = \"redis\"\nnode_id = \"{node}\"\nbackplane_grace = \"2s\"\n\
             [cluster.redis]\n{redis_keys}"
        ))
        .route(
            "feed",
            &format!(
                "path = \"/feed/{{id}}\"\nkind = \"poll\"\nsource.type = \"publish\"\n\
                 auth = \"public\"\nhold = \"10s\"\nmax_hold = \"30s\"\n{extra_route}"
            ),
        )
        .toml()
}

pub async fn nodes(redis: &Redis, n: usize, extra_route: &str) -> Vec<Gateway> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(Gateway::start(&node_config(redis, &format!("n{i}"), extra_route)).await);
    }
    out
}

/// Publishes `body` (with `Message-Id: id` when given); the status and the JSON answer.
pub async fn publish_id(
    admin: std::net::SocketAddr,
    topic: &str,
    body: &str,
    id: Option<&str>,
) -> (u16, Value) {
    let mut req = Request::post(format!("/publish/feed/{topic}"))
        .header("host", "admin")
        .header("content-type", "text/plain");
    if let Some(id) = id {
        req = req.header("message-id", id);
    }
    let resp = send(admin, req.body(full(body.to_owned())).unwrap()).await;
    let status = resp.status().as_u16();
    (status, body_json(resp).await)
}

pub async fn poll(gw: &Gateway, path: &str) -> (u16, Value) {
    let resp = get(gw.addr(), path).await;
    let status = resp.status().as_u16();
    (status, body_json(resp).await)
}

pub fn data(batch: &Value) -> Vec<String> {
    batch["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["data"].as_str().expect("text data").to_owned())
        .collect()
}

/// The cursor of `topic`'s current head, as a node hands it out (a poll that need not wait).
pub async fn head_cursor(gw: &Gateway, topic: &str) -> String {
    let (status, body) = poll(gw, &format!("/feed/{topic}?cursor=latest&timeout=0")).await;
    assert_eq!(status, 200, "{body}");
    body["cursor"].as_str().unwrap().to_owned()
}

/// Loopback ports that were free a moment ago: bound together (so they differ), then released
/// for the servers to bind. Sentinel names servers by TCP address, so a unix socket will not
/// do; another process could take a port in between (a tiny race), and the server that
/// wanted it then fails to start, failing its test visibly rather than passing.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// A redis-sentinel of the test's own on 127.0.0.1:`port`, monitoring one master, quick to
/// declare it down (1 s) and to fail over.
pub struct Sentinel {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Sentinel {
    /// `None` when redis-sentinel is not installed and the run does not require it.
    pub async fn start(port: u16, master: &str, master_port: u16) -> Option<Sentinel> {
        if !installed("redis-sentinel") {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        // Sentinel rewrites its configuration file: it must be its own, and writable.
        let conf = dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor {master} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {master} 1000\n\
             sentinel failover-timeout {master} 2000\n",
            dir.path().display()
        );
        std::fs::write(&conf, text).expect("sentinel.conf");
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-sentinel starts");
        let sentinel = Sentinel {
            child,
            _dir: dir,
            port,
        };
        let url = sentinel.url();
        eventually("redis-sentinel answers", || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
        Some(sentinel)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `host:port`, as `[cluster.redis] sentinel.addrs` takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A command's answer, or the error Sentinel gave.
    pub async fn try_command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        command_at(&self.url(), args).await
    }

    /// The port of the master Sentinel names.
    pub async fn master_port(&self, master: &str) -> Option<u16> {
        let reply = self
            .try_command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", master])
            .await
            .ok()?;
        let redis::Value::Array(parts) = reply else {
            return None;
        };
        match parts.get(1)? {
            redis::Value::BulkString(p) => std::str::from_utf8(p).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// What Sentinel knows of `master`'s replicas, field by field.
    pub async fn replicas(&self, master: &str) -> Vec<std::collections::HashMap<String, String>> {
        let Ok(redis::Value::Array(replicas)) =
            self.try_command(&["SENTINEL", "REPLICAS", master]).await
        else {
            return Vec::new();
        };
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            other => format!("{other:?}"),
        };
        replicas
            .iter()
            .filter_map(|r| match r {
                redis::Value::Array(flat) => Some(
                    flat.chunks_exact(2)
                        .map(|kv| (text(&kv[0]), text(&kv[1])))
                        .collect(),
                ),
                redis::Value::Map(kv) => Some(kv.iter().map(|(k, v)| (text(k), text(v))).collect()),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// One command on a fresh connection to the server at `url`: its answer, or the error.
async fn command_at(url: &str, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}
