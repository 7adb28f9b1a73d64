//! Physical memory: frames holding real bytes, their metadata (`struct page`), the zero
//! pages, and the frame allocator.
//!
//! [`PhysMem`] is the system RAM of one simulated machine: an arena of 4 KiB frames lazily
//! committed by the host, a [`FrameMeta`] per frame, and an allocator for order-0 and order-9
//! (2 MiB) folios, with per-CPU lists of free order-0 frames in front of it (`pcp`). Frames are named by [`Pfn`]s and handled through [`FrameRef`] (borrowed,
//! no reference held) and [`Frame`] (owns one reference, dropped on `Drop`).
//!
//! Two frames are reserved at start: the *huge zero page* (the order-9 folio at pfn 0) and
//! the *zero page* (pfn 512). Read faults on empty anonymous memory map them; they are never
//! written and never freed.
//!
//! # One frame-number space
//!
//! Device memory ([`crate::zone_device`]) lives in the same machine: each device pagemap is
//! a region of its own, placed in a *section* of the frame-number space that system RAM
//! does not use (the kernel's `request_free_mem_region`). RAM takes the sections from 0
//! that its size needs (one up to 256 GiB, up to 16 for [`MAX_RAM_BYTES`]); the sections
//! after it, up to [`NR_SECTIONS`]` - 1`, are given to pagemaps in order and never reused, so a frame number found in a stale entry can never name a
//! frame of a newer pagemap. A device-coherent frame has a [`Pfn`] (CPU-addressable,
//! mapped by present entries); a device-private frame has a [`DevicePfn`] of the same
//! space, which only device-private entries hold. Looking up a RAM frame is one compare;
//! a device frame adds one load of its section's slot.
//!
//! This module is the only place with `unsafe` code (in `arena` and `zeroed`, the lazily
//! committed memory of frames and their metadata, and `cpu`'s call of `sched_getcpu`);
//! every block carries its `// SAFETY:` argument.

mod alloc;
#[allow(unsafe_code)]
mod arena;
#[allow(unsafe_code)]
mod cpu;
mod frame;
mod hugetlb;
mod io;
mod mapping;
mod meta;
mod pcp;
mod region;
mod swap;
mod watermark;
#[allow(unsafe_code)]
mod zeroed;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use thiserror::Error;

pub use alloc::AllocError;
pub use frame::{copy_folios, put_folios, Frame, FrameRef, Freed, LockedFolio};
pub use hugetlb::{HugetlbSize, HugetlbStats};
pub use mapping::{MappingHandle, MappingId};
pub use meta::{FrameFlags, FrameMeta, GetFrameError};
pub use swap::{SwapDevice, SwapSlot, SwapStats};
pub use watermark::Watermarks;

use crate::addr::{DevicePfn, Pfn, PMD_ORDER, PMD_SIZE};
use crate::fault_inject::FaultAttr;
use crate::zone_device::DevPagemap;
use alloc::BLOCK_FRAMES;
pub(crate) use region::{FreeHook, Region};

/// Frames per section of the frame-number space: 2^26 frames, 256 GiB. Each device pagemap
/// is at most one section; system RAM takes as many as it needs from section 0.
pub const SECTION_SHIFT: u32 = 26;
/// The largest device pagemap: one section, 256 GiB.
pub const MAX_SECTION_BYTES: u64 = (1 << SECTION_SHIFT) << crate::addr::PAGE_SHIFT;
/// The largest system RAM: 16 sections, 4 TiB (its frames and their metadata are
/// committed on the host as they are used, so only the working set costs host memory).
pub const MAX_RAM_BYTES: u64 = 16 * MAX_SECTION_BYTES;
/// Sections of the frame-number space: RAM's first, then one per pagemap.
pub const NR_SECTIONS: usize = 1024;

