//! What every upstream source of a topic shares: the upstream and the topic it feeds, the
//! connect gate, metrics and the upstream-health bookkeeping that turns outages into answers.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use super::backoff;
use crate::hub::{NewMessage, Topic, UpstreamTrouble};
use crate::metrics::{PollMetrics, RouteMetrics, UpstreamResult};
use crate::upstream::{Body, Upstream, UpstreamError};

/// How a source's attempt ended.
pub enum Ended {
    /// The source stops: its topic was retired, or (cluster mode) another node owns it now.
    Retired,
    /// Try again after a backoff.
    Reconnect,
}

pub struct Feed {
    pub upstream: Arc<Upstream>,
    pub topic: Arc<Topic>,
    /// Polls learn of an outage once it is this old (503).
    pub upstream_grace: Duration,
    pub max_message_bytes: usize,
    pub poll_metrics: PollMetrics,
    pub route_metrics: Arc<RouteMetrics>,
    /// Process-wide cap on upstream connects in progress, so an outage's reconnects queue.
    pub connects: Arc<Semaphore>,
    /// The upstream's last `Retry-After`: the next attempt waits at least this long.
    pub retry_after: Mutex<Option<Duration>>,
    /// The upstream's count of recoveries when this source's last attempt began.
    pub recoveries_seen: AtomicU64,
    /// The source's last stream ended before sending anything: such an upstream is failing,
    /// whatever its status said, until a stream sends something.
    pub ended_empty: AtomicBool,
    /// Where messages go: the topic, or (cluster mode) the topic's log in the backplane.
    pub sink: Sink,
}

/// Where a source's messages go.
pub enum Sink {
    /// Into the topic itself (a single node).
    Topic,
    /// Into the topic's log, which every node's copy of the topic follows (cluster mode: the
    /// node holding the topic's lease runs its source).
    Log(Box<dyn Log>),
}

/// A topic's log, as a source writes to it.
pub trait Log: Send + Sync {
    /// Appends a message (`None`: a gap) with the upstream id a source resuming after it
    /// would start from. `Ok(false)`: a message already logged (the same id).
    fn append(
        &self,
        message: Option<NewMessage>,
        resume_from: Option<&str>,
    ) -> Pin<Box<dyn Future<Output = Result<bool, LogError>> + Send + '_>>;

    /// Tells every node the upstream's state (`None`: healthy; else failing since, its last
    /// definitive refusal, and whether it is down), without waiting: polls on other nodes
    /// answer as here.
    fn upstream(&self, state: Option<UpstreamTrouble>);
}

/// Why a log did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogError {
    /// Another node holds the topic's lease now: this source must stop.
    Fenced,
    /// The backplane is unreachable: reconnect later, from the last message logged.
    Unavailable,
}

/// A `Retry-After` longer than this is taken as this: a source must keep trying.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// The delay a refusal's `Retry-After` asks for, in whole seconds (an HTTP date is ignored),
/// at most [`RETRY_AFTER_MAX`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    let secs = secs.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX))
}

impl Feed {
    /// Sends `req` through the connect gate. An answer whose status `usable` rejects is
    /// recorded as trouble (a 404, 401 or 403 reaches waiting polls at once) and is
    /// `Err(Ended::Reconnect)`. One it accepts is not yet health: the caller says
    /// [`Feed::healthy`] once it has used the answer, or [`Feed::unusable`] when it cannot, so
    /// an upstream answering 200 with garbage is failing, not recovering at every attempt.
    pub async fn request(
        &self,
        req: Request<Body>,
        usable: impl Fn(StatusCode) -> bool,
    ) -> Result<Response<Incoming>, Ended> {
        self.send(req, usable, None).await
    }

    /// The upstream's answer was used: its trouble, if any, is over.
    pub fn healthy(&self) {
        self.upstream_state(None);
    }

