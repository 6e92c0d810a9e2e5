//! De-duplication of a topic's messages by `Message-Id`, within a window of time and count.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// How long a `Message-Id` is remembered for de-duplication (docs/protocol.md 3).
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(60);
/// At most this many remembered ids per topic; the oldest are forgotten first.
pub const DEDUPE_MAX: usize = 10_000;

/// Recently seen message ids of one topic, forgotten after [`DEDUPE_WINDOW`].
#[derive(Default)]
pub(super) struct Dedupe {
    seqs: HashMap<String, u64>,
    order: VecDeque<(Instant, String)>,
}

impl Dedupe {
    pub(super) fn seen(&mut self, id: &str, now: Instant) -> Option<u64> {
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

    pub(super) fn remember(&mut self, id: String, seq: u64, now: Instant) {
        self.order.push_back((now, id.clone()));
        self.seqs.insert(id, seq);
    }
}
