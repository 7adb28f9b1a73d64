//! Which 2 MiB chunk of device memory to evict when it is full (UVM's PMM root-chunk LRU,
//! and the policies of the UVM Smart simulator: FIFO, LFU-2M, random).
//!
//! The driver describes every chunk that may be evicted (it holds pages and no migration
//! is filling it) as a [`ChunkInfo`]; the policy picks one. Times are the driver's logical
//! use counter, which ticks once per allocation into a chunk and once per GPU mapping of
//! its pages, so a decision depends on the order of events only, the same in a simulated
//! run and a real one.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// What the driver knows of one chunk that may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChunkInfo {
    /// The chunk's index in device memory (2 MiB each).
    pub index: u32,
    /// When its first page in use was allocated.
    pub allocated_at: u64,
    /// When it was last allocated from or mapped by the GPU.
    pub last_used: u64,
    /// How often it was allocated from or mapped since it was last empty.
    pub uses: u64,
    /// Pages of it in use.
    pub pages_in_use: u32,
}

/// An eviction policy.
pub trait EvictionPolicy: Send + Sync {
    /// The chunk to evict among `candidates` (never empty).
    fn victim(&self, candidates: &[ChunkInfo]) -> u32;

    /// The policy's name, as scenario files and reports spell it.
    fn name(&self) -> &'static str;
}

/// Least recently used chunk (UVM's default; "LRU-2M").
#[derive(Debug, Clone, Copy, Default)]
pub struct Lru;

impl EvictionPolicy for Lru {
    fn victim(&self, candidates: &[ChunkInfo]) -> u32 {
        pick(candidates, |c| (c.last_used, c.index))
    }

    fn name(&self) -> &'static str {
        "lru"
    }
}

/// The chunk allocated first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fifo;

impl EvictionPolicy for Fifo {
    fn victim(&self, candidates: &[ChunkInfo]) -> u32 {
        pick(candidates, |c| (c.allocated_at, c.index))
    }

    fn name(&self) -> &'static str {
        "fifo"
    }
}

/// The least frequently used chunk ("LFU-2M"), the least recently used among equals.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lfu;

impl EvictionPolicy for Lfu {
    fn victim(&self, candidates: &[ChunkInfo]) -> u32 {
        pick(candidates, |c| (c.uses, c.last_used))
    }

    fn name(&self) -> &'static str {
        "lfu"
    }
}

/// A chunk chosen at random, from a seed (xorshift64*), so runs repeat.
#[derive(Debug)]
pub struct RandomEviction {
    state: AtomicU64,
}

impl RandomEviction {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> RandomEviction {
        RandomEviction {
            // Spread the seed (splitmix64) so that neighbouring seeds give unrelated
            // streams; xorshift must not start at 0.
            state: AtomicU64::new(spread(seed) | 1),
        }
    }

    fn next(&self) -> u64 {
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl EvictionPolicy for RandomEviction {
    fn victim(&self, candidates: &[ChunkInfo]) -> u32 {
        // CAST: the remainder is below candidates.len(), a usize.
        candidates[(self.next() % candidates.len() as u64) as usize].index
    }

    fn name(&self) -> &'static str {
        "random"
    }
}

/// splitmix64's finaliser.
fn spread(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The candidate with the smallest `key`.
fn pick<K: Ord>(candidates: &[ChunkInfo], key: impl Fn(&ChunkInfo) -> K) -> u32 {
    candidates
        .iter()
        .min_by_key(|c| key(c))
        .map(|c| c.index)
        .expect("candidates are never empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32, allocated_at: u64, last_used: u64, uses: u64) -> ChunkInfo {
        ChunkInfo {
            index,
            allocated_at,
            last_used,
            uses,
            pages_in_use: 1,
        }
    }

    #[test]
    fn each_policy_picks_its_victim() {
        let c = [chunk(0, 1, 9, 5), chunk(1, 2, 3, 7), chunk(2, 3, 8, 1)];
        assert_eq!(Lru.victim(&c), 1, "least recently used");
        assert_eq!(Fifo.victim(&c), 0, "first allocated");
        assert_eq!(Lfu.victim(&c), 2, "least used");
        let tie = [chunk(4, 1, 6, 2), chunk(5, 1, 4, 2)];
        assert_eq!(Lfu.victim(&tie), 5, "LFU breaks ties by recency");
        assert_eq!(Fifo.victim(&tie), 4, "FIFO breaks ties by index");
    }

    #[test]
    fn random_eviction_repeats_with_its_seed() {
        let c: Vec<_> = (0..16).map(|i| chunk(i, 0, 0, 0)).collect();
        let run = |seed| {
            let r = RandomEviction::new(seed);
            (0..32).map(|_| r.victim(&c)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let picks = run(7);
        assert!(picks.iter().collect::<std::collections::HashSet<_>>().len() > 4);
    }
}
