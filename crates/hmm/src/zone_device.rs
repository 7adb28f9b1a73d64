//! Device memory (`ZONE_DEVICE`): pagemaps of device-private or device-coherent frames, each
//! with an owner cookie and the driver's ops.
//!
//! [`memremap_pages`] registers a [`DevPagemap`] on a machine ([`PhysMem`]): a region of its
//! own, in its own section of the frame-number space, whose frames hold real bytes in a
//! per-pagemap arena (committed lazily by the host) and carry the same metadata as RAM
//! (`struct page`: refcount, map count, folio lock, mapping). Frames come out of
//! [`DevPagemap::alloc`] locked and referenced, as the kernel's `zone_device_folio_init`
//! hands them out; when the last reference goes the folio returns to the pagemap's allocator
//! and the driver's [`DevPagemapOps::folio_free`] is told.
//!
//! * **Device-private** frames are not CPU-addressable. They have a [`DevicePfn`]; CPU page
//!   tables refer to them only through device-private entries, and a CPU access to such an
//!   entry faults into the owner's [`DevPagemapOps::migrate_to_ram`].
//! * **Device-coherent** frames are CPU-addressable: they have a [`Pfn`] and are mapped by
//!   ordinary present entries.
//!
//! The [`Owner`] is what `hmm_range_fault` (`dev_private_owner`) and `migrate_vma`
//! (`pgmap_owner`) compare against; a driver gives every pagemap of one device the same
//! owner and different devices different owners.
//!
//! # Lifetimes
//!
//! A pagemap stays installed in its section for the life of the machine (so a frame number
//! read from a stale entry never names a newer pagemap's frame); [`DevPagemap::memunmap`]
//! retires it once every frame is free. The ops must not hold a strong reference to the
//! [`PhysMem`] (the machine owns its pagemaps, and through them their ops).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use hmm::notifier::Owner;
//! use hmm::phys::{FrameFlags, PhysConfig, PhysMem};
//! use hmm::zone_device::{memremap_pages, DevPagemapOps, MemoryType, PagemapConfig};
//!
//! struct Ops; // a driver's callbacks; the defaults refuse CPU faults (SIGBUS)
//! impl DevPagemapOps for Ops {}
//!
//! let phys = PhysMem::new(PhysConfig::with_size(16 << 20))?;
//! let config = PagemapConfig {
//!     kind: MemoryType::DevicePrivate,
//!     owner: Owner::new_unique(),
//!     size_bytes: 2 << 20,
//! };
//! let dev = memremap_pages(&phys, config, Arc::new(Ops))?;
//! let page = dev.alloc(0, FrameFlags::empty())?; // locked and referenced
//! page.write(0, b"device bytes");
//! assert_eq!(dev.nr_in_use(), 1);
//! drop(page); // the last reference: back to the pagemap's allocator
//! assert_eq!(dev.nr_in_use(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::addr::{DevicePfn, Pfn, PAGE_SHIFT, PMD_SIZE};
use crate::mm::{DeviceFault, VmFault};
use crate::notifier::Owner;
use crate::phys::{
    AllocError, Frame, FrameFlags, FrameRef, FreeHook, LockedFolio, PhysMem, Region, Zone,
};
use crate::phys::{NR_SECTIONS, SECTION_SHIFT};

/// The kind of device memory (`enum memory_type`).
#[doc(alias = "memory_type")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum MemoryType {
    /// Not CPU-addressable; CPU accesses fault into `migrate_to_ram`.
    #[doc(alias = "MEMORY_DEVICE_PRIVATE")]
    DevicePrivate,
    /// CPU-addressable and cache-coherent; mapped by present entries.
    #[doc(alias = "MEMORY_DEVICE_COHERENT")]
    DeviceCoherent,
}

/// The driver's side of a pagemap (`struct dev_pagemap_ops`).
///
/// Callbacks run with no page-table lock held.
#[doc(alias = "dev_pagemap_ops")]
pub trait DevPagemapOps: Send + Sync {
    /// The last reference to the folio headed by `folio` (of `order`) went; it is back in
    /// the pagemap's allocator. Runs on whatever thread dropped the reference.
    #[doc(alias = "page_free")]
    fn folio_free(&self, folio: FrameRef<'_>, order: u32) {
        let _ = (folio, order);
    }

