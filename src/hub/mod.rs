//! The hub: every live topic of every `poll` route, each an ordered, bounded buffer that one
//! source feeds and any number of clients read.
//!
//! Invariants callers rely on:
//! - [`Topic::publish`] is synchronous and never waits for a reader; readers catch up from the
//!   buffer or are told they fell behind (`Expired`).
//! - No lock or map guard is held across an `.await`: waiting is on a [`Notify`] taken out of
//!   the topic, after the lock is released.
//! - A topic is removed only by [`Hub::sweep`], only when it has no subscriber and has been idle
//!   for its route's `linger`; subscribing and publishing happen under the map's shard lock, so a
//!   sweep can never remove a topic between a reader finding it and registering, or under a
//!   publisher.
//! - A batch for a given (topic, position) is encoded once and shared by every reader at that
//!   position: fan-out to 10,000 waiters costs one encoding.
//! - A reader waits either on the topic's [`Notify`] (it is woken and polls again) or parked
//!   ([`Parked`]): the publisher hands parked readers their batch itself, so a fan-out wakes no
//!   task. Parking succeeds only if nothing changed since the reader's poll (its generation),
//!   and every change takes the whole parked list, so a parked reader is never missed.
//!
//! The hub imports no gateway, source or server code; it is a data structure.

pub mod cursor;
pub mod message;
pub mod ring;

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use prometheus::IntGauge;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use cursor::{Cursor, Requested};
use ring::{BufferLimits, Entry, Read, Ring};

/// How long a `Message-Id` is remembered for de-duplication (docs/protocol.md 3).
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(60);
/// At most this many remembered ids per topic; the oldest are forgotten first.
pub const DEDUPE_MAX: usize = 10_000;
/// A response batch stops growing past about this many bytes (docs/protocol.md 1.3).
pub const BATCH_BYTES_MAX: usize = 1 << 20;

/// How a route's topics behave; fixed per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    pub limits: BufferLimits,
    /// A topic without subscribers lives this long after its last activity.
    pub linger: Duration,
    pub max_batch: usize,
    /// Expired readers resume after the gap (200 with `gap: true`) instead of being refused.
    pub resume_on_gap: bool,
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
    gauge: IntGauge,
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
    fn change(&self, before: usize, after: usize) {
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
    budget: Arc<Budget>,
    fanout: Arc<Fanout>,
}

/// Parked readers answered by one task at most: a publish to more is spread over the runtime's
/// workers.
const FANOUT_CHUNK: usize = 256;

/// Where answers to parked readers are written: in tasks of at most [`FANOUT_CHUNK`] readers
/// on a runtime's workers (so the publisher, perhaps the admin thread, returns at once and a
/// large fan-out uses every worker), or by the publisher itself when there is no runtime.
#[derive(Default)]
struct Fanout {
    runtime: OnceLock<tokio::runtime::Handle>,
}

impl Fanout {
    fn deliver(&self, parked: HashMap<u64, (Arc<dyn Parked>, u64)>, batch: Arc<Batch>) {
        let mut readers: Vec<_> = parked.into_values().collect();
        let Some(runtime) = self.runtime.get() else {
            return deliver_to(readers, &batch);
        };
        while !readers.is_empty() {
            let chunk = readers.split_off(readers.len().saturating_sub(FANOUT_CHUNK));
            let batch = batch.clone();
            runtime.spawn(async move { deliver_to(chunk, &batch) });
        }
    }
}

fn deliver_to(readers: Vec<(Arc<dyn Parked>, u64)>, batch: &Arc<Batch>) {
    for (reader, ticket) in readers {
        reader.deliver(ticket, batch);
    }
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
            budget: Arc::new(Budget {
                used: AtomicUsize::new(0),
                max: max_bytes,
            }),
            fanout: Arc::default(),
        }
    }

    /// Spreads answers to many parked readers over `runtime`'s workers (see [`Parked`]).
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
        removed
    }

    /// Removes every topic of `route` (a route a reload removed or changed): their sources stop
    /// and their waiting readers answer at once (see [`Topic::is_retired`]). Returns how many.
    pub fn retire_route(&self, route: &RouteTopics) -> usize {
        route.retired.store(true, Ordering::Release);
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
}

