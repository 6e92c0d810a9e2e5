//! `kind = "poll"` routes (docs/protocol.md section 1): request checks, then hold on the topic until
//! a message, the hold deadline, or the drain.
//!
//! Everything that can reject a request is decided before the topic is touched. Then the
//! request is dropped: a held poll keeps only its subscription, a position and its timers, so
//! hyper can reuse the connection's read buffer (see the memory notes in docs/BENCHMARKS.md).

mod answer;
mod clients;

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Version};

use super::cors;
use crate::backplane::Backplane;
use crate::config::{OnGap, PollConfig, Start};
use crate::hub::cursor::{self, Requested};
use crate::hub::ring::BufferLimits;
use crate::hub::{
    Batch, Hub, NewMessage, Poll, Published, RouteTopics, Subscription, TooManyTopics, Topic,
    TopicSettings, UpstreamProblem,
};
use crate::metrics::{GaugeGuard, Outcome, PollMetrics};
use crate::problem::Problem;
use crate::service::Drain;
use crate::upstream::Body;
#[cfg(test)]
use answer::POLL_CURSOR;
pub use answer::{batch_response, rejected_full};
use answer::{empty_response, rejected};
use clients::ClientPoll;
pub use clients::ClientPolls;

/// The query parameter of a poll's cursor.
pub const CURSOR_PARAM: &str = "cursor";
const LAST_EVENT_ID: &str = "last-event-id";
/// Hold jitter: up to this fraction of the hold is taken off, so clients that started together
/// drift apart (docs/protocol.md 1.2).
const JITTER_DIVISOR: u32 = 16;

/// A poll route at run time: its config, its share of the hub and its metrics.
pub struct PollRoute {
    pub name: String,
    pub config: PollConfig,
    pub topics: Arc<RouteTopics>,
    pub metrics: PollMetrics,
    /// Cluster mode: the backplane the route's topics mirror.
    pub backplane: Option<Arc<Backplane>>,
}

impl PollRoute {
    /// `backplane`: cluster mode, the route's topics mirror logs in it.
    pub fn new(
        name: &str,
        config: &PollConfig,
        metrics: PollMetrics,
        backplane: Option<Arc<Backplane>>,
    ) -> PollRoute {
        let settings = TopicSettings {
            limits: BufferLimits {
                messages: config.buffer.messages,
                bytes: config.buffer.bytes,
                age: config.buffer.age,
            },
            linger: config.linger,
            max_batch: config.max_batch,
            resume_on_gap: config.on_gap == OnGap::Resume,
            mirrored: backplane.is_some(),
        };
        let topics = RouteTopics::new(
            name,
            settings,
            config.max_topics,
            metrics.topics_active.clone(),
        );
        PollRoute {
            name: name.to_owned(),
            config: config.clone(),
            topics: Arc::new(topics),
            metrics,
            backplane,
        }
    }

    /// Publishes into a topic (the publish source); counts the message when it is new.
    pub fn publish(
        &self,
        hub: &Hub,
        topic: &str,
        message: NewMessage,
    ) -> Result<Published, TooManyTopics> {
        let published = hub.publish(&self.topics, topic, message)?;
        if !published.duplicate {
            self.metrics.received.inc();
        }
        Ok(published)
    }
}

/// A poll that passed every check and holds its subscription: all a parked poll keeps.
pub struct Held {
    _client: Option<ClientPoll>,
    subscription: Subscription,
    /// Where the client stands; fixed to a concrete position once the poll waits.
    at: Requested,
    deadline: Instant,
    /// The server drains: the deadline was moved to a moment within `drain_window`.
    draining: bool,
    /// HTTP/1.1 answers to a drain say `Connection: close`.
    close_on_drain: bool,
    /// Cluster mode, while the topic loads (or catches up with the cursor): the deadline the
    /// poll was given, which the wait for the load replaced.
    asked_deadline: Option<tokio::time::Instant>,
    /// Cluster mode: the cursor is ahead of the topic; the count of its loads after which a
    /// cursor still ahead is ahead of the log itself.
    ahead_until: Option<u64>,
    cors: Option<cors::Grant>,
    /// `pollmux_polls_active`, for as long as the poll is held.
    _active: GaugeGuard,
}

