//! A worker process: holds its share of the client connections, from its own loopback source
//! address (each process may open at most 20,000 descriptors, and each source address has its
//! own ephemeral ports). It reports to the controller as JSON lines on stdout and stops when
//! told on stdin or when every connection is done.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;

use crate::Target;
use crate::client::{self, Conn, Reply};

/// Connections opened at once, so the listen backlog never overflows.
const CONNECT_CONCURRENCY: usize = 256;
/// Hold each long-poll asks for (pollmux clamps to its route's `max_hold`).
pub const HOLD_SECS: u64 = 55;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub target: Target,
    pub server: SocketAddr,
    pub source: Option<IpAddr>,
    /// Subscriber path of each connection (its topic filled in).
    pub paths: Vec<String>,
    /// Re-poll after each answer (true) or take one answer (false).
    pub repoll: bool,
}

/// What one connection saw.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Seen {
    /// Message ids in arrival order and the wall-clock ns each answer was read.
    pub ids: Vec<u64>,
    pub at_ns: Vec<u64>,
    pub errors: u32,
    /// Non-200 statuses other than timeouts (410, 503, …).
    pub bad_status: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Report {
    Sent {
        opened: usize,
        failed: usize,
    },
    /// Every one-answer connection has its answer (connections stay open until `stop`, so
    /// their teardown is not measured with the fan-out).
    Answered,
    Done {
        seen: Vec<Seen>,
    },
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A subscriber's protocol state: pollmux's cursor, or Nchan's Last-Modified / Etag.
#[derive(Default)]
struct Position {
    cursor: Option<String>,
    last_modified: Option<String>,
    etag: Option<String>,
}

impl Position {
    fn request(&self, target: Target, host: &str, path: &str) -> Vec<u8> {
        match target {
            Target::Pollmux => {
                let mut p = format!("{path}?timeout={HOLD_SECS}");
                if let Some(c) = &self.cursor {
                    p.push_str("&cursor=");
                    p.push_str(c);
                }
                client::get(host, &p, &[])
            }
            Target::Nchan => {
                let mut headers = Vec::new();
                if let Some(lm) = &self.last_modified {
                    headers.push(("If-Modified-Since", lm.as_str()));
                }
                if let Some(e) = &self.etag {
                    headers.push(("If-None-Match", e.as_str()));
                }
                client::get(host, path, &headers)
            }
        }
    }

    /// Takes the message ids out of a reply and moves the position on.
    fn absorb(&mut self, target: Target, reply: &Reply, seen: &mut Seen) {
        let at = now_ns();
        match (target, reply.status) {
            (Target::Pollmux, 200) => {
                let Ok(body) = serde_json::from_slice::<serde_json::Value>(&reply.body) else {
                    seen.errors += 1;
                    return;
                };
                self.cursor = body["cursor"].as_str().map(str::to_owned);
                for m in body["messages"].as_array().into_iter().flatten() {
                    if let Some(id) = m["data"].as_str().and_then(message_id) {
                        seen.ids.push(id);
                        seen.at_ns.push(at);
                    }
                }
            }
            (Target::Nchan, 200) => {
                self.last_modified = reply.last_modified.clone();
                self.etag = reply.etag.clone();
                if let Some(id) = std::str::from_utf8(&reply.body).ok().and_then(message_id) {
                    seen.ids.push(id);
                    seen.at_ns.push(at);
                }
            }
            // Nchan answers an ended hold with 304 or 408; nothing to record.
            (Target::Nchan, 304 | 408) => {}
            _ => seen.bad_status += 1,
        }
    }
}

pub async fn run(plan: Plan) {
    let host = plan.server.to_string();
    let slots: Vec<Arc<Mutex<Seen>>> = plan.paths.iter().map(|_| Arc::default()).collect();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut opening = Vec::with_capacity(plan.paths.len());
    for path in &plan.paths {
        let gate = gate.clone();
        let (server, source, target, host, path) = (
            plan.server,
            plan.source,
            plan.target,
            host.clone(),
            path.clone(),
        );
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.ok()?;
            let mut conn = Conn::open(server, source).await.ok()?;
            let pos = Position::default();
            conn.send(&pos.request(target, &host, &path)).await.ok()?;
            Some((conn, pos))
        }));
    }
    let mut conns = Vec::with_capacity(opening.len());
    for o in opening {
        conns.push(o.await.ok().flatten());
    }
    let failed = conns.iter().filter(|c| c.is_none()).count();
    emit(&Report::Sent {
        opened: conns.len() - failed,
        failed,
    });

    let mut tasks = tokio::task::JoinSet::new();
    for ((conn, slot), path) in conns.into_iter().zip(&slots).zip(&plan.paths) {
        let Some((mut conn, mut pos)) = conn else {
            slot.lock().unwrap().errors += 1;
            continue;
        };
        let (slot, target, host, path, repoll) = (
            slot.clone(),
            plan.target,
            host.clone(),
            path.clone(),
            plan.repoll,
        );
        tasks.spawn(async move {
            loop {
                let Ok(reply) = conn.receive().await else {
                    slot.lock().unwrap().errors += 1;
                    return None;
                };
                pos.absorb(target, &reply, &mut slot.lock().unwrap());
                if !repoll {
                    return Some(conn);
                }
                if conn.send(&pos.request(target, &host, &path)).await.is_err() {
                    slot.lock().unwrap().errors += 1;
                    return None;
                }
            }
        });
    }
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut answered = Vec::new();
    let mut all_answered = false;
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                // "stop", or the controller went away.
                if !matches!(line, Ok(Some(ref l)) if l.trim() != "stop") {
                    break;
                }
            }
            next = tasks.join_next(), if !all_answered => match next {
                Some(Ok(Some(conn))) => answered.push(conn),
                Some(_) => {}
                None => {
                    all_answered = true;
                    emit(&Report::Answered);
                }
            },
        }
    }
    tasks.abort_all();
    drop(answered);
    let seen = slots
        .iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap()))
        .collect();
    emit(&Report::Done { seen });
}

/// A message's id: the first word of its body (the rest is `--payload-bytes` padding).
fn message_id(body: &str) -> Option<u64> {
    body.split_whitespace().next()?.parse().ok()
}

fn emit(report: &Report) {
    let line = serde_json::to_string(report).expect("reports serialize");
    println!("{line}");
}
