//! The streaming upstream sources, one long `GET` per topic:
//! - `upstream-sse`: `Accept: text/event-stream`; each event is a message (its `id:` the
//!   upstream id); reconnects send `Last-Event-ID`.
//! - `upstream-ndjson`: each line is a JSON message, its upstream id read by JSON pointer;
//!   reconnects pass the last id as the route's resume query parameter (replacing one the
//!   path already has), and the first request the route's `initial_cursor` if it has one.
//!
//! An SSE answer that is not `text/event-stream`, and a stream that ends (or breaks) before
//! sending anything, are the upstream's trouble like a refusal: they count toward
//! `upstream_grace`, so clients of a wrong endpoint are told rather than answered empty.
//!
//! Reconnects wait a full-jitter backoff (honouring SSE `retry:`); a stream silent for
//! `idle_timeout` is reconnected. The request is built from the route's config and the topic's
//! validated parameters only ([`StreamSource`] has no access to any client request); the
//! upstream's own configured headers are added by [`Upstream::send`](crate::upstream::Upstream::send). The task ends when the
//! topic is retired (no poll for `linger`), closing the upstream request.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};

use bytes::Bytes;

use super::backoff::Backoff;
use super::feed::{Ended, Feed};
use super::{Initial, ndjson, sse, with_query_param};
use crate::config::StreamFormat;
use crate::metrics::GaugeGuard;
use crate::upstream::BoxError;

/// Room for field names, ids and comments on top of the largest message a line may carry;
/// a longer line makes its event oversized.
pub const LINE_OVERHEAD_BYTES: usize = 64 * 1024;

/// Everything one topic's streaming source needs; nothing from any client.
pub struct StreamSource {
    /// The upstream id to resume from (cluster mode: where the previous owner of the topic's
    /// source stopped).
    pub resume_from: Option<String>,
    pub format: StreamFormat,
    /// Path and query on the upstream, rendered from the route's template.
    pub path: String,
    pub idle_timeout: Duration,
    /// NDJSON: where to start with nothing to resume from.
    pub initial: Option<Initial>,
    pub feed: Feed,
}

impl StreamSource {
    /// Runs until the topic is retired.
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        let mut last_id: Option<String> = self.resume_from.clone();
        let mut asked_retry: Option<Duration> = None;
        loop {
            match self
                .connect_once(&mut last_id, &mut asked_retry, &mut backoff)
                .await
            {
                Ended::Retired => return,
                Ended::Reconnect => {}
            }
            if !self.feed.pause(backoff.next(asked_retry)).await {
                return;
            }
        }
    }

    async fn connect_once(
        &self,
        last_id: &mut Option<String>,
        asked_retry: &mut Option<Duration>,
        backoff: &mut Backoff,
    ) -> Ended {
        let mut path = self.path.clone();
        let mut req = Request::builder()
            .method(Method::GET)
            .header(header::CACHE_CONTROL, "no-cache");
        if last_id.is_none()
            && let Some(initial) = &self.initial
        {
            match initial.cursor(&self.feed).await {
                Ok(cursor) => *last_id = Some(cursor),
                Err(ended) => return ended,
            }
        }
        match &self.format {
            StreamFormat::Sse { .. } => {
                req = req.header(header::ACCEPT, "text/event-stream");
                if let Some(id) = last_id
                    .as_deref()
                    .and_then(|i| HeaderValue::from_str(i).ok())
                {
                    req = req.header("last-event-id", id);
                }
            }
            StreamFormat::Ndjson { resume_param, .. } => {
                req = req.header(header::ACCEPT, "application/x-ndjson");
                if let Some(id) = last_id.as_deref() {
                    path = with_query_param(&path, resume_param, id);
                }
            }
        }
        let Ok(path) = path.parse() else {
            tracing::error!(%path, "source path is not a valid URI path");
            return Ended::Retired;
        };
        let req = req.uri(self.feed.upstream.uri_for(&path));
        let body = Empty::new().map_err(|never| match never {}).boxed();
        let Ok(req) = req.body(body) else {
            return Ended::Reconnect;
        };
        let resuming = last_id.is_some();
        let usable = |s| s == StatusCode::OK || (resuming && s == StatusCode::GONE);
        let media = matches!(self.format, StreamFormat::Sse { .. }).then_some("text/event-stream");
        let response = match self.feed.open_stream(req, usable, media).await {
            Ok(r) => r,
            Err(ended) => return ended,
        };
        if response.status() == StatusCode::GONE {
            // 410 to a resume: the upstream no longer has what followed our last id.
            *last_id = None;
            return match self.feed.unresumable().await {
                Ok(()) => Ended::Reconnect,
                Err(ended) => ended,
            };
        }
        let _open = GaugeGuard::new(self.feed.poll_metrics.subscriptions_active.clone());
        let mut body = response.into_body();
        let max_bytes = self.feed.max_message_bytes;
        let mut decoder = match &self.format {
            StreamFormat::Sse { json } => Decoder::Sse(
                sse::Decoder::resuming(max_bytes + LINE_OVERHEAD_BYTES, max_bytes, last_id.clone()),
                *json,
            ),
            StreamFormat::Ndjson { id_pointer, .. } => {
                Decoder::Ndjson(ndjson::Decoder::new(max_bytes, id_pointer))
            }
        };
        let mut items = Vec::new();
        // The resume id of the last message delivered.
        let mut logged = last_id.clone();
        let mut sent_anything = false;
        let ended = loop {
            let frame = tokio::select! {
                () = self.feed.topic.retired() => break Ended::Retired,
                f = tokio::time::timeout(self.idle_timeout, body.frame()) => f,
            };
            let data = match frame {
                Err(_) => {
                    tracing::debug!(path = %self.path, "event stream silent; reconnecting");
                    if !sent_anything {
                        // Held open, however quiet: not a stream that ends at once.
                        self.feed.streaming();
                    }
                    break Ended::Reconnect;
                }
                Ok(None) => {
                    if !sent_anything {
                        self.feed.stream_ended_empty();
                    }
                    break Ended::Reconnect;
                }
                Ok(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "event stream broke; reconnecting");
                    if !sent_anything {
                        self.feed.stream_ended_empty();
                    }
                    break Ended::Reconnect;
                }
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            if !sent_anything && !data.is_empty() {
                sent_anything = true;
                self.feed.streaming();
            }
            let well_formed = decoder.feed(&data, &mut items);
            let mut refused = None;
            for item in items.drain(..) {
                let resume = resume_id(&self.format, item.id.as_deref());
                let resume = resume.or(logged.as_deref()).map(str::to_owned);
                match self
                    .feed
                    .deliver(item.id, item.payload, item.content_type, resume.as_deref())
                    .await
                {
                    Ok(()) => logged = resume,
                    Err(ended) => {
                        refused = Some(ended);
                        break;
                    }
                }
                backoff.reset();
            }
            if let Some(ended) = refused {
                // Resume from the last message the log took, not from what was decoded.
                *last_id = logged;
                *asked_retry = decoder.retry().or(*asked_retry);
                return ended;
            }
            if !well_formed {
                tracing::warn!(path = %self.path, "malformed upstream stream; reconnecting");
                break Ended::Reconnect;
            }
        };
        *last_id = decoder.last_id().map(str::to_owned).or(last_id.take());
        *asked_retry = decoder.retry().or(*asked_retry);
        ended
    }
}

