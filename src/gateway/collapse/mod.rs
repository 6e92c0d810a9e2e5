//! `kind = "collapse"` routes (docs/protocol.md section 2): identical long-polls of an existing API
//! share one upstream request, and its answer is written byte for byte to every waiter.
//!
//! - A request's `Key` is its topic group (the route's topic plus the values of its `vary`
//!   headers) and its path with the query parameters sorted, the cursor parameter included.
//! - One `Flight` per key in flight: the first request of a key starts it in a task of its own
//!   (a client going away never cancels what others wait for), later ones subscribe to it.
//! - An answer that moves the cursor on is stored in its topic for `linger`, so a late client
//!   with that key is answered without an upstream request. The upstream's own timeout answer
//!   (204, 304, the same cursor) and errors go to the current waiters only.
//! - With `next_cursor`, the task chains: as soon as an answer arrives it opens the request for
//!   the next key while the topic has had a client within `linger`, so re-polling clients join a
//!   request that is already waiting.
//!
//! The upstream request is built from config and the key alone: the route's upstream with its
//! own headers, the key's path and query, and the `vary` headers' values; no other client header.
//! `Set-Cookie` never reaches a client. A `Cache-Control: private` answer is shared only on a
//! `share = "public"` route or within one `vary` group; on other routes (authorized by a hook) its
//! waiters get 502, and for `linger` the topic's requests go to the upstream one by one, at most
//! `max_unshared` at a time.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use crate::service::Drain;
use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use tokio::sync::{Semaphore, watch};

mod fetch;

use super::router::percent_decode;
use crate::auth::listed_headers;
use crate::config::{AuthConfig, CollapseConfig, NextCursor, percent_encode};
use crate::metrics::{CollapseMetrics, GaugeGuard, Outcome, RouteMetrics, UpstreamResult};
use crate::problem::Problem;
use crate::upstream::{Body, Upstream, UpstreamError};
use fetch::{Answer, Fetcher};

/// Upstream response headers every waiter gets (beside the route's `expose_headers`).
const SHARED_HEADERS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
    header::ETAG,
    header::LAST_MODIFIED,
];

/// Stored answers kept per topic group; older ones make way (their late clients simply cause an
/// upstream request), so a fast-moving topic cannot grow memory for a whole `linger`.
const STORED_PER_TOPIC: usize = 32;

/// An answer that did not move the cursor is chained (the same key asked again) only when the
/// upstream held it at least this long: an upstream answering at once is not long-polling, and
/// asking it again at once would loop.
const CHAIN_MIN_HOLD: Duration = Duration::from_secs(1);

/// One collapse route: its in-flight requests and its topic groups.
pub struct CollapseRoute {
    pub config: CollapseConfig,
    pub metrics: CollapseMetrics,
    fetcher: Arc<Fetcher>,
    /// Whether a `Cache-Control: private` answer may be shared (`share = "public"` or `vary`).
    shares_private: bool,
    /// The client headers that identify a client (its hook's credential headers, or
    /// `Authorization` for JWTs): sent upstream on a request that is the client's alone.
    credential_headers: Vec<HeaderName>,
    flights: DashMap<Key, Arc<Flight>>,
    topics: DashMap<Arc<Group>, Arc<TopicState>>,
    /// Cancelled when the server drains: chains stop, waiters get at most `drain_window` more.
    drain: Drain,
    /// Set when a reload removes or changes the route: chains stop.
    retired: std::sync::atomic::AtomicBool,
    drain_window: Duration,
    /// Time origin of the topics' `last_seen` stamps.
    epoch: Instant,
}

/// Who shares answers: clients of one topic with the same `vary` header values.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Group {
    topic: String,
    vary: Vec<(HeaderName, HeaderValue)>,
}

/// What one shared upstream request is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    group: Arc<Group>,
    /// Path and sorted query, as sent upstream.
    target: String,
    /// Where the cursor's value is in `target` (present exactly once), if it is.
    cursor: Option<Range<usize>>,
}

