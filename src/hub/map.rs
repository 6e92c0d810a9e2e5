//! The map of live topics (`Hub`): each route's share of it and its limits, the hub-wide byte
//! budget, subscriptions, and the sweep and retirement that remove topics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use prometheus::IntGauge;

use super::ring::BufferLimits;
use super::topic::{Fanout, NewMessage, Published, Topic};

/// How a route's topics behave; fixed per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    pub limits: BufferLimits,
    /// A topic without subscribers lives this long after its last activity.
    pub linger: Duration,
    pub max_batch: usize,
    /// Expired readers resume after the gap (200 with `gap: true`) instead of being refused.
    pub resume_on_gap: bool,
    /// Cluster mode: the topic's log lives in the backplane, and the topic mirrors it
    /// (`Topic::sync`, `Topic::apply`) instead of taking publishes.
    pub mirrored: bool,
}

/// One route's share of the hub: its settings, and the count of its live topics.
pub struct RouteTopics {
    pub name: Arc<str>,
    /// This incarnation of the route (a reload that changes it makes a new one): its topics are
    /// its own, never another incarnation's of the same name.
    id: u64,
    pub settings: TopicSettings,
    max_topics: usize,
    count: AtomicUsize,
    pub(super) gauge: IntGauge,
    /// Set when a reload retires the route: no new topic is made for it (a request still on
    /// the old configuration must not start a stray topic and source).
    retired: std::sync::atomic::AtomicBool,
}

impl RouteTopics {
    /// `gauge` tracks the route's live topics (`pollmux_topics_active`).
    pub fn new(name: &str, settings: TopicSettings, max_topics: usize, gauge: IntGauge) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        RouteTopics {
            name: name.into(),
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            settings,
            max_topics,
            count: AtomicUsize::new(0),
            gauge,
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn try_reserve(&self) -> bool {
        let reserved = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_topics).then_some(n + 1)
            })
            .is_ok();
        if reserved {
            self.gauge.inc();
        }
        reserved
    }

    fn release(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TopicKey {
    route: u64,
    topic: Box<str>,
}

/// Why no new topic can be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooManyTopics {
    /// The route has `max_topics` live topics.
    #[error("the route has reached its max_topics")]
    Route,
    /// All topics together buffer `max_buffered_bytes`.
    #[error("the buffers of all topics have reached max_buffered_bytes")]
    Memory,
    /// A reload has just replaced the route.
    #[error("the route was replaced by a reload")]
    Retired,
}

/// Payload bytes buffered over all topics, against a bound: beyond it no new topic is made
/// (existing topics keep working within their own bounds), so memory cannot grow without limit.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    pub(super) fn change(&self, before: usize, after: usize) {
        if after >= before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Bytes buffered now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

pub struct Hub {
    topics: DashMap<TopicKey, Arc<Topic>>,
    /// The route in force under each name (cluster mode finds topics by name).
    names: DashMap<Arc<str>, u64>,
    budget: Arc<Budget>,
    fanout: Arc<Fanout>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::with_budget(usize::MAX)
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// A hub whose topics together buffer at most about `max_bytes` of payload.
    pub fn with_budget(max_bytes: usize) -> Hub {
        Hub {
            topics: DashMap::new(),
            names: DashMap::new(),
            budget: Arc::new(Budget {
                used: AtomicUsize::new(0),
                max: max_bytes,
            }),
            fanout: Arc::default(),
        }
    }

    /// Spreads answers to many parked readers over `runtime`'s workers (see
    /// [`Parked`](super::Parked)).
    pub fn fan_out_on(&self, runtime: tokio::runtime::Handle) {
        let _ = self.fanout.runtime.set(runtime);
    }

    /// Payload bytes buffered over all topics.
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    /// Registers a reader of `topic`, creating the topic if it is new.
    pub fn subscribe(
        &self,
        route: &Arc<RouteTopics>,
        topic: &str,
    ) -> Result<Subscription, TooManyTopics> {
        self.with_topic(route, topic, |t, created| {
            t.subscribers.fetch_add(1, Ordering::AcqRel);
            Subscription {
                topic: t.clone(),
                created,
            }
        })
    }

    /// Publishes into `topic`, creating it if it is new (it then lives for `linger`).
    pub fn publish(
        &self,
        route: &Arc<RouteTopics>,
        topic: &str,
        message: NewMessage,
    ) -> Result<Published, TooManyTopics> {
        self.with_topic(route, topic, |t, _| t.publish(message))
    }