/// The id an upstream resumes after `id`: for SSE, the id in force when the event came (an
/// event without an id of its own is delivered as `ID#n`, the n-th after `ID`).
fn resume_id<'a>(format: &StreamFormat, id: Option<&'a str>) -> Option<&'a str> {
    let id = id?;
    match format {
        StreamFormat::Sse { .. } => Some(match id.rsplit_once('#') {
            Some((in_force, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                in_force
            }
            _ => id,
        }),
        StreamFormat::Ndjson { .. } => Some(id),
    }
}

/// One message out of a stream, whatever its format.
struct Item {
    id: Option<String>,
    /// `None`: over the size limit, skipped.
    payload: Option<Bytes>,
    content_type: &'static str,
}

enum Decoder {
    /// With whether each event's data is JSON (`data = "json"`).
    Sse(sse::Decoder, bool),
    Ndjson(ndjson::Decoder),
}

impl Decoder {
    /// Decodes a chunk into `out` (what came before a malformed part included); false when
    /// the stream is malformed.
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<Item>) -> bool {
        match self {
            Decoder::Sse(d, json) => {
                let mut events = Vec::new();
                let ok = d.feed(chunk, &mut events).is_ok();
                out.extend(events.into_iter().map(|e| {
                    let embedded = *json
                        && e.data.as_ref().is_some_and(|data| {
                            let valid = serde_json::from_str::<serde::de::IgnoredAny>(data).is_ok();
                            if !valid {
                                tracing::warn!(id = ?e.id, "an event's data is not JSON; delivered as text");
                            }
                            valid
                        });
                    Item {
                        id: e.id,
                        payload: e.data.map(Bytes::from),
                        content_type: if embedded {
                            "application/json"
                        } else {
                            "text/plain; charset=utf-8"
                        },
                    }
                }));
                ok
            }
            Decoder::Ndjson(d) => {
                let mut lines = Vec::new();
                let ok = d.feed(chunk, &mut lines).is_ok();
                out.extend(lines.into_iter().map(|l| Item {
                    id: l.id,
                    payload: l.json,
                    content_type: "application/json",
                }));
                ok
            }
        }
    }

    fn last_id(&self) -> Option<&str> {
        match self {
            Decoder::Sse(d, _) => d.last_id(),
            Decoder::Ndjson(d) => d.last_id(),
        }
    }

    /// The reconnection delay the stream asked for (SSE `retry:`).
    fn retry(&self) -> Option<Duration> {
        match self {
            Decoder::Sse(d, _) => d.retry_ms().map(Duration::from_millis),
            Decoder::Ndjson(_) => None,
        }
    }
}
