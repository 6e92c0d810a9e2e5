//! The client-facing hyper service: resolves a request to its route, checks what every request
//! must pass (URI size, path parameters), and hands it to its route kind's module.
//!
//! Metrics are recorded by a `Record` guard, so a request whose client disconnects (hyper then
//! drops this future at whatever `.await` it is parked on) is still counted.

pub mod collapse;
pub mod cors;
pub mod longpoll;
pub mod proxy;
pub mod router;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use std::time::Duration;

use http::{HeaderMap, Method, Request, Response};

use crate::auth::jwt::Jwt;
use crate::auth::{Authorizer, Check, Decision, Hook};
use crate::config::AuthConfig;
use crate::config::{Config, LimitsConfig, RouteConfig, RouteKind, SourceConfig, UpstreamConfig};
use crate::hub::{Batch, Topic};
use crate::hub::{Hub, NewMessage, Published};
use crate::metrics::{
    CollapseMetrics, Metrics, Outcome, PollMetrics, ROUTE_UNMATCHED, RouteMetrics,
};
use crate::per_ip::{IpSlot, OverLimit, PerIp, canonical_ip};
use crate::problem::Problem;
use crate::service::{ClientBody, ConnInfo, Drain, Handler, HeldPoll, NoBody, Step};
use crate::source::SourceSlots;
use crate::source::feed::Feed;
use crate::source::upstream_poll::PollSource;
use crate::source::upstream_stream::StreamSource;
use crate::upstream::{Body, Upstream};
use collapse::{CollapseRoute, Join};
use longpoll::{ClientPolls, Held, Next, PollRoute};
use router::{Matched, RouteError, Router};
use tokio::sync::Semaphore;
use tracing::Instrument;

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
}

impl Shared {
    pub fn new(hub: Arc<Hub>, per_ip: Arc<PerIp>, drain: Drain) -> Shared {
        Shared {
            hub,
            per_ip,
            sources: Arc::default(),
            source_connects: Arc::new(Semaphore::new(SOURCE_CONNECTS_MAX)),
            drain,
        }
    }
}

/// What must be equal between two configs for a reload to keep a route's state: the route's
/// own settings, the upstreams it uses, and the global settings its runtime reads. Compared by
/// value (never logged: upstream headers carry credentials).
#[derive(PartialEq)]
struct Fingerprint {
    route: RouteConfig,
    upstreams: Vec<UpstreamConfig>,
    max_message_bytes: usize,
    drain_window: Duration,
}

