//! pollmux-load: measures a long-poll server (pollmux, or Nchan for comparison) under the
//! scenarios of docs/BENCHMARKS.md, from worker processes on several loopback source addresses.
//!
//! `pollmux-load run …` drives one server and prints one JSON line per scenario plus a table;
//! `pollmux-load compare A.jsonl B.jsonl` prints the ratios of two runs; `pollmux-load worker`
//! is the worker process (started by `run`). Every scenario ends by itself within its bound.
//! Only loopback targets are accepted. Given several subscriber URLs (the nodes of a cluster),
//! the clients are spread over them round-robin; the publishes go to the one publisher URL.

mod client;
mod memory;
mod redis_stats;
mod stats;
mod sys;
mod worker;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use client::Conn;
use stats::{Delivery, percentiles};
use worker::{Plan, Report, Seen, now_ns};

/// Connections per worker process: well below the 20,000 descriptors a process may open.
const CLIENTS_PER_WORKER: usize = 5_000;
/// Workers connect from 127.0.S.(10 + worker), S counting scenarios, so no scenario meets the
/// TIME_WAIT ports of an earlier one.
const SOURCE_BASE: u8 = 10;
/// Longest wait for every client to be held.
const HELD_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for answers after the last publish.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Pollmux,
    Nchan,
}

#[derive(Parser)]
#[command(
    name = "pollmux-load",
    about = "Long-poll load and fan-out measurements"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios against one server (or one cluster's nodes).
    Run(Box<RunArgs>),
    /// Print the ratios of two runs' JSON lines (first / second).
    Compare { first: PathBuf, second: PathBuf },
    /// Internal: a worker process (reads its plan from stdin).
    Worker,
}

#[derive(Parser, Clone)]
struct RunArgs {
    #[arg(long, value_enum)]
    target: Target,
    /// Subscriber URL with `{topic}`, e.g. http://127.0.0.1:8080/bench/{topic}; several
    /// (comma separated or repeated: a cluster's nodes) get the clients round-robin.
    #[arg(long, required = true, value_delimiter = ',')]
    sub_url: Vec<String>,
    /// Publisher URL with `{topic}`, e.g. http://127.0.0.1:9090/publish/bench/{topic}
    #[arg(long)]
    pub_url: String,
    /// URL whose text reports the number of held subscribers; several (one per node) are
    /// added up.
    #[arg(long, required = true, value_delimiter = ',')]
    held_url: Vec<String>,
    /// Text before that number on its line (e.g. `subscribers:`).
    #[arg(long)]
    held_prefix: String,
    /// Server process id (RSS and CPU are read from /proc; children included); several (a
    /// cluster's nodes) are added up.
    #[arg(long, required = true, value_delimiter = ',')]
    pid: Vec<u32>,
    /// A cluster's Redis, `redis://IP:PORT` (loopback) or `unix:///path`: its
    /// `INFO commandstats` is read before and after each fan-out, for commands per message.
    #[arg(long)]
    redis_url: Option<String>,
    /// redis-server's process id: its CPU is reported apart from the servers' (`redis_cpu_ms`).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Name of this run in the JSON lines and in `compare`'s columns (default: the target).
    #[arg(long)]
    label: Option<String>,
    /// Scenarios, comma separated: fanout_1topic, fanout_100topics, burst, sustained, and the
    /// memory scenarios idle_return and soak (minutes each; not in the default list); a
    /// scenario may name its client count before scaling, e.g. `fanout_1topic=2000`.
    #[arg(long, default_value = "fanout_1topic,fanout_100topics,burst,sustained")]
    scenarios: String,
    /// Multiplies every client count (0.02 for a smoke run of a few hundred connections).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Messages in the burst scenario.
    #[arg(long, default_value_t = 20)]
    burst_messages: u64,
    /// Seconds of the sustained scenario.
    #[arg(long, default_value_t = 10)]
    sustained_secs: u64,
    /// Messages per second (all topics together) in the sustained scenario.
    #[arg(long, default_value_t = 200)]
    sustained_rate: u64,
    /// Seconds of the soak scenario's load.
    #[arg(long, default_value_t = 480)]
    soak_secs: u64,
    /// Messages per second (all topics together) in the soak scenario.
    #[arg(long, default_value_t = 100)]
    soak_rate: u64,
    /// Seconds between RSS samples in the soak scenario.
    #[arg(long, default_value_t = 10)]
    sample_secs: u64,
    /// The routes' `linger` (benches/pollmux.toml's): the memory scenarios read RSS this long
    /// plus 5 s after the clients closed.
    #[arg(long, default_value_t = 10)]
    linger_secs: u64,
    /// The routes' `buffer.age` (the default's): the soak reports RSS at it and after.
    #[arg(long, default_value_t = 300)]
    buffer_age_secs: u64,
    /// Pads every published message to this many bytes (its id, a space, then `x`s).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Seconds to pause, after every client is held and before the fan-out publish, with a
    /// line on stderr: time to attach a profiler to the fan-out alone.
    #[arg(long, default_value_t = 0)]
    pause_before_publish: u64,
    /// Append the JSON lines to this file too.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    // A worker holds thousands of sockets: take every descriptor the hard limit allows.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // A worker process runs on one thread: its connections wait for the server and need no
    // second thread, and cross-thread wake-ups would be CPU taken from the server measured.
    let runtime = match cli.command {
        Command::Worker => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Worker => {
                let mut line = String::new();
                let mut stdin = BufReader::new(tokio::io::stdin());
                if stdin.read_line(&mut line).await.is_err() {
                    return 2;
                }
                let Ok(plan) = serde_json::from_str::<Plan>(&line) else {
                    eprintln!("worker: bad plan");
                    return 2;
                };
                drop(stdin);
                worker::run(plan).await;
                0
            }
            Command::Compare { first, second } => compare(&first, &second),
            Command::Run(args) => match run(*args).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("pollmux-load: {e}");
                    1
                }
            },
        }
    });
    std::process::exit(code);
}

