//! A memory region: an arena of frames, their metadata and their allocator.
//!
//! System RAM is one region ([`PhysMem`](super::PhysMem)); each device pagemap
//! ([`DevPagemap`](crate::zone_device::DevPagemap)) is another, so the allocation, refcount
//! and free logic is written once. A region covers the frame numbers `base..base + frames`
//! of the machine's one physical frame-number space, and every frame in it is of one
//! [`Zone`].

use crate::sync::Mutex;

use super::alloc::{AllocError, BlockAllocator, BLOCK_FRAMES};
use super::arena::Arena;
use super::hugetlb::{HugetlbPool, HugetlbSize, HugetlbStats};
use super::io::FrameWords;
use super::meta::{FrameFlags, FrameMeta};
use super::pcp::PcpLists;
use super::FrameRef;
use super::Zone;
use crate::addr::{PMD_ORDER, PUD_ORDER};

/// Called with the head and the order of a folio whose last reference went, after it is
/// back in the allocator (the kernel's `dev_pagemap_ops.folio_free`).
pub(crate) type FreeHook = Box<dyn Fn(FrameRef<'_>, u32) + Send + Sync>;

/// The frames' metadata: zero bytes until a frame is first used, committed by the host
/// page as the frames are (`zeroed`).
#[cfg(not(feature = "shuttle"))]
type MetaArray = super::zeroed::ZeroedArray<FrameMeta>;
/// Under the model checker the metadata's atomics are its own types: an ordinary array.
#[cfg(feature = "shuttle")]
type MetaArray = Box<[FrameMeta]>;

/// Metadata for `frames` frames; an error (not an abort) if the host refuses it.
fn new_meta(frames: usize) -> std::io::Result<MetaArray> {
    #[cfg(not(feature = "shuttle"))]
    {
        super::zeroed::ZeroedArray::new(frames)
    }
    #[cfg(feature = "shuttle")]
    {
        let mut meta = Vec::new();
        meta.try_reserve_exact(frames)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        meta.extend((0..frames).map(|_| FrameMeta::default()));
        Ok(meta.into_boxed_slice())
    }
}

/// Frames, metadata and allocator of one region. Indices are region-relative frame numbers.
pub(crate) struct Region {
    base: u64,
    zone: Zone,
    on_free: Option<FreeHook>,
    arena: Arena,
    meta: MetaArray,
    alloc: Mutex<BlockAllocator>,
    /// Free order-0 frames per CPU, in front of `alloc`.
    pcp: PcpLists,
    /// One pool per [`HugetlbSize`], by its index.
    hugetlb: [Mutex<HugetlbPool>; 2],
}

impl Region {
    /// A region of `blocks` 2 MiB blocks of `zone`, starting at frame number `base`.
    pub(crate) fn new(
        blocks: usize,
        base: u64,
        zone: Zone,
        on_free: Option<FreeHook>,
        per_cpu_lists: bool,
    ) -> std::io::Result<Region> {
        let frames = blocks * BLOCK_FRAMES;
        Ok(Region {
            base,
            zone,
            on_free,
            arena: Arena::new(frames)?,
            meta: new_meta(frames)?,
            alloc: Mutex::new(BlockAllocator::new(blocks)),
            pcp: PcpLists::new(frames, per_cpu_lists),
            hugetlb: Default::default(),
        })
    }

    /// The frame number of index 0.
    #[inline]
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// The zone of every frame.
    #[inline]
    pub(crate) fn zone(&self) -> Zone {
        self.zone
    }

    /// Number of frames.
    pub(crate) fn nr_frames(&self) -> usize {
        self.meta.len()
    }

    /// Number of free frames: the block allocator's and those on the per-CPU lists.
    pub(crate) fn nr_free(&self) -> usize {
        self.pcp.count() + self.alloc.lock().free_frames()
    }

    /// Folios handed out and folios returned since creation.
    pub(crate) fn alloc_free_ops(&self) -> (u64, u64) {
        self.pcp.ops()
    }

    /// Metadata of frame `i`.
    #[inline]
    #[track_caller]
    pub(crate) fn meta(&self, i: usize) -> &FrameMeta {
        &self.meta[i]
    }

    /// Contents of frame `i`.
    #[inline]
    #[track_caller]
    pub(crate) fn words(&self, i: usize) -> &FrameWords {
        self.arena.frame(i)
    }

    /// Host memory committed for the frames' bytes and their metadata.
    pub(crate) fn host_resident_bytes(&self) -> u64 {
        #[cfg(not(feature = "shuttle"))]
        let meta = self.meta.resident_bytes();
        #[cfg(feature = "shuttle")]
        let meta = std::mem::size_of_val(&*self.meta) as u64;
        self.arena.resident_bytes() + meta
    }

    /// Commits the whole arena on the host now.
    pub(crate) fn prefault(&self) {
        self.arena.prefault();
    }

    /// Permanently reserves `2^order` frames at `first` (zero pages), refcount 1, flags
    /// `RESERVED | UPTODATE`.
    pub(crate) fn reserve(&self, first: usize, order: u32) {
        let mut a = self.alloc.lock();
        for i in first..first + (1 << order) {
            a.reserve(i);
        }
        self.init_folio(first, order, FrameFlags::RESERVED | FrameFlags::UPTODATE);
    }

    /// Allocates a folio of `2^order` frames with refcount 1 and `flags`; contents are
    /// whatever the previous user left.
    pub(crate) fn alloc(&self, order: u32, flags: FrameFlags) -> Result<usize, AllocError> {
        let first = self.take(order)?;
        if order > 0 {
            self.pcp.count_op(true);
        }
        self.init_folio(first, order, flags);
        Ok(first)
    }

    /// Up to `nr` order-0 folios with refcount 1 and `flags`, their indices appended to
    /// `out` (`alloc_pages_bulk`); like [`take`](Self::take), drains the per-CPU lists and
    /// tries once more when short. Returns how many: fewer than `nr` only when the region
    /// has no more free frames.
    pub(crate) fn alloc_bulk(&self, nr: usize, flags: FrameFlags, out: &mut Vec<usize>) -> usize {
        let start = out.len();
        let mut got = self.pcp.alloc_bulk(&self.alloc, nr, out);
        if got < nr && self.pcp.drain_all(&self.alloc) > 0 {
            got += self.pcp.alloc_bulk(&self.alloc, nr - got, out);
        }
        for &i in &out[start..] {
            self.init_folio(i, 0, flags);
        }
        got
    }

    /// Takes `2^order` free frames: order 0 from this CPU's list, order 9 from the block
    /// allocator. When that fails, the per-CPU lists may be holding the frames (or
    /// keeping blocks split): they are drained and the request tried once more.
    fn take(&self, order: u32) -> Result<usize, AllocError> {
        let try_once = || match order {
            0 => self.pcp.alloc(&self.alloc),
            // Order 1 to 8 from the bitmaps, 9 a block, 18 a run of blocks.
            _ => self.alloc.lock().alloc(order),
        };
        try_once().or_else(|e| {
            if self.pcp.drain_all(&self.alloc) == 0 {
                return Err(e);
            }
            try_once()
        })
    }

    fn init_folio(&self, first: usize, order: u32, flags: FrameFlags) {
        if order == 0 {
            self.meta[first].init(flags, 0);
            return;
        }
        debug_assert!(order <= PMD_ORDER || order == PUD_ORDER);
        for m in &self.meta[first + 1..first + (1 << order)] {
            m.init_tail(order);
        }
        self.meta[first].init(flags | FrameFlags::HEAD, order);
    }

    /// The head frame of the folio containing frame `i`: folios are aligned to their
    /// size, so a tail's head is its index aligned down to its folio's order.
    #[inline]
    pub(crate) fn head_of(&self, i: usize) -> usize {
        let m = &self.meta[i];
        if m.flags().contains(FrameFlags::TAIL) {
            i & !((1 << m.folio_order()) - 1)
        } else {
            i
        }
    }

    /// Drops one reference on the folio containing frame `i`, freeing it on the last one;
    /// returns whether it did.
    #[track_caller]
    pub(crate) fn put(&self, i: usize) -> bool {
        let head = self.head_of(i);
        if !self.meta[head].put_testzero() {
            return false;
        }
        let deferred = self.release(head, false);
        debug_assert!(deferred.is_none(), "nothing is deferred");
        true
    }

    /// Drops one reference on the folio of each frame of `frames`, freeing those whose
    /// last reference went; the small folios freed go back to this CPU's list in one
    /// batch, under one lock (`free_unref_folios`). Returns how many folios were freed.
    #[track_caller]
    pub(crate) fn put_many(&self, frames: impl IntoIterator<Item = usize>) -> u64 {
        let mut batch: Vec<u32> = Vec::new();
        let mut freed = 0;
        for i in frames {
            let head = self.head_of(i);
            if self.meta[head].put_testzero() {
                freed += 1;
                batch.extend(self.release(head, true).map(|f| f as u32));
            }
        }
        self.pcp.free_many(&batch, &self.alloc);
        if let Some(hook) = &self.on_free {
            for &f in &batch {
                hook(FrameRef::new(self, self.base + u64::from(f)), 0);
            }
        }
        freed
    }

    /// Returns the folio at `head`, whose last reference just went, to its allocator; with
    /// `defer_small`, an order-0 folio is made ready and returned instead, for the caller
    /// to free in a batch (and to call the free hook on).
    #[track_caller]
    fn release(&self, head: usize, defer_small: bool) -> Option<usize> {
        let m = &self.meta[head];
        let flags = m.flags();
        assert!(
            !flags.contains(FrameFlags::RESERVED),
            "last reference dropped on a reserved frame"
        );
        assert!(
            !flags.contains(FrameFlags::LOCKED),
            "frame {head} freed while locked"
        );
        let order = m.order();
        debug_assert_eq!(m.mapcount(), 0, "frame {head} freed while mapped");
        if flags.contains(FrameFlags::HUGETLB) {
            m.clear_mapping();
            m.clear_flags(FrameFlags::all() - FrameFlags::LOCKED - FrameFlags::WAITERS);
            m.set_flags(FrameFlags::HUGETLB | FrameFlags::HEAD);
            let size = HugetlbSize::of_order(order).expect("a hugetlb folio's order");
            self.hugetlb[size.index()].lock().free.push(head);
            return None;
        }
        if order > 0 {
            for t in &self.meta[head + 1..head + (1 << order)] {
                t.clear_flags(FrameFlags::TAIL);
            }
        }
        m.clear_flags(FrameFlags::all() - FrameFlags::LOCKED - FrameFlags::WAITERS);
        m.clear_mapping();
        if order == 0 && defer_small {
            return Some(head);
        }
        if order == 0 {
            self.pcp.free(head, &self.alloc);
        } else {
            self.alloc.lock().free(head, order);
            self.pcp.count_op(false);
        }
        if let Some(hook) = &self.on_free {
            hook(FrameRef::new(self, self.base + head as u64), order);
        }
        None
    }
}

impl Region {
    /// Splits the frozen (refcount 0), locked, unmapped large folio at `head` (order 1 to
    /// 9) into locked folios of `new_order` (below the folio's), keeping the head's page
    /// flags and mapping (`__split_huge_page`, `__split_folio_to_order`). Each new folio's
    /// head gets one reference, the first `head_refs` (the references the freeze found).
    /// The caller maps them back, then unlocks and drops the references.
    pub(crate) fn split_frozen(&self, head: usize, head_refs: u32, new_order: u32) {
        let hm = &self.meta[head];
        let order = hm.order();
        assert!(
            order > new_order,
            "split of an order-{order} folio to {new_order}"
        );
        assert_eq!(hm.refcount(), 0, "split of an unfrozen folio");
        assert!(hm.is_locked(), "split of an unlocked folio");
        // The folio's flags go to every new folio; anon-exclusivity is each page's own.
        let keep = hm.flags()
            - FrameFlags::LOCKED
            - FrameFlags::WAITERS
            - FrameFlags::HEAD
            - FrameFlags::TAIL
            - FrameFlags::ANON_EXCLUSIVE;
        if order == PMD_ORDER {
            // A whole block becomes 512 frames; a smaller folio's frames already are.
            self.alloc.lock().split_allocated(head);
        }
        if new_order == 0 {
            for (i, m) in self.meta[head + 1..head + (1 << order)].iter().enumerate() {
                let own = m.flags() & FrameFlags::ANON_EXCLUSIVE;
                m.become_split_page(hm, i as u64 + 1, keep | own);
            }
            hm.set_order(0);
            hm.clear_flags(FrameFlags::HEAD);
            hm.unfreeze(head_refs);
            return;
        }
        // Folios of a larger order (`__split_huge_page_tail`, then the unfreeze loop):
        // each new folio is set up frozen, its tails first (a lookup through one finds its
        // new head frozen, as the old one was), then its head, with its order before its
        // flags; only then is every new head given its reference.
        let step = 1usize << new_order;
        let repoint = |first: usize| {
            for t in &self.meta[head + first + 1..head + first + step] {
                let own = t.flags() & FrameFlags::ANON_EXCLUSIVE;
                t.init_tail(new_order);
                t.set_flags(own);
            }
        };
        for first in (step..1usize << order).step_by(step) {
            repoint(first);
            let m = &self.meta[head + first];
            let own = m.flags() & FrameFlags::ANON_EXCLUSIVE;
            m.become_frozen_split_head(hm, first as u64, keep | own | FrameFlags::HEAD, new_order);
        }
        repoint(0);
        hm.set_order(new_order);
        for first in (step..1usize << order).step_by(step) {
            self.meta[head + first].unfreeze(1);
        }
        hm.unfreeze(head_refs);
    }

    /// Grows or shrinks the hugetlb pool of `size` towards `target` pages; returns the new
    /// size. Growing stops when the allocator has no more free memory of the size (whole
    /// 2 MiB blocks, or runs of them aligned to 1 GiB); shrinking frees only free,
    /// unreserved pages.
    pub(crate) fn hugetlb_resize(&self, size: HugetlbSize, target: u64) -> u64 {
        let order = size.order();
        let nr = size.nr_pages() as usize;
        let mut pool = self.hugetlb[size.index()].lock();
        while pool.total < target {
            let Ok(head) = self.take(order) else {
                break;
            };
            self.init_folio(head, order, FrameFlags::HUGETLB);
            // Pool pages are not in use: refcount 0, as the allocator's free pages.
            assert!(self.meta[head].put_testzero());
            pool.free.push(head);
            pool.total += 1;
        }
        while pool.total > target && pool.free.len() as u64 > pool.reserved {
            let head = pool.free.pop().expect("free page");
            self.meta[head].clear_flags(FrameFlags::HUGETLB | FrameFlags::HEAD);
            for t in &self.meta[head + 1..head + nr] {
                t.clear_flags(FrameFlags::TAIL);
            }
            self.alloc.lock().free(head, order);
            pool.total -= 1;
        }
        pool.total
    }

    /// Reserves `n` free pages of the pool of `size`; false (and nothing reserved) if there
    /// are not enough.
    pub(crate) fn hugetlb_reserve(&self, size: HugetlbSize, n: u64) -> bool {
        let mut pool = self.hugetlb[size.index()].lock();
        if pool.free.len() as u64 - pool.reserved < n {
            return false;
        }
        pool.reserved += n;
        true
    }

    /// Gives back `n` reservations of the pool of `size`.
    pub(crate) fn hugetlb_unreserve(&self, size: HugetlbSize, n: u64) {
        let mut pool = self.hugetlb[size.index()].lock();
        assert!(pool.reserved >= n, "unreserving more than reserved");
        pool.reserved -= n;
    }

    /// Takes a page of the pool of `size` (refcount 1, `flags` set), against a reservation
    /// or from the unreserved free pages; `None` if there is none.
    pub(crate) fn hugetlb_alloc(
        &self,
        size: HugetlbSize,
        reserved: bool,
        flags: FrameFlags,
    ) -> Option<usize> {
        let mut pool = self.hugetlb[size.index()].lock();
        if reserved {
            assert!(
                pool.reserved > 0,
                "allocation against a missing reservation"
            );
            pool.reserved -= 1;
        } else if pool.free.len() as u64 <= pool.reserved {
            return None;
        }
        let head = pool.free.pop().expect("reserved pages are free");
        drop(pool);
        self.init_folio(head, size.order(), flags | FrameFlags::HUGETLB);
        self.pcp.count_op(true);
        Some(head)
    }

    /// The counts of the pool of `size`.
    pub(crate) fn hugetlb_stats(&self, size: HugetlbSize) -> HugetlbStats {
        self.hugetlb[size.index()].lock().stats()
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("zone", &self.zone)
            .field("frames", &self.nr_frames())
            .field("free", &self.nr_free())
            .finish()
    }
}
