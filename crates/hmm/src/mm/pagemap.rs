//! What `/proc/pid/pagemap` reports per page, and soft-dirty clearing
//! (`/proc/pid/clear_refs` with `4`): the kernel's `fs/proc/task_mmu.c`.
//!
//! Soft-dirty protocol: new VMAs carry `VmFlags::SOFTDIRTY`, so all their pages read as
//! soft-dirty. [`Mm::clear_soft_dirty`] clears the VMA flag and, under one SOFT_DIRTY
//! invalidation covering the whole address space, clears every entry's soft-dirty bit and
//! write-protects present entries; one TLB flush follows. The next write to such a page
//! faults, and the fault sets the bit again (`pte_mkdirty`). While tracking is on, neither
//! `mprotect` nor a shared read fault maps a clean page writable.

use serde::Serialize;

use crate::addr::{Pfn, VaRange, VirtAddr, PAGE_SIZE, PMD_SIZE, USER_VA_END};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{Huge, Pte, PteFlags, Slot, WalkMode};
use crate::phys::FrameFlags;
use crate::prot::VmFlags;

use super::error::MmError;
use super::tlb::TlbGather;
use super::Mm;

/// What a non-present entry is (the swap type the kernel reports for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SwapKind {
    /// A migration entry.
    Migration,
    /// A device-private entry.
    DevicePrivate,
    /// A device-exclusive entry.
    DeviceExclusive,
    /// A page written to swap; the entry's frame number is its slot.
    Swap,
}

/// One page as `/proc/pid/pagemap` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PagemapEntry {
    /// A present entry maps the page (`PM_PRESENT`).
    pub present: bool,
    /// A non-present, non-empty entry (`PM_SWAP`): migration, device-private or
    /// device-exclusive.
    pub swap: Option<SwapKind>,
    /// The frame a present entry maps (`PM_PFRAME_MASK`); for a non-present entry, the
    /// frame or device frame number it refers to.
    pub pfn: Option<u64>,
    /// Soft-dirty: written since the last [`Mm::clear_soft_dirty`] (`PM_SOFT_DIRTY`).
    pub soft_dirty: bool,
    /// The entry is userfaultfd write-protected (`PM_UFFD_WP`).
    pub uffd_wp: bool,
    /// The page is mapped exactly once (`PM_MMAP_EXCLUSIVE`).
    pub exclusive: bool,
    /// A page of a file or shared memory rather than anonymous memory (`PM_FILE`).
    pub file: bool,
    /// The order of the mapping: 0 for a PTE, 9 for a PMD leaf, 18 for a PUD leaf (not in
    /// the kernel's pagemap; `/proc/kpageflags` has `THP` and `HUGE`).
    pub order: u8,
}

impl PagemapEntry {
    /// The kernel's 64-bit encoding: bit 63 present, 62 swap, 61 file, 57 uffd-wp,
    /// 56 exclusive, 55 soft-dirty, bits 0..55 the frame (or, for swap, type in bits 0..5 and offset
    /// above).
    pub fn to_bits(&self) -> u64 {
        let mut w = 0u64;
        if self.present {
            w |= 1 << 63;
        }
        if let Some(kind) = self.swap {
            w |= 1 << 62;
            let ty = match kind {
                SwapKind::Swap => 0,
                SwapKind::Migration => 1,
                SwapKind::DevicePrivate => 2,
                SwapKind::DeviceExclusive => 3,
            };
            w |= ty | (self.pfn.unwrap_or(0) << 5) & ((1 << 55) - 1);
        } else if let Some(pfn) = self.pfn {
            w |= pfn & ((1 << 55) - 1);
        }
        if self.file {
            w |= 1 << 61;
        }
        if self.uffd_wp {
            w |= 1 << 57;
        }
        if self.exclusive {
            w |= 1 << 56;
        }
        if self.soft_dirty {
            w |= 1 << 55;
        }
        w
    }
}

impl Mm {
    /// The pagemap entries of `npages` pages from `addr` (`/proc/pid/pagemap`). Pages
    /// outside VMAs read as all-zero entries, as the kernel reports them.
    ///
    /// As the kernel's `pagemap_read` (`PAGEMAP_WALK_SIZE`), the walk takes the mmap lock
    /// for one PMD-sized piece at a time, so a long read never holds off a `munmap`.
    ///
    /// Errors: `Inval` for an unaligned address, zero pages, or a range beyond the
    /// address space; `NoMem` for more entries than a kvmalloc'd array holds
    /// ([`kvmalloc::max_len`](crate::kvmalloc::max_len)), before anything is read.
    #[doc(alias = "pagemap_read")]
    pub fn pagemap(&self, addr: VirtAddr, npages: u64) -> Result<Vec<PagemapEntry>, MmError> {
        let range = super::page_range(addr, npages)?;
        let mut out =
            crate::kvmalloc::kvmalloc_array(npages, PagemapEntry::default()).map_err(|_| {
                MmError::NoMem {
                    what: "more pagemap entries than a kvmalloc'd array holds",
                }
            })?;
        for piece in range.pieces(PMD_SIZE) {
            let first = range.page_index(piece.start());
            self.pagemap_piece(piece, &mut out[first..first + piece.npages() as usize]);
        }
        Ok(out)
    }

