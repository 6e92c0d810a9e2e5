//! The series of one route, resolved once when the gateway is built, so recording on the hot
//! path is a pointer and an atomic add: [`RouteMetrics`] for every route, [`PollMetrics`] and
//! [`CollapseMetrics`] for their kinds, and the [`GaugeGuard`] that keeps a gauge true across
//! every `.await`.

use super::*;

/// One route's series, resolved once so the request path hashes no label values, except the
/// response status, which is open-ended per route.
pub struct RouteMetrics {
    name: String,
    kind: &'static str,
    requests: IntCounterVec,
    /// `requests_total{status="200"}`, resolved once: the status of nearly every answer.
    requests_ok: IntCounter,
    durations: [Histogram; Outcome::ALL.len()],
    upstream_results: IntCounterVec,
    upstream_duration: Histogram,
}

impl RouteMetrics {
    pub fn new(metrics: &Metrics, name: &str, kind: &'static str) -> RouteMetrics {
        RouteMetrics {
            name: name.to_owned(),
            kind,
            requests: metrics.requests.clone(),
            requests_ok: metrics.requests.with_label_values(&[name, kind, "200"]),
            durations: Outcome::ALL.map(|o| {
                metrics
                    .request_duration
                    .with_label_values(&[name, o.label()])
            }),
            upstream_results: metrics.upstream_requests.clone(),
            upstream_duration: metrics.upstream_request_duration.with_label_values(&[name]),
        }
    }

    /// A client request answered with `status`.
    pub fn answered(&self, status: u16, outcome: Outcome, elapsed: Duration) {
        if status == 200 {
            self.requests_ok.inc();
        } else {
            let status = status.to_string();
            self.requests
                .with_label_values(&[self.name.as_str(), self.kind, status.as_str()])
                .inc();
        }
        self.durations[outcome as usize].observe(elapsed.as_secs_f64());
    }

    /// A client request that ended without an answer (the client went away).
    pub fn abandoned(&self, elapsed: Duration) {
        self.durations[Outcome::ClientGone as usize].observe(elapsed.as_secs_f64());
    }

    /// An upstream request made for this route.
    pub fn upstream(&self, result: UpstreamResult, elapsed: Duration) {
        self.upstream_results
            .with_label_values(&[self.name.as_str(), result.label()])
            .inc();
        self.upstream_duration.observe(elapsed.as_secs_f64());
    }
}

/// A poll route's own series.
#[derive(Clone)]
pub struct PollMetrics {
    pub polls_active: IntGauge,
    pub topics_active: IntGauge,
    pub received: IntCounter,
    pub delivered: IntCounter,
    pub cursor_expired: IntCounter,
    pub delivery_latency: Histogram,
    pub subscriptions_active: IntGauge,
    pub upstream_reconnects: IntCounter,
    pub gaps_oversized: IntCounter,
    pub gaps_unresumable: IntCounter,
}

impl PollMetrics {
    pub fn new(metrics: &Metrics, route: &str) -> PollMetrics {
        let r = &[route];
        PollMetrics {
            polls_active: metrics.polls_active.with_label_values(r),
            topics_active: metrics.topics_active.with_label_values(r),
            received: metrics.messages_received.with_label_values(r),
            delivered: metrics.messages_delivered.with_label_values(r),
            cursor_expired: metrics.cursor_expired.with_label_values(r),
            delivery_latency: metrics.delivery_latency.with_label_values(r),
            subscriptions_active: metrics.subscriptions_active.with_label_values(r),
            upstream_reconnects: metrics.upstream_reconnects.with_label_values(r),
            gaps_oversized: metrics.gaps.with_label_values(&[route, "oversized"]),
            gaps_unresumable: metrics.gaps.with_label_values(&[route, "unresumable"]),
        }
    }
}

/// A collapse route's own series. Clients waiting for a shared answer count as held polls,
/// topic groups as topics and upstream requests in flight as subscriptions, so the fan-in ratio
/// reads the same for every route kind.
#[derive(Clone)]
pub struct CollapseMetrics {
    pub waiting: IntGauge,
    pub topics: IntGauge,
    pub upstream_open: IntGauge,
    pub collapsed: IntCounter,
    pub stored_hits: IntCounter,
    pub set_cookie_removed: IntCounter,
    pub unshareable: IntCounter,
}

impl CollapseMetrics {
    pub fn new(metrics: &Metrics, route: &str) -> CollapseMetrics {
        let r = &[route];
        CollapseMetrics {
            waiting: metrics.polls_active.with_label_values(r),
            topics: metrics.topics_active.with_label_values(r),
            upstream_open: metrics.subscriptions_active.with_label_values(r),
            collapsed: metrics.collapsed_requests.with_label_values(r),
            stored_hits: metrics.stored_hits.with_label_values(r),
            set_cookie_removed: metrics.set_cookie_removed.with_label_values(r),
            unshareable: metrics.unshareable.with_label_values(r),
        }
    }
}

/// Holds a gauge one higher for as long as it lives: keeps "currently open/held" gauges right
/// however the thing they count ends (a dropped future included).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
