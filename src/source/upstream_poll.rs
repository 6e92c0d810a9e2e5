//! The `upstream-poll` source: one long-poll in flight per topic to a URL template that may use
//! `{cursor}`, the upstream's own position (empty at first). The upstream answers a JSON array of
//! messages, or an object with the array at `items_pointer`; each message's id (at
//! `id_pointer`) becomes the next `{cursor}`. 204 or an empty array: nothing new, ask again.
//!
//! Like every source, the request is built from config and the topic's validated parameters
//! only, and the task ends when the topic is retired.

use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;

use super::backoff::Backoff;
use super::feed::{Ended, Feed};
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
    pub feed: Feed,
}

impl PollSource {
    /// Runs until the topic is retired.
    pub async fn run(self) {
        let _open = GaugeGuard::new(self.feed.poll_metrics.subscriptions_active.clone());
        let mut backoff = Backoff::default();
        let mut cursor = self.resume_from.clone();
        loop {
            match self.poll_once(&mut cursor).await {
                Ok(()) => backoff.reset(),
                Err(Ended::Retired) => return,
                Err(Ended::Reconnect) => {
                    if !self.feed.pause(backoff.next(None)).await {
                        return;
                    }
                }
            }
        }
    }

    async fn poll_once(&self, cursor: &mut String) -> Result<(), Ended> {
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
            StatusCode::NO_CONTENT => return Ok(()),
            StatusCode::GONE => {
                // The upstream no longer knows our cursor: start afresh after a gap.
                cursor.clear();
                return self.feed.unresumable().await;
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
            return Err(Ended::Reconnect);
        };
        let Ok(value) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            tracing::warn!("upstream poll answer is not JSON; retrying");
            return Err(Ended::Reconnect);
        };
        let items = match &self.items_pointer {
            None => value.as_array(),
            Some(p) => value.pointer(p).and_then(Value::as_array),
        };
        let Some(items) = items else {
            tracing::warn!("upstream poll answer has no array of messages; retrying");
            return Err(Ended::Reconnect);
        };
        for item in items {
            let id = item.pointer(&self.id_pointer).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            let json = serde_json::to_vec(item).unwrap_or_default();
            let payload = (json.len() <= self.feed.max_message_bytes).then(|| json.into());
            let next = id.clone().unwrap_or_else(|| cursor.clone());
            self.feed
                .deliver(id, payload, "application/json", Some(&next))
                .await?;
            // Only what was taken moves the cursor: a source that could not log a message
            // asks for it again.
            *cursor = next;
        }
        Ok(())
    }
}