    /// The entries of `range` into `out` (one per page), under the mmap lock.
    fn pagemap_piece(&self, range: VaRange, out: &mut [PagemapEntry]) {
        let guard = self.mmap_read();
        let st = &*guard.state;
        let phys = self.phys();
        for v in st.vmas.overlapping(range) {
            let seg = v.range().intersect(&range).expect("overlapping");
            let vma_dirty = v.flags().contains(VmFlags::SOFTDIRTY);
            let first = range.page_index(seg.start());
            for e in &mut out[first..first + seg.npages() as usize] {
                e.soft_dirty = vma_dirty;
            }
            let mut c = st.pt.cursor(seg, WalkMode::Lookup);
            while let Some(slot) = c.next() {
                let (leaf, entry, level) = match slot {
                    Slot::Hole(_) => continue,
                    Slot::Pte(p) => (VaRange::page_of(p.va()), p.get(), Huge::Pte),
                    Slot::Pmd(p) | Slot::Pud(p) => (p.range(), p.get(), p.level()),
                };
                if entry.is_none() {
                    continue;
                }
                let start = leaf.start();
                let Some(part) = leaf.intersect(&seg) else {
                    continue;
                };
                for va in part.pages() {
                    let sub = va.offset_from(start).expect("inside leaf") / PAGE_SIZE;
                    let e = &mut out[range.page_index(va)];
                    e.order = level.order() as u8;
                    e.soft_dirty |= entry.flags().contains(PteFlags::SOFT_DIRTY);
                    e.uffd_wp = entry.is_uffd_wp();
                    match entry {
                        Pte::None => {}
                        Pte::Present { pfn, .. } => {
                            e.present = true;
                            let page = Pfn::new(pfn.as_u64() + sub);
                            e.pfn = Some(page.as_u64());
                            let zero = phys.is_zero_pfn(pfn) || phys.is_huge_zero_pfn(pfn);
                            if !zero {
                                let meta = phys.frame(page).meta();
                                let folio = phys.frame(page).folio().meta();
                                e.file = !folio.flags().contains(FrameFlags::ANON);
                                e.exclusive = meta.mapcount() + folio.entire_mapcount() == 1;
                            }
                        }
                        Pte::Migration { pfn, .. } => {
                            e.swap = Some(SwapKind::Migration);
                            e.pfn = Some(pfn.nr() + sub);
                            let folio = phys.frame_nr(pfn.nr()).folio();
                            e.file = !folio.meta().flags().contains(FrameFlags::ANON);
                        }
                        Pte::DevicePrivate { pfn, .. } => {
                            e.swap = Some(SwapKind::DevicePrivate);
                            e.pfn = Some(pfn.as_u64() + sub);
                        }
                        Pte::DeviceExclusive { pfn, .. } => {
                            e.swap = Some(SwapKind::DeviceExclusive);
                            e.pfn = Some(pfn.as_u64() + sub);
                        }
                        Pte::Swap { slot, .. } => {
                            e.swap = Some(SwapKind::Swap);
                            e.pfn = Some(slot.as_u64());
                        }
                    }
                }
            }
        }
    }

    /// Clears soft-dirty state for the whole address space (`echo 4 >
    /// /proc/pid/clear_refs`); see the module docs for the protocol.
    #[doc(alias = "clear_refs_write")]
    pub fn clear_soft_dirty(&self) {
        let mut st = self.lock.write();
        let all = VaRange::new(VirtAddr::ZERO, VirtAddr::new(USER_VA_END)).expect("whole space");
        st.vmas.update_flags(all, |f| f - VmFlags::SOFTDIRTY);
        let inv = self.notifiers.invalidate_range_start(NotifierRange::new(
            self.id,
            all,
            NotifierEvent::SoftDirty,
            None,
        ));
        let mut tlb = TlbGather::new(self);
        let mut c = st.pt.cursor(all, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (old, r) = match &slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.get(), VaRange::page_of(p.va())),
                Slot::Pmd(p) | Slot::Pud(p) => (p.get(), p.range()),
            };
            let new = match old {
                Pte::None => continue,
                // Present entries are write-protected too, to see the next write.
                Pte::Present { .. } => {
                    old.map_flags(|f| f - PteFlags::SOFT_DIRTY - PteFlags::WRITE)
                }
                _ => old.map_flags(|f| f - PteFlags::SOFT_DIRTY),
            };
            if new == old {
                continue;
            }
            match slot {
                Slot::Pte(p) => p.set(new),
                Slot::Pmd(p) | Slot::Pud(p) => p.set(new),
                Slot::Hole(_) => unreachable!(),
            }
            if old.is_writable() {
                tlb.add_range(r);
            }
        }
        drop(c);
        tlb.finish();
        inv.end();
    }
}
