//! Transparent huge pages: 2 MiB anonymous folios mapped by PMD leaves (the kernel's
//! `mm/huge_memory.c` and `mm/khugepaged.c`).
//!
//! * **Where.** A private anonymous VMA may get a PMD leaf for a 2 MiB-aligned range that
//!   lies wholly inside it, if the address space's [`ThpMode`] allows it: `Always` unless
//!   the VMA has `NOHUGEPAGE`, `Madvise` only with `HUGEPAGE` (`MADV_HUGEPAGE`), `Never`
//!   not at all.
//! * **Fault.** A read of an empty PMD maps the huge zero page; a write allocates a zeroed
//!   order-9 folio (with no lock held) and maps it writable. If the allocation fails the
//!   fault falls back to 4 KiB pages (`VM_FAULT_FALLBACK`).
//! * **Write to a read-only leaf.** An anon-exclusive THP (or one whose only reference is
//!   this mapping) is made writable in place; the huge zero page and shared THPs are split
//!   at PMD level and the write is resolved by the PTE path (`do_huge_pmd_wp_page`).
//! * **PMD split.** Under one CLEAR invalidation of the 2 MiB, the leaf becomes a PTE table
//!   of 512 entries (the deposited table): each PTE maps its subpage with the leaf's flags,
//!   taking a map count on that page and a reference on the folio; the folio loses its PMD
//!   mapping. The huge zero page splits into 512 mappings of the 4 KiB zero page; a PMD
//!   migration entry into 512 migration entries. Partial munmap, mprotect, madvise and
//!   mremap split first; `fork` splits THPs that may be pinned.
//! * **Collapse.** `MADV_COLLAPSE` ([`super::Advice::Collapse`]) replaces the PTEs of an
//!   aligned 2 MiB range by one new THP holding a copy of their bytes (empty PTEs read as
//!   zeros), under one CLEAR invalidation, with the mmap lock held for writing
//!   (`collapse_huge_page`).
//!
//! Map counts of a THP: each PTE mapping counts on its page, each PMD mapping on the head's
//! entire map count; every mapping of either kind holds one reference on the folio.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::addr::{DevicePfn, Pfn, VaRange, VirtAddr, PMD_NR, PMD_ORDER, PMD_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange, VmaInfo};
use crate::pgtable::{
    Huge, MigrationKind, MigrationPfn, PageTable, PmdEntry, Pte, PteFlags, Slot, WalkMode,
};
use crate::phys::{FrameFlags, FrameRef, PhysMem, Zone};
use crate::prot::VmFlags;
use crate::stats::FaultKind;

use super::error::{FaultError, MmError};
use super::fault::{must_unshare, FaultFlags};
use super::tlb::TlbGather;
use super::vma::{Backing, Vma};
use super::{rmap, Mm, MmState};

/// When anonymous memory gets transparent huge pages
/// (`/sys/kernel/mm/transparent_hugepage/enabled`, here per address space).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[repr(u8)]
pub enum ThpMode {
    /// In every eligible VMA that is not `NOHUGEPAGE`.
    Always,
    /// Only in VMAs with `MADV_HUGEPAGE` (the default here, as on many distributions).
    #[default]
    Madvise,
    /// Never on fault (`MADV_COLLAPSE` still works).
    Never,
}

/// The THP mode of an address space, changeable at run time.
#[derive(Debug)]
pub(crate) struct ThpSetting(AtomicU8);

impl Default for ThpSetting {
    fn default() -> Self {
        ThpSetting(AtomicU8::new(ThpMode::default() as u8))
    }
}

impl ThpSetting {
    pub(crate) fn get(&self) -> ThpMode {
        match self.0.load(Ordering::Relaxed) {
            0 => ThpMode::Always,
            2 => ThpMode::Never,
            _ => ThpMode::Madvise,
        }
    }

    pub(crate) fn set(&self, mode: ThpMode) {
        self.0.store(mode as u8, Ordering::Relaxed);
    }
}

impl Mm {
    /// Sets when anonymous memory of this address space gets THPs on fault.
    pub fn set_thp_mode(&self, mode: ThpMode) {
        self.thp.set(mode);
    }

    /// The THP mode.
    pub fn thp_mode(&self) -> ThpMode {
        self.thp.get()
    }