impl Key {
    /// The same request with another cursor value.
    fn with_cursor(&self, value: &str) -> Option<Key> {
        let range = self.cursor.clone()?;
        let encoded = percent_encode(value);
        let mut target = String::with_capacity(self.target.len() + encoded.len());
        target.push_str(&self.target[..range.start]);
        target.push_str(&encoded);
        target.push_str(&self.target[range.end..]);
        Some(Key {
            group: self.group.clone(),
            target,
            cursor: Some(range.start..range.start + encoded.len()),
        })
    }
}

/// The path and the query with its parameters sorted by name (stable, so repeated parameters
/// keep their order), and where the cursor parameter's value is.
fn normalize(
    path: &str,
    query: Option<&str>,
    cursor: Option<&str>,
) -> (String, Option<Range<usize>>) {
    let mut params: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .collect();
    let name = |p: &str| p.split_once('=').map_or(p, |(n, _)| n).to_owned();
    params.sort_by_key(|p| name(p));
    let mut target = path.to_owned();
    let mut found = Vec::new();
    for (i, p) in params.iter().enumerate() {
        target.push(if i == 0 { '?' } else { '&' });
        if let Some(c) = cursor
            && let Some(value) = p.strip_prefix(c).and_then(|v| v.strip_prefix('='))
        {
            let start = target.len() + c.len() + 1;
            found.push(start..start + value.len());
        }
        target.push_str(p);
    }
    let cursor = if found.len() == 1 { found.pop() } else { None };
    (target, cursor)
}

/// Where an upstream answer leads a chain.
enum Progress {
    /// The cursor moved on: the next key.
    Moved(Key),
    /// The upstream's timeout answer: the same key again.
    Same,
    /// No chaining (no `next_cursor`, no cursor in the key, or an error answer).
    None,
}

/// One upstream request in flight and its waiters.
type Flight = watch::Sender<Option<Arc<Answer>>>;

/// A topic group's state: when a client last asked, and its stored answers.
struct TopicState {
    /// Milliseconds since the route's epoch.
    last_seen: AtomicU64,
    /// Until then (milliseconds since the epoch) the topic's answers are private: requests go
    /// to the upstream one by one.
    unshared_until: AtomicU64,
    /// Permits for those requests (`max_unshared`).
    unshared: Arc<Semaphore>,
    stored: Mutex<VecDeque<Stored>>,
    _live: GaugeGuard,
}

struct Stored {
    key: Key,
    answer: Arc<Answer>,
    until: Instant,
}

/// A request after its synchronous part.
pub enum Join {
    /// Answered now (a stored answer, or a refusal).
    Now(Response<Body>, Outcome),
    /// Waiting for a flight's answer.
    Wait(Waiter),
}

/// A client waiting for a shared answer; counted in `polls_active` while it waits.
pub struct Waiter {
    answer: watch::Receiver<Option<Arc<Answer>>>,
    _held: GaugeGuard,
}

