//! `madvise`: DONTNEED, FREE, HUGEPAGE, NOHUGEPAGE, COLLAPSE, POPULATE_READ, POPULATE_WRITE,
//! DONTFORK, DOFORK.

use crate::addr::{VaRange, VirtAddr};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
use crate::phys::FrameFlags;
use crate::prot::VmFlags;

use super::error::MmError;
use super::tlb::TlbGather;
use super::vma::Vma;
use super::{hugetlb, page_align_len, thp, zap, Mm, MmState};

/// Advice for [`Mm::madvise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages now (CLEAR per VMA); private anonymous memory reads
    /// back as zeros, shared memory keeps its contents in the shared object. Mmap lock
    /// held for reading.
    #[doc(alias = "MADV_DONTNEED")]
    DontNeed,
    /// `MADV_FREE`: private anonymous pages may be discarded instead of kept, unless written
    /// again first. Entries are made clean and old and exclusive folios marked lazy-free
    /// (CLEAR per VMA); [`Mm::reclaim_lazyfree`] discards the ones still clean. `Inval` on
    /// shared memory. Mmap lock held for reading.
    #[doc(alias = "MADV_FREE")]
    Free,
    /// `MADV_HUGEPAGE`: allow THPs on fault in [`ThpMode::Madvise`](super::ThpMode).
    #[doc(alias = "MADV_HUGEPAGE")]
    HugePage,
    /// `MADV_NOHUGEPAGE`: no THPs on fault; existing ones stay.
    #[doc(alias = "MADV_NOHUGEPAGE")]
    NoHugePage,
    /// `MADV_COLLAPSE`: make every aligned 2 MiB of private anonymous memory one THP now,
    /// copying its bytes. Fails with `Again` for pinned, referenced or locked pages,
    /// `Inval` for an empty PMD, a non-present entry or no eligible range, `NoMem` when no
    /// THP can be allocated (the last failure wins; the other ranges are still collapsed).
    #[doc(alias = "MADV_COLLAPSE")]
    Collapse,
    /// `MADV_POPULATE_READ`: fault every page in readable, as a read would, without
    /// touching the bytes (the shared zero page for untouched private anonymous memory).
    /// `Inval` for a mapping without read permission; `Fault` where a read would raise
    /// SIGBUS. Mmap lock held for reading, one PMD-sized piece at a time.
    #[doc(alias = "MADV_POPULATE_READ")]
    PopulateRead,
    /// `MADV_POPULATE_WRITE`: fault every page in writable, as a write would (COW is
    /// broken, pages become dirty and soft-dirty), without changing the bytes. `Inval`
    /// for a mapping without write permission; `Fault` where a write would raise SIGBUS.
    #[doc(alias = "MADV_POPULATE_WRITE")]
    PopulateWrite,
    /// `MADV_DONTFORK`: a child created by [`Mm::fork`] does not get the range at all, so
    /// the parent's pages are never shared copy-on-write with it. What drivers ask of
    /// buffers a device writes into: a fork in the middle of a transfer must not leave
    /// the device writing into a page the parent no longer maps.
    #[doc(alias = "MADV_DONTFORK")]
    DontFork,
    /// `MADV_DOFORK`: undoes [`DontFork`](Self::DontFork).
    #[doc(alias = "MADV_DOFORK")]
    DoFork,
    /// `MADV_COLD`: the range's pages are aged (their accessed bits cleared), so reclaim
    /// writes them out first. `Inval` on hugetlb memory. Mmap lock held for reading.
    #[doc(alias = "MADV_COLD")]
    Cold,
    /// `MADV_PAGEOUT`: the range's anonymous pages that only this address space maps are
    /// written to swap now (a THP split first); with no swap device, nothing happens.
    /// `Inval` on hugetlb memory. Mmap lock held for reading.
    #[doc(alias = "MADV_PAGEOUT")]
    PageOut,
}