    /// Splits every anonymous large folio (THP or multi-size THP) mapped in `[start, end)`
    /// into pages of `new_order`
    /// (`echo pid,start,end,new_order > /sys/kernel/debug/split_huge_pages`), wherever else
    /// it is mapped too; returns how many it split. A THP that cannot be split now (pinned,
    /// referenced, locked) is left whole, as the kernel's loop skips it. Under the mmap lock
    /// for reading.
    ///
    /// A folio of order `new_order` or below is left alone, and an anonymous folio is
    /// never split to order 1 (the kernel refuses that split; the interface goes on).
    ///
    /// Errors: `Inval` for an unaligned or empty range, or a `new_order` of 9 or more.
    #[doc(alias = "split_huge_pages_pid")]
    pub fn split_huge_pages(
        &self,
        start: VirtAddr,
        end: VirtAddr,
        new_order: u32,
    ) -> Result<u64, MmError> {
        let range = VaRange::new(start, end).map_err(|_| MmError::Inval {
            what: "unaligned or empty range",
        })?;
        if new_order >= PMD_ORDER {
            return Err(MmError::Inval {
                what: "a split's new order is below 9",
            });
        }
        let guard = self.mmap_read();
        let st = guard.state();
        let phys = self.phys();
        let mut split = 0;
        let mut at = range.start();
        while at < range.end() {
            let next = at + crate::addr::PAGE_SIZE;
            let anon = st
                .vmas
                .find(at)
                .is_some_and(|v| matches!(v.backing(), Backing::Anon));
            let held = anon
                .then(|| {
                    let mut c = st.pt.cursor(VaRange::page_of(at), WalkMode::Lookup);
                    let e = match c.current()? {
                        Slot::Pte(p) => p.get(),
                        Slot::Pmd(p) => p.get(),
                        // Only anonymous VMAs are looked at, never hugetlb ones.
                        Slot::Hole(_) | Slot::Pud(_) => return None,
                    };
                    // The folio, held from under the page-table lock.
                    match e {
                        Pte::Present { pfn, .. }
                            if !phys.is_zero_pfn(pfn) && !phys.is_huge_zero_pfn(pfn) =>
                        {
                            let folio = phys.frame(pfn).folio();
                            (folio.meta().order() > new_order)
                                .then(|| folio.try_get().ok())
                                .flatten()
                        }
                        _ => None,
                    }
                })
                .flatten();
            if let Some(held) = held {
                if split_folio_held(phys, Some((self, st)), held, new_order) {
                    split += 1;
                }
            }
            at = next;
        }
        Ok(split)
    }
}

/// The 2 MiB range around `addr` if a fault there may map a THP
/// (`thp_vma_allowable_order` and `thp_vma_suitable_order`).
pub(super) fn fault_range(mm: &Mm, vma: &Vma, addr: VirtAddr) -> Option<VaRange> {
    let allowed = match mm.thp.get() {
        ThpMode::Always => !vma.flags().contains(VmFlags::NOHUGEPAGE),
        ThpMode::Madvise => vma.flags().contains(VmFlags::HUGEPAGE),
        ThpMode::Never => false,
    };
    if !allowed {
        return None;
    }
    suitable_range(vma, addr)
}

/// The aligned 2 MiB range around `addr`, if it lies inside a private anonymous VMA.
fn suitable_range(vma: &Vma, addr: VirtAddr) -> Option<VaRange> {
    // MADV_COLLAPSE ignores the THP mode and MADV_HUGEPAGE but not MADV_NOHUGEPAGE
    // (`vma_thp_disabled`).
    if !matches!(vma.backing(), Backing::Anon) || vma.flags().contains(VmFlags::NOHUGEPAGE) {
        return None;
    }
    let r = VaRange::from_len(addr.align_down(PMD_SIZE), PMD_SIZE).ok()?;
    vma.range().contains_range(&r).then_some(r)
}

/// Handles a fault at PMD level where THPs are allowed: returns `Ok(true)` when resolved
/// (or raced, for the caller to retry the access), `Ok(false)` to use the PTE path.
pub(super) fn huge_fault(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    addr: VirtAddr,
    fault: FaultFlags,
) -> Result<bool, FaultError> {
    let write = fault.contains(FaultFlags::WRITE);
    let Some(range) = fault_range(mm, vma, addr) else {
        return Ok(false);
    };
    let pmd = st
        .pt
        .lock_pmd(range.start(), WalkMode::Populate)
        .expect("populate");
    match pmd.get() {
        // A device THP goes to its owner's migrate_to_ram through the common path.
        PmdEntry::Table | PmdEntry::Leaf(Pte::DevicePrivate { .. }) => Ok(false),
        PmdEntry::Leaf(leaf) => {
            drop(pmd);
            huge_pmd_fault(mm, st, vma, addr, fault, leaf).map(|()| true)
        }
        PmdEntry::None if !write => {
            pmd.set_leaf(Pte::Present {
                pfn: mm.phys().huge_zero_pfn(),
                flags: PteFlags::YOUNG,
            });
            mm.counters.fault(FaultKind::ThpZero);
            Ok(true)
        }
        PmdEntry::None => {
            drop(pmd);
            // do_huge_pmd_anonymous_page: allocate and zero with no lock held.
            let Ok(folio) = mm.phys().alloc_zeroed(
                PMD_ORDER,
                FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
            ) else {
                return Ok(false);
            };
            mm.counters.frame_allocated();
            mm.new_anon_rmap(&folio, vma, range.start());
            let pmd = st
                .pt
                .lock_pmd(range.start(), WalkMode::Populate)
                .expect("populate");
            if pmd.get() != PmdEntry::None {
                drop(pmd);
                mm.release_frame(folio);
                return Ok(true);
            }
            folio.meta().inc_entire_mapcount();
            pmd.set_leaf(Pte::Present {
                pfn: folio.into_raw(),
                flags: dirty_flags() | PteFlags::WRITE,
            });
            mm.counters.fault(FaultKind::ThpAnon);
            Ok(true)
        }
    }
}

