//! The frame allocator of one memory region: whole 2 MiB blocks for order-9 folios, and
//! blocks split into 4 KiB frames for the smaller orders (0 to 8: pages and mTHPs).
//!
//! A split block keeps a bitmap of its free frames; a folio of order `k` inside it is an
//! aligned run of `2^k` frames (a buddy allocator's placement, found in the bitmap rather
//! than kept on lists). When a split block's last frame comes back the block is whole
//! again, so order-9 allocations stay possible after any amount of small-order churn (a
//! two-level buddy allocator). Blocks with a free frame sit on a `partial` stack, and
//! blocks with a free aligned run of order `k` on the stack of that order, each block at
//! most once per stack, with stale entries skipped lazily: an allocation pops entries
//! until one serves, a free pushes its block on every stack whose order it now serves.

use thiserror::Error;

use crate::addr::{PMD_ORDER, PUD_ORDER};

/// Frames per block.
pub(crate) const BLOCK_FRAMES: usize = 1 << PMD_ORDER;

/// The allocator found no free memory of the requested order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("out of memory: no free frame of order {order}")]
pub struct AllocError {
    /// The requested order.
    pub order: u32,
}

/// The largest order allocated inside a split block (1 MiB); order 9 is a whole block.
pub(crate) const MAX_SMALL_ORDER: u32 = PMD_ORDER - 1;

/// Blocks per gigantic (order-18, 1 GiB) folio.
const GIGANTIC_BLOCKS: usize = 1 << (PUD_ORDER - PMD_ORDER);

#[derive(Debug, Clone)]
struct BlockState {
    /// Small folios are being handed out from this block; `bitmap` is meaningful.
    split: bool,
    /// An entry for this block is on the `partial` stack (possibly stale).
    on_partial: bool,
    /// Bit `k - 1`: an entry for this block is on the stack of order `k` (possibly stale).
    on_runs: u8,
    /// Free frames of a split block.
    free: u16,
    /// Bit set = frame free.
    bitmap: [u64; BLOCK_FRAMES / 64],
}

/// Allocator state; the region wraps it in a mutex.
#[derive(Debug)]
pub(crate) struct BlockAllocator {
    free_blocks: Vec<u32>,
    partial: Vec<u32>,
    /// `runs[k - 1]`: blocks with a free aligned run of order `k`, 1 to 8.
    runs: [Vec<u32>; MAX_SMALL_ORDER as usize],
    blocks: Vec<BlockState>,
    free_frames: usize,
}

impl BlockAllocator {
    /// An allocator over `nblocks` whole free blocks.
    pub(crate) fn new(nblocks: usize) -> Self {
        BlockAllocator {
            // Reversed so that pops hand out low addresses first.
            free_blocks: (0..nblocks as u32).rev().collect(),
            partial: Vec::new(),
            runs: Default::default(),
            blocks: vec![
                BlockState {
                    split: false,
                    on_partial: false,
                    on_runs: 0,
                    free: 0,
                    bitmap: [0; BLOCK_FRAMES / 64],
                };
                nblocks
            ],
            free_frames: nblocks * BLOCK_FRAMES,
        }
    }

    /// Free frames (of any order) left.
    pub(crate) fn free_frames(&self) -> usize {
        self.free_frames
    }

    /// Allocates `2^order` frames (`order` 0 to 9, or 18 for a gigantic hugetlb page),
    /// aligned to their size; returns the first frame index.
    pub(crate) fn alloc(&mut self, order: u32) -> Result<usize, AllocError> {
        match order {
            0 => self.alloc_small(),
            1..=MAX_SMALL_ORDER => self.alloc_run(order),
            PMD_ORDER => {
                let b = self.free_blocks.pop().ok_or(AllocError { order })?;
                self.free_frames -= BLOCK_FRAMES;
                Ok(b as usize * BLOCK_FRAMES)
            }
            PUD_ORDER => self.alloc_gigantic(),
            _ => Err(AllocError { order }),
        }
    }

