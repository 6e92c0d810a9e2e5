//! All of pollmux's Prometheus metrics, in one struct with its own registry (never the global
//! one), injected where they are recorded.
//!
//! Labels come from closed sets only: route, listener and upstream names from the config, and the
//! enums below. Topics, paths, client addresses and credentials never become labels. Series for
//! every configured route are created up front, so dashboards show zeros instead of gaps.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::{AuthConfig, Config, RouteKind};

mod backplane;
mod route;

pub use backplane::BackplaneMetrics;
pub use route::{CollapseMetrics, GaugeGuard, PollMetrics, RouteMetrics};

/// Client request duration buckets (seconds): sub-second answers, then every common hold up to
/// and past the longest allowed hold (`max_hold`, 55 s by default) and a two-minute proxy call.
pub const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 45.0,
    55.0, 60.0, 90.0, 120.0,
];

/// Delivery latency buckets (seconds): message arrival at pollmux to its response; a fan-out
/// cost, so sub-millisecond resolution.
pub const DELIVERY_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upstream request duration buckets (seconds): upstream calls may themselves be long-polls.
pub const UPSTREAM_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 90.0,
];

/// Prefix of every pollmux metric.
pub const NAMESPACE: &str = "pollmux";

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

/// Route label for requests that matched no route.
pub const ROUTE_UNMATCHED: &str = "_unmatched";

/// How a client request ended; the `outcome` label of `pollmux_request_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A proxied request answered with the upstream's response.
    Response,
    /// A poll answered with messages.
    Message,
    /// A poll answered empty when its hold ended.
    Timeout,
    /// A poll answered empty because the server is draining.
    Shutdown,
    /// pollmux refused the request itself (4xx, or 503 for a limit).
    Rejected,
    /// An upstream failed, timed out or refused pollmux (502, 504; 503 when a topic's source
    /// or an authorization hook is down). `problem::Problem::outcome` decides.
    UpstreamError,
    /// The client went away before its answer was ready.
    ClientGone,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Response,
        Outcome::Message,
        Outcome::Timeout,
        Outcome::Shutdown,
        Outcome::Rejected,
        Outcome::UpstreamError,
        Outcome::ClientGone,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Response => "response",
            Outcome::Message => "message",
            Outcome::Timeout => "timeout",
            Outcome::Shutdown => "shutdown",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ClientGone => "client_gone",
        }
    }
}

/// Result class of an upstream request; the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    Status(u16),
    Error,
    Timeout,
    /// A source's answer pollmux cannot use whatever its status (a 200 that is not an event
    /// stream).
    Unusable,
}

impl UpstreamResult {
    const LABELS: [&'static str; 8] = [
        "1xx", "2xx", "3xx", "4xx", "5xx", "error", "timeout", "unusable",
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamResult::Status(s) => match s {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            UpstreamResult::Error => "error",
            UpstreamResult::Timeout => "timeout",
            UpstreamResult::Unusable => "unusable",
        }
    }
}

/// Downstream protocol of a connection; the `protocol` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        }
    }
}

/// The metric families. Fields are public so recorders take the child they need; the registry is
/// private so nothing registers behind the struct's back.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_request_duration: HistogramVec,
    pub polls_active: IntGaugeVec,
    pub topics_active: IntGaugeVec,
    pub messages_received: IntCounterVec,
    pub messages_delivered: IntCounterVec,
    pub cursor_expired: IntCounterVec,
    pub delivery_latency: HistogramVec,
    pub subscriptions_active: IntGaugeVec,
    pub upstream_reconnects: IntCounterVec,
    pub gaps: IntCounterVec,
    pub collapsed_requests: IntCounterVec,
    pub stored_hits: IntCounterVec,
    pub set_cookie_removed: IntCounterVec,
    pub unshareable: IntCounterVec,
    pub auth_checks: IntCounterVec,
    pub auth_cache_hits: IntCounterVec,
    pub connections_open: IntGaugeVec,
    pub connections_rejected: IntCounterVec,
    pub accept_errors: IntCounterVec,
    pub draining: IntGauge,
    pub config_reloads: IntCounterVec,
    pub buffered_bytes: IntGauge,
    pub config_last_reload_successful: IntGauge,
    /// Cluster mode's series (not exported on a single node).
    pub backplane: BackplaneMetrics,
}