/// Young, dirty and soft-dirty: what a write fault sets (`pte_mkdirty` sets soft-dirty).
pub(super) fn dirty_flags() -> PteFlags {
    PteFlags::YOUNG | PteFlags::DIRTY | PteFlags::SOFT_DIRTY
}

/// A fault on an existing PMD leaf (`do_huge_pmd_wp_page`, `pmd_migration_entry_wait`).
pub(super) fn huge_pmd_fault(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    addr: VirtAddr,
    fault: FaultFlags,
    leaf: Pte,
) -> Result<(), FaultError> {
    let phys = mm.phys();
    let base = addr.align_down(PMD_SIZE);
    let write = fault.contains(FaultFlags::WRITE);
    match leaf {
        Pte::None => Ok(()),
        Pte::Present { pfn, flags } => {
            let unshare = fault.contains(FaultFlags::UNSHARE) && must_unshare(mm, vma, pfn, true);
            if !unshare && (!write || flags.contains(PteFlags::WRITE)) {
                return Ok(());
            }
            if !phys.is_huge_zero_pfn(pfn) {
                let fm = phys.frame(pfn).meta();
                let reusable = fm.flags().contains(FrameFlags::ANON_EXCLUSIVE)
                    || (fm.refcount() == 1 && fm.pincount() == 0);
                if reusable {
                    let pmd = st.pt.lock_pmd(base, WalkMode::Lookup).expect("leaf exists");
                    if pmd.get() == PmdEntry::Leaf(leaf) {
                        fm.set_flags(FrameFlags::ANON_EXCLUSIVE);
                        if write {
                            pmd.set_leaf(Pte::Present {
                                pfn,
                                flags: flags | dirty_flags() | PteFlags::WRITE,
                            });
                        }
                        mm.counters.fault(FaultKind::WpReuse);
                    }
                    return Ok(());
                }
            }
            // Fall back: split, and let the PTE path copy the one page written.
            let mut tlb = TlbGather::new(mm);
            split_pmd(mm, &st.pt, Some(vma.info()), base, &mut tlb);
            Ok(())
        }
        Pte::Migration { pfn, .. } => {
            super::fault::wait_on_migration(phys.frame_nr(pfn.nr()).folio());
            mm.counters.fault(FaultKind::MigrationWait);
            Ok(())
        }
        Pte::DevicePrivate { .. } => unreachable!("handled by the device fault path"),
        Pte::DeviceExclusive { .. } | Pte::Swap { .. } => {
            unreachable!("device-exclusive and swap entries are PTEs")
        }
    }
}