impl CollapseRoute {
    pub fn new(
        config: CollapseConfig,
        metrics: CollapseMetrics,
        route_metrics: Arc<RouteMetrics>,
        upstream: Arc<Upstream>,
        max_body: usize,
        drain: Drain,
        drain_window: Duration,
    ) -> CollapseRoute {
        CollapseRoute {
            fetcher: Arc::new(Fetcher {
                upstream,
                route_metrics,
                metrics: metrics.clone(),
                max_body,
                expose_headers: config.expose_headers.clone(),
            }),
            shares_private: config.share_public || !config.vary.is_empty(),
            credential_headers: match &config.auth {
                AuthConfig::Hook(hook) => hook.headers.clone(),
                AuthConfig::Jwt(_) => vec![header::AUTHORIZATION],
                AuthConfig::Public => Vec::new(),
            },
            config,
            metrics,
            flights: DashMap::new(),
            topics: DashMap::new(),
            drain,
            drain_window,
            retired: std::sync::atomic::AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Joins the flight of `req`'s key, starting it if there is none, or answers at once from
    /// a stored answer. `params` are the route's validated path parameters.
    pub fn join<B>(self: &Arc<Self>, req: &Request<B>, params: &[(String, String)]) -> Join {
        let vary = listed_headers(req.headers(), &self.config.vary);
        let group = Arc::new(Group {
            topic: self.config.topic.render(params),
            vary,
        });
        let (target, cursor) = normalize(
            req.uri().path(),
            req.uri().query(),
            self.config.cursor.as_deref(),
        );
        let key = Key {
            group,
            target,
            cursor,
        };
        let Some(topic) = self.topic(&key.group) else {
            let detail = "this route has reached its max_topics";
            let problem = Problem::TooManyTopics;
            return Join::Now(problem.response(Some(detail)), problem.outcome());
        };
        let now_ms = self.now_ms();
        topic.last_seen.store(now_ms, Ordering::Relaxed);
        if topic.unshared_until.load(Ordering::Relaxed) > now_ms {
            let credential = listed_headers(req.headers(), &self.credential_headers);
            return self.unshared(key, credential, &topic);
        }
        if let Some(answer) = topic.stored(&key, Instant::now()) {
            self.metrics.stored_hits.inc();
            self.metrics.collapsed.inc();
            return Join::Now(answer.response(), answer.outcome);
        }
        let answer = match self.flights.entry(key) {
            Entry::Occupied(flight) => {
                self.metrics.collapsed.inc();
                flight.get().subscribe()
            }
            Entry::Vacant(slot) => {
                // The flight may have just ended with a stored answer.
                if let Some(answer) = topic.stored(slot.key(), Instant::now()) {
                    drop(slot);
                    self.metrics.stored_hits.inc();
                    self.metrics.collapsed.inc();
                    return Join::Now(answer.response(), answer.outcome);
                }
                let flight = Arc::new(watch::Sender::new(None));
                let rx = flight.subscribe();
                let key = slot.key().clone();
                slot.insert(flight.clone());
                tokio::spawn(self.clone().run(key, flight, topic));
                rx
            }
        };
        Join::Wait(Waiter {
            answer,
            _held: GaugeGuard::new(self.metrics.waiting.clone()),
        })
    }

    /// A request of a topic whose answers are private: an upstream request of its own.
    /// The request carries the client's own credential: the private answer is then the
    /// client's own.
    fn unshared(
        &self,
        key: Key,
        credential: Vec<(HeaderName, HeaderValue)>,
        topic: &TopicState,
    ) -> Join {
        let key = Key {
            group: Arc::new(Group {
                topic: key.group.topic.clone(),
                vary: key.group.vary.iter().cloned().chain(credential).collect(),
            }),
            ..key
        };
        let Ok(permit) = topic.unshared.clone().try_acquire_owned() else {
            let detail = "too many requests on this topic while its answers are private";
            let problem = Problem::Overloaded;
            return Join::Now(problem.response(Some(detail)), problem.outcome());
        };
        let flight = watch::Sender::new(None);
        let answer = flight.subscribe();
        let fetcher = self.fetcher.clone();
        tokio::spawn(async move {
            let fetched = fetcher.fetch(&key).await;
            flight.send_replace(Some(Arc::new(fetched)));
            drop(permit);
        });
        Join::Wait(Waiter {
            answer,
            _held: GaugeGuard::new(self.metrics.waiting.clone()),
        })
    }

    /// The topic group's state, created unless the route is at `max_topics`.
    fn topic(&self, group: &Arc<Group>) -> Option<Arc<TopicState>> {
        if let Some(t) = self.topics.get(group) {
            return Some(t.clone());
        }
        if self.topics.len() >= self.config.max_topics {
            return None;
        }
        let state = self
            .topics
            .entry(group.clone())
            .or_insert_with(|| {
                Arc::new(TopicState {
                    last_seen: AtomicU64::new(self.now_ms()),
                    unshared_until: AtomicU64::new(0),
                    unshared: Arc::new(Semaphore::new(self.config.max_unshared)),
                    stored: Mutex::default(),
                    _live: GaugeGuard::new(self.metrics.topics.clone()),
                })
            })
            .clone();
        Some(state)
    }

    /// Asks the upstream for `key`, hands the answer to the flight's waiters, and chains to the
    /// next key while the topic has clients.
    async fn run(self: Arc<Self>, mut key: Key, mut flight: Arc<Flight>, topic: Arc<TopicState>) {
        // Answers in a row that nobody waited for: a chain nobody follows (a client's one-off
        // query, or clients that left) stops after one such hop.
        let mut idle = 0u32;
        loop {
            let started = Instant::now();
            let answer = {
                let _open = GaugeGuard::new(self.metrics.upstream_open.clone());
                self.fetcher.fetch(&key).await
            };
            let now = Instant::now();
            if answer.private && !self.shares_private {
                // Not for everyone who asked: nobody gets it, and the topic goes one by one.
                self.metrics.unshareable.inc();
                let until = self.now_ms() + self.config.linger.as_millis() as u64;
                topic.unshared_until.store(until, Ordering::Relaxed);
                self.flights.remove(&key);
                let detail = "the upstream marked its answer private; it is not shared";
                let refused = Answer::problem(Problem::UpstreamUnshareable, Some(detail));
                flight.send_replace(Some(Arc::new(refused)));
                return;
            }
            let answer = Arc::new(answer);
            let progress = self.progress(&key, &answer);
            if let Progress::Moved(_) = progress
                && answer.status.is_success()
                && answer.status != StatusCode::NO_CONTENT
            {
                topic.store(key.clone(), answer.clone(), now + self.config.linger);
            }
            // Stored first, then out of the map: a client that missed the store finds the flight,
            // or (rechecking the store under the map entry) the stored answer.
            let demanded = flight.receiver_count() > 0;
            idle = if demanded { 0 } else { idle + 1 };
            self.flights.remove(&key);
            flight.send_replace(Some(answer));

            let active = self
                .now_ms()
                .saturating_sub(topic.last_seen.load(Ordering::Relaxed))
                < self.config.linger.as_millis() as u64;
            if !active || self.drain.is_draining() || self.retired.load(Ordering::Relaxed) {
                return;
            }
            let held = now.duration_since(started) >= CHAIN_MIN_HOLD;
            let next_key = match progress {
                Progress::Moved(next) if idle <= 1 => next,
                Progress::Same if held && idle == 0 => key.clone(),
                Progress::Moved(_) | Progress::Same | Progress::None => return,
            };
            if topic.stored(&next_key, now).is_some() {
                return;
            }
            match self.flights.entry(next_key) {
                Entry::Occupied(_) => return,
                Entry::Vacant(slot) => {
                    key = slot.key().clone();
                    flight = Arc::new(watch::Sender::new(None));
                    slot.insert(flight.clone());
                }
            }
        }
    }

    /// Where an answer to `key` leads, when the route chains and the key has a cursor: an
    /// answer (2xx or 304) naming another cursor moves on; one naming none or the same cursor
    /// is the upstream's timeout answer.
    fn progress(&self, key: &Key, answer: &Answer) -> Progress {
        let ok = answer.status.is_success() || answer.status == StatusCode::NOT_MODIFIED;
        let Some(next_cursor) = self.config.next_cursor.as_ref() else {
            return Progress::None;
        };
        if !ok || key.cursor.is_none() {
            return Progress::None;
        }
        let next = match next_cursor {
            NextCursor::Header(name) => answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            NextCursor::Json(pointer) => serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|body| match body.pointer(pointer)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }),
        };
        // Compared decoded: the client may have spelled its cursor's escapes differently.
        let current = key
            .cursor
            .clone()
            .and_then(|r| percent_decode(&key.target[r]));
        match next {
            Some(n) if current.as_deref() != Some(n.as_str()) => {
                key.with_cursor(&n).map_or(Progress::Same, Progress::Moved)
            }
            _ => Progress::Same,
        }
    }

