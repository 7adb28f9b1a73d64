//! `mremap`: shrink, grow in place, or move a mapping with its entries (the kernel's
//! `mm/mremap.c`).
//!
//! # Moving
//!
//! A move creates the new VMA (same flags; the page offset of the old start, so the
//! reverse map still finds every anonymous page, or for an anonymous VMA that never had a
//! page the new start's, as `copy_vma` re-bases it), then moves the entries under one UNMAP
//! invalidation of the old range (`move_page_tables`): every kind of entry moves as it is —
//! present, PROT_NONE, migration, device-private, device-exclusive — keeping its references
//! and map counts, and is marked soft-dirty. A PMD leaf that the old range covers whole
//! and that lands 2 MiB-aligned moves as a leaf (`move_huge_pmd`); any other is split
//! first. One TLB flush covers the old range. Then the old range is unmapped as by
//! `munmap` (a second UNMAP, now of an empty range), unless `DONTUNMAP` keeps the old VMA,
//! empty, in place.
//!
//! A `MREMAP_FIXED` move of the same length is a batch of such moves, one per VMA in the
//! old range, each to its own offset in the target (Linux 6.17's multi-VMA `remap_move`).
//!
//! Entries are taken from the old range in one walk and installed in a second, so the two
//! cursors never hold page-table locks at once even when the ranges share a table; the
//! mmap lock is held for writing throughout.

use bitflags::bitflags;

use crate::addr::{VaRange, VirtAddr, PAGE_SIZE, PMD_SIZE, TASK_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{Huge, PmdEntry, Pte, PteFlags, Slot, WalkMode};
use crate::prot::VmFlags;

use super::error::MmError;
use super::tlb::TlbGather;
use super::userfaultfd::{remap_prep, UffdEvents};
use super::vma::Vma;
use super::{hugetlb, page_align_len, thp, Mm, MmState, MMAP_BASE, MMAP_MIN_ADDR};

bitflags! {
    /// `MREMAP_*` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct MremapFlags: u32 {
        /// The mapping may move if it cannot grow in place (`MREMAP_MAYMOVE`).
        #[doc(alias = "MREMAP_MAYMOVE")]
        const MAYMOVE = 1 << 0;
        /// Move to exactly `new_addr`, replacing what is there (`MREMAP_FIXED`).
        #[doc(alias = "MREMAP_FIXED")]
        const FIXED = 1 << 1;
        /// Leave the old VMA mapped, emptied (`MREMAP_DONTUNMAP`).
        #[doc(alias = "MREMAP_DONTUNMAP")]
        const DONTUNMAP = 1 << 2;
    }
}

impl Mm {
    /// Resizes and/or moves the mapping at `[old_addr, old_addr + old_len)` to `new_len`
    /// bytes (lengths rounded up to pages); returns its new address.
    ///
    /// Errors, as the kernel's: `Inval` for an unaligned address, a zero new length, an
    /// unknown flag combination (`FIXED` or `DONTUNMAP` without `MAYMOVE`, `DONTUNMAP` with
    /// a length change, `FIXED` without `new_addr`), overlapping old and new ranges, or a
    /// range beyond the address space; `Fault` (EFAULT) if nothing is mapped at
    /// `old_addr`, or if the part that is kept (the first `min(old_len, new_len)` bytes)
    /// of a range that moves or grows is not inside that VMA; `NoMem` if it must move and
    /// may not, or there is no room; `Perm` for a fixed address below [`MMAP_MIN_ADDR`].
    /// A shrink in place unmaps the tail as `munmap` does, holes and further VMAs
    /// included, as the kernel checks VMA boundaries only when it moves or grows. A
    /// `FIXED` move that keeps the length may span several VMAs and the holes between
    /// them, as since Linux 6.17 (`remap_move`): each VMA's part lands at its own offset in
    /// the target, and the range must begin inside a VMA (`Fault` otherwise). Every check
    /// runs before anything changes (the kernel unmaps the `FIXED` target before it checks
    /// the old VMA).
    #[doc(alias = "do_mremap")]
    pub fn mremap(
        &self,
        old_addr: VirtAddr,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
        new_addr: Option<VirtAddr>,
    ) -> Result<VirtAddr, MmError> {
        let mut uf = UffdEvents::default();
        let r = self.mremap_locked(old_addr, old_len, new_len, flags, new_addr, &mut uf);
        uf.send();
        r
    }