impl Mm {
    /// Gives advice about `[addr, addr + len)` (len rounded up to pages).
    ///
    /// Errors: `Inval` for an unaligned address, a range that overflows, or advice the
    /// memory does not support; `NoMem` for a range not entirely mapped; for the populate
    /// advice also `Fault` where the fault raises SIGBUS or SIGSEGV. Unlike Linux,
    /// which applies the advice to the mapped parts and then fails, a range with a hole
    /// changes nothing (see DESIGN.md).
    #[doc(alias = "do_madvise")]
    pub fn madvise(&self, addr: VirtAddr, len: u64, advice: Advice) -> Result<(), MmError> {
        if !addr.is_page_aligned() {
            return Err(MmError::Inval {
                what: "unaligned address",
            });
        }
        if len == 0 {
            return Ok(());
        }
        let range = page_align_len(len)
            .and_then(|l| VaRange::from_len(addr, l).ok())
            .ok_or(MmError::Inval {
                what: "range overflows the address space",
            })?;
        let unmapped = MmError::NoMem {
            what: "range not fully mapped",
        };
        match advice {
            Advice::DontNeed | Advice::Free => {
                let check = |st: &MmState| -> Result<(), MmError> {
                    if st.vmas.first_hole(range).is_some() {
                        return Err(unmapped);
                    }
                    hugetlb::check_dontneed(&st.vmas, range)?;
                    if advice == Advice::Free
                        && st.vmas.overlapping(range).any(|v| !v.is_anonymous())
                    {
                        return Err(MmError::Inval {
                            what: "MADV_FREE needs private anonymous memory",
                        });
                    }
                    Ok(())
                };
                // userfaultfd_remove: once the range checks out, the handlers that asked
                // read of it, with no mmap lock held; the checks run again after.
                let armed = {
                    let guard = self.mmap_read();
                    check(&guard.state)?;
                    let armed = guard
                        .state
                        .vmas
                        .overlapping(range)
                        .any(|v| v.uffd().is_some());
                    armed
                };
                if armed {
                    super::userfaultfd::userfaultfd_remove(self, range);
                }
                let guard = self.mmap_read();
                let st = &*guard.state;
                check(st)?;
                let mut tlb = TlbGather::new(self);
                for v in st.vmas.overlapping(range) {
                    let seg = v.range().intersect(&range).expect("overlapping VMA");
                    // Whole hugetlb pages only: the end rounds down.
                    let Some(seg) = hugetlb::dontneed_part(v, seg) else {
                        continue;
                    };
                    let inv = self.notifiers.invalidate_range_start(NotifierRange::new(
                        self.id,
                        seg,
                        NotifierEvent::Clear,
                        Some(v.info()),
                    ));
                    if advice == Advice::DontNeed {
                        zap::zap_range(self, &st.pt, Some(v.info()), seg, &mut tlb);
                    } else {
                        self.free_range(st, v, seg, &mut tlb);
                    }
                    inv.end();
                }
                tlb.finish();
                self.deferred_split_scan(st);
                Ok(())
            }
            Advice::Cold | Advice::PageOut => {
                let guard = self.mmap_read();
                let st = &*guard.state;
                if st.vmas.first_hole(range).is_some() {
                    return Err(unmapped);
                }
                super::vmscan::check_lru_range(st, range)?;
                if advice == Advice::Cold {
                    self.madvise_cold(st, range);
                } else {
                    self.madvise_pageout(st, range);
                }
                Ok(())
            }
            Advice::HugePage | Advice::NoHugePage | Advice::DontFork | Advice::DoFork => {
                let mut st = self.lock.write();
                if st.vmas.first_hole(range).is_some() {
                    return Err(unmapped);
                }
                hugetlb::check_range(&st.vmas, range)?;
                let (set, clear) = match advice {
                    Advice::HugePage => (VmFlags::HUGEPAGE, VmFlags::NOHUGEPAGE),
                    Advice::NoHugePage => (VmFlags::NOHUGEPAGE, VmFlags::HUGEPAGE),
                    Advice::DontFork => (VmFlags::DONTCOPY, VmFlags::empty()),
                    _ => (VmFlags::empty(), VmFlags::DONTCOPY),
                };
                thp::split_at_vma_bounds(self, &st, range);
                st.vmas.update_flags(range, |f| (f - clear) | set);
                Ok(())
            }
            Advice::PopulateRead | Advice::PopulateWrite => {
                if self.mmap_read().state.vmas.first_hole(range).is_some() {
                    return Err(unmapped);
                }
                self.populate(range, advice == Advice::PopulateWrite)
            }
            Advice::Collapse => {
                let st = self.lock.write();
                if st.vmas.first_hole(range).is_some() {
                    return Err(unmapped);
                }
                let r = thp::collapse(self, &st, range);
                self.deferred_split_scan(&st);
                r
            }
        }
    }