    /// A CPU touched a device-private page of this pagemap (`vmf.page()`, locked by the
    /// fault path and referenced): migrate it (or, for a device-private PMD, its whole 2 MiB
    /// unit) back to system memory. Returning `Ok` retries the access; an error is delivered
    /// to the faulting access. Only called for device-private pagemaps.
    fn migrate_to_ram(&self, vmf: &DeviceFault<'_>) -> Result<(), VmFault> {
        let _ = vmf;
        Err(VmFault::Sigbus)
    }

    /// The device folio headed by `head` is being split into pages; `tail` is each new
    /// page in turn, then `None` once for the head itself, so the driver can split its
    /// per-page data in step.
    fn folio_split(&self, head: FrameRef<'_>, tail: Option<FrameRef<'_>>) {
        let _ = (head, tail);
    }
}

/// What to register (the fields of `struct dev_pagemap` a driver fills in).
#[derive(Debug, Clone, Copy)]
pub struct PagemapConfig {
    /// Private or coherent.
    pub kind: MemoryType,
    /// The owner cookie, shared by every pagemap of one device.
    pub owner: Owner,
    /// Size in bytes: a non-zero multiple of 2 MiB, at most one section (256 GiB).
    pub size_bytes: u64,
}

/// Why [`memremap_pages`] or [`DevPagemap::memunmap`] failed.
#[derive(Debug, Error)]
pub enum PagemapError {
    /// The size is zero, not a multiple of 2 MiB, or larger than a section (`-EINVAL`).
    #[error(
        "invalid pagemap size {size_bytes:#x}: it must be a non-zero multiple of 2 MiB of at \
         most {} GiB (one section)",
        crate::phys::MAX_SECTION_BYTES >> 30
    )]
    Inval {
        /// The rejected size.
        size_bytes: u64,
    },
    /// Every section of the frame-number space has been given out (`-ENOSPC` from
    /// `request_free_mem_region`).
    #[error("no free section for another pagemap ({NR_SECTIONS} sections)")]
    NoSpace,
    /// Frames are still in use, so the pagemap cannot be retired (`-EBUSY`).
    #[error("{in_use} frames of the pagemap are still in use")]
    Busy {
        /// Frames not yet freed.
        in_use: u64,
    },
    /// The host refused the arena mapping or the frames' metadata.
    #[error("allocating the device arena or its metadata failed: {0}")]
    Map(#[from] std::io::Error),
}

/// A registered range of device memory (`struct dev_pagemap`).
pub struct DevPagemap {
    id: u32,
    kind: MemoryType,
    owner: Owner,
    ops: Arc<dyn DevPagemapOps>,
    region: Region,
    live: AtomicBool,
    /// Retired by a successful `memunmap` and not yet taken again.
    retired: AtomicBool,
}