/// A message entering a topic.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The upstream's id (`Message-Id` for publishes); also the de-duplication key.
    pub id: Option<String>,
    pub content_type: Option<String>,
    pub payload: Bytes,
    pub arrived: Instant,
}

/// The result of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Cursor of the message (of the earlier one, for a duplicate).
    pub cursor: String,
    pub duplicate: bool,
    /// False when the message exceeded the buffer and became a gap.
    pub stored: bool,
}

/// An encoded poll response body, shared by every reader at the same position.
#[derive(Debug)]
pub struct Batch {
    pub body: Bytes,
    /// The cursor the body names.
    pub cursor: String,
    pub messages: usize,
    /// Arrival of the oldest message in the batch (delivery latency).
    pub oldest: Instant,
    pub gap: bool,
    /// The batch's answer as a connection path writes it for parked readers, encoded once by
    /// the first that writes it (opaque to the hub: the server's HTTP/1.1 path keeps its
    /// headers and body there).
    pub encoded: OnceLock<Bytes>,
    from: u64,
    head: u64,
}

/// What a poll finds now.
#[derive(Debug)]
pub enum Poll {
    Batch(Arc<Batch>),
    /// Nothing newer; `at` is where the reader stands, `generation` the topic's state it saw
    /// (see [`Topic::park`]).
    Empty {
        at: Cursor,
        generation: u64,
    },
    /// The reader missed messages (docs/protocol.md 1.3, 410).
    Expired {
        earliest: String,
        latest: String,
    },
    /// The cursor is ahead of the topic's head.
    Ahead,
}

pub struct Topic {
    route: Arc<RouteTopics>,
    name: Box<str>,
    /// This incarnation; cursors of earlier ones are expired.
    epoch: u64,
    binding: u64,
    state: Mutex<State>,
    notify: Notify,
    subscribers: AtomicUsize,
    /// Cancelled when the sweep removes the topic: its source stops.
    retired: CancellationToken,
    /// The hub-wide count of buffered bytes this topic's ring adds to.
    budget: Arc<Budget>,
    fanout: Arc<Fanout>,
}

struct State {
    ring: Ring,
    /// The last batch encoded, reused while (position, head, gap) match.
    cache: Option<Arc<Batch>>,
    dedupe: Dedupe,
    last_active: Instant,
    /// Since when the topic's upstream source has been failing, if it is.
    failing_since: Option<Instant>,
    /// The upstream's last definitive refusal (404, 401, 403) while failing.
    refused: Option<u16>,
    /// Whether the ring's bytes count against the hub's budget (until the topic is removed).
    counted: bool,
    /// Bumped by every change a waiting reader must see (message, gap, upstream state, wake).
    generation: u64,
    /// Readers parked at the head, answered in place by the next change.
    parked: HashMap<u64, (Arc<dyn Parked>, u64)>,
    next_park: u64,
}

/// A reader waiting at a topic's head that is answered in place: the publisher hands it its
/// batch instead of waking its task, so a fan-out to 10,000 readers switches no task.
/// `ticket` is the reader's own mark for this wait, given to [`Topic::park`]; an answer for an
/// older wait must be ignored.
pub trait Parked: Send + Sync {
    /// Messages arrived after the parked position: `batch` is the reader's answer.
    fn deliver(&self, ticket: u64, batch: &Arc<Batch>);
    /// Anything else changed (a gap, the upstream's state, a drain, retirement): the reader
    /// must poll again.
    fn wake(&self, ticket: u64);
}

/// A parked reader's place in its topic, for [`Topic::unpark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkId(u64);

impl State {
    /// Applies a ring change of `before` -> now to the budget, while the topic counts.
    fn account(&self, budget: &Budget, before: usize) {
        if self.counted {
            budget.change(before, self.ring.bytes());
        }
    }
}

