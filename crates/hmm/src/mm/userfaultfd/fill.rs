//! Resolving faults: filling missing pages (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`),
//! write-protecting and releasing pages (`UFFDIO_WRITEPROTECT`), and moving anonymous
//! pages (`UFFDIO_MOVE`) (the kernel's `mfill_atomic`, `mwriteprotect_range`,
//! `move_pages`).
//!
//! Each page is done under the mmap lock for reading, taken page by page, so a long
//! range holds no lock for long. A fill never replaces an entry: a populated destination
//! ends the operation with `Exists` (or `Again` with the count, after some pages). No
//! notifier runs for a fill, which only turns a none entry into a present one; a move
//! clears its source under a CLEAR invalidation.

use std::sync::Arc;

use bitflags::bitflags;

use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{MigrationKind, Pte, PteFlags, Slot, WalkMode};
use crate::phys::{Frame, FrameFlags};
use crate::prot::VmFlags;

use super::super::mprotect::CpMode;
use super::super::shmem::AddPageError;
use super::super::thp::{self, dirty_flags};
use super::super::tlb::TlbGather;
use super::super::vma::{Backing, Vma};
use super::super::{Mm, MmState};
use super::{user_range, UffdError, Userfaultfd};

bitflags! {
    /// Modes of [`Userfaultfd::copy`] and [`Userfaultfd::zeropage`]
    /// (`UFFDIO_COPY_MODE_*`, `UFFDIO_ZEROPAGE_MODE_DONTWAKE`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CopyMode: u64 {
        /// Do not wake the faults waiting in the range (`UFFDIO_COPY_MODE_DONTWAKE`).
        #[doc(alias = "UFFDIO_COPY_MODE_DONTWAKE")]
        const DONTWAKE = 1 << 0;
        /// Map the pages write-protected (`UFFDIO_COPY_MODE_WP`; copy only).
        #[doc(alias = "UFFDIO_COPY_MODE_WP")]
        const WP = 1 << 1;
    }
}

bitflags! {
    /// Modes of [`Userfaultfd::move_pages`] (`UFFDIO_MOVE_MODE_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct MoveMode: u64 {
        /// Do not wake the faults waiting in the destination (`UFFDIO_MOVE_MODE_DONTWAKE`).
        #[doc(alias = "UFFDIO_MOVE_MODE_DONTWAKE")]
        const DONTWAKE = 1 << 0;
        /// Skip source pages that are missing instead of failing
        /// (`UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`).
        #[doc(alias = "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES")]
        const ALLOW_SRC_HOLES = 1 << 1;
    }
}

/// What a fill puts in a page.
#[derive(Clone, Copy)]
enum Fill<'b> {
    Bytes(&'b [u8]),
    Zero,
}

impl Userfaultfd {
    /// Fills the missing pages `[dst, dst + src.len())` with the bytes of `src` and maps
    /// them, then wakes the faults waiting there (`UFFDIO_COPY`). Returns the bytes
    /// copied. With [`CopyMode::WP`] the pages are mapped write-protected.
    ///
    /// The destination must lie in one VMA registered with this userfaultfd. In
    /// private memory each page is a new anonymous page; in shared memory it is added to
    /// the object and mapped.
    ///
    /// Errors: `Inval` for an unaligned destination, a length that is not whole pages,
    /// or `WP` on a range not registered for write-protection; `NoEnt` if the range is not
    /// in one VMA of this userfaultfd; `Again` while a non-cooperative event is unread;
    /// `Exists` if the first page is populated; `NoMem`; after some pages, `Again` with
    /// the bytes done. `Srch` if the address space is gone.
    #[doc(alias = "UFFDIO_COPY")]
    #[doc(alias = "mfill_atomic_copy")]
    pub fn copy(&self, dst: VirtAddr, src: &[u8], mode: CopyMode) -> Result<u64, UffdError> {
        self.fill(dst, src.len() as u64, Fill::Bytes(src), mode)
    }