    /// [`Feed::request`] for a stream: a 200 must be of the `media` type when one is given
    /// (else it is trouble, counted as `unusable`). An upstream whose last stream ended
    /// before sending anything stays in trouble until this one sends something
    /// ([`Feed::streaming`]).
    pub async fn open_stream(
        &self,
        req: Request<Body>,
        usable: impl Fn(StatusCode) -> bool,
        media: Option<&str>,
    ) -> Result<Response<Incoming>, Ended> {
        let response = self.send(req, usable, media).await?;
        if !self.ended_empty.load(Ordering::SeqCst) {
            self.upstream_state(None);
        }
        Ok(response)
    }

    /// An answer its status let through cannot be used (not JSON, no messages where they
    /// should be): trouble, as a refusal is, so it counts toward `upstream_grace`.
    pub fn unusable(&self) {
        self.upstream_state(Some(None));
    }

    /// The stream sent something: the upstream is healthy.
    pub fn streaming(&self) {
        self.ended_empty.store(false, Ordering::SeqCst);
        self.upstream_state(None);
    }

    /// The upstream ended its stream before sending anything: trouble that lasts across a run
    /// of such streams, so an upstream that does it again and again is down after
    /// `upstream_grace` like one that refuses.
    pub fn stream_ended_empty(&self) {
        let upstream = &self.upstream.config.name;
        tracing::warn!(%upstream, "the upstream ended its stream before sending anything");
        self.ended_empty.store(true, Ordering::SeqCst);
        self.upstream_state(Some(None));
    }

    async fn send(
        &self,
        req: Request<Body>,
        usable: impl Fn(StatusCode) -> bool,
        media: Option<&str>,
    ) -> Result<Response<Incoming>, Ended> {
        let started = Instant::now();
        self.attempt_begins();
        let response = {
            let permit = tokio::select! {
                () = self.topic.retired() => return Err(Ended::Retired),
                p = self.connects.acquire() => p,
            };
            let sent = tokio::select! {
                () = self.topic.retired() => return Err(Ended::Retired),
                r = self.upstream.send(req) => r,
            };
            drop(permit);
            sent
        };
        let wrong_media = match (&response, media) {
            (Ok(r), Some(media)) if r.status() == StatusCode::OK => {
                let got = r.headers().get(http::header::CONTENT_TYPE);
                let got = got.and_then(|v| v.to_str().ok()).unwrap_or("");
                let essence = got.split(';').next().unwrap_or("").trim();
                (!essence.eq_ignore_ascii_case(media)).then(|| got.to_owned())
            }
            _ => None,
        };
        let class = match &response {
            _ if wrong_media.is_some() => UpstreamResult::Unusable,
            Ok(r) => UpstreamResult::Status(r.status().as_u16()),
            Err(UpstreamError::Timeout) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        };
        self.route_metrics.upstream(class, started.elapsed());
        let upstream = &self.upstream.config.name;
        if let Some(got) = wrong_media {
            let wanted = media.unwrap_or_default();
            tracing::warn!(%upstream, content_type = %got, "upstream answered 200 with a body that is not {wanted}");
            self.upstream_state(Some(None));
            return Err(Ended::Reconnect);
        }
        match response {
            Ok(r) if usable(r.status()) => Ok(r),
            Ok(r) => {
                tracing::warn!(%upstream, status = %r.status(), "upstream refused the source's request");
                *self.retry_after.lock().unwrap_or_else(|p| p.into_inner()) =
                    retry_after(r.headers());
                self.upstream_state(Some(Some(r.status().as_u16())));
                Err(Ended::Reconnect)
            }
            Err(e) => {
                tracing::warn!(%upstream, error = %e, "source request failed");
                self.upstream_state(Some(None));
                Err(Ended::Reconnect)
            }
        }
    }

    /// Notes the upstream's recoveries so far: one after this, while the attempt fails, ends
    /// the pause after it early.
    fn attempt_begins(&self) {
        let recoveries = self.upstream.outage.recoveries();
        self.recoveries_seen.store(recoveries, Ordering::SeqCst);
    }

