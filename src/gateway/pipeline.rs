//! The request pipeline: a request is routed (a poll on the held-poll path once), passes the
//! checks every request passes (URI size, path parameters, per-IP limits behind a trusted proxy,
//! authorization) and goes to its route kind, synchronously, so that what a pending or held
//! request keeps is only what its wait needs. A poll comes out as a [`PreparedPoll`], the
//! gateway's `service::HeldPoll`.
//!
//! Metrics are recorded by a `Record` guard, so a request whose client disconnects (hyper then
//! drops its future at whatever `.await` it is parked on) is still counted.

use super::*;

impl Gateway {
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
        if let Some(problem) = malformed(&req) {
            let detail = match problem {
                Problem::MethodNotAllowed => "pollmux is no forward proxy: CONNECT is not served",
                _ => "a request has exactly one Host header (RFC 9112 3.2)",
            };
            return Step::Done(Record::new(&self.unmatched).reject(problem, Some(detail)));
        }
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
        until: Option<Instant>,
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
        let body_deadline = Instant::now() + self.limits.body_read_timeout;
        Step::Pending(Box::pin(async move {
            let upstream = &this.upstreams[upstream];
            let trusted = &this.limits.trusted_proxies;
            let forwarded = proxy::forward(
                upstream,
                &record.metrics,
                req,
                &conn,
                trusted,
                body_deadline,
            )
            .await;
            record.finish(forwarded.0, forwarded.1)
        }))
    }
}

/// What [`Current`] serves with, as a [`Handler`]: the gateway in force answers.
impl Gateway {
    /// `Handler::call`: what hyper keeps while the request is pending.
    pub(super) fn call<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static + use<B> {
        finish(self.prepare(req, conn))
    }

    /// `Handler::prepare_held`: a poll the held-poll path waits on, or `None` for hyper.
    pub(super) fn prepare_held(
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

/// What no route serves, whatever its path: `CONNECT` (405; hyper hands it over in any target
/// form), and a request with more than one `Host` (400, RFC 9112 3.2: which host it names is
/// ambiguous, and a proxy in front may have read the other one).
fn malformed<B>(req: &Request<B>) -> Option<Problem> {
    if req.method() == Method::CONNECT {
        return Some(Problem::MethodNotAllowed);
    }
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    (hosts.next().is_some() && hosts.next().is_some()).then_some(Problem::InvalidRequest)
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
    /// HTTP/1.1), where the server's held-poll path parks the poll instead.
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

    fn deadline(&self) -> Instant {
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
