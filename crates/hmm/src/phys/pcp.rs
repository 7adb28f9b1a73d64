//! Per-CPU lists of free order-0 frames in front of a region's block allocator: the
//! kernel's `per_cpu_pages`.
//!
//! Every 4 KiB migration allocates a destination frame and frees a source frame, so with
//! one allocator lock per region, threads migrating on different CPUs would meet on that
//! lock and its cache line twice per page. Each CPU has its own list instead, with its own
//! lock on its own cache line; a thread takes the list of the CPU it runs on
//! (`sched_getcpu`). A list that runs empty takes [`PcpLists::batch`] frames from the
//! block allocator under one lock (`rmqueue_bulk`); one that grows past `high` gives
//! `batch` back the same way (`free_pcppages_bulk`). Frees go on top and allocations come
//! from the top, so the frame handed out next is the one freed last, still in cache.
//!
//! # Invariants
//!
//! - A frame on a list is free (refcount 0, no flags, no mapping) but allocated in the
//!   block allocator's bitmap: the region's free frames are the allocator's plus the
//!   lists'.
//! - A frame on a list keeps its block from becoming whole again, so when the block
//!   allocator cannot serve a request of either order, the region drains every list
//!   ([`PcpLists::drain_all`], the kernel's `drain_all_pages`) and tries once more before it
//!   reports out of memory.
//! - Lock order: a list's lock, then the block allocator's. A thread holds at most one
//!   list's lock.
//!
//! A thread moved to another CPU between choosing a list and locking it shares that list
//! for a moment: the lock keeps that correct, it only costs a contended lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::alloc::{AllocError, BlockAllocator};
use super::cpu;
use crate::sync::Mutex;

/// Frames a bulk allocation takes from the block allocator per hold of its lock: one
/// block's worth.
pub(crate) const BULK_CHUNK: usize = 512;

/// One CPU's list, alone on its cache lines (two, for the adjacent-line prefetcher).
#[repr(align(128))]
struct PcpList {
    frames: Mutex<Vec<u32>>,
    /// Folios this CPU handed out and took back (every order): counted here rather than
    /// in one shared counter, which every CPU would write.
    allocs: AtomicU64,
    frees: AtomicU64,
}

/// The per-CPU lists of one region.
pub(crate) struct PcpLists {
    lists: Box<[PcpList]>,
    batch: usize,
    high: usize,
}

impl PcpLists {
    /// Lists for a region of `frames` frames, one per CPU the host has. The batch is the
    /// kernel's `zone_batchsize` for a zone of that many pages (a 256 MiB region gets 15,
    /// 4 GiB and more 63); `high` is six batches (`pageset_set_batch`). With the `shuttle`
    /// feature there is one list, so that a model check's runs do not depend on the CPU.
    pub(crate) fn new(frames: usize, per_cpu: bool) -> PcpLists {
        let cpus = if cfg!(feature = "shuttle") || !per_cpu {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        PcpLists::with_cpus(frames, cpus)
    }

    /// Lists for `cpus` CPUs.
    fn with_cpus(frames: usize, cpus: usize) -> PcpLists {
        let batch = zone_batchsize(frames);
        PcpLists {
            lists: (0..cpus)
                .map(|_| PcpList {
                    frames: Mutex::new(Vec::with_capacity(6 * batch + 1)),
                    allocs: AtomicU64::new(0),
                    frees: AtomicU64::new(0),
                })
                .collect(),
            batch,
            high: 6 * batch,
        }
    }

    /// The list of the CPU this thread runs on.
    fn local(&self) -> &PcpList {
        if self.lists.len() == 1 {
            return &self.lists[0];
        }
        &self.lists[cpu::current() % self.lists.len()]
    }

    /// An order-0 frame from this CPU's list, refilled from `blocks` when empty.
    pub(crate) fn alloc(&self, blocks: &Mutex<BlockAllocator>) -> Result<usize, AllocError> {
        let list = self.local();
        let mut frames = list.frames.lock();
        if frames.is_empty() {
            let mut b = blocks.lock();
            for _ in 0..self.batch.max(1) {
                match b.alloc(0) {
                    Ok(i) => frames.push(i as u32),
                    Err(_) => break,
                }
            }
            // Pop order hands out the batch's lowest frame first, as the allocator would.
            frames.reverse();
        }
        let i = frames.pop().ok_or(AllocError { order: 0 })?;
        list.allocs.fetch_add(1, Relaxed);
        Ok(i as usize)
    }

    /// Up to `nr` order-0 frames at once, appended to `out` (the kernel's
    /// `alloc_pages_bulk`): this CPU's list is taken under its lock once, and what it
    /// lacks comes straight from `blocks`, [`BULK_CHUNK`] frames per hold of its lock (so
    /// a request as large as memory does not keep other CPUs off the allocator while it
    /// runs). Returns how many were appended: fewer than `nr` when the region runs out.
    pub(crate) fn alloc_bulk(
        &self,
        blocks: &Mutex<BlockAllocator>,
        nr: usize,
        out: &mut Vec<usize>,
    ) -> usize {
        let list = self.local();
        let mut got = {
            let mut frames = list.frames.lock();
            let from_list = nr.min(frames.len());
            let rest = frames.len() - from_list;
            // The top of the list (freed last, warmest) first.
            out.extend(frames.drain(rest..).rev().map(|i| i as usize));
            from_list
        };
        'refill: while got < nr {
            let want = (nr - got).min(BULK_CHUNK);
            out.reserve(want);
            let mut b = blocks.lock();
            for _ in 0..want {
                match b.alloc(0) {
                    Ok(i) => out.push(i),
                    Err(_) => break 'refill,
                }
                got += 1;
            }
        }
        list.allocs.fetch_add(got as u64, Relaxed);
        got
    }

