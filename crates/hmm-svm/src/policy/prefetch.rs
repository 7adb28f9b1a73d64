//! Which pages of a 2 MiB block to migrate with the ones that faulted (UVM's
//! `uvm_perf_prefetch.c`).
//!
//! The driver hands the policy a [`BlockView`]: the pages of the block already on the
//! device, the pages that faulted in this batch, and the pages the SVM range covers. The
//! policy returns the pages to migrate, a superset of the faulted ones inside the range.
//!
//! * [`NoPrefetch`]: the faulted pages only.
//! * [`WholeRange`]: every page of the range (drm_gpusvm and Xe: the range is the unit).
//! * [`TreePrefetch`]: UVM's density prefetcher. The block's pages are the leaves of a
//!   binary tree; for each faulted page, the largest subtree containing it whose pages are
//!   more than `threshold` percent resident or faulting is fetched whole (51 % by default,
//!   `uvm_perf_prefetch_threshold`), and the result is rounded out to 64 KiB big pages.

use serde::Serialize;

/// Pages per block (2 MiB of 4 KiB pages).
pub const BLOCK_PAGES: usize = 512;

/// One bit per page of a 2 MiB block.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash, Serialize)]
pub struct BlockMask([u64; BLOCK_PAGES / 64]);

impl BlockMask {
    /// No page.
    pub const EMPTY: BlockMask = BlockMask([0; BLOCK_PAGES / 64]);

    /// Pages `[start, end)`.
    pub fn range(start: usize, end: usize) -> BlockMask {
        let end = end.min(BLOCK_PAGES);
        BlockMask(std::array::from_fn(|i| word_bits(i, start, end)))
    }

    /// Adds page `p`.
    pub fn set(&mut self, p: usize) {
        self.0[p / 64] |= 1 << (p % 64);
    }

    /// Whether page `p` is in.
    pub fn get(&self, p: usize) -> bool {
        self.0[p / 64] & (1 << (p % 64)) != 0
    }

    /// Pages in.
    pub fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Pages in among `[start, end)`.
    pub fn count_in(&self, start: usize, end: usize) -> usize {
        let end = end.min(BLOCK_PAGES);
        if start >= end {
            return 0;
        }
        (start / 64..=(end - 1) / 64)
            .map(|i| (self.0[i] & word_bits(i, start, end)).count_ones() as usize)
            .sum()
    }

    /// Pages in either.
    pub fn or(&self, other: &BlockMask) -> BlockMask {
        BlockMask(std::array::from_fn(|i| self.0[i] | other.0[i]))
    }

    /// Pages in both.
    pub fn and(&self, other: &BlockMask) -> BlockMask {
        BlockMask(std::array::from_fn(|i| self.0[i] & other.0[i]))
    }

    /// Pages in this one and not in `other`.
    pub fn minus(&self, other: &BlockMask) -> BlockMask {
        BlockMask(std::array::from_fn(|i| self.0[i] & !other.0[i]))
    }

    /// Whether no page is in.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The runs of consecutive pages, as `[start, end)`.
    pub fn runs(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut p = 0;
        while let Some(s) = self.next_from(p, true) {
            let e = self.next_from(s, false).unwrap_or(BLOCK_PAGES);
            out.push((s, e));
            p = e;
        }
        out
    }

    /// The first page from `p` on that is in (`set`) or out (`!set`), a word at a time.
    fn next_from(&self, p: usize, set: bool) -> Option<usize> {
        if p >= BLOCK_PAGES {
            return None;
        }
        let mut i = p / 64;
        let first = *self.0.get(i)?;
        let mut w = if set { first } else { !first } & (u64::MAX << (p % 64));
        loop {
            if w != 0 {
                return Some(i * 64 + w.trailing_zeros() as usize);
            }
            i += 1;
            let next = *self.0.get(i)?;
            w = if set { next } else { !next };
        }
    }
}

/// The bits of word `i` (pages `64 i .. 64 i + 64`) that fall in `[start, end)`.
fn word_bits(i: usize, start: usize, end: usize) -> u64 {
    let (lo, hi) = (i * 64, i * 64 + 64);
    let (s, e) = (start.max(lo), end.min(hi));
    if s >= e {
        return 0;
    }
    let n = e - s;
    let ones = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    ones << (s - lo)
}

impl std::fmt::Debug for BlockMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.runs()).finish()
    }
}

/// What the prefetcher sees of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockView {
    /// Pages already on the device.
    pub resident: BlockMask,
    /// Pages that faulted in this batch.
    pub faulted: BlockMask,
    /// Pages the SVM range covers (what may be migrated at all).
    pub range: BlockMask,
}

/// A prefetch policy.
pub trait PrefetchPolicy: Send + Sync {
    /// The pages to migrate: the faulted ones and what to fetch with them, inside
    /// `view.range`.
    fn region(&self, view: &BlockView) -> BlockMask;

    /// The policy's name, as scenario files and reports spell it.
    fn name(&self) -> &'static str;
}

/// The faulted pages only.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPrefetch;

impl PrefetchPolicy for NoPrefetch {
    fn region(&self, view: &BlockView) -> BlockMask {
        view.faulted.and(&view.range)
    }

    fn name(&self) -> &'static str {
        "none"
    }
}

/// Every page of the range (drm_gpusvm).
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeRange;

impl PrefetchPolicy for WholeRange {
    fn region(&self, view: &BlockView) -> BlockMask {
        view.range
    }

