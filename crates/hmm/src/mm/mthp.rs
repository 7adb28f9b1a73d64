//! Multi-size THP for anonymous memory: folios of 16 KiB to 1 MiB (orders 2 to 8) mapped
//! by PTEs (the kernel's `alloc_anon_folio`, Linux 6.8).
//!
//! * **Controls.** Each size has its own setting ([`MthpMode`], the kernel's
//!   `/sys/kernel/mm/transparent_hugepage/hugepages-<size>kB/enabled`), per address space
//!   here as [`ThpMode`](super::ThpMode) is: `Always`, `Madvise` (only with
//!   `MADV_HUGEPAGE`), `Inherit` (follow the PMD-size [`ThpMode`](super::ThpMode)) or
//!   `Never`, the default for every size, as in the kernel. `MADV_NOHUGEPAGE` turns every
//!   size off for its VMA.
//! * **Fault.** A write to an empty PTE of a private anonymous VMA tries the enabled sizes
//!   from the largest: the naturally aligned range around the address must lie inside the
//!   VMA and hold only empty PTEs, and the VMA must not be registered with userfaultfd
//!   (whose handler resolves faults a page at a time). The folio is allocated and zeroed
//!   with no lock held; under the page-table lock the range must still be empty (else
//!   the folio is dropped and the access retried, as the kernel's `pte_range_none`
//!   check sends it back); then every PTE maps its page writable and dirty, each page
//!   anon-exclusive with its own map count, and the folio holds one reference per PTE. A
//!   failed allocation counts a fallback and tries the next size, down to one page. A read
//!   fault still maps the zero page.
//! * **khugepaged** ([`Mm::khugepaged_scan`]) collapses into these sizes where the PMD
//!   size is not allowed but a smaller one is (Nico Pache's mTHP khugepaged series, in
//!   the mm tree): each naturally aligned window of an enabled size, from the largest,
//!   whose empty entries are within `max_ptes_none` scaled down to the window
//!   (`max_ptes_none >> (9 - order)`: 511 allows all but one empty, 0 none), with a
//!   recently accessed page, no swap entry, no page another address space maps, and no
//!   page of a folio already that large, is copied into one new folio of that size under
//!   a CLEAR invalidation of the window, with the mmap lock held for writing, as a PMD
//!   collapse is. A source folio left mapped in part goes on the deferred-split queue.
//! * **Afterwards** the pages are PTE-mapped pages of a large folio, as the pages of a THP
//!   whose PMD was split are: copy on write copies one page, zap and `munmap` drop
//!   mappings page by page, fork shares them (copying the pinned ones), `mremap` and
//!   `mprotect` move and change PTEs, and whatever must act on a whole folio (migration,
//!   pageout, `UFFDIO_MOVE`) splits it first (`split_folio`).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::addr::{Pfn, VaRange, VirtAddr, PAGE_SIZE, PMD_ORDER};
use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
use crate::phys::FrameFlags;
use crate::prot::VmFlags;

use super::error::MmError;
use super::thp::{collapse_copy, collapsed_flags, collapsible_folio, release_collapsed};
use super::tlb::TlbGather;
use super::vma::{Backing, Vma};
use super::{KhugepagedLimits, Mm, MmState, ThpMode};

/// The smallest multi-size THP order for anonymous memory (16 KiB): the kernel allows no
/// order-1 anonymous folio.
pub const MTHP_MIN_ORDER: u32 = 2;
/// The largest multi-size THP order (1 MiB); order 9 is the PMD-size THP.
pub const MTHP_MAX_ORDER: u32 = 8;

/// When anonymous memory gets folios of one size on fault
/// (`/sys/kernel/mm/transparent_hugepage/hugepages-<size>kB/enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[repr(u8)]
pub enum MthpMode {
    /// In every eligible VMA that is not `NOHUGEPAGE`.
    Always,
    /// Only in VMAs with `MADV_HUGEPAGE`.
    Madvise,
    /// As the PMD-size setting ([`ThpMode`]) says.
    Inherit,
    /// Never (the default).
    #[default]
    Never,
}

