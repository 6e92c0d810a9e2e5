//! Sources: what feeds a poll route's topics. `publish` needs no task (the admin listener
//! publishes through the gateway); upstream sources run one task per topic, started when the
//! topic is created by a poll and ended when the hub retires the topic after `linger`.
//!
//! At most one source task per (route, topic) runs at any instant: a task takes its topic's
//! slot in [`SourceSlots`] before connecting, so a new incarnation's source waits for the
//! previous one to have closed its upstream request.

pub mod backoff;
pub mod feed;
pub mod ndjson;
pub mod sse;
pub mod upstream_interval;
pub mod upstream_poll;
pub mod upstream_stream;

use std::sync::Arc;

use dashmap::DashMap;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;

use crate::config::{InitialCursor, percent_encode};
use feed::{Ended, Feed};

/// Where a source with nothing to resume from starts, rendered for its topic.
#[derive(Debug, Clone)]
pub enum Initial {
    /// This cursor, as is.
    Literal(String),
    /// The JSON value at `pointer` in the answer to `GET path`.
    Bootstrap { path: String, pointer: String },
}

/// A bootstrap answer is read up to this size.
const BOOTSTRAP_BYTES_MAX: usize = 1 << 20;

impl Initial {
    pub fn for_topic(config: &InitialCursor, params: &[(String, String)]) -> Initial {
        match config {
            InitialCursor::Literal(c) => Initial::Literal(c.clone()),
            InitialCursor::Bootstrap { path, pointer } => Initial::Bootstrap {
                path: path.render_path(params),
                pointer: pointer.clone(),
            },
        }
    }

    /// The cursor to start from. A bootstrap request that fails, or whose answer has no
    /// string or number at the pointer, is the upstream's trouble (backoff, grace).
    pub async fn cursor(&self, feed: &Feed) -> Result<String, Ended> {
        let (path, pointer) = match self {
            Initial::Literal(c) => return Ok(c.clone()),
            Initial::Bootstrap { path, pointer } => (path, pointer),
        };
        let Ok(path) = path.parse() else {
            tracing::error!(%path, "bootstrap path is not a valid URI path");
            return Err(Ended::Retired);
        };
        let req = Request::builder()
            .method(Method::GET)
            .uri(feed.upstream.uri_for(&path))
            .header(header::ACCEPT, "application/json")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .map_err(|_| Ended::Reconnect)?;
        let response = feed.request(req, |s| s == StatusCode::OK).await?;
        let body = tokio::select! {
            () = feed.topic.retired() => return Err(Ended::Retired),
            b = Limited::new(response.into_body(), BOOTSTRAP_BYTES_MAX).collect() => b,
        };
        let value = body
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b.to_bytes()).ok());
        match value
            .as_ref()
            .and_then(|v| v.pointer(pointer))
            .and_then(scalar)
        {
            Some(cursor) => {
                feed.healthy();
                Ok(cursor)
            }
            None => {
                tracing::warn!(%pointer, "the bootstrap answer has no cursor at its pointer; retrying");
                feed.unusable();
                Err(Ended::Reconnect)
            }
        }
    }
}

/// A JSON string or number as text (an id, a cursor).
pub fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `path` with its query parameter `name` set to `value`: an occurrence already there is
/// replaced (the first; any others are dropped), else the parameter is appended. A server
/// given the parameter twice may take either, or stall.
pub fn with_query_param(path: &str, name: &str, value: &str) -> String {
    let (base, query) = path.split_once('?').unwrap_or((path, ""));
    let set = format!("{name}={}", percent_encode(value));
    let mut parts = Vec::new();
    let mut placed = false;
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let key = part.split_once('=').map_or(part, |(k, _)| k);
        if key == name {
            if !placed {
                parts.push(set.clone());
                placed = true;
            }
        } else {
            parts.push(part.to_owned());
        }
    }
    if !placed {
        parts.push(set);
    }
    format!("{base}?{}", parts.join("&"))
}