fn fingerprint(config: &Config, route: &RouteConfig) -> Fingerprint {
    let mut used = Vec::new();
    let hook = |auth: &AuthConfig| match auth {
        AuthConfig::Hook(h) => Some(h.upstream),
        AuthConfig::Public | AuthConfig::Jwt(_) => None,
    };
    match &route.kind {
        RouteKind::Proxy { upstream } => used.push(*upstream),
        RouteKind::Poll(p) => {
            match &p.source {
                SourceConfig::UpstreamPoll { upstream, .. }
                | SourceConfig::UpstreamStream { upstream, .. } => used.push(*upstream),
                SourceConfig::Publish => {}
            }
            used.extend(hook(&p.auth));
        }
        RouteKind::Collapse(c) => {
            used.push(c.upstream);
            used.extend(hook(&c.auth));
        }
    }
    Fingerprint {
        route: route.clone(),
        upstreams: used.iter().map(|&u| config.upstreams[u].clone()).collect(),
        max_message_bytes: config.limits.max_message_bytes,
        drain_window: config.shutdown.drain_window,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishError {
    /// No poll route of that name with a publish source.
    NoSuchRoute,
    /// The route's topic template cannot produce that topic from valid parameters.
    InvalidTopic,
    /// No topic can be made (route or memory limit).
    Full(crate::hub::TooManyTopics),
}

impl Gateway {
    /// The gateway serving `config`. With `previous` (a reload), every route whose
    /// `fingerprint` is unchanged keeps its state: topics, sources, stored answers, cached
    /// authorization decisions.
    pub fn new(
        config: &Config,
        metrics: &Arc<Metrics>,
        shared: Arc<Shared>,
        previous: Option<&Gateway>,
    ) -> Gateway {
        let fingerprints: Vec<Fingerprint> = config
            .routes
            .iter()
            .map(|r| fingerprint(config, r))
            .collect();
        let kept = |i: usize| {
            let previous = previous?;
            let name = &config.routes[i].name;
            let j = previous.routes.iter().position(|r| r.name == *name)?;
            (previous.fingerprints[j] == fingerprints[i]).then_some(j)
        };
        let route_metrics: Vec<_> = config
            .routes
            .iter()
            .map(|r| Arc::new(RouteMetrics::new(metrics, &r.name, r.kind.label())))
            .collect();
        let upstreams: Vec<_> = config
            .upstreams
            .iter()
            .cloned()
            .map(|u| Arc::new(Upstream::new(u)))
            .collect();
        let runtimes = config
            .routes
            .iter()
            .zip(&route_metrics)
            .enumerate()
            .map(
                |(i, (r, route_metrics))| match (&r.kind, kept(i).zip(previous)) {
                    (RouteKind::Poll(_), Some((j, previous))) => match &previous.runtimes[j] {
                        Runtime::Poll(p) => Runtime::Poll(p.clone()),
                        _ => unreachable!("an equal fingerprint is the same kind"),
                    },
                    (RouteKind::Collapse(_), Some((j, previous))) => match &previous.runtimes[j] {
                        Runtime::Collapse(c) => Runtime::Collapse(c.clone()),
                        _ => unreachable!("an equal fingerprint is the same kind"),
                    },
                    (RouteKind::Poll(p), _) => Runtime::Poll(Arc::new(PollRoute::new(
                        &r.name,
                        p,
                        PollMetrics::new(metrics, &r.name),
                    ))),
                    (RouteKind::Collapse(c), _) => Runtime::Collapse(Arc::new(CollapseRoute::new(
                        (**c).clone(),
                        CollapseMetrics::new(metrics, &r.name),
                        route_metrics.clone(),
                        upstreams[c.upstream].clone(),
                        config.limits.max_message_bytes,
                        shared.drain.clone(),
                        config.shutdown.drain_window,
                    ))),
                    (RouteKind::Proxy { upstream }, _) => Runtime::Proxy(*upstream),
                },
            )
            .collect();
        let auth = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (auth, topic, cursor) = match &r.kind {
                    RouteKind::Poll(p) => (&p.auth, &p.topic, Some(longpoll::CURSOR_PARAM)),
                    RouteKind::Collapse(c) => (&c.auth, &c.topic, c.cursor.as_deref()),
                    RouteKind::Proxy { .. } => return None,
                };
                match auth {
                    AuthConfig::Public => None,
                    // A kept route keeps its hook's cached decisions.
                    AuthConfig::Hook(_) if let Some((j, previous)) = kept(i).zip(previous) => {
                        previous.auth[j].clone()
                    }
                    AuthConfig::Hook(hook) => Some(Authorizer::Hook(Arc::new(Hook::new(
                        &r.name,
                        hook.clone(),
                        topic.clone(),
                        cursor.map(str::to_owned),
                        upstreams[hook.upstream].clone(),
                        metrics,
                    )))),
                    // Verifiers are rebuilt on every reload, so a key file rotated in place
                    // takes effect.
                    AuthConfig::Jwt(jwt) => Some(Authorizer::Jwt(Arc::new(Jwt::new(
                        &r.name,
                        jwt.clone(),
                        topic.clone(),
                    )))),
                }
            })
            .collect();
        let client_polls = match previous {
            Some(p) if p.limits.max_polls_per_client == config.limits.max_polls_per_client => {
                p.client_polls.clone()
            }
            _ => Arc::new(ClientPolls::new(config.limits.max_polls_per_client)),
        };
        Gateway {
            router: Router::new(&config.routes),
            route_metrics,
            runtimes,
            auth,
            unmatched: Arc::new(RouteMetrics::new(metrics, ROUTE_UNMATCHED, "none")),
            upstreams,
            routes: config.routes.clone(),
            fingerprints,
            limits: config.limits.clone(),
            shared,
            client_polls,
            drain_window: config.shutdown.drain_window,
        }
    }

    /// After a reload to `next`: the topics of every poll route `next` does not keep (removed
    /// or changed) are retired, so their held polls answer now and their sources stop. Returns
    /// the names of the routes that were not kept.
    pub fn retire_replaced(&self, next: &Gateway) -> Vec<String> {
        let mut replaced = Vec::new();
        for (route, runtime) in self.routes.iter().zip(&self.runtimes) {
            let kept = next.runtimes.iter().any(|n| match (runtime, n) {
                (Runtime::Poll(a), Runtime::Poll(b)) => Arc::ptr_eq(a, b),
                (Runtime::Collapse(a), Runtime::Collapse(b)) => Arc::ptr_eq(a, b),
                _ => false,
            });
            if kept {
                continue;
            }
            match runtime {
                Runtime::Poll(poll) => {
                    let topics = self.shared.hub.retire_route(&poll.topics);
                    tracing::debug!(route = %route.name, topics, "retired the route's topics");
                }
                Runtime::Collapse(collapse) => collapse.retire(),
                Runtime::Proxy(_) => {}
            }
            replaced.push(route.name.clone());
        }
        replaced
    }

    /// Starts the source of a topic a poll just created (upstream sources only). The source is
    /// built from config and the validated parameters alone.
    fn start_source(
        &self,
        poll: &PollRoute,
        route: usize,
        topic: Arc<Topic>,
        params: &[(String, String)],
    ) {
        let feed = |upstream: usize| Feed {
            upstream: self.upstreams[upstream].clone(),
            topic: topic.clone(),
            upstream_grace: poll.config.upstream_grace,
            max_message_bytes: self.limits.max_message_bytes,
            poll_metrics: poll.metrics.clone(),
            route_metrics: self.route_metrics[route].clone(),
            connects: self.shared.source_connects.clone(),
            retry_after: Default::default(),
        };
        let source: Pin<Box<dyn Future<Output = ()> + Send>> = match &poll.config.source {
            SourceConfig::Publish => return,
            SourceConfig::UpstreamStream {
                format,
                upstream,
                path,
                idle_timeout,
            } => Box::pin(
                StreamSource {
                    format: format.clone(),
                    path: path.render_path(params),
                    idle_timeout: *idle_timeout,
                    feed: feed(*upstream),
                }
                .run(),
            ),
            SourceConfig::UpstreamPoll {
                upstream,
                path,
                id_pointer,
                items_pointer,
            } => Box::pin(
                PollSource {
                    path: path.clone(),
                    params: params.to_vec(),
                    id_pointer: id_pointer.clone(),
                    items_pointer: items_pointer.clone(),
                    feed: feed(*upstream),
                }
                .run(),
            ),
        };
        let slots = self.shared.sources.clone();
        let route_name = poll.name.clone();
        // Everything the source logs names its route and topic.
        let span = tracing::warn_span!("source", route = %route_name, topic = %topic.name());
        tokio::spawn(
            async move {
                let name = topic.name().to_owned();
                slots
                    .run_exclusive(&route_name, &name, topic.retired(), source)
                    .await;
            }
            .instrument(span),
        );
    }

    /// Begins the drain (the server's one [`Drain`], which its listeners and connections see
    /// too): every held poll answers at a random moment within `drain_window`, and polls
    /// arriving from now on do the same. Held polls are woken through their topics after the
    /// drain has begun, so a parked poll registers with nothing but its topic.
    pub fn begin_drain(&self) {
        self.shared.drain.begin();
        self.shared.hub.wake_all();
    }

    /// Removes lingered topics (poll and collapse routes); returns how many.
    pub fn sweep(&self, now: std::time::Instant) -> usize {
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

    /// Publishes a message into `topic` of the poll route `route` (the publish source).
    pub fn publish(
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
        poll.publish(&self.shared.hub, topic, message)
            .map_err(PublishError::Full)
    }

    /// Routes and checks a request synchronously, so that the future a held request keeps
    /// carries only what its wait needs (never the request itself; see `Handler`).
    fn prepare<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        conn: ConnInfo,
    ) -> Step<PreparedPoll> {
        let routed = self.router.resolve(&self.routes, req.uri().path());
        self.prepare_routed(req, conn, routed)
    }

    /// [`Gateway::prepare`] for a request already routed (each request is routed once).
    fn prepare_routed<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        conn: ConnInfo,
        routed: Result<Matched, RouteError>,
    ) -> Step<PreparedPoll> {
        let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if uri_len > self.limits.max_uri_bytes {
            return Step::Done(Record::new(&self.unmatched).reject(Problem::UriTooLong, None));
        }
        let matched = match routed {
            Ok(m) => m,
            Err(RouteError::NotFound) => {
                return Step::Done(Record::new(&self.unmatched).reject(Problem::NotFound, None));
            }
            Err(RouteError::InvalidParameter { route, name }) => {
                let detail = format!("path parameter {name:?} is not valid for this route");
                let record = Record::new(&self.route_metrics[route]);
                return Step::Done(record.reject(Problem::InvalidParameter, Some(&detail)));
            }
        };
        let route = matched.route;
        // One span per request (debug: free unless asked for), its topic recorded once known;
        // what the request logs, now or in its pending future, names its route.
        let span = tracing::debug_span!(
            "request",
            route = %self.routes[route].name,
            topic = tracing::field::Empty
        );
        let step = span.in_scope(|| self.prepare_matched(route, matched.params, req, conn));
        match step {
            Step::Pending(pending) if !span.is_disabled() => {
                Step::Pending(Box::pin(pending.instrument(span)))
            }
            step => step,
        }
    }

    /// [`Gateway::prepare`] once the route is known and its parameters are valid.
    fn prepare_matched<B: ClientBody>(
        self: &Arc<Self>,
        route: usize,
        params: Vec<(String, String)>,
        req: Request<B>,
        conn: ConnInfo,
    ) -> Step<PreparedPoll> {
        let mut record = Record::new(&self.route_metrics[route]);
        match self.admit_forwarded_client(&req, &conn) {
            Ok(slot) => record.client = slot,
            Err(_) => {
                let detail = "too many requests from this address";
                return Step::Done(record.reject(Problem::TooManyConnections, Some(detail)));
            }
        }
        // Authorization comes before anything touches a topic or an upstream: for every
        // request of a collapse route (all of them reach the upstream with pollmux's
        // credential), for GETs of a poll route (pollmux answers its other methods itself).
        let mut until = None;
        let guarded =
            req.method() == Method::GET || matches!(self.runtimes[route], Runtime::Collapse(_));
        if let Some(auth) = &self.auth[route]
            && guarded
        {
            // A browser reads a refusal only with its CORS headers (to ask the user to sign
            // in, say); an origin that may not read at all is refused by the poll itself.
            let grant = match &self.runtimes[route] {
                Runtime::Poll(poll) => cors::check(req.headers(), &poll.config.cors).ok().flatten(),
                _ => None,
            };
            match auth.check(&req, &params) {
                Check::Now(Decision::Allow { until: expires }) => until = expires,
                Check::Now(refused) => {
                    return Step::Done(refuse(record, &refused, grant.as_ref()));
                }
                Check::Later(decision) => {
                    let this = self.clone();
                    return Step::Pending(Box::pin(async move {
                        match decision.await {
                            Decision::Allow { until } => {
                                let step = this.serve(route, req, conn, &params, record, until);
                                finish(step).await
                            }
                            refused => refuse(record, &refused, grant.as_ref()),
                        }
                    }));
                }
            }
        }
        self.serve(route, req, conn, &params, record, until)
    }

    /// For a request through a trusted proxy, the per-IP limits of the client it names in
    /// `X-Forwarded-For` (direct peers are limited per connection by the accept loop).
    fn admit_forwarded_client<B>(
        &self,
        req: &Request<B>,
        conn: &ConnInfo,
    ) -> Result<Option<IpSlot>, OverLimit> {
        let per_ip = &self.shared.per_ip;
        let trusted = &self.limits.trusted_proxies;
        let peer = canonical_ip(conn.peer.ip());
        if !per_ip.enabled() || !trusted.iter().any(|n| n.contains(&peer)) {
            return Ok(None);
        }
        let client = proxy::forwarded_client(req.headers(), peer, trusted);
        per_ip.admit(client, Instant::now()).map(Some)
    }

    /// Serves a routed (and authorized) request by its route's kind. A poll is held at most
    /// `until` (its token's expiry).
    fn serve<B: ClientBody>(
        self: &Arc<Self>,
        route: usize,
        req: Request<B>,
        conn: ConnInfo,
        params: &[(String, String)],
        mut record: Record,
        until: Option<std::time::Instant>,
    ) -> Step<PreparedPoll> {
        match &self.runtimes[route] {
            Runtime::Poll(poll) => {
                let clients = &self.client_polls;
                match longpoll::prepare(poll, &self.shared.hub, clients, req, params, until) {
                    Ok(held) => {
                        tracing::Span::current()
                            .record("topic", tracing::field::display(held.topic().name()));
                        if let Some(topic) = held.new_topic() {
                            self.start_source(poll, route, topic, params);
                        }
                        Step::Poll(PreparedPoll {
                            route: poll.clone(),
                            shared: self.shared.clone(),
                            drain_window: self.drain_window,
                            held,
                            record,
                        })
                    }
                    Err((resp, outcome)) => Step::Done(record.finish(resp, outcome)),
                }
            }
            Runtime::Proxy(upstream) => self.forward(*upstream, req, conn, record),
            Runtime::Collapse(route) => {
                // Only GET without a body is collapsed; anything else is proxied as is.
                if req.method() != Method::GET || !req.body().is_end_stream() {
                    return self.forward(route.config.upstream, req, conn, record);
                }
                match route.join(&req, params) {
                    Join::Now(resp, outcome) => Step::Done(record.finish(resp, outcome)),
                    Join::Wait(waiter) => {
                        let route = route.clone();
                        Step::Pending(Box::pin(async move {
                            let (resp, outcome) = waiter.wait(&route).await;
                            record.finish(resp, outcome)
                        }))
                    }
                }
            }
        }
    }

    /// Proxies `req` to `upstreams[upstream]`.
    fn forward<B: ClientBody>(
        self: &Arc<Self>,
        upstream: usize,
        req: Request<B>,
        conn: ConnInfo,
        mut record: Record,
    ) -> Step<PreparedPoll> {
        let this = self.clone();
        Step::Pending(Box::pin(async move {
            let upstream = &this.upstreams[upstream];
            let trusted = &this.limits.trusted_proxies;
            let forwarded = proxy::forward(upstream, &record.metrics, req, &conn, trusted).await;
            record.finish(forwarded.0, forwarded.1)
        }))
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
        ));
        let gateway = Arc::new(Gateway::new(config, &metrics, shared, None));
        (metrics, gateway)
    }
}