/// Which memory a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Zone {
    /// Ordinary system RAM.
    System,
    /// Device-private memory of the pagemap with this id: not CPU addressable.
    DevicePrivate {
        /// The pagemap's id.
        pagemap: u32,
    },
    /// Device-coherent memory of the pagemap with this id: CPU addressable.
    DeviceCoherent {
        /// The pagemap's id.
        pagemap: u32,
    },
}

/// Configuration of system RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysConfig {
    /// Bytes of RAM: a multiple of 2 MiB, at least 4 MiB (the first 2 MiB block holds the
    /// huge zero page, the second the zero page), at most [`MAX_RAM_BYTES`]. The host
    /// commits memory for the frames (and their metadata) a run touches, not for the size.
    pub size_bytes: u64,
    /// Commit the whole arena on the host at creation, so that no host page fault is
    /// measured later.
    pub prefault: bool,
    /// Per-CPU lists of free frames in front of each region's allocator, one per host CPU
    /// (the kernel's `per_cpu_pages`: two threads allocating do not meet on one lock).
    /// `false` keeps one list: which frame an allocation gets then depends on the order of
    /// allocations only, not on which host CPU the thread ran on, as a deterministic
    /// simulation needs.
    pub per_cpu_lists: bool,
}

impl PhysConfig {
    /// `size_bytes` of RAM, committed lazily.
    pub const fn with_size(size_bytes: u64) -> Self {
        PhysConfig {
            size_bytes,
            prefault: false,
            per_cpu_lists: true,
        }
    }
}

impl Default for PhysConfig {
    /// 256 MiB, committed lazily.
    fn default() -> Self {
        Self::with_size(256 << 20)
    }
}

/// Errors creating physical memory.
#[derive(Debug, Error)]
pub enum PhysError {
    /// The size is not a multiple of 2 MiB, is below 4 MiB, or is above
    /// [`MAX_RAM_BYTES`].
    #[error(
        "RAM size {size_bytes:#x} must be a multiple of 2 MiB, at least 4 MiB and at most \
         {} GiB",
        MAX_RAM_BYTES >> 30
    )]
    Inval {
        /// The rejected size.
        size_bytes: u64,
    },
    /// The host refused the arena mapping or the frames' metadata.
    #[error("allocating the frame arena or its metadata failed: {0}")]
    Map(#[from] std::io::Error),
}

/// Why `swapon` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SwapError {
    /// A size that is zero or not whole pages (`-EINVAL`).
    #[error("a swap device is a non-zero number of whole pages")]
    Inval,
    /// The machine has a swap device already (`-EBUSY`).
    #[error("the machine has a swap device already")]
    Busy,
}

/// Counters of the frame allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct PhysStats {
    /// Frames in RAM (including the reserved zero pages).
    pub nr_frames: u64,
    /// Frames currently free.
    pub nr_free: u64,
    /// Folio allocations since start.
    pub nr_alloc_ops: u64,
    /// Folio frees since start.
    pub nr_free_ops: u64,
}

impl PhysStats {
    /// What happened between `earlier` and `self`: the operations in between, and the
    /// frame counts as in `self` (as [`MmStats::since`](crate::stats::MmStats::since)).
    pub fn since(&self, earlier: &PhysStats) -> PhysStats {
        PhysStats {
            nr_alloc_ops: self.nr_alloc_ops.saturating_sub(earlier.nr_alloc_ops),
            nr_free_ops: self.nr_free_ops.saturating_sub(earlier.nr_free_ops),
            ..*self
        }
    }
}

/// The machine's memory: system RAM (frames with real bytes, metadata and an allocator)
/// and the device pagemaps registered on it.
#[derive(Debug)]
pub struct PhysMem {
    region: Region,
    /// Whether regions (RAM and pagemaps) keep a free list per host CPU.
    per_cpu_lists: bool,
    fail_page_alloc: FaultAttr,
    sections: Box<[OnceLock<Arc<DevPagemap>>]>,
    next_section: AtomicUsize,
    /// The swap device, once `swapon` gave one.
    swap: OnceLock<SwapDevice>,
    /// When kswapd reclaims, and how it is woken.
    watermarks: Watermarks,
    /// Where the reclaim clock stands (`mm::vmscan`).
    reclaim_hand: std::sync::atomic::AtomicU64,
}

