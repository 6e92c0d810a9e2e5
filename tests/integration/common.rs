//! Shared test fixtures: a real gateway on 127.0.0.1:0, in-process fake upstreams, an HTTP
//! client over real sockets, and metric scraping.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use pollmux::config::Config;
use pollmux::upstream::Body;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound on any wait in these tests: a failure, never a pacing device.
pub const WAIT: Duration = Duration::from_secs(30);

/// A gateway serving a config on loopback ports chosen by the kernel.
pub struct Gateway {
    pub addrs: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

impl Gateway {
    /// Starts pollmux with `toml`; every listener and the admin must use port 0.
    pub async fn start(toml: &str) -> Gateway {
        Gateway::start_in(toml, std::path::Path::new(".")).await
    }

    pub async fn start_in(toml: &str, dir: &std::path::Path) -> Gateway {
        let config = Config::from_toml(toml, dir).unwrap_or_else(|e| panic!("{e}"));
        Gateway::serve(pollmux::Server::bind(config).await.expect("bind"))
    }

    /// Starts pollmux with the configuration file `path`, which reloads re-read.
    pub async fn start_file(path: &std::path::Path) -> Gateway {
        let config = Config::from_file(path).unwrap_or_else(|e| panic!("{e}"));
        let server = pollmux::Server::bind(config).await.expect("bind");
        Gateway::serve(server.config_path(Some(path.to_owned())))
    }

    fn serve(server: pollmux::Server) -> Gateway {
        let addrs = server.listener_addrs();
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.serve(async {
            let _ = rx.await;
        }));
        Gateway {
            addrs,
            admin,
            shutdown: Some(tx),
            task,
        }
    }

    /// The first public listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    pub fn addr_of(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .expect("listener")
            .1
    }

    /// Starts the drain; returns once serve() has returned.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("drain ends")
            .expect("serve task");
    }

    /// The value of one metric series (exact name with labels); absent is a failure, so that
    /// a misspelt series cannot pass for zero.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        metric_value(&text, series)
    }

    pub async fn metrics_text(&self) -> String {
        let resp = get(self.admin, "/metrics").await;
        assert_eq!(resp.status(), 200);
        body_string(resp).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of one series (exact name with labels) in a `/metrics` text; panics when the
/// series is absent, so that a misspelt series cannot pass for zero.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("metric value"))
        .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"))
}

/// The TOML of a test gateway, section by section: one `public` listener and the admin listener
/// on `127.0.0.1:0` (so [`Gateway::start`] and child processes can bind them), then whatever the
/// test adds. Each method takes the keys of its section as TOML lines, written as given;
/// sections are written in a fixed order (listeners, admin, limits, shutdown, cluster,
/// upstreams, routes), listeners, upstreams and routes in the order they were added, and a section with no
/// keys is left out.
#[derive(Default)]
pub struct TestConfig {
    listeners: String,
    admin: String,
    limits: String,
    shutdown: String,
    cluster: String,
    upstreams: String,
    routes: String,
}

impl TestConfig {
    /// The `public` listener and the admin listener, nothing else.
    pub fn new() -> TestConfig {
        TestConfig::with_listener("public", "")
    }

    /// Listener `name` (with `keys` besides its address) instead of `public`.
    pub fn with_listener(name: &str, keys: &str) -> TestConfig {
        TestConfig::default().listener(name, keys)
    }

    /// One more listener, `name`, on `127.0.0.1:0`, with `keys` besides its address.
    pub fn listener(mut self, name: &str, keys: &str) -> TestConfig {
        self.listeners += &format!("[listeners.{name}]\naddress = \"127.0.0.1:0\"\n");
        push_lines(&mut self.listeners, keys);
        self
    }

    /// Keys of `[admin]` besides its address (each call adds to the keys given before, as do
    /// `limits` and `shutdown`).
    pub fn admin(mut self, keys: &str) -> TestConfig {
        push_lines(&mut self.admin, keys);
        self
    }

    /// Keys of `[limits]`.
    pub fn limits(mut self, keys: &str) -> TestConfig {
        push_lines(&mut self.limits, keys);
        self
    }

    /// Keys of `[shutdown]`.
    pub fn shutdown(mut self, keys: &str) -> TestConfig {
        push_lines(&mut self.shutdown, keys);
        self
    }

    /// Keys of `[cluster]` (its tables, such as `[cluster.redis]`, after them).
    pub fn cluster(mut self, keys: &str) -> TestConfig {
        push_lines(&mut self.cluster, keys);
        self
    }

    /// `[upstreams.NAME]` with its `url` and nothing else.
    pub fn upstream(self, name: &str, url: &str) -> TestConfig {
        self.upstream_with(name, url, "")
    }

    /// `[upstreams.NAME]` with its `url` and `keys`.
    pub fn upstream_with(mut self, name: &str, url: &str, keys: &str) -> TestConfig {
        self.upstreams += &format!("[upstreams.{name}]\nurl = \"{url}\"\n");
        push_lines(&mut self.upstreams, keys);
        self
    }

