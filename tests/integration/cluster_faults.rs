//! Cluster mode when Redis fails the way networks and failovers make it fail: a connection
//! that stays open but brings nothing back, a promoted replica that never got the last
//! entries, and a Sentinel failover. Real servers (`redis_server.rs`), and between a node and
//! Redis, where a test needs to break what is in between, a small TCP proxy of the test's own
//! on 127.0.0.1:0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::common::*;
use crate::redis_server::*;

/// The node's blocking read waits this long for an announcement, and every command has this
/// deadline (src/backplane/reader.rs, link.rs): a silent connection is found within their sum.
const BLOCK: Duration = Duration::from_secs(5);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a [`Proxy`] forwards to.
#[derive(Debug, Clone)]
enum Backend {
    Unix(PathBuf),
}

/// A TCP proxy on 127.0.0.1:0 in front of a Redis server. It can stop forwarding what the
/// server sends (the sockets stay open: a half-open connection as the client sees it), close
/// every connection, and forward new connections elsewhere.
struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    backend: Mutex<Backend>,
    /// False: bytes from the server are held back (not forwarded, the sockets kept open).
    forwarding: watch::Sender<bool>,
    /// Bumped to close every connection open at that moment.
    severed: watch::Sender<u64>,
}

impl Proxy {
    async fn start(backend: Backend) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            backend: Mutex::new(backend),
            forwarding: watch::Sender::new(true),
            severed: watch::Sender::new(0),
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(relay(client, shared.clone()));
                }
            }
        });
        Proxy { addr, shared, task }
    }

    /// `[cluster.redis]` keys of a node reaching Redis through this proxy.
    fn redis_keys(&self) -> String {
        format!("url = \"redis://{}\"", self.addr)
    }

    /// Stops (false) or resumes (true) forwarding the server's bytes, on every connection.
    fn forward(&self, on: bool) {
        self.shared.forwarding.send_replace(on);
    }

    /// Closes every connection open now.
    fn sever(&self) {
        self.shared.severed.send_modify(|n| *n += 1);
    }

    /// New connections go to `backend`; the open ones are closed.
    fn switch(&self, backend: Backend) {
        *self.shared.backend.lock().unwrap() = backend;
        self.sever();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.sever();
    }
}

/// One client connection: to the server as it is, from the server only while forwarding.
/// Either side ending, or [`Proxy::sever`], closes both.
async fn relay(client: TcpStream, shared: Arc<Shared>) {
    let mut severed = shared.severed.subscribe();
    let backend = shared.backend.lock().unwrap().clone();
    let server = match backend {
        Backend::Unix(path) => match UnixStream::connect(path).await {
            Ok(s) => s,
            Err(_) => return,
        },
    };
    let (mut from_client, to_client) = tokio::io::split(client);
    let (from_server, mut to_server) = tokio::io::split(server);
    let forwarding = shared.forwarding.subscribe();
    tokio::select! {
        _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
        _ = pump(from_server, to_client, forwarding) => {}
        _ = severed.changed() => {}
    }
}

/// Copies while `forwarding`; bytes read after it turned false are held until it is true again.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut forwarding: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if forwarding.wait_for(|on| *on).await.is_err() {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}

fn reconnects(reason: &str) -> String {
    format!("pollmux_backplane_reconnects_total{{reason=\"{reason}\"}}")
}

/// Polls `topic` on `gw` from `cursor` until `n` messages came; they and the cursor after them.
async fn collect(gw: &Gateway, topic: &str, cursor: &str, n: usize) -> (Vec<String>, String) {
    let (mut got, mut at) = (Vec::new(), cursor.to_owned());
    while got.len() < n {
        let (status, body) = poll(gw, &format!("/feed/{topic}?cursor={at}")).await;
        assert_eq!(status, 200, "{body}");
        got.extend(data(&body));
        at = body["cursor"].as_str().unwrap().to_owned();
    }
    (got, at)
}

/// Nothing after `cursor` on `gw` (so nothing came twice).
async fn nothing_after(gw: &Gateway, topic: &str, cursor: &str) {
    let (status, body) = poll(gw, &format!("/feed/{topic}?cursor={cursor}&timeout=0")).await;
    assert_eq!((status, data(&body).len()), (200, 0), "{body}");
}

