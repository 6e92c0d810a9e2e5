//! The client-facing hyper service: resolves a request to its route, checks what every request
//! must pass (URI size, path parameters), and hands it to its route kind's module.
//!
//! Metrics are recorded by a [`Record`] guard, so a request whose client disconnects (hyper then
//! drops this future at whatever `.await` it is parked on) is still counted.

pub mod problem;
pub mod proxy;
pub mod router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::config::{Config, LimitsConfig, RouteConfig, RouteKind};
use crate::metrics::{Metrics, Outcome, ROUTE_UNMATCHED, RouteMetrics};
use crate::upstream::{Body, Upstream};
use problem::Problem;
use router::{RouteError, Router};

/// What the gateway knows of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Whether the client connected over TLS (sets `X-Forwarded-Proto`).
    pub tls: bool,
}

/// Routes, upstream clients and their metrics: everything a request needs, built once per config.
pub struct Gateway {
    routes: Vec<RouteConfig>,
    router: Router,
    route_metrics: Vec<RouteMetrics>,
    unmatched: RouteMetrics,
    upstreams: Vec<Upstream>,
    limits: LimitsConfig,
}

impl Gateway {
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Gateway {
        Gateway {
            router: Router::new(&config.routes),
            route_metrics: config
                .routes
                .iter()
                .map(|r| RouteMetrics::new(metrics, &r.name, r.kind.label()))
                .collect(),
            unmatched: RouteMetrics::new(metrics, ROUTE_UNMATCHED, "none"),
            upstreams: config
                .upstreams
                .iter()
                .cloned()
                .map(Upstream::new)
                .collect(),
            routes: config.routes.clone(),
            limits: config.limits.clone(),
        }
    }

    /// Answers one client request. Never fails: every error is a problem+json response.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
        let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if uri_len > self.limits.max_uri_bytes {
            return Record::new(&self.unmatched).reject(Problem::UriTooLong, None);
        }
        let matched = match self.router.resolve(&self.routes, req.uri().path()) {
            Ok(m) => m,
            Err(RouteError::NotFound) => {
                return Record::new(&self.unmatched).reject(Problem::NotFound, None);
            }
            Err(RouteError::InvalidParameter { route, name }) => {
                let detail = format!("path parameter {name:?} is not valid for this route");
                return Record::new(&self.route_metrics[route])
                    .reject(Problem::InvalidParameter, Some(&detail));
            }
        };
        let metrics = &self.route_metrics[matched.route];
        let record = Record::new(metrics);
        match &self.routes[matched.route].kind {
            RouteKind::Proxy { upstream } => {
                let upstream = &self.upstreams[*upstream];
                let trusted = &self.limits.trusted_proxies;
                let (resp, outcome) = proxy::forward(upstream, metrics, req, conn, trusted).await;
                record.finish(resp, outcome)
            }
        }
    }
}

/// Records one client request's metrics exactly once: on `finish`, or as `client_gone` when
/// dropped unfinished.
struct Record<'a> {
    metrics: &'a RouteMetrics,
    started: Instant,
    finished: bool,
}

impl<'a> Record<'a> {
    fn new(metrics: &'a RouteMetrics) -> Record<'a> {
        Record {
            metrics,
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish(mut self, resp: Response<Body>, outcome: Outcome) -> Response<Body> {
        self.finished = true;
        self.metrics
            .answered(resp.status().as_u16(), outcome, self.started.elapsed());
        resp
    }

    fn reject(self, problem: Problem, detail: Option<&str>) -> Response<Body> {
        self.finish(problem.response(detail), Outcome::Rejected)
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.abandoned(self.started.elapsed());
        }
    }
}