    /// [`mremap`](Self::mremap) with its userfaultfd events (remap, unmap) collected, to
    /// send once the mmap lock is dropped.
    fn mremap_locked(
        &self,
        old_addr: VirtAddr,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
        new_addr: Option<VirtAddr>,
        uf: &mut UffdEvents,
    ) -> Result<VirtAddr, MmError> {
        let inval = |what| MmError::Inval { what };
        let maymove = flags.contains(MremapFlags::MAYMOVE);
        let fixed = flags.contains(MremapFlags::FIXED);
        let dontunmap = flags.contains(MremapFlags::DONTUNMAP);
        if (fixed || dontunmap) && !maymove {
            return Err(inval(
                "MREMAP_FIXED and MREMAP_DONTUNMAP need MREMAP_MAYMOVE",
            ));
        }
        if !old_addr.is_page_aligned() {
            return Err(inval("unaligned old address"));
        }
        let (Some(old_len), Some(new_len)) = (page_align_len(old_len), page_align_len(new_len))
        else {
            return Err(inval("length overflows"));
        };
        if new_len == 0 || old_len == 0 {
            return Err(inval("zero length"));
        }
        if dontunmap && old_len != new_len {
            return Err(inval("MREMAP_DONTUNMAP cannot change the length"));
        }
        let old = VaRange::from_len(old_addr, old_len)
            .ok()
            .filter(|r| r.end().as_u64() <= TASK_SIZE)
            .ok_or(inval("old range beyond the address space"))?;
        let target = if fixed {
            let a = new_addr.ok_or(inval("MREMAP_FIXED needs an address"))?;
            if !a.is_page_aligned() {
                return Err(inval("unaligned new address"));
            }
            let r = VaRange::from_len(a, new_len)
                .ok()
                .filter(|r| r.end().as_u64() <= TASK_SIZE)
                .ok_or(inval("new range beyond the address space"))?;
            if r.overlaps(&old) {
                return Err(inval("old and new ranges overlap"));
            }
            if a.as_u64() < MMAP_MIN_ADDR {
                return Err(MmError::Perm {
                    what: "address below mmap_min_addr",
                });
            }
            Some(r)
        } else {
            None
        };
        let mut st = self.lock.write();
        if let Some(target) = target.filter(|_| old_len == new_len) {
            return self.remap_move(&mut st, old, target, dontunmap, uf);
        }
        let vma = st
            .vmas
            .find(old_addr)
            .cloned()
            .ok_or(MmError::Fault { addr: old_addr })?;
        if hugetlb::is_hugetlb(&vma) {
            return Err(inval("mremap of hugetlb memory"));
        }
        // What stays mapped must lie in the VMA at `old_addr` (`vma_to_resize`); a
        // shrinking tail is unmapped as by `munmap`, holes and other VMAs included.
        let keep = old_len.min(new_len);
        let kept = VaRange::from_len(old_addr, keep).expect("inside old");
        let moves_or_grows = target.is_some() || dontunmap || new_len > old_len;
        if moves_or_grows && !vma.range().contains_range(&kept) {
            return Err(MmError::Fault { addr: old_addr });
        }
        let tail = VaRange::new(kept.end(), old.end()).ok();
        if let Some(tail) = tail {
            hugetlb::check_range(&st.vmas, tail)?;
        }
        if let Some(target) = target {
            hugetlb::check_range(&st.vmas, target)?;
            self.do_munmap(&mut st, target, uf);
            if let Some(tail) = tail {
                self.do_munmap(&mut st, tail, uf);
            }
            return Ok(self.move_vma(&mut st, &vma, kept, target, dontunmap, uf));
        }
        if !dontunmap && new_len <= old_len {
            if let Some(tail) = tail {
                self.do_munmap(&mut st, tail, uf);
            }
            return Ok(old_addr);
        }
        // Grow in place if the old range ends the VMA and the space after it is free.
        let grown = VaRange::from_len(old_addr, new_len)
            .ok()
            .filter(|r| r.end().as_u64() <= TASK_SIZE);
        if !dontunmap && old.end() == vma.end() {
            if let Some(grown) = grown {
                let extra = VaRange::new(old.end(), grown.end()).expect("growth");
                if st.vmas.overlapping(extra).next().is_none() {
                    st.vmas.extend(vma.start(), grown.end());
                    return Ok(old_addr);
                }
            }
        }
        if !maymove {
            return Err(MmError::NoMem {
                what: "cannot grow in place and MREMAP_MAYMOVE not given",
            });
        }
        let align = if new_len >= PMD_SIZE {
            PMD_SIZE
        } else {
            PAGE_SIZE
        };
        let start = st
            .vmas
            .find_gap_topdown(
                new_len,
                align,
                VirtAddr::new(MMAP_MIN_ADDR),
                VirtAddr::new(MMAP_BASE),
            )
            .ok_or(MmError::NoMem {
                what: "no free gap in the address space",
            })?;
        let target = VaRange::from_len(start, new_len).expect("gap");
        Ok(self.move_vma(&mut st, &vma, old, target, dontunmap, uf))
    }

