//! Cluster mode's side of a topic: the topic mirrors its log in the backplane. It is loaded
//! (`Topic::sync`) before it answers anyone, then follows the log's announcements
//! (`Topic::apply`) position by position; anything it cannot place (a hole, another epoch, a
//! position the log gave two different messages) it reports, and the backplane loads it again.

use std::mem;
use tokio::time::Instant;

use bytes::Bytes;

use super::ring::Ring;
use super::topic::{NewMessage, Syncing, Topic};

/// One position of a topic's log in the backplane.
#[derive(Debug, Clone)]
pub struct Remote {
    pub seq: u64,
    /// When the backplane logged it (its clock, ms since the Unix epoch).
    pub origin: u64,
    pub body: RemoteBody,
}

#[derive(Debug, Clone)]
pub enum RemoteBody {
    Message {
        id: Option<String>,
        content_type: Option<String>,
        payload: Bytes,
        /// This node's idea of when it was published (from `origin`).
        arrived: Instant,
    },
    /// The source could not resume, or a message was over the size bound: a gap.
    Gap,
}

/// What [`Topic::apply`] did with an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The next position: readers have it.
    Appended,
    /// A position the topic already has (a repeated announcement).
    Duplicate,
    /// The topic is still loading: kept for after the load.
    Buffered,
    /// Positions between the head and this one are missing: load again.
    Hole,
    /// Another epoch, or a position the topic holds with a different message (the log lost
    /// its tail and reused positions): load again, and say the epoch is over.
    Diverged,
}

/// What [`Topic::sync`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// The topic is loaded and at the log's head (or was already); `gap`: positions it had
    /// not seen were no longer in the log, and readers before them are told.
    Current { gap: bool },
    /// The log's epoch replaced the one the topic had: older cursors are expired.
    NewEpoch,
    /// The log's head is behind what the topic already handed out, in the same epoch: it
    /// lost its tail, or names a position the topic holds with another message. Nothing
    /// changed; the epoch must be retired.
    Regressed,
    /// Loaded, but announcements that arrived meanwhile leave a hole: load again.
    Hole,
}

/// Announcements kept for a topic while it loads; beyond it the load sees a hole and loads
/// again.
const PENDING_MAX: usize = 4096;

impl Topic {
    /// Whether this topic mirrors a backplane log.
    pub fn mirrored(&self) -> bool {
        self.route.settings.mirrored
    }

    /// The topic's epoch, head and the backplane time of its head message (0 if not retained),
    /// or `None` while it loads.
    pub fn position(&self) -> Option<(u64, u64, u64)> {
        let st = self.state();
        if st.syncing.is_some() {
            return None;
        }
        let head = st.ring.head();
        let origin = st.ring.entry(head).map_or(0, |e| e.origin);
        Some((st.epoch, head, origin))
    }

    /// Brings the topic to the log's state: `epoch`, its `head`, and its newest entries
    /// (`tail`, ascending, at most what the ring retains). A first load, or a new epoch,
    /// starts the ring at the tail; otherwise what follows the topic's head is appended.
    /// Positions the log no longer has become a gap. Every waiting reader looks again.
    pub fn sync(&self, epoch: u64, head: u64, tail: Vec<Remote>) -> Synced {
        let mut st = self.state();
        let first = st.syncing.is_some();
        if !first && epoch == st.epoch {
            let other_message = tail.iter().any(|e| {
                st.ring
                    .entry(e.seq)
                    .is_some_and(|held| held.origin != e.origin)
            });
            if head < st.ring.head() || other_message {
                return Synced::Regressed;
            }
        }
        let mut gap = false;
        let mut result = None;
        if first || epoch != st.epoch {
            if !first {
                result = Some(Synced::NewEpoch);
            }
            let start = tail
                .first()
                .filter(|e| e.seq <= head)
                .map_or(head, |e| e.seq - 1);
            let before = st.ring.bytes();
            st.ring = Ring::starting_at(self.route.settings.limits, start);
            st.account(&self.budget, before);
            st.cache = None;
            st.epoch = epoch;
        }
        for entry in tail.into_iter().filter(|e| e.seq <= head) {
            gap |= self.place(&mut st, entry);
        }
        if st.ring.head() < head {
            gap = true;
            let before = st.ring.bytes();
            st.ring.skip_to(head);
            st.account(&self.budget, before);
        }
        if let Some(Syncing { pending, .. }) = st.syncing.take() {
            for (e, entry) in pending {
                if e != epoch || entry.seq <= st.ring.head() {
                    continue;
                }
                if entry.seq != st.ring.next_seq() {
                    result = Some(Synced::Hole);
                    break;
                }
                self.place(&mut st, entry);
            }
        }
        st.cache = None;
        st.synced += 1;
        self.changed_now(st);
        result.unwrap_or(Synced::Current { gap })
    }

    /// Places the log's entry after the head under the lock, waking nobody; a hole before it
    /// becomes a gap (then true).
    fn place(&self, st: &mut super::topic::State, entry: Remote) -> bool {
        if entry.seq <= st.ring.head() {
            return false;
        }
        let hole = entry.seq > st.ring.next_seq();
        if hole {
            let before = st.ring.bytes();
            st.ring.skip_to(entry.seq - 1);
            st.account(&self.budget, before);
        }
        match entry.body {
            RemoteBody::Gap => {
                let before = st.ring.bytes();
                st.ring.record_gap();
                st.account(&self.budget, before);
            }
            RemoteBody::Message {
                id,
                content_type,
                payload,
                arrived,
            } => {
                let message = NewMessage {
                    id,
                    content_type,
                    payload,
                    arrived,
                };
                self.push_locked(st, entry.seq, message, entry.origin);
            }
        }
        st.generation += 1;
        hole
    }

    /// Takes one announcement of the log: the next position is appended and answers every
    /// waiting reader, as a publish does.
    pub fn apply(&self, epoch: u64, entry: Remote) -> Applied {
        let mut st = self.state();
        if let Some(syncing) = &mut st.syncing {
            if syncing.pending.len() < PENDING_MAX {
                syncing.pending.push((epoch, entry));
            }
            return Applied::Buffered;
        }
        if epoch != st.epoch {
            return Applied::Diverged;
        }
        let head = st.ring.head();
        if entry.seq <= head {
            let held = st.ring.entry(entry.seq).map(|e| e.origin);
            return match held {
                Some(origin) if origin != entry.origin => Applied::Diverged,
                _ => Applied::Duplicate,
            };
        }
        if entry.seq > head + 1 {
            return Applied::Hole;
        }
        match entry.body {
            RemoteBody::Gap => {
                let before = st.ring.bytes();
                st.ring.record_gap();
                st.account(&self.budget, before);
                self.changed_now(st);
            }
            RemoteBody::Message {
                id,
                content_type,
                payload,
                arrived,
            } => {
                let message = NewMessage {
                    id,
                    content_type,
                    payload,
                    arrived,
                };
                self.append(st, message, entry.origin);
            }
        }
        Applied::Appended
    }

    /// The load failed; `down`: the backplane has been unreachable for longer than its grace,
    /// and readers of a topic still loading are told so. Wakes them when that changes.
    pub fn load_failed(&self, down: bool) {
        let mut st = self.state();
        let Some(syncing) = &mut st.syncing else {
            return;
        };
        if mem::replace(&mut syncing.down, down) != down {
            self.changed_now(st);
        }
    }
}
