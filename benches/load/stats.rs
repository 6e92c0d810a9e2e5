//! Summaries of what the clients saw: latency percentiles and delivery checks.

use std::collections::HashSet;

/// p50, p99 and max of `values` (milliseconds), by nearest rank.
pub fn percentiles(values: &mut [f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank =
        |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    (rank(0.50), rank(0.99), values[values.len() - 1])
}

/// How one client's received ids compare with what was published to its topic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
}

impl Delivery {
    pub fn check(published: &[u64], received: &[u64]) -> Delivery {
        let mut seen = HashSet::with_capacity(received.len());
        let mut d = Delivery::default();
        let mut last = None;
        for &id in received {
            if !seen.insert(id) {
                d.duplicated += 1;
            }
            if last.is_some_and(|l| id < l) {
                d.out_of_order += 1;
            }
            last = Some(id);
        }
        d.received = seen.len() as u64;
        d.lost = published.iter().filter(|id| !seen.contains(id)).count() as u64;
        d
    }

    pub fn add(&mut self, other: Delivery) {
        self.received += other.received;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&mut v), (50.0, 99.0, 100.0));
        let mut one = vec![3.0];
        assert_eq!(percentiles(&mut one), (3.0, 3.0, 3.0));
        assert!(percentiles(&mut []).0.is_nan());
    }

    #[test]
    fn delivery_counts_loss_duplicates_and_order() {
        let published = [1, 2, 3, 4];
        assert_eq!(
            Delivery::check(&published, &[1, 2, 3, 4]),
            Delivery {
                received: 4,
                ..Delivery::default()
            }
        );
        let d = Delivery::check(&published, &[1, 3, 3, 2]);
        assert_eq!(
            (d.received, d.lost, d.duplicated, d.out_of_order),
            (3, 1, 1, 1)
        );
    }
}