    /// A reload removed or changed the route: no request is chained from now on (requests in
    /// flight still answer their waiters).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Drops topic groups idle past `linger` and expired stored answers; returns the groups
    /// removed.
    pub fn sweep(&self, now: Instant) -> usize {
        let linger = self.config.linger.as_millis() as u64;
        let now_ms = self.now_ms();
        let before = self.topics.len();
        self.topics.retain(|_, t| {
            t.prune(now);
            now_ms.saturating_sub(t.last_seen.load(Ordering::Relaxed)) < linger
        });
        crate::shrink::after_sweep(&self.topics);
        before - self.topics.len()
    }
}

impl TopicState {
    fn stored(&self, key: &Key, now: Instant) -> Option<Arc<Answer>> {
        let stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        stored
            .iter()
            .find(|s| s.key == *key && s.until > now)
            .map(|s| s.answer.clone())
    }

    fn store(&self, key: Key, answer: Arc<Answer>, until: Instant) {
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        if stored.len() == STORED_PER_TOPIC {
            stored.pop_front();
        }
        stored.push_back(Stored { key, answer, until });
    }

    fn prune(&self, now: Instant) {
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        stored.retain(|s| s.until > now);
    }
}

impl Waiter {
    /// The flight's answer; once the server drains, at most `drain_window` more, then 503.
    pub async fn wait(mut self, route: &CollapseRoute) -> (Response<Body>, Outcome) {
        let answer = async {
            match self.answer.wait_for(Option::is_some).await {
                Ok(a) => a.clone(),
                Err(_) => None,
            }
        };
        let drained = async {
            route.drain.begun().await;
            tokio::time::sleep(route.drain_window).await;
        };
        let draining = Problem::Draining;
        tokio::select! {
            answer = answer => match answer {
                Some(a) => (a.response(), a.outcome),
                None => (draining.response(None), draining.outcome()),
            },
            () = drained => (draining.response(None), draining.outcome()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_sorted_and_the_cursor_found() {
        let (t, c) = normalize("/o/42", Some("z=1&version=7&a=2&a=1"), Some("version"));
        assert_eq!(t, "/o/42?a=2&a=1&version=7&z=1");
        assert_eq!(&t[c.unwrap()], "7");
        let (t, c) = normalize("/o/42", Some("b&&a="), Some("version"));
        assert_eq!((t.as_str(), c), ("/o/42?a=&b", None));
        let (t, c) = normalize("/o/42", None, Some("version"));
        assert_eq!((t.as_str(), c), ("/o/42", None));
        // A repeated cursor is ambiguous: collapsed, never chained.
        let (_, c) = normalize("/o", Some("version=1&version=2"), Some("version"));
        assert_eq!(c, None);
        // A parameter that merely starts with the cursor's name is not the cursor.
        let (_, c) = normalize("/o", Some("versions=1"), Some("version"));
        assert_eq!(c, None);
    }

    #[test]
    fn next_key_replaces_only_the_cursor() {
        let (target, cursor) = normalize("/o/42", Some("version=7&z=1"), Some("version"));
        let key = Key {
            group: Arc::new(Group {
                topic: "42".into(),
                vary: Vec::new(),
            }),
            target,
            cursor,
        };
        let next = key.with_cursor("12 a/b").unwrap();
        assert_eq!(next.target, "/o/42?version=12%20a%2Fb&z=1");
        assert_eq!(&next.target[next.cursor.clone().unwrap()], "12%20a%2Fb");
        assert_eq!(next.with_cursor("7").unwrap(), key);
    }
}