/// The pfn of the zero page.
const ZERO_PFN: Pfn = Pfn::new(BLOCK_FRAMES as u64);
/// The pfn of the huge zero page's head.
const HUGE_ZERO_PFN: Pfn = Pfn::new(0);

impl PhysMem {
    /// Creates system RAM.
    pub fn new(config: PhysConfig) -> Result<Arc<PhysMem>, PhysError> {
        if config.size_bytes % PMD_SIZE != 0
            || config.size_bytes < 2 * PMD_SIZE
            || config.size_bytes > MAX_RAM_BYTES
        {
            return Err(PhysError::Inval {
                size_bytes: config.size_bytes,
            });
        }
        let blocks =
            usize::try_from(config.size_bytes / PMD_SIZE).map_err(|_| PhysError::Inval {
                size_bytes: config.size_bytes,
            })?;
        let region = Region::new(blocks, 0, Zone::System, None, config.per_cpu_lists)?;
        let ram_sections = (config.size_bytes.div_ceil(MAX_SECTION_BYTES)) as usize;
        region.reserve(HUGE_ZERO_PFN.as_usize(), PMD_ORDER);
        region.reserve(ZERO_PFN.as_usize(), 0);
        if config.prefault {
            region.prefault();
        }
        Ok(Arc::new(PhysMem {
            region,
            per_cpu_lists: config.per_cpu_lists,
            fail_page_alloc: FaultAttr::new(),
            sections: (0..NR_SECTIONS).map(|_| OnceLock::new()).collect(),
            next_section: AtomicUsize::new(ram_sections),
            swap: OnceLock::new(),
            watermarks: Watermarks::default(),
            reclaim_hand: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Adds a swap device of `bytes` (whole pages) (`swapon`): from now on reclaim can
    /// write anonymous pages out.
    ///
    /// Errors: `Inval` for a size that is zero or not whole pages; `Busy` if the machine
    /// has a swap device already (the model has one).
    pub fn swapon(&self, bytes: u64) -> Result<(), SwapError> {
        if bytes == 0 || bytes % crate::addr::PAGE_SIZE != 0 {
            return Err(SwapError::Inval);
        }
        self.swap
            .set(SwapDevice::new(bytes))
            .map_err(|_| SwapError::Busy)
    }

    /// The swap device, if there is one.
    pub fn swap(&self) -> Option<&SwapDevice> {
        self.swap.get()
    }

    /// The watermarks kswapd keeps free frames between.
    pub fn watermarks(&self) -> &Watermarks {
        &self.watermarks
    }

    /// Free frames of RAM (the hugetlb pool's excluded).
    pub fn nr_free(&self) -> u64 {
        self.region.nr_free() as u64
    }

    /// The reclaim clock's hand: the next frame number reclaim looks at.
    pub(crate) fn reclaim_hand(&self) -> &std::sync::atomic::AtomicU64 {
        &self.reclaim_hand
    }

    /// Whether regions keep a free list per host CPU ([`PhysConfig::per_cpu_lists`]).
    pub(crate) fn per_cpu_lists(&self) -> bool {
        self.per_cpu_lists
    }

    /// Takes the next free section for a pagemap; `None` when all are used.
    pub(crate) fn take_section(&self) -> Option<usize> {
        self.next_section
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s < NR_SECTIONS).then_some(s + 1)
            })
            .ok()
    }

    /// Installs `pagemap` in the section it was given.
    pub(crate) fn install_pagemap(&self, section: usize, pagemap: Arc<DevPagemap>) {
        assert!(
            self.sections[section].set(pagemap).is_ok(),
            "section {section} installed twice"
        );
    }

    /// The pagemap whose frames include number `nr`, if one was ever installed there (it
    /// may since have been removed).
    pub fn pagemap_of(&self, nr: u64) -> Option<&Arc<DevPagemap>> {
        let section = usize::try_from(nr >> SECTION_SHIFT).ok()?;
        let pgmap = self.sections.get(section)?.get()?;
        pgmap.contains_nr(nr).then_some(pgmap)
    }

    /// The pagemap with id `id` (its section), if one was ever installed there.
    pub fn pagemap(&self, id: u32) -> Option<&Arc<DevPagemap>> {
        self.sections.get(id as usize)?.get()
    }

    /// Every pagemap installed so far, in section order (removed ones included).
    pub fn pagemaps(&self) -> impl Iterator<Item = &Arc<DevPagemap>> {
        self.sections.iter().filter_map(|s| s.get())
    }

    /// A borrowed view of frame number `nr`, whatever its zone: what a device that stored
    /// the number of an [`HmmPfn`](crate::range_fault::HmmPfn) uses to reach the page.
    ///
    /// # Panics
    ///
    /// Panics if no region of this machine has frame `nr`.
    #[track_caller]
    pub fn frame_nr(&self, nr: u64) -> FrameRef<'_> {
        if nr < self.region.nr_frames() as u64 {
            return FrameRef::new(&self.region, nr);
        }
        let pgmap = self
            .pagemap_of(nr)
            .unwrap_or_else(|| panic!("frame {nr:#x} is in no region of this machine"));
        FrameRef::new(pgmap.region(), nr)
    }