    /// `[routes.NAME]` with `keys`.
    pub fn route(mut self, name: &str, keys: &str) -> TestConfig {
        self.routes += &format!("[routes.{name}]\n");
        push_lines(&mut self.routes, keys);
        self
    }

    /// The configuration file's text.
    pub fn toml(&self) -> String {
        let mut out = self.listeners.clone();
        out += "[admin]\naddress = \"127.0.0.1:0\"\n";
        out += &self.admin;
        for (header, keys) in [
            ("[limits]\n", &self.limits),
            ("[shutdown]\n", &self.shutdown),
            ("[cluster]\n", &self.cluster),
        ] {
            if !keys.is_empty() {
                out += header;
                out += keys;
            }
        }
        out += &self.upstreams;
        out += &self.routes;
        out
    }
}

/// Appends `keys` (TOML lines) to a section.
fn push_lines(section: &mut String, keys: &str) {
    let keys = keys.trim();
    if !keys.is_empty() {
        section.push_str(keys);
        section.push('\n');
    }
}

/// A fake upstream: an in-process HTTP/1 server on 127.0.0.1:0 answering with `handler`.
pub struct Upstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address on which nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn text_response(status: u16, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(full(body.to_owned()))
        .unwrap()
}

/// Sends one request on a fresh HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<Body>) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("response in time")
        .expect("response")
}

pub async fn get(addr: SocketAddr, path: &str) -> Response<Incoming> {
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(full(""))
        .unwrap();
    send(addr, req).await
}

pub async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
}

pub async fn body_string(resp: Response<Incoming>) -> String {
    String::from_utf8(body_bytes(resp).await.to_vec()).expect("utf-8 body")
}

pub async fn body_json(resp: Response<Incoming>) -> serde_json::Value {
    serde_json::from_slice(&body_bytes(resp).await).expect("JSON body")
}

/// Retries `check` until it returns true, for states only observable from outside (a metric, a
/// socket closing); fails after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One keep-alive HTTP/1.1 connection, for clients that poll again and again.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Conn { sender }
    }

    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        self.sender.ready().await.expect("connection usable");
        tokio::time::timeout(WAIT, self.sender.send_request(req))
            .await
            .expect("response in time")
            .expect("response")
    }

    /// GET `path`; the status, headers and JSON body.
    pub async fn get_json(&mut self, path: &str) -> (u16, http::HeaderMap, serde_json::Value) {
        let req = Request::get(path)
            .header("host", "t")
            .body(full(""))
            .unwrap();
        let resp = self.send(req).await;
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, body_json(resp).await)
    }
}

/// Publishes through the admin listener; returns the status and body.
pub async fn publish(
    admin: SocketAddr,
    route_topic: &str,
    content_type: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let req = Request::post(format!("/publish/{route_topic}"))
        .header("host", "admin")
        .header("content-type", content_type)
        .body(full(body.to_owned()))
        .unwrap();
    let resp = send(admin, req).await;
    let status = resp.status().as_u16();
    (status, body_json(resp).await)
}

/// Reads a child pollmux's JSON log (`--log-format json`) until it has logged its listeners;
/// the public and the admin listener's addresses.
pub async fn read_listening<R>(lines: &mut tokio::io::Lines<R>) -> (SocketAddr, SocketAddr)
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    let (mut public, mut admin) = (None, None);
    while public.is_none() || admin.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("pollmux logs its listeners")
            .unwrap()
            .expect("pollmux is running");
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &event["fields"];
        if fields["message"] == "listening" {
            let addr: SocketAddr = fields["address"].as_str().unwrap().parse().unwrap();
            match fields["listener"].as_str().unwrap() {
                "admin" => admin = Some(addr),
                _ => public = Some(addr),
            }
        }
    }
    (public.unwrap(), admin.unwrap())
}

/// Writes raw bytes on a fresh connection; everything the server sent until it closed.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("server answers and closes")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// A running `pollmux run` child with its bound addresses read from its JSON log.
pub struct Child {
    pub child: tokio::process::Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The configuration file it runs with.
    pub file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Child {
    pub async fn start(config: &str) -> Child {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pollmux.toml");
        std::fs::write(&file, config).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pollmux"))
            .args([
                "run",
                "--config",
                file.to_str().unwrap(),
                "--log-format",
                "json",
            ])
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stderr.take().unwrap(),
        ));
        let (public, admin) = read_listening(&mut lines).await;
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Child {
            child,
            public,
            admin,
            file,
            _dir: dir,
        }
    }

    /// Sends the signal `name` (`-HUP`, `-TERM`, `-KILL`, `-STOP`, `-CONT`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn exit_code(&mut self) -> Option<i32> {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("pollmux exits")
            .unwrap()
            .code()
    }
}