/// What a poll with nothing to read is told about its topic's upstream (docs/protocol.md 1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProblem {
    /// The upstream says the topic does not exist: 404 to clients.
    NotFound,
    /// The upstream refused pollmux's own credential: 502.
    Refused,
    /// Unreachable or failing for longer than the route's `upstream_grace`: 503.
    Down,
}

impl Topic {
    fn new(route: Arc<RouteTopics>, name: &str, budget: Arc<Budget>, fanout: Arc<Fanout>) -> Topic {
        Topic {
            binding: cursor::binding(&route.name, name),
            epoch: fastrand::u64(1..),
            state: Mutex::new(State {
                ring: Ring::new(route.settings.limits),
                cache: None,
                dedupe: Dedupe::default(),
                last_active: Instant::now(),
                failing_since: None,
                refused: None,
                counted: true,
                generation: 0,
                parked: HashMap::new(),
                next_park: 0,
            }),
            route,
            name: name.into(),
            notify: Notify::new(),
            subscribers: AtomicUsize::new(0),
            retired: CancellationToken::new(),
            budget,
            fanout,
        }
    }

    /// Gives the ring's bytes back to the hub's budget (the topic is being removed); later
    /// changes to its ring (a held reader expiring messages) no longer count.
    fn release_bytes(&self) {
        let mut st = self.state();
        if st.counted {
            st.counted = false;
            self.budget.change(st.ring.bytes(), 0);
        }
    }