    /// The shared zero page.
    #[doc(alias = "ZERO_PAGE")]
    pub fn zero_pfn(&self) -> Pfn {
        ZERO_PFN
    }

    /// The head of the shared huge zero page (an order-9 folio).
    #[doc(alias = "huge_zero_folio")]
    pub fn huge_zero_pfn(&self) -> Pfn {
        HUGE_ZERO_PFN
    }

    /// Whether `pfn` is the zero page.
    pub fn is_zero_pfn(&self, pfn: Pfn) -> bool {
        pfn == ZERO_PFN
    }

    /// Whether `pfn` belongs to the huge zero page.
    pub fn is_huge_zero_pfn(&self, pfn: Pfn) -> bool {
        pfn.as_u64() < BLOCK_FRAMES as u64
    }

    /// Number of frames.
    pub fn nr_frames(&self) -> u64 {
        self.region.nr_frames() as u64
    }

    /// Whether `pfn` names a CPU-addressable frame: system RAM, or device-coherent memory
    /// of a pagemap that is still registered.
    pub fn contains(&self, pfn: Pfn) -> bool {
        pfn.as_usize() < self.region.nr_frames()
            || self
                .pagemap_of(pfn.as_u64())
                .is_some_and(|p| p.is_live() && !p.is_private())
    }

    /// Whether `pfn` names a frame of system RAM.
    pub fn is_ram(&self, pfn: Pfn) -> bool {
        pfn.as_usize() < self.region.nr_frames()
    }

    /// Whether `pfn` names a device-private frame of a registered pagemap.
    pub fn contains_device(&self, pfn: DevicePfn) -> bool {
        self.pagemap_of(pfn.as_u64())
            .is_some_and(|p| p.is_live() && p.is_private())
    }

    /// Allocator counters.
    pub fn stats(&self) -> PhysStats {
        let (a, f) = self.region.alloc_free_ops();
        PhysStats {
            nr_frames: self.nr_frames(),
            nr_free: self.region.nr_free() as u64,
            nr_alloc_ops: a,
            nr_free_ops: f,
        }
    }

    /// Host memory committed for the frames' bytes and metadata of RAM and of every
    /// pagemap installed on it (by `mincore`): what the simulated machine costs the host,
    /// which follows the frames a run touched, not the machine's size.
    pub fn host_resident_bytes(&self) -> u64 {
        self.region.host_resident_bytes()
            + self
                .pagemaps()
                .map(|p| p.region().host_resident_bytes())
                .sum::<u64>()
    }