async fn run(args: RunArgs) -> Result<(), String> {
    let subs = args
        .sub_url
        .iter()
        .map(|u| client::split_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let (pub_addr, pub_path) = client::split_url(&args.pub_url)?;
    let helds = args
        .held_url
        .iter()
        .map(|u| client::split_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = subs.iter().chain(&helds).map(|(a, _)| *a);
    for addr in addrs.chain([pub_addr]) {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr}: load is only sent to loopback addresses"));
        }
    }
    let redis = args
        .redis_url
        .as_deref()
        .map(redis_stats::parse_url)
        .transpose()?;
    let ctx = Ctx {
        args: args.clone(),
        // Runs start at a random block, so back-to-back runs do not reuse source addresses
        // whose ports are still in TIME-WAIT from the run before.
        started: std::sync::atomic::AtomicU8::new((now_ns() % 250) as u8),
        subs,
        pub_addr,
        pub_path,
        status: tokio::sync::Mutex::new(helds.iter().map(|_| None).collect()),
        helds,
        redis,
        run_id: format!("{:x}", now_ns() % 0xffff_ffff),
    };
    let mut rows = Vec::new();
    for spec in args
        .scenarios
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (name, clients) = scenario_spec(spec)?;
        let clients = |default: usize| ctx.scaled(clients.unwrap_or(default));
        let mut result = match name {
            "fanout_1topic" => fanout(&ctx, name, clients(10_000), 1).await?,
            "fanout_100topics" => fanout(&ctx, name, clients(19_000), 100).await?,
            "burst" => burst(&ctx, clients(10_000)).await?,
            "sustained" => sustained(&ctx, clients(2_000), 20).await?,
            "idle_return" => memory::idle_return(&ctx, clients(5_000), 1).await?,
            "soak" => memory::soak(&ctx, clients(2_000), 50).await?,
            other => return Err(format!("unknown scenario {other}")),
        };
        result["nodes"] = json!(ctx.subs.len());
        if let Some(label) = &args.label {
            result["label"] = json!(label);
        }
        let line = result.to_string();
        println!("{line}");
        if let Some(out) = &args.out {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            writeln!(f, "{line}").map_err(|e| e.to_string())?;
        }
        rows.push(result);
    }
    print_table(&rows);
    Ok(())
}