    /// A `MREMAP_FIXED` move that keeps the length (`remap_move`, Linux 6.17): `old` may
    /// span several VMAs and the holes between them. The part of each VMA inside `old`
    /// moves to the same offset in `target`, the part of `target` under it unmapped first;
    /// the parts of `target` under `old`'s holes are left as they are, so the moved VMAs
    /// keep their gaps. `old` must begin inside a VMA (`Fault`). Every check runs before
    /// anything changes (the kernel checks each VMA just before moving it, so an error
    /// there leaves the VMAs before it moved), except the kernel's own per-VMA check of a
    /// move over several VMAs, kept as the kernel has it because its selftest asserts the
    /// partial move: a userfaultfd-armed VMA cannot be part of one (`vma_multi_allowed`:
    /// its remap event would need the lock dropped between VMAs), so the move stops there
    /// with `Fault`, the VMAs before it moved (none if it is the first).
    fn remap_move(
        &self,
        st: &mut MmState,
        old: VaRange,
        target: VaRange,
        dontunmap: bool,
        uf: &mut UffdEvents,
    ) -> Result<VirtAddr, MmError> {
        let pieces: Vec<VaRange> = st
            .vmas
            .overlapping(old)
            .filter_map(|v| v.range().intersect(&old))
            .collect();
        if pieces.first().map(VaRange::start) != Some(old.start()) {
            return Err(MmError::Fault { addr: old.start() });
        }
        let to = |p: &VaRange| {
            let offset = p.start().offset_from(old.start()).expect("inside old");
            VaRange::from_len(target.start() + offset, p.npages() * PAGE_SIZE)
                .expect("inside target")
        };
        for p in &pieces {
            if st.vmas.find(p.start()).is_some_and(hugetlb::is_hugetlb) {
                return Err(MmError::Inval {
                    what: "mremap of hugetlb memory",
                });
            }
            hugetlb::check_range(&st.vmas, to(p))?;
        }
        let multi = pieces.len() > 1;
        for p in &pieces {
            let armed = st
                .vmas
                .find(p.start())
                .is_some_and(|v| v.flags().intersects(VmFlags::UFFD));
            if multi && armed {
                return Err(MmError::Fault { addr: p.start() });
            }
            let dest = to(p);
            self.do_munmap(st, dest, uf);
            // Looked up again: the move before this one may have merged VMAs.
            let vma = st.vmas.find(p.start()).cloned().expect("a piece is mapped");
            self.move_vma(st, &vma, *p, dest, dontunmap, uf);
        }
        Ok(target.start())
    }

