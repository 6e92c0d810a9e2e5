//! The `upstream-sse` source: one `GET` with `Accept: text/event-stream` per topic; each event
//! is a message (its `id:` the upstream id). Reconnects send `Last-Event-ID` and wait a
//! full-jitter backoff (honouring `retry:`); a stream silent for `idle_timeout` is reconnected.
//!
//! The request is built from the route's config and the topic's validated parameters only
//! ([`SseSource`] has no access to any client request); the upstream's own configured headers
//! are added by [`Upstream::send`]. The task ends when the topic is retired (no poll for
//! `linger`), closing the upstream request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::sync::Semaphore;

use super::backoff::Backoff;
use super::sse::{Decoder, Event};
use crate::hub::{NewMessage, Topic};
use crate::metrics::{GaugeGuard, PollMetrics, RouteMetrics, UpstreamResult};
use crate::upstream::{BoxError, Upstream};

/// Room for field names, ids and comments on top of the largest message a line may carry;
/// a longer line makes its event oversized.
pub const LINE_OVERHEAD_BYTES: usize = 64 * 1024;

/// Everything one topic's source needs; nothing from any client.
pub struct SseSource {
    pub upstream: Arc<Upstream>,
    /// Path and query on the upstream, rendered from the route's template.
    pub path: String,
    pub idle_timeout: Duration,
    /// Polls learn of an outage once it is this old (503).
    pub upstream_grace: Duration,
    pub max_message_bytes: usize,
    pub topic: Arc<Topic>,
    pub poll_metrics: PollMetrics,
    pub route_metrics: Arc<RouteMetrics>,
    /// Process-wide cap on upstream connects in progress, so an outage's reconnects queue.
    pub connects: Arc<Semaphore>,
}

/// How one connection ended.
enum Ended {
    Retired,
    Reconnect,
}

impl SseSource {
    /// Runs until the topic is retired.
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        let mut last_id: Option<String> = None;
        let mut asked_retry: Option<Duration> = None;
        loop {
            match self
                .connect_once(&mut last_id, &mut asked_retry, &mut backoff)
                .await
            {
                Ended::Retired => return,
                Ended::Reconnect => {}
            }
            self.poll_metrics.upstream_reconnects.inc();
            let now = tokio::time::Instant::now();
            let until = now + backoff.next(asked_retry);
            // Waiting polls must hear of an outage when it outlasts the grace, not at the next
            // attempt.
            let grace_ends = self
                .topic
                .failing_since()
                .map(|since| tokio::time::Instant::from_std(since + self.upstream_grace));
            if let Some(at) = grace_ends.filter(|at| *at > now && *at < until) {
                tokio::select! {
                    () = self.topic.retired() => return,
                    () = tokio::time::sleep_until(at) => self.topic.wake(),
                }
            }
            tokio::select! {
                () = self.topic.retired() => return,
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn connect_once(
        &self,
        last_id: &mut Option<String>,
        asked_retry: &mut Option<Duration>,
        backoff: &mut Backoff,
    ) -> Ended {
        let Ok(path) = self.path.parse() else {
            tracing::error!(path = %self.path, "source path is not a valid URI path");
            return Ended::Retired;
        };
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(self.upstream.uri_for(&path))
            .header(header::ACCEPT, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache");
        if let Some(id) = last_id
            .as_deref()
            .and_then(|i| HeaderValue::from_str(i).ok())
        {
            req = req.header("last-event-id", id);
        }
        let body = Empty::new().map_err(|never| match never {}).boxed();
        let Ok(req) = req.body(body) else {
            return Ended::Reconnect;
        };
        let started = Instant::now();
        let response = {
            let permit = tokio::select! {
                () = self.topic.retired() => return Ended::Retired,
                p = self.connects.acquire() => p,
            };
            let sent = tokio::select! {
                () = self.topic.retired() => return Ended::Retired,
                r = self.upstream.send(req) => r,
            };
            drop(permit);
            sent
        };
        let class = match &response {
            Ok(r) => UpstreamResult::Status(r.status().as_u16()),
            Err(crate::upstream::UpstreamError::Timeout) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        };
        self.route_metrics.upstream(class, started.elapsed());
        let response = match response {
            Ok(r) if r.status() == StatusCode::OK => r,
            Ok(r) => {
                tracing::warn!(upstream = %self.upstream.config.name, status = %r.status(), "upstream refused the event stream");
                let status = r.status().as_u16();
                self.topic.upstream_failed(Some(status), Instant::now());
                return Ended::Reconnect;
            }
            Err(e) => {
                tracing::warn!(upstream = %self.upstream.config.name, error = %e, "upstream event stream failed");
                self.topic.upstream_failed(None, Instant::now());
                return Ended::Reconnect;
            }
        };
        self.topic.upstream_ok();
        let _open = GaugeGuard::new(self.poll_metrics.subscriptions_active.clone());
        let mut body = response.into_body();
        let max_line = self.max_message_bytes + LINE_OVERHEAD_BYTES;
        let mut decoder = Decoder::new(max_line, self.max_message_bytes);
        let mut events = Vec::new();
        let ended = loop {
            let frame = tokio::select! {
                () = self.topic.retired() => break Ended::Retired,
                f = tokio::time::timeout(self.idle_timeout, body.frame()) => f,
            };
            let data = match frame {
                Err(_) => {
                    tracing::debug!(path = %self.path, "event stream silent; reconnecting");
                    break Ended::Reconnect;
                }
                Ok(None) => break Ended::Reconnect,
                Ok(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "event stream broke; reconnecting");
                    break Ended::Reconnect;
                }
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            if let Err(e) = decoder.feed(&data, &mut events) {
                tracing::warn!(error = %e, path = %self.path, "malformed event stream; reconnecting");
                break Ended::Reconnect;
            }
            for event in events.drain(..) {
                self.deliver(event);
                backoff.reset();
            }
        };
        *last_id = decoder.last_id().map(str::to_owned).or(last_id.take());
        *asked_retry = decoder
            .retry_ms()
            .map(Duration::from_millis)
            .or(*asked_retry);
        ended
    }

    fn deliver(&self, event: Event) {
        let Some(data) = event.data else {
            // Over max_message_bytes: dropped, and readers are told they missed something.
            tracing::warn!(path = %self.path, id = ?event.id, "oversized event skipped; gap recorded");
            self.topic.record_gap();
            return;
        };
        let message = NewMessage {
            id: event.id,
            content_type: Some("text/plain; charset=utf-8".into()),
            payload: data.into(),
            arrived: Instant::now(),
        };
        if !self.topic.publish(message).duplicate {
            self.poll_metrics.received.inc();
        }
    }
}
