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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn one_source_per_topic_at_a_time_and_slots_are_forgotten() {
        let slots = Arc::new(SourceSlots::default());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release_first, first_may_end) = oneshot::channel::<()>();
        let (first_started_tx, first_started) = oneshot::channel::<()>();
        let source = |gate: Option<oneshot::Receiver<()>>, started: Option<oneshot::Sender<()>>| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                if let Some(s) = started {
                    let _ = s.send(());
                }
                if let Some(g) = gate {
                    let _ = g.await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
            }
        };
        let first = {
            let (slots, s) = (
                slots.clone(),
                source(Some(first_may_end), Some(first_started_tx)),
            );
            tokio::spawn(async move {
                slots
                    .run_exclusive("r", "t", std::future::pending(), s)
                    .await
            })
        };
        first_started.await.unwrap();
        let second = {
            let (slots, s) = (slots.clone(), source(None, None));
            tokio::spawn(async move {
                slots
                    .run_exclusive("r", "t", std::future::pending(), s)
                    .await
            })
        };
        // A source of another topic runs at once, beside the first.
        slots
            .run_exclusive("r", "other", std::future::pending(), source(None, None))
            .await;
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert!(!second.is_finished());
        release_first.send(()).unwrap();
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "never two sources of one topic"
        );
        assert!(slots.is_empty(), "{} slots left", slots.len());
        // A source whose topic is retired while it waits for the slot never runs.
        let (release, may_end) = oneshot::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let holder = {
            let (slots, s) = (slots.clone(), source(Some(may_end), Some(started_tx)));
            tokio::spawn(async move {
                slots
                    .run_exclusive("r", "t", std::future::pending(), s)
                    .await
            })
        };
        started.await.unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r2 = ran.clone();
        slots
            .run_exclusive("r", "t", async {}, async move {
                r2.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        release.send(()).unwrap();
        holder.await.unwrap();
        assert!(slots.is_empty());
    }
}
