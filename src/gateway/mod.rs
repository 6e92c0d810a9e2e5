//! The request service: the [`Gateway`] for one configuration and what outlives it
//! ([`Shared`]), the [`Current`] one a reload replaces, and the gateway's run-time operations
//! (drain, sweep, publish). Building a gateway is in `build.rs`, the request pipeline in
//! `pipeline.rs`, the route kinds in `proxy.rs`, `longpoll.rs` and `collapse/`.

mod body_deadline;
mod build;
pub mod collapse;
pub mod cors;
mod leased;
pub mod longpoll;
mod pipeline;
pub mod proxy;
pub mod router;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::time::Instant;

use std::time::Duration;

use http::{HeaderMap, Method, Request, Response};

use crate::auth::jwt::Jwt;
use crate::auth::{Authorizer, Check, Decision, Hook};
use crate::backplane::{Backplane, BackplaneError};
use crate::config::AuthConfig;
use crate::config::{
    Config, LimitsConfig, RouteConfig, RouteKind, SourceConfig, StreamFormat, UpstreamConfig,
};
use crate::hub::{Batch, Topic};
use crate::hub::{Hub, NewMessage, Published};
use crate::metrics::{
    CollapseMetrics, Metrics, Outcome, PollMetrics, ROUTE_UNMATCHED, RouteMetrics,
};
use crate::per_ip::{IpSlot, OverLimit, PerIp, canonical_ip};
use crate::problem::Problem;
use crate::service::{ClientBody, ConnInfo, Drain, Handler, HeldPoll, NoBody, Step};
use crate::source::feed::{Feed, Sink};
use crate::source::upstream_interval::IntervalSource;
use crate::source::upstream_poll::PollSource;
use crate::source::upstream_stream::StreamSource;
use crate::source::{Initial, SourceSlots};
use crate::upstream::{Body, Upstream};
use collapse::{CollapseRoute, Join};
use longpoll::{ClientPolls, Held, Next, PollRoute};
use router::{Matched, RouteError, Router};
use tokio::sync::Semaphore;
use tracing::Instrument;

use build::Fingerprint;
pub use pipeline::PreparedPoll;

/// What outlives a configuration: the hub, the source slots and gates, and the drain.
pub struct Shared {
    pub hub: Arc<Hub>,
    sources: Arc<SourceSlots>,
    /// Upstream connects in progress over all sources.
    source_connects: Arc<Semaphore>,
    /// The server's drain: held polls then answer within `drain_window`, collapse waiters
    /// get 503.
    drain: Drain,
    /// Per-client-IP limits; the gateway applies them per request to clients behind trusted
    /// proxies (the accept loop, per connection, to everyone else).
    per_ip: Arc<PerIp>,
    /// Cluster mode: where the topics of publish routes live. Set at start; a reload keeps it.
    backplane: Option<Arc<Backplane>>,
}

impl Shared {
    pub fn new(
        hub: Arc<Hub>,
        per_ip: Arc<PerIp>,
        drain: Drain,
        backplane: Option<Arc<Backplane>>,
    ) -> Shared {
        Shared {
            hub,
            per_ip,
            backplane,
            sources: Arc::default(),
            source_connects: Arc::new(Semaphore::new(SOURCE_CONNECTS_MAX)),
            drain,
        }
    }
}

/// Routes, upstream clients and their metrics: everything a request needs, built once per
/// config. A reload builds a new one that keeps the state of every unchanged route.
pub struct Gateway {
    routes: Vec<RouteConfig>,
    /// Per route, what must be equal for a reload to keep its state (see `fingerprint`).
    fingerprints: Vec<Fingerprint>,
    router: Router,
    route_metrics: Vec<Arc<RouteMetrics>>,
    /// Per route, what serves it.
    runtimes: Vec<Runtime>,
    /// Per route, its authorization (hook or JWT) unless it is public.
    auth: Vec<Option<Authorizer>>,
    unmatched: Arc<RouteMetrics>,
    upstreams: Vec<Arc<Upstream>>,
    limits: LimitsConfig,
    shared: Arc<Shared>,
    client_polls: Arc<ClientPolls>,
    drain_window: Duration,
}

/// Upstream connects in progress at once over all sources: after an upstream outage, thousands
/// of topics reconnect through this gate instead of all at once.
pub const SOURCE_CONNECTS_MAX: usize = 64;

/// What serves one route.
enum Runtime {
    /// Reverse proxy to `upstreams[index]`.
    Proxy(usize),
    Poll(Arc<PollRoute>),
    Collapse(Arc<CollapseRoute>),
}

/// Why a publish was refused.
#[derive(Debug, Clone)]
pub enum PublishError {
    /// No poll route of that name with a publish source.
    NoSuchRoute,
    /// The route's topic template cannot produce that topic from valid parameters.
    InvalidTopic,
    /// No topic can be made (route or memory limit).
    Full(crate::hub::TooManyTopics),
    /// Cluster mode: the backplane could not take it.
    Backplane(BackplaneError),
}

