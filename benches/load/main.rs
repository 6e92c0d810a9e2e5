//! pollmux-load: measures a long-poll server (pollmux, or Nchan for comparison) under the
//! scenarios of docs/BENCHMARKS.md, from worker processes on several loopback source addresses.
//!
//! `pollmux-load run …` drives one server and prints one JSON line per scenario plus a table;
//! `pollmux-load compare A.jsonl B.jsonl` prints the ratios of two runs; `pollmux-load worker`
//! is the worker process (started by `run`). Every scenario ends by itself within its bound.
//! Only loopback targets are accepted.

mod client;
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
    /// Run scenarios against one server.
    Run(RunArgs),
    /// Print the ratios of two runs' JSON lines (first / second).
    Compare { first: PathBuf, second: PathBuf },
    /// Internal: a worker process (reads its plan from stdin).
    Worker,
}

#[derive(Parser, Clone)]
struct RunArgs {
    #[arg(long, value_enum)]
    target: Target,
    /// Subscriber URL with `{topic}`, e.g. http://127.0.0.1:8080/bench/{topic}
    #[arg(long)]
    sub_url: String,
    /// Publisher URL with `{topic}`, e.g. http://127.0.0.1:9090/publish/bench/{topic}
    #[arg(long)]
    pub_url: String,
    /// URL whose text reports the number of held subscribers.
    #[arg(long)]
    held_url: String,
    /// Text before that number on its line (e.g. `subscribers:`).
    #[arg(long)]
    held_prefix: String,
    /// Server process id (RSS and CPU are read from /proc; children included).
    #[arg(long)]
    pid: u32,
    /// Scenarios, comma separated: fanout_1topic, fanout_100topics, burst, sustained.
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
            Command::Run(args) => match run(args).await {
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
    let (sub_addr, sub_path) = client::split_url(&args.sub_url)?;
    let (pub_addr, pub_path) = client::split_url(&args.pub_url)?;
    let (held_addr, held_path) = client::split_url(&args.held_url)?;
    for addr in [sub_addr, pub_addr, held_addr] {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr}: load is only sent to loopback addresses"));
        }
    }
    let ctx = Ctx {
        args: args.clone(),
        // Runs start at a random block, so back-to-back runs do not reuse source addresses
        // whose ports are still in TIME-WAIT from the run before.
        started: std::sync::atomic::AtomicU8::new((now_ns() % 250) as u8),
        sub_addr,
        sub_path,
        pub_addr,
        pub_path,
        held_addr,
        held_path,
        status: tokio::sync::Mutex::new(None),
        run_id: format!("{:x}", now_ns() % 0xffff_ffff),
    };
    let mut rows = Vec::new();
    for name in args
        .scenarios
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let result = match name {
            "fanout_1topic" => fanout(&ctx, name, ctx.scaled(10_000), 1).await?,
            "fanout_100topics" => fanout(&ctx, name, ctx.scaled(19_000), 100).await?,
            "burst" => burst(&ctx, ctx.scaled(10_000)).await?,
            "sustained" => sustained(&ctx, ctx.scaled(2_000), 20).await?,
            other => return Err(format!("unknown scenario {other}")),
        };
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

struct Ctx {
    args: RunArgs,
    /// Scenarios started so far (picks the source address block).
    started: std::sync::atomic::AtomicU8,
    sub_addr: SocketAddr,
    sub_path: String,
    pub_addr: SocketAddr,
    pub_path: String,
    held_addr: SocketAddr,
    held_path: String,
    /// A keep-alive connection to the status page (a new one per look would leave thousands of
    /// TIME-WAIT sockets per run and, over runs, use the loopback's ephemeral ports up).
    status: tokio::sync::Mutex<Option<Conn>>,
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

    /// Subscribers held by the server now, as its status page says.
    async fn held(&self) -> Result<u64, String> {
        let mut status = self.status.lock().await;
        let request = client::get("status", &self.held_path, &[]);
        let reused = match status.as_mut() {
            Some(conn) => conn.request(&request).await.ok(),
            None => None,
        };
        let reply = match reused {
            Some(reply) => reply,
            // First look, or the server closed the idle connection: a new one.
            None => {
                let mut conn = Conn::open(self.held_addr, None)
                    .await
                    .map_err(|e| format!("status page: {e}"))?;
                let reply = conn
                    .request(&request)
                    .await
                    .map_err(|e| format!("status page: {e}"))?;
                *status = Some(conn);
                reply
            }
        };
        let text = String::from_utf8_lossy(&reply.body);
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(&self.args.held_prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Ok(value as u64)
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
                &id.to_string(),
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
    opened: usize,
    failed: usize,
}

impl Workers {
    /// Starts workers for `paths` (one connection each) and waits until every first request is
    /// sent.
    async fn start(ctx: &Ctx, paths: Vec<String>, repoll: bool) -> Result<Workers, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let block = ctx
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 250
            + 1;
        let mut procs = Vec::new();
        for (i, chunk) in paths.chunks(CLIENTS_PER_WORKER).enumerate() {
            let source = match ctx.sub_addr.ip() {
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
                server: ctx.sub_addr,
                source,
                paths: chunk.to_vec(),
                repoll,
            };
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

    /// Stops every worker; the connections' records in `paths` order.
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
        Ok(all)
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

fn paths_for(ctx: &Ctx, topics: &[String], clients: usize) -> Vec<String> {
    (0..clients)
        .map(|i| ctx.sub_path.replace("{topic}", &topics[i % topics.len()]))
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
    let rss0 = sys::rss_kib(ctx.args.pid);
    let slab0 = sys::kernel_slab_kib();
    let workers = Workers::start(ctx, paths_for(ctx, &topics, clients), false).await?;
    let opened = workers.opened as u64;
    let held = ctx.wait_held(|n| n >= opened).await?;
    let rss1 = sys::rss_kib(ctx.args.pid);
    let slab1 = sys::kernel_slab_kib();
    if ctx.args.pause_before_publish > 0 {
        eprintln!(
            "pollmux-load: {held} held; publishing in {}s",
            ctx.args.pause_before_publish
        );
        tokio::time::sleep(Duration::from_secs(ctx.args.pause_before_publish)).await;
    }
    let cpu0 = sys::cpu_ms(ctx.args.pid);
    let messages: Vec<(String, u64)> = topics.iter().cloned().zip(1..).collect();
    let id_of_topic: HashMap<String, u64> = messages.iter().cloned().collect();
    let mut workers = workers;
    let sent = ctx.publish(messages).await?;
    workers
        .wait_answered(tokio::time::Instant::now() + ANSWER_TIMEOUT)
        .await?;
    let cpu1 = sys::cpu_ms(ctx.args.pid);
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
    Ok(json!({
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
    }))
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
    let cpu0 = sys::cpu_ms(ctx.args.pid);
    let mut sent = HashMap::new();
    for id in 1..=total {
        tick.tick().await;
        let topic = topics[(id as usize) % topics.len()].clone();
        sent.extend(ctx.publish(vec![(topic, id)]).await?);
    }
    let published_until = now_ns();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = workers.stop().await?;
    let cpu = sys::cpu_ms(ctx.args.pid) - cpu0;
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
    let name = |v: &Value| v["target"].as_str().unwrap_or("?").to_owned();
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
            let (Some(x), Some(y)) = (summary(&ra, key), summary(&rb, key)) else {
                continue;
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