    /// Completes when the topic has been removed; a source feeding it stops then.
    pub fn retired(&self) -> WaitForCancellationFuture<'_> {
        self.retired.cancelled()
    }

    /// Whether the topic has been removed. Only a retired route's topics are removed while
    /// they have readers; those readers answer at once.
    pub fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the ring inconsistent in a way that
        // matters more than stopping the topic; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cursor(&self, seq: u64) -> String {
        Cursor {
            binding: self.binding,
            epoch: self.epoch,
            seq,
        }
        .encode()
    }

    fn lingered(&self, now: Instant) -> bool {
        let st = self.state();
        now.saturating_duration_since(st.last_active) >= self.route.settings.linger
    }

    /// Appends a message and wakes every waiting reader. Never blocks on readers.
    pub fn publish(&self, message: NewMessage) -> Published {
        let mut st = self.state();
        st.last_active = message.arrived;
        if let Some(id) = &message.id
            && let Some(seq) = st.dedupe.seen(id, message.arrived)
        {
            return Published {
                cursor: self.cursor(seq),
                duplicate: true,
                stored: false,
            };
        }
        let seq = st.ring.next_seq();
        let cursor = self.cursor(seq);
        let json = message::encode(
            &cursor,
            message.id.as_deref(),
            message.content_type.as_deref(),
            &message.payload,
        );
        let entry = Entry {
            seq,
            arrived: message.arrived,
            json,
            size: message.payload.len(),
        };
        let before = st.ring.bytes();
        let stored = st.ring.push(entry, message.arrived);
        st.account(&self.budget, before);
        if let Some(id) = message.id {
            st.dedupe.remember(id, seq, message.arrived);
        }
        st.generation += 1;
        let parked = mem::take(&mut st.parked);
        let answer = (!parked.is_empty()).then(|| {
            // Every parked reader stands at the head this message follows.
            let at = Cursor {
                binding: self.binding,
                epoch: self.epoch,
                seq: seq - 1,
            };
            self.poll_locked(&mut st, Requested::At(at), message.arrived)
        });
        drop(st);
        match answer {
            Some(Poll::Batch(batch)) => self.fanout.deliver(parked, batch),
            // The message went straight into a gap, or the buffer's age limit moved past the
            // parked position: each reader sorts out its own answer.
            Some(_) => wake_parked(parked),
            None => {}
        }
        self.notify.notify_waiters();
        Published {
            cursor,
            duplicate: false,
            stored,
        }
    }

    /// The source is connected: upstream problems are over.
    pub fn upstream_ok(&self) {
        let mut st = self.state();
        st.failing_since = None;
        st.refused = None;
    }

    /// The source failed to connect; `status` is the upstream's answer, if it gave one.
    /// Wakes readers so that a definitive refusal reaches them at once.
    pub fn upstream_failed(&self, status: Option<u16>, now: Instant) {
        let mut st = self.state();
        st.failing_since.get_or_insert(now);
        st.refused = status.filter(|s| matches!(s, 401 | 403 | 404));
        self.changed_now(st);
    }

    /// Since when the source has been failing, if it is.
    pub fn failing_since(&self) -> Option<Instant> {
        self.state().failing_since
    }

    /// Wakes every waiting reader (to re-check the upstream's state, a drain, retirement).
    pub fn wake(&self) {
        self.changed_now(self.state());
    }

    /// A change every waiting reader must look at: parked ones are woken too.
    fn changed_now(&self, mut st: MutexGuard<'_, State>) {
        st.generation += 1;
        let parked = mem::take(&mut st.parked);
        drop(st);
        wake_parked(parked);
        self.notify.notify_waiters();
    }

    /// The problem a poll with nothing to read must be told about, if any.
    pub fn upstream_problem(&self, grace: Duration, now: Instant) -> Option<UpstreamProblem> {
        let st = self.state();
        let since = st.failing_since?;
        match st.refused {
            Some(404) => Some(UpstreamProblem::NotFound),
            Some(_) => Some(UpstreamProblem::Refused),
            None if now.saturating_duration_since(since) >= grace => Some(UpstreamProblem::Down),
            None => None,
        }
    }

    /// Records a gap after the current head (messages lost upstream) and wakes readers.
    pub fn record_gap(&self) {
        let mut st = self.state();
        let before = st.ring.bytes();
        st.ring.record_gap();
        st.account(&self.budget, before);
        self.changed_now(st);
    }

    /// What a reader at `at` finds now. Cursors must already be checked to belong to this
    /// (route, topic); see [`Topic::binding`].
    pub fn poll(&self, at: Requested, now: Instant) -> Poll {
        self.poll_locked(&mut self.state(), at, now)
    }

    /// Parks `reader` at the head, where its poll found nothing, unless the topic changed
    /// since that poll (`generation` of its `Poll::Empty`): then `None`, and it polls again.
    /// Until the next change answers it, or [`Topic::unpark`], the topic keeps `reader`.
    pub fn park(&self, generation: u64, reader: Arc<dyn Parked>, ticket: u64) -> Option<ParkId> {
        let mut st = self.state();
        if st.generation != generation {
            return None;
        }
        let id = st.next_park;
        st.next_park += 1;
        st.parked.insert(id, (reader, ticket));
        Some(ParkId(id))
    }

    /// Takes a parked reader back (its wait ended otherwise); a no-op once a change took it.
    pub fn unpark(&self, id: ParkId) {
        let removed = self.state().parked.remove(&id.0);
        // Dropped outside the lock: it may be the reader's last reference.
        drop(removed);
    }

    fn poll_locked(&self, st: &mut State, at: Requested, now: Instant) -> Poll {
        let before = st.ring.bytes();
        st.ring.expire(now);
        st.account(&self.budget, before);
        let (floor, head) = (st.ring.floor(), st.ring.head());
        let resume = self.route.settings.resume_on_gap;
        let (after, gap) = match at {
            Requested::Earliest => (floor, false),
            Requested::Latest => (head, false),
            Requested::At(c) if c.epoch != self.epoch || c.seq < floor => {
                if !resume {
                    return Poll::Expired {
                        earliest: self.cursor(floor),
                        latest: self.cursor(head),
                    };
                }
                (floor, true)
            }
            Requested::At(c) => (c.seq, false),
        };
        let s = &self.route.settings;
        match st.ring.read(after, s.max_batch, BATCH_BYTES_MAX) {
            Read::Ahead => Poll::Ahead,
            Read::Expired => unreachable!("positions below the floor were handled above"),
            Read::Empty if !gap => Poll::Empty {
                at: Cursor {
                    binding: self.binding,
                    epoch: self.epoch,
                    seq: after,
                },
                generation: st.generation,
            },
            Read::Empty => Poll::Batch(self.encode(st, after, after, false, true)),
            Read::Messages { from, to, more } => Poll::Batch(self.encode(st, from, to, more, gap)),
        }
    }

    /// The encoded batch `from+1 ..= to`, from the cache when another reader asked first.
    fn encode(&self, st: &mut State, from: u64, to: u64, more: bool, gap: bool) -> Arc<Batch> {
        let head = st.ring.head();
        if let Some(b) = &st.cache
            && b.from == from
            && b.head == head
            && b.gap == gap
        {
            return b.clone();
        }
        let cursor = self.cursor(to);
        let mut body = BytesMut::with_capacity(64 + cursor.len());
        body.put_slice(b"{\"cursor\":\"");
        body.put_slice(cursor.as_bytes());
        body.put_slice(b"\",\"messages\":[");
        let mut oldest = None;
        let mut messages = 0;
        for (i, e) in st.ring.entries(from, to).enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(&e.json);
            oldest.get_or_insert(e.arrived);
            messages += 1;
        }
        body.put_slice(if more {
            b"],\"more\":true"
        } else {
            b"],\"more\":false"
        });
        if gap {
            body.put_slice(b",\"gap\":true");
        }
        body.put_u8(b'}');
        let batch = Arc::new(Batch {
            body: body.freeze(),
            cursor,
            messages,
            oldest: oldest.unwrap_or_else(Instant::now),
            gap,
            encoded: OnceLock::new(),
            from,
            head,
        });
        st.cache = Some(batch.clone());
        batch
    }

    /// The binding a cursor must carry to belong to this topic.
    pub fn binding(&self) -> u64 {
        self.binding
    }

    /// A future that completes at the next publish or gap. Create it (and `enable` it) before
    /// polling, so a publish between the poll and the wait is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