/// Splits the PMD leaf at `base` (if there still is one) into 512 PTEs under a CLEAR
/// invalidation of its 2 MiB (`__split_huge_pmd`). The caller holds the mmap lock and no
/// page-table lock. A device THP's PMD becomes 512 device-private PTEs with its
/// writability; like a THP's, its folio stays whole.
#[doc(alias = "__split_huge_pmd")]
pub(crate) fn split_pmd(
    mm: &Mm,
    pt: &PageTable,
    vma: Option<VmaInfo>,
    base: VirtAddr,
    tlb: &mut TlbGather<'_>,
) {
    let range = VaRange::from_len(base, PMD_SIZE).expect("aligned PMD");
    let inv = mm.notifiers.invalidate_range_start(NotifierRange::new(
        mm.id,
        range,
        NotifierEvent::Clear,
        vma,
    ));
    if let Some(pmd) = pt.lock_pmd(base, WalkMode::Lookup) {
        let phys = mm.phys();
        let zero = phys.zero_pfn();
        let sub = |pfn: Pfn, i: u64| Pfn::new(pfn.as_u64() + i);
        // Account the 512 PTE mappings before the table is published: a walker takes only
        // the PTE lock of a published table, so it may zap a PTE at once, and must find
        // the map count and the reference that PTE holds (the kernel adds them before
        // `pmd_populate` too).
        let head = match pmd.get() {
            PmdEntry::Leaf(Pte::Present { pfn, .. }) if !phys.is_huge_zero_pfn(pfn) => {
                Some(phys.frame(pfn))
            }
            // A device THP (its folio stays whole; the PTEs keep the PMD's writability).
            PmdEntry::Leaf(Pte::DevicePrivate { pfn, .. }) => Some(phys.device_frame(pfn)),
            _ => None,
        };
        if let Some(head) = head {
            // The head's anon-exclusive bit stood for the whole PMD mapping; each PTE now
            // has its page's own (`RMAP_EXCLUSIVE` on every page).
            let exclusive = head.anon_exclusive();
            for i in 0..PMD_NR {
                let page = phys.frame_nr(head.nr() + i);
                page.meta().inc_mapcount();
                if exclusive {
                    page.set_anon_exclusive();
                }
            }
            head.meta().get_many(PMD_NR as u32 - 1);
            head.meta().dec_entire_mapcount();
        }
        let old = pmd.split(|i, leaf| match leaf {
            Pte::Present { pfn, flags } if phys.is_huge_zero_pfn(pfn) => Pte::Present {
                pfn: zero,
                flags: flags - PteFlags::WRITE,
            },
            Pte::Present { pfn, flags } => Pte::Present {
                pfn: sub(pfn, i as u64),
                flags,
            },
            Pte::Migration { pfn, kind, flags } => Pte::Migration {
                pfn: pfn.offset(i as u64),
                kind,
                flags,
            },
            Pte::DevicePrivate { pfn, flags } => Pte::DevicePrivate {
                pfn: DevicePfn::new(pfn.as_u64() + i as u64),
                flags,
            },
            Pte::None | Pte::DeviceExclusive { .. } | Pte::Swap { .. } => {
                unreachable!("no such PMD leaf")
            }
        });
        if let Some(Pte::Present { flags, .. }) = old {
            if !flags.contains(PteFlags::PROTNONE) {
                tlb.add_range(range);
            }
        }
        if old.is_some() {
            mm.counters.thp_split_pmd();
        }
    }
    inv.end();
}

/// Splits PMD leaves that a VMA split at the ends of `range` would cut
/// (`vma_adjust_trans_huge`): no leaf may straddle two VMAs.
pub(super) fn split_at_vma_bounds(mm: &Mm, st: &MmState, range: VaRange) {
    let mut tlb = TlbGather::new(mm);
    for at in [range.start(), range.end()] {
        // A hugetlb leaf is never split: a bound inside hugetlb memory is refused where
        // the operation cuts a VMA there (`check_range`), and left alone where it does not
        // (`UFFDIO_UNREGISTER` over a range that ends in a hugetlb VMA).
        if at.is_aligned(PMD_SIZE) || st.vmas.find(at).is_some_and(super::hugetlb::is_hugetlb) {
            continue;
        }
        let leaf = st
            .pt
            .lock_pmd(at, WalkMode::Lookup)
            .is_some_and(|pmd| matches!(pmd.get(), PmdEntry::Leaf(_)));
        if leaf {
            let vma = st.vmas.find(at).map(Vma::info);
            split_pmd(mm, &st.pt, vma, at.align_down(PMD_SIZE), &mut tlb);
        }
    }
}

/// `MADV_COLLAPSE` over `range` (already checked to lie in VMAs): every aligned 2 MiB
/// inside it becomes one THP holding the same bytes. With the mmap lock held for writing.
///
/// As in the kernel (`madvise_collapse`), every candidate is tried and the call fails if
/// any was not collapsed, with the errno of the last failure: `NoMem` when no THP could be
/// allocated; `Again` for a pinned, referenced or locked page; `Inval` for a range with no
/// aligned 2 MiB in a private anonymous VMA, an empty PMD, or a non-present entry
/// (migration, device).
pub(super) fn collapse(mm: &Mm, st: &MmState, range: VaRange) -> Result<(), MmError> {
    let inval = MmError::Inval {
        what: "nothing to collapse: no aligned 2 MiB of private anonymous memory",
    };
    let mut last = None;
    let mut candidates = 0;
    let mut at = range.start().align_up(PMD_SIZE).unwrap_or(range.end());
    while let Some(end) = at.checked_add(PMD_SIZE).filter(|&e| e <= range.end()) {
        let vma = st.vmas.find(at).expect("range checked to be mapped");
        match suitable_range(vma, at) {
            Some(r) => {
                candidates += 1;
                if let Err(e) = collapse_one(mm, st, vma, r, None) {
                    last = Some(e);
                }
            }
            None => last = Some(inval),
        }
        at = end;
    }
    match (candidates, last) {
        (0, _) => Err(inval),
        (_, Some(e)) => Err(e),
        (_, None) => Ok(()),
    }
}