    /// Puts the free order-0 frame `i` on this CPU's list, giving a batch back to
    /// `blocks` when the list is over `high`.
    pub(crate) fn free(&self, i: usize, blocks: &Mutex<BlockAllocator>) {
        let list = self.local();
        let mut frames = list.frames.lock();
        frames.push(i as u32);
        list.frees.fetch_add(1, Relaxed);
        if frames.len() > self.high {
            // The coldest frames, at the bottom, go back.
            let mut b = blocks.lock();
            for f in frames.drain(..self.batch.max(1)) {
                b.free(f as usize, 0);
            }
        }
    }

    /// Puts the free order-0 frames `batch` on this CPU's list at once, giving the
    /// coldest back to `blocks` while the list is over `high` (`free_unref_folios`).
    pub(crate) fn free_many(&self, batch: &[u32], blocks: &Mutex<BlockAllocator>) {
        if batch.is_empty() {
            return;
        }
        let list = self.local();
        let mut frames = list.frames.lock();
        frames.extend_from_slice(batch);
        list.frees.fetch_add(batch.len() as u64, Relaxed);
        if frames.len() > self.high {
            let excess = (frames.len() - self.high).max(self.batch.max(1));
            let excess = excess.min(frames.len());
            let mut b = blocks.lock();
            for f in frames.drain(..excess) {
                b.free(f as usize, 0);
            }
        }
    }

    /// Gives every list's frames back to `blocks`; returns how many there were.
    #[doc(alias = "drain_all_pages")]
    pub(crate) fn drain_all(&self, blocks: &Mutex<BlockAllocator>) -> usize {
        let mut drained = 0;
        for list in self.lists.iter() {
            let mut frames = list.frames.lock();
            if frames.is_empty() {
                continue;
            }
            let mut b = blocks.lock();
            drained += frames.len();
            for f in frames.drain(..) {
                b.free(f as usize, 0);
            }
        }
        drained
    }

    /// Frames on the lists now.
    pub(crate) fn count(&self) -> usize {
        self.lists.iter().map(|l| l.frames.lock().len()).sum()
    }

    /// Counts a folio handed out or taken back outside the lists (order 9, hugetlb).
    pub(crate) fn count_op(&self, alloc: bool) {
        let list = self.local();
        if alloc { &list.allocs } else { &list.frees }.fetch_add(1, Relaxed);
    }

