//! hugetlb mappings (`MAP_HUGETLB`): 2 MiB pages from the pool of
//! [`PhysMem::set_nr_hugepages`](crate::phys::PhysMem::set_nr_hugepages), mapped by PMD
//! leaves, or 1 GiB pages (`MAP_HUGE_1GB`) from the pool of
//! [`PhysMem::set_nr_hugepages_of`](crate::phys::PhysMem::set_nr_hugepages_of), mapped by
//! PUD leaves, as x86-64 maps them; neither is ever split (the kernel's `mm/hugetlb.c`).
//! Below, "page" is a huge page of the VMA's size (`hstate_vma`), and every operation
//! goes through the one entry that maps it ([`HugePte`], `huge_pte_offset`).
//!
//! * `mmap` reserves every page of the mapping in the pool first; an empty or short pool
//!   fails it with ENOMEM and changes nothing. The reservations belong to a hugetlbfs file
//!   behind the mapping (as the kernel's `hugetlb_file_setup`); for a private mapping only
//!   the address space that created it may use them (`HPAGE_RESV_OWNER`).
//! * A fault of either kind allocates a zeroed pool page (there is no huge zero page for
//!   hugetlb): a shared mapping's page goes into the file, a private mapping's page is
//!   anonymous. A private read fault maps it read-only; the write that follows reuses it.
//! * A write to a shared private page (after `fork`) copies the whole page into a page
//!   taken without a reservation (`hugetlb_wp`), under a CLEAR of the page; if the pool
//!   has none the access gets SIGBUS, as in Linux for a fork child (Linux takes the page
//!   back from the children for the mapping's owner, `unmap_ref_private`; the model does
//!   not, and the owner gets SIGBUS too).
//! * Operations must not cut a hugetlb page: `munmap`, `mprotect` and `madvise` ranges that
//!   start or end inside one fail with EINVAL (at the VMA's page size: 1 GiB for 1 GiB
//!   pages), but `MADV_DONTNEED` rounds its end down to whole pages
//!   (`madvise_dontneed_free_valid_vma`); `mremap` of hugetlb memory is EINVAL.
//! * A hugetlbfs file ([`MemFile::new_hugetlb`](super::MemFile::new_hugetlb), `MFD_HUGETLB`)
//!   maps the same way: a shared mapping's fault takes the file's page (from the pool if
//!   the file has none there yet), a private mapping's read maps the file's page read-only
//!   and its first write copies it (`hugetlb_no_page` then `hugetlb_wp`), and where the
//!   file has no page a private fault takes an anonymous one that stays out of the file.
//!   Faults past the end of the file get SIGBUS; the size is checked again under the
//!   entry's lock. Mappings of a file reserve nothing (unlike Linux, whose mmap reserves
//!   the pages); a fault the pool cannot serve gets SIGBUS.

use std::sync::Arc;