impl Gateway {
    /// Begins the drain (the server's one [`Drain`], which its listeners and connections see
    /// too): every held poll answers at a random moment within `drain_window`, and polls
    /// arriving from now on do the same. Held polls are woken through their topics after the
    /// drain has begun, so a parked poll registers with nothing but its topic.
    pub fn begin_drain(&self) {
        self.shared.drain.begin();
        self.shared.hub.wake_all();
    }

    /// Removes lingered topics (poll and collapse routes); returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let collapse: usize = self
            .runtimes
            .iter()
            .map(|r| match r {
                Runtime::Collapse(c) => c.sweep(now),
                _ => 0,
            })
            .sum();
        for auth in self.auth.iter().flatten() {
            if let Authorizer::Hook(hook) = auth {
                hook.sweep(now);
            }
        }
        self.shared.per_ip.sweep(now);
        collapse + self.shared.hub.sweep(now)
    }

    /// Message payload buffered over all topics.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.hub.buffered_bytes()
    }

    /// Largest message payload accepted (publish bodies above it get 413).
    pub fn max_message_bytes(&self) -> usize {
        self.limits.max_message_bytes
    }

    /// Publishes a message into `topic` of the poll route `route` (the publish source); in
    /// cluster mode, into the topic's log in the backplane.
    pub async fn publish(
        &self,
        route: &str,
        topic: &str,
        message: NewMessage,
    ) -> Result<Published, PublishError> {
        let index = self
            .routes
            .iter()
            .position(|r| r.name == route)
            .ok_or(PublishError::NoSuchRoute)?;
        let Runtime::Poll(poll) = &self.runtimes[index] else {
            return Err(PublishError::NoSuchRoute);
        };
        let config = &poll.config;
        if !matches!(config.source, SourceConfig::Publish) {
            return Err(PublishError::NoSuchRoute);
        }
        let params = config
            .topic
            .capture(topic)
            .ok_or(PublishError::InvalidTopic)?;
        let route_params = &self.routes[index].params;
        let valid = params.iter().all(|(name, value)| {
            route_params
                .iter()
                .find(|p| &p.name == name)
                .is_some_and(|p| router::valid_param(p, value))
        });
        if !valid || config.topic.render(&params) != topic {
            return Err(PublishError::InvalidTopic);
        }
        match &self.shared.backplane {
            Some(backplane) if poll.topics.settings.mirrored => {
                let published = backplane
                    .publish(&poll.topics, topic, message)
                    .await
                    .map_err(PublishError::Backplane)?;
                if !published.duplicate {
                    poll.metrics.received.inc();
                }
                Ok(published)
            }
            _ => poll
                .publish(&self.shared.hub, topic, message)
                .map_err(PublishError::Full),
        }
    }
}

/// The gateway serving new requests; a reload replaces it. A request in progress keeps the
/// gateway it started on (and with it every route state it uses).
pub struct Current(std::sync::RwLock<Arc<Gateway>>);

impl Current {
    pub fn new(gateway: Arc<Gateway>) -> Current {
        Current(std::sync::RwLock::new(gateway))
    }

    pub fn get(&self) -> Arc<Gateway> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves new requests with `gateway`; returns the one it replaces.
    pub fn replace(&self, gateway: Arc<Gateway>) -> Arc<Gateway> {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|e| e.into_inner()),
            gateway,
        )
    }
}

impl Handler for Current {
    const HOLDS_POLLS: bool = true;
    type Held = PreparedPoll;

    fn call<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static + use<B> {
        self.get().call(req, conn)
    }

    fn prepare_held(
        self: &Arc<Self>,
        req: Request<NoBody>,
        conn: ConnInfo,
    ) -> Option<Step<PreparedPoll>> {
        self.get().prepare_held(req, conn)
    }
}

#[cfg(test)]
impl Gateway {
    /// A gateway for `config` with a hub of its own and no per-IP limits; and its metrics.
    pub(crate) fn for_tests(config: &Config) -> (Arc<Metrics>, Arc<Gateway>) {
        let metrics = Arc::new(Metrics::new(config));
        let shared = Arc::new(Shared::new(
            Arc::new(Hub::new()),
            Arc::new(PerIp::new(0, 0)),
            Drain::default(),
            None,
        ));
        let gateway = Arc::new(Gateway::new(config, &metrics, shared, None));
        (metrics, gateway)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, F: Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What hyper keeps per pending request (for a held poll, its whole hold). A regression
    /// here is memory per held poll; see docs/BENCHMARKS.md.
    #[test]
    fn pending_request_state_stays_small() {
        let (_, gw) = Gateway::for_tests(&Config::default_config());
        let conn = ConnInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            tls: false,
        };
        let size = future_size(|req: Request<hyper::body::Incoming>| gw.call(req, conn));
        eprintln!("pending request future: {size} bytes");
        assert!(size <= PENDING_REQUEST_BYTES_MAX, "{size} bytes");
    }

    const PENDING_REQUEST_BYTES_MAX: usize = 768;
}
