//! One topic: its state under one lock, publish, poll, the upstream's state, and its parked
//! readers with the fan-out that hands them a batch.

use std::collections::HashMap;
use std::mem;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::batch::{BATCH_BYTES_MAX, Batch};
use super::cursor::{Cursor, Requested};
use super::dedupe::Dedupe;
use super::map::{Budget, RouteTopics};
use super::ring::{Entry, Read, Ring};
use super::{cursor, message};

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
    /// Cluster mode: the topic is being loaded from the backplane; wait for a change after
    /// `generation`. `down`: the backplane has been unreachable for longer than its grace.
    Loading {
        generation: u64,
        down: bool,
    },
    /// Cluster mode: the cursor is ahead of this node's copy (another node handed it out
    /// first); wait for a change after `generation`. `synced`: loads completed so far
    /// ([`Topic::sync`]); a cursor still ahead after a later load is ahead of the log.
    Behind {
        generation: u64,
        synced: u64,
    },
}

pub struct Topic {
    pub(super) route: Arc<RouteTopics>,
    name: Box<str>,
    binding: u64,
    state: Mutex<State>,
    notify: Notify,
    pub(super) subscribers: AtomicUsize,
    /// Cancelled when the sweep removes the topic: its source stops.
    pub(super) retired: CancellationToken,
    /// The hub-wide count of buffered bytes this topic's ring adds to.
    pub(super) budget: Arc<Budget>,
    fanout: Arc<Fanout>,
}