    /// Runs `f` on the topic (and whether this call created it) while holding its map shard,
    /// so a sweep cannot remove it meanwhile.
    fn with_topic<R>(
        &self,
        route: &Arc<RouteTopics>,
        topic: &str,
        f: impl FnOnce(&Arc<Topic>, bool) -> R,
    ) -> Result<R, TooManyTopics> {
        let key = TopicKey {
            route: route.id,
            topic: topic.into(),
        };
        if let Some(t) = self.topics.get(&key) {
            return Ok(f(&t, false));
        }
        match self.topics.entry(key) {
            MapEntry::Occupied(o) => Ok(f(o.get(), false)),
            MapEntry::Vacant(v) => {
                if route.retired.load(Ordering::Acquire) {
                    return Err(TooManyTopics::Retired);
                }
                if self.budget.used() >= self.budget.max {
                    return Err(TooManyTopics::Memory);
                }
                if !route.try_reserve() {
                    return Err(TooManyTopics::Route);
                }
                if route.settings.mirrored {
                    self.names.insert(route.name.clone(), route.id);
                }
                let t = Arc::new(Topic::new(
                    route.clone(),
                    topic,
                    self.budget.clone(),
                    self.fanout.clone(),
                ));
                let r = f(&t, true);
                v.insert(t);
                Ok(r)
            }
        }
    }

    /// The live topic `topic` of the mirrored route named `route`, if this node has it.
    pub fn find(&self, route: &str, topic: &str) -> Option<Arc<Topic>> {
        let id = *self.names.get(route)?;
        let key = TopicKey {
            route: id,
            topic: topic.into(),
        };
        self.topics.get(&key).map(|t| t.clone())
    }

    /// Every live topic of a mirrored route (cluster mode loads them all again after its
    /// backplane connection was lost).
    pub fn mirrored_topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .iter()
            .filter(|t| t.mirrored())
            .map(|t| t.clone())
            .collect()
    }

    /// Removes topics without subscribers idle for their route's linger; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut removed = 0;
        self.topics.retain(|_, t| {
            let keep = t.subscribers.load(Ordering::Acquire) > 0 || !t.lingered(now);
            if !keep {
                t.route.release();
                t.release_bytes();
                t.retired.cancel();
                removed += 1;
            }
            keep
        });
        crate::shrink::after_sweep(&self.topics);
        removed
    }

    /// Removes every topic of `route` (a route a reload removed or changed): their sources stop
    /// and their waiting readers answer at once (see [`Topic::is_retired`]). Returns how many.
    pub fn retire_route(&self, route: &RouteTopics) -> usize {
        route.retired.store(true, Ordering::Release);
        self.names.remove_if(&route.name, |_, id| *id == route.id);
        let mut removed = 0;
        self.topics.retain(|key, t| {
            if key.route != route.id {
                return true;
            }
            t.route.release();
            t.release_bytes();
            t.retired.cancel();
            t.wake();
            removed += 1;
            false
        });
        crate::shrink::after_sweep(&self.topics);
        removed
    }

    /// Wakes every waiting reader of every topic (the server is draining).
    pub fn wake_all(&self) {
        for t in self.topics.iter() {
            t.wake();
        }
    }

    /// Live topics over all routes.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Entries the topic map has room for (tests: a sweep gives the table back).
    #[cfg(test)]
    pub(super) fn table_capacity(&self) -> usize {
        self.topics.capacity()
    }
}

/// A registered reader of a topic; dropping it (however the request ends) unregisters it and
/// starts the topic's linger.
pub struct Subscription {
    topic: Arc<Topic>,
    created: bool,
}

impl Subscription {
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// The topic, for a source task that feeds it.
    pub fn topic_arc(&self) -> Arc<Topic> {
        self.topic.clone()
    }

    /// Whether this subscription created the topic (its source must be started).
    pub fn created(&self) -> bool {
        self.created
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Only the last reader to leave starts the linger: the others leave without the
        // topic's lock (a fan-out ends thousands of subscriptions at once). The last one marks
        // the time before it leaves, so a sweep never sees a readerless topic with a stale
        // mark.
        let subscribers = &self.topic.subscribers;
        let others_stay = subscribers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 1).then(|| n - 1)
            })
            .is_ok();
        if !others_stay {
            self.topic.state().last_active = Instant::now();
            subscribers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