    /// Maps the zero page at the missing pages `[dst, dst + len)` (in shared memory, adds
    /// zeroed pages), then wakes the faults waiting there (`UFFDIO_ZEROPAGE`). Returns the
    /// bytes done. Errors as [`copy`](Self::copy); `WP` is refused (`Inval`).
    #[doc(alias = "UFFDIO_ZEROPAGE")]
    pub fn zeropage(&self, dst: VirtAddr, len: u64, mode: CopyMode) -> Result<u64, UffdError> {
        if mode.contains(CopyMode::WP) {
            return Err(UffdError::Inval {
                what: "UFFDIO_ZEROPAGE has no write-protect mode",
            });
        }
        self.fill(dst, len, Fill::Zero, mode)
    }

    fn fill(
        &self,
        dst: VirtAddr,
        len: u64,
        what: Fill<'_>,
        mode: CopyMode,
    ) -> Result<u64, UffdError> {
        let range = user_range(dst, len)?;
        let mm = self.mm()?;
        let wp = mode.contains(CopyMode::WP);
        let mut done = 0;
        let result = range.pages().try_for_each(|va| {
            let guard = mm.mmap_read();
            let st = guard.state();
            let vma = self.dst_vma(st, range)?;
            if wp && !vma.flags().contains(VmFlags::UFFD_WP) {
                return Err(UffdError::Inval {
                    what: "UFFDIO_COPY_MODE_WP on a range not registered for write-protection",
                });
            }
            let bytes = match what {
                Fill::Bytes(b) => {
                    let at = (done / PAGE_SIZE) as usize * PAGE_SIZE as usize;
                    Fill::Bytes(&b[at..at + PAGE_SIZE as usize])
                }
                Fill::Zero => Fill::Zero,
            };
            fill_page(&mm, st, vma, va, bytes, wp)?;
            done += PAGE_SIZE;
            Ok(())
        });
        if done > 0 && !mode.contains(CopyMode::DONTWAKE) {
            self.ctx
                .wake(VaRange::from_len(dst, done).expect("a part of the range"));
        }
        result.map(|()| done).map_err(|e: UffdError| e.after(done))
    }