    /// The lowest run of 512 whole free blocks aligned to 1 GiB (`alloc_contig_pages` for
    /// a gigantic hugetlb page): linear in the number of blocks, as the kernel's search
    /// is, and only the hugetlb pool's resizing asks for it.
    fn alloc_gigantic(&mut self) -> Result<usize, AllocError> {
        let mut whole = vec![false; self.blocks.len()];
        for &b in &self.free_blocks {
            whole[b as usize] = true;
        }
        let run = whole
            .chunks_exact(GIGANTIC_BLOCKS)
            .position(|c| c.iter().all(|&w| w))
            .ok_or(AllocError { order: PUD_ORDER })?;
        let blocks = (run * GIGANTIC_BLOCKS) as u32..((run + 1) * GIGANTIC_BLOCKS) as u32;
        self.free_blocks.retain(|b| !blocks.contains(b));
        self.free_frames -= GIGANTIC_BLOCKS * BLOCK_FRAMES;
        Ok(run * GIGANTIC_BLOCKS * BLOCK_FRAMES)
    }

    /// An aligned run of `2^order` frames (`order` 1 to 8) from a split block that has
    /// one, else from a whole block split for it.
    fn alloc_run(&mut self, order: u32) -> Result<usize, AllocError> {
        let k = order as usize - 1;
        while let Some(&b) = self.runs[k].last() {
            let st = &mut self.blocks[b as usize];
            let found = if st.split {
                find_run(&st.bitmap, order)
            } else {
                None
            };
            let Some(idx) = found else {
                st.on_runs &= !(1 << k);
                self.runs[k].pop();
                continue;
            };
            take_run(st, idx, order);
            if find_run(&st.bitmap, order).is_none() {
                st.on_runs &= !(1 << k);
                self.runs[k].pop();
            }
            self.free_frames -= 1 << order;
            return Ok(b as usize * BLOCK_FRAMES + idx);
        }
        let b = self.split_free_block().ok_or(AllocError { order })?;
        let st = &mut self.blocks[b as usize];
        take_run(st, 0, order);
        self.free_frames -= 1 << order;
        self.push_runs(b, None);
        Ok(b as usize * BLOCK_FRAMES)
    }

    /// Takes a whole free block and marks it split with every frame free.
    fn split_free_block(&mut self) -> Option<u32> {
        let b = self.free_blocks.pop()?;
        let st = &mut self.blocks[b as usize];
        st.split = true;
        st.free = BLOCK_FRAMES as u16;
        st.bitmap = [u64::MAX; BLOCK_FRAMES / 64];
        Some(b)
    }

    /// Puts split block `b` on the partial stack and on the stack of every small order it
    /// now has a free aligned run of, unless it is there already. `around` is a frame
    /// (index in the block) just freed: only runs containing it can be new, and once one
    /// order's is not free no larger one is. `None` looks at the whole block.
    fn push_runs(&mut self, b: u32, around: Option<usize>) {
        let st = &mut self.blocks[b as usize];
        if !st.on_partial {
            st.on_partial = true;
            self.partial.push(b);
        }
        for order in 1..=MAX_SMALL_ORDER {
            let free = match around {
                None => find_run(&st.bitmap, order).is_some(),
                Some(i) => {
                    let n = 1usize << order;
                    run_is_free(&st.bitmap, i & !(n - 1), n)
                }
            };
            if !free {
                if around.is_some() {
                    break;
                }
                continue;
            }
            let k = order as usize - 1;
            if st.on_runs & (1 << k) == 0 {
                st.on_runs |= 1 << k;
                self.runs[k].push(b);
            }
        }
    }

    fn alloc_small(&mut self) -> Result<usize, AllocError> {
        while let Some(&b) = self.partial.last() {
            let st = &mut self.blocks[b as usize];
            if !st.split || st.free == 0 {
                st.on_partial = false;
                self.partial.pop();
                continue;
            }
            let idx = take_bit(st);
            if st.free == 0 {
                st.on_partial = false;
                self.partial.pop();
            }
            self.free_frames -= 1;
            return Ok(b as usize * BLOCK_FRAMES + idx);
        }
        let b = self.split_free_block().ok_or(AllocError { order: 0 })?;
        let idx = take_bit(&mut self.blocks[b as usize]);
        self.free_frames -= 1;
        self.push_runs(b, None);
        Ok(b as usize * BLOCK_FRAMES + idx)
    }

