//! Cluster mode's series: the backplane's health, its commands, and what it repaired.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

use super::{NAMESPACE, opts};

/// Backplane command latencies: loopback Redis answers in well under a millisecond; a blocked
/// read lasts up to its block time.
const COMMAND_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Publish (the backplane's clock) to the message being in this node's topic.
const PROPAGATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub struct BackplaneMetrics {
    pub up: IntGauge,
    pub reconnects: IntCounterVec,
    pub command_duration: HistogramVec,
    pub propagation: Histogram,
    pub repairs: IntCounterVec,
    pub epoch_resets: IntCounterVec,
    pub dedupe: IntCounterVec,
    pub leases_held: IntGaugeVec,
    pub lease_transitions: IntCounterVec,
}

/// Why a backplane connection was opened again.
pub const RECONNECT_REASONS: [&str; 3] = ["error", "timeout", "readonly"];
/// The backplane commands whose latency is recorded.
pub const COMMANDS: [&str; 5] = ["publish", "read", "load", "epoch", "lease"];
/// What happens to a lease of this node.
const LEASE_EVENTS: [&str; 5] = ["acquired", "released", "lost", "renewal_failed", "fenced"];

impl BackplaneMetrics {
    /// The series, exported by `registry` only in cluster mode (`clustered`): a single node has
    /// no backplane, and a `backplane_up` of 0 there would be a false alarm.
    pub(super) fn new(registry: &Registry, clustered: bool) -> BackplaneMetrics {
        let register = |c: Box<dyn prometheus::core::Collector>| {
            if clustered {
                registry.register(c).expect("registered once");
            }
        };
        let up = IntGauge::with_opts(opts(
            "backplane_up",
            "Cluster mode: 1 while the backplane (Redis) answers this node, 0 while it does not.",
        ))
        .expect("valid metric");
        register(Box::new(up.clone()));
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(name, help), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let reconnects = counter(
            "backplane_reconnects_total",
            "Backplane connections opened again, by reason: error (refused, reset, closed), \
             timeout (no answer in time: a half-open connection) or readonly (the server was \
             demoted to a replica).",
            &["reason"],
        );
        for r in RECONNECT_REASONS {
            reconnects.with_label_values(&[r]);
        }
        let command_duration = HistogramVec::new(
            HistogramOpts::new(
                "backplane_command_duration_seconds",
                "Backplane command latency, by command: publish, read (the announcement \
                 stream's blocking read), load (a topic's log), epoch (retiring an epoch), lease \
                 (taking, renewing, giving up a source's lease).",
            )
            .namespace(NAMESPACE)
            .buckets(COMMAND_BUCKETS.to_vec()),
            &["command"],
        )
        .expect("valid metric");
        register(Box::new(command_duration.clone()));
        for c in COMMANDS {
            command_duration.with_label_values(&[c]);
        }
        let propagation = Histogram::with_opts(
            HistogramOpts::new(
                "backplane_propagation_seconds",
                "Time from a message being logged in the backplane (its clock) to it being in \
                 this node's topic, for messages announced to this node.",
            )
            .namespace(NAMESPACE)
            .buckets(PROPAGATION_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        register(Box::new(propagation.clone()));
        let repairs = counter(
            "backplane_repairs_total",
            "Topics loaded again from their log after a hole in the announcements, by result: \
             filled (every position recovered) or gap (the log no longer had some: a gap).",
            &["route", "result"],
        );
        let epoch_resets = counter(
            "backplane_epoch_resets_total",
            "Topics whose epoch ended (older cursors get 410), by cause: new_epoch (the log \
             started again: Redis restarted without persistence, or evicted it) or regression \
             (the log lost positions clients had seen: a failover lost its tail).",
            &["route", "cause"],
        );
        let dedupe = counter(
            "backplane_dedupe_total",
            "Publishes answered with an earlier message's cursor, because its Message-Id (or \
             upstream id) was already logged, on any node.",
            &["route"],
        );
        let leases_held = IntGaugeVec::new(
            opts(
                "topic_leases_held",
                "Cluster mode: topics whose upstream source this node runs (it holds their lease).",
            ),
            &["route"],
        )
        .expect("valid metric");
        register(Box::new(leases_held.clone()));
        let lease_transitions = counter(
            "topic_lease_transitions_total",
            "Cluster mode: this node's source leases, by event: acquired, released (the topic \
             ended here), lost (another node holds it), renewal_failed (not renewed in time: \
             the source stopped), fenced (an append refused because the lease was gone).",
            &["route", "event"],
        );
        BackplaneMetrics {
            up,
            leases_held,
            lease_transitions,
            reconnects,
            command_duration,
            propagation,
            repairs,
            epoch_resets,
            dedupe,
        }
    }

    /// Creates the series of a poll route.
    pub(super) fn precreate_route(&self, route: &str) {
        for result in ["filled", "gap"] {
            self.repairs.with_label_values(&[route, result]);
        }
        for cause in ["new_epoch", "regression"] {
            self.epoch_resets.with_label_values(&[route, cause]);
        }
        self.dedupe.with_label_values(&[route]);
        self.leases_held.with_label_values(&[route]);
        for event in LEASE_EVENTS {
            self.lease_transitions.with_label_values(&[route, event]);
        }
    }
}