/// The per-size settings of an address space, orders 2 to 8.
#[derive(Debug)]
pub(crate) struct MthpSettings([AtomicU8; (MTHP_MAX_ORDER - MTHP_MIN_ORDER + 1) as usize]);

impl Default for MthpSettings {
    fn default() -> Self {
        MthpSettings(std::array::from_fn(|_| {
            AtomicU8::new(MthpMode::Never as u8)
        }))
    }
}

impl MthpSettings {
    fn slot(&self, order: u32) -> Option<&AtomicU8> {
        let i = order.checked_sub(MTHP_MIN_ORDER)?;
        self.0.get(i as usize)
    }

    fn get(&self, order: u32) -> Option<MthpMode> {
        Some(match self.slot(order)?.load(Ordering::Relaxed) {
            0 => MthpMode::Always,
            1 => MthpMode::Madvise,
            2 => MthpMode::Inherit,
            _ => MthpMode::Never,
        })
    }

    /// Copies every setting of `other` (a fork child's).
    pub(crate) fn copy_from(&self, other: &MthpSettings) {
        for (a, b) in self.0.iter().zip(&other.0) {
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

impl Mm {
    /// Sets when anonymous memory of this address space gets folios of `2^order` pages on
    /// fault (`echo always > .../hugepages-<4 << order>kB/enabled`).
    ///
    /// Errors: `Inval` for an order outside 2 to 8 (the PMD size is
    /// [`set_thp_mode`](Self::set_thp_mode)'s).
    pub fn set_mthp_mode(&self, order: u32, mode: MthpMode) -> Result<(), MmError> {
        let slot = self.mthp.slot(order).ok_or(MmError::Inval {
            what: "multi-size THP orders are 2 (16 KiB) to 8 (1 MiB)",
        })?;
        slot.store(mode as u8, Ordering::Relaxed);
        Ok(())
    }

    /// The setting of the folio size of `order` pages, or `None` outside 2 to 8.
    pub fn mthp_mode(&self, order: u32) -> Option<MthpMode> {
        self.mthp.get(order)
    }

    pub(crate) fn mthp_settings(&self) -> &MthpSettings {
        &self.mthp
    }
}

/// The multi-size THP orders allowed in `vma`, largest first (`thp_vma_allowable_orders`
/// with the per-size settings): none for anything but a private anonymous VMA, for
/// `MADV_NOHUGEPAGE` and for a userfaultfd-registered VMA.
pub(super) fn allowed_orders(mm: &Mm, vma: &Vma) -> Vec<u32> {
    let flags = vma.flags();
    if !matches!(vma.backing(), Backing::Anon)
        || vma.is_shared()
        || flags.contains(VmFlags::NOHUGEPAGE)
        || vma.uffd().is_some()
    {
        return Vec::new();
    }
    let hugepage = flags.contains(VmFlags::HUGEPAGE);
    let inherited = match mm.thp_mode() {
        ThpMode::Always => true,
        ThpMode::Madvise => hugepage,
        ThpMode::Never => false,
    };
    (MTHP_MIN_ORDER..=MTHP_MAX_ORDER)
        .rev()
        .filter(|&order| match mm.mthp.get(order) {
            Some(MthpMode::Always) => true,
            Some(MthpMode::Madvise) => hugepage,
            Some(MthpMode::Inherit) => inherited,
            Some(MthpMode::Never) | None => false,
        })
        .collect()
}

/// The folio orders a write fault at `addr` of `vma` may allocate, largest first, each
/// with its naturally aligned range ([`allowed_orders`], then `thp_vma_suitable_order`).
pub(super) fn fault_orders(mm: &Mm, vma: &Vma, addr: VirtAddr) -> Vec<(u32, VaRange)> {
    allowed_orders(mm, vma)
        .into_iter()
        .filter_map(|order| {
            let len = PAGE_SIZE << order;
            let r = VaRange::from_len(addr.align_down(len), len).ok()?;
            vma.range().contains_range(&r).then_some((order, r))
        })
        .collect()
}

/// khugepaged's collapse of the aligned `window` of `vma` into one folio of `order` (the
/// mTHP collapse of `collapse_huge_page`), with the mmap lock held for writing: see the
/// module's notes for when it refuses. Returns whether it made one.
pub(super) fn collapse_window(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    window: VaRange,
    order: u32,
    limits: &KhugepagedLimits,
) -> Result<bool, MmError> {
    let phys = mm.phys();
    let n = 1usize << order;
    let again = |what| Err(MmError::Again { what });
    let ptes: Vec<Pte> = {
        let mut c = st.pt.cursor(window, WalkMode::Lookup);
        c.set_batch(true);
        match c.next() {
            Some(Slot::Pte(p)) if p.len() == n => (0..n).map(|i| p.get_at(i)).collect(),
            // No table, or a PMD leaf: nothing of this kind to collapse.
            _ => return Ok(false),
        }
    };
    let mut none = 0u64;
    let mut present = 0u64;
    let mut young = 0u64;
    for pte in &ptes {
        match *pte {
            Pte::None => none += 1,
            Pte::Present { pfn, .. } if phys.is_zero_pfn(pfn) => none += 1,
            Pte::Present { pfn, flags } => {
                if flags.contains(PteFlags::YOUNG) {
                    young += 1;
                }
                let page = phys.frame(pfn);
                let folio = page.folio();
                let fm = folio.meta();
                if !fm.flags().contains(FrameFlags::ANON) {
                    return again("a page that is not anonymous");
                }
                if fm.order() >= order {
                    // Already a folio this large (or larger) here.
                    return Ok(false);
                }
                if page.meta().mapcount() + fm.entire_mapcount() > 1 {
                    return again("a page mapped elsewhere too (no shared pages in mTHP collapse)");
                }
                present += 1;
            }
            Pte::Swap { .. } => return again("a swap entry (no swap-in in mTHP collapse)"),
            _ => return again("a non-present entry"),
        }
        if pte.is_uffd_wp() {
            return again("a userfaultfd write-protected page");
        }
    }
    let max_none = limits.max_ptes_none >> (PMD_ORDER - order);
    if present == 0 || none > max_none {
        return again("more empty entries than max_ptes_none allows at this size");
    }
    // As the PMD scan asks (SCAN_LACK_REFERENCED_PAGE): a page used lately.
    if young == 0 {
        return again("no recently accessed page");
    }
    // is_refcount_suitable for each source folio, as the PMD collapse checks it.
    let mut checked = Vec::new();
    for pte in &ptes {
        if let Pte::Present { pfn, .. } = *pte {
            if !phys.is_zero_pfn(pfn)
                && !collapsible_folio(phys, phys.frame(pfn).folio(), &mut checked)
            {
                return again("a page is pinned, referenced or locked");
            }
        }
    }
    let (new, inv) = collapse_copy(mm, vma, window, order, &ptes)?;
    let flags = collapsed_flags(vma);
    let mut tlb = TlbGather::new(mm);
    new.meta().get_many(n as u32 - 1);
    let head = new.into_raw();
    {
        let mut c = st.pt.cursor(window, WalkMode::Populate);
        c.set_batch(true);
        let Some(Slot::Pte(p)) = c.next() else {
            unreachable!("the window's table was there a moment ago, under the write lock")
        };
        for i in 0..n {
            let page = phys.frame(Pfn::new(head.as_u64() + i as u64));
            page.set_anon_exclusive();
            page.meta().inc_mapcount();
            p.set_at(
                i,
                Pte::Present {
                    pfn: page.pfn(),
                    flags,
                },
            );
        }
    }
    tlb.add_range(window);
    release_collapsed(mm, &ptes, &mut tlb);
    tlb.finish();
    inv.end();
    Ok(true)
}