/// Per (route, topic): the lock a source task holds while it runs.
#[derive(Default)]
pub struct SourceSlots {
    slots: DashMap<(String, String), Arc<tokio::sync::Mutex<()>>>,
}

impl SourceSlots {
    /// Runs `source` once no other source of (route, topic) runs, unless `retired` completes
    /// first.
    pub async fn run_exclusive(
        &self,
        route: &str,
        topic: &str,
        retired: impl Future<Output = ()>,
        source: impl Future<Output = ()>,
    ) {
        let key = (route.to_owned(), topic.to_owned());
        let slot = self.slots.entry(key.clone()).or_default().clone();
        {
            let guard = tokio::select! {
                () = retired => None,
                g = slot.lock() => Some(g),
            };
            if guard.is_some() {
                source.await;
            }
        }
        drop(slot);
        // Forget the slot unless another task of this topic holds or awaits it.
        self.slots.remove_if(&key, |_, s| Arc::strong_count(s) == 1);
    }

    /// Slots currently tracked (tests: they do not accumulate).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// `bytes` cut at arbitrary points: decoders must give the same result for any chunking.
#[cfg(test)]
pub(crate) fn chunks_at<'a>(bytes: &'a [u8], cuts: &[proptest::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for p in points {
        chunks.push(&bytes[start..p]);
        start = p;
    }
    chunks.push(&bytes[start..]);
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    #[test]
    fn a_resume_parameter_already_in_the_path_is_replaced_not_repeated() {
        let set = |path, value| with_query_param(path, "since", value);
        assert_eq!(set("/db/_changes", "5"), "/db/_changes?since=5");
        assert_eq!(
            set("/db/_changes?feed=continuous&since=now", "7-g1"),
            "/db/_changes?feed=continuous&since=7-g1"
        );
        assert_eq!(
            set("/c?since=now&feed=continuous&since=0", "9"),
            "/c?since=9&feed=continuous"
        );
        // Only the parameter of that name: one that merely starts with it stays.
        assert_eq!(set("/c?since_x=1", "2"), "/c?since_x=1&since=2");
        assert_eq!(set("/c?", "a b"), "/c?since=a%20b");
    }

    #[tokio::test]
    async fn one_source_per_topic_at_a_time_and_slots_are_forgotten() {
        let slots = Arc::new(SourceSlots::default());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release_first, first_may_end) = oneshot::channel::<()>();
        let (first_started_tx, first_started) = oneshot::channel::<()>();
        let source = |gate: Option<oneshot::Receiver<()>>, started: Option<oneshot::Sender<()>>| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                if let Some(s) = started {
                    let _ = s.send(());
                }
                if let Some(g) = gate {
                    let _ = g.await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
            }
        };
        let first = {
            let (slots, s) = (
                slots.clone(),
                source(Some(first_may_end), Some(first_started_tx)),
            );
            tokio::spawn(async move {
                slots
                    .run_exclusive("r", "t", std::future::pending(), s)
                    .await
            })
        };
        first_started.await.unwrap();
        let second = {
            let (slots, s) = (slots.clone(), source(None, None));
            tokio::spawn(async move {
                slots
                    .run_exclusive("r", "t", std::future::pending(), s)
                    .await
            })
        };
        // A source of another topic runs at once, beside the first.
        slots
            .run_exclusive("r", "other", std::future::pending(), source(None, None))
            .await;
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert!(!second.is_finished());
        release_first.send(()).unwrap();
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "never two sources of one topic"
        );
        assert!(slots.is_empty(), "{} slots left", slots.len());
        // A source whose topic is retired while it waits for the slot never runs.
        let (release, may_end) = oneshot::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let holder = {
            let (slots, s) = (slots.clone(), source(Some(may_end), Some(started_tx)));
            tokio::spawn(async move {
                slots
                    .run_exclusive("r", "t", std::future::pending(), s)
                    .await
            })
        };
        started.await.unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r2 = ran.clone();
        slots
            .run_exclusive("r", "t", async {}, async move {
                r2.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        release.send(()).unwrap();
        holder.await.unwrap();
        assert!(slots.is_empty());
    }
}