#[tokio::test]
async fn a_half_open_backplane_is_found_by_its_deadline_and_reconnected() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let proxy = Proxy::start(Backend::Unix(redis.socket())).await;
    // Node a reaches Redis through the proxy; node b directly.
    let a = Gateway::start(&node_config_at(&proxy.redis_keys(), "a", "")).await;
    let b = Gateway::start(&node_config(&redis, "b", "")).await;
    let cursor = head_cursor(&a, "h").await;
    let (status, body) = publish_id(a.admin, "h", "before", None).await;
    assert_eq!(status, 202, "{body}");
    let (got, at) = collect(&a, "h", &cursor, 1).await;
    assert_eq!(got, ["before"]);

    let timeouts = a.metric(&reconnects("timeout")).await;
    proxy.forward(false);
    let stalled = Instant::now();
    eventually("node a finds the silent connection", || async {
        a.metric(&reconnects("timeout")).await > timeouts
    })
    .await;
    let found = stalled.elapsed();
    assert!(
        found < BLOCK + COMMAND_TIMEOUT + Duration::from_secs(2),
        "a read that never answers is given up after its deadline, not {found:?}"
    );
    assert_eq!(a.metric("pollmux_backplane_up").await, 0.0);
    // Meanwhile the log goes on without node a.
    let (status, body) = publish_id(b.admin, "h", "during", Some("h-1")).await;
    assert_eq!(status, 202, "{body}");

    proxy.forward(true);
    let (status, body) = publish_id(a.admin, "h", "after", Some("h-2")).await;
    assert_eq!(status, 202, "{body}");
    for gw in [&a, &b] {
        let (got, end) = collect(gw, "h", &at, 2).await;
        assert_eq!(got, ["during", "after"], "each once, in order");
        nothing_after(gw, "h", &end).await;
    }
    eventually("node a's backplane is up again", || async {
        a.metric("pollmux_backplane_up").await == 1.0
    })
    .await;
}

/// `redis`'s `INFO replication` has `field:value`.
/// Whether `INFO replication` has `field:value`; false while the server cannot answer (it
/// closes its clients' connections when Sentinel reconfigures it).
async fn replication_says(redis: &Redis, field: &str, value: &str) -> bool {
    let info = match redis.try_command(&["INFO", "replication"]).await {
        Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Ok(redis::Value::VerbatimString { text, .. }) => text,
        _ => return false,
    };
    info.lines().any(|l| l.trim() == format!("{field}:{value}"))
}

