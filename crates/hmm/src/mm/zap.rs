//! Clearing entries over a range (`zap_page_range`, `unmap_page_range`), shared by munmap,
//! madvise(DONTNEED) and teardown.

use crate::addr::VaRange;
use crate::pgtable::{Huge, PageTable, Pte, PteFlags, Slot};
use crate::phys::FrameFlags;

use super::thp;
use super::tlb::TlbGather;
use super::Mm;
use crate::notifier::VmaInfo;

/// Clears every entry in `range` of `vma`, moving the references they held into `tlb`
/// (released after its flush). The caller has started the notifier invalidation. A PMD leaf
/// that `range` covers only in part is split first (with its own CLEAR invalidation).
#[doc(alias = "zap_pte_range")]
pub(crate) fn zap_range(
    mm: &Mm,
    pt: &PageTable,
    vma: Option<VmaInfo>,
    range: VaRange,
    tlb: &mut TlbGather<'_>,
) {
    let phys = mm.phys();
    let mut c = pt.cursor(range, crate::pgtable::WalkMode::Lookup);
    while let Some(slot) = c.next() {
        match slot {
            Slot::Hole(_) => {}
            Slot::Pte(p) => {
                let page = VaRange::page_of(p.va());
                match p.get() {
                    Pte::None => {}
                    Pte::Present { pfn, flags } => {
                        p.set(Pte::None);
                        if !flags.contains(PteFlags::PROTNONE) {
                            tlb.add_range(page);
                        }
                        if phys.is_zero_pfn(pfn) {
                            continue;
                        }
                        let f = phys.frame(pfn);
                        let folio = f.folio();
                        if flags.contains(PteFlags::DIRTY) {
                            folio.meta().set_flags(FrameFlags::DIRTY);
                        }
                        let left = f.meta().dec_mapcount();
                        if folio.meta().order() > 0
                            && left == 0
                            && folio.meta().entire_mapcount() == 0
                        {
                            // A page of a large folio is no longer mapped: the folio may be
                            // partly mapped now; queue it for a split.
                            mm.defer_split(folio.pfn());
                        }
                        tlb.defer_put(pfn);
                    }
                    Pte::Migration { .. } => {
                        // A migration entry holds no reference; the migrator does.
                        p.set(Pte::None);
                    }
                    Pte::DeviceExclusive { pfn, .. } => {
                        p.set(Pte::None);
                        phys.frame(pfn).meta().dec_mapcount();
                        tlb.defer_put(pfn);
                    }
                    Pte::DevicePrivate { pfn, .. } => {
                        // Not CPU-mapped: nothing to flush. The entry held a reference and
                        // a map count on the device page.
                        p.set(Pte::None);
                        phys.device_frame(pfn).meta().dec_mapcount();
                        tlb.defer_put_device(pfn);
                    }
                    Pte::Swap { slot, .. } => {
                        // free_swap_and_cache: the entry's count on the slot goes.
                        p.set(Pte::None);
                        phys.swap().expect("a swap entry has a device").free(slot);
                    }
                }
            }
            Slot::Pmd(p) | Slot::Pud(p) => {
                let leaf = p.range();
                if !range.contains_range(&leaf) {
                    // Only a THP is cut: hugetlb ranges are checked whole (`check_range`).
                    assert_eq!(p.level(), Huge::Pmd, "a zap cuts a PUD leaf");
                    c.unlock();
                    thp::split_pmd(mm, pt, vma, leaf.start(), tlb);
                    c.again();
                    continue;
                }
                match p.replace(Pte::None) {
                    Pte::None => {}
                    Pte::Present { pfn, flags } => {
                        if !flags.contains(PteFlags::PROTNONE) {
                            tlb.add_range(leaf);
                        }
                        if !phys.is_huge_zero_pfn(pfn) {
                            let fm = phys.frame(pfn).meta();
                            if flags.contains(PteFlags::DIRTY) {
                                fm.set_flags(FrameFlags::DIRTY);
                            }
                            fm.dec_entire_mapcount();
                            tlb.defer_put(pfn);
                        }
                    }
                    Pte::Migration { .. } => {}
                    Pte::DevicePrivate { pfn, .. } => {
                        phys.device_frame(pfn).meta().dec_entire_mapcount();
                        tlb.defer_put_device(pfn);
                    }
                    Pte::DeviceExclusive { .. } | Pte::Swap { .. } => {
                        unreachable!("device-exclusive and swap entries are PTEs")
                    }
                }
            }
        }
    }
}