    /// Number of frames in use: neither free, nor reserved (the zero pages), nor free in
    /// the hugetlb pool.
    pub fn nr_in_use(&self) -> u64 {
        let pool_free: u64 = HugetlbSize::ALL
            .iter()
            .map(|&s| self.region.hugetlb_stats(s).free * s.nr_pages())
            .sum();
        self.nr_frames() - self.region.nr_free() as u64 - (BLOCK_FRAMES as u64 + 1) - pool_free
    }

    /// Sets the size of the hugetlb pool of 2 MiB pages (`nr_hugepages`, the default
    /// size); returns the size reached, which is smaller when RAM has no more whole free
    /// 2 MiB blocks or when pages in use or reserved keep it from shrinking.
    #[doc(alias = "nr_hugepages")]
    pub fn set_nr_hugepages(&self, n: u64) -> u64 {
        self.set_nr_hugepages_of(HugetlbSize::Size2M, n)
    }

    /// Sets the size of the hugetlb pool of `size`
    /// (`/sys/kernel/mm/hugepages/hugepages-<size>kB/nr_hugepages`); returns the size
    /// reached. A 1 GiB page needs 512 free 2 MiB blocks aligned to 1 GiB, as the kernel's
    /// runtime allocation of gigantic pages needs a free contiguous range.
    pub fn set_nr_hugepages_of(&self, size: HugetlbSize, n: u64) -> u64 {
        self.region.hugetlb_resize(size, n)
    }

    /// The counts of the pool of 2 MiB pages.
    pub fn hugetlb(&self) -> HugetlbStats {
        self.hugetlb_of(HugetlbSize::Size2M)
    }

    /// The counts of the pool of `size`.
    pub fn hugetlb_of(&self, size: HugetlbSize) -> HugetlbStats {
        self.region.hugetlb_stats(size)
    }

    /// Reserves `n` pages of the pool of `size` for a mapping; false if the pool cannot
    /// promise them.
    pub(crate) fn hugetlb_reserve(&self, size: HugetlbSize, n: u64) -> bool {
        self.region.hugetlb_reserve(size, n)
    }

    /// Gives back `n` reservations of the pool of `size`.
    pub(crate) fn hugetlb_unreserve(&self, size: HugetlbSize, n: u64) {
        self.region.hugetlb_unreserve(size, n);
    }

