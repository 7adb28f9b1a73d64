//! `migrate_vma`: moving the pages of a range between system memory and device memory.
//!
//! A migration is three stages, each a `#[must_use]` type, as in the kernel:
//!
//! 1. [`migrate_vma_setup`] **collects**: one walk over `[start, end)` of a single VMA,
//!    under one `MMU_NOTIFY_MIGRATE` invalidation carrying `pgmap_owner`, selects pages by
//!    the [`MigrateVmaFlags`] (system pages, this owner's device-private or
//!    device-coherent pages; holes and the zero page of anonymous memory always), locks
//!    each selected page (trylock: a locked page is skipped), and replaces its entry with a
//!    migration entry. Mappings of the page elsewhere (after fork) are then replaced too,
//!    through the reverse map (`try_to_migrate`, CLEAR), and pinned pages are put back
//!    (the pin check). The result is [`Migration`]: `src` words ([`MigratePfn`]) and
//!    `cpages`.
//! 2. The driver allocates destination pages (locked), copies, and hands each one over
//!    with [`Migration::set_dst`]. [`Migration::pages`] (`migrate_vma_pages`) then
//!    commits: a hole or zero page gets its destination inserted (under a second MIGRATE
//!    invalidation from that page to the end, opened only if there is such an entry); a
//!    page gets its metadata moved to the destination. No other invalidation is raised.
//! 3. [`MigrationPages::finalize`] (`migrate_vma_finalize`) replaces every migration entry
//!    with a mapping of the destination, or of the source where the entry did not migrate,
//!    unlocks, and drops the migration's references.
//!
//! Dropping a stage finalizes it: a [`Migration`] dropped before `pages` puts every source
//! back and frees the destinations given; nothing is lost.
//!
//! [`migrate_device_range`] and [`migrate_device_pfns`] are the same stages for a driver
//! evicting its own memory by frame number, with no VMA (`migrate_device_*`).
//!
//! # Example
//!
//! Eight pages to device memory and back, the way a driver does it:
//!
//! ```
//! use std::sync::Arc;
//! use hmm::addr::PAGE_SIZE;
//! use hmm::migrate::{migrate_vma_setup, MigrateVma, MigrateVmaFlags};
//! use hmm::mm::{MapFlags, Mm, Prot};
//! use hmm::notifier::Owner;
//! use hmm::phys::{FrameFlags, PhysConfig, PhysMem};
//! use hmm::zone_device::{memremap_pages, DevPagemapOps, MemoryType, PagemapConfig};
//!
//! struct Ops;
//! impl DevPagemapOps for Ops {}
//! let phys = PhysMem::new(PhysConfig::with_size(16 << 20))?;
//! let owner = Owner::new_unique();
//! let config = PagemapConfig { kind: MemoryType::DevicePrivate, owner, size_bytes: 2 << 20 };
//! let dev = memremap_pages(&phys, config, Arc::new(Ops))?;
//! let mm = Mm::new(phys.clone());
//! let a = mm.mmap(None, 8 * PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
//! mm.write(a, b"on its way to the device")?; // page 0; pages 1..8 are holes
//!
//! let args = |flags| MigrateVma { start: a, end: a + 8 * PAGE_SIZE, pgmap_owner: Some(owner), flags, fault_page: None };
//! let mmap = mm.mmap_read();
//! // To the device: system pages and holes.
//! let mut mig = migrate_vma_setup(&mmap, args(MigrateVmaFlags::SELECT_SYSTEM))?;
//! for i in 0..8 {
//!     let dst = dev.alloc(0, FrameFlags::empty())?;
//!     match mig.src_page(i) {
//!         Some(src) => dst.copy_from(&src),
//!         None => dst.zero(), // a hole
//!     }
//!     mig.set_dst(i, dst, true).expect("a migrating entry");
//! }
//! assert_eq!(mig.pages().finalize().migrated, 8);
//! assert_eq!(dev.nr_in_use(), 8);
//! // And back: this owner's device-private pages.
//! let mut mig = migrate_vma_setup(&mmap, args(MigrateVmaFlags::SELECT_DEVICE_PRIVATE))?;
//! for i in 0..8 {
//!     let dst = phys.alloc(0, FrameFlags::empty())?.lock();
//!     dst.copy_from(&mig.src_page(i).expect("a device page"));
//!     mig.set_dst(i, dst, true).expect("a migrating entry");
//! }
//! assert_eq!(mig.pages().finalize().migrated, 8);
//! drop(mmap);
//! assert_eq!(dev.nr_in_use(), 0);
//! let mut back = [0u8; 24];
//! mm.read(a, &mut back)?;
//! assert_eq!(&back, b"on its way to the device");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Migrate on fault
//!
//! Faulting pages in and preparing them for migration in one walk (`HMM_PFN_REQ_MIGRATE`,
//! `MIGRATE_VMA_FAULT`, `migrate_hmm_range_setup`).
//!
//! A driver that wants pages on its device that are not present, or present in a form it
//! cannot migrate (another device's private page, a device-exclusive entry, a read-only
//! page it needs writable), has two kernel recipes: `hmm_range_fault` then `migrate_vma`
//! (two walks, always), or `migrate_vma`, find what did not move, `hmm_range_fault` those,
//! `migrate_vma` again (three walks). [`hmm_range_fault_migrate`] does it in one: each page
//! whose request has `REQ_MIGRATE` is faulted if its request says so, then collected under
//! the same page-table lock (see `range_fault`'s walk). [`migrate_hmm_range_setup`] then
//! runs the rest of `migrate_vma_setup` (the unmap of other mappings, the pin check) and
//! hands back an ordinary [`Migration`]. `migrate_vma_setup` with
//! [`MigrateVmaFlags::FAULT`] is the same walk with `REQ_FAULT | REQ_MIGRATE` on every
//! page, and `migrate_vma_setup` without it is that walk with `REQ_MIGRATE` alone: there is
//! one collect walk.
//!
//! ## Invalidations the walk raises itself
//!
//! The kernel's review of this series found two hazards, and this is how hmm-rs avoids
//! them:
//!
//! 1. **Livelock.** The walk's own faults invalidate the caller's interval notifier (a COW
//!    break is a CLEAR, another device's `migrate_to_ram` is that device's MIGRATE). A
//!    walk that returned `Busy` on them would make the caller retry, collect again, fault
//!    again. A migrating walk therefore makes no collision check at all: a page it
//!    collected is locked and behind a migration entry from that moment until finalize,
//!    so no invalidation can make its `MIGRATE` word stale (a concurrent zap of the
//!    migration entry is handled by finalize, as in the kernel). Only the words the caller
//!    may *mirror* (`VALID` without `MIGRATE`) depend on the sequence, and the caller
//!    checks those with `read_retry` under its lock as always: on a collision it skips
//!    mirroring them (the device faults them later) and goes on with the migration. The
//!    RFC's answer, tagging the walk's CLEAR events with `owner = current` so the driver
//!    skips them, was rejected because a skipped `set_seq` breaks concurrent readers of
//!    the same notifier; here every driver keeps recording every foreign event.
//! 2. **`read_begin` waiting on itself.** The walk's one `MMU_NOTIFY_MIGRATE`
//!    invalidation (owner `dev_private_owner`) keeps the address space's invalidation
//!    sequence odd while it is open, and any invalidation the walk's faults raise on the
//!    caller's notifier meanwhile makes that notifier wait for it. The invalidation is
//!    therefore closed before [`hmm_range_fault_migrate`] returns, on every path, and
//!    nothing inside the walk calls `read_begin`.
//!
//! The walk holds the caller's mmap lock for reading throughout, so a concurrent `munmap`
//! waits for the migration to finish; a concurrent CPU access to a collected page waits
//! on its migration entry.
//!
//! # Locking
//!
//! The caller holds the mmap lock for reading for the whole migration (the stages borrow
//! its guard). Between setup and finalize, the selected source pages are locked and
//! unmapped: a CPU access waits on the page lock (the migration entry), a device fault on
//! one of them likewise. The collect walk takes page-table locks one at a time and never
//! sleeps under them; splitting a THP it meets is done with no page-table lock held.