/// Collapses the 2 MiB `range` of `vma` into one THP; returns whether it made one (false:
/// a THP is there already). `limits` are khugepaged's scan limits; `MADV_COLLAPSE` has
/// none.
pub(super) fn collapse_one(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    range: VaRange,
    limits: Option<&super::KhugepagedLimits>,
) -> Result<bool, MmError> {
    let phys = mm.phys();
    let again = MmError::Again {
        what: "a page is pinned, referenced or locked",
    };
    let not_present = MmError::Inval {
        what: "empty PMD or non-present entry",
    };
    // Scan (hpage_collapse_scan_pmd). Nothing in this address space changes meanwhile: the
    // mmap lock is held for writing.
    let scan = || match st.pt.lock_pmd(range.start(), WalkMode::Lookup) {
        None => Err(not_present),
        Some(pmd) => match pmd.get() {
            // Already a THP (SCAN_PMD_MAPPED).
            PmdEntry::Leaf(Pte::Present { .. }) => Ok(None),
            // A device-private or migration PMD is not present (`find_pmd_or_thp_or_none`:
            // SCAN_PMD_NULL, EINVAL); it is no THP of this address space to keep.
            PmdEntry::Leaf(_) | PmdEntry::None => Err(not_present),
            PmdEntry::Table => Ok(Some(pmd.ptes().expect("table"))),
        },
    };
    let Some(mut ptes) = scan()? else {
        return Ok(false);
    };
    if let Some(limits) = limits {
        limits.check(phys, &ptes)?;
    }
    // A userfaultfd owns the empty pages of an armed VMA, and write-protected entries keep
    // their trap: both refuse before anything is read back (SCAN_EXCEED_NONE_PTE is EBUSY,
    // SCAN_PTE_UFFD_WP EINVAL).
    let armed = vma.flags().intersects(VmFlags::UFFD);
    for pte in &ptes {
        let empty =
            pte.is_none() || matches!(pte, Pte::Present { pfn, .. } if phys.is_zero_pfn(*pfn));
        if armed && empty {
            return Err(MmError::Busy {
                what: "an empty page of a userfaultfd-armed VMA",
            });
        }
        if pte.is_uffd_wp() {
            return Err(MmError::Inval {
                what: "a userfaultfd write-protected page",
            });
        }
    }
    // __collapse_huge_page_swapin: swapped-out pages are read back first (MADV_COLLAPSE
    // has no max_ptes_swap limit).
    if ptes.iter().any(|p| matches!(p, Pte::Swap { .. })) {
        for (i, p) in ptes.iter().enumerate() {
            if matches!(p, Pte::Swap { .. }) {
                let va = range.start() + i as u64 * crate::addr::PAGE_SIZE;
                super::vmscan::swapin(mm, st, vma, va).map_err(|_| MmError::NoMem {
                    what: "no memory to read a page back from swap",
                })?;
            }
        }
        ptes = scan()?.ok_or(not_present)?;
    }
    // In entry order, as hpage_collapse_scan_pmd reports the first refusal.
    let mut checked = Vec::new();
    for pte in &ptes {
        match *pte {
            Pte::None => {}
            Pte::Present { pfn, .. } if phys.is_zero_pfn(pfn) => {}
            Pte::Present { pfn, .. } => {
                if !collapsible_folio(phys, phys.frame(pfn).folio(), &mut checked) {
                    return Err(again);
                }
            }
            Pte::Migration { .. }
            | Pte::DevicePrivate { .. }
            | Pte::DeviceExclusive { .. }
            | Pte::Swap { .. } => return Err(not_present),
        }
    }
    let (new, inv) = collapse_copy(mm, vma, range, PMD_ORDER, &ptes)?;
    let pmd = st
        .pt
        .lock_pmd(range.start(), WalkMode::Populate)
        .expect("populate");
    let mut tlb = TlbGather::new(mm);
    let flags = collapsed_flags(vma);
    new.meta().inc_entire_mapcount();
    let leaf = Pte::Present {
        pfn: new.into_raw(),
        flags,
    };
    pmd.collapse(leaf);
    tlb.add_range(range);
    drop(pmd);
    release_collapsed(mm, &ptes, &mut tlb);
    tlb.finish();
    inv.end();
    mm.counters.thp_collapse();
    Ok(true)
}