    /// Records the upstream's state on the topic (`None`: healthy; else failing, with the
    /// status it answered), and in cluster mode announces every change of it. A topic that
    /// was failing and is not any more tells the upstream's other topics.
    fn upstream_state(&self, failing: Option<Option<u16>>) {
        let before = self.topic.upstream_state();
        match failing {
            None => self.topic.upstream_ok(),
            Some(status) => {
                let now = Instant::now();
                self.topic.upstream_failed(status, self.upstream_grace, now);
            }
        }
        let after = self.topic.upstream_state();
        if before.is_some() && after.is_none() {
            self.upstream.outage.recovered();
        }
        if before != after {
            self.announce_upstream();
        }
    }

    fn announce_upstream(&self) {
        if let Sink::Log(log) = &self.sink {
            log.upstream(self.topic.upstream_state());
        }
    }

    /// The upstream answered 410 to a resume: messages after the last id are lost to us.
    /// Readers behind this point get 410 (or `gap: true`); the source starts afresh.
    pub async fn unresumable(&self) -> Result<(), Ended> {
        tracing::warn!(upstream = %self.upstream.config.name, "upstream cannot resume; gap recorded");
        self.poll_metrics.gaps_unresumable.inc();
        self.write(None, None).await.map(drop)
    }

    /// Waits before the next attempt: `delay` (the source's backoff), or the upstream's
    /// `Retry-After` if longer. False when the topic was retired meanwhile.
    ///
    /// While the upstream fails within `upstream_grace`, no wait goes past the grace's end:
    /// the attempt there decides whether polls are told it is down (it asked for a longer
    /// `Retry-After`: then they are told at the grace's end). Once it is down, this topic
    /// waits for its turn to probe it (one probe every 1 to 2 s for the whole upstream, at most
    /// [`backoff::CAP`] away), whatever `delay` says. Either way a wait ends early, within half
    /// a second, when another topic of the upstream gets through.
    pub async fn pause(&self, delay: Duration) -> bool {
        self.poll_metrics.upstream_reconnects.inc();
        let asked = self
            .retry_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let now = Instant::now();
        // A trouble whose probes the upstream's other topics share: not a refusal.
        let outage = self.topic.upstream_state().filter(|t| t.refused.is_none());
        let mut grace_ends = None;
        let attempt = match outage {
            None => now + delay.max(asked),
            Some(t) if t.down => {
                let turn = self.upstream.outage.next_probe(now, now + backoff::CAP);
                turn.max(now + asked)
            }
            Some(t) => {
                let ends = t.since + self.upstream_grace;
                if now + asked > ends {
                    grace_ends = Some(ends);
                    now + asked
                } else {
                    (now + delay.max(asked)).min(ends)
                }
            }
        };
        let recovery = async {
            match outage {
                Some(_) => {
                    let seen = self.recoveries_seen.load(Ordering::SeqCst);
                    self.upstream.outage.recovery_after(seen).await;
                    tokio::time::sleep_until(now + asked).await;
                }
                None => std::future::pending().await,
            }
        };
        let mut recovery = std::pin::pin!(recovery);
        if let Some(at) = grace_ends {
            tokio::select! {
                () = self.topic.retired() => return false,
                () = &mut recovery => return true,
                () = tokio::time::sleep_until(at) => {
                    self.topic.upstream_down();
                    // Other nodes' waiting polls are told too.
                    self.announce_upstream();
                }
            }
        }
        tokio::select! {
            () = self.topic.retired() => false,
            () = recovery => true,
            () = tokio::time::sleep_until(attempt) => true,
        }
    }