#[tokio::test]
async fn a_promoted_replica_that_lost_the_tail_expires_the_cursors_past_it() {
    let args = [
        "--save",
        "",
        "--appendonly",
        "no",
        REPLICATE_AT_ONCE[0],
        REPLICATE_AT_ONCE[1],
    ];
    let Some(mut master) = Redis::start_with(&args).await else {
        return;
    };
    let replica = Redis::start().await.expect("installed");
    // The replica follows the master through a proxy of its own: SIGSTOP alone would not lose
    // anything, as what the master sent waits in the stopped replica's socket buffer and is
    // read on SIGCONT; the proxy holds it back, and drops it when the master dies.
    let replication = Proxy::start(Backend::Unix(master.socket())).await;
    let port = replication.addr.port().to_string();
    replica.command(&["REPLICAOF", "127.0.0.1", &port]).await;
    eventually("the replica follows the master", || {
        replication_says(&replica, "master_link_status", "up")
    })
    .await;
    let proxy = Proxy::start(Backend::Unix(master.socket())).await;
    let gw = Gateway::start(&node_config_at(&proxy.redis_keys(), "a", "")).await;
    let start = head_cursor(&gw, "l").await;
    for m in ["1", "2"] {
        let (status, body) = publish_id(gw.admin, "l", m, None).await;
        assert_eq!(status, 202, "{body}");
    }
    let (got, replicated) = collect(&gw, "l", &start, 2).await;
    assert_eq!(got, ["1", "2"]);
    eventually("the replica has both", || async {
        replica.text(&["HGET", "pm:{feed/l}:m", "s"]).await == "2"
    })
    .await;

    // The replica falls behind; clients get three more, each with its cursor.
    replica.pause(true);
    replication.forward(false);
    let mut lost = Vec::new();
    for m in ["3", "4", "5"] {
        let (status, body) = publish_id(gw.admin, "l", m, None).await;
        assert_eq!(status, 202, "{body}");
        lost.push(body["cursor"].as_str().unwrap().to_owned());
    }
    let (got, last) = collect(&gw, "l", &replicated, 3).await;
    assert_eq!(got, ["3", "4", "5"]);
    assert_eq!(last, lost[2], "one cursor from publish and poll");
    // A client waits past them when the master dies.
    let held = {
        let (addr, last) = (gw.addr(), last.clone());
        tokio::spawn(async move {
            let resp = get(addr, &format!("/feed/l?cursor={last}&timeout=5")).await;
            (resp.status().as_u16(), body_json(resp).await)
        })
    };
    eventually("the poll is held", || async {
        gw.metric("pollmux_polls_active{route=\"feed\"}").await == 1.0
    })
    .await;

    master.kill().await;
    replication.sever();
    replica.pause(false);
    replica.command(&["REPLICAOF", "NO", "ONE"]).await;
    assert_eq!(
        replica.text(&["HGET", "pm:{feed/l}:m", "s"]).await,
        "2",
        "the promoted replica never got 3, 4 and 5"
    );
    // The new master hands out position 3 again, to another message, published on a node
    // that reached it first; then node a gets there too.
    let b = Gateway::start(&node_config(&replica, "b", "")).await;
    let (status, body) = publish_id(b.admin, "l", "other", None).await;
    assert_eq!(status, 202, "{body}");
    proxy.switch(Backend::Unix(replica.socket()));

    let (status, body) = held.await.unwrap();
    assert!(
        status == 410 || (status == 200 && data(&body).is_empty()),
        "a held cursor past the lost entries is expired, never answered with other data: \
         {status} {body}"
    );
    // Every cursor of the old log is expired: before the node noticed, only what it had
    // handed out under that cursor already.
    let handed_out = ["3", "4", "5"];
    for (i, cursor) in [&replicated].into_iter().chain(&lost).enumerate() {
        eventually("the old cursor is expired", || async {
            let (status, body) = poll(&gw, &format!("/feed/l?cursor={cursor}&timeout=0")).await;
            match status {
                410 => true,
                200 => {
                    let got = data(&body);
                    let got: Vec<&str> = got.iter().map(String::as_str).collect();
                    assert!(handed_out[i..].starts_with(&got), "{body}");
                    false
                }
                _ => panic!("{status} {body}"),
            }
        })
        .await;
    }
    // What was published after the failover was acknowledged, and is kept: the new epoch
    // has it.
    for node in [&gw, &b] {
        let (status, body) = poll(node, "/feed/l?cursor=earliest&timeout=0").await;
        assert_eq!(status, 200, "{body}");
        let got = data(&body);
        assert_eq!(got.last().map(String::as_str), Some("other"), "{body}");
    }
    let regressions = "pollmux_backplane_epoch_resets_total{cause=\"regression\",route=\"feed\"}";
    assert!(gw.metric(regressions).await >= 1.0);
}

/// What a publish answers while the backplane cannot take it (`BackplaneError::Unreachable`).
const UNREACHABLE: &str = "the backplane has been unreachable for longer than backplane_grace";

/// Publishes `body` with Message-Id `id` on `gw` until it is taken (the id makes the retries
/// one message). Until then only "unreachable" may come back, never what Redis refused (such
/// as READONLY from a demoted master).
async fn publish_through(gw: &Gateway, topic: &str, body: &str, id: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, answer) = publish_id(gw.admin, topic, body, Some(id)).await;
        match status {
            202 => return,
            503 => assert_eq!(answer["detail"], UNREACHABLE, "{answer}"),
            _ => panic!("{status} {answer}"),
        }
        assert!(Instant::now() < deadline, "{body} was never taken");
        // A publish is refused only after backplane_grace of retries; this only paces a
        // refusal that came at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many EVALSHA calls `redis` refused (a write sent to it while it was a replica).