/// Checks a request on a poll route and joins its topic, synchronously: everything that can
/// reject a request is decided before the topic is touched, and the request is dropped here,
/// so the held state is only [`Held`]. `Err` is the answer for a request that does not wait.
#[expect(
    clippy::result_large_err,
    reason = "the answer is returned to hyper at once; boxing it would only add an allocation"
)]
pub fn prepare<B: hyper::body::Body>(
    route: &PollRoute,
    hub: &Hub,
    clients: &Arc<ClientPolls>,
    req: Request<B>,
    params: &[(String, String)],
    until: Option<Instant>,
) -> Result<Held, (Response<Body>, Outcome)> {
    let grant = match cors::check(req.headers(), &route.config.cors) {
        Ok(grant) => grant,
        Err(cors::OriginNotAllowed) => {
            return Err(rejected(
                Problem::OriginNotAllowed,
                "origin is not allowed",
                None,
            ));
        }
    };
    let with_cors = |(mut resp, outcome): (Response<Body>, Outcome)| {
        if let Some(grant) = &grant {
            cors::apply(resp.headers_mut(), grant);
        }
        (resp, outcome)
    };
    if req.method() == Method::OPTIONS {
        let answer = cors::preflight(grant.as_ref(), &route.config.cors);
        return Err((answer, Outcome::Response));
    }
    let checked = check(route, &req, params);
    let (requested, hold, topic) = checked.map_err(with_cors)?;
    let close_on_drain = req.version() < Version::HTTP_2;
    let client = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(credential) => {
            let Some(slot) = clients.acquire(&route.name, &topic, credential.as_bytes()) else {
                let detail = "this credential already holds the most polls allowed on this topic";
                return Err(with_cors(rejected(Problem::TooManyPolls, detail, None)));
            };
            Some(slot)
        }
    };
    // Nothing of the request is needed from here on.
    drop(req);
    let subscription = match hub.subscribe(&route.topics, &topic) {
        Ok(s) => s,
        Err(full) => return Err(with_cors(rejected_full(full))),
    };
    Ok(Held {
        _client: client,
        subscription,
        at: requested,
        deadline: {
            let deadline = Instant::now() + hold - jitter(hold);
            // A poll authorized by a token ends when the token does.
            until.map_or(deadline, |u| deadline.min(u))
        },
        draining: false,
        close_on_drain,
        asked_deadline: None,
        ahead_until: None,
        cors: grant,
        _active: GaugeGuard::new(route.metrics.polls_active.clone()),
    })
}

/// Method, body, query and cursor checks; the requested position, the hold and the topic.
#[expect(
    clippy::result_large_err,
    reason = "the answer is returned to hyper at once; boxing it would only add an allocation"
)]
fn check<B: hyper::body::Body>(
    route: &PollRoute,
    req: &Request<B>,
    params: &[(String, String)],
) -> Result<(Requested, Duration, String), (Response<Body>, Outcome)> {
    if req.method() != Method::GET {
        let (mut resp, outcome) = rejected(Problem::MethodNotAllowed, "use GET", None);
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, OPTIONS"));
        return Err((resp, outcome));
    }
    if !req.body().is_end_stream() {
        return Err(rejected(
            Problem::InvalidRequest,
            "a poll request has no body",
            None,
        ));
    }
    let query = PollQuery::parse(req.uri().query())
        .map_err(|e| rejected(Problem::InvalidRequest, &e, None))?;
    let header_cursor = match req.headers().get(LAST_EVENT_ID).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            let detail = "Last-Event-ID is not a cursor";
            return Err(rejected(Problem::InvalidCursor, detail, None));
        }
    };
    let cursor_text = match (query.cursor, header_cursor) {
        (Some(a), Some(b)) if a != b => {
            let detail = "cursor and Last-Event-ID differ";
            return Err(rejected(Problem::InvalidRequest, detail, None));
        }
        (a, b) => a.or(b),
    };
    let topic = route.config.topic.render(params);
    let requested = match cursor_text.map(Requested::parse) {
        None => match route.config.start {
            Start::Latest => Requested::Latest,
            Start::Earliest => Requested::Earliest,
        },
        Some(Ok(Requested::At(c))) if c.binding != cursor::binding(&route.name, &topic) => {
            let detail = "cursor belongs to another route or topic";
            return Err(rejected(Problem::InvalidCursor, detail, None));
        }
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(rejected(Problem::InvalidCursor, &e.to_string(), None)),
    };
    let hold = match query.timeout.map(str::parse::<u64>) {
        None => route.config.hold,
        Some(Ok(secs)) => Duration::from_secs(secs).min(route.config.max_hold),
        Some(Err(_)) => {
            let detail = "timeout must be whole seconds";
            return Err(rejected(Problem::InvalidRequest, detail, None));
        }
    };
    Ok((requested, hold, topic))
}

