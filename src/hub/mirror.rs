//! Cluster mode's side of a topic: the topic mirrors its log in the backplane. It is loaded
//! (`Topic::sync`) before it answers anyone, then follows the log's announcements
//! (`Topic::apply`) position by position; anything it cannot place (a hole, another epoch, a
//! position the log gave two different messages) it reports, and the backplane loads it again.

use std::mem;

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
    /// A message; its `arrived` is this node's idea of when it was logged (from `origin`).
    Message(NewMessage),
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

    /// Loads completed ([`Topic::sync`]).
    pub fn synced(&self) -> u64 {
        self.state().synced
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
    /// `known`: the topic's head when the log was read; positions applied since (from
    /// announcements) are newer than the log's state, not missing from it.
    pub fn sync(&self, epoch: u64, head: u64, known: u64, tail: Vec<Remote>) -> Synced {
        let mut st = self.state();
        let first = st.syncing.is_some();
        if !first && epoch == st.epoch {
            let other_message = tail.iter().any(|e| {
                st.ring
                    .entry(e.seq)
                    .is_some_and(|held| held.origin != e.origin)
            });
            if head < known.min(st.ring.head()) || other_message {
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
            RemoteBody::Message(message) => {
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
            RemoteBody::Message(message) => {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use prometheus::IntGauge;
    use tokio::time::Instant;

    use super::*;
    use crate::hub::cursor::{Cursor, Requested};
    use crate::hub::ring::BufferLimits;
    use crate::hub::{Hub, Poll, RouteTopics, TopicSettings};

    fn topic(hub: &Hub) -> Arc<Topic> {
        let settings = TopicSettings {
            limits: BufferLimits {
                messages: 10,
                bytes: 1 << 20,
                age: Duration::from_secs(300),
            },
            linger: Duration::from_secs(60),
            max_batch: 100,
            resume_on_gap: false,
            mirrored: true,
        };
        let gauge = IntGauge::new("t", "t").unwrap();
        let route = Arc::new(RouteTopics::new("r", settings, 10, gauge));
        hub.subscribe(&route, "t").unwrap().topic_arc()
    }

    fn message(seq: u64, origin: u64) -> Remote {
        Remote {
            seq,
            origin,
            body: RemoteBody::Message(NewMessage {
                id: None,
                content_type: None,
                payload: Bytes::from(format!("m{seq}")),
                arrived: Instant::now(),
            }),
        }
    }

    fn at(t: &Topic, epoch: u64, seq: u64) -> Requested {
        Requested::At(Cursor {
            binding: t.binding(),
            epoch,
            seq,
        })
    }

    #[test]
    fn a_loading_topic_keeps_announcements_and_places_them_after_the_load() {
        let hub = Hub::new();
        let t = topic(&hub);
        assert!(matches!(
            t.poll(Requested::Latest, Instant::now()),
            Poll::Loading { .. }
        ));
        assert_eq!(t.apply(7, message(3, 30)), Applied::Buffered);
        assert_eq!(
            t.sync(7, 2, 0, vec![message(1, 10), message(2, 20)]),
            Synced::Current { gap: false }
        );
        assert_eq!(t.position(), Some((7, 3, 30)));
        assert_eq!(t.synced(), 1);
        // Announcements that do not follow are holes; ones it has, duplicates.
        assert_eq!(t.apply(7, message(5, 50)), Applied::Hole);
        assert_eq!(t.apply(7, message(2, 20)), Applied::Duplicate);
        assert_eq!(
            t.apply(7, message(2, 21)),
            Applied::Diverged,
            "another message at 2"
        );
        assert_eq!(
            t.apply(8, message(4, 40)),
            Applied::Diverged,
            "another epoch"
        );
        assert_eq!(t.apply(7, message(4, 40)), Applied::Appended);
    }

    #[test]
    fn positions_applied_while_the_log_was_read_are_not_a_regression() {
        let hub = Hub::new();
        let t = topic(&hub);
        t.sync(7, 2, 0, vec![message(1, 10), message(2, 20)]);
        // The log is read at head 2; meanwhile 3 and 4 are announced and applied.
        let known = t.position().unwrap().1;
        t.apply(7, message(3, 30));
        t.apply(7, message(4, 40));
        assert_eq!(
            t.sync(7, 2, known, vec![message(2, 20)]),
            Synced::Current { gap: false }
        );
        assert_eq!(t.position(), Some((7, 4, 40)));
    }

    #[test]
    fn a_log_behind_what_was_handed_out_or_naming_another_message_regressed() {
        let hub = Hub::new();
        let t = topic(&hub);
        t.sync(
            7,
            3,
            0,
            vec![message(1, 10), message(2, 20), message(3, 30)],
        );
        assert_eq!(t.sync(7, 2, 3, vec![message(2, 20)]), Synced::Regressed);
        assert_eq!(t.sync(7, 3, 3, vec![message(3, 31)]), Synced::Regressed);
        assert_eq!(t.position(), Some((7, 3, 30)), "nothing changed");
        // The retired epoch's log, as a new epoch: older cursors expire.
        assert_eq!(t.sync(9, 3, 3, vec![message(3, 31)]), Synced::NewEpoch);
        assert!(matches!(
            t.poll(at(&t, 7, 3), Instant::now()),
            Poll::Expired { .. }
        ));
        assert!(matches!(
            t.poll(at(&t, 9, 2), Instant::now()),
            Poll::Batch(_)
        ));
    }

    #[test]
    fn a_cursor_ahead_of_the_copy_is_behind_until_a_load_says_otherwise() {
        let hub = Hub::new();
        let t = topic(&hub);
        t.sync(7, 1, 0, vec![message(1, 10)]);
        assert!(matches!(
            t.poll(at(&t, 7, 3), Instant::now()),
            Poll::Behind { synced: 1, .. }
        ));
        t.sync(7, 3, 1, vec![message(2, 20), message(3, 30)]);
        assert!(matches!(
            t.poll(at(&t, 7, 3), Instant::now()),
            Poll::Empty { .. }
        ));
        // Positions the log no longer has become a gap for readers before them.
        t.sync(7, 9, 3, vec![message(8, 80), message(9, 90)]);
        assert!(matches!(
            t.poll(at(&t, 7, 3), Instant::now()),
            Poll::Expired { .. }
        ));
    }
}
