//! A topic's bounded, ordered message buffer, as plain data: no locks, no clocks of its own
//! (callers pass `now`), so it can be checked against a reference model.
//!
//! Positions: message `seq`s are contiguous from 1; `head` is the last assigned, 0 before any.
//! `floor` is the newest position a reader can no longer continue from: every retained message
//! has `floor < seq <= head`, and a cursor below `floor` has missed something (evicted, or a gap
//! recorded) and is expired. A gap (upstream could not resume, oversized message dropped) takes a
//! sequence number of its own and moves `floor` to it, so readers on either side of it are told.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;

/// Retention bounds of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    pub messages: usize,
    pub bytes: usize,
    pub age: Duration,
}

/// One retained message: its position, arrival time and pre-encoded JSON object.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub arrived: Instant,
    /// `{"cursor":…,"id":…,"data":…}`, encoded once when the message arrived.
    pub json: Bytes,
    /// Payload size counted against `BufferLimits::bytes`.
    pub size: usize,
    /// Cluster mode: when the backplane logged it (its clock, ms), which tells two entries of
    /// one position apart after a failover; 0 on a single node.
    pub origin: u64,
}

/// What a reader at some position finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Messages `from+1 ..= to` are retained and `more` says whether newer ones exist.
    Messages { from: u64, to: u64, more: bool },
    /// Nothing newer than the position yet.
    Empty,
    /// The position is older than what is retained or a gap lies after it.
    Expired,
    /// The position is ahead of the head (not issued by this incarnation).
    Ahead,
}

#[derive(Debug)]
pub struct Ring {
    limits: BufferLimits,
    entries: VecDeque<Entry>,
    bytes: usize,
    head: u64,
    floor: u64,
}

impl Ring {
    pub fn new(limits: BufferLimits) -> Ring {
        Ring {
            limits,
            entries: VecDeque::new(),
            bytes: 0,
            head: 0,
            floor: 0,
        }
    }