async fn refused_scripts(redis: &Redis) -> u64 {
    let stats = redis.text(&["INFO", "commandstats"]).await;
    stats
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .flat_map(|l| l.trim().split(','))
        .filter_map(|kv| kv.strip_prefix("rejected_calls="))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

/// Whether Sentinel knows the replica on `port` as a healthy replica (one it may promote).
async fn healthy_replica(sentinel: &Sentinel, port: u16) -> bool {
    let port = port.to_string();
    sentinel.replicas("mymaster").await.iter().any(|r| {
        r.get("port") == Some(&port)
            && r.get("flags").map(String::as_str) == Some("slave")
            && r.get("master-link-status").map(String::as_str) == Some("ok")
    })
}

#[tokio::test]
async fn a_sentinel_failover_is_followed_and_a_demoted_master_is_left() {
    let [first_port, second_port, sentinel_port] = free_ports();
    let Some(mut first) = Redis::start_on_port(first_port, &[]).await else {
        return;
    };
    let replica_of = |port: u16| {
        [
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            port.to_string(),
        ]
    };
    let of_first = replica_of(first_port);
    let of_first: Vec<&str> = of_first.iter().map(String::as_str).collect();
    let second = Redis::start_on_port(second_port, &of_first)
        .await
        .expect("installed");
    eventually("the replica follows the master", || {
        replication_says(&second, "master_link_status", "up")
    })
    .await;
    let Some(sentinel) = Sentinel::start(sentinel_port, "mymaster", first_port).await else {
        return;
    };
    eventually("Sentinel knows the replica", || {
        healthy_replica(&sentinel, second_port)
    })
    .await;
    // The URL gives the database (and would give credentials); Sentinel names the master.
    let keys = format!(
        "url = \"redis://127.0.0.1:{first_port}/0\"\n\
         sentinel = {{ master = \"mymaster\", addrs = [\"{}\"] }}",
        sentinel.addr()
    );
    let a = Gateway::start(&node_config_at(&keys, "a", "")).await;
    let b = Gateway::start(&node_config_at(&keys, "b", "")).await;
    let start = head_cursor(&b, "s").await;
    publish_through(&a, "s", "one", "s-1").await;
    let (got, at) = collect(&b, "s", &start, 1).await;
    assert_eq!(got, ["one"]);
    // Replication is asynchronous: what the replica has not got when the master dies is
    // lost (the test above is about that).
    eventually("the replica has it", || async {
        second.text(&["HGET", "pm:{feed/s}:m", "s"]).await == "1"
    })
    .await;

    // The master dies: Sentinel promotes the replica, and the nodes follow.
    first.kill().await;
    let killed = Instant::now();
    publish_through(&a, "s", "two", "s-2").await;
    let (got, at) = collect(&b, "s", &at, 1).await;
    assert_eq!(got, ["two"]);
    let recovered = killed.elapsed();
    assert!(
        recovered < Duration::from_secs(10),
        "publishes and polls work again {recovered:?} after the master died"
    );
    assert_eq!(sentinel.master_port("mymaster").await, Some(second_port));

    // The old master comes back as a replica, and Sentinel hands the master role back to it.
    // Once Sentinel demotes the current master (it also closes the clients' connections), the
    // nodes must go to the new one, whose role they check, and no client may see a refusal
    // (READONLY). Not covered: the seconds between Sentinel's switch and that demotion.
    let of_second = replica_of(second_port);
    let of_second: Vec<&str> = of_second.iter().map(String::as_str).collect();
    first.restart_with(&of_second).await;
    eventually("Sentinel may promote the old master", || {
        healthy_replica(&sentinel, first_port)
    })
    .await;
    eventually("Sentinel starts a failover", || async {
        let failover = sentinel.try_command(&["SENTINEL", "FAILOVER", "mymaster"]);
        failover.await.is_ok()
    })
    .await;
    eventually("the master is demoted", || {
        replication_says(&second, "role", "slave")
    })
    .await;
    publish_through(&a, "s", "three", "s-3").await;
    publish_through(&b, "s", "four", "s-4").await;
    assert_eq!(sentinel.master_port("mymaster").await, Some(first_port));
    publish_through(&a, "s", "five", "s-5").await;
    publish_through(&b, "s", "six", "s-6").await;
    assert_eq!(
        refused_scripts(&second).await,
        0,
        "no write sent to a replica"
    );
    for gw in [&a, &b] {
        let (got, end) = collect(gw, "s", &at, 4).await;
        assert_eq!(got, ["three", "four", "five", "six"], "each once, in order");
        nothing_after(gw, "s", &end).await;
    }
}