pub(super) struct State {
    /// This incarnation; cursors of earlier ones are expired. In cluster mode the backplane's,
    /// and replaced when the backplane's log starts again.
    pub(super) epoch: u64,
    /// Cluster mode, until the topic is loaded from the backplane: what arrived meanwhile.
    pub(super) syncing: Option<Syncing>,
    /// Cluster mode: loads completed.
    pub(super) synced: u64,
    /// A reader ahead of the head may be parked: the next message wakes every parked reader
    /// (each looks again) instead of handing them the batch that follows the head.
    pub(super) parked_ahead: bool,
    pub(super) ring: Ring,
    /// The last batch encoded, reused while (position, head, gap) match.
    pub(super) cache: Option<Arc<Batch>>,
    dedupe: Dedupe,
    pub(super) last_active: Instant,
    /// The topic's upstream trouble, while its source is failing.
    trouble: Option<UpstreamTrouble>,
    /// Whether the ring's bytes count against the hub's budget (until the topic is removed).
    counted: bool,
    /// Bumped by every change a waiting reader must see (message, gap, upstream state, wake).
    pub(super) generation: u64,
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

/// A cluster-mode topic not loaded yet from the backplane.
#[derive(Default)]
pub(super) struct Syncing {
    /// Announcements that arrived before the load, applied after it.
    pub(super) pending: Vec<(u64, super::Remote)>,
    /// The backplane has been unreachable for longer than its grace.
    pub(super) down: bool,
}

impl State {
    /// Applies a ring change of `before` -> now to the budget, while the topic counts.
    pub(super) fn account(&self, budget: &Budget, before: usize) {
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
    /// An attempt failed once the route's `upstream_grace` had passed: 503.
    Down,
}

/// A topic's upstream trouble as its source last saw it (docs/protocol.md 1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTrouble {
    /// Since when the source has been failing.
    pub since: Instant,
    /// The upstream's last definitive refusal (404, 401, 403).
    pub refused: Option<u16>,
    /// An attempt failed at or after the end of `upstream_grace`, so polls with nothing to
    /// read are told the upstream is down. Failing within the grace only delays them.
    pub down: bool,
}

impl Topic {
    pub(super) fn new(
        route: Arc<RouteTopics>,
        name: &str,
        budget: Arc<Budget>,
        fanout: Arc<Fanout>,
    ) -> Topic {
        Topic {
            binding: cursor::binding(&route.name, name),
            state: Mutex::new(State {
                epoch: fastrand::u64(1..),
                syncing: route.settings.mirrored.then(Syncing::default),
                synced: 0,
                parked_ahead: false,
                ring: Ring::new(route.settings.limits),
                cache: None,
                dedupe: Dedupe::default(),
                last_active: Instant::now(),
                trouble: None,
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
    pub(super) fn release_bytes(&self) {
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

    /// The route's share of the hub this topic belongs to (its name and settings).
    pub fn route(&self) -> &Arc<RouteTopics> {
        &self.route
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the ring inconsistent in a way that
        // matters more than stopping the topic; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn cursor(&self, epoch: u64, seq: u64) -> String {
        Cursor {
            binding: self.binding,
            epoch,
            seq,
        }
        .encode()
    }

    pub(super) fn lingered(&self, now: Instant) -> bool {
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
                cursor: self.cursor(st.epoch, seq),
                duplicate: true,
                stored: false,
            };
        }
        let seq = st.ring.next_seq();
        if let Some(id) = &message.id {
            st.dedupe.remember(id.clone(), seq, message.arrived);
        }
        let (cursor, stored) = self.append(st, message, 0);
        Published {
            cursor,
            duplicate: false,
            stored,
        }
    }

    /// Appends `message` at the ring's next position and hands every parked reader (all at
    /// the head it follows) its batch, after the lock is released. The cursor, and whether
    /// the message was kept (not turned into a gap).
    pub(super) fn append(
        &self,
        mut st: MutexGuard<'_, State>,
        message: NewMessage,
        origin: u64,
    ) -> (String, bool) {
        let seq = st.ring.next_seq();
        let stored = self.push_locked(&mut st, seq, message, origin);
        let cursor = self.cursor(st.epoch, seq);
        st.generation += 1;
        let parked = mem::take(&mut st.parked);
        let ahead = mem::take(&mut st.parked_ahead);
        let answer = (!parked.is_empty() && !ahead).then(|| {
            // Every parked reader stands at the head this message follows.
            let at = Cursor {
                binding: self.binding,
                epoch: st.epoch,
                seq: seq - 1,
            };
            let arrived = st.last_active;
            self.poll_locked(&mut st, Requested::At(at), arrived)
        });
        drop(st);
        match answer {
            Some(Poll::Batch(batch)) => self.fanout.deliver(parked, batch),
            // The message went straight into a gap, or the buffer's age limit moved past the
            // parked position: each reader sorts out its own answer.
            Some(_) => wake_parked(parked),
            None if ahead => wake_parked(parked),
            None => {}
        }
        self.notify.notify_waiters();
        (cursor, stored)
    }

    /// Puts `message` into the ring at `seq` (its next position), under the lock, waking
    /// nobody; false when it became a gap (over the byte bound).
    pub(super) fn push_locked(
        &self,
        st: &mut State,
        seq: u64,
        message: NewMessage,
        origin: u64,
    ) -> bool {
        st.last_active = message.arrived;
        let json = message::encode(
            &self.cursor(st.epoch, seq),
            message.id.as_deref(),
            message.content_type.as_deref(),
            &message.payload,
        );
        let entry = Entry {
            seq,
            arrived: message.arrived,
            json,
            size: message.payload.len(),
            origin,
        };
        let before = st.ring.bytes();
        let stored = st.ring.push(entry, message.arrived);
        st.account(&self.budget, before);
        stored
    }

    /// The source is connected: upstream problems are over.
    pub fn upstream_ok(&self) {
        self.state().trouble = None;
    }

    /// The source's attempt failed at `now`; `status` is the upstream's answer, if it gave one;
    /// `grace`: how long failing stays hidden from polls. The upstream is down once an attempt
    /// fails at or after the end of the grace. Wakes readers, so that a definitive refusal, or
    /// the upstream being down, reaches them at once.
    pub fn upstream_failed(&self, status: Option<u16>, grace: Duration, now: Instant) {
        let mut st = self.state();
        let since = st.trouble.map_or(now, |t| t.since);
        st.trouble = Some(UpstreamTrouble {
            since,
            refused: status.filter(|s| matches!(s, 401 | 403 | 404)),
            down: now.saturating_duration_since(since) >= grace,
        });
        self.changed_now(st);
    }

    /// The upstream is down without a further attempt (it asked to be left alone for longer
    /// than the grace). Wakes readers. Nothing when the source is not failing.
    pub fn upstream_down(&self) {
        let mut st = self.state();
        let Some(trouble) = st.trouble.as_mut() else {
            return;
        };
        trouble.down = true;
        self.changed_now(st);
    }

    /// The upstream's state as its source last saw it: `None` while healthy.
    pub fn upstream_state(&self) -> Option<UpstreamTrouble> {
        self.state().trouble
    }

    /// Cluster mode: the state of the upstream as the node running the topic's source reports
    /// it. Waiting readers look again when it fails (a refusal, or the upstream being down,
    /// reaches them at once).
    pub fn set_upstream_state(&self, state: Option<UpstreamTrouble>) {
        let mut st = self.state();
        match state {
            None => st.trouble = None,
            Some(mut trouble) => {
                if let Some(known) = st.trouble {
                    trouble.since = trouble.since.min(known.since);
                }
                st.trouble = Some(trouble);
                self.changed_now(st);
            }
        }
    }

    /// Wakes every waiting reader (to re-check the upstream's state, a drain, retirement).
    pub fn wake(&self) {
        self.changed_now(self.state());
    }

    /// A change every waiting reader must look at: parked ones are woken too.
    pub(super) fn changed_now(&self, mut st: MutexGuard<'_, State>) {
        st.generation += 1;
        st.parked_ahead = false;
        let parked = mem::take(&mut st.parked);
        drop(st);
        wake_parked(parked);
        self.notify.notify_waiters();
    }

    /// The problem a poll with nothing to read must be told about, if any.
    pub fn upstream_problem(&self) -> Option<UpstreamProblem> {
        let trouble = self.state().trouble?;
        match trouble.refused {
            Some(404) => Some(UpstreamProblem::NotFound),
            Some(_) => Some(UpstreamProblem::Refused),
            None if trouble.down => Some(UpstreamProblem::Down),
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

    pub(super) fn poll_locked(&self, st: &mut State, at: Requested, now: Instant) -> Poll {
        if let Some(syncing) = &st.syncing {
            return Poll::Loading {
                generation: st.generation,
                down: syncing.down,
            };
        }
        let before = st.ring.bytes();
        st.ring.expire(now);
        st.account(&self.budget, before);
        let (floor, head) = (st.ring.floor(), st.ring.head());
        let resume = self.route.settings.resume_on_gap;
        let (after, gap) = match at {
            Requested::Earliest => (floor, false),
            Requested::Latest => (head, false),
            Requested::At(c) if c.epoch != st.epoch || c.seq < floor => {
                if !resume {
                    return Poll::Expired {
                        earliest: self.cursor(st.epoch, floor),
                        latest: self.cursor(st.epoch, head),
                    };
                }
                (floor, true)
            }
            Requested::At(c) => (c.seq, false),
        };
        let s = &self.route.settings;
        match st.ring.read(after, s.max_batch, BATCH_BYTES_MAX) {
            Read::Ahead if s.mirrored => {
                st.parked_ahead = true;
                Poll::Behind {
                    generation: st.generation,
                    synced: st.synced,
                }
            }
            Read::Ahead => Poll::Ahead,
            Read::Expired => unreachable!("positions below the floor were handled above"),
            Read::Empty if !gap => Poll::Empty {
                at: Cursor {
                    binding: self.binding,
                    epoch: st.epoch,
                    seq: after,
                },
                generation: st.generation,
            },
            Read::Empty => Poll::Batch(self.encode(st, after, after, false, true)),
            Read::Messages { from, to, more } => Poll::Batch(self.encode(st, from, to, more, gap)),
        }
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

/// Parked readers answered by one task at most: a publish to more is spread over the runtime's
/// workers.
const FANOUT_CHUNK: usize = 256;

/// Where answers to parked readers are written: in tasks of at most [`FANOUT_CHUNK`] readers
/// on a runtime's workers (so the publisher, perhaps the admin thread, returns at once and a
/// large fan-out uses every worker), or by the publisher itself when there is no runtime.
#[derive(Default)]
pub(super) struct Fanout {
    pub(super) runtime: OnceLock<tokio::runtime::Handle>,
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