    /// The VMA holding all of `range`, registered with this userfaultfd, checked under
    /// the mmap lock (`uffd_mfill_lock`, `validate_dst_vma`).
    fn dst_vma<'s>(&self, st: &'s MmState, range: VaRange) -> Result<&'s Vma, UffdError> {
        if self.ctx.mmap_changing() {
            return Err(UffdError::Again { done: 0 });
        }
        st.vmas
            .find(range.start())
            .filter(|v| v.range().contains_range(&range))
            .filter(|v| v.uffd().is_some_and(|c| Arc::ptr_eq(c, &self.ctx)))
            .ok_or(UffdError::NoEnt {
                what: "the range is not in one VMA of this userfaultfd",
            })
    }

    /// Write-protects (`wp`) or releases `[start, start + len)` (`UFFDIO_WRITEPROTECT`):
    /// present and non-present entries get or lose the uffd-wp bit under one
    /// PROTECTION_VMA invalidation per VMA; a released page becomes writable again where
    /// `mprotect` would make it so. Releasing wakes the faults waiting in the range unless
    /// `dontwake`. Empty entries are left alone.
    ///
    /// Errors: `Inval` for an unaligned or empty range, or `wp` with `dontwake`; `NoEnt`
    /// if a VMA in the range is not registered for write-protection with this
    /// userfaultfd, or none is; `Again` while a non-cooperative event is unread; `Srch`.
    #[doc(alias = "UFFDIO_WRITEPROTECT")]
    #[doc(alias = "mwriteprotect_range")]
    pub fn writeprotect(
        &self,
        start: VirtAddr,
        len: u64,
        wp: bool,
        dontwake: bool,
    ) -> Result<(), UffdError> {
        let range = user_range(start, len)?;
        if wp && dontwake {
            return Err(UffdError::Inval {
                what: "write-protecting never wakes",
            });
        }
        let mm = self.mm()?;
        {
            let guard = mm.mmap_read();
            let st = guard.state();
            if self.ctx.mmap_changing() {
                return Err(UffdError::Again { done: 0 });
            }
            let vmas: Vec<&Vma> = st.vmas.overlapping(range).collect();
            let registered = |v: &&Vma| {
                v.flags().contains(VmFlags::UFFD_WP)
                    && v.uffd().is_some_and(|c| Arc::ptr_eq(c, &self.ctx))
            };
            if vmas.is_empty() || !vmas.iter().all(registered) {
                return Err(UffdError::NoEnt {
                    what: "the range is not registered for write-protection",
                });
            }
            let mode = if wp {
                CpMode::UffdWp
            } else {
                CpMode::UffdWpResolve
            };
            for v in vmas {
                let part = v.range().intersect(&range).expect("overlapping VMA");
                mm.change_protection(&st.pt, v, part, mode);
            }
        }
        if !wp && !dontwake {
            self.ctx.wake(range);
        }
        Ok(())
    }

    /// Moves the anonymous pages of `[src, src + len)` to the missing pages at `dst`
    /// (`UFFDIO_MOVE`): each page keeps its frame and bytes and is mapped at its new
    /// address (writable if the destination VMA is), its source entry cleared under a
    /// CLEAR invalidation. The zero page moves as the zero page. THPs are split first.
    /// Returns the bytes moved (holes skipped with `ALLOW_SRC_HOLES` count as moved).
    ///
    /// Errors: `Inval` for unaligned, empty or overlapping ranges, ranges not each in one
    /// private anonymous VMA, VMAs that differ in access or are not writable, or a
    /// destination not registered with this userfaultfd;
    /// `NoEnt` for a missing source page (without `ALLOW_SRC_HOLES`); `Exists` for a
    /// populated destination; `Busy` for a page that is shared (not anon-exclusive),
    /// pinned, or a THP that cannot be split; `Fault` for a device-private or
    /// device-exclusive source; `Again` while a non-cooperative event is unread; after
    /// some pages, `Again` with the bytes done. `Srch` if the address space is gone.
    #[doc(alias = "UFFDIO_MOVE")]
    pub fn move_pages(
        &self,
        dst: VirtAddr,
        src: VirtAddr,
        len: u64,
        mode: MoveMode,
    ) -> Result<u64, UffdError> {
        let drange = user_range(dst, len)?;
        let srange = user_range(src, len)?;
        if drange.overlaps(&srange) {
            return Err(UffdError::Inval {
                what: "source and destination overlap",
            });
        }
        let mm = self.mm()?;
        let mut done = 0;
        let result = (0..len / PAGE_SIZE).try_for_each(|i| loop {
            let guard = mm.mmap_read();
            let st = guard.state();
            let (svma, dvma) = self.move_vmas(st, srange, drange)?;
            let s = src + i * PAGE_SIZE;
            let d = dst + i * PAGE_SIZE;
            match move_page(&mm, st, svma, dvma, s, d, mode)? {
                Moved::Done => {
                    done += PAGE_SIZE;
                    return Ok(());
                }
                Moved::Retry => continue,
            }
        });
        if done > 0 && !mode.contains(MoveMode::DONTWAKE) {
            self.ctx
                .wake(VaRange::from_len(dst, done).expect("a part of the range"));
        }
        result.map(|()| done).map_err(|e: UffdError| e.after(done))
    }

    /// The source and destination VMAs of a move (`validate_move_areas`).
    fn move_vmas<'s>(
        &self,
        st: &'s MmState,
        src: VaRange,
        dst: VaRange,
    ) -> Result<(&'s Vma, &'s Vma), UffdError> {
        if self.ctx.mmap_changing() {
            return Err(UffdError::Again { done: 0 });
        }
        let within = |r: VaRange| {
            st.vmas
                .find(r.start())
                .filter(|v| v.range().contains_range(&r) && v.is_anonymous() && !v.is_shared())
        };
        let inval = |what| UffdError::Inval { what };
        let svma = within(src).ok_or(inval("the source is not in one private anonymous VMA"))?;
        let dvma =
            within(dst).ok_or(inval("the destination is not in one private anonymous VMA"))?;
        // Same access on both sides, and writable (the kernel keeps it simple).
        if svma.flags() & VmFlags::ACCESS != dvma.flags() & VmFlags::ACCESS
            || !svma.flags().contains(VmFlags::WRITE)
        {
            return Err(inval(
                "source and destination differ in access, or are not writable",
            ));
        }
        if !dvma.uffd().is_some_and(|c| Arc::ptr_eq(c, &self.ctx)) {
            return Err(inval(
                "the destination is not registered with this userfaultfd",
            ));
        }
        Ok((svma, dvma))
    }
}

