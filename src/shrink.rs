//! Giving a map's table back once a sweep has emptied most of it. A hash table keeps its
//! largest capacity otherwise: a spike of 100,000 topics or client addresses would keep its
//! table, and the memory under it, for the life of the process.

use std::hash::{BuildHasher, Hash};

use dashmap::DashMap;

/// Shrinks `map`'s table to fit its entries once it is at most a quarter full. The quarter
/// leaves room to grow again (tables double), so a map whose size wavers around a power of two
/// is not rebuilt on every sweep.
pub fn after_sweep<K: Eq + Hash, V, S: BuildHasher + Clone>(map: &DashMap<K, V, S>) {
    let capacity = map.capacity();
    if capacity > 0 && map.len() * 4 <= capacity {
        map.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mostly_emptied_table_shrinks_and_a_fuller_one_is_left_alone() {
        let map: DashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        let full = map.capacity();
        map.retain(|k, _| *k < 4_000);
        // (Removals can leave tombstones, which the capacity does not count.)
        let swept = map.capacity();
        after_sweep(&map);
        assert_eq!(map.capacity(), swept, "40 % full: left to grow again");
        map.retain(|k, _| *k < 100);
        after_sweep(&map);
        assert!(
            map.capacity() < full / 10,
            "1 % full: {} of {full} kept",
            map.capacity()
        );
        assert_eq!(map.len(), 100);
        map.clear();
        after_sweep(&map);
        assert_eq!(map.capacity(), 0, "an empty map keeps no table");
    }
}
