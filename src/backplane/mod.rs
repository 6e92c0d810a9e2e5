//! Cluster mode: several nodes as one gateway on a Redis backplane.
//!
//! Each topic of a mirrored route has its log in Redis (`scripts.rs` has the key layout): a
//! publish on any node appends to it in one script, atomically with the topic's sequence and
//! its announcement on one of a few firehose streams. Every node reads all of them with one
//! blocking read (`reader.rs`) and applies what concerns a topic it holds; a topic a node
//! does not hold yet is loaded from its log first. Cursors are the log's (epoch, position), so
//! they are valid on every node; a hole is filled from the log before anyone is answered, and
//! a log that started again, or lost positions clients had seen, ends its epoch (410).
//!
//! The backplane never answers a client: it feeds topics, and says when it cannot
//! ([`BackplaneError`]).

mod lease;
mod link;
mod publish;
mod reader;
mod scripts;

pub use lease::Lease;
pub use publish::Append;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use redis::{FromRedisValue, RedisError, RedisResult, ScriptInvocation, Value};
use tokio::time::Instant;

use crate::config::{ClusterConfig, RedisConfig};
use crate::hub::{Applied, Hub, Remote, Synced, Topic};
use crate::metrics::Metrics;

use link::Link;
use scripts::{Keys, Scripts, fresh_epoch};

/// What one load of a topic found.
enum Loaded {
    /// The topic is at the log's head (or was given a new epoch).
    Current,
    /// It must be loaded again; `retired`: this node retired the log's epoch (a regression).
    Again { retired: bool },
}

/// Why the backplane could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackplaneError {
    /// Redis has been unreachable for longer than `backplane_grace`.
    #[error("the backplane has been unreachable for longer than backplane_grace")]
    Unreachable,
    /// Redis answered, but not as pollmux's scripts do (a key of the wrong type, a script
    /// error): nothing was written.
    #[error("the backplane refused the command: {0}")]
    Refused(String),
    /// A leased source's append after its node lost the lease: another node owns the source.
    #[error("this node no longer holds the topic's lease")]
    Fenced,
}

/// A meta hash outlives its log by far: a topic's identity (its epoch) must survive quiet
/// periods, so that cursors stay valid while the log is merely empty.
const META_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Pause between attempts while Redis does not answer (doubling up to [`RETRY_MAX`]).
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Loads of one topic that may find it still behind before the next one waits a pause.
const LOADS_AT_ONCE: u32 = 4;

pub struct Backplane {
    config: RedisConfig,
    grace: Duration,
    lease_ttl: Duration,
    node: String,
    link: Link,
    scripts: Scripts,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    health: Health,
    /// Topics being loaded; `true`: asked again meanwhile, load once more.
    loading: DashMap<(Arc<str>, Box<str>), bool>,
    /// The runtime the backplane's connections and tasks live on (a publish from the admin
    /// listener's own runtime runs there).
    runtime: tokio::runtime::Handle,
}

/// Whether Redis answers, and since when it has not.
struct Health {
    down_since: Mutex<Option<Instant>>,
    gauge: prometheus::IntGauge,
    /// Woken when Redis answers again: loads waiting out a pause retry at once.
    recovered: tokio::sync::Notify,
}

impl Health {
    fn ok(&self) {
        let was_down = self
            .down_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        self.gauge.set(1);
        if was_down {
            self.recovered.notify_waiters();
        }
    }

    /// Records a failure; how long Redis has not answered.
    fn failed(&self) -> Duration {
        self.gauge.set(0);
        let now = Instant::now();
        let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        now.saturating_duration_since(*since.get_or_insert(now))
    }
}

