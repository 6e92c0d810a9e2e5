//! Reconnect delays: full-jitter exponential backoff (docs/protocol.md section 3: base 250 ms,
//! cap 30 s), so an upstream outage does not end in a synchronised reconnect storm.

use std::time::Duration;

pub const BASE: Duration = Duration::from_millis(250);
pub const CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The next delay: random in `[0, min(CAP, base * 2^attempt)]`. `base` is [`BASE`] unless
    /// the upstream asked for more (SSE `retry:`).
    pub fn next(&mut self, asked: Option<Duration>) -> Duration {
        let base = asked.map_or(BASE, |a| a.max(BASE));
        let ceiling = base.saturating_mul(1 << self.attempt.min(16)).min(CAP);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    /// After a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        for attempt in 0..20u32 {
            let ceiling = BASE.saturating_mul(1 << attempt.min(16)).min(CAP);
            assert!(b.next(None) <= ceiling);
        }
        assert!(b.next(None) <= CAP);
        b.reset();
        assert!(b.next(None) <= BASE);
        assert!(b.next(Some(Duration::from_secs(100))) <= CAP);
    }
}
