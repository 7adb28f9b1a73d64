//! hugetlb mappings (`MAP_HUGETLB`): 2 MiB pages from the pool of
//! [`PhysMem::set_nr_hugepages`](crate::phys::PhysMem::set_nr_hugepages), mapped by PMD
//! leaves that are never split (the kernel's `mm/hugetlb.c`).
//!
//! * `mmap` reserves every page of the mapping in the pool first; an empty or short pool
//!   fails it with ENOMEM and changes nothing. The reservations belong to a hugetlbfs file
//!   behind the mapping (as the kernel's `hugetlb_file_setup`); for a private mapping only
//!   the address space that created it may use them (`HPAGE_RESV_OWNER`).
//! * A fault of either kind allocates a zeroed pool page (there is no huge zero page for
//!   hugetlb): a shared mapping's page goes into the file, a private mapping's page is
//!   anonymous. A private read fault maps it read-only; the write that follows reuses it.
//! * A write to a shared private page (after `fork`) copies all 2 MiB into a page taken
//!   without a reservation (`hugetlb_wp`), under a CLEAR of the 2 MiB; if the pool has none
//!   the access gets SIGBUS, as in Linux.
//! * Operations must not cut a hugetlb page: `munmap`, `mprotect` and `madvise` ranges that
//!   end inside one fail with EINVAL; `mremap` of hugetlb memory is EINVAL.
//! * A hugetlbfs file ([`MemFile::new_hugetlb`](super::MemFile::new_hugetlb), `MFD_HUGETLB`)
//!   maps the same way: a shared mapping's fault takes the file's page (from the pool if
//!   the file has none there yet), a private mapping's read maps the file's page read-only
//!   and its first write copies it (`hugetlb_no_page` then `hugetlb_wp`). Mappings of a
//!   file reserve nothing (unlike Linux, whose mmap reserves the pages); a fault the pool
//!   cannot serve gets SIGBUS.

