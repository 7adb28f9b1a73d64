//! The frame allocator of one memory region: whole 2 MiB blocks for order-9 folios, and
//! blocks split into 4 KiB frames for order 0.
//!
//! A split block keeps a bitmap of its free frames; when its last frame comes back the block
//! is whole again, so order-9 allocations stay possible after any amount of order-0 churn (a
//! two-level buddy allocator). Blocks with free frames sit on a `partial` stack, with stale
//! entries skipped lazily.

use thiserror::Error;

use crate::addr::PMD_ORDER;

/// Frames per block.
pub(crate) const BLOCK_FRAMES: usize = 1 << PMD_ORDER;

/// The allocator found no free memory of the requested order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("out of memory: no free frame of order {order}")]
pub struct AllocError {
    /// The requested order.
    pub order: u32,
}

#[derive(Debug, Clone)]
struct BlockState {
    /// Order-0 frames are being handed out from this block; `bitmap` is meaningful.
    split: bool,
    /// An entry for this block is on the `partial` stack (possibly stale).
    on_partial: bool,
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
            blocks: vec![
                BlockState {
                    split: false,
                    on_partial: false,
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

    /// Allocates `2^order` frames (`order` 0 or 9); returns the first frame index.
    pub(crate) fn alloc(&mut self, order: u32) -> Result<usize, AllocError> {
        match order {
            0 => self.alloc_small(),
            PMD_ORDER => {
                let b = self.free_blocks.pop().ok_or(AllocError { order })?;
                self.free_frames -= BLOCK_FRAMES;
                Ok(b as usize * BLOCK_FRAMES)
            }
            _ => Err(AllocError { order }),
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
        let b = self.free_blocks.pop().ok_or(AllocError { order: 0 })?;
        let st = &mut self.blocks[b as usize];
        st.split = true;
        st.free = BLOCK_FRAMES as u16;
        st.bitmap = [u64::MAX; BLOCK_FRAMES / 64];
        let idx = take_bit(st);
        if !st.on_partial {
            st.on_partial = true;
            self.partial.push(b);
        }
        self.free_frames -= 1;
        Ok(b as usize * BLOCK_FRAMES + idx)
    }

    /// Returns `2^order` frames starting at `first`.
    ///
    /// # Panics
    ///
    /// Panics on a double free or an order that does not match the allocation.
    #[track_caller]
    pub(crate) fn free(&mut self, first: usize, order: u32) {
        let b = first / BLOCK_FRAMES;
        if order == PMD_ORDER {
            assert_eq!(first % BLOCK_FRAMES, 0, "misaligned order-9 free");
            assert!(!self.blocks[b].split, "order-9 free of a split block");
            debug_assert!(!self.free_blocks.contains(&(b as u32)), "double free");
            self.free_blocks.push(b as u32);
            self.free_frames += BLOCK_FRAMES;
            return;
        }
        assert_eq!(order, 0, "unsupported order {order}");
        let st = &mut self.blocks[b];
        assert!(st.split, "order-0 free into an unsplit block");
        let i = first % BLOCK_FRAMES;
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        assert!(st.bitmap[w] & bit == 0, "double free of frame {first}");
        st.bitmap[w] |= bit;
        st.free += 1;
        self.free_frames += 1;
        if st.free as usize == BLOCK_FRAMES {
            // The block is whole again; its partial entry (if any) goes stale.
            st.split = false;
            self.free_blocks.push(b as u32);
        } else if !st.on_partial {
            st.on_partial = true;
            self.partial.push(b as u32);
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
            st.on_partial = true;
            self.partial.push(b as u32);
        }
        let st = &mut self.blocks[b];
        let i = index % BLOCK_FRAMES;
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        assert!(st.bitmap[w] & bit != 0, "frame {index} already in use");
        st.bitmap[w] &= !bit;
        st.free -= 1;
        self.free_frames -= 1;
    }
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
        assert_eq!(a.alloc(3), Err(AllocError { order: 3 }));
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
}