/// `is_refcount_suitable` and the pin and lock checks of a collapse's source `folio`: not
/// pinned, not locked, and every reference a mapping (each page's PTE mappings and the
/// folio's PMD ones, for a folio of any order). A folio in `checked` passed already;
/// one that passes is added.
pub(super) fn collapsible_folio(
    phys: &PhysMem,
    folio: FrameRef<'_>,
    checked: &mut Vec<u64>,
) -> bool {
    if checked.contains(&folio.nr()) {
        return true;
    }
    let fm = folio.meta();
    let mapped = fm.entire_mapcount()
        + (0..1u64 << fm.order())
            .map(|k| phys.frame_nr(folio.nr() + k).meta().mapcount())
            .sum::<i32>();
    let ok = fm.pincount() == 0 && !fm.is_locked() && fm.refcount() as i32 == mapped;
    if ok {
        checked.push(folio.nr());
    }
    ok
}

/// The new folio of a collapse of `range` (order `order`, anonymous to `vma`) holding
/// the bytes the entries `ptes` map (`__collapse_huge_page_copy`: zeros for empty entries
/// and the zero page), with the CLEAR invalidation of `range` started before the copy, as
/// in `collapse_huge_page`: a device mapping the small pages may write them until it
/// returns (the mmap lock keeps CPUs out, not devices), and a write copied too early would
/// be lost. The caller maps the folio, then ends the invalidation.
pub(super) fn collapse_copy<'m>(
    mm: &'m Mm,
    vma: &Vma,
    range: VaRange,
    order: u32,
    ptes: &[Pte],
) -> Result<(crate::phys::Frame<'m>, crate::notifier::Invalidation<'m>), MmError> {
    let phys = mm.phys();
    let new = phys
        .alloc(
            order,
            FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
        )
        .map_err(|_| MmError::NoMem {
            what: "no free folio for the collapse",
        })?;
    mm.counters.frame_allocated();
    mm.new_anon_rmap(&new, vma, range.start());
    let inv = mm.notifiers.invalidate_range_start(NotifierRange::new(
        mm.id,
        range,
        NotifierEvent::Clear,
        Some(vma.info()),
    ));
    for (i, pte) in ptes.iter().enumerate() {
        let dst = phys.frame(Pfn::new(new.pfn().as_u64() + i as u64));
        match *pte {
            Pte::Present { pfn, .. } if !phys.is_zero_pfn(pfn) => dst.copy_from(&phys.frame(pfn)),
            _ => dst.zero(),
        }
    }
    Ok((new, inv))
}

/// The flags of a collapsed folio's mapping in `vma`: dirty and young, writable if the
/// VMA is, `PROT_NONE` if it is not accessible.
pub(super) fn collapsed_flags(vma: &Vma) -> PteFlags {
    let mut flags = dirty_flags();
    if !vma.is_accessible() {
        flags |= PteFlags::PROTNONE;
    } else if vma.flags().contains(VmFlags::WRITE) {
        flags |= PteFlags::WRITE;
    }
    flags
}

/// Drops the mappings the collapsed entries `ptes` held: map counts now, references
/// after the TLB flush. A large source folio that lost a page's last mapping goes on the
/// deferred-split queue, as a zap puts it there: one that straddled the collapsed range
/// (PTEs moved by `mremap` need not be aligned) is mapped only in part now. The caller
/// runs the queue.
pub(super) fn release_collapsed(mm: &Mm, ptes: &[Pte], tlb: &mut TlbGather<'_>) {
    let phys = mm.phys();
    for pte in ptes {
        if let Pte::Present { pfn, .. } = *pte {
            if !phys.is_zero_pfn(pfn) {
                let page = phys.frame(pfn);
                let folio = page.folio();
                let left = page.meta().dec_mapcount();
                if folio.meta().order() > 0 && left == 0 && folio.meta().entire_mapcount() == 0 {
                    mm.defer_split(folio.pfn());
                }
                tlb.defer_put(pfn);
            }
        }
    }
}

/// Splits the anonymous large folio (a THP, a multi-size THP or a device THP) `folio`
/// (the caller's reference) into order-0 folios (`split_huge_page`), keeping every
/// mapping and byte; returns whether it did. With the folio locked: every mapping in every address space (through the reverse
/// map) becomes a migration entry under a CLEAR invalidation of its range (PMD leaves are
/// split first); the reference count must then be the caller's alone
/// (`folio_ref_freeze`), or the entries are restored and the split fails (a pin, a GUP
/// reference, a waiter); the metadata is split ([`split_frozen_folio`]); the migration
/// entries become present (or device-private) entries of the new folios.
#[doc(alias = "split_huge_page")]
pub(crate) fn split_folio(mm: &Mm, st: &MmState, folio: crate::phys::Frame<'_>) -> bool {
    split_folio_held(mm.phys(), Some((mm, st)), folio, 0)
}