    /// Moves `old` (inside `vma`) to the free range `target` (at least as long); see the
    /// module docs.
    fn move_vma(
        &self,
        st: &mut MmState,
        vma: &Vma,
        old: VaRange,
        target: VaRange,
        dontunmap: bool,
        uf: &mut UffdEvents,
    ) -> VirtAddr {
        let mut new = vma.moved(old.start(), target);
        // mremap_userfaultfd_prep: without remap events the moved VMA leaves its
        // userfaultfd, and its entries lose the uffd-wp bit.
        let remap = remap_prep(&mut new);
        let keep_wp = new.flags().contains(VmFlags::UFFD_WP);
        st.vmas.insert(new);
        let inv = self.notifiers.invalidate_range_start(NotifierRange::new(
            self.id,
            old,
            NotifierEvent::Unmap,
            Some(vma.info()),
        ));
        let mut tlb = TlbGather::new(self);
        let taken = take_entries(self, st, vma, old, target.start(), &mut tlb);
        put_entries(st, target, taken, keep_wp);
        tlb.finish();
        inv.end();
        if let Some(ctx) = remap {
            uf.remap(ctx, old, target.start());
        }
        if !dontunmap {
            self.do_munmap(st, old, uf);
        }
        target.start()
    }
}

/// Clears every entry of `old` and returns them with their offsets from its start. A PMD
/// leaf moves whole if `old` covers it and it lands aligned at `new_start`; any other is
/// split first.
fn take_entries(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    old: VaRange,
    new_start: VirtAddr,
    tlb: &mut TlbGather<'_>,
) -> Vec<(u64, Pte, Huge)> {
    let mut out = Vec::new();
    let mut c = st.pt.cursor(old, WalkMode::Lookup);
    while let Some(slot) = c.next() {
        match slot {
            Slot::Hole(_) => {}
            Slot::Pte(p) => {
                let e = p.replace(Pte::None);
                if !e.is_none() {
                    if e.is_accessible() {
                        tlb.add_range(VaRange::page_of(p.va()));
                    }
                    let off = p.va().offset_from(old.start()).expect("inside");
                    out.push((off, e, Huge::Pte));
                }
            }
            Slot::Pmd(p) => {
                let leaf = p.range();
                let off = leaf.start().offset_from(old.start());
                let whole = old.contains_range(&leaf)
                    && off
                        .and_then(|o| new_start.checked_add(o))
                        .is_some_and(|to| to.is_aligned(PMD_SIZE));
                if whole {
                    let e = p.replace(Pte::None);
                    if e.is_accessible() {
                        tlb.add_range(leaf);
                    }
                    if !e.is_none() {
                        out.push((off.expect("whole"), e, Huge::Pmd));
                    }
                } else {
                    c.unlock();
                    thp::split_pmd(mm, &st.pt, Some(vma.info()), leaf.start(), tlb);
                    c.again();
                }
            }
            Slot::Pud(_) => unreachable!("mremap of hugetlb memory is refused"),
        }
    }
    out
}

/// Installs the taken entries at the same offsets in `target`, without their uffd-wp
/// bits unless `keep_wp`.
fn put_entries(st: &MmState, target: VaRange, taken: Vec<(u64, Pte, Huge)>, keep_wp: bool) {
    let mut c = st.pt.cursor(target, WalkMode::Populate);
    for (off, e, level) in taken {
        let to = target.start().checked_add(off).expect("inside target");
        let e = soft_dirty(e);
        let e = if keep_wp { e } else { e.with_uffd_wp(false) };
        match level {
            Huge::Pte => {
                c.seek(to);
                let Some(Slot::Pte(p)) = c.next() else {
                    unreachable!("the target holds no leaf where a PTE lands")
                };
                debug_assert!(p.get().is_none(), "target range was unmapped");
                p.set(e);
            }
            Huge::Pmd => {
                c.unlock();
                let pmd = st.pt.lock_pmd(to, WalkMode::Populate).expect("populate");
                match pmd.get() {
                    PmdEntry::Table => pmd.collapse(e),
                    PmdEntry::None => pmd.set_leaf(e),
                    PmdEntry::Leaf(l) => unreachable!("target range holds a leaf {l:?}"),
                }
            }
            Huge::Pud => unreachable!("mremap of hugetlb memory is refused"),
        }
    }
}

/// The entry with its soft-dirty bit set (`move_soft_dirty_pte`).
fn soft_dirty(e: Pte) -> Pte {
    e.map_flags(|f| f | PteFlags::SOFT_DIRTY)
}