    /// Publishes one message into the topic; `None` (over `max_message_bytes`) records a gap.
    /// `resume_from`: the upstream id a source resuming after this message starts from. An
    /// error ends the connection (the log did not take it; the source resumes from the last
    /// message it did take, or stops when fenced).
    pub async fn deliver(
        &self,
        id: Option<String>,
        payload: Option<Bytes>,
        content_type: &str,
        resume_from: Option<&str>,
    ) -> Result<(), Ended> {
        let Some(payload) = payload else {
            tracing::warn!(id = ?id, "oversized upstream message skipped; gap recorded");
            self.poll_metrics.gaps_oversized.inc();
            return self.write(None, resume_from).await.map(drop);
        };
        let message = NewMessage {
            id,
            content_type: Some(content_type.to_owned()),
            payload,
            arrived: Instant::now(),
        };
        if self.write(Some(message), resume_from).await? {
            self.poll_metrics.received.inc();
        }
        Ok(())
    }

    /// A message (or a gap) into the sink; whether it was new.
    async fn write(
        &self,
        message: Option<NewMessage>,
        resume_from: Option<&str>,
    ) -> Result<bool, Ended> {
        let log = match &self.sink {
            Sink::Log(log) => log,
            Sink::Topic => {
                return Ok(match message {
                    Some(m) => !self.topic.publish(m).duplicate,
                    None => {
                        self.topic.record_gap();
                        true
                    }
                });
            }
        };
        match log.append(message, resume_from).await {
            Ok(new) => Ok(new),
            Err(LogError::Fenced) => {
                tracing::warn!("another node owns this topic's source now; stopping");
                Err(Ended::Retired)
            }
            Err(LogError::Unavailable) => Err(Ended::Reconnect),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::HeaderValue;
    use prometheus::IntGauge;

    use crate::config::Config;
    use crate::hub::ring::BufferLimits;
    use crate::hub::{Hub, RouteTopics, TopicSettings, UpstreamProblem};
    use crate::metrics::Metrics;
    use crate::upstream::outage::PROBE_GAP;

    /// Feeds of `n` fresh topics of one upstream. The upstream is never asked: these tests
    /// drive the feeds' waits alone, on the paused clock.
    fn feeds(upstream_grace: Duration, n: usize) -> Vec<Feed> {
        let text = "[listeners.p]\naddress = \"127.0.0.1:0\"\n\
                    [upstreams.u]\nurl = \"http://127.0.0.1:1\"\n\
                    [routes.r]\npath = \"/r/{id}\"\nkind = \"poll\"\nauth = \"public\"\n\
                    source = { type = \"upstream-sse\", upstream = \"u\", path = \"/s/{id}\" }\n";
        let config = Config::from_toml(text, std::path::Path::new(".")).unwrap();
        let metrics = Metrics::new(&config);
        let settings = TopicSettings {
            limits: BufferLimits {
                messages: 10,
                bytes: 1 << 20,
                age: Duration::from_secs(300),
            },
            linger: Duration::from_secs(30),
            max_batch: 10,
            resume_on_gap: false,
            mirrored: false,
        };
        let gauge = IntGauge::new("t", "t").unwrap();
        let route = Arc::new(RouteTopics::new("r", settings, 10_000, gauge));
        let (hub, upstream) = (
            Hub::new(),
            Arc::new(Upstream::new(config.upstreams[0].clone())),
        );
        (0..n)
            .map(|i| Feed {
                upstream: upstream.clone(),
                topic: hub.subscribe(&route, &format!("t{i}")).unwrap().topic_arc(),
                upstream_grace,
                max_message_bytes: 1 << 20,
                poll_metrics: PollMetrics::new(&metrics, "r"),
                route_metrics: Arc::new(RouteMetrics::new(&metrics, "r", "poll")),
                connects: Arc::new(Semaphore::new(1)),
                retry_after: Mutex::default(),
                recoveries_seen: AtomicU64::default(),
                ended_empty: AtomicBool::default(),
                sink: Sink::Topic,
            })
            .collect()
    }

    fn feed(upstream_grace: Duration) -> Feed {
        feeds(upstream_grace, 1).pop().unwrap()
    }

    /// One attempt of a source, answered at once: a failure (a 500) before `recovers`, else a
    /// success. Whether it succeeded.
    fn attempt(feed: &Feed, started: Instant, recovers: Duration) -> bool {
        feed.attempt_begins();
        let ok = started.elapsed() >= recovers;
        feed.upstream_state(if ok { None } else { Some(Some(500)) });
        ok
    }

    /// Runs the sources of `feeds`, as upstream_stream and upstream_poll do (attempt, else
    /// pause on the backoff), against an upstream that fails until `recovers`. Each attempt's
    /// time, topic, and whether polls were then told the upstream is down.
    async fn outage(feeds: &[Feed], recovers: Duration) -> Vec<(Duration, usize, bool)> {
        let started = Instant::now();
        let attempts = Mutex::new(Vec::new());
        let sources = feeds.iter().enumerate().map(|(i, feed)| {
            let attempts = &attempts;
            async move {
                let mut backoff = super::backoff::Backoff::default();
                loop {
                    let ok = attempt(feed, started, recovers);
                    let down = feed.topic.upstream_problem() == Some(UpstreamProblem::Down);
                    attempts.lock().unwrap().push((started.elapsed(), i, down));
                    if ok {
                        return;
                    }
                    assert!(feed.pause(backoff.next(None)).await);
                }
            }
        });
        futures_util::future::join_all(sources).await;
        attempts.into_inner().unwrap()
    }

    /// `upstream_grace = "8s"` and an upstream failing for 5 s (or for just under the grace):
    /// polls are never told it is down, and every topic is back by the end of the grace.
    #[tokio::test(start_paused = true)]
    async fn an_outage_shorter_than_the_grace_never_reaches_polls() {
        let (grace, ms) = (Duration::from_secs(8), Duration::from_millis);
        for seed in 0..200 {
            fastrand::seed(seed);
            for recovers in [ms(5000), ms(7999)] {
                let feeds = feeds(grace, 3);
                let attempts = outage(&feeds, recovers).await;
                for (at, topic, down) in &attempts {
                    assert!(!down, "seed {seed}: topic {topic} down at {at:?}");
                }
                let last = attempts.iter().map(|a| a.0).max().unwrap();
                assert!(last <= grace, "seed {seed}: back only at {last:?}");
            }
        }
    }

    /// An upstream failing for 12 s behind an 8 s grace: polls are told it is down once an
    /// attempt fails after the grace; meanwhile it is probed once every 1 to 2 s for all its
    /// topics together; and every topic is back within 3 s of the upstream.
    #[tokio::test(start_paused = true)]
    async fn after_the_grace_probes_are_shared_and_recovery_reaches_every_topic_within_3s() {
        let (grace, recovers) = (Duration::from_secs(8), Duration::from_secs(12));
        for seed in 0..50 {
            fastrand::seed(seed);
            let feeds = feeds(grace, 10);
            let attempts = outage(&feeds, recovers).await;
            for (at, topic, down) in &attempts {
                let failed_after_grace = *at >= grace && *at < recovers;
                assert_eq!(
                    *down, failed_after_grace,
                    "seed {seed}: topic {topic} at {at:?}"
                );
            }
            // Each topic's attempt at the end of the grace, then the shared probes.
            let probes: Vec<Duration> = attempts
                .iter()
                .map(|a| a.0)
                .filter(|at| *at > grace && *at < recovers)
                .collect();
            for pair in probes.windows(2) {
                assert!(pair[1] - pair[0] >= PROBE_GAP.0, "seed {seed}: {probes:?}");
            }
            assert!(probes.len() <= 4, "seed {seed}: {probes:?}");
            let back = attempts.iter().map(|a| a.0).max().unwrap();
            assert!(
                back <= recovers + Duration::from_secs(3),
                "seed {seed}: back at {back:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_up_to_the_cap() {
        let asked = |value: &'static str| {
            let mut headers = HeaderMap::new();
            let value = HeaderValue::from_static(value);
            headers.insert(http::header::RETRY_AFTER, value);
            retry_after(&headers)
        };
        assert_eq!(asked("1"), Some(Duration::from_secs(1)));
        assert_eq!(asked(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(asked("100000"), Some(RETRY_AFTER_MAX));
        assert_eq!(asked("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(asked("-1"), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    /// What `sources_honour_retry_after` (tests/integration/sources.rs) sees over real
    /// sockets, to the millisecond: the attempt after a `Retry-After` waits at least that long.
    #[tokio::test(start_paused = true)]
    async fn a_pause_lasts_at_least_the_upstreams_retry_after_once() {
        let feed = feed(Duration::from_secs(60));
        let paused = async |asked: Option<Duration>, backoff: Duration| {
            *feed.retry_after.lock().unwrap() = asked;
            let started = Instant::now();
            assert!(feed.pause(backoff).await, "the topic is not retired");
            started.elapsed()
        };
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        assert_eq!(paused(Some(s(1)), ms(100)).await, s(1));
        assert_eq!(paused(None, ms(100)).await, ms(100));
        assert_eq!(
            paused(Some(s(1)), s(3)).await,
            s(3),
            "a longer backoff wins"
        );
        // A Retry-After is taken by the one pause after it.
        *feed.retry_after.lock().unwrap() = Some(s(1));
        let started = Instant::now();
        assert!(feed.pause(ms(100)).await);
        assert!(feed.pause(ms(100)).await);
        assert_eq!(started.elapsed(), ms(1100));
        // The same while the upstream fails, within its grace and once it is down.
        feed.upstream_state(Some(Some(503)));
        assert_eq!(paused(Some(s(1)), ms(100)).await, s(1));
        feed.topic.upstream_down();
        assert_eq!(paused(Some(s(40)), ms(100)).await, s(40));
    }

    /// What `outage_longer_than_grace_is_503_then_recovers` (tests/integration/sources.rs)
    /// relies on: no pause goes past the end of the grace, so the attempt there decides; and
    /// an upstream that asks (`Retry-After`) to be left alone for longer than the grace is
    /// down at the grace's end, waiting polls woken then, its `Retry-After` still honoured.
    #[tokio::test(start_paused = true)]
    async fn the_grace_ends_with_an_attempt_or_with_a_longer_retry_after() {
        let (grace, s) = (Duration::from_millis(300), Duration::from_secs);
        let feed = feed(grace);
        let failed = Instant::now();
        feed.upstream_state(Some(None));
        assert!(feed.pause(s(10)).await);
        assert_eq!(failed.elapsed(), grace, "the attempt at the grace's end");
        assert_eq!(
            feed.topic.upstream_problem(),
            None,
            "nothing said before it"
        );

        let feed = self::feed(grace);
        let failed = Instant::now();
        feed.upstream_state(Some(Some(503)));
        *feed.retry_after.lock().unwrap() = Some(s(10));
        let changed = feed.topic.changed();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        let pause = feed.pause(Duration::from_millis(100));
        let mut pause = std::pin::pin!(pause);
        tokio::select! {
            () = &mut changed => {}
            _ = &mut pause => panic!("the pause ended without waking the waiting polls"),
        }
        assert_eq!(failed.elapsed(), grace);
        let problem = feed.topic.upstream_problem();
        assert_eq!(problem, Some(UpstreamProblem::Down));
        assert!(pause.await);
        assert_eq!(failed.elapsed(), s(10));
        // Down, the upstream's Retry-After still comes before the next probe.
        *feed.retry_after.lock().unwrap() = Some(s(20));
        let started = Instant::now();
        assert!(feed.pause(Duration::ZERO).await);
        assert_eq!(started.elapsed(), s(20));
    }
}