impl Held {
    /// The topic, when this poll created it: its source must be started.
    pub fn new_topic(&self) -> Option<Arc<Topic>> {
        self.subscription
            .created()
            .then(|| self.subscription.topic_arc())
    }

    /// Answers now if the topic has something for this position, else waits for a message,
    /// the hold deadline, or the drain (then answers at a random moment within
    /// `drain_window`, so clients do not all come back at once).
    ///
    /// One timer serves both the hold and the drain: a parked poll keeps one `Sleep`, one
    /// `Notified` and this struct.
    pub async fn wait(
        &mut self,
        route: &PollRoute,
        draining: &Drain,
        drain_window: Duration,
    ) -> (Response<Body>, Outcome) {
        let topic = self.subscription.topic_arc();
        let timer = tokio::time::sleep_until(self.deadline);
        let mut timer = std::pin::pin!(timer);
        loop {
            let changed = topic.changed();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if let Next::Answer(resp, outcome) = self.next(route, draining, drain_window) {
                return (resp, outcome);
            }
            if timer.deadline() != self.deadline {
                timer.as_mut().reset(self.deadline);
            }
            tokio::select! {
                () = &mut changed => {}
                () = timer.as_mut() => return self.expire(),
            }
        }
    }

    /// Looks at the topic: the answer, or that the poll must wait (until a change of the
    /// topic after `generation`, or [`Held::deadline`], which a drain moves closer).
    pub fn next(
        &mut self,
        route: &PollRoute,
        server_draining: &Drain,
        drain_window: Duration,
    ) -> Next {
        match self.look(route, server_draining, drain_window) {
            Ok(answer) => Next::Answer(self.with_cors(answer.0), answer.1),
            Err(generation) => Next::Wait { generation },
        }
    }