/// [`split_folio`] by a caller that may hold no mmap lock (`held` is the address space
/// whose lock it holds, if any); the split is counted in that address space.
pub(crate) fn split_folio_held(
    phys: &PhysMem,
    held: Option<(&Mm, &MmState)>,
    folio: crate::phys::Frame<'_>,
    new_order: u32,
) -> bool {
    let head = folio.folio();
    let fm = head.meta();
    // No order-1 anonymous folio (`split_huge_page_to_list_to_order`'s EINVAL).
    let splittable = fm.order() > new_order
        && new_order != 1
        // A device-private folio's driver splits its data to pages only (`folio_split`).
        && (new_order == 0 || matches!(head.zone(), Zone::System))
        && fm.flags().contains(FrameFlags::ANON)
        && !fm.flags().contains(FrameFlags::HUGETLB)
        && fm.pincount() == 0;
    if !splittable || !fm.trylock() {
        return false;
    }
    let Some(range) = rmap::FolioRange::of(head) else {
        fm.unlock();
        return false;
    };
    let nr = 1u64 << fm.order();
    rmap::rmap_walk_range(&range, held, |m, s, vma, r| {
        unmap_for_split(m, s, vma, r, head, nr)
    });
    let frozen = fm.freeze(1);
    if frozen {
        if new_order == 0 {
            split_frozen_folio(phys, head, 1);
        } else {
            // Device-private folios are split to pages only (`split_frozen_folio`).
            head.split_frozen(1, new_order);
        }
    }
    // A split to pages maps the pages of zeros to the shared zero page instead
    // (`RMP_USE_SHARED_ZEROPAGE`, Linux 6.12): they are freed below. Not for device
    // memory, whose bytes the CPU does not read.
    let zero_unused = frozen && new_order == 0 && matches!(head.zone(), Zone::System);
    rmap::rmap_walk_range(&range, held, |_, s, vma, r| {
        remap_after_split(phys, s, vma, r, head, nr, zero_unused)
    });
    if !frozen {
        fm.unlock();
        return false;
    }
    // The caller's reference became the head's; every new folio has one and is locked.
    std::mem::forget(folio);
    let mut freed = 0;
    for i in (0..nr >> new_order).rev().map(|k| k << new_order) {
        let page = phys.frame_nr(head.nr() + i);
        page.meta().unlock();
        if page.put() == crate::phys::Freed::Yes && matches!(page.zone(), Zone::System) {
            freed += 1;
        }
    }
    if let Some((mm, _)) = held {
        mm.counters.frames_freed(freed);
        mm.counters.thp_split_folio();
    }
    true
}

/// Splits the frozen, locked, unmapped large folio `head` into locked order-0 folios (the
/// tails with one reference each, the head with `head_refs`), and for a device-private
/// folio lets the pagemap's driver split its per-page data in step (`folio_split` for
/// each new tail, then once for the head).
pub(crate) fn split_frozen_folio(phys: &PhysMem, head: FrameRef<'_>, head_refs: u32) {
    let nr = 1u64 << head.meta().order();
    head.split_frozen(head_refs, 0);
    if let Zone::DevicePrivate { .. } = head.zone() {
        let pagemap = phys
            .pagemap_of(head.nr())
            .expect("a device-private frame has a pagemap");
        for i in 1..nr {
            pagemap
                .ops()
                .folio_split(head, Some(phys.frame_nr(head.nr() + i)));
        }
        pagemap.ops().folio_split(head, None);
    }
}

/// Whether the entry refers to one of the pages from `head` (a large folio being split,
/// or just split: `nr` pages).
fn maps_folio(entry: Pte, head: FrameRef<'_>, nr: u64) -> bool {
    rmap::entry_refers_to(entry, head, nr)
}