use crate::addr::{VaRange, VirtAddr, PMD_NR, PMD_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{PmdEntry, Pte, PteFlags, WalkMode};
use crate::phys::{Frame, FrameFlags};
use crate::prot::VmFlags;
use crate::stats::FaultKind;

use super::error::{FaultError, MmError};
use super::fault::{must_unshare, FaultFlags};
use super::thp::dirty_flags;
use super::tlb::TlbGather;
use super::vma::{Backing, Vma, VmaTree};
use super::{Mm, MmState};

/// Whether `vma` is hugetlb memory.
pub(super) fn is_hugetlb(vma: &Vma) -> bool {
    vma.flags().contains(VmFlags::HUGETLB)
}

/// Fails with EINVAL if `range` would cut a hugetlb page of any VMA it overlaps.
pub(super) fn check_range(vmas: &VmaTree, range: VaRange) -> Result<(), MmError> {
    for v in vmas.overlapping(range).filter(|v| is_hugetlb(v)) {
        let cuts = |at: VirtAddr| at > v.start() && at < v.end() && !at.is_aligned(PMD_SIZE);
        if cuts(range.start()) || cuts(range.end()) {
            return Err(MmError::Inval {
                what: "range cuts a hugetlb page",
            });
        }
    }
    Ok(())
}

/// `hugetlb_fault`: resolves a fault at `addr` of hugetlb `vma`.
pub(super) fn fault(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    addr: VirtAddr,
    flags: FaultFlags,
) -> Result<(), FaultError> {
    let write = flags.contains(FaultFlags::WRITE);
    let base = addr.align_down(PMD_SIZE);
    let pmd = st.pt.lock_pmd(base, WalkMode::Populate).expect("populate");
    match pmd.get() {
        PmdEntry::None | PmdEntry::Table => {
            drop(pmd);
            no_page(mm, st, vma, base, write, addr)
        }
        PmdEntry::Leaf(leaf @ Pte::Present { pfn, flags: pf }) => {
            drop(pmd);
            let unshare = flags.contains(FaultFlags::UNSHARE) && must_unshare(mm, vma, pfn, true);
            if (write && !pf.contains(PteFlags::WRITE)) || unshare {
                wp(mm, st, vma, base, leaf, write, addr)
            } else {
                Ok(())
            }
        }
        PmdEntry::Leaf(Pte::Migration { pfn, .. }) => {
            drop(pmd);
            super::fault::wait_on_migration(mm.phys().frame_nr(pfn.nr()).folio());
            mm.counters.fault(FaultKind::MigrationWait);
            Ok(())
        }
        PmdEntry::Leaf(other) => unreachable!("hugetlb leaf {other:?}"),
    }
}

/// `hugetlb_no_page`: a new page for an empty PMD.
fn no_page(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    base: VirtAddr,
    write: bool,
    addr: VirtAddr,
) -> Result<(), FaultError> {
    let Backing::Shmem(obj) = vma.backing() else {
        unreachable!("a hugetlb VMA has its hugetlbfs file")
    };
    let shared = vma.is_shared();
    // A private mapping of a hugetlbfs file (not MAP_HUGETLB's own object) reads the
    // file's page; a write copies it (`hugetlb_wp` below).
    let file_private = !shared && !obj.is_anonymous();
    let pgoff = vma.pgoff_of(base);
    let bus = FaultError::Bus { addr };
    let page = if shared || file_private {
        let (pfn, allocated) = obj.get_page(pgoff).map_err(|_| bus)?;
        if allocated {
            mm.counters.frame_allocated();
        }
        Frame::from_raw(mm.phys(), pfn)
    } else {
        let anon = FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE;
        let page = obj.hugetlb_alloc(pgoff / PMD_NR, mm.id, anon).ok_or(bus)?;
        mm.counters.frame_allocated();
        mm.new_anon_rmap(&page, vma, base);
        page
    };
    let pmd = st.pt.lock_pmd(base, WalkMode::Populate).expect("populate");
    let entry = pmd.get();
    if !matches!(entry, PmdEntry::None | PmdEntry::Table) {
        drop(pmd);
        mm.release_frame(page);
        return Ok(());
    }
    let mut pf = PteFlags::YOUNG;
    let tracking = !vma.flags().contains(VmFlags::SOFTDIRTY);
    let map_write = write && !file_private;
    if vma.flags().contains(VmFlags::WRITE) && (map_write || (shared && !tracking)) {
        pf |= PteFlags::WRITE;
    }
    if map_write {
        pf |= dirty_flags();
    }
    page.meta().inc_entire_mapcount();
    let leaf = Pte::Present {
        pfn: page.into_raw(),
        flags: pf,
    };
    if entry == PmdEntry::Table {
        // An empty table left by earlier small-page memory here.
        pmd.collapse(leaf);
    } else {
        pmd.set_leaf(leaf);
    }
    drop(pmd);
    mm.counters.fault(FaultKind::Hugetlb);
    if write && file_private {
        return wp(mm, st, vma, base, leaf, true, addr);
    }
    Ok(())
}

/// `hugetlb_wp`: a write to a read-only hugetlb leaf, or an unshare request.
fn wp(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    base: VirtAddr,
    orig: Pte,
    write: bool,
    addr: VirtAddr,
) -> Result<(), FaultError> {
    let phys = mm.phys();
    let Pte::Present { pfn, flags } = orig else {
        unreachable!("wp of a present leaf")
    };
    let fm = phys.frame(pfn).meta();
    let anon = fm.flags().contains(FrameFlags::ANON);
    let reuse = vma.is_shared()
        || (anon
            && (fm.flags().contains(FrameFlags::ANON_EXCLUSIVE)
                || (fm.refcount() == 1 && fm.pincount() == 0)));
    if reuse {
        let pmd = st.pt.lock_pmd(base, WalkMode::Lookup).expect("leaf");
        if pmd.get() == PmdEntry::Leaf(orig) {
            if anon {
                fm.set_flags(FrameFlags::ANON_EXCLUSIVE);
            }
            if write {
                pmd.set_leaf(Pte::Present {
                    pfn,
                    flags: flags | PteFlags::WRITE | dirty_flags(),
                });
            }
            mm.counters.fault(FaultKind::WpReuse);
        }
        return Ok(());
    }
    let Backing::Shmem(obj) = vma.backing() else {
        unreachable!("a hugetlb VMA has its hugetlbfs file")
    };
    let old = phys.frame(pfn).get();
    let anon_flags = FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE;
    let new = obj
        .hugetlb_alloc(vma.pgoff_of(base) / PMD_NR, mm.id, anon_flags)
        .ok_or(FaultError::Bus { addr })?;
    mm.counters.frame_allocated();
    for i in 0..PMD_NR {
        let src = phys.frame(crate::addr::Pfn::new(pfn.as_u64() + i));
        phys.frame(crate::addr::Pfn::new(new.pfn().as_u64() + i))
            .copy_from(&src);
    }
    mm.new_anon_rmap(&new, vma, base);
    let range = VaRange::from_len(base, PMD_SIZE).expect("aligned");
    let inv = mm.notifiers.invalidate_range_start(NotifierRange::new(
        mm.id,
        range,
        NotifierEvent::Clear,
        Some(vma.info()),
    ));
    let pmd = st.pt.lock_pmd(base, WalkMode::Lookup).expect("leaf");
    if pmd.get() != PmdEntry::Leaf(orig) {
        drop(pmd);
        inv.end();
        mm.release_frame(new);
        mm.release_frame(old);
        return Ok(());
    }
    new.meta().inc_entire_mapcount();
    let mut nf = PteFlags::YOUNG;
    if write {
        nf |= PteFlags::WRITE | dirty_flags();
    }
    pmd.set_leaf(Pte::Present {
        pfn: new.into_raw(),
        flags: nf,
    });
    drop(pmd);
    let mut tlb = TlbGather::new(mm);
    tlb.add_range(range);
    fm.dec_entire_mapcount();
    // The mapping's reference goes after the flush; the handle's own now.
    tlb.defer_put(pfn);
    mm.release_frame(old);
    tlb.finish();
    inv.end();
    mm.counters.fault(FaultKind::Cow);
    Ok(())
}