/// Fills one missing page of `vma` at `va` (`mfill_atomic_pte`).
fn fill_page(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    va: VirtAddr,
    what: Fill<'_>,
    wp: bool,
) -> Result<(), UffdError> {
    let phys = mm.phys();
    let exists = UffdError::Exists { addr: va };
    // The page to map: a new anonymous page, the zero page, or a new page of the object.
    let page = match vma.backing() {
        Backing::Shmem(obj) if vma.is_shared() => {
            let pfn = obj
                .add_page(vma.pgoff_of(va), |f| match what {
                    Fill::Bytes(b) => f.write(0, b),
                    Fill::Zero => {}
                })
                .map_err(|e| match e {
                    AddPageError::Exists => exists,
                    AddPageError::Eof | AddPageError::NoMem => UffdError::NoMem,
                })?;
            mm.counters().frame_allocated();
            Some(Frame::from_raw(phys, pfn))
        }
        _ => match what {
            Fill::Zero => None,
            Fill::Bytes(b) => {
                let f = phys
                    .alloc(
                        0,
                        FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
                    )
                    .map_err(|_| UffdError::NoMem)?;
                mm.counters().frame_allocated();
                f.write(0, b);
                mm.new_anon_rmap(&f, vma, va);
                Some(f)
            }
        },
    };
    let mut c = st.pt.cursor(VaRange::page_of(va), WalkMode::Populate);
    let slot = c.current().expect("a one-page walk yields a slot");
    let Slot::Pte(p) = slot else {
        // A PMD leaf is there (mfill_atomic: -EEXIST on a huge PMD).
        drop(c);
        if let Some(f) = page {
            mm.release_frame(f);
        }
        return Err(exists);
    };
    if !p.get().is_none() {
        drop(c);
        if let Some(f) = page {
            mm.release_frame(f);
        }
        return Err(exists);
    }
    let entry = match page {
        None => Pte::Present {
            pfn: phys.zero_pfn(),
            flags: PteFlags::empty(),
        },
        Some(f) => {
            // mfill_atomic_install_pte: dirty; writable if the VMA is, unless mapped
            // write-protected (or a cache page in a private mapping, never here).
            let mut flags = dirty_flags();
            if wp {
                flags |= PteFlags::UFFD_WP;
            } else if vma.flags().contains(VmFlags::WRITE) {
                flags |= PteFlags::WRITE;
            }
            f.meta().inc_mapcount();
            Pte::Present {
                pfn: f.into_raw(),
                flags,
            }
        }
    };
    p.set(entry);
    drop(c);
    mm.counters().uffd_filled();
    Ok(())
}

/// How one page of a move went.
enum Moved {
    Done,
    /// The source changed shape (a THP split, a migration ended): look again.
    Retry,
}