impl Metrics {
    /// Creates every family and pre-creates the series of every listener and route in `config`.
    pub fn new(config: &Config) -> Metrics {
        // Not the prefixing registry: the process collector's series keep their standard
        // `process_*` names, which dashboards and alerts expect.
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help)
                .namespace(NAMESPACE)
                .buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
            h
        };
        let requests = counter(
            "requests_total",
            "Client requests answered, by route, route kind and HTTP status.",
            &["route", "kind", "status"],
        );
        let request_duration = histogram(
            "request_duration_seconds",
            "Time from a client request's arrival to its response head, by outcome.",
            &["route", "outcome"],
            REQUEST_DURATION_BUCKETS,
        );
        let upstream_requests = counter(
            "upstream_requests_total",
            "Requests pollmux made to upstreams, by route and result class.",
            &["route", "result"],
        );
        let upstream_request_duration = histogram(
            "upstream_request_duration_seconds",
            "Time from sending an upstream request to its response head.",
            &["route"],
            UPSTREAM_DURATION_BUCKETS,
        );
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(opts(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let polls_active = gauge(
            "polls_active",
            "Long-polls currently held (on collapse routes, clients waiting for a shared answer).",
            &["route"],
        );
        let topics_active = gauge(
            "topics_active",
            "Live topics (with subscribers or within linger).",
            &["route"],
        );
        let messages_received = counter(
            "messages_received_total",
            "Messages that entered a topic (publishes and source messages, duplicates excluded).",
            &["route"],
        );
        let messages_delivered = counter(
            "messages_delivered_total",
            "Messages written to clients; delivered / received is the fan-out.",
            &["route"],
        );
        let cursor_expired = counter(
            "cursor_expired_total",
            "Polls whose cursor had expired (410, or 200 with gap: true).",
            &["route"],
        );
        let delivery_latency = histogram(
            "delivery_latency_seconds",
            "Time from a message's arrival to the response carrying it (oldest message per response).",
            &["route"],
            DELIVERY_LATENCY_BUCKETS,
        );
        let subscriptions_active = gauge(
            "subscriptions_active",
            "Upstream subscriptions open (one per topic with an upstream source; on collapse \
             routes, upstream requests in flight); polls_active / subscriptions_active is the \
             fan-in ratio.",
            &["route"],
        );
        let upstream_reconnects = counter(
            "upstream_reconnects_total",
            "Times a source reconnected to its upstream (after an error, an end or silence).",
            &["route"],
        );
        let gaps = counter(
            "gaps_total",
            "Gaps recorded in topics (messages lost upstream), by cause: oversized (a message \
             over max_message_bytes) or unresumable (the upstream could not resume).",
            &["route", "cause"],
        );
        let collapsed_requests = counter(
            "collapsed_requests_total",
            "Collapse route requests answered without an upstream request of their own \
             (joined one in flight, or served a stored answer).",
            &["route"],
        );
        let stored_hits = counter(
            "stored_hits_total",
            "Collapse route requests answered from a stored upstream answer.",
            &["route"],
        );
        let set_cookie_removed = counter(
            "set_cookie_removed_total",
            "Shared collapse answers whose Set-Cookie was removed.",
            &["route"],
        );
        let unshareable = counter(
            "unshareable_answers_total",
            "Collapse answers marked Cache-Control: private on a route that may not share them \
             (their waiters got 502; the topic then goes to the upstream request by request).",
            &["route"],
        );
        let auth_checks = counter(
            "auth_checks_total",
            "Authorization hook requests, by route and result: allow, deny (401/403/404) or \
             unavailable (anything else, a timeout or no answer: the client gets 503).",
            &["route", "result"],
        );
        let auth_cache_hits = counter(
            "auth_cache_hits_total",
            "Client requests decided from a cached authorization hook decision.",
            &["route"],
        );
        let connections_open = IntGaugeVec::new(
            opts("connections_open", "Client connections currently open."),
            &["listener", "protocol"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections_open.clone()))
            .expect("registered once");
        let connections_rejected = counter(
            "connections_rejected_total",
            "Connections answered 503 or closed because max_connections was reached.",
            &["listener"],
        );
        let accept_errors = counter(
            "accept_errors_total",
            "Errors accepting connections (e.g. out of file descriptors).",
            &["listener"],
        );
        let draining = IntGauge::with_opts(opts("draining", "1 while pollmux is shutting down."))
            .expect("valid metric");
        registry
            .register(Box::new(draining.clone()))
            .expect("registered once");
        let config_reloads = counter(
            "config_reloads_total",
            "Configuration reloads (SIGHUP or POST /-/reload), by result: success or failure \
             (the configuration was invalid and the running one was kept).",
            &["result"],
        );
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        let config_last_reload_successful = IntGauge::with_opts(opts(
            "config_last_reload_successful",
            "1 when the last reload succeeded (or none was tried), 0 when it failed.",
        ))
        .expect("valid metric");
        config_last_reload_successful.set(1);
        registry
            .register(Box::new(config_last_reload_successful.clone()))
            .expect("registered once");
        let buffered_bytes = IntGauge::with_opts(opts(
            "buffered_bytes",
            "Message payload buffered over all topics (bounded by max_buffered_bytes).",
        ))
        .expect("valid metric");
        registry
            .register(Box::new(buffered_bytes.clone()))
            .expect("registered once");
        let build_info = IntGaugeVec::new(
            opts("build_info", "Build information; the value is always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("registered once");
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");

        let backplane = BackplaneMetrics::new(&registry, config.cluster.redis.is_some());
        let metrics = Metrics {
            registry,
            requests,
            request_duration,
            upstream_requests,
            upstream_request_duration,
            polls_active,
            topics_active,
            messages_received,
            messages_delivered,
            cursor_expired,
            delivery_latency,
            subscriptions_active,
            upstream_reconnects,
            gaps,
            collapsed_requests,
            stored_hits,
            set_cookie_removed,
            unshareable,
            auth_checks,
            auth_cache_hits,
            connections_open,
            connections_rejected,
            accept_errors,
            draining,
            config_reloads,
            config_last_reload_successful,
            buffered_bytes,
            backplane,
        };
        metrics.precreate(config);
        metrics
    }

    /// Creates the series of every listener and route in `config` (at start, and for the
    /// routes a reload adds).
    pub fn precreate(&self, config: &Config) {
        let listeners = config
            .listeners
            .iter()
            .map(|l| l.name.as_str())
            .chain(["admin"]);
        for l in listeners {
            self.connections_rejected.with_label_values(&[l]);
            self.accept_errors.with_label_values(&[l]);
            for p in [Protocol::Http1, Protocol::Http2] {
                self.connections_open.with_label_values(&[l, p.label()]);
            }
        }
        for r in &config.routes {
            self.requests
                .with_label_values(&[r.name.as_str(), r.kind.label(), "200"]);
            for o in Outcome::ALL {
                self.request_duration
                    .with_label_values(&[&r.name, o.label()]);
            }
            for result in UpstreamResult::LABELS {
                self.upstream_requests.with_label_values(&[&r.name, result]);
            }
            self.upstream_request_duration.with_label_values(&[&r.name]);
            let auth = match &r.kind {
                RouteKind::Poll(p) => {
                    drop(PollMetrics::new(self, &r.name));
                    if config.cluster.redis.is_some() {
                        self.backplane.precreate_route(&r.name);
                    }
                    &p.auth
                }
                RouteKind::Collapse(c) => {
                    drop(CollapseMetrics::new(self, &r.name));
                    &c.auth
                }
                RouteKind::Proxy { .. } => continue,
            };
            if let AuthConfig::Hook(_) = auth {
                for result in ["allow", "deny", "unavailable"] {
                    self.auth_checks.with_label_values(&[&r.name, result]);
                }
                self.auth_cache_hits.with_label_values(&[&r.name]);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding into a Vec cannot fail");
        buf
    }
}

/// Content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_before_traffic() {
        let config = Config::default_config();
        let text = String::from_utf8(Metrics::new(&config).encode()).unwrap();
        assert!(text.contains("pollmux_build_info{version=\""), "{text}");
        assert!(
            text.contains("pollmux_connections_open{listener=\"public\",protocol=\"http1\"} 0")
        );
        assert!(text.contains("pollmux_draining 0"));
        assert!(text.contains("\nprocess_open_fds "), "{text}");
    }

    #[test]
    fn outcome_indexes_match_all() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
    }

    #[test]
    fn upstream_results_are_classes() {
        assert_eq!(UpstreamResult::Status(204).label(), "2xx");
        assert_eq!(UpstreamResult::Status(503).label(), "5xx");
        assert_eq!(UpstreamResult::Timeout.label(), "timeout");
    }
}