mod collect;
mod commit;
mod compound;
mod device;
mod on_fault;
mod pfn;

use thiserror::Error;

use crate::addr::{DevicePfn, VaRange, VirtAddr, PAGE_SHIFT};
use crate::mm::{MmapReadGuard, Vma};
use crate::notifier::Owner;
use crate::phys::{FrameRef, LockedFolio};
use crate::prot::VmFlags;
use crate::range_fault::HmmError;

pub(crate) use collect::{remove_migration_ptes, replace_migration_ptes, try_to_migrate, Next};
pub(crate) use commit::remap_entry;
pub(crate) use compound::folio_mapped;
pub(crate) use compound::PmdNext;
pub(crate) use device::{migrate_device_coherent_folio, CoherentMigrateError};
pub use device::{
    migrate_device_pfns, migrate_device_range, DeviceMigration, DeviceMigrationPages,
};
pub(crate) use on_fault::Collector;
pub use on_fault::{hmm_range_fault_migrate, migrate_hmm_range_setup, HmmMigrate};
pub use pfn::{DstRefused, MigratePfn, MigratePfnFlags, MigrateVmaFlags, MIGRATE_PFN_SHIFT};

/// What to migrate (the caller's fields of `struct migrate_vma`).
#[doc(alias = "migrate_vma")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateVma {
    /// First address (page aligned).
    pub start: VirtAddr,
    /// End, exclusive (page aligned, above `start`, in the same VMA).
    pub end: VirtAddr,
    /// Selects device pages of this owner, and is carried by the MIGRATE invalidations so
    /// the migrating driver can skip them.
    pub pgmap_owner: Option<Owner>,
    /// Which pages to select.
    pub flags: MigrateVmaFlags,
    /// The device-private page a `migrate_to_ram` handler is migrating (locked by the
    /// fault path): the migration neither locks nor unlocks it.
    pub fault_page: Option<DevicePfn>,
}