/// `name` or `name=clients` (the client count before scaling).
fn scenario_spec(spec: &str) -> Result<(&str, Option<usize>), String> {
    match spec.split_once('=') {
        None => Ok((spec, None)),
        Some((name, n)) => match n.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok((name.trim(), Some(n))),
            _ => Err(format!(
                "{spec}: the client count must be a positive number"
            )),
        },
    }
}

struct Ctx {
    args: RunArgs,
    /// Scenarios started so far (picks the source address block).
    started: std::sync::atomic::AtomicU8,
    /// Each node's subscriber address and path (with `{topic}`).
    subs: Vec<(SocketAddr, String)>,
    pub_addr: SocketAddr,
    pub_path: String,
    /// Each node's status page.
    helds: Vec<(SocketAddr, String)>,
    /// A keep-alive connection to each status page (a new one per look would leave thousands
    /// of TIME-WAIT sockets per run and, over runs, use the loopback's ephemeral ports up).
    status: tokio::sync::Mutex<Vec<Option<Conn>>>,
    redis: Option<redis_stats::Addr>,
    run_id: String,
}

impl Ctx {
    fn scaled(&self, clients: usize) -> usize {
        ((clients as f64 * self.args.scale).round() as usize).max(1)
    }

    fn topics(&self, scenario: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("{scenario}-{}-{i}", self.run_id))
            .collect()
    }

    /// Subscribers held by the servers now, as their status pages say (added up).
    async fn held(&self) -> Result<u64, String> {
        let mut status = self.status.lock().await;
        let mut total = 0;
        for ((addr, path), conn) in self.helds.iter().zip(status.iter_mut()) {
            let request = client::get("status", path, &[]);
            let reused = match conn.as_mut() {
                Some(c) => c.request(&request).await.ok(),
                None => None,
            };
            let reply = match reused {
                Some(reply) => reply,
                // First look, or the server closed the idle connection: a new one.
                None => {
                    let mut c = Conn::open(*addr, None)
                        .await
                        .map_err(|e| format!("status page {addr}: {e}"))?;
                    let reply = c
                        .request(&request)
                        .await
                        .map_err(|e| format!("status page {addr}: {e}"))?;
                    *conn = Some(c);
                    reply
                }
            };
            let text = String::from_utf8_lossy(&reply.body);
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(&self.args.held_prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            total += value as u64;
        }
        Ok(total)
    }

    /// Resident memory of the servers (KiB), added up.
    fn rss_kib(&self) -> u64 {
        self.args.pid.iter().map(|&p| sys::rss_kib(p)).sum()
    }

    /// The anonymous part of that (KiB): without the pages of mapped files (code).
    fn rss_anon_kib(&self) -> u64 {
        self.args.pid.iter().map(|&p| sys::rss_anon_kib(p)).sum()
    }

    /// CPU time of the servers (ms), added up; redis-server's is apart.
    fn cpu_ms(&self) -> f64 {
        self.args.pid.iter().map(|&p| sys::cpu_ms(p)).sum()
    }

    /// Redis's command counts and CPU, when a Redis is given.
    async fn redis_reading(&self) -> Result<Option<redis_stats::Reading>, String> {
        match &self.redis {
            Some(addr) => redis_stats::read(addr).await.map(Some),
            None => Ok(None),
        }
    }

    /// Waits until the server holds at least `at_least` (or at most `at_most`) subscribers.
    async fn wait_held(&self, want: impl Fn(u64) -> bool) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + HELD_TIMEOUT;
        loop {
            let n = self.held().await?;
            if want(n) {
                return Ok(n);
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A message's body: its id, padded to `--payload-bytes` with a space and `x`s.
    fn body(&self, id: u64) -> String {
        let mut body = id.to_string();
        if self.args.payload_bytes > body.len() {
            body.push(' ');
            let pad = self.args.payload_bytes - body.len();
            body.extend(std::iter::repeat_n('x', pad));
        }
        body
    }

    /// Publishes `(topic, id)` pairs all at the same moment, one connection each (connected
    /// beforehand), as many backends publishing at once would; returns each id's send time.
    /// Latency is measured from each message's own send, for pollmux and Nchan alike.
    async fn publish(&self, messages: Vec<(String, u64)>) -> Result<HashMap<u64, u64>, String> {
        let start = Arc::new(tokio::sync::Barrier::new(messages.len() + 1));
        let mut tasks = Vec::new();
        for (topic, id) in messages {
            let (addr, start) = (self.pub_addr, start.clone());
            let request = client::post(
                "pub",
                &self.pub_path.replace("{topic}", &topic),
                &self.body(id),
            );
            tasks.push(tokio::spawn(async move {
                let conn = Conn::open(addr, None).await;
                start.wait().await;
                let mut conn = conn.map_err(|e| e.to_string())?;
                let at = now_ns();
                let reply = conn.request(&request).await.map_err(|e| e.to_string())?;
                if !(200..300).contains(&reply.status) {
                    return Err(format!("publish answered {}", reply.status));
                }
                Ok::<_, String>((id, at))
            }));
        }
        start.wait().await;
        let mut times = HashMap::new();
        for t in tasks {
            let (id, at) = t.await.map_err(|e| e.to_string())??;
            times.insert(id, at);
        }
        Ok(times)
    }
}

/// The worker processes of one scenario.
struct Workers {
    procs: Vec<(Child, ChildStdin, Lines<BufReader<ChildStdout>>)>,
    /// The client (its index in `start`'s list) behind each connection, in the workers' order.
    order: Vec<usize>,
    opened: usize,
    failed: usize,
}

/// Which clients each worker takes: every worker talks to one server, clients keep their
/// order within it. Returns (server, client indexes) per worker.
fn assign(clients: &[(SocketAddr, String)]) -> Vec<(SocketAddr, Vec<usize>)> {
    let mut servers: Vec<(SocketAddr, Vec<usize>)> = Vec::new();
    for (i, (addr, _)) in clients.iter().enumerate() {
        match servers.iter_mut().find(|(a, _)| a == addr) {
            Some((_, list)) => list.push(i),
            None => servers.push((*addr, vec![i])),
        }
    }
    servers
        .into_iter()
        .flat_map(|(addr, list)| {
            list.chunks(CLIENTS_PER_WORKER)
                .map(|c| (addr, c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

impl Workers {
    /// Starts workers for `clients` (server and path; one connection each) and waits until
    /// every first request is sent.
    async fn start(
        ctx: &Ctx,
        clients: Vec<(SocketAddr, String)>,
        repoll: bool,
    ) -> Result<Workers, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let block = ctx
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 250
            + 1;
        let plans = assign(&clients);
        if plans.len() > usize::from(u8::MAX - SOURCE_BASE) {
            return Err(format!(
                "{} workers: too many source addresses",
                plans.len()
            ));
        }
        let mut procs = Vec::new();
        let mut order = Vec::with_capacity(clients.len());
        for (i, (server, chunk)) in plans.into_iter().enumerate() {
            let source = match server.ip() {
                IpAddr::V4(_) => Some(IpAddr::V4(Ipv4Addr::new(
                    127,
                    0,
                    block,
                    SOURCE_BASE + i as u8,
                ))),
                IpAddr::V6(_) => None,
            };
            let plan = Plan {
                target: ctx.args.target,
                server,
                source,
                paths: chunk.iter().map(|&c| clients[c].1.clone()).collect(),
                repoll,
            };
            order.extend(chunk);
            let mut child = tokio::process::Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("spawn worker: {e}"))?;
            let mut stdin = child.stdin.take().expect("piped");
            let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
            let mut line = serde_json::to_string(&plan).map_err(|e| e.to_string())?;
            line.push('\n');
            stdin
                .write_all(line.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            procs.push((child, stdin, stdout));
        }
        let mut w = Workers {
            procs,
            order,
            opened: 0,
            failed: 0,
        };
        for (_, _, out) in &mut w.procs {
            match read_report(out).await? {
                Report::Sent { opened, failed } => {
                    w.opened += opened;
                    w.failed += failed;
                }
                _ => return Err("worker ended before sending".into()),
            }
        }
        Ok(w)
    }

    /// Waits up to `deadline` for every worker's one-answer connections to be answered.
    async fn wait_answered(&mut self, deadline: tokio::time::Instant) -> Result<(), String> {
        for (_, _, out) in &mut self.procs {
            match tokio::time::timeout_at(deadline, read_report(out)).await {
                Ok(Ok(Report::Answered)) | Err(_) => {}
                Ok(Ok(_)) => return Err("unexpected worker report".into()),
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Stops every worker; the connections' records in the order of `start`'s clients.
    async fn stop(mut self) -> Result<Vec<Seen>, String> {
        for (_, stdin, _) in &mut self.procs {
            let _ = stdin.write_all(b"stop\n").await;
        }
        let mut all = Vec::new();
        for (child, _, out) in &mut self.procs {
            let seen = loop {
                match read_report(out).await? {
                    Report::Done { seen } => break seen,
                    Report::Answered => continue,
                    Report::Sent { .. } => return Err("unexpected worker report".into()),
                }
            };
            all.extend(seen);
            let _ = child.wait().await;
        }
        if all.len() != self.order.len() {
            return Err(format!(
                "workers reported {} connections of {}",
                all.len(),
                self.order.len()
            ));
        }
        let mut by_client = vec![Seen::default(); all.len()];
        for (seen, &client) in all.into_iter().zip(&self.order) {
            by_client[client] = seen;
        }
        Ok(by_client)
    }
}

async fn read_report(out: &mut Lines<BufReader<ChildStdout>>) -> Result<Report, String> {
    let line = out
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("worker exited")?;
    serde_json::from_str(&line).map_err(|e| format!("worker report: {e}"))
}

/// Client `i` waits on topic `i % topics` at node `i % nodes`.
fn paths_for(ctx: &Ctx, topics: &[String], clients: usize) -> Vec<(SocketAddr, String)> {
    (0..clients)
        .map(|i| {
            let (addr, path) = &ctx.subs[i % ctx.subs.len()];
            (*addr, path.replace("{topic}", &topics[i % topics.len()]))
        })
        .collect()
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// N clients hold one poll each over `topics` topics; one message per topic fans out.
async fn fanout(ctx: &Ctx, name: &str, clients: usize, topics: usize) -> Result<Value, String> {
    ctx.wait_held(|n| n == 0).await?;
    let topics = ctx.topics(name, topics);
    let rss0 = ctx.rss_kib();
    let slab0 = sys::kernel_slab_kib();
    let workers = Workers::start(ctx, paths_for(ctx, &topics, clients), false).await?;
    let opened = workers.opened as u64;
    let held = ctx.wait_held(|n| n >= opened).await?;
    let rss1 = ctx.rss_kib();
    let slab1 = sys::kernel_slab_kib();
    if ctx.args.pause_before_publish > 0 {
        eprintln!(
            "pollmux-load: {held} held; publishing in {}s",
            ctx.args.pause_before_publish
        );
        tokio::time::sleep(Duration::from_secs(ctx.args.pause_before_publish)).await;
    }
    let redis0 = ctx.redis_reading().await?;
    let redis_cpu0 = ctx.args.redis_pid.map(sys::cpu_ms);
    let cpu0 = ctx.cpu_ms();
    let messages: Vec<(String, u64)> = topics.iter().cloned().zip(1..).collect();
    let id_of_topic: HashMap<String, u64> = messages.iter().cloned().collect();
    let mut workers = workers;
    let sent = ctx.publish(messages).await?;
    workers
        .wait_answered(tokio::time::Instant::now() + ANSWER_TIMEOUT)
        .await?;
    let cpu1 = ctx.cpu_ms();
    let redis_cpu1 = ctx.args.redis_pid.map(sys::cpu_ms);
    // Every node has had its announcement once its clients are answered, and Redis counts a
    // blocking read when it answers: the reads that carried these messages are in.
    let redis1 = ctx.redis_reading().await?;
    let seen = workers.stop().await?;
    let mut latencies = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        let expected = id_of_topic[&topics[i % topics.len()]];
        if let (Some(&id), Some(&at)) = (s.ids.first(), s.at_ns.first())
            && id == expected
        {
            latencies.push(at.saturating_sub(sent[&id]) as f64 / 1e6);
        }
    }
    let received = latencies.len() as u64;
    let (p50, p99, max) = percentiles(&mut latencies);
    let cpu = cpu1 - cpu0;
    let mut row = json!({
        "scenario": format!("{name}_{clients}"),
        "target": ctx.args.target,
        "clients": clients,
        "topics": topics.len(),
        "opened": opened,
        "held": held,
        "rss_kib_per_poll": round((rss1 as f64 - rss0 as f64) / opened.max(1) as f64, 2),
        "kernel_slab_kib_per_conn_both_ends": round((slab1 as f64 - slab0 as f64) / opened.max(1) as f64, 2),
        "fanout_p50_ms": round(p50, 2),
        "fanout_p99_ms": round(p99, 2),
        "fanout_max_ms": round(max, 2),
        "received": received,
        "lost": opened - received.min(opened),
        "cpu_ms": round(cpu, 1),
        "cpu_ms_per_1k_deliveries": round(cpu / (received.max(1) as f64 / 1000.0), 2),
    });
    if let (Some(before), Some(after)) = (redis0, redis1) {
        let messages = topics.len() as f64;
        let calls = redis_stats::delta(&before.calls, &after.calls);
        let total: u64 = calls.values().sum();
        row["redis_calls"] = json!(total);
        row["redis_calls_per_msg"] = json!(round(total as f64 / messages, 2));
        row["redis_calls_by_command"] = json!(calls);
        // Redis's own count, in µs; it includes answering the first INFO.
        let cpu_us = after.cpu_us.saturating_sub(before.cpu_us);
        row["redis_info_cpu_us_per_msg"] = json!(round(cpu_us as f64 / messages, 1));
    }
    if let (Some(c0), Some(c1)) = (redis_cpu0, redis_cpu1) {
        row["redis_cpu_ms"] = json!(round(c1 - c0, 1));
        row["redis_cpu_ms_per_1k_deliveries"] =
            json!(round((c1 - c0) / (received.max(1) as f64 / 1000.0), 2));
    }
    Ok(row)
}

/// Every client re-polls with its cursor while messages arrive a few ms apart.
async fn burst(ctx: &Ctx, clients: usize) -> Result<Value, String> {
    ctx.wait_held(|n| n == 0).await?;
    let topics = ctx.topics("burst", 1);
    let workers = Workers::start(ctx, paths_for(ctx, &topics, clients), true).await?;
    let opened = workers.opened as u64;
    let held = ctx.wait_held(|n| n >= opened).await?;
    let ids: Vec<u64> = (1..=ctx.args.burst_messages).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for &id in &ids {
        tick.tick().await;
        ctx.publish(vec![(topics[0].clone(), id)]).await?;
    }
    // Every client is back to waiting once it has had everything; then stop them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctx.wait_held(|n| n >= opened).await?;
    let seen = workers.stop().await?;
    let mut total = Delivery::default();
    for s in &seen {
        total.add(Delivery::check(&ids, &s.ids));
    }
    let bad_status: u64 = seen.iter().map(|s| u64::from(s.bad_status)).sum();
    Ok(json!({
        "scenario": format!("burst_{}msgs_10ms_{clients}", ids.len()),
        "target": ctx.args.target,
        "clients": clients,
        "opened": opened,
        "held": held,
        "expected": opened * ids.len() as u64,
        "received": total.received,
        "lost": total.lost + (clients as u64 - opened) * ids.len() as u64,
        "duplicated": total.duplicated,
        "out_of_order": total.out_of_order,
        "error_answers": bad_status,
    }))
}

/// Clients re-poll while messages arrive at a steady rate; deliveries per second.
async fn sustained(ctx: &Ctx, clients: usize, topics: usize) -> Result<Value, String> {
    ctx.wait_held(|n| n == 0).await?;
    let topics = ctx.topics("sustained", topics);
    let workers = Workers::start(ctx, paths_for(ctx, &topics, clients), true).await?;
    let opened = workers.opened as u64;
    ctx.wait_held(|n| n >= opened).await?;
    let rate = ctx.args.sustained_rate.max(1);
    let total = rate * ctx.args.sustained_secs;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let started = now_ns();
    let cpu0 = ctx.cpu_ms();
    let mut sent = HashMap::new();
    for id in 1..=total {
        tick.tick().await;
        let topic = topics[(id as usize) % topics.len()].clone();
        sent.extend(ctx.publish(vec![(topic, id)]).await?);
    }
    let published_until = now_ns();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = workers.stop().await?;
    let cpu = ctx.cpu_ms() - cpu0;
    let elapsed_s = (published_until - started) as f64 / 1e9;
    let mut latencies = Vec::new();
    let mut deliveries = 0u64;
    let mut loss = Delivery::default();
    for (i, s) in seen.iter().enumerate() {
        deliveries += s.ids.len() as u64;
        for (id, at) in s.ids.iter().zip(&s.at_ns) {
            if let Some(t) = sent.get(id) {
                latencies.push(at.saturating_sub(*t) as f64 / 1e6);
            }
        }
        let topic = i % topics.len();
        let published: Vec<u64> = (1..=total)
            .filter(|id| *id as usize % topics.len() == topic)
            .collect();
        loss.add(Delivery::check(&published, &s.ids));
    }
    let (p50, p99, max) = percentiles(&mut latencies);
    Ok(json!({
        "scenario": format!("sustained_{rate}msgs_per_s_{clients}"),
        "target": ctx.args.target,
        "clients": clients,
        "opened": opened,
        "published": total,
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries as f64 / elapsed_s, 0),
        "latency_p50_ms": round(p50, 2),
        "latency_p99_ms": round(p99, 2),
        "latency_max_ms": round(max, 2),
        "lost": loss.lost,
        "duplicated": loss.duplicated,
        "out_of_order": loss.out_of_order,
        "cpu_ms_per_1k_deliveries": round(cpu / (deliveries.max(1) as f64 / 1000.0), 2),
    }))
}

fn print_table(rows: &[Value]) {
    println!();
    for row in rows {
        println!("{}", row["scenario"].as_str().unwrap_or("?"));
        if let Some(obj) = row.as_object() {
            for (k, v) in obj {
                if k != "scenario" {
                    println!("  {k:<28} {v}");
                }
            }
        }
    }
}

/// The figures compared, with the direction that is better.
const COMPARED: &[&str] = &[
    "rss_kib_per_poll",
    "fanout_p50_ms",
    "fanout_p99_ms",
    "cpu_ms_per_1k_deliveries",
    "lost",
    "deliveries_per_s",
    "latency_p99_ms",
    "redis_calls_per_msg",
    "redis_info_cpu_us_per_msg",
    "redis_cpu_ms_per_1k_deliveries",
];

fn compare(first: &PathBuf, second: &PathBuf) -> i32 {
    let load = |p: &PathBuf| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let (a, b) = (load(first), load(second));
    let name = |v: &Value| {
        v.get("label")
            .unwrap_or(&v["target"])
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    let (an, bn) = (
        a.first().map(name).unwrap_or_default(),
        b.first().map(name).unwrap_or_default(),
    );
    println!("| scenario | figure | rounds | {an} | {bn} | {an} / {bn} |");
    println!("|---|---|---|---|---|---|");
    let mut scenarios: Vec<&str> = Vec::new();
    for r in &a {
        let s = r["scenario"].as_str().unwrap_or("?");
        if !scenarios.contains(&s) {
            scenarios.push(s);
        }
    }
    for scenario in scenarios {
        let rounds = |rows: &[Value]| -> Vec<Value> {
            rows.iter()
                .filter(|r| r["scenario"] == scenario)
                .cloned()
                .collect()
        };
        let (ra, rb) = (rounds(&a), rounds(&b));
        if rb.is_empty() {
            continue;
        }
        if ra.iter().chain(&rb).any(|r| r["opened"] != ra[0]["opened"]) {
            println!("| {scenario} | opened (not comparable) | | | | |");
            continue;
        }
        for key in COMPARED {
            let (x, y) = match (summary(&ra, key), summary(&rb, key)) {
                (Some(x), Some(y)) => (x, y),
                // A figure only the first run has (Redis's, against a single node).
                (Some(x), None) => {
                    println!("| {scenario} | {key} | {} | {x} | – | |", ra.len());
                    continue;
                }
                _ => continue,
            };
            let ratio = if y == 0.0 {
                if x == 0.0 {
                    "=".to_string()
                } else {
                    "∞".to_string()
                }
            } else {
                format!("{:.2}", x / y)
            };
            let n = ra.len().min(rb.len());
            println!("| {scenario} | {key} | {n} | {x} | {y} | {ratio} |");
        }
    }
    0
}

/// One figure over a scenario's rounds: the worst for counts of lost, duplicated or reordered
/// messages (one bad round must show), the median for the others (this machine is noisy).
fn summary(rounds: &[Value], key: &str) -> Option<f64> {
    let mut values: Vec<f64> = rounds.iter().filter_map(|r| r[key].as_f64()).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    if matches!(key, "lost" | "duplicated" | "out_of_order") {
        return values.last().copied();
    }
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_may_name_their_client_count() {
        assert_eq!(scenario_spec("burst"), Ok(("burst", None)));
        assert_eq!(
            scenario_spec("fanout_1topic=2000"),
            Ok(("fanout_1topic", Some(2000)))
        );
        assert!(scenario_spec("fanout_1topic=0").is_err());
        assert!(scenario_spec("fanout_1topic=x").is_err());
    }

    #[test]
    fn each_worker_talks_to_one_node_and_every_client_is_assigned_once() {
        let nodes: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let clients: Vec<(SocketAddr, String)> = (0..2 * CLIENTS_PER_WORKER + 7)
            .map(|i| (nodes[i % 3], format!("/t/{i}")))
            .collect();
        let plans = assign(&clients);
        // 3,336 / 3,336 / 3,335 clients per node: one worker each.
        assert_eq!(plans.len(), 3);
        let mut all: Vec<usize> = Vec::new();
        for (server, list) in &plans {
            assert!(list.iter().all(|&c| clients[c].0 == *server));
            assert!(list.len() <= CLIENTS_PER_WORKER);
            all.extend(list);
        }
        all.sort_unstable();
        assert_eq!(all, (0..clients.len()).collect::<Vec<_>>());
        let one_node: Vec<_> = (0..CLIENTS_PER_WORKER + 1)
            .map(|i| (nodes[0], format!("/t/{i}")))
            .collect();
        let plans = assign(&one_node);
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].1, (0..CLIENTS_PER_WORKER).collect::<Vec<_>>());
    }

    #[test]
    fn rounds_are_summarized_by_median_and_losses_by_the_worst() {
        let rounds: Vec<Value> = [(3.0, 0), (1.0, 7), (2.0, 0)]
            .iter()
            .map(|(p99, lost)| serde_json::json!({"fanout_p99_ms": p99, "lost": lost}))
            .collect();
        assert_eq!(summary(&rounds, "fanout_p99_ms"), Some(2.0));
        assert_eq!(summary(&rounds, "lost"), Some(7.0));
        assert_eq!(summary(&rounds[..2], "fanout_p99_ms"), Some(2.0));
        assert_eq!(summary(&rounds, "deliveries_per_s"), None);
    }
}
