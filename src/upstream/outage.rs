//! One upstream's outage as the sources of all its topics share it: while topics are down
//! (failing past `upstream_grace`) they take turns to probe it, one attempt every 1 to 2 s for
//! the whole upstream rather than one per topic, and when any of them gets through again every
//! source of the upstream is told, so all its topics recover within seconds of it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The shortest and longest gap between two probes of a down upstream.
pub const PROBE_GAP: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(2));
/// Told of a recovery, a source tries again within this (spread so its topics do not all ask
/// at the same instant).
pub const RECOVERY_SPREAD: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Outage {
    /// The last probe handed out.
    last_probe: Mutex<Option<Instant>>,
    /// Counts recoveries: a source that failed after the last one it saw is woken by the next.
    recoveries: AtomicU64,
    recovered: Notify,
}

impl Default for Outage {
    fn default() -> Outage {
        Outage {
            last_probe: Mutex::new(None),
            recoveries: AtomicU64::new(0),
            recovered: Notify::new(),
        }
    }
}

/// A random gap in `[from, to]`.
fn jitter((from, to): (Duration, Duration)) -> Duration {
    from + (to - from).mul_f64(fastrand::f64())
}

impl Outage {
    /// When a down topic's source may probe the upstream next: 1 to 2 s after the last probe
    /// any topic of the upstream was given (or after `now`), but no later than `latest`.
    pub fn next_probe(&self, now: Instant, latest: Instant) -> Instant {
        let mut last = self.last_probe.lock().unwrap_or_else(|p| p.into_inner());
        let after = last.map_or(now, |l| l.max(now));
        let probe = (after + jitter(PROBE_GAP)).min(latest);
        *last = Some(last.map_or(probe, |l| l.max(probe)));
        probe
    }

    /// How many recoveries there have been: a source reads this before each attempt.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::SeqCst)
    }

    /// A topic of this upstream was failing and got through: the others try again soon.
    pub fn recovered(&self) {
        self.recoveries.fetch_add(1, Ordering::SeqCst);
        *self.last_probe.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.recovered.notify_waiters();
    }

    /// Completes, a random delay within [`RECOVERY_SPREAD`] after a recovery later than
    /// `seen` (the count read before the source's last attempt).
    pub async fn recovery_after(&self, seen: u64) {
        loop {
            let notified = self.recovered.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.recoveries() != seen {
                break;
            }
            notified.await;
        }
        tokio::time::sleep(RECOVERY_SPREAD.mul_f64(fastrand::f64())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::FutureExt;

    #[tokio::test(start_paused = true)]
    async fn probes_take_turns_one_to_two_seconds_apart() {
        let outage = Outage::default();
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let mut previous = now;
        for _ in 0..10 {
            let probe = outage.next_probe(now, far);
            let gap = probe - previous;
            assert!(gap >= PROBE_GAP.0 && gap <= PROBE_GAP.1, "{gap:?}");
            previous = probe;
        }
        // No later than asked: the turn is not taken from the topics after it.
        let soon = now + Duration::from_millis(10);
        assert_eq!(outage.next_probe(now, soon), soon);
        let next = outage.next_probe(now, far);
        assert!(next - previous >= PROBE_GAP.0, "{:?}", next - previous);
        // After a recovery the turns start again from the present.
        outage.recovered();
        let fresh = outage.next_probe(now, far);
        assert!(fresh - now <= PROBE_GAP.1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovery_wakes_the_sources_that_failed_before_it_within_the_spread() {
        let outage = Outage::default();
        let seen = outage.recoveries();
        let waiting = outage.recovery_after(seen);
        let mut waiting = std::pin::pin!(waiting);
        assert!(waiting.as_mut().now_or_never().is_none());
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(waiting.as_mut().now_or_never().is_none(), "no recovery yet");
        let at = Instant::now();
        outage.recovered();
        waiting.await;
        assert!(at.elapsed() <= RECOVERY_SPREAD, "{:?}", at.elapsed());
        // A recovery the source has not seen yet (it came during its attempt) counts at once.
        let at = Instant::now();
        outage.recovery_after(seen).await;
        assert!(at.elapsed() <= RECOVERY_SPREAD);
    }
}