/// Tells parked readers that something other than a message changed.
fn wake_parked(parked: HashMap<u64, (Arc<dyn Parked>, u64)>) {
    for (reader, ticket) in parked.into_values() {
        reader.wake(ticket);
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

/// Recently seen message ids of one topic, forgotten after [`DEDUPE_WINDOW`].
#[derive(Default)]
struct Dedupe {
    seqs: HashMap<String, u64>,
    order: VecDeque<(Instant, String)>,
}

impl Dedupe {
    fn seen(&mut self, id: &str, now: Instant) -> Option<u64> {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < DEDUPE_WINDOW && self.order.len() <= DEDUPE_MAX
            {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.seqs.remove(&old);
            }
        }
        self.seqs.get(id).copied()
    }

    fn remember(&mut self, id: String, seq: u64, now: Instant) {
        self.order.push_back((now, id.clone()));
        self.seqs.insert(id, seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(max_topics: usize, linger_ms: u64, resume: bool) -> Arc<RouteTopics> {
        let settings = TopicSettings {
            limits: BufferLimits {
                messages: 3,
                bytes: 1 << 20,
                age: Duration::from_secs(300),
            },
            linger: Duration::from_millis(linger_ms),
            max_batch: 100,
            resume_on_gap: resume,
        };
        let gauge = IntGauge::new("t", "t").unwrap();
        Arc::new(RouteTopics::new("r", settings, max_topics, gauge))
    }

    fn msg(text: &str) -> NewMessage {
        NewMessage {
            id: None,
            content_type: Some("text/plain".into()),
            payload: Bytes::from(text.to_owned()),
            arrived: Instant::now(),
        }
    }

    fn batch(p: Poll) -> Arc<Batch> {
        match p {
            Poll::Batch(b) => b,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn readers_at_one_position_share_one_encoding() {
        let hub = Hub::new();
        let r = route(10, 1000, false);
        let sub = hub.subscribe(&r, "t").unwrap();
        let start = match sub.topic().poll(Requested::Latest, Instant::now()) {
            Poll::Empty { at, .. } => Requested::At(at),
            other => panic!("{other:?}"),
        };
        hub.publish(&r, "t", msg("one")).unwrap();
        let first = batch(sub.topic().poll(start, Instant::now()));
        for _ in 0..1000 {
            let again = batch(sub.topic().poll(start, Instant::now()));
            assert!(Arc::ptr_eq(&first, &again));
        }
        let v: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
        assert_eq!(v["messages"][0]["data"], "one");
        assert_eq!(v["cursor"], first.cursor);
        assert_eq!(v["messages"][0]["cursor"], first.cursor);
    }

    #[test]
    fn expired_and_resumed_readers() {
        let hub = Hub::new();
        for resume in [false, true] {
            let r = route(10, 1000, resume);
            let sub = hub.subscribe(&r, "t").unwrap();
            let t = sub.topic();
            let first = hub.publish(&r, "t", msg("1")).unwrap().cursor;
            for i in 2..=5 {
                hub.publish(&r, "t", msg(&i.to_string())).unwrap();
            }
            let at = Requested::parse(&first).unwrap();
            match (resume, t.poll(at, Instant::now())) {
                (false, Poll::Expired { earliest, latest }) => {
                    let b = batch(t.poll(Requested::parse(&earliest).unwrap(), Instant::now()));
                    let v: serde_json::Value = serde_json::from_slice(&b.body).unwrap();
                    assert_eq!(v["messages"].as_array().unwrap().len(), 3);
                    assert_eq!(v["messages"][0]["data"], "3");
                    assert_eq!(b.cursor, latest);
                }
                (true, Poll::Batch(b)) => {
                    let v: serde_json::Value = serde_json::from_slice(&b.body).unwrap();
                    assert_eq!(v["gap"], true);
                    assert_eq!(v["messages"][0]["data"], "3");
                }
                (_, other) => panic!("resume={resume}: {other:?}"),
            }
            drop(sub);
            hub.sweep(Instant::now() + Duration::from_secs(2));
        }
    }

    #[test]
    fn max_topics_and_sweep() {
        let hub = Hub::new();
        let r = route(2, 50, false);
        let a = hub.subscribe(&r, "a").unwrap();
        hub.publish(&r, "b", msg("x")).unwrap();
        assert_eq!(hub.subscribe(&r, "c").err(), Some(TooManyTopics::Route));
        let now = Instant::now() + Duration::from_secs(1);
        // "b" has no subscriber and lingered; "a" is held.
        assert_eq!(hub.sweep(now), 1);
        assert!(hub.subscribe(&r, "c").is_ok());
        drop(a);
        assert_eq!(hub.len(), 2);
        assert_eq!(hub.sweep(now + Duration::from_secs(1)), 2);
        assert!(hub.is_empty());
        assert_eq!(r.gauge.get(), 0);
    }

    #[test]
    fn the_byte_budget_refuses_new_topics_until_bytes_are_freed() {
        let hub = Hub::with_budget(3);
        let r = route(10, 50, false);
        hub.publish(&r, "a", msg("xyz")).unwrap();
        assert_eq!(hub.buffered_bytes(), 3);
        assert_eq!(hub.subscribe(&r, "b").err(), Some(TooManyTopics::Memory));
        // The existing topic keeps working.
        assert!(hub.publish(&r, "a", msg("x")).is_ok());
        assert_eq!(hub.buffered_bytes(), 4);
        // Its removal gives the bytes back.
        assert_eq!(hub.sweep(Instant::now() + Duration::from_secs(1)), 1);
        assert_eq!(hub.buffered_bytes(), 0);
        assert!(hub.subscribe(&r, "b").is_ok());
    }

    #[test]
    fn a_retired_topic_gives_its_bytes_back_once() {
        let hub = Hub::with_budget(100);
        let r = route(10, 50, false);
        hub.publish(&r, "a", msg("xyz")).unwrap();
        let reader = hub.subscribe(&r, "a").unwrap();
        assert_eq!(hub.retire_route(&r), 1);
        assert_eq!(hub.buffered_bytes(), 0);
        // The held reader's topic changes after its removal: nothing more is given back.
        reader.topic().record_gap();
        assert_eq!(hub.buffered_bytes(), 0);
        // And the retired route makes no new topic.
        assert_eq!(hub.subscribe(&r, "b").err(), Some(TooManyTopics::Retired));
    }

    #[test]
    fn new_incarnation_expires_old_cursors() {
        let hub = Hub::new();
        let r = route(10, 0, false);
        let old = hub.publish(&r, "t", msg("x")).unwrap().cursor;
        hub.sweep(Instant::now() + Duration::from_millis(1));
        let sub = hub.subscribe(&r, "t").unwrap();
        let at = Requested::parse(&old).unwrap();
        assert!(matches!(
            sub.topic().poll(at, Instant::now()),
            Poll::Expired { .. }
        ));
    }

    #[test]
    fn duplicate_ids_publish_once() {
        let hub = Hub::new();
        let r = route(10, 1000, false);
        let mut m = msg("x");
        m.id = Some("m-1".into());
        let first = hub.publish(&r, "t", m.clone()).unwrap();
        let again = hub.publish(&r, "t", m.clone()).unwrap();
        assert!(!first.duplicate && again.duplicate);
        assert_eq!(first.cursor, again.cursor);
        m.arrived += DEDUPE_WINDOW;
        assert!(!hub.publish(&r, "t", m).unwrap().duplicate);
    }

    /// A parked reader's log of what its topic told it: "ticket:messages" or "ticket:wake".
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Parked for Log {
        fn deliver(&self, ticket: u64, batch: &Arc<Batch>) {
            let entry = format!("{ticket}:{}", batch.messages);
            self.0.lock().unwrap().push(entry);
        }

        fn wake(&self, ticket: u64) {
            self.0.lock().unwrap().push(format!("{ticket}:wake"));
        }
    }

    fn empty(p: Poll) -> (Cursor, u64) {
        match p {
            Poll::Empty { at, generation } => (at, generation),
            other => panic!("expected nothing new, got {other:?}"),
        }
    }

    #[test]
    fn parked_readers_get_the_next_batch_once_or_a_wake() {
        let hub = Hub::new();
        let r = route(10, 1000, false);
        let sub = hub.subscribe(&r, "t").unwrap();
        let t = sub.topic();
        let log = Arc::new(Log::default());
        let (_, stale) = empty(t.poll(Requested::Latest, Instant::now()));
        hub.publish(&r, "t", msg("one")).unwrap();
        // The topic changed since that poll: parking is refused, so the message is not missed.
        assert!(t.park(stale, log.clone(), 1).is_none());

        let (at, generation) = empty(t.poll(Requested::Latest, Instant::now()));
        t.park(generation, log.clone(), 2).unwrap();
        hub.publish(&r, "t", msg("two")).unwrap();
        // Taken by the first change: the next one does not reach it again.
        hub.publish(&r, "t", msg("three")).unwrap();
        let delivered = batch(t.poll(Requested::At(at), Instant::now()));
        assert_eq!(delivered.messages, 2);

        let (_, generation) = empty(t.poll(Requested::Latest, Instant::now()));
        t.park(generation, log.clone(), 3).unwrap();
        t.record_gap();
        let (_, generation) = empty(t.poll(Requested::Latest, Instant::now()));
        let id = t.park(generation, log.clone(), 4).unwrap();
        t.unpark(id);
        hub.publish(&r, "t", msg("four")).unwrap();
        assert_eq!(*log.0.lock().unwrap(), ["2:1", "3:wake"]);
    }

    #[tokio::test]
    async fn publish_wakes_a_waiting_reader() {
        let hub = Arc::new(Hub::new());
        let r = route(10, 1000, false);
        let sub = hub.subscribe(&r, "t").unwrap();
        let t = sub.topic();
        let mut changed = std::pin::pin!(t.changed());
        changed.as_mut().enable();
        assert!(matches!(
            t.poll(Requested::Latest, Instant::now()),
            Poll::Empty { .. }
        ));
        let (hub2, r2) = (hub.clone(), r.clone());
        tokio::spawn(async move { hub2.publish(&r2, "t", msg("wake")).unwrap() });
        changed.await;
        assert!(matches!(
            t.poll(Requested::Earliest, Instant::now()),
            Poll::Batch(_)
        ));
    }
}