impl Handler for Gateway {
    const HOLDS_POLLS: bool = true;
    type Held = PreparedPoll;

    fn call<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static + use<B> {
        finish(self.prepare(req, conn))
    }

    fn prepare_held(
        self: &Arc<Self>,
        req: Request<NoBody>,
        conn: ConnInfo,
    ) -> Option<Step<PreparedPoll>> {
        // Only polls are served here; any other request goes to hyper, which routes it again
        // (a few hundred nanoseconds, less than carrying the match across the hand-off).
        let routed = self.router.resolve(&self.routes, req.uri().path());
        let poll = matches!(&routed, Ok(m) if matches!(self.runtimes[m.route], Runtime::Poll(_)));
        poll.then(|| self.prepare_routed(req, conn, routed))
    }
}

/// Awaits what is left of a request after its synchronous part. (A plain `async fn` would keep
/// `step` twice in its state: argument and local.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn's state is 184 bytes larger here (see pending_request_state_stays_small)"
)]
fn finish(mut step: Step<PreparedPoll>) -> impl Future<Output = Response<Body>> + Send + 'static {
    async move {
        match &mut step {
            Step::Done(resp) => std::mem::take(resp),
            Step::Pending(pending) => pending.await,
            Step::Poll(held) => held.wait().await,
        }
    }
}

