//! Cluster mode's upstream sources: a topic's source runs on the one node that holds its
//! lease and writes to the topic's log; every other node with waiters follows the log and
//! tries to take the lease when it is free (its owner ended the topic, stopped, or died).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use tokio::sync::watch;

use crate::backplane::{Backplane, BackplaneError, Lease};
use crate::hub::{NewMessage, Topic, UpstreamTrouble};
use crate::source::feed::{Log, LogError, Sink};

/// Builds a topic's source for a sink, resuming from an upstream id.
pub type MakeSource =
    Box<dyn Fn(Sink, Option<String>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Runs the topic's source whenever this node holds its lease, until the topic ends here.
pub async fn run(backplane: Arc<Backplane>, topic: Arc<Topic>, make: MakeSource) {
    let route = topic.route().clone();
    while !topic.is_retired() {
        let Some(lease) = backplane.acquire(&route, topic.name()).await else {
            tokio::select! {
                () = tokio::time::sleep(backplane.lease_retry()) => {}
                () = topic.retired() => {}
            }
            continue;
        };
        let lease = Arc::new(lease);
        // The upstream's state is announced by one task, latest state first, in order.
        let (state, announced) = watch::channel(None);
        let announcer = tokio::spawn(announce(Arc::downgrade(&lease), announced));
        let log = LeasedLog {
            lease: lease.clone(),
            state,
        };
        let source = make(Sink::Log(Box::new(log)), lease.resume_from.clone());
        let ended_itself = tokio::select! {
            () = source => true,
            () = lease.keep() => false,
            () = topic.retired() => false,
        };
        // The source (and its upstream request) is gone: give the lease up for the next owner.
        announcer.abort();
        lease.release().await;
        if ended_itself {
            // Fenced, or a source that cannot run: do not take the lease again at once.
            tokio::select! {
                () = tokio::time::sleep(backplane.lease_retry()) => {}
                () = topic.retired() => {}
            }
        }
    }
}

/// Announces each upstream state the source reports, the latest when several came meanwhile,
/// while the lease lives.
async fn announce(lease: Weak<Lease>, mut states: watch::Receiver<Option<UpstreamTrouble>>) {
    while states.changed().await.is_ok() {
        let state = *states.borrow_and_update();
        let Some(lease) = lease.upgrade() else {
            return;
        };
        lease.announce_upstream(state).await;
    }
}

/// The topic's log, written through this node's lease.
struct LeasedLog {
    lease: Arc<Lease>,
    state: watch::Sender<Option<UpstreamTrouble>>,
}

impl Log for LeasedLog {
    fn append(
        &self,
        message: Option<NewMessage>,
        resume_from: Option<&str>,
    ) -> Pin<Box<dyn Future<Output = Result<bool, LogError>> + Send + '_>> {
        let resume_from = resume_from.map(str::to_owned);
        Box::pin(async move {
            self.lease
                .append(message, resume_from.as_deref())
                .await
                .map_err(|e| match e {
                    BackplaneError::Fenced => LogError::Fenced,
                    BackplaneError::Unreachable | BackplaneError::Refused(_) => {
                        LogError::Unavailable
                    }
                })
        })
    }

    fn upstream(&self, state: Option<UpstreamTrouble>) {
        self.state.send_replace(state);
    }
}