    fn name(&self) -> &'static str {
        "range"
    }
}

/// UVM's tree-based density prefetcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreePrefetch {
    /// Occupancy, in percent, a subtree must exceed to be fetched whole
    /// (`uvm_perf_prefetch_threshold`, 51).
    pub threshold_pct: u32,
    /// Pages of a big page the region is rounded out to (16: 64 KiB); 1 turns it off.
    pub big_page_pages: usize,
}

impl Default for TreePrefetch {
    fn default() -> Self {
        TreePrefetch {
            threshold_pct: 51,
            big_page_pages: 16,
        }
    }
}

impl PrefetchPolicy for TreePrefetch {
    fn region(&self, view: &BlockView) -> BlockMask {
        let occupied = view.resident.or(&view.faulted);
        let mut region = view.faulted;
        let mut next = view.faulted.next_from(0, true);
        while let Some(p) = next {
            next = view.faulted.next_from(p + 1, true);
            // The largest subtree around p whose occupancy exceeds the threshold.
            let mut best = None;
            let mut size = 2;
            while size <= BLOCK_PAGES {
                let start = p & !(size - 1);
                let n = occupied.count_in(start, start + size);
                if n as u64 * 100 > u64::from(self.threshold_pct) * size as u64 {
                    best = Some((start, size));
                }
                size *= 2;
            }
            if let Some((start, size)) = best {
                region = region.or(&BlockMask::range(start, start + size));
            }
        }
        let big = self.big_page_pages.max(1);
        if big > 1 {
            let mut rounded = region;
            for (s, e) in region.runs() {
                rounded = rounded.or(&BlockMask::range(s / big * big, e.div_ceil(big) * big));
            }
            region = rounded;
        }
        region.and(&view.range)
    }

    fn name(&self) -> &'static str {
        "tree"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(resident: &[usize], faulted: &[usize]) -> BlockView {
        let mut r = BlockMask::EMPTY;
        resident.iter().for_each(|&p| r.set(p));
        let mut f = BlockMask::EMPTY;
        faulted.iter().for_each(|&p| f.set(p));
        BlockView {
            resident: r,
            faulted: f,
            range: BlockMask::range(0, BLOCK_PAGES),
        }
    }

    #[test]
    fn masks() {
        assert_eq!(BlockMask::range(0, 512).count(), 512);
        assert_eq!(BlockMask::range(60, 130).runs(), [(60, 130)]);
        assert_eq!(BlockMask::range(60, 130).count_in(63, 129), 66);
        assert_eq!(BlockMask::range(5, 5).count(), 0);
        let m = BlockMask::range(3, 7).or(&BlockMask::range(100, 101));
        assert_eq!(m.count(), 5);
        assert_eq!(m.runs(), [(3, 7), (100, 101)]);
        assert_eq!(
            m.minus(&BlockMask::range(0, 5)).runs(),
            [(5, 7), (100, 101)]
        );
        assert!(BlockMask::EMPTY.is_empty());
    }

    /// Hand-computed: nine faults on pages 0..=8 of an empty block fill 9 of the 16-page
    /// subtree (56 % > 51 %) but only 9 of 32 (28 %): the region is pages 0..16.
    #[test]
    fn the_tree_fetches_the_largest_subtree_over_the_threshold() {
        let t = TreePrefetch {
            big_page_pages: 1,
            ..TreePrefetch::default()
        };
        let faults: Vec<usize> = (0..=8).collect();
        assert_eq!(t.region(&view(&[], &faults)).runs(), [(0, 16)]);
        // With pages 16..32 resident too, 25 of 32 (78 %) and 25 of 64 (39 %): 0..32.
        let resident: Vec<usize> = (16..32).collect();
        assert_eq!(t.region(&view(&resident, &faults)).runs(), [(0, 32)]);
        // A lone fault: 1 of 2 is exactly 50 %, not above 51 %: the page alone.
        assert_eq!(t.region(&view(&[], &[300])).runs(), [(300, 301)]);
        // Page 301 resident: 2 of 2 (100 %), 2 of 4 (50 %): pages 300..302.
        assert_eq!(t.region(&view(&[301], &[300])).runs(), [(300, 302)]);
        // Half the block resident plus one fault in the other half: 257 of 512 > 51 %?
        // 257 * 100 = 25700 <= 51 * 512 = 26112: no; the fault's own subtrees are empty.
        let half: Vec<usize> = (0..256).collect();
        assert_eq!(t.region(&view(&half, &[400])).runs(), [(400, 401)]);
        // 300 resident: 301 of 512 (58 %): the whole block.
        let most: Vec<usize> = (0..300).collect();
        assert_eq!(t.region(&view(&most, &[400])).runs(), [(0, 512)]);
    }

    #[test]
    fn big_pages_round_the_region_out_and_the_range_clips_it() {
        let t = TreePrefetch::default();
        // A lone fault at page 20 becomes its 64 KiB big page, 16..32.
        assert_eq!(t.region(&view(&[], &[20])).runs(), [(16, 32)]);
        let mut v = view(&[], &[20]);
        v.range = BlockMask::range(18, 40);
        assert_eq!(t.region(&v).runs(), [(18, 32)]);
        assert_eq!(NoPrefetch.region(&v).runs(), [(20, 21)]);
        assert_eq!(WholeRange.region(&v).runs(), [(18, 40)]);
    }
}
