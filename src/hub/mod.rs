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
//!
//! [`Notify`]: tokio::sync::Notify

mod batch;
pub mod cursor;
mod dedupe;
mod map;
pub mod message;
mod mirror;
pub mod ring;
mod topic;

pub use batch::{BATCH_BYTES_MAX, Batch};
pub use dedupe::{DEDUPE_MAX, DEDUPE_WINDOW};
pub use map::{Budget, Hub, RouteTopics, Subscription, TooManyTopics, TopicSettings};
pub use mirror::{Applied, Remote, RemoteBody, Synced};
pub use topic::{
    NewMessage, ParkId, Parked, Poll, Published, Topic, UpstreamProblem, UpstreamTrouble,
};

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    use bytes::Bytes;
    use prometheus::IntGauge;

    use cursor::{Cursor, Requested};
    use ring::BufferLimits;

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
            mirrored: false,
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
        assert_eq!(first.cursor, v["cursor"].as_str().unwrap());
        assert_eq!(first.cursor, v["messages"][0]["cursor"].as_str().unwrap());
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
    fn the_topic_map_gives_its_table_back_once_topics_are_evicted() {
        let hub = Hub::new();
        let r = route(100_000, 50, false);
        let mut subs: Vec<_> = (0..20_000)
            .map(|i| hub.subscribe(&r, &format!("t{i}")).unwrap())
            .collect();
        let full = hub.table_capacity();
        drop(subs.split_off(100));
        let now = Instant::now() + Duration::from_secs(1);
        assert_eq!(hub.sweep(now), 19_900);
        assert!(
            hub.table_capacity() < full / 10,
            "{} of {full} kept for 100 topics",
            hub.table_capacity()
        );
        drop(subs);
        assert_eq!(hub.sweep(now + Duration::from_secs(1)), 100);
        assert_eq!(hub.table_capacity(), 0);
        // A route a reload retired gives its table back too.
        let other = route(100_000, 50, false);
        let subs: Vec<_> = (0..20_000)
            .map(|i| hub.subscribe(&other, &format!("t{i}")).unwrap())
            .collect();
        assert!(hub.table_capacity() >= 20_000);
        assert_eq!(hub.retire_route(&other), 20_000);
        drop(subs);
        assert_eq!(hub.table_capacity(), 0);
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