/// Registers device memory on `phys` (`memremap_pages`), in the next free section.
///
/// A section whose pagemap was retired ([`DevPagemap::memunmap`]) comes back to the
/// driver that retired it: a request with the same kind, owner, size and ops takes that
/// pagemap again (its frames all free) instead of a new section, as
/// `request_free_mem_region` hands out the range `release_mem_region` gave back. A driver
/// that removes and re-creates its memory (dmirror's RELEASE) therefore never runs out of
/// sections.
///
/// A device-private pagemap's frames are numbered past RAM's in their own section, so this
/// is also what the mm tree's `memremap_device_private_pagemap` does (no physical range is
/// reserved first); see DESIGN.md, "The device memory index".
#[doc(alias = "devm_memremap_pages")]
#[doc(alias = "memremap_device_private_pagemap")]
pub fn memremap_pages(
    phys: &PhysMem,
    config: PagemapConfig,
    ops: Arc<dyn DevPagemapOps>,
) -> Result<Arc<DevPagemap>, PagemapError> {
    let size = config.size_bytes;
    if size == 0 || size % PMD_SIZE != 0 || size >> PAGE_SHIFT > 1 << SECTION_SHIFT {
        return Err(PagemapError::Inval { size_bytes: size });
    }
    let reusable = |p: &&Arc<DevPagemap>| {
        p.kind == config.kind
            && p.owner == config.owner
            && p.nr_frames() == size >> PAGE_SHIFT
            && Arc::ptr_eq(&p.ops, &ops)
    };
    for p in phys.pagemaps().filter(reusable) {
        if p.retired
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            debug_assert_eq!(p.nr_in_use(), 0, "a retired pagemap has no frame in use");
            p.live.store(true, Ordering::Release);
            return Ok(Arc::clone(p));
        }
    }
    let section = phys.take_section().ok_or(PagemapError::NoSpace)?;
    let id = u32::try_from(section).expect("sections fit u32");
    let zone = match config.kind {
        MemoryType::DevicePrivate => Zone::DevicePrivate { pagemap: id },
        MemoryType::DeviceCoherent => Zone::DeviceCoherent { pagemap: id },
    };
    let hook_ops = Arc::clone(&ops);
    let hook: FreeHook = Box::new(move |folio, order| hook_ops.folio_free(folio, order));
    let blocks = usize::try_from(size / PMD_SIZE).expect("a section's blocks fit usize");
    let base = (section as u64) << SECTION_SHIFT;
    let region = Region::new(blocks, base, zone, Some(hook), phys.per_cpu_lists())?;
    let pgmap = Arc::new(DevPagemap {
        id,
        kind: config.kind,
        owner: config.owner,
        ops,
        region,
        live: AtomicBool::new(true),
        retired: AtomicBool::new(false),
    });
    phys.install_pagemap(section, Arc::clone(&pgmap));
    Ok(pgmap)
}

impl DevPagemap {
    /// The pagemap's id (its section), as carried in [`Zone`].
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Private or coherent.
    pub fn kind(&self) -> MemoryType {
        self.kind
    }

    /// Whether the memory is device-private.
    pub fn is_private(&self) -> bool {
        self.kind == MemoryType::DevicePrivate
    }

    /// The owner cookie.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The driver's ops.
    pub fn ops(&self) -> &Arc<dyn DevPagemapOps> {
        &self.ops
    }

    /// Whether the pagemap is still registered (not yet retired by
    /// [`memunmap`](Self::memunmap)).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Number of frames.
    pub fn nr_frames(&self) -> u64 {
        self.region.nr_frames() as u64
    }

    /// Commits the whole arena on the host now, so no host page fault is measured later
    /// (benchmarks).
    pub fn prefault(&self) {
        self.region.prefault();
    }

    /// Frames currently allocated.
    pub fn nr_in_use(&self) -> u64 {
        self.nr_frames() - self.region.nr_free() as u64
    }

    /// Folio allocations and frees since registration.
    pub fn alloc_free_ops(&self) -> (u64, u64) {
        self.region.alloc_free_ops()
    }

    /// Whether frame number `nr` is one of this pagemap's.
    pub(crate) fn contains_nr(&self, nr: u64) -> bool {
        nr.checked_sub(self.region.base())
            .is_some_and(|i| i < self.region.nr_frames() as u64)
    }

    pub(crate) fn region(&self) -> &Region {
        &self.region
    }

