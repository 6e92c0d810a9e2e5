//! Leases: the node that holds a topic's lease runs its upstream source for the whole cluster.
//! Taken with `SET NX` semantics and a fencing token (a counter of acquisitions) that the log
//! checks on every append, renewed every third of `lease_ttl`, given up when the topic ends
//! here. An owner that cannot renew in time stops its source; one paused past its lease
//! cannot append, because its token is no longer the lease's.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use super::publish::Append;
use super::scripts::Keys;
use super::{Backplane, BackplaneError, millis};
use crate::hub::{NewMessage, RouteTopics, UpstreamTrouble};

/// A topic's lease, held by this node.
pub struct Lease {
    backplane: Arc<Backplane>,
    route: Arc<RouteTopics>,
    topic: String,
    keys: Keys,
    token: String,
    /// Where the source resumes: the upstream id logged with the topic's last message.
    pub resume_from: Option<String>,
}

impl Backplane {
    /// How long a node without a topic's lease waits before trying to take it again: a third
    /// of its time to live, jittered.
    pub fn lease_retry(&self) -> Duration {
        super::jittered(self.lease_ttl / 3)
    }

    /// Takes the lease of `topic` of `route` if no node holds it (or Redis does not answer:
    /// then `None` too, and the caller tries again later).
    pub async fn acquire(self: &Arc<Self>, route: &Arc<RouteTopics>, topic: &str) -> Option<Lease> {
        let keys = Keys::new(&self.config.prefix, &route.name, topic);
        let mut invocation = self.scripts.acquire.key(&keys.lease);
        invocation
            .key(&keys.fence)
            .key(&keys.meta)
            .arg(&self.node)
            .arg(millis(self.lease_ttl))
            .arg(millis(super::META_TTL));
        let (token, resume) = match self.eval::<Value>("lease", &invocation).await {
            Ok(Value::Array(reply)) => match reply.as_slice() {
                [Value::BulkString(t), Value::BulkString(u)] => (
                    String::from_utf8(t.clone()).ok()?,
                    String::from_utf8(u.clone()).ok(),
                ),
                _ => return None,
            },
            _ => return None,
        };
        self.lease_event(&route.name, "acquired");
        self.metrics
            .backplane
            .leases_held
            .with_label_values(&[&route.name])
            .inc();
        tracing::info!(route = %route.name, %topic, %token, "took the topic's lease: running its source");
        Some(Lease {
            backplane: self.clone(),
            route: route.clone(),
            topic: topic.to_owned(),
            keys,
            token,
            resume_from: resume.filter(|u| !u.is_empty()),
        })
    }

    fn lease_event(&self, route: &str, event: &str) {
        let transitions = &self.metrics.backplane.lease_transitions;
        transitions.with_label_values(&[route, event]).inc();
    }
}

impl Lease {
    /// Renews the lease every third of its time to live. Completes when the lease is lost:
    /// another node holds it, or it could not be renewed before it would have expired (by
    /// this node's clock, with a third of the time to live to spare).
    pub async fn keep(&self) {
        let bp = &self.backplane;
        let ttl = bp.lease_ttl;
        // The lease runs until a third of its time to live before `renewed + ttl`, by this
        // node's clock; `renewed` is when the last successful renewal was sent.
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(ttl / 3).await;
            let deadline = renewed + ttl - ttl / 3;
            let sent = Instant::now();
            let mut invocation = bp.scripts.renew.key(&self.keys.lease);
            invocation.arg(&self.token).arg(millis(ttl));
            let renewal = bp.eval::<i64>("lease", &invocation);
            match tokio::time::timeout_at(deadline, renewal).await {
                Ok(Ok(1)) => renewed = sent,
                Ok(Ok(_)) => {
                    bp.lease_event(&self.route.name, "lost");
                    tracing::warn!(route = %self.route.name, topic = %self.topic, "the topic's lease was taken over: stopping its source");
                    return;
                }
                Ok(Err(_)) if Instant::now() < deadline => {}
                Ok(Err(_)) | Err(_) => {
                    bp.lease_event(&self.route.name, "renewal_failed");
                    tracing::warn!(route = %self.route.name, topic = %self.topic, "the topic's lease could not be renewed in time: stopping its source");
                    return;
                }
            }
        }
    }

    /// Appends a message (`None`: a gap) with the upstream id to resume from, fenced by this
    /// lease; whether it was new.
    pub async fn append(
        &self,
        message: Option<NewMessage>,
        resume_from: Option<&str>,
    ) -> Result<bool, BackplaneError> {
        let append = Append {
            message,
            fence: Some(self.token.clone()),
            resume_from: resume_from.map(str::to_owned),
        };
        let result = self
            .backplane
            .append(&self.route, &self.topic, append)
            .await;
        if matches!(result, Err(BackplaneError::Fenced)) {
            self.backplane.lease_event(&self.route.name, "fenced");
        }
        result.map(|p| !p.duplicate)
    }

    /// Records the topic's upstream state (`None`: healthy; else failing since, its last
    /// definitive refusal, and whether it is down) and announces it to every node; nothing
    /// when the lease is gone.
    pub async fn announce_upstream(&self, state: Option<UpstreamTrouble>) {
        let bp = &self.backplane;
        let firehose = super::firehose_of(&bp.config, &self.route.name, &self.topic);
        let (failing_for, refused, down) = match state {
            None => (String::new(), String::new(), ""),
            Some(t) => (
                millis(t.since.elapsed()).to_string(),
                t.refused.map(|r| r.to_string()).unwrap_or_default(),
                if t.down { "1" } else { "" },
            ),
        };
        let mut invocation = bp.scripts.upstream.key(&self.keys.meta);
        invocation
            .key(&firehose)
            .key(&self.keys.lease)
            .arg(&self.token)
            .arg(&*self.route.name)
            .arg(&self.topic)
            .arg(failing_for)
            .arg(refused)
            .arg(millis(bp.config.firehose_retention))
            .arg(down);
        if let Err(e) = bp.eval::<i64>("lease", &invocation).await {
            tracing::debug!(error = %e, "the upstream's state was not announced");
        }
    }

    /// Gives the lease up (the topic ended here, or the source stopped), so another node with
    /// waiters takes it at once rather than after its time to live.
    pub async fn release(&self) {
        let bp = &self.backplane;
        let mut invocation = bp.scripts.release.key(&self.keys.lease);
        invocation.arg(&self.token);
        if let Ok(1) = bp.eval::<i64>("lease", &invocation).await {
            bp.lease_event(&self.route.name, "released");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backplane
            .metrics
            .backplane
            .leases_held
            .with_label_values(&[&self.route.name])
            .dec();
    }
}