    /// An empty ring whose history before `head` is gone (cluster mode: a topic loaded from
    /// the backplane's log): `head` is both its floor and its head.
    pub fn starting_at(limits: BufferLimits, head: u64) -> Ring {
        Ring {
            head,
            floor: head,
            ..Ring::new(limits)
        }
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The sequence number the next message or gap will get.
    pub fn next_seq(&self) -> u64 {
        self.head + 1
    }

    /// Appends a message (its `seq` must be [`Ring::next_seq`]) and evicts what the limits
    /// no longer allow. A message larger than the byte bound becomes a gap instead.
    pub fn push(&mut self, entry: Entry, now: Instant) -> bool {
        debug_assert_eq!(entry.seq, self.next_seq());
        if entry.size > self.limits.bytes || self.limits.messages == 0 {
            self.record_gap();
            return false;
        }
        self.head = entry.seq;
        self.bytes += entry.size;
        self.entries.push_back(entry);
        while self.entries.len() > self.limits.messages || self.bytes > self.limits.bytes {
            self.pop_front();
        }
        self.expire(now);
        true
    }

    /// Records that messages were lost after the current head.
    pub fn record_gap(&mut self) {
        self.skip_to(self.head + 1);
    }

    /// Records that positions up to `seq` (after the head) are lost: readers before it are
    /// told, and the next message is `seq + 1`.
    pub fn skip_to(&mut self, seq: u64) {
        debug_assert!(seq > self.head);
        self.head = seq;
        self.floor = seq;
        self.entries.clear();
        self.bytes = 0;
    }

    /// The retained message at `seq`.
    pub fn entry(&self, seq: u64) -> Option<&Entry> {
        let index = seq.checked_sub(self.floor + 1)?;
        self.entries.get(usize::try_from(index).ok()?)
    }

    /// Evicts messages older than the age bound.
    pub fn expire(&mut self, now: Instant) {
        while let Some(front) = self.entries.front() {
            if now.saturating_duration_since(front.arrived) <= self.limits.age {
                break;
            }
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.size;
            self.floor = e.seq;
        }
    }

    /// What a reader that has everything up to `after` finds, at most `max_batch` messages and
    /// about `max_bytes` of them (always at least one).
    pub fn read(&self, after: u64, max_batch: usize, max_bytes: usize) -> Read {
        if after > self.head {
            return Read::Ahead;
        }
        if after < self.floor {
            return Read::Expired;
        }
        if after == self.head {
            return Read::Empty;
        }
        let first = (after - self.floor) as usize;
        let mut to = after;
        let mut bytes = 0;
        for e in self.entries.iter().skip(first).take(max_batch.max(1)) {
            if to > after && bytes + e.json.len() > max_bytes {
                break;
            }
            bytes += e.json.len();
            to = e.seq;
        }
        Read::Messages {
            from: after,
            to,
            more: to < self.head,
        }
    }

    /// The retained entries `from+1 ..= to` (as returned by [`Ring::read`]).
    pub fn entries(&self, from: u64, to: u64) -> impl Iterator<Item = &Entry> {
        let skip = (from - self.floor) as usize;
        self.entries.iter().skip(skip).take((to - from) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX_BYTES: usize = 1 << 20;

    fn entry(seq: u64, size: usize, arrived: Instant) -> Entry {
        Entry {
            seq,
            arrived,
            json: Bytes::from(format!("{{\"seq\":{seq}}}")),
            size,
            origin: seq * 10,
        }
    }

    fn limits(messages: usize, bytes: usize, age_ms: u64) -> BufferLimits {
        BufferLimits {
            messages,
            bytes,
            age: Duration::from_millis(age_ms),
        }
    }

    #[test]
    fn reads_after_position_in_order() {
        let t0 = Instant::now();
        let mut r = Ring::new(limits(10, 1000, 60_000));
        for _ in 0..3 {
            r.push(entry(r.next_seq(), 1, t0), t0);
        }
        assert_eq!(
            r.read(0, 100, MAX_BYTES),
            Read::Messages {
                from: 0,
                to: 3,
                more: false
            }
        );
        assert_eq!(
            r.read(1, 1, MAX_BYTES),
            Read::Messages {
                from: 1,
                to: 2,
                more: true
            }
        );
        let seqs: Vec<u64> = r.entries(1, 3).map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(r.read(3, 100, MAX_BYTES), Read::Empty);
        assert_eq!(r.read(4, 100, MAX_BYTES), Read::Ahead);
    }

    #[test]
    fn a_ring_loaded_mid_history_and_skipped_positions() {
        let t0 = Instant::now();
        let mut r = Ring::starting_at(limits(10, 1000, 60_000), 41);
        assert_eq!((r.floor(), r.head(), r.next_seq()), (41, 41, 42));
        assert_eq!(r.read(40, 100, MAX_BYTES), Read::Expired);
        assert_eq!(r.read(41, 100, MAX_BYTES), Read::Empty);
        r.push(entry(42, 1, t0), t0);
        r.push(entry(43, 1, t0), t0);
        assert_eq!(r.entry(42).map(|e| e.origin), Some(420));
        assert_eq!(r.entry(43).map(|e| e.seq), Some(43));
        assert!(r.entry(41).is_none() && r.entry(44).is_none());
        r.skip_to(50);
        assert_eq!((r.floor(), r.head(), r.bytes()), (50, 50, 0));
        assert_eq!(r.read(43, 100, MAX_BYTES), Read::Expired);
        assert!(r.entry(43).is_none());
        r.push(entry(51, 1, t0), t0);
        assert_eq!(
            r.read(50, 100, MAX_BYTES),
            Read::Messages {
                from: 50,
                to: 51,
                more: false
            }
        );
    }

    #[test]
    fn overflow_expires_old_positions() {
        let t0 = Instant::now();
        let mut r = Ring::new(limits(2, 1000, 60_000));
        for _ in 0..5 {
            r.push(entry(r.next_seq(), 1, t0), t0);
        }
        assert_eq!(r.floor(), 3);
        assert_eq!(r.read(2, 100, MAX_BYTES), Read::Expired);
        assert_eq!(
            r.read(3, 100, MAX_BYTES),
            Read::Messages {
                from: 3,
                to: 5,
                more: false
            }
        );
    }

    #[test]
    fn oversized_message_is_a_gap() {
        let t0 = Instant::now();
        let mut r = Ring::new(limits(10, 10, 60_000));
        r.push(entry(1, 5, t0), t0);
        assert!(!r.push(entry(2, 11, t0), t0));
        assert_eq!((r.head(), r.floor()), (2, 2));
        assert_eq!(r.read(1, 100, MAX_BYTES), Read::Expired);
        assert_eq!(r.read(2, 100, MAX_BYTES), Read::Empty);
    }

    #[test]
    fn batches_stop_near_the_byte_budget_but_never_empty() {
        let t0 = Instant::now();
        let mut r = Ring::new(limits(10, 1000, 60_000));
        for _ in 0..4 {
            r.push(entry(r.next_seq(), 1, t0), t0);
        }
        let one = r.entries(0, 1).next().unwrap().json.len();
        assert_eq!(
            r.read(0, 100, one),
            Read::Messages {
                from: 0,
                to: 1,
                more: true
            }
        );
        assert_eq!(
            r.read(0, 100, 1),
            Read::Messages {
                from: 0,
                to: 1,
                more: true
            }
        );
        assert_eq!(
            r.read(0, 100, one * 2),
            Read::Messages {
                from: 0,
                to: 2,
                more: true
            }
        );
    }

    /// Reference model: every message ever published with its fate, no cleverness.
    #[derive(Default)]
    struct Model {
        /// (seq, arrived ms, size, is_gap)
        all: Vec<(u64, u64, usize, bool)>,
    }

    impl Model {
        fn retained(&self, l: BufferLimits, now_ms: u64) -> Vec<u64> {
            // Walk back from the newest: keep while within count, bytes and age, stop at a gap.
            let mut kept = Vec::new();
            let mut bytes = 0;
            for &(seq, at, size, gap) in self.all.iter().rev() {
                if gap || kept.len() == l.messages || bytes + size > l.bytes {
                    break;
                }
                kept.push((seq, at));
                bytes += size;
            }
            kept.reverse();
            kept.retain(|&(_, at)| now_ms - at <= l.age.as_millis() as u64);
            // Age eviction only removes from the front, so one old entry hides newer ones.
            kept.iter().map(|&(s, _)| s).collect()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Publish { size: usize },
        Gap,
        Advance { ms: u64 },
        Read { back: u64, max_batch: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1usize..40).prop_map(|size| Op::Publish { size }),
            1 => Just(Op::Gap),
            2 => (0u64..400).prop_map(|ms| Op::Advance { ms }),
            4 => (0u64..20, 1usize..8).prop_map(|(back, max_batch)| Op::Read { back, max_batch }),
        ]
    }

    proptest! {
        #[test]
        fn matches_reference_model(
            ops in proptest::collection::vec(op(), 1..200),
            messages in 1usize..12,
            bytes in 20usize..200,
            age_ms in 100u64..1000,
        ) {
            let l = limits(messages, bytes, age_ms);
            let t0 = Instant::now();
            let mut now_ms = 0u64;
            let mut ring = Ring::new(l);
            let mut model = Model::default();
            for op in ops {
                let now = t0 + Duration::from_millis(now_ms);
                match op {
                    Op::Publish { size } => {
                        let seq = ring.next_seq();
                        let stored = ring.push(entry(seq, size, now), now);
                        model.all.push((seq, now_ms, size, size > l.bytes));
                        prop_assert_eq!(stored, size <= l.bytes);
                    }
                    Op::Gap => {
                        ring.record_gap();
                        model.all.push((ring.head(), now_ms, 0, true));
                    }
                    Op::Advance { ms } => {
                        now_ms += ms;
                        ring.expire(t0 + Duration::from_millis(now_ms));
                    }
                    Op::Read { back, max_batch } => {
                        let head = model.all.last().map_or(0, |m| m.0);
                        prop_assert_eq!(ring.head(), head);
                        let retained = model.retained(l, now_ms);
                        let got: Vec<u64> = ring.entries(ring.floor(), ring.head()).map(|e| e.seq).collect();
                        // Age eviction in the ring is lazy (on push/expire), the model's is exact
                        // at `now`: the ring may keep old entries only until the next expire.
                        ring.expire(t0 + Duration::from_millis(now_ms));
                        let got_after: Vec<u64> = ring.entries(ring.floor(), ring.head()).map(|e| e.seq).collect();
                        prop_assert!(got.ends_with(&got_after));
                        let floor = retained.first().map_or(head, |s| s - 1);
                        prop_assert_eq!(&got_after, &retained);
                        prop_assert_eq!(ring.floor(), floor);

                        let after = head.saturating_sub(back);
                        let read = ring.read(after, max_batch, MAX_BYTES);
                        let expected = if after < floor {
                            Read::Expired
                        } else if after == head {
                            Read::Empty
                        } else {
                            let to = (after + max_batch as u64).min(head);
                            Read::Messages { from: after, to, more: to < head }
                        };
                        prop_assert_eq!(&read, &expected);
                        if let Read::Messages { from, to, .. } = read {
                            let seqs: Vec<u64> = ring.entries(from, to).map(|e| e.seq).collect();
                            let want: Vec<u64> = (from + 1..=to).collect();
                            prop_assert_eq!(seqs, want);
                        }
                    }
                }
            }
        }
    }
}