    /// The `i`-th frame of the pagemap.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not below [`nr_frames`](Self::nr_frames).
    #[track_caller]
    pub fn frame(&self, i: u64) -> FrameRef<'_> {
        assert!(i < self.nr_frames(), "frame {i} outside the pagemap");
        FrameRef::new(&self.region, self.region.base() + i)
    }

    /// The frame with number `pfn` (a device-private pagemap's frame).
    ///
    /// # Panics
    ///
    /// Panics if the frame is not one of this pagemap's, or the pagemap is coherent.
    #[track_caller]
    pub fn device_frame(&self, pfn: DevicePfn) -> FrameRef<'_> {
        assert!(self.is_private(), "a coherent pagemap has no device pfns");
        assert!(
            self.contains_nr(pfn.as_u64()),
            "{pfn:?} outside the pagemap"
        );
        FrameRef::new(&self.region, pfn.as_u64())
    }

    /// The frame with number `pfn` (a coherent pagemap's frame).
    ///
    /// # Panics
    ///
    /// Panics if the frame is not one of this pagemap's, or the pagemap is private.
    #[track_caller]
    pub fn coherent_frame(&self, pfn: Pfn) -> FrameRef<'_> {
        assert!(!self.is_private(), "a private pagemap has no CPU pfns");
        assert!(
            self.contains_nr(pfn.as_u64()),
            "{pfn:?} outside the pagemap"
        );
        FrameRef::new(&self.region, pfn.as_u64())
    }

    /// Allocates a folio of `2^order` frames (order 0 or 9) and prepares it for use as
    /// `zone_device_folio_init` does: one reference, the folio lock **held**, the given
    /// page flags. The caller unlocks it once it is mapped (or hands it to a migration,
    /// which wants destination pages locked). Contents are whatever the previous user left.
    #[doc(alias = "zone_device_folio_init")]
    #[doc(alias = "zone_device_page_init")]
    pub fn alloc(&self, order: u32, flags: FrameFlags) -> Result<LockedFolio<'_>, AllocError> {
        if !self.is_live() || (order != 0 && order != crate::addr::PMD_ORDER) {
            return Err(AllocError { order });
        }
        let first = self.region.alloc(order, flags)?;
        let frame = Frame::adopt(&self.region, self.region.base() + first as u64);
        if !self.is_live() {
            // memunmap raced with this allocation and won: give the folio back.
            return Err(AllocError { order });
        }
        // lock_page, which may sleep: a scan by frame number (an eviction's
        // migrate_device_range) can hold a speculative reference and the lock of a folio
        // the moment it is allocated; it finds the folio referenced, puts it back and
        // unlocks it.
        Ok(frame.lock())
    }

    /// Allocates up to `nr` order-0 device folios at once, locked, each holding one
    /// reference, with `flags` set: [`alloc`](Self::alloc) for a batch, under one lock of
    /// this CPU's free list (`alloc_pages_bulk`'s shape, for a driver that fills a
    /// migration's destinations from its own pool). Returns fewer than `nr` when the
    /// pagemap runs out, and none once it is retired.
    #[doc(alias = "alloc_pages_bulk")]
    pub fn alloc_bulk(&self, nr: usize, flags: FrameFlags) -> Vec<LockedFolio<'_>> {
        if !self.is_live() {
            return Vec::new();
        }
        let mut got = Vec::new();
        self.region.alloc_bulk(nr, flags, &mut got);
        let base = self.region.base();
        let frames: Vec<Frame<'_>> = got
            .into_iter()
            .map(|i| Frame::adopt(&self.region, base + i as u64))
            .collect();
        if !self.is_live() {
            // memunmap raced with this allocation and won: the handles give them back.
            return Vec::new();
        }
        // Locked one by one, as `alloc` does (`lock_page`, which may sleep behind a scan
        // by frame number).
        frames.into_iter().map(Frame::lock).collect()
    }

    /// Retires the pagemap (`memunmap_pages`): no more allocations, and its frames are no
    /// longer valid targets. Fails with `Busy` while any frame is allocated; the driver
    /// evicts them first (`migrate_device_range`).
    #[doc(alias = "memunmap_pages")]
    pub fn memunmap(&self) -> Result<(), PagemapError> {
        // Retire first, then count: an allocation that raced past the liveness check sees
        // the pagemap retired after it allocated and gives its folio back, or is counted.
        if !self.live.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let in_use = self.nr_in_use();
        if in_use != 0 {
            self.live.store(true, Ordering::Release);
            return Err(PagemapError::Busy { in_use });
        }
        self.retired.store(true, Ordering::Release);
        Ok(())
    }
}

impl std::fmt::Debug for DevPagemap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevPagemap")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("owner", &self.owner)
            .field("frames", &self.nr_frames())
            .field("in_use", &self.nr_in_use())
            .field("live", &self.is_live())
            .finish()
    }
}