/// A poll that passed every check and waits on its topic: all it needs until its answer.
pub struct PreparedPoll {
    route: Arc<PollRoute>,
    shared: Arc<Shared>,
    drain_window: Duration,
    held: Held,
    record: Record,
}

impl PreparedPoll {
    /// Waits on the topic's notifications for the answer (TLS, HTTP/2, and hyper's
    /// HTTP/1.1), where [`server::h1`](crate) parks the poll instead.
    async fn wait(&mut self) -> Response<Body> {
        let shared = &self.shared;
        let (resp, outcome) = self
            .held
            .wait(&self.route, &shared.drain, self.drain_window)
            .await;
        self.record.finish(resp, outcome)
    }
}

impl HeldPoll for PreparedPoll {
    fn look(&mut self) -> Result<Response<Body>, u64> {
        let shared = &self.shared;
        match self
            .held
            .next(&self.route, &shared.drain, self.drain_window)
        {
            Next::Answer(resp, outcome) => Ok(self.record.finish(resp, outcome)),
            Next::Wait { generation } => Err(generation),
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.held.deadline()
    }

    fn expire(&mut self) -> Response<Body> {
        let (resp, outcome) = self.held.expire();
        self.record.finish(resp, outcome)
    }

    fn topic(&self) -> &Arc<Topic> {
        self.held.topic()
    }

    fn batch_answer(&self, batch: &Batch) -> Response<Body> {
        longpoll::batch_response(batch)
    }

    fn own_headers(&self, headers: &mut HeaderMap) {
        if let Some(grant) = self.held.cors() {
            cors::apply(headers, grant);
        }
    }

    fn draining(&self) -> bool {
        self.shared.drain.is_draining()
    }

    fn delivered(mut self, batch: &Batch) {
        self.held.delivered(&self.route, batch);
        self.record.answered(http::StatusCode::OK, Outcome::Message);
    }
}

/// The answer to a client the authorization hook did not allow, with the CORS headers of
/// its origin when that may read.
fn refuse(mut record: Record, decision: &Decision, grant: Option<&cors::Grant>) -> Response<Body> {
    let (problem, challenge) = match decision {
        Decision::Deny { status, challenge } => match status.as_u16() {
            401 => (Problem::Unauthorized, challenge.clone()),
            403 => (Problem::Forbidden, challenge.clone()),
            _ => (Problem::NotFound, challenge.clone()),
        },
        Decision::Allow { .. } | Decision::Unavailable => (Problem::AuthUnavailable, None),
    };
    let mut resp = problem.response(None);
    if let Some(challenge) = challenge {
        resp.headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, challenge);
    }
    if let Some(grant) = grant {
        cors::apply(resp.headers_mut(), grant);
    }
    record.finish(resp, problem.outcome())
}

