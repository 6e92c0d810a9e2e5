//! Sources: what feeds a poll route's topics. `publish` needs no task (the admin listener
//! publishes through the gateway); upstream sources run one task per topic, started when the
//! topic is created by a poll and ended when the hub retires the topic after `linger`.
//!
//! At most one source task per (route, topic) runs at any instant: a task takes its topic's
//! slot in [`SourceSlots`] before connecting, so a new incarnation's source waits for the
//! previous one to have closed its upstream request.

pub mod backoff;
pub mod feed;
pub mod ndjson;
pub mod sse;
pub mod upstream_poll;
pub mod upstream_stream;

use std::sync::Arc;

use dashmap::DashMap;

/// Per (route, topic): the lock a source task holds while it runs.
#[derive(Default)]
pub struct SourceSlots {
    slots: DashMap<(String, String), Arc<tokio::sync::Mutex<()>>>,
}

impl SourceSlots {
    /// Runs `source` once no other source of (route, topic) runs, unless `retired` completes
    /// first.
    pub async fn run_exclusive(
        &self,
        route: &str,
        topic: &str,
        retired: impl Future<Output = ()>,
        source: impl Future<Output = ()>,
    ) {
        let key = (route.to_owned(), topic.to_owned());
        let slot = self.slots.entry(key.clone()).or_default().clone();
        {
            let guard = tokio::select! {
                () = retired => None,
                g = slot.lock() => Some(g),
            };
            if guard.is_some() {
                source.await;
            }
        }
        drop(slot);
        // Forget the slot unless another task of this topic holds or awaits it.
        self.slots.remove_if(&key, |_, s| Arc::strong_count(s) == 1);
    }

    /// Slots currently tracked (tests: they do not accumulate).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// `bytes` cut at arbitrary points: decoders must give the same result for any chunking.
#[cfg(test)]
pub(crate) fn chunks_at<'a>(bytes: &'a [u8], cuts: &[proptest::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for p in points {
        chunks.push(&bytes[start..p]);
        start = p;
    }
    chunks.push(&bytes[start..]);
    chunks
}