    /// Folios handed out and taken back, over every CPU.
    pub(crate) fn ops(&self) -> (u64, u64) {
        self.lists.iter().fold((0, 0), |(a, f), l| {
            (a + l.allocs.load(Relaxed), f + l.frees.load(Relaxed))
        })
    }
}

/// The kernel's `zone_batchsize`: a 1024th of the zone, at most 1 MiB, a quarter of that
/// (at least 1), then one less than a power of two (which the kernel picks to spread
/// batches over cache colours). A zone under 32 MiB gets 0: its lists hold nothing, and
/// every frame goes to and from the block allocator one at a time.
fn zone_batchsize(frames: usize) -> usize {
    let batch = ((frames / 1024).min(256) / 4).max(1);
    (1usize << (batch + batch / 2).ilog2()) - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::alloc::BLOCK_FRAMES;

    #[test]
    fn batch_sizes_follow_the_kernel() {
        assert_eq!(zone_batchsize(512), 0);
        assert_eq!(zone_batchsize(4096), 0);
        assert_eq!(zone_batchsize(8192), 1);
        assert_eq!(zone_batchsize(16384), 3);
        assert_eq!(zone_batchsize(65536), 15);
        assert_eq!(zone_batchsize(1 << 20), 63);
        assert_eq!(zone_batchsize(1 << 30), 63);
    }

    #[test]
    fn frames_cycle_through_the_list_and_drain_back_whole() {
        let blocks = Mutex::new(BlockAllocator::new(2));
        let pcp = PcpLists::with_cpus(64 * 1024, 1);
        let batch = pcp.batch;
        let first = pcp.alloc(&blocks).expect("a frame");
        // A batch left the allocator; the rest of it waits on a list.
        assert_eq!(blocks.lock().free_frames(), 2 * BLOCK_FRAMES - batch);
        assert_eq!(pcp.count(), batch - 1);
        assert_eq!(first, 0, "lowest frame first");
        pcp.free(first, &blocks);
        assert_eq!(
            pcp.alloc(&blocks),
            Ok(first),
            "the frame freed last comes back"
        );
        pcp.free(first, &blocks);
        assert_eq!(pcp.drain_all(&blocks), batch);
        assert_eq!(pcp.count(), 0);
        assert_eq!(blocks.lock().free_frames(), 2 * BLOCK_FRAMES);
        // Whole again: both blocks can go out as order-9 folios.
        assert!(blocks.lock().alloc(9).is_ok() && blocks.lock().alloc(9).is_ok());
        assert_eq!(pcp.ops(), (2, 2));
    }

    #[test]
    fn a_list_over_high_gives_a_batch_back() {
        let blocks = Mutex::new(BlockAllocator::new(4));
        let pcp = PcpLists::with_cpus(64 * 1024, 1);
        let held: Vec<usize> = (0..pcp.high + 1)
            .map(|_| blocks.lock().alloc(0).expect("a frame"))
            .collect();
        let free_before = blocks.lock().free_frames();
        for &f in &held {
            pcp.free(f, &blocks);
        }
        assert_eq!(pcp.count(), pcp.high + 1 - pcp.batch);
        assert_eq!(blocks.lock().free_frames(), free_before + pcp.batch);
    }

    #[test]
    fn a_small_zones_lists_hold_nothing() {
        let blocks = Mutex::new(BlockAllocator::new(1));
        let pcp = PcpLists::with_cpus(512, 1);
        let f = pcp.alloc(&blocks).expect("a frame");
        assert_eq!(pcp.count(), 0);
        pcp.free(f, &blocks);
        assert_eq!(pcp.count(), 0);
        assert_eq!(blocks.lock().free_frames(), BLOCK_FRAMES);
    }

    #[test]
    fn an_empty_allocator_is_out_of_memory() {
        let blocks = Mutex::new(BlockAllocator::new(1));
        let pcp = PcpLists::with_cpus(512, 1);
        for _ in 0..BLOCK_FRAMES {
            pcp.alloc(&blocks).expect("a frame");
        }
        assert_eq!(pcp.alloc(&blocks), Err(AllocError { order: 0 }));
    }
}