/// Moves the page at `s` of `svma` to `d` of `dvma` (`move_pages_pte`). The reference is
/// taken under the source's page-table lock; with the folio locked, the source entry
/// becomes a migration entry (under a CLEAR invalidation and a flush) before the
/// destination is installed, so the page is never mapped at both addresses, and the
/// source entry goes once the destination maps the page (or comes back if the
/// destination filled meanwhile).
fn move_page(
    mm: &Mm,
    st: &MmState,
    svma: &Vma,
    dvma: &Vma,
    s: VirtAddr,
    d: VirtAddr,
    mode: MoveMode,
) -> Result<Moved, UffdError> {
    let phys = mm.phys();
    let dst_empty = || {
        let mut dc = st.pt.cursor(VaRange::page_of(d), WalkMode::Populate);
        matches!(dc.current(), Some(Slot::Pte(p)) if p.get().is_none())
    };
    // The kernel looks at the destination first: a populated one is EEXIST whatever the
    // source holds.
    if !dst_empty() {
        return Err(UffdError::Exists { addr: d });
    }
    let mut sc = st.pt.cursor(VaRange::page_of(s), WalkMode::Lookup);
    let (entry, held) = match sc.current().expect("a one-page walk yields a slot") {
        Slot::Hole(_) => (Pte::None, None),
        Slot::Pud(_) => unreachable!("UFFDIO_MOVE refuses hugetlb memory"),
        Slot::Pmd(p) => {
            // move_pages_huge_pmd is not modelled: split and go on page by page.
            let base = p.range().start();
            drop(sc);
            let mut tlb = TlbGather::new(mm);
            thp::split_pmd(mm, &st.pt, Some(svma.info()), base, &mut tlb);
            tlb.finish();
            return Ok(Moved::Retry);
        }
        Slot::Pte(p) => {
            let e = p.get();
            match e {
                Pte::Present { pfn, flags }
                    if !flags.contains(PteFlags::PROTNONE) && !phys.is_zero_pfn(pfn) =>
                {
                    match phys.frame(pfn).try_get() {
                        Ok(f) => (e, Some(f)),
                        // Being freed under us: look again.
                        Err(_) => return Ok(Moved::Retry),
                    }
                }
                Pte::Migration { pfn, .. } => {
                    let folio = phys.frame_nr(pfn.nr()).folio();
                    drop(sc);
                    super::super::wait_on_migration(folio);
                    return Ok(Moved::Retry);
                }
                _ => (e, None),
            }
        }
    };
    drop(sc);
    let pfn = match entry {
        Pte::None => {
            return if mode.contains(MoveMode::ALLOW_SRC_HOLES) {
                Ok(Moved::Done)
            } else {
                Err(UffdError::NoEnt {
                    what: "a source page is missing",
                })
            };
        }
        Pte::Present { pfn, .. } if !entry.flags().contains(PteFlags::PROTNONE) => pfn,
        Pte::Swap { .. } => {
            // The kernel moves the swap entry itself under both page-table locks
            // (move_swap_pte); the model's cursors hold one, so the page is read back
            // first and moved as a present page.
            super::super::vmscan::swapin(mm, st, svma, s).map_err(|_| UffdError::NoMem)?;
            return Ok(Moved::Retry);
        }
        _ => return Err(UffdError::Fault { addr: s }),
    };
    let Some(page) = held else {
        return move_zero_page(mm, st, svma, s, d, entry);
    };
    let folio = page.folio();
    let fm = folio.meta();
    let movable = |fm: &crate::phys::FrameMeta| {
        fm.flags().contains(FrameFlags::ANON) && page.anon_exclusive() && fm.pincount() == 0
    };
    if !movable(fm) {
        drop(page);
        return Err(UffdError::Busy {
            what: "the page is shared or pinned",
        });
    }
    if fm.order() > 0 {
        // The split takes the one reference the caller may hold: this one.
        let head = folio.get();
        drop(page);
        return if thp::split_folio(mm, st, head) {
            Ok(Moved::Retry)
        } else {
            Err(UffdError::Busy {
                what: "a THP that cannot be split",
            })
        };
    }
    fm.lock();
    let unlock = |page: Frame<'_>| {
        page.meta().unlock();
        drop(page);
    };
    // Under the folio lock and a CLEAR invalidation, the source becomes a migration
    // entry: CPUs and devices wait on it while the page changes address.
    let inv = mm.notifiers().invalidate_range_start(NotifierRange::new(
        mm.id(),
        VaRange::page_of(s),
        NotifierEvent::Clear,
        Some(svma.info()),
    ));
    let mut sc = st.pt.cursor(VaRange::page_of(s), WalkMode::Lookup);
    let taken = match sc.current() {
        Some(Slot::Pte(p)) => match p.get() {
            Pte::Present { pfn: now, flags } if now == pfn && movable(fm) => {
                p.set(Pte::Migration {
                    pfn: pfn.into(),
                    kind: MigrationKind::for_mapping(flags.contains(PteFlags::WRITE), true),
                    flags: flags & PteFlags::CARRIED,
                });
                Some(flags)
            }
            _ => None,
        },
        _ => None,
    };
    drop(sc);
    let Some(flags) = taken else {
        inv.end();
        unlock(page);
        return Ok(Moved::Retry);
    };
    let mut tlb = TlbGather::new(mm);
    tlb.add_range(VaRange::page_of(s));
    tlb.finish();
    let mut dc = st.pt.cursor(VaRange::page_of(d), WalkMode::Populate);
    let installed = match dc.current() {
        Some(Slot::Pte(p)) if p.get().is_none() => {
            let mut nf = PteFlags::DIRTY | PteFlags::SOFT_DIRTY;
            if dvma.flags().contains(VmFlags::WRITE) {
                nf |= PteFlags::WRITE;
            }
            p.set(Pte::Present { pfn, flags: nf });
            true
        }
        _ => false,
    };
    drop(dc);
    // The source's migration entry goes (or the mapping comes back), if no zap took it.
    // The mapping's reference and map count were kept for whichever entry maps the page
    // now; a zap of the migration entry while the destination filled leaves none.
    let mut sc = st.pt.cursor(VaRange::page_of(s), WalkMode::Lookup);
    let ours = match sc.current() {
        Some(Slot::Pte(p)) if matches!(p.get(), Pte::Migration { pfn: m, .. } if m.nr() == pfn.as_u64()) =>
        {
            p.set(if installed {
                Pte::None
            } else {
                Pte::Present { pfn, flags }
            });
            true
        }
        _ => false,
    };
    drop(sc);
    if !installed && !ours {
        page.meta().dec_mapcount();
        let _ = phys.frame(pfn).put();
    }
    inv.end();
    if !installed {
        unlock(page);
        return Err(UffdError::Exists { addr: d });
    }
    // The mapping's reference and map count move with it.
    mm.new_anon_rmap(&page, dvma, d);
    unlock(page);
    mm.counters().uffd_moved();
    Ok(Moved::Done)
}