use crate::addr::{Pfn, VaRange, VirtAddr, PAGE_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{PageTable, PmdEntry, PmdGuard, Pte, PteFlags, PudEntry, PudGuard, WalkMode};
use crate::phys::{Frame, FrameFlags, HugetlbSize};
use crate::prot::VmFlags;
use crate::stats::FaultKind;

use super::error::{FaultError, MmError};
use super::fault::{must_unshare, FaultFlags};
use super::shmem::ShmemObject;
use super::thp::dirty_flags;
use super::tlb::TlbGather;
use super::vma::{Backing, Vma, VmaTree};
use super::{Mm, MmState};

/// Whether `vma` is hugetlb memory.
pub(super) fn is_hugetlb(vma: &Vma) -> bool {
    vma.flags().contains(VmFlags::HUGETLB)
}

/// The page size of hugetlb `vma` (`hstate_vma`); the base page size for other VMAs.
pub(super) fn page_size(vma: &Vma) -> u64 {
    match vma.backing() {
        Backing::Shmem(obj) if is_hugetlb(vma) => obj.page_nr() * PAGE_SIZE,
        _ => PAGE_SIZE,
    }
}

/// The hugetlbfs file behind hugetlb `vma` and its page size (`hstate_vma`).
fn hugetlb_file(vma: &Vma) -> (&Arc<ShmemObject>, HugetlbSize) {
    match vma.backing() {
        Backing::Shmem(obj) => (obj, obj.hugetlb_size().expect("a hugetlbfs file")),
        _ => unreachable!("a hugetlb VMA has its hugetlbfs file"),
    }
}

/// Fails with EINVAL if `range` would cut a hugetlb page of any VMA it overlaps.
pub(super) fn check_range(vmas: &VmaTree, range: VaRange) -> Result<(), MmError> {
    for v in vmas.overlapping(range).filter(|v| is_hugetlb(v)) {
        let size = page_size(v);
        let cuts = |at: VirtAddr| at > v.start() && at < v.end() && !at.is_aligned(size);
        if cuts(range.start()) || cuts(range.end()) {
            return Err(MmError::Inval {
                what: "range cuts a hugetlb page",
            });
        }
    }
    Ok(())
}

/// `madvise_dontneed_free_valid_vma` for the hugetlb VMAs `range` overlaps: EINVAL if the
/// part of `range` in one starts inside a hugetlb page. (Its end may: see
/// [`dontneed_part`].)
pub(super) fn check_dontneed(vmas: &VmaTree, range: VaRange) -> Result<(), MmError> {
    for v in vmas.overlapping(range).filter(|v| is_hugetlb(v)) {
        if !v.start().max(range.start()).is_aligned(page_size(v)) {
            return Err(MmError::Inval {
                what: "MADV_DONTNEED starts inside a hugetlb page",
            });
        }
    }
    Ok(())
}

/// The part of `seg` (inside `vma`) that `MADV_DONTNEED` zaps: all of it, or for hugetlb
/// memory the whole pages in it, its end rounded down ("Madvise callers expect the length
/// to be rounded up to PAGE_SIZE boundaries, and may be unaware that this VMA uses huge
/// pages"); `None` if that is nothing.
pub(super) fn dontneed_part(vma: &Vma, seg: VaRange) -> Option<VaRange> {
    if !is_hugetlb(vma) {
        return Some(seg);
    }
    VaRange::new(seg.start(), seg.end().align_down(page_size(vma))).ok()
}

/// The locked entry that maps one hugetlb page (`huge_pte_offset` and `huge_pte_lock`):
/// a PMD for a 2 MiB page, a PUD for a 1 GiB one.
enum HugePte<'a> {
    Pmd(PmdGuard<'a>),
    Pud(PudGuard<'a>),
}

impl<'a> HugePte<'a> {
    /// Locks the entry for the page of `size` at `base`, allocating the tables above it.
    fn lock(pt: &'a PageTable, size: HugetlbSize, base: VirtAddr) -> HugePte<'a> {
        match size {
            HugetlbSize::Size2M => HugePte::Pmd(
                pt.lock_pmd(base, WalkMode::Populate)
                    .expect("a 2 MiB hugetlb page lies under no PUD leaf"),
            ),
            HugetlbSize::Size1G => {
                HugePte::Pud(pt.lock_pud(base, WalkMode::Populate).expect("populate"))
            }
        }
    }

    /// The leaf, or `None` where nothing (or an empty table) is.
    fn get(&self) -> Option<Pte> {
        match self {
            HugePte::Pmd(g) => match g.get() {
                PmdEntry::Leaf(l) => Some(l),
                PmdEntry::None | PmdEntry::Table => None,
            },
            HugePte::Pud(g) => match g.get() {
                PudEntry::Leaf(l) => Some(l),
                PudEntry::None | PudEntry::Table => None,
            },
        }
    }

    /// Stores the leaf (`set_huge_pte_at`), over nothing, a leaf, or a table that maps
    /// nothing (one left by small pages unmapped earlier).
    fn set(&self, leaf: Pte) {
        match self {
            HugePte::Pmd(g) if g.get() == PmdEntry::Table => g.collapse(leaf),
            HugePte::Pmd(g) => g.set_leaf(leaf),
            HugePte::Pud(g) => {
                let set = g.set_leaf(leaf);
                assert!(set, "a hugetlb VMA's PMD table maps nothing");
            }
        }
    }
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
    let (obj, size) = hugetlb_file(vma);
    let base = addr.align_down(size.bytes());
    let serialized = obj.hugetlb_fault_lock(vma.pgoff_of(base) / size.nr_pages());
    let entry = HugePte::lock(&st.pt, size, base);
    match entry.get() {
        None => {
            drop(entry);
            no_page(mm, st, vma, base, write, addr)
        }
        Some(leaf @ Pte::Present { pfn, flags: pf }) => {
            let unshare = flags.contains(FaultFlags::UNSHARE) && must_unshare(mm, vma, pfn, true);
            if (write && !pf.contains(PteFlags::WRITE)) || unshare {
                wp(mm, st, vma, base, entry, leaf, write, addr)
            } else {
                Ok(())
            }
        }
        Some(Pte::Migration { pfn, .. }) => {
            drop((entry, serialized));
            super::fault::wait_on_migration(mm.phys().frame_nr(pfn.nr()).folio());
            mm.counters.fault(FaultKind::MigrationWait);
            Ok(())
        }
        Some(other) => unreachable!("hugetlb leaf {other:?}"),
    }
}

/// `hugetlb_no_page`: a new page for an empty entry.
fn no_page(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    base: VirtAddr,
    write: bool,
    addr: VirtAddr,
) -> Result<(), FaultError> {
    let (obj, size) = hugetlb_file(vma);
    let shared = vma.is_shared();
    let pgoff = vma.pgoff_of(base);
    let bus = FaultError::Bus { addr };
    if !obj.in_size(pgoff) {
        return Err(bus);
    }
    // A private mapping of a hugetlbfs file (not MAP_HUGETLB's own object) maps the
    // file's page if the file has one, read-only, and a write copies it (`hugetlb_wp`
    // below); where the file has none it gets an anonymous page of its own, which never
    // goes into the file (`hugetlb_no_page`).
    let cached = if shared {
        let (pfn, allocated) = obj.get_page(pgoff).map_err(|_| bus)?;
        if allocated {
            mm.counters.frame_allocated();
        }
        Some(Frame::from_raw(mm.phys(), pfn))
    } else if obj.is_anonymous() {
        None
    } else {
        obj.lookup(pgoff)
    };
    let file_private = !shared && cached.is_some();
    let page = match cached {
        Some(page) => page,
        None => {
            let anon = FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE;
            let page = obj
                .hugetlb_alloc(pgoff / size.nr_pages(), mm.id, anon)
                .ok_or(bus)?;
            mm.counters.frame_allocated();
            mm.new_anon_rmap(&page, vma, base);
            page
        }
    };
    let entry = HugePte::lock(&st.pt, size, base);
    if entry.get().is_some() || !obj.in_size(pgoff) {
        // Raced with another fault, or a truncation that zapped the mappings before this
        // page was mapped (it checks the size under this lock, as the truncation unmaps
        // under it after moving the size).
        let raced = entry.get().is_some();
        drop(entry);
        mm.release_frame(page);
        return if raced { Ok(()) } else { Err(bus) };
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
    entry.set(leaf);
    mm.counters.fault(FaultKind::Hugetlb);
    if write && file_private {
        return wp(mm, st, vma, base, entry, leaf, true, addr);
    }
    Ok(())
}

/// `hugetlb_wp`: a write to a read-only hugetlb leaf, or an unshare request, with the
/// entry still locked and holding `orig`. Whether the page is reused is decided under the
/// lock, and the reference that keeps the old page while the copy is made is taken under
/// it too (`folio_get` before the unlock): a zap in between cannot free the page under it.
#[allow(clippy::too_many_arguments)] // the kernel's hugetlb_wp state, spelled out
fn wp(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    base: VirtAddr,
    entry: HugePte<'_>,
    orig: Pte,
    write: bool,
    addr: VirtAddr,
) -> Result<(), FaultError> {
    let phys = mm.phys();
    let (obj, size) = hugetlb_file(vma);
    let Pte::Present { pfn, flags } = orig else {
        unreachable!("wp of a present leaf")
    };
    let fm = phys.frame(pfn).meta();
    let anon = fm.flags().contains(FrameFlags::ANON);
    let reuse = vma.is_shared()
        || (anon
            && (fm.flags().contains(FrameFlags::ANON_EXCLUSIVE)
                || (fm.refcount() == 1 && fm.pincount() == 0)));
    debug_assert_eq!(entry.get(), Some(orig), "called with the entry locked");
    if reuse {
        if anon {
            fm.set_flags(FrameFlags::ANON_EXCLUSIVE);
        }
        if write {
            entry.set(Pte::Present {
                pfn,
                flags: flags | PteFlags::WRITE | dirty_flags(),
            });
        }
        mm.counters.fault(FaultKind::WpReuse);
        return Ok(());
    }
    let old = phys.frame(pfn).get();
    drop(entry);
    let anon_flags = FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE;
    let Some(new) = obj.hugetlb_alloc(vma.pgoff_of(base) / size.nr_pages(), mm.id, anon_flags)
    else {
        mm.release_frame(old);
        return Err(FaultError::Bus { addr });
    };
    mm.counters.frame_allocated();
    copy_huge_page(mm, pfn, &new, size);
    mm.new_anon_rmap(&new, vma, base);
    let range = VaRange::from_len(base, size.bytes()).expect("aligned");
    let inv = mm.notifiers.invalidate_range_start(NotifierRange::new(
        mm.id,
        range,
        NotifierEvent::Clear,
        Some(vma.info()),
    ));
    let entry = HugePte::lock(&st.pt, size, base);
    if entry.get() != Some(orig) {
        drop(entry);
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
    entry.set(Pte::Present {
        pfn: new.into_raw(),
        flags: nf,
    });
    drop(entry);
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

/// Copies the hugetlb page at `src` into `dst`, a fresh zeroed pool page, a page at a time
/// (`copy_user_large_folio`). Pages of zeros are left as they are, so a copy commits host
/// memory only for the bytes written.
pub(super) fn copy_huge_page(mm: &Mm, src: Pfn, dst: &Frame<'_>, size: HugetlbSize) {
    let phys = mm.phys();
    for i in 0..size.nr_pages() {
        let from = phys.frame(Pfn::new(src.as_u64() + i));
        if !from.is_zero() {
            phys.frame(Pfn::new(dst.pfn().as_u64() + i))
                .copy_from(&from);
        }
    }
}