/// `try_to_migrate_one` for a split: every entry of `range` mapping a page of the folio at
/// `head` becomes a migration entry; PMD leaves mapping it are split first.
fn unmap_for_split(mm: &Mm, st: &MmState, vma: &Vma, range: VaRange, head: FrameRef<'_>, nr: u64) {
    let phys = mm.phys();
    let inv = mm.notifiers.invalidate_range_start(NotifierRange::new(
        mm.id,
        range,
        NotifierEvent::Clear,
        Some(vma.info()),
    ));
    let mut tlb = TlbGather::new(mm);
    let mut c = st.pt.cursor(range, WalkMode::Lookup);
    while let Some(slot) = c.next() {
        match slot {
            // Hugetlb folios (the only ones PUD leaves map) are never split.
            Slot::Hole(_) | Slot::Pud(_) => {}
            Slot::Pmd(p) => {
                let leaf = p.get();
                if !matches!(leaf, Pte::Migration { .. }) && maps_folio(leaf, head, nr) {
                    let base = p.range().start();
                    c.unlock();
                    split_pmd(mm, &st.pt, Some(vma.info()), base, &mut tlb);
                    c.again();
                }
            }
            Slot::Pte(p) => {
                let entry = p.get();
                if !maps_folio(entry, head, nr) {
                    continue;
                }
                let (target, flags, writable, present) = match entry {
                    Pte::Present { pfn, flags } => (
                        MigrationPfn::Cpu(pfn),
                        flags,
                        flags.contains(PteFlags::WRITE),
                        true,
                    ),
                    Pte::DeviceExclusive { pfn, flags } => {
                        (MigrationPfn::Cpu(pfn), flags, false, false)
                    }
                    Pte::DevicePrivate { pfn, flags } => (
                        MigrationPfn::Device(pfn),
                        flags,
                        flags.contains(PteFlags::WRITE),
                        false,
                    ),
                    Pte::Migration { .. } | Pte::None | Pte::Swap { .. } => continue,
                };
                // folio_try_share_anon_rmap_pte: the page's exclusivity moves into the
                // entry (the folio is not pinned, or it would not be split).
                let page = phys.frame_nr(target.nr());
                let exclusive = page.anon_exclusive();
                if exclusive {
                    page.clear_anon_exclusive();
                }
                let kind = MigrationKind::for_mapping(writable, exclusive);
                let keep = flags & PteFlags::CARRIED;
                p.set(Pte::Migration {
                    pfn: target,
                    kind,
                    flags: keep,
                });
                if flags.contains(PteFlags::DIRTY) {
                    head.meta().set_flags(FrameFlags::DIRTY);
                }
                phys.frame_nr(target.nr()).meta().dec_mapcount();
                match target {
                    MigrationPfn::Cpu(pfn) => tlb.defer_put(pfn),
                    MigrationPfn::Device(pfn) => tlb.defer_put_device(pfn),
                }
                if present {
                    tlb.add_range(VaRange::page_of(p.va()));
                }
            }
        }
    }
    drop(c);
    tlb.finish();
    inv.end();
}

/// `remove_migration_pte`: the migration entries of `range` for the folio at `head`
/// become mappings again, of the split pages if the split went through, else of the
/// folio. With `zero_unused`, a page that holds only zeros is mapped by the shared zero
/// page instead (`try_to_map_unused_to_zeropage`), keeping the entry's soft-dirty and
/// uffd-wp bits; it takes no reference, so the split frees the page.
fn remap_after_split(
    phys: &crate::phys::PhysMem,
    st: &MmState,
    vma: &Vma,
    range: VaRange,
    head: FrameRef<'_>,
    nr: u64,
    zero_unused: bool,
) {
    let mut c = st.pt.cursor(range, WalkMode::Lookup);
    while let Some(slot) = c.next() {
        let Slot::Pte(p) = slot else { continue };
        let entry = p.get();
        let Pte::Migration { flags, .. } = entry else {
            continue;
        };
        if !maps_folio(entry, head, nr) {
            continue;
        }
        let page = phys.frame_nr(entry.frame_nr().expect("a migration entry names a frame"));
        if zero_unused && page.is_zero() {
            let mut f = PteFlags::YOUNG | (flags & PteFlags::STICKY);
            if !vma.is_accessible() {
                f |= PteFlags::PROTNONE;
            }
            p.set(Pte::Present {
                pfn: phys.zero_pfn(),
                flags: f,
            });
            continue;
        }
        p.set(crate::migrate::remap_entry(vma, entry, page, Huge::Pte));
    }
}

impl Mm {
    /// Queues the THP at `head` for a split after this operation: part of it was unmapped
    /// (`deferred_split_folio`). The queue holds a reference.
    pub(super) fn defer_split(&self, head: Pfn) {
        let mut queue = self.deferred_split.lock();
        if !queue.contains(&head) {
            queue.push(self.phys().frame(head).get().into_raw());
        }
    }

    /// Splits the queued THPs now, with the mmap lock held (`deferred_split_scan`, run
    /// at once instead of under memory pressure). A folio that cannot be split (pinned,
    /// locked, referenced) stays whole.
    pub(super) fn deferred_split_scan(&self, st: &MmState) {
        let queued = std::mem::take(&mut *self.deferred_split.lock());
        for pfn in queued {
            let folio = crate::phys::Frame::from_raw(self.phys(), pfn);
            if folio.meta().refcount() == 1 {
                // Unmapped meanwhile: nothing to split.
                self.release_frame(folio);
            } else {
                split_folio(self, st, folio);
            }
        }
    }
}
