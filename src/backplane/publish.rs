//! Appending to a topic's log: a publish (from any node), or a leased source's message or gap
//! (from the node that owns the source, fenced by its lease).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::scripts::{Keys, fresh_epoch};
use super::{
    Backplane, BackplaneError, META_TTL, RETRY_FIRST, RETRY_MAX, jittered, link, millis,
    parse_epoch,
};
use crate::hub::cursor::{self, Cursor};
use crate::hub::{DEDUPE_WINDOW, NewMessage, Published, Remote, RemoteBody, RouteTopics};

/// What goes into a log.
pub struct Append {
    /// A message, or `None` for a gap (a source that could not resume, a message over the
    /// size bound).
    pub message: Option<NewMessage>,
    /// A leased source's: the lease token the log checks, and the upstream id a new owner
    /// would resume from.
    pub fence: Option<String>,
    pub resume_from: Option<String>,
}

impl Backplane {
    /// Appends `message` to the log of `topic` of `route`, once: a `Message-Id` already
    /// logged (by any node) answers with that message's cursor. Redis trouble is retried
    /// until it has lasted `backplane_grace`.
    pub async fn publish(
        self: &Arc<Self>,
        route: &Arc<RouteTopics>,
        topic: &str,
        message: NewMessage,
    ) -> Result<Published, BackplaneError> {
        let append = Append {
            message: Some(message),
            fence: None,
            resume_from: None,
        };
        self.append(route, topic, append).await
    }

    /// Appends on the backplane's own runtime (a publish from the admin listener's runtime
    /// must not drive the shared connection from there).
    pub async fn append(
        self: &Arc<Self>,
        route: &Arc<RouteTopics>,
        topic: &str,
        append: Append,
    ) -> Result<Published, BackplaneError> {
        let (this, route, topic) = (self.clone(), route.clone(), topic.to_owned());
        self.runtime
            .spawn(async move { this.append_here(&route, &topic, append).await })
            .await
            .unwrap_or_else(|e| Err(BackplaneError::Refused(e.to_string())))
    }

    async fn append_here(
        &self,
        route: &RouteTopics,
        topic: &str,
        append: Append,
    ) -> Result<Published, BackplaneError> {
        let keys = Keys::new(&self.config.prefix, &route.name, topic);
        let firehose = super::firehose_of(&self.config, &route.name, topic);
        let message = append.message.as_ref();
        let id = message.and_then(|m| m.id.as_deref());
        // Without a Message-Id the request's own key de-duplicates its retries; a request
        // whose answer never came may have been logged, and is retried for the grace.
        let (dedupe_key, dedupe_ttl) = match id {
            Some(id) => (keys.message_id(id), DEDUPE_WINDOW),
            None => (
                keys.request(fastrand::u64(..)),
                self.grace + Duration::from_secs(30),
            ),
        };
        let limits = route.settings.limits;
        let empty = Bytes::new();
        let payload = message.map_or(&empty, |m| &m.payload);
        let mut invocation = self.scripts.publish.key(&keys.meta);
        invocation
            .key(&keys.log)
            .key(&firehose)
            .key(&dedupe_key)
            .key(&keys.lease)
            .arg(&payload[..])
            .arg(
                message
                    .and_then(|m| m.content_type.as_deref())
                    .unwrap_or(""),
            )
            .arg(id.unwrap_or(""))
            .arg(if message.is_some() { "0" } else { "1" })
            .arg(limits.messages.max(1))
            .arg(millis(limits.age.max(Duration::from_secs(1))))
            .arg(millis(META_TTL))
            .arg(millis(self.config.firehose_retention))
            .arg(&*route.name)
            .arg(topic)
            .arg(fresh_epoch())
            .arg(millis(dedupe_ttl))
            .arg(append.fence.as_deref().unwrap_or(""))
            .arg(append.resume_from.as_deref().unwrap_or(""));
        let mut pause = RETRY_FIRST;
        let (epoch, seq, duplicate, origin) = loop {
            match self
                .eval::<(String, String, u8, u64)>("publish", &invocation)
                .await
            {
                Ok(reply) => break reply,
                Err(e) if e.code() == Some("NOTOWNER") => return Err(BackplaneError::Fenced),
                Err(e) if link::connection_broken(&e) => {
                    if self.health.failed() >= self.grace {
                        return Err(BackplaneError::Unreachable);
                    }
                    tokio::time::sleep(jittered(pause)).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(BackplaneError::Refused(e.to_string())),
            }
        };
        let (Some(epoch), Ok(seq)) = (parse_epoch(&epoch), seq.parse::<u64>()) else {
            return Err(BackplaneError::Refused(format!(
                "the publish script answered epoch {epoch:?}, position {seq:?}"
            )));
        };
        let cursor = Cursor {
            binding: cursor::binding(&route.name, topic),
            epoch,
            seq,
        }
        .encode();
        let logged_before = duplicate == 1;
        // A retry of this very request that found its first attempt logged is not a duplicate
        // to the publisher; either way the entry is in the log already, with its own time, and
        // the announcements bring it.
        let duplicate = logged_before && id.is_some();
        let stored = payload.len() <= limits.bytes;
        if duplicate {
            let dedupe = &self.metrics.backplane.dedupe;
            dedupe.with_label_values(&[&route.name]).inc();
        }
        if !logged_before && let Some(t) = self.hub.find(&route.name, topic) {
            // This node's readers need not wait for the announcement; when this is not the
            // next position, the announcements bring it in order.
            let body = append.message.map_or(RemoteBody::Gap, RemoteBody::Message);
            t.apply(epoch, Remote { seq, origin, body });
        }
        Ok(Published {
            cursor,
            duplicate,
            stored,
        })
    }
}