    /// When a waiting poll answers with [`Held::expire`].
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The answer at the deadline: no messages (a timeout, or the drain's answer).
    pub fn expire(&self) -> (Response<Body>, Outcome) {
        let Requested::At(position) = &self.at else {
            // Cluster mode: the topic never loaded, so no position can be named.
            let detail = "the topic could not be loaded from the backplane in time";
            let (resp, outcome) = rejected(Problem::BackplaneUnavailable, detail, None);
            return (self.with_cors(resp), outcome);
        };
        let (resp, outcome) = if self.draining {
            let resp = empty_response(position, self.close_on_drain);
            (resp, Outcome::Shutdown)
        } else {
            (empty_response(position, false), Outcome::Timeout)
        };
        (self.with_cors(resp), outcome)
    }

    /// The topic the poll reads.
    pub fn topic(&self) -> &Arc<Topic> {
        self.subscription.topic()
    }

    /// What the answers of an allowed cross-origin poll say.
    pub fn cors(&self) -> Option<&cors::Grant> {
        self.cors.as_ref()
    }

    /// Counts a batch this poll is answered with.
    pub fn delivered(&self, route: &PollRoute, batch: &Batch) {
        route.metrics.delivered.inc_by(batch.messages as u64);
        if batch.gap {
            route.metrics.cursor_expired.inc();
        }
        if batch.messages > 0 {
            let latency = batch.oldest.elapsed().as_secs_f64();
            route.metrics.delivery_latency.observe(latency);
        }
    }

    fn with_cors(&self, mut resp: Response<Body>) -> Response<Body> {
        if let Some(grant) = &self.cors {
            cors::apply(resp.headers_mut(), grant);
        }
        resp
    }

    fn look(
        &mut self,
        route: &PollRoute,
        server_draining: &Drain,
        drain_window: Duration,
    ) -> Result<(Response<Body>, Outcome), u64> {
        let topic = self.subscription.topic();
        let found = topic.poll(self.at, Instant::now());
        if let Some(asked) = self
            .asked_deadline
            .take_if(|_| !matches!(found, Poll::Loading { .. } | Poll::Behind { .. }))
        {
            // Loaded: the poll's own deadline again (or the drain's, if sooner).
            self.deadline = if self.draining {
                self.deadline.min(asked)
            } else {
                asked
            };
        }
        let (position, generation) = match found {
            Poll::Batch(batch) => {
                self.delivered(route, &batch);
                return Ok((batch_response(&batch), Outcome::Message));
            }
            Poll::Expired { earliest, latest } => {
                route.metrics.cursor_expired.inc();
                let extra = [
                    ("earliest_cursor", earliest.as_str()),
                    ("latest_cursor", latest.as_str()),
                ];
                return Ok(rejected(
                    Problem::CursorExpired,
                    "cursor expired",
                    Some(&extra),
                ));
            }
            Poll::Ahead => {
                let detail = "cursor is ahead of the topic";
                return Ok(rejected(Problem::InvalidCursor, detail, None));
            }
            Poll::Empty { at, generation } => (at, generation),
            Poll::Loading { down: true, .. } => {
                let detail = "the backplane is unreachable";
                return Ok(rejected(Problem::BackplaneUnavailable, detail, None));
            }
            Poll::Loading { generation, .. } => {
                self.wait_for_load(route);
                self.drain_deadline(server_draining, drain_window);
                return Err(generation);
            }
            Poll::Behind { generation, synced } => {
                let until = *self.ahead_until.get_or_insert_with(|| {
                    // This node's copy is behind the node that handed the cursor out: load it
                    // (after a load already under way, which may have read the log before).
                    // The count of loads is read after asking: one may have ended meanwhile.
                    let under_way = route
                        .backplane
                        .as_ref()
                        .is_some_and(|b| b.load(topic.clone()));
                    topic.synced() + 1 + u64::from(under_way)
                });
                if synced >= until {
                    let detail = "cursor is ahead of the topic";
                    return Ok(rejected(Problem::InvalidCursor, detail, None));
                }
                self.wait_for_load(route);
                self.drain_deadline(server_draining, drain_window);
                return Err(generation);
            }
        };
        if let Some(problem) = topic.upstream_problem() {
            let (problem, detail) = match problem {
                UpstreamProblem::NotFound => (Problem::NotFound, "the upstream has no such topic"),
                UpstreamProblem::Refused => (
                    Problem::UpstreamRefused,
                    "the upstream refused pollmux's credential",
                ),
                UpstreamProblem::Down => (Problem::UpstreamDown, "the upstream is unavailable"),
            };
            return Ok(rejected(problem, detail, None));
        }
        // The route was removed or changed by a reload: the normal empty answer, now.
        if topic.is_retired() {
            return Ok((empty_response(&position, false), Outcome::Timeout));
        }
        // Wait from a fixed position: `latest` must not move on while we wait.
        self.at = Requested::At(position);
        self.drain_deadline(server_draining, drain_window);
        Err(generation)
    }

    /// Cluster mode: even a poll that asked not to wait waits for its topic to load, until
    /// the backplane's grace (and a second) has passed.
    fn wait_for_load(&mut self, route: &PollRoute) {
        if self.asked_deadline.is_none() {
            self.asked_deadline = Some(self.deadline);
            let grace = route
                .backplane
                .as_ref()
                .map_or(Duration::ZERO, |b| b.grace());
            let loaded_by = tokio::time::Instant::now() + grace + Duration::from_secs(1);
            self.deadline = self.deadline.max(loaded_by);
        }
    }

    /// Moves the deadline within `drain_window` once the server drains. The drain wakes
    /// every topic after setting the flag, and the caller registered for changes before
    /// looking, so a drain starting now is never missed.
    fn drain_deadline(&mut self, server_draining: &Drain, drain_window: Duration) {
        if !self.draining && server_draining.is_draining() {
            self.draining = true;
            let spread = drain_window.mul_f64(fastrand::f64());
            self.deadline = (Instant::now() + spread).min(self.deadline);
        }
    }
}

/// What a held poll does next.
pub enum Next {
    Answer(Response<Body>, Outcome),
    /// Nothing to answer yet: wait for a change of the topic after `generation` (see
    /// [`Topic::park`]) or the deadline.
    Wait {
        generation: u64,
    },
}

/// Random part of the hold taken off, up to `hold / 16`.
fn jitter(hold: Duration) -> Duration {
    (hold / JITTER_DIVISOR).mul_f64(fastrand::f64())
}

/// The query parameters a poll understands; others are ignored (cache busters).
#[derive(Debug, Default, PartialEq, Eq)]
struct PollQuery<'a> {
    cursor: Option<&'a str>,
    timeout: Option<&'a str>,
}

impl<'a> PollQuery<'a> {
    fn parse(query: Option<&'a str>) -> Result<PollQuery<'a>, String> {
        let mut q = PollQuery::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                CURSOR_PARAM => &mut q.cursor,
                "timeout" => &mut q.timeout,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(format!("{key} is given more than once"));
            }
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests;