/// Why [`migrate_vma_setup`] failed: `-EINVAL` for bad arguments, as in the kernel; with
/// [`MigrateVmaFlags::FAULT`], the errors of the faults too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MigrateError {
    /// `MIGRATE_VMA_FAULT`: a page could not be faulted in (`-EFAULT`); every page
    /// collected before it was put back.
    #[error("cannot fault the page at {addr}")]
    Fault {
        /// The page.
        addr: VirtAddr,
    },
    /// `MIGRATE_VMA_FAULT`: no memory to fault a page in (`-ENOMEM`); every page
    /// collected before it was put back.
    #[error("out of memory faulting the page at {addr}")]
    NoMem {
        /// The page.
        addr: VirtAddr,
    },
    /// Bad arguments: unaligned or empty range, no VMA, a range leaving its VMA, a
    /// hugetlb or driver (`VM_MIXEDMAP`) VMA, a fault page that is not a locked
    /// device-private page, or a range longer than
    /// [`kvmalloc::max_len`](crate::kvmalloc::max_len) of [`MigratePfn`] (the `src` and
    /// `dst` arrays a kernel driver would `kvcalloc`).
    #[error("invalid migrate_vma: {what}")]
    Inval {
        /// What was wrong.
        what: &'static str,
    },
}

/// Collected pages, waiting for destinations (after `migrate_vma_setup`).
#[must_use = "dropping a migration puts every page back; call pages() and finalize()"]
pub struct Migration<'g, 'a> {
    state: commit::State<'g, 'a>,
}

/// Committed pages, waiting for finalize (after `migrate_vma_pages`).
#[must_use = "dropping finalizes; call finalize() to get the outcome"]
pub struct MigrationPages<'g, 'a> {
    state: commit::State<'g, 'a>,
}