    /// Returns `2^order` frames starting at `first`.
    ///
    /// # Panics
    ///
    /// Panics on a double free; the order must be the allocation's (the region always
    /// frees a folio with its own order).
    #[track_caller]
    pub(crate) fn free(&mut self, first: usize, order: u32) {
        let b = first / BLOCK_FRAMES;
        if order == PUD_ORDER {
            assert_eq!(b % GIGANTIC_BLOCKS, 0, "misaligned order-18 free");
            for b in b..b + GIGANTIC_BLOCKS {
                assert!(!self.blocks[b].split, "order-18 free of a split block");
                debug_assert!(!self.free_blocks.contains(&(b as u32)), "double free");
                self.free_blocks.push(b as u32);
            }
            self.free_frames += GIGANTIC_BLOCKS * BLOCK_FRAMES;
            return;
        }
        if order == PMD_ORDER {
            assert_eq!(first % BLOCK_FRAMES, 0, "misaligned order-9 free");
            assert!(!self.blocks[b].split, "order-9 free of a split block");
            debug_assert!(!self.free_blocks.contains(&(b as u32)), "double free");
            self.free_blocks.push(b as u32);
            self.free_frames += BLOCK_FRAMES;
            return;
        }
        assert!(order <= MAX_SMALL_ORDER, "unsupported order {order}");
        let n = 1usize << order;
        let st = &mut self.blocks[b];
        assert!(st.split, "order-{order} free into an unsplit block");
        let i = first % BLOCK_FRAMES;
        assert_eq!(i % n, 0, "misaligned order-{order} free");
        let words = i / 64..(i + n).div_ceil(64);
        let m = run_mask(i, n.min(64));
        assert!(
            st.bitmap[words.clone()].iter().all(|&x| x & m == 0),
            "double free of a frame of {first}..{}",
            first + n
        );
        st.bitmap[words].iter_mut().for_each(|x| *x |= m);
        st.free += n as u16;
        self.free_frames += n;
        if st.free as usize == BLOCK_FRAMES {
            // The block is whole again; its stack entries (if any) go stale.
            st.split = false;
            self.free_blocks.push(b as u32);
        } else {
            self.push_runs(b as u32, Some(i));
        }
    }

    /// Turns the allocated order-9 block at `first` into 512 allocated order-0 frames (a
    /// folio split): each can then be freed on its own.
    pub(crate) fn split_allocated(&mut self, first: usize) {
        assert_eq!(first % BLOCK_FRAMES, 0, "misaligned folio split");
        let st = &mut self.blocks[first / BLOCK_FRAMES];
        assert!(!st.split, "split of a block already split");
        st.split = true;
        st.free = 0;
        st.bitmap = [0; BLOCK_FRAMES / 64];
    }

    /// Marks frame `index` as permanently in use (reserved frames such as the zero page).
    pub(crate) fn reserve(&mut self, index: usize) {
        let b = index / BLOCK_FRAMES;
        if !self.blocks[b].split {
            let pos = self
                .free_blocks
                .iter()
                .position(|&x| x as usize == b)
                .expect("reserving a frame of an allocated block");
            self.free_blocks.remove(pos);
            let st = &mut self.blocks[b];
            st.split = true;
            st.free = BLOCK_FRAMES as u16;
            st.bitmap = [u64::MAX; BLOCK_FRAMES / 64];
        }
        let st = &mut self.blocks[b];
        let i = index % BLOCK_FRAMES;
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        assert!(st.bitmap[w] & bit != 0, "frame {index} already in use");
        st.bitmap[w] &= !bit;
        st.free -= 1;
        self.free_frames -= 1;
        self.push_runs(b as u32, None);
    }
}

/// The first free aligned run of `2^order` frames (`order` 1 to 8) in a block's bitmap.
fn find_run(bitmap: &[u64; BLOCK_FRAMES / 64], order: u32) -> Option<usize> {
    let n = 1usize << order;
    if n >= 64 {
        let words = n / 64;
        return (0..bitmap.len())
            .step_by(words)
            .find(|&w| bitmap[w..w + words].iter().all(|&x| x == u64::MAX))
            .map(|w| w * 64);
    }
    // Bit i of `m` is set iff bits i..i + n of the word are all free; runs are aligned,
    // so none crosses a word.
    let aligned = (0..64).step_by(n).fold(0u64, |a, i| a | 1 << i);
    bitmap.iter().enumerate().find_map(|(w, &x)| {
        let mut m = x;
        let mut span = 1;
        while span < n {
            m &= m >> span;
            span *= 2;
        }
        let m = m & aligned;
        (m != 0).then(|| w * 64 + m.trailing_zeros() as usize)
    })
}