/// Records one client request's metrics exactly once: on `finish`, or as `client_gone` when
/// dropped unfinished.
struct Record {
    metrics: Arc<RouteMetrics>,
    started: Instant,
    finished: bool,
    /// The request's place in its client's per-IP limits (behind a trusted proxy).
    client: Option<IpSlot>,
}

impl Record {
    fn new(metrics: &Arc<RouteMetrics>) -> Record {
        Record {
            metrics: metrics.clone(),
            started: Instant::now(),
            finished: false,
            client: None,
        }
    }

    fn finish(&mut self, resp: Response<Body>, outcome: Outcome) -> Response<Body> {
        self.answered(resp.status(), outcome);
        resp
    }

    fn answered(&mut self, status: http::StatusCode, outcome: Outcome) {
        self.finished = true;
        self.metrics
            .answered(status.as_u16(), outcome, self.started.elapsed());
    }

    fn reject(mut self, problem: Problem, detail: Option<&str>) -> Response<Body> {
        self.finish(problem.response(detail), problem.outcome())
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.abandoned(self.started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, F: Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A reload keeps a route's state exactly when what it depends on is equal by value.
    #[test]
    fn fingerprints_compare_what_a_route_depends_on() {
        let text = |hold: &str, pattern: &str, header: &str| {
            format!(
                "[listeners.p]\naddress = \"127.0.0.1:0\"\n\
                 [upstreams.u]\nurl = \"http://127.0.0.1:1\"\nheaders = {{ x-key = \"{header}\" }}\n\
                 [upstreams.other]\nurl = \"http://127.0.0.1:2\"\n\
                 [routes.feed]\npath = \"/feed/{{id}}\"\nkind = \"poll\"\nauth = \"public\"\n\
                 hold = \"{hold}\"\nparams.id = \"{pattern}\"\n\
                 source = {{ type = \"upstream-sse\", upstream = \"u\", path = \"/s/{{id}}\" }}\n"
            )
        };
        let print = |t: String| {
            let c = Config::from_toml(&t, std::path::Path::new(".")).unwrap();
            fingerprint(&c, &c.routes[0])
        };
        let base = print(text("5s", "[0-9]+", "a"));
        assert!(base == print(text("5s", "[0-9]+", "a")), "the same config");
        assert!(
            base != print(text("6s", "[0-9]+", "a")),
            "the route's own setting"
        );
        assert!(
            base != print(text("5s", "[0-9]{1,3}", "a")),
            "a parameter pattern"
        );
        assert!(
            base != print(text("5s", "[0-9]+", "b")),
            "its upstream's header"
        );
        let other_changed = text("5s", "[0-9]+", "a").replace("127.0.0.1:2", "127.0.0.1:3");
        assert!(base == print(other_changed), "an upstream it does not use");
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