/// The zero page moves as itself (`move_zeropage_pte`): no reference or count to move.
fn move_zero_page(
    mm: &Mm,
    st: &MmState,
    svma: &Vma,
    s: VirtAddr,
    d: VirtAddr,
    entry: Pte,
) -> Result<Moved, UffdError> {
    let inv = mm.notifiers().invalidate_range_start(NotifierRange::new(
        mm.id(),
        VaRange::page_of(s),
        NotifierEvent::Clear,
        Some(svma.info()),
    ));
    let mut sc = st.pt.cursor(VaRange::page_of(s), WalkMode::Lookup);
    let cleared = match sc.current() {
        Some(Slot::Pte(p)) if p.get() == entry => {
            p.set(Pte::None);
            true
        }
        _ => false,
    };
    drop(sc);
    if cleared {
        let mut tlb = TlbGather::new(mm);
        tlb.add_range(VaRange::page_of(s));
        tlb.finish();
    }
    inv.end();
    if !cleared {
        return Ok(Moved::Retry);
    }
    let mut dc = st.pt.cursor(VaRange::page_of(d), WalkMode::Populate);
    match dc.current() {
        Some(Slot::Pte(p)) if p.get().is_none() => {
            p.set(entry);
            drop(dc);
            mm.counters().uffd_moved();
            Ok(Moved::Done)
        }
        _ => {
            drop(dc);
            // Put it back where it was if that is still empty.
            let mut sc = st.pt.cursor(VaRange::page_of(s), WalkMode::Lookup);
            if let Some(Slot::Pte(p)) = sc.current() {
                if p.get().is_none() {
                    p.set(entry);
                }
            }
            Err(UffdError::Exists { addr: d })
        }
    }
}