/// The bits of the aligned run of `n` frames at `start` (`n` a power of two up to 64) in
/// its word.
fn run_mask(start: usize, n: usize) -> u64 {
    (u64::MAX >> (64 - n)) << (start % 64)
}

/// Whether the aligned run of `n` frames (a power of two) at `start` of a block is free.
fn run_is_free(bitmap: &[u64; BLOCK_FRAMES / 64], start: usize, n: usize) -> bool {
    if n >= 64 {
        return bitmap[start / 64..(start + n) / 64]
            .iter()
            .all(|&x| x == u64::MAX);
    }
    let m = run_mask(start, n);
    bitmap[start / 64] & m == m
}

/// Marks the free aligned run of `2^order` frames at `idx` of a block in use.
fn take_run(st: &mut BlockState, idx: usize, order: u32) {
    let n = 1usize << order;
    debug_assert!(run_is_free(&st.bitmap, idx, n));
    if n >= 64 {
        st.bitmap[idx / 64..(idx + n) / 64].fill(0);
    } else {
        st.bitmap[idx / 64] &= !run_mask(idx, n);
    }
    st.free -= n as u16;
}

fn take_bit(st: &mut BlockState) -> usize {
    let w = st
        .bitmap
        .iter()
        .position(|&w| w != 0)
        .expect("block with free count has a free bit");
    let bit = st.bitmap[w].trailing_zeros() as usize;
    st.bitmap[w] &= !(1 << bit);
    st.free -= 1;
    w * 64 + bit
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn small_allocations_are_distinct_and_exhaust() {
        let mut a = BlockAllocator::new(2);
        let mut seen = HashSet::new();
        for _ in 0..2 * BLOCK_FRAMES {
            assert!(seen.insert(a.alloc(0).unwrap()));
        }
        assert_eq!(a.alloc(0), Err(AllocError { order: 0 }));
        assert_eq!(a.free_frames(), 0);
    }

    #[test]
    fn blocks_merge_back_for_huge_allocations() {
        let mut a = BlockAllocator::new(1);
        let frames: Vec<_> = (0..10).map(|_| a.alloc(0).unwrap()).collect();
        assert_eq!(a.alloc(PMD_ORDER), Err(AllocError { order: 9 }));
        for f in frames {
            a.free(f, 0);
        }
        assert_eq!(a.alloc(PMD_ORDER), Ok(0));
        assert_eq!(a.alloc(0), Err(AllocError { order: 0 }));
        a.free(0, PMD_ORDER);
        assert_eq!(a.free_frames(), BLOCK_FRAMES);
        // Re-splitting after a merge must not leave duplicate partial entries behind.
        let f = a.alloc(0).unwrap();
        a.free(f, 0);
        let g = a.alloc(0).unwrap();
        a.free(g, 0);
        assert_eq!(a.alloc(PMD_ORDER), Ok(0));
    }

    #[test]
    fn reserve_removes_frames() {
        let mut a = BlockAllocator::new(1);
        a.reserve(0);
        a.reserve(5);
        assert_eq!(a.free_frames(), BLOCK_FRAMES - 2);
        let all: HashSet<_> = (0..BLOCK_FRAMES - 2).map(|_| a.alloc(0).unwrap()).collect();
        assert!(!all.contains(&0) && !all.contains(&5));
    }

    #[test]
    fn bad_orders_and_double_free() {
        let mut a = BlockAllocator::new(1);
        assert_eq!(a.alloc(10), Err(AllocError { order: 10 }));
        let f = a.alloc(0).unwrap();
        a.free(f, 0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut b = BlockAllocator::new(1);
            let f = b.alloc(0).unwrap();
            let _g = b.alloc(0).unwrap();
            b.free(f, 0);
            b.free(f, 0);
        }));
        assert!(r.is_err());
    }

    /// Every small order is served aligned, from one block while it has room, and the
    /// block is whole again once everything is back.
    #[test]
    fn small_orders_are_aligned_and_share_a_block() {
        let mut a = BlockAllocator::new(2);
        let mut got = Vec::new();
        for order in 1..=MAX_SMALL_ORDER {
            let f = a.alloc(order).unwrap();
            assert_eq!(f % (1 << order), 0, "order {order} at {f}");
            got.push((f, order));
        }
        // 2 + 4 + ... + 256 = 510 frames, all in the first block.
        assert!(got.iter().all(|&(f, _)| f < BLOCK_FRAMES));
        assert_eq!(a.free_frames(), 2 * BLOCK_FRAMES - 510);
        let mut frames: Vec<usize> = got.iter().flat_map(|&(f, o)| f..f + (1 << o)).collect();
        frames.sort_unstable();
        frames.dedup();
        assert_eq!(frames.len(), 510, "no two folios overlap");
        // The two frames left are one order-1 run: an order-2 request takes the next block.
        let four = a.alloc(2).unwrap();
        assert_eq!(four / BLOCK_FRAMES, 1);
        for (f, o) in got {
            a.free(f, o);
        }
        assert_eq!(a.alloc(PMD_ORDER), Ok(0), "the first block is whole again");
        a.free(four, 2);
        assert_eq!(a.alloc(PMD_ORDER), Ok(BLOCK_FRAMES), "and the second");
    }

    /// A run freed in a block full of pages is found again for its order, and for each
    /// order below it.
    #[test]
    fn freed_runs_are_found_by_their_order_and_smaller() {
        let mut a = BlockAllocator::new(1);
        let pages: Vec<usize> = (0..BLOCK_FRAMES).map(|_| a.alloc(0).unwrap()).collect();
        assert_eq!(a.alloc(3), Err(AllocError { order: 3 }));
        // Free the aligned 8 frames at 64..72.
        for &f in &pages[64..72] {
            a.free(f, 0);
        }
        assert_eq!(a.alloc(4), Err(AllocError { order: 4 }));
        assert_eq!(a.alloc(3), Ok(64));
        a.free(64, 3);
        assert_eq!(a.alloc(1), Ok(64));
        assert_eq!(a.alloc(2), Ok(68));
        assert_eq!(a.alloc(1), Ok(66));
        assert_eq!(a.free_frames(), 0);
    }

    #[test]
    fn misaligned_and_double_frees_of_runs_panic() {
        let misaligned = std::panic::catch_unwind(|| {
            let mut a = BlockAllocator::new(1);
            let f = a.alloc(2).unwrap();
            a.free(f + 1, 2);
        });
        assert!(misaligned.is_err());
        let double = std::panic::catch_unwind(|| {
            let mut a = BlockAllocator::new(1);
            let f = a.alloc(3).unwrap();
            let _keep = a.alloc(0).unwrap();
            a.free(f, 3);
            a.free(f, 1);
        });
        assert!(double.is_err());
    }

    proptest::proptest! {
        /// Random allocations and frees of every order against a model of which frames
        /// are taken: folios never overlap, are aligned, the free count is exact, an
        /// allocation fails only when no aligned free run of its order exists, and with
        /// everything freed every block serves order 9 again.
        #[test]
        fn mixed_orders_never_overlap(ops in proptest::collection::vec((0u32..=9, 0usize..64, proptest::bool::ANY), 1..300)) {
            const BLOCKS: usize = 3;
            let mut a = BlockAllocator::new(BLOCKS);
            let mut taken = vec![false; BLOCKS * BLOCK_FRAMES];
            let mut live: Vec<(usize, u32)> = Vec::new();
            for (order, pick, free) in ops {
                if free && !live.is_empty() {
                    let (f, o) = live.swap_remove(pick % live.len());
                    a.free(f, o);
                    taken[f..f + (1 << o)].iter_mut().for_each(|t| *t = false);
                } else {
                    let n = 1usize << order;
                    let possible = (0..taken.len())
                        .step_by(n)
                        .any(|s| taken[s..s + n].iter().all(|t| !t));
                    match a.alloc(order) {
                        Ok(f) => {
                            proptest::prop_assert_eq!(f % n, 0);
                            proptest::prop_assert!(taken[f..f + n].iter().all(|t| !t), "overlap at {}", f);
                            taken[f..f + n].iter_mut().for_each(|t| *t = true);
                            live.push((f, order));
                        }
                        Err(_) => proptest::prop_assert!(!possible, "order {} refused with room", order),
                    }
                }
                proptest::prop_assert_eq!(a.free_frames(), taken.iter().filter(|t| !**t).count());
            }
            for (f, o) in live {
                a.free(f, o);
            }
            for _ in 0..BLOCKS {
                proptest::prop_assert!(a.alloc(PMD_ORDER).is_ok());
            }
        }
    }
}