    /// `madvise_free_pte_range` over `range` of `vma`: exclusive folios become lazy-free and
    /// their entries clean and old; a THP the range covers only in part is split first.
    fn free_range(&self, st: &MmState, vma: &Vma, range: VaRange, tlb: &mut TlbGather<'_>) {
        let phys = self.phys();
        let mut c = st.pt.cursor(range, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (old, r) = match &slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.get(), VaRange::page_of(p.va())),
                Slot::Pmd(p) => (p.get(), p.range()),
                Slot::Pud(_) => unreachable!("MADV_FREE is refused on hugetlb memory"),
            };
            if matches!(slot, Slot::Pmd(_)) && !range.contains_range(&r) {
                c.unlock();
                thp::split_pmd(self, &st.pt, Some(vma.info()), r.start(), tlb);
                c.again();
                continue;
            }
            let Pte::Present { pfn, flags } = old else {
                continue;
            };
            if phys.is_zero_pfn(pfn) || phys.is_huge_zero_pfn(pfn) {
                continue;
            }
            let page = phys.frame(pfn);
            let fm = page.folio().meta();
            if !page.anon_exclusive() {
                continue;
            }
            fm.clear_flags(FrameFlags::DIRTY);
            fm.set_flags(FrameFlags::LAZYFREE);
            let new = Pte::Present {
                pfn,
                flags: flags - PteFlags::DIRTY - PteFlags::YOUNG,
            };
            if new != old {
                match slot {
                    Slot::Pte(p) => p.set(new),
                    Slot::Pmd(p) => p.set(new),
                    Slot::Hole(_) | Slot::Pud(_) => unreachable!(),
                }
                tlb.add_range(r);
            }
        }
    }

    /// Discards lazy-free pages (`MADV_FREE`) that have not been written since, as reclaim
    /// would under memory pressure: each such entry is cleared under a one-entry CLEAR
    /// invalidation and the folio freed; later reads see zeros. Returns the pages
    /// discarded. A page written after `MADV_FREE` (a dirty entry, or a dirty folio: a
    /// device wrote it and its driver called [`FrameRef::mark_dirty`]) or pinned loses its
    /// lazy-free mark and is kept.
    ///
    /// As in `try_to_unmap_one`, the decision is made after the invalidation has begun:
    /// from then on no mirror can map the page or write it, so a device write that lands
    /// before the check is seen and one after it is impossible.
    ///
    /// [`FrameRef::mark_dirty`]: crate::phys::FrameRef::mark_dirty
    #[doc(alias = "shrink_folio_list")]
    pub fn reclaim_lazyfree(&self) -> u64 {
        let guard = self.mmap_read();
        let st = &*guard.state;
        let phys = self.phys();
        let mut discarded = 0;
        let mut tlb = TlbGather::new(self);
        for v in st.vmas.iter().filter(|v| v.is_anonymous()) {
            let mut c = st.pt.cursor(v.range(), WalkMode::Lookup);
            while let Some(slot) = c.next() {
                let (entry, r) = match &slot {
                    // Hugetlb memory (the only PUD leaves) is never lazy-free.
                    Slot::Hole(_) | Slot::Pud(_) => continue,
                    Slot::Pte(p) => (p.get(), VaRange::page_of(p.va())),
                    Slot::Pmd(p) => (p.get(), p.range()),
                };
                let Pte::Present { pfn, flags } = entry else {
                    continue;
                };
                if phys.is_zero_pfn(pfn) || phys.is_huge_zero_pfn(pfn) {
                    continue;
                }
                let fm = phys.frame(pfn).folio().meta();
                if !fm.flags().contains(FrameFlags::LAZYFREE) {
                    continue;
                }
                let discardable = || {
                    !flags.contains(PteFlags::DIRTY)
                        && !fm.flags().contains(FrameFlags::DIRTY)
                        && fm.pincount() == 0
                };
                if !discardable() {
                    fm.clear_flags(FrameFlags::LAZYFREE);
                    continue;
                }
                // try_to_unmap with the CLEAR event, one entry at a time.
                c.unlock();
                let inv = self.notifiers.invalidate_range_start(NotifierRange::new(
                    self.id,
                    r,
                    NotifierEvent::Clear,
                    Some(v.info()),
                ));
                if let Some(slot) = c.current() {
                    let (now, huge) = match &slot {
                        Slot::Pte(p) => (p.get(), false),
                        Slot::Pmd(p) => (p.get(), true),
                        Slot::Hole(_) | Slot::Pud(_) => (Pte::None, false),
                    };
                    if now == entry && !discardable() {
                        // Written (by a device) or pinned since the first look.
                        fm.clear_flags(FrameFlags::LAZYFREE);
                    } else if now == entry {
                        match slot {
                            Slot::Pte(p) => p.set(Pte::None),
                            Slot::Pmd(p) => p.set(Pte::None),
                            Slot::Hole(_) | Slot::Pud(_) => unreachable!(),
                        }
                        if huge {
                            fm.dec_entire_mapcount();
                        } else {
                            phys.frame(pfn).meta().dec_mapcount();
                        }
                        tlb.add_range(r);
                        tlb.defer_put(pfn);
                        discarded += r.npages();
                    }
                }
                c.unlock();
                inv.end();
            }
        }
        tlb.finish();
        discarded
    }
}