/// What a finished migration did, in pages (a unit of `SELECT_COMPOUND` counts its 512).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MigrateOutcome {
    /// Pages that now map the destination (holes filled included).
    pub migrated: u64,
    /// Collected pages put back as they were.
    pub restored: u64,
}

/// Collects `args.start..args.end` for migration (`migrate_vma_setup`); see the
/// [module documentation](self).
pub fn migrate_vma_setup<'g, 'a>(
    mmap: &'g MmapReadGuard<'a>,
    args: MigrateVma,
) -> Result<Migration<'g, 'a>, MigrateError> {
    let inval = |what| MigrateError::Inval { what };
    let range =
        VaRange::new(args.start, args.end).map_err(|_| inval("unaligned or empty range"))?;
    // The driver's src and dst arrays: kvmalloc'd by a kernel driver, so bounded the same.
    crate::kvmalloc::check_array::<MigratePfn>(range.npages())
        .map_err(|_| inval("more pages than a kvmalloc'd src array holds"))?;
    let vma: &'g Vma = mmap.vma_lookup(range.start()).ok_or(inval("no VMA"))?;
    if !vma.range().contains_range(&range) {
        return Err(inval("the range leaves its VMA"));
    }
    if vma.flags().intersects(VmFlags::HUGETLB | VmFlags::MIXEDMAP) {
        return Err(inval("hugetlb or driver VMA"));
    }
    if let Some(fp) = args.fault_page {
        let phys = mmap.mm().phys();
        if !phys.contains_device(fp) || !phys.device_frame(fp).folio().meta().is_locked() {
            return Err(inval("fault page not a locked device-private page"));
        }
    }
    let mut state = on_fault::collect(mmap, vma, args).map_err(|e| match e {
        HmmError::Fault { addr } | HmmError::Perm { addr } => MigrateError::Fault { addr },
        HmmError::NoMem { addr } => MigrateError::NoMem { addr },
        HmmError::Busy
        | HmmError::Range { .. }
        | HmmError::Inval { .. }
        | HmmError::Interrupted => {
            unreachable!("a collect walk checks no sequence and gets checked arguments: {e}")
        }
    })?;
    collect::unmap_and_check(&mut state);
    let m = mmap.mm();
    m.counters().migrate_setup(state.collected_pages());
    tracing::debug!(
        target: "hmm::migrate",
        start = %format_args!("{:#x}", range.start().as_u64()),
        pages = range.npages(),
        collected = state.collected_pages(),
        owner = args.pgmap_owner.map(|o| o.as_u64()),
        "migrate_vma_setup"
    );
    Ok(Migration { state })
}

impl<'g, 'a> Migration<'g, 'a> {
    /// The mmap lock the migration runs under.
    pub fn mmap(&self) -> &'g MmapReadGuard<'a> {
        self.state.mmap
    }

    /// One word per page of the range: `MIGRATE` for each entry that is migrating
    /// (`VALID` and a frame number when it has a source page; none for a hole or the zero
    /// page, which get a zero-filled destination).
    pub fn src(&self) -> &[MigratePfn] {
        &self.state.src
    }

    /// The destination words set so far.
    pub fn dst(&self) -> &[MigratePfn] {
        &self.state.dst
    }

    /// Entries migrating (holes and zero pages included) (`cpages`).
    pub fn cpages(&self) -> u64 {
        self.state.cpages
    }

    /// Entries in the range (`npages`).
    pub fn npages(&self) -> u64 {
        self.state.src.len() as u64
    }

    /// The first address.
    pub fn start(&self) -> VirtAddr {
        self.state.range.start()
    }

    /// The address of entry `i`.
    pub fn addr(&self, i: usize) -> VirtAddr {
        self.start()
            .checked_add((i as u64) << PAGE_SHIFT)
            .expect("inside the range")
    }

