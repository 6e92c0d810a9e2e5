//! The `upstream-poll` source: one long-poll in flight per topic to a URL template that may use
//! `{cursor}`, the upstream's own position (at first empty, or the route's `initial_cursor`).
//! The upstream answers a JSON array of messages, or an object with the array at
//! `items_pointer`; each message's id (at `id_pointer`) becomes the next `{cursor}`, unless the
//! object names the position to continue from at `next_pointer` (CouchDB's `last_seq`).
//! 204 or an empty array: nothing new, ask again, but not sooner than `min_interval` after the
//! previous request began, so an endpoint that answers at once is not asked in a busy loop.
//!
//! Like every source, the request is built from config and the topic's validated parameters
//! only, and the task ends when the topic is retired.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::feed::{Ended, Feed};
use super::{Initial, scalar};
use crate::config::TopicTemplate;
use crate::metrics::GaugeGuard;

/// A response may carry this many messages of `max_message_bytes` at most.
pub const BATCH_MESSAGES_MAX: usize = 16;
/// The template parameter that carries the upstream's position.
pub const CURSOR_PARAM: &str = "cursor";

pub struct PollSource {
    /// The upstream's position to start from (cluster mode: where the previous owner of the
    /// topic's source stopped); empty: the start.
    pub resume_from: String,
    /// Path and query template over the topic's parameters and `{cursor}`.
    pub path: TopicTemplate,
    /// The topic's validated parameters.
    pub params: Vec<(String, String)>,
    pub id_pointer: String,
    pub items_pointer: Option<String>,
    pub next_pointer: Option<String>,
    pub min_interval: Duration,
    /// Where to start with nothing to resume from; `None`: an empty `{cursor}`.
    pub initial: Option<Initial>,
    pub feed: Feed,
}

impl PollSource {
    /// Runs until the topic is retired.
    pub async fn run(self) {
        let _open = GaugeGuard::new(self.feed.poll_metrics.subscriptions_active.clone());
        let mut backoff = Backoff::default();
        let mut cursor = self.resume_from.clone();
        loop {
            let started = Instant::now();
            let ended = match self.poll_once(&mut cursor).await {
                Ok(true) => {
                    backoff.reset();
                    continue;
                }
                Ok(false) => {
                    backoff.reset();
                    // Nothing new: not again before min_interval has passed.
                    tokio::select! {
                        () = self.feed.topic.retired() => return,
                        () = tokio::time::sleep_until(started + self.min_interval) => continue,
                    }
                }
                Err(ended) => ended,
            };
            match ended {
                Ended::Retired => return,
                Ended::Reconnect => {
                    if !self.feed.pause(backoff.next(None)).await {
                        return;
                    }
                }
            }
        }
    }

    /// One request; whether it brought anything new (messages, or a new position).
    async fn poll_once(&self, cursor: &mut String) -> Result<bool, Ended> {
        if cursor.is_empty()
            && let Some(initial) = &self.initial
        {
            *cursor = initial.cursor(&self.feed).await?;
        }
        let mut params = self.params.clone();
        params.push((CURSOR_PARAM.to_owned(), cursor.clone()));
        let path = self.path.render_path(&params);
        let Ok(path) = path.parse() else {
            tracing::error!(%path, "source path is not a valid URI path");
            return Err(Ended::Retired);
        };
        let req = Request::builder()
            .method(Method::GET)
            .uri(self.feed.upstream.uri_for(&path))
            .header(header::ACCEPT, HeaderValue::from_static("application/json"))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .map_err(|_| Ended::Reconnect)?;
        let resuming = !cursor.is_empty();
        let usable = |s: StatusCode| {
            s == StatusCode::OK
                || s == StatusCode::NO_CONTENT
                || (resuming && s == StatusCode::GONE)
        };
        let response = self.feed.request(req, usable).await?;
        match response.status() {
            StatusCode::NO_CONTENT => {
                self.feed.healthy();
                return Ok(false);
            }
            StatusCode::GONE => {
                self.feed.healthy();
                // The upstream no longer knows our cursor: start afresh after a gap.
                cursor.clear();
                self.feed.unresumable().await?;
                return Ok(true);
            }
            _ => {}
        }
        let limit = self
            .feed
            .max_message_bytes
            .saturating_mul(BATCH_MESSAGES_MAX);
        let collected = tokio::select! {
            () = self.feed.topic.retired() => return Err(Ended::Retired),
            c = Limited::new(response.into_body(), limit).collect() => c,
        };
        let Ok(body) = collected else {
            tracing::warn!(
                limit,
                "upstream poll answer unreadable or over the limit; retrying"
            );
            self.feed.unusable();
            return Err(Ended::Reconnect);
        };
        let Ok(value) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            tracing::warn!("upstream poll answer is not JSON; retrying");
            self.feed.unusable();
            return Err(Ended::Reconnect);
        };
        let items = match &self.items_pointer {
            None => value.as_array(),
            Some(p) => value.pointer(p).and_then(Value::as_array),
        };
        let Some(items) = items else {
            tracing::warn!("upstream poll answer has no array of messages; retrying");
            self.feed.unusable();
            return Err(Ended::Reconnect);
        };
        self.feed.healthy();
        // Where the upstream says to continue, beside its messages.
        let next = self.next_pointer.as_ref().and_then(|p| {
            let next = value.pointer(p).and_then(scalar);
            if next.is_none() {
                tracing::warn!(pointer = %p, "upstream poll answer names no next position");
            }
            next
        });
        let last = items.len().checked_sub(1);
        for (i, item) in items.iter().enumerate() {
            let id = item.pointer(&self.id_pointer).and_then(scalar);
            let json = serde_json::to_vec(item).unwrap_or_default();
            let payload = (json.len() <= self.feed.max_message_bytes).then(|| json.into());
            let resume = match (&next, Some(i) == last) {
                (Some(next), true) => next.clone(),
                _ => id.clone().unwrap_or_else(|| cursor.clone()),
            };
            self.feed
                .deliver(id, payload, "application/json", Some(&resume))
                .await?;
            // Only what was taken moves the cursor: a source that could not log a message
            // asks for it again.
            *cursor = resume;
        }
        let moved = match next {
            Some(next) if items.is_empty() && next != *cursor => {
                *cursor = next;
                true
            }
            _ => false,
        };
        Ok(!items.is_empty() || moved)
    }
}