    /// Takes a zero-filled page of the pool of `size` with `flags`, against a reservation
    /// or from the unreserved free pages.
    pub(crate) fn hugetlb_alloc(
        &self,
        size: HugetlbSize,
        reserved: bool,
        flags: FrameFlags,
    ) -> Option<Frame<'_>> {
        let head = self.region.hugetlb_alloc(size, reserved, flags)?;
        for i in 0..size.nr_pages() as usize {
            // A frame never written reads as zeros without the host committing it: only
            // written ones are cleared, so a 1 GiB page costs host memory as it is used.
            let words = self.region.words(head + i);
            if !io::is_zero(words) {
                io::zero(words);
            }
        }
        Some(Frame::adopt(&self.region, head as u64))
    }

    /// Allocates a folio of `2^order` frames (`order` 0 to 9: a page, a multi-size THP of
    /// 8 KiB to 1 MiB, or a PMD-sized THP), aligned to its size, holding one reference,
    /// with `flags` set. Its contents are whatever its previous user left: use
    /// [`alloc_zeroed`](Self::alloc_zeroed) or overwrite it. A larger order is
    /// `AllocError`.
    #[doc(alias = "folio_alloc")]
    pub fn alloc(&self, order: u32, flags: FrameFlags) -> Result<Frame<'_>, AllocError> {
        // Gigantic (order-18) folios are the hugetlb pool's only.
        if order > PMD_ORDER || self.fail_page_alloc.should_fail() {
            return Err(AllocError { order });
        }
        let first = self.region.alloc(order, flags)?;
        if self.watermarks.armed() {
            self.watermarks.check(self.region.nr_free() as u64);
        }
        Ok(Frame::adopt(&self.region, first as u64))
    }

    /// Allocates up to `nr` order-0 folios at once, each holding one reference, with
    /// `flags` set (the kernel's `alloc_pages_bulk`): a migration's destinations taken
    /// from this CPU's free list under one lock, with what the list lacks taken from the
    /// block allocator a few blocks at a time, instead of one allocation per page.
    /// Returns fewer than `nr` when memory runs out, or where
    /// [`fail_page_alloc`](Self::fail_page_alloc) fails a page: it is consulted once for
    /// each page obtained, in order, until it fails (the pages from the failed one on are
    /// given back), so a fail-nth sweep meets the same failure points as one
    /// [`alloc`](Self::alloc) per page while memory lasts. The vector holds only what was
    /// allocated: its size is bounded by the machine's free memory, whatever `nr` is.
    #[doc(alias = "alloc_pages_bulk")]
    pub fn alloc_bulk(&self, nr: usize, flags: FrameFlags) -> Vec<Frame<'_>> {
        let mut got = Vec::new();
        self.region.alloc_bulk(nr, flags, &mut got);
        let kept = got
            .iter()
            .position(|_| self.fail_page_alloc.should_fail())
            .unwrap_or(got.len());
        let mut frames: Vec<Frame<'_>> = got
            .into_iter()
            .map(|i| Frame::adopt(&self.region, i as u64))
            .collect();
        // Dropping the handles frees the pages past the injected failure.
        frames.truncate(kept);
        if self.watermarks.armed() {
            self.watermarks.check(self.region.nr_free() as u64);
        }
        frames
    }

    /// The fault injection in front of [`alloc`](Self::alloc) and
    /// [`alloc_zeroed`](Self::alloc_zeroed) (the kernel's `fail_page_alloc`): every folio
    /// of system RAM comes through here, for faults, copies on write, THP, migration
    /// destinations and driver pages alike. The hugetlb pool's pages are reserved ahead and
    /// do not (as in the kernel, where they come from the pool, not the page allocator).
    pub fn fail_page_alloc(&self) -> &FaultAttr {
        &self.fail_page_alloc
    }

    /// Allocates a zero-filled folio (see [`alloc`](Self::alloc)).
    pub fn alloc_zeroed(&self, order: u32, flags: FrameFlags) -> Result<Frame<'_>, AllocError> {
        let f = self.alloc(order, flags)?;
        for i in 0..1u64 << order {
            io::zero(self.region.words(f.pfn().as_usize() + i as usize));
        }
        Ok(f)
    }

    /// A borrowed view of the CPU-addressable frame `pfn` (RAM or device-coherent).
    ///
    /// # Panics
    ///
    /// Panics if `pfn` is not such a frame of this machine (see
    /// [`contains`](Self::contains)).
    #[track_caller]
    pub fn frame(&self, pfn: Pfn) -> FrameRef<'_> {
        if pfn.as_usize() < self.region.nr_frames() {
            return FrameRef::new(&self.region, pfn.as_u64());
        }
        match self.pagemap_of(pfn.as_u64()) {
            Some(p) if !p.is_private() => FrameRef::new(p.region(), pfn.as_u64()),
            _ => panic!("{pfn:?} is not a CPU-addressable frame of this machine"),
        }
    }

    /// A borrowed view of the device-private frame `pfn`.
    ///
    /// # Panics
    ///
    /// Panics if `pfn` is not a device-private frame of a pagemap of this machine.
    #[track_caller]
    pub fn device_frame(&self, pfn: DevicePfn) -> FrameRef<'_> {
        match self.pagemap_of(pfn.as_u64()) {
            Some(p) if p.is_private() => FrameRef::new(p.region(), pfn.as_u64()),
            _ => panic!("{pfn:?} is not a device-private frame of this machine"),
        }
    }
}

#[cfg(test)]
mod tests;