    /// The source page of entry `i`, to copy from (locked and unmapped: its contents are
    /// stable); `None` for a hole or the zero page, or an entry not migrating. Inside a
    /// unit (`COMPOUND`) with a source, entry `i` is its page `i - head`, for a driver
    /// that copies the unit page by page.
    #[doc(alias = "migrate_pfn_to_page")]
    pub fn src_page(&self, i: usize) -> Option<FrameRef<'g>> {
        let s = &self.state;
        let head = s.unit_head(i).unwrap_or(i);
        let w = s.src[head];
        (w.is_valid() && w.is_migrating()).then(|| s.frame(w.frame_nr() + (i - head) as u64))
    }

    /// Gives entry `i` its destination: a folio the caller allocated, filled and locked
    /// (the type says so: [`Frame::lock`](crate::phys::Frame::lock) makes one). `write`
    /// asks for a writable mapping (`MIGRATE_PFN_WRITE`). The migration owns the lock and
    /// the reference from now on and unlocks the page when it finalizes.
    ///
    /// A unit (`COMPOUND` source) takes one order-9 folio at its first entry (the word
    /// gets `COMPOUND`), or order-0 pages at any of its 512 entries (the source is then
    /// split when the migration commits). An order-9 folio for an entry that is not a
    /// unit is accepted here and refused by [`pages`](Self::pages).
    ///
    /// Errors: [`DstRefused`], with the folio given back, if `i` is outside the range,
    /// the entry is neither migrating nor inside a migrating unit, or it already has a
    /// destination. (The kernel takes a destination for an entry that is not migrating
    /// and frees it at finalize; giving it back at once is the same outcome, sooner.)
    ///
    /// An unlocked page does not type-check:
    ///
    /// ```compile_fail
    /// fn hand_over<'f>(m: &mut hmm::migrate::Migration<'_, '_>, page: hmm::phys::Frame<'f>) {
    ///     let _ = m.set_dst(0, page, true);
    /// }
    /// ```
    ///
    /// Lock it first:
    ///
    /// ```
    /// fn hand_over<'f>(
    ///     m: &mut hmm::migrate::Migration<'_, '_>,
    ///     page: hmm::phys::Frame<'f>,
    /// ) -> Result<(), hmm::migrate::DstRefused<'f>> {
    ///     m.set_dst(0, page.lock(), true)
    /// }
    /// ```
    pub fn set_dst<'f>(
        &mut self,
        i: usize,
        dst: LockedFolio<'f>,
        write: bool,
    ) -> Result<(), DstRefused<'f>> {
        let s = &mut self.state;
        let src = (i < s.src.len()).then(|| s.src[s.unit_head(i).unwrap_or(i)]);
        let dst_word = s.dst.get(i).copied().unwrap_or_default();
        let word = MigratePfn::destination(i, src, dst_word, dst, write)?;
        s.dst[i] = word;
        Ok(())
    }

    /// Commits the entries that have a destination (`migrate_vma_pages`); the others stop
    /// migrating.
    #[doc(alias = "migrate_vma_pages")]
    pub fn pages(mut self) -> MigrationPages<'g, 'a> {
        commit::pages(&mut self.state);
        MigrationPages {
            state: self.state.take(),
        }
    }
}

impl MigrationPages<'_, '_> {
    /// The source words: `MIGRATE` still set on the entries that will migrate.
    pub fn src(&self) -> &[MigratePfn] {
        &self.state.src
    }

    /// The destination words.
    pub fn dst(&self) -> &[MigratePfn] {
        &self.state.dst
    }

    /// Maps the destinations (or the sources, where an entry did not migrate), unlocks
    /// and drops the migration's references (`migrate_vma_finalize`).
    #[doc(alias = "migrate_vma_finalize")]
    pub fn finalize(mut self) -> MigrateOutcome {
        commit::finalize(&mut self.state)
    }
}

impl std::fmt::Debug for Migration<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("range", &self.state.range)
            .field("cpages", &self.state.cpages)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for MigrationPages<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationPages")
            .field("range", &self.state.range)
            .finish_non_exhaustive()
    }
}