impl Backplane {
    /// The backplane of `cluster` (which has a Redis backplane), on the current runtime.
    /// Connects lazily: nothing is sent before [`Backplane::start`] or the first command.
    pub fn new(
        cluster: &ClusterConfig,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> RedisResult<Arc<Backplane>> {
        let config = cluster
            .redis
            .clone()
            .expect("a backplane is built only for [cluster.redis]");
        let node = cluster.node_id.clone().unwrap_or_else(host_name);
        let link = Link::new(&config, &node)?;
        metrics.backplane.up.set(0);
        Ok(Arc::new(Backplane {
            health: Health {
                down_since: Mutex::new(None),
                gauge: metrics.backplane.up.clone(),
                recovered: tokio::sync::Notify::new(),
            },
            config,
            grace: cluster.backplane_grace,
            lease_ttl: cluster.lease_ttl,
            node,
            link,
            scripts: Scripts::default(),
            hub,
            metrics,
            loading: DashMap::new(),
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// Starts following the announcements. Runs until the runtime ends.
    pub fn start(self: &Arc<Self>) {
        tracing::info!(node = %self.node, "cluster mode: following the backplane");
        self.runtime.spawn(self.clone().follow());
    }

    /// How long Redis trouble is hidden before answers that need it fail.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Loads `topic` from its log (a topic this node just made, or one whose announcements
    /// left a hole), unless a load of it is under way: then that one loads once more, and
    /// the answer is true.
    pub fn load(self: &Arc<Self>, topic: Arc<Topic>) -> bool {
        let key = (topic.route().name.clone(), Box::<str>::from(topic.name()));
        match self.loading.entry(key.clone()) {
            dashmap::Entry::Occupied(mut again) => {
                *again.get_mut() = true;
                return true;
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(false);
            }
        }
        let this = self.clone();
        self.runtime
            .spawn(async move { this.load_until_current(&topic, &key).await });
        false
    }

    /// Loads until the topic is current and nobody asked again meanwhile; then `key` leaves
    /// `loading`.
    async fn load_until_current(self: &Arc<Self>, topic: &Topic, key: &(Arc<str>, Box<str>)) {
        let (mut pause, mut behind) = (RETRY_FIRST, 0);
        // This node retired the epoch itself (a regression): the next load's new epoch is
        // that one, already counted.
        let mut retired_here = false;
        while !topic.is_retired() {
            match self
                .load_once(topic, std::mem::take(&mut retired_here))
                .await
            {
                Ok(Loaded::Again { retired }) => {
                    retired_here = retired;
                    behind += 1;
                    if behind >= LOADS_AT_ONCE {
                        behind = 0;
                        tokio::time::sleep(jittered(pause)).await;
                        pause = (pause * 2).min(RETRY_MAX);
                    }
                }
                Ok(Loaded::Current) => {
                    if self.loading.remove_if(key, |_, again| !*again).is_some() {
                        return;
                    }
                    if let Some(mut again) = self.loading.get_mut(key) {
                        *again = false;
                    }
                }
                Err(e) => {
                    // Redis not answering is hidden for the grace; Redis refusing is not.
                    let down = !link::connection_broken(&e) || self.health.failed() >= self.grace;
                    topic.load_failed(down);
                    tracing::debug!(route = %key.0, topic = %key.1, error = %e, "loading a topic from the backplane failed");
                    tokio::select! {
                        () = tokio::time::sleep(jittered(pause)) => {}
                        () = self.health.recovered.notified() => {}
                    }
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
        // The topic ended here. A topic of the same name made meanwhile asked for a load that
        // this task took over: it gets its own.
        if let Some((_, true)) = self.loading.remove(key)
            && let Some(live) = self.hub.find(&key.0, &key.1)
        {
            self.load(live);
        }
    }

    /// One load: whether the topic is current (or was given a new epoch), or must be loaded
    /// again. `retired_here`: this node retired the epoch before it, for a regression.
    async fn load_once(&self, topic: &Topic, retired_here: bool) -> RedisResult<Loaded> {
        let route = topic.route();
        let keys = Keys::new(&self.config.prefix, &route.name, topic.name());
        let held = topic.position();
        let head = held.map_or(-1, |(_, head, _)| i64::try_from(head).unwrap_or(i64::MAX));
        let held_epoch = held
            .map(|(epoch, _, _)| epoch.to_string())
            .unwrap_or_default();
        let mut invocation = self.scripts.load.key(&keys.meta);
        invocation
            .key(&keys.log)
            .arg(fresh_epoch())
            .arg(route.settings.limits.messages.max(1))
            .arg(millis(META_TTL))
            .arg(head)
            .arg(held_epoch);
        let (epoch, seq, entries, failing_since, refused, down): (
            String,
            String,
            Vec<Value>,
            String,
            String,
            String,
        ) = self.eval("load", &invocation).await?;
        let (Some(parsed), Ok(seq)) = (parse_epoch(&epoch), seq.parse::<u64>()) else {
            tracing::warn!(route = %route.name, topic = topic.name(), "the backplane's meta hash is malformed; retiring its epoch");
            self.retire_epoch(topic, &epoch).await?;
            return Ok(Loaded::Again { retired: true });
        };
        let tail: Vec<Remote> = entries.iter().filter_map(reader::log_entry).collect();
        // The upstream's state as the node running the source last announced it (announcements
        // missed while this node was away included); that node announces again on its next
        // change.
        let upstream = reader::upstream_state(Some(&failing_since), Some(&refused), Some(&down));
        topic.set_upstream_state(upstream);
        let resets = &self.metrics.backplane.epoch_resets;
        let known = held.map_or(0, |(_, head, _)| head);
        match topic.sync(parsed, seq, known, tail) {
            Synced::Current { gap } => {
                // A topic this node already held, brought forward: a repair.
                let moved = held.zip(topic.position()).is_some_and(|(a, b)| b.1 > a.1);
                let result = if gap { "gap" } else { "filled" };
                if moved {
                    let repairs = &self.metrics.backplane.repairs;
                    repairs.with_label_values(&[&route.name, result]).inc();
                }
                Ok(Loaded::Current)
            }
            Synced::NewEpoch => {
                tracing::warn!(route = %route.name, topic = topic.name(), "the backplane's log started again: older cursors are expired");
                if !retired_here {
                    resets.with_label_values(&[&route.name, "new_epoch"]).inc();
                }
                Ok(Loaded::Current)
            }
            Synced::Regressed => {
                tracing::warn!(route = %route.name, topic = topic.name(), "the backplane's log lost positions clients had seen (a failover?): retiring its epoch");
                resets.with_label_values(&[&route.name, "regression"]).inc();
                // The epoch as Redis wrote it, so that the retiring script recognises it.
                self.retire_epoch(topic, &epoch).await?;
                Ok(Loaded::Again { retired: true })
            }
            Synced::Hole => Ok(Loaded::Again { retired: false }),
        }
    }

    async fn retire_epoch(&self, topic: &Topic, epoch: &str) -> RedisResult<()> {
        let keys = Keys::new(&self.config.prefix, &topic.route().name, topic.name());
        let mut invocation = self.scripts.retire_epoch.key(&keys.meta);
        invocation.key(&keys.log).arg(epoch).arg(fresh_epoch());
        self.eval::<Value>("epoch", &invocation).await.map(drop)
    }

    /// Runs a script once on the command connection, recording its latency and Redis's
    /// health; a broken connection is replaced for the next command.
    async fn eval<T: FromRedisValue>(
        &self,
        command: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        let started = Instant::now();
        let result = match self.link.get().await {
            Ok(mut conn) => invocation.invoke_async(&mut conn).await,
            Err(e) => Err(e),
        };
        self.metrics
            .backplane
            .command_duration
            .with_label_values(&[command])
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.health.ok(),
            Err(e) => self.connection_failed(e),
        }
        result
    }

    /// Counts a failed connection and drops it if it is broken.
    fn connection_failed(&self, e: &RedisError) {
        if link::connection_broken(e) {
            if self.link.failed(e) {
                let reconnects = &self.metrics.backplane.reconnects;
                reconnects.with_label_values(&[link::reason(e)]).inc();
            }
            self.health.failed();
        }
    }

    /// An announcement of `epoch`'s position for `topic` of `route`: applied if this node
    /// holds the topic; a hole or a divergence loads it again.
    fn announced(self: &Arc<Self>, route: &str, topic: &str, epoch: u64, entry: Remote) {
        let Some(t) = self.hub.find(route, topic) else {
            return;
        };
        let origin = entry.origin;
        match t.apply(epoch, entry) {
            Applied::Appended => {
                let delay = since_origin(origin).as_secs_f64();
                self.metrics.backplane.propagation.observe(delay);
            }
            Applied::Hole | Applied::Diverged => {
                self.load(t);
            }
            Applied::Duplicate | Applied::Buffered => {}
        }
    }
}

/// The announcement stream of `topic` of `route`.
fn firehose_of(config: &RedisConfig, route: &str, topic: &str) -> String {
    let shard = crate::hub::cursor::binding(route, topic) % u64::from(config.firehose_shards);
    scripts::firehose(&config.prefix, shard as u16)
}

/// The time since a backplane timestamp (ms since the Unix epoch, Redis's clock), 0 when it is
/// in the future (clocks differ) and at most an hour.
fn since_origin(origin_ms: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(Duration::from_millis(origin_ms))
        .min(Duration::from_secs(3600))
}

/// This node's idea of when a message logged at `origin_ms` arrived (its age decides
/// `buffer.age`, so it is not capped as the metric's is).
fn arrived_at(origin_ms: u64) -> Instant {
    let now = Instant::now();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let age = wall.saturating_sub(Duration::from_millis(origin_ms));
    now.checked_sub(age).unwrap_or(now)
}

/// An epoch as the meta hash stores it: a canonical decimal (as pollmux writes it), never 0.
fn parse_epoch(text: &str) -> Option<u64> {
    text.parse::<u64>()
        .ok()
        .filter(|e| *e != 0 && e.to_string() == text)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `pause` plus up to half of it, so nodes retrying together drift apart.
fn jittered(pause: Duration) -> Duration {
    pause + pause.mul_f64(fastrand::f64() / 2.0)
}

/// The host name the OS reports, for `node_id`'s default.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("pollmux-{:08x}", fastrand::u32(..)))
}
