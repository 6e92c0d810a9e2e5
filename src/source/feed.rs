//! What every upstream source of a topic shares: the upstream and the topic it feeds, the
//! connect gate, metrics and the upstream-health bookkeeping that turns outages into answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use crate::hub::{NewMessage, Topic};
use crate::metrics::{PollMetrics, RouteMetrics, UpstreamResult};
use crate::upstream::{Body, Upstream, UpstreamError};

/// How a source's attempt ended.
pub enum Ended {
    /// The topic was retired: the source stops.
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
}

/// A `Retry-After` longer than this is taken as this: a source must keep trying.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

impl Feed {
    /// Sends `req` through the connect gate. An answer whose status `usable` accepts clears
    /// the topic's upstream trouble; anything else is recorded as trouble (a 404, 401 or 403
    /// reaches waiting polls at once) and is `Err(Ended::Reconnect)`.
    pub async fn request(
        &self,
        req: Request<Body>,
        usable: impl Fn(StatusCode) -> bool,
    ) -> Result<Response<Incoming>, Ended> {
        let started = Instant::now();
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
        let class = match &response {
            Ok(r) => UpstreamResult::Status(r.status().as_u16()),
            Err(UpstreamError::Timeout) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        };
        self.route_metrics.upstream(class, started.elapsed());
        let upstream = &self.upstream.config.name;
        match response {
            Ok(r) if usable(r.status()) => {
                self.topic.upstream_ok();
                Ok(r)
            }
            Ok(r) => {
                tracing::warn!(%upstream, status = %r.status(), "upstream refused the source's request");
                let asked = r
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .map(|secs| Duration::from_secs(secs).min(RETRY_AFTER_MAX));
                *self.retry_after.lock().unwrap_or_else(|p| p.into_inner()) = asked;
                self.topic
                    .upstream_failed(Some(r.status().as_u16()), Instant::now());
                Err(Ended::Reconnect)
            }
            Err(e) => {
                tracing::warn!(%upstream, error = %e, "source request failed");
                self.topic.upstream_failed(None, Instant::now());
                Err(Ended::Reconnect)
            }
        }
    }

    /// The upstream answered 410 to a resume: messages after the last id are lost to us.
    /// Readers behind this point get 410 (or `gap: true`); the source starts afresh.
    pub fn unresumable(&self) {
        tracing::warn!(upstream = %self.upstream.config.name, "upstream cannot resume; gap recorded");
        self.poll_metrics.gaps_unresumable.inc();
        self.topic.record_gap();
    }

    /// Waits `delay` (or the upstream's `Retry-After`, if longer) before the next attempt, waking waiting polls if the outage outlasts the
    /// grace meanwhile (so they answer 503 then, not at the next attempt). False when the
    /// topic was retired.
    pub async fn pause(&self, delay: Duration) -> bool {
        self.poll_metrics.upstream_reconnects.inc();
        let asked = self
            .retry_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let delay = delay.max(asked.unwrap_or_default());
        let now = Instant::now();
        let until = now + delay;
        let grace_ends = self
            .topic
            .failing_since()
            .map(|since| since + self.upstream_grace);
        if let Some(at) = grace_ends.filter(|at| *at > now && *at < until) {
            tokio::select! {
                () = self.topic.retired() => return false,
                () = tokio::time::sleep_until(at) => self.topic.wake(),
            }
        }
        tokio::select! {
            () = self.topic.retired() => false,
            () = tokio::time::sleep_until(until) => true,
        }
    }

    /// Publishes one message into the topic; `None` (over `max_message_bytes`) records a gap.
    pub fn deliver(&self, id: Option<String>, payload: Option<Bytes>, content_type: &str) {
        let Some(payload) = payload else {
            tracing::warn!(id = ?id, "oversized upstream message skipped; gap recorded");
            self.poll_metrics.gaps_oversized.inc();
            self.topic.record_gap();
            return;
        };
        let message = NewMessage {
            id,
            content_type: Some(content_type.to_owned()),
            payload,
            arrived: Instant::now(),
        };
        if !self.topic.publish(message).duplicate {
            self.poll_metrics.received.inc();
        }
    }
}
