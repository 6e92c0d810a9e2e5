//! How many polls one credential holds on one topic (docs/protocol.md 1.3: 429).

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use dashmap::DashMap;

/// Polls held per (route, topic, credential), so one client cannot hold a topic's waiters
/// hostage (docs/protocol.md 1.3: 429). A credential is the request's `Authorization` value;
/// requests without one are not counted (many clients share an address behind NAT).
pub struct ClientPolls {
    held: DashMap<u64, usize>,
    keys: RandomState,
    max: usize,
}

impl ClientPolls {
    pub fn new(max: usize) -> ClientPolls {
        ClientPolls {
            held: DashMap::new(),
            keys: RandomState::new(),
            max,
        }
    }

    pub(super) fn acquire(
        self: &Arc<Self>,
        route: &str,
        topic: &str,
        client: &[u8],
    ) -> Option<ClientPoll> {
        let key = self.keys.hash_one((route, topic, client));
        let mut n = self.held.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientPoll {
            polls: self.clone(),
            key,
        })
    }

    /// Clients with polls held now (tests: entries do not accumulate).
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// One held poll's place in [`ClientPolls`], given back on drop.
pub(super) struct ClientPoll {
    polls: Arc<ClientPolls>,
    key: u64,
}

impl Drop for ClientPoll {
    fn drop(&mut self) {
        if let Some(mut n) = self.polls.held.get_mut(&self.key) {
            *n -= 1;
        }
        self.polls.held.remove_if(&self.key, |_, n| *n == 0);
    }
}
