//! The CPU fault path (`handle_mm_fault`): one dispatch over entry kinds.
//!
//! | entry | access | action |
//! |---|---|---|
//! | none, private anon | read | map the zero page read-only |
//! | none, private anon | write | allocate a zeroed page, map it writable |
//! | none, shared | any | find or add the page in the shared object, map it |
//! | present read-only | write, shared VMA | make writable in place |
//! | present read-only | write, private VMA | reuse if anon-exclusive, else copy on write (CLEAR) |
//! | migration | any | wait for the migration (folio lock), retry |
//! | device-exclusive | any | restore the CPU mapping after a one-page CLEAR |
//! | device-private | any | the owner's `migrate_to_ram` (see `device`) |
//!
//! Allocation and copying happen with no page-table lock held; the entry is re-checked after
//! re-locking and a lost race simply returns (the caller retries the access), as the
//! kernel's `pte_same` checks do.

use bitflags::bitflags;

use crate::addr::{VaRange, VirtAddr};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{Cursor, Pte, PteFlags, Slot, WalkMode};
use crate::phys::{FrameFlags, FrameRef};
use crate::stats::FaultKind;

use super::driver::VmFault;
use super::error::{FaultError, SegvCause};
use super::hugetlb;
use super::shmem::PageError;
use super::thp::{self, dirty_flags};
use super::vma::{Backing, Vma};
use super::{Mm, MmState};

bitflags! {
    /// Why a fault is taken (`FAULT_FLAG_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct FaultFlags: u32 {
        /// A write access.
        #[doc(alias = "FAULT_FLAG_WRITE")]
        const WRITE = 1 << 0;
        /// On behalf of another agent (GUP, a device through `hmm_range_fault`).
        #[doc(alias = "FAULT_FLAG_REMOTE")]
        const REMOTE = 1 << 1;
        /// Make a shared anonymous page exclusive without making it writable (a read-only
        /// pin must not see a later copy on write).
        #[doc(alias = "FAULT_FLAG_UNSHARE")]
        const UNSHARE = 1 << 2;
        /// The caller can drop the mmap lock, so the fault may wait outside it (for a
        /// userfaultfd handler) and ask to be retried (`VM_FAULT_RETRY`).
        #[doc(alias = "FAULT_FLAG_ALLOW_RETRY")]
        const ALLOW_RETRY = 1 << 3;
    }
}

/// How a fault that did not fail ended.
#[derive(Debug)]
pub(crate) enum Faulted {
    /// The entry now satisfies the access, or a concurrent change won: retry the access.
    Done,
    /// `VM_FAULT_RETRY`: the fault waits for a userfaultfd handler. The caller drops the
    /// mmap lock, waits, and retries the fault with the lock taken again.
    Retry(super::userfaultfd::UffdWait),
}

/// Checks the VMA allows the access (`access_error`).
pub(super) fn check_access(
    vma: Option<&Vma>,
    addr: VirtAddr,
    write: bool,
) -> Result<&Vma, FaultError> {
    let vma = vma.ok_or(FaultError::Segv {
        addr,
        cause: SegvCause::MapErr,
    })?;
    let allowed = if write {
        vma.flags().contains(super::VmFlags::WRITE)
    } else {
        vma.is_accessible()
    };
    if allowed {
        Ok(vma)
    } else {
        Err(FaultError::Segv {
            addr,
            cause: SegvCause::AccErr,
        })
    }
}

/// A fault whose caller holds the mmap lock throughout (no `ALLOW_RETRY`): a fault that
/// would wait for a userfaultfd handler fails with SIGBUS instead.
pub(super) fn handle_mm_fault(
    mm: &Mm,
    st: &MmState,
    addr: VirtAddr,
    flags: FaultFlags,
) -> Result<(), FaultError> {
    match handle_mm_fault_retry(mm, st, addr, flags - FaultFlags::ALLOW_RETRY)? {
        Faulted::Done => Ok(()),
        Faulted::Retry(_) => unreachable!("a fault that may not retry never asks to"),
    }
}

/// `handle_mm_fault`: with `ALLOW_RETRY`, a fault that must wait for a userfaultfd handler
/// returns [`Faulted::Retry`].
pub(crate) fn handle_mm_fault_retry(
    mm: &Mm,
    st: &MmState,
    addr: VirtAddr,
    flags: FaultFlags,
) -> Result<Faulted, FaultError> {
    crate::sync::retry_point();
    let write = flags.contains(FaultFlags::WRITE);
    let vma = check_access(st.vmas.find(addr), addr, write)?;
    if let Some(ctx) = vma.uffd().filter(|c| !c.is_released()) {
        if let Some(reason) = super::userfaultfd::must_fault(st, vma, addr, flags) {
            return super::userfaultfd::handle_userfault(mm, st, vma, ctx, addr, reason, flags);
        }
    }
    handle_mm_fault_inner(mm, st, vma, addr, flags).map(|()| Faulted::Done)
}

fn handle_mm_fault_inner(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    addr: VirtAddr,
    flags: FaultFlags,
) -> Result<(), FaultError> {
    let write = flags.contains(FaultFlags::WRITE);
    if hugetlb::is_hugetlb(vma) {
        return hugetlb::fault(mm, st, vma, addr, flags);
    }
    if thp::huge_fault(mm, st, vma, addr, flags)? {
        return Ok(());
    }
    let mut c = st.pt.cursor(VaRange::page_of(addr), WalkMode::Populate);
    let pte = match c.current().expect("a one-page walk yields a slot") {
        Slot::Pte(p) => p.get(),
        Slot::Pmd(p) => {
            let leaf = p.get();
            if let Pte::DevicePrivate { pfn, .. } = leaf {
                return super::device::do_device_private_fault(
                    mm,
                    st,
                    vma,
                    addr,
                    flags,
                    &mut c,
                    pfn,
                    crate::pgtable::Huge::Pmd,
                );
            }
            drop(c);
            return thp::huge_pmd_fault(mm, st, vma, addr, flags, leaf);
        }
        Slot::Pud(_) => unreachable!("PUD leaves map only hugetlb VMAs"),
        Slot::Hole(_) => unreachable!("populate walks yield no holes"),
    };
    let f = Fault {
        mm,
        st,
        vma,
        addr,
        write,
        unshare: flags.contains(FaultFlags::UNSHARE) && !write,
    };
    match pte {
        Pte::None => f.do_anonymous_or_shared(&mut c),
        Pte::Present { pfn, flags: pf } => {
            if (write && !pf.contains(PteFlags::WRITE))
                || (f.unshare && must_unshare(mm, vma, pfn, true))
            {
                f.do_wp_page(&mut c, pte, pfn)
            } else {
                // Spurious: another thread resolved it first.
                Ok(())
            }
        }
        Pte::Migration { pfn, .. } => {
            // migration_entry_wait_on_locked: find the folio under the PTL, sleep on its
            // lock without a reference (see `wait_on_migration`).
            let folio = mm.phys().frame_nr(pfn.nr()).folio();
            c.unlock();
            wait_on_migration(folio);
            mm.counters.fault(FaultKind::MigrationWait);
            Ok(())
        }
        Pte::DeviceExclusive { pfn, flags } => f.restore_exclusive(&mut c, pte, pfn, flags),
        Pte::Swap { .. } => mm.do_swap_page(vma, addr, write, &mut c, pte),
        Pte::DevicePrivate { pfn, .. } => super::device::do_device_private_fault(
            mm,
            st,
            vma,
            addr,
            flags,
            &mut c,
            pfn,
            crate::pgtable::Huge::Pte,
        ),
    }
}

/// Whether a read-only pin of `pfn` in `vma` must first unshare the page
/// (`gup_must_unshare`). An anonymous page must be anon-exclusive, or a later write fault
/// would copy it away from the pin. A long-term pin of any other page of a private
/// writable ("COW") mapping (the shared zero page, the huge zero page, a page-cache page
/// of a private file mapping) must be of an exclusive anonymous copy made now, so that the
/// process's later writes reuse the pinned page instead of copying away from it. Whether a
/// page is anonymous is the folio's flag, not the VMA's kind: a private hugetlb page is
/// anonymous; exclusivity is the page's own bit (the head's for a PMD mapping). The fault
/// path asks with `longterm` set: it runs an unshare only when GUP asked for one.
pub(super) fn must_unshare(mm: &Mm, vma: &Vma, pfn: crate::addr::Pfn, longterm: bool) -> bool {
    let phys = mm.phys();
    let page = phys.frame(pfn);
    let anon = !phys.is_zero_pfn(pfn)
        && !phys.is_huge_zero_pfn(pfn)
        && page.folio().meta().flags().contains(FrameFlags::ANON);
    if !anon {
        return longterm && vma.is_cow_mapping();
    }
    !page.anon_exclusive()
}

struct Fault<'a> {
    mm: &'a Mm,
    st: &'a MmState,
    vma: &'a Vma,
    addr: VirtAddr,
    write: bool,
    /// `FAULT_FLAG_UNSHARE` on a read: the page becomes exclusive, not writable.
    unshare: bool,
}

impl Fault<'_> {
    fn page(&self) -> VaRange {
        VaRange::page_of(self.addr)
    }

    /// `do_anonymous_page`, `do_read_fault`, `do_shared_fault`, `do_cow_fault`.
    fn do_anonymous_or_shared(&self, c: &mut Cursor<'_>) -> Result<(), FaultError> {
        let mm = self.mm;
        let vm_write = self.vma.flags().contains(super::VmFlags::WRITE);
        match self.vma.backing() {
            backing @ (Backing::Shmem(_) | Backing::Driver(_)) => {
                c.unlock();
                let pgoff = self.vma.pgoff_of(self.addr);
                let bus = FaultError::Bus { addr: self.addr };
                let oom = FaultError::Oom { addr: self.addr };
                let page = match backing {
                    Backing::Shmem(obj) => {
                        let (pfn, allocated) = obj.get_page(pgoff).map_err(|e| match e {
                            PageError::Eof => bus,
                            PageError::NoMem(_) => oom,
                        })?;
                        if allocated {
                            mm.counters.frame_allocated();
                        }
                        crate::phys::Frame::from_raw(mm.phys(), pfn)
                    }
                    Backing::Driver(d) => {
                        let pfn = d.ops.fault(pgoff, self.write).map_err(|e| match e {
                            VmFault::Sigbus => bus,
                            VmFault::Oom => oom,
                        })?;
                        // A driver handing out something that is not one of its pages is
                        // a driver bug; the access gets SIGBUS rather than corrupt memory.
                        if !mm.phys().contains(pfn) {
                            return Err(bus);
                        }
                        let frame = mm.phys().frame(pfn);
                        let flags = frame.folio().meta().flags();
                        if flags.intersects(FrameFlags::ANON | FrameFlags::RESERVED) {
                            return Err(bus);
                        }
                        let page = frame.try_get().map_err(|_| bus)?;
                        d.adopt(&page, pgoff);
                        page
                    }
                    Backing::Anon => unreachable!(),
                };
                let in_size = || match backing {
                    Backing::Shmem(obj) => obj.in_size(pgoff),
                    _ => true,
                };
                let shared = self.vma.is_shared();
                // do_cow_fault: a write to a private mapping maps a copy, never the page.
                let (mapping, kind) = if self.write && !shared {
                    let copy = mm
                        .phys()
                        .alloc(
                            0,
                            FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
                        )
                        .map_err(|_| oom)?;
                    mm.counters.frame_allocated();
                    copy.copy_from(&page);
                    mm.new_anon_rmap(&copy, self.vma, self.addr);
                    mm.release_frame(page);
                    (copy, FaultKind::Cow)
                } else {
                    (page, FaultKind::Shared)
                };
                let Some(Slot::Pte(p)) = c.current() else {
                    unreachable!()
                };
                // Re-check under the page-table lock: a racing truncation sets the size
                // before it zaps (see `shmem`).
                if !p.get().is_none() || !in_size() {
                    c.unlock();
                    mm.release_frame(mapping);
                    return if in_size() { Ok(()) } else { Err(bus) };
                }
                let mut flags = PteFlags::YOUNG;
                // A shared read fault maps a clean page writable unless soft-dirty tracking
                // must see the first write (vma_wants_writenotify); a private one never.
                let tracking = !self.vma.flags().contains(super::VmFlags::SOFTDIRTY);
                let writable = if shared {
                    self.write || !tracking
                } else {
                    self.write
                };
                if vm_write && writable {
                    flags |= PteFlags::WRITE;
                }
                if self.write {
                    flags |= dirty_flags();
                }
                mapping.meta().inc_mapcount();
                p.set(Pte::Present {
                    pfn: mapping.into_raw(),
                    flags,
                });
                mm.counters.fault(kind);
                Ok(())
            }
            Backing::Anon if !self.write => {
                let Some(Slot::Pte(p)) = c.current() else {
                    unreachable!()
                };
                if p.get().is_none() {
                    p.set(Pte::Present {
                        pfn: mm.phys().zero_pfn(),
                        flags: PteFlags::YOUNG,
                    });
                    mm.counters.fault(FaultKind::AnonReadZero);
                }
                Ok(())
            }
            Backing::Anon => {
                c.unlock();
                if self.do_anonymous_large()? {
                    return Ok(());
                }
                let frame = mm
                    .phys()
                    .alloc_zeroed(
                        0,
                        FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
                    )
                    .map_err(|_| FaultError::Oom { addr: self.addr })?;
                mm.counters.frame_allocated();
                mm.new_anon_rmap(&frame, self.vma, self.addr);
                let Some(Slot::Pte(p)) = c.current() else {
                    unreachable!()
                };
                if !p.get().is_none() {
                    c.unlock();
                    mm.release_frame(frame);
                    return Ok(());
                }
                frame.meta().inc_mapcount();
                p.set(Pte::Present {
                    pfn: frame.into_raw(),
                    flags: PteFlags::WRITE | dirty_flags(),
                });
                mm.counters.fault(FaultKind::AnonWrite);
                Ok(())
            }
        }
    }

    /// `alloc_anon_folio` and the large-folio half of `do_anonymous_page`: a write fault
    /// maps a zeroed multi-size THP when a size is enabled and its aligned range around the
    /// address is empty (see the `mthp` module). Returns `Ok(true)` when the fault is
    /// resolved (or the range filled meanwhile: the access retries), `Ok(false)` for the
    /// one-page path. Called with no page-table lock held.
    fn do_anonymous_large(&self) -> Result<bool, FaultError> {
        let mm = self.mm;
        for (order, range) in super::mthp::fault_orders(mm, self.vma, self.addr) {
            if !self.range_none(range) {
                continue;
            }
            let Ok(folio) = mm.phys().alloc_zeroed(
                order,
                FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
            ) else {
                mm.counters.mthp_fault_fallback();
                continue;
            };
            mm.counters.frame_allocated();
            mm.new_anon_rmap(&folio, self.vma, range.start());
            let n = 1u64 << order;
            let mut c = self.st.pt.cursor(range, WalkMode::Populate);
            c.set_batch(true);
            // The fault's walk installed the PTE table, and under the mmap lock held for
            // reading nothing replaces a table by a leaf; should it ever, the access
            // retries (`pte_offset_map_lock` failing).
            let Some(Slot::Pte(p)) = c.next() else {
                drop(c);
                mm.release_frame(folio);
                return Ok(true);
            };
            debug_assert_eq!(p.len() as u64, n);
            if (0..n as usize).any(|i| !p.get_at(i).is_none()) {
                // Filled meanwhile: the access retries (`pte_range_none` failed).
                drop(c);
                mm.release_frame(folio);
                return Ok(true);
            }
            // One reference and one map count per PTE; every page anon-exclusive
            // (`folio_add_new_anon_rmap` with `RMAP_EXCLUSIVE`).
            folio.meta().get_many(n as u32 - 1);
            let head = folio.into_raw();
            for i in 0..n {
                let page = mm.phys().frame_nr(head.as_u64() + i);
                page.set_anon_exclusive();
                page.meta().inc_mapcount();
                p.set_at(
                    i as usize,
                    Pte::Present {
                        pfn: page.pfn(),
                        flags: PteFlags::WRITE | dirty_flags(),
                    },
                );
            }
            mm.counters.fault(FaultKind::MthpAnon);
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether every PTE of `range` (inside one PTE table) is empty, or has no table yet.
    fn range_none(&self, range: VaRange) -> bool {
        let mut c = self.st.pt.cursor(range, WalkMode::Lookup);
        c.set_batch(true);
        while let Some(slot) = c.next() {
            match slot {
                Slot::Hole(_) => {}
                Slot::Pmd(_) | Slot::Pud(_) => return false,
                Slot::Pte(p) => {
                    if (0..p.len()).any(|i| !p.get_at(i).is_none()) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// `do_wp_page`: a write to a present read-only entry of a writable VMA, or an unshare
    /// request (which leaves the entry's write permission as it was).
    fn do_wp_page(
        &self,
        c: &mut Cursor<'_>,
        orig: Pte,
        pfn: crate::addr::Pfn,
    ) -> Result<(), FaultError> {
        let mm = self.mm;
        let phys = mm.phys();
        let unshare = self.unshare;
        let make_writable = |c: &mut Cursor<'_>| {
            let Some(Slot::Pte(p)) = c.current() else {
                unreachable!()
            };
            if p.get() == orig && !unshare {
                let flags = orig.flags() | PteFlags::WRITE | dirty_flags();
                p.set(Pte::Present { pfn, flags });
            }
        };
        if self.vma.is_shared() {
            make_writable(c);
            mm.counters.fault(FaultKind::WpReuse);
            return Ok(());
        }
        if !phys.is_zero_pfn(pfn) {
            let page = phys.frame(pfn);
            let meta = page.folio().meta();
            // The page is anon-exclusive, or wp_can_reuse_anon_folio: the only reference is
            // our mapping. A file page in a private mapping is always copied.
            let anon = meta.flags().contains(FrameFlags::ANON);
            let reusable = anon
                && (page.anon_exclusive()
                    || (meta.refcount() == 1 && meta.mapcount() == 1 && meta.pincount() == 0));
            if reusable {
                page.set_anon_exclusive();
                make_writable(c);
                mm.counters.fault(FaultKind::WpReuse);
                return Ok(());
            }
        }
        // wp_page_copy: hold the old page, copy with no lock held, then replace under a
        // one-page CLEAR invalidation.
        let old = (!phys.is_zero_pfn(pfn)).then(|| phys.frame(pfn).get());
        c.unlock();
        let new = phys
            .alloc(
                0,
                FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
            )
            .map_err(|_| FaultError::Oom { addr: self.addr })?;
        mm.counters.frame_allocated();
        mm.new_anon_rmap(&new, self.vma, self.addr);
        match &old {
            Some(old) => new.copy_from(old),
            None => new.zero(),
        }
        let range = NotifierRange::new(
            mm.id(),
            self.page(),
            NotifierEvent::Clear,
            Some(self.vma.info()),
        );
        let inv = mm.notifiers().invalidate_range_start(range);
        let Some(Slot::Pte(p)) = c.current() else {
            unreachable!()
        };
        if p.get() != orig {
            c.unlock();
            inv.end();
            mm.release_frame(new);
            drop(old);
            return Ok(());
        }
        new.meta().inc_mapcount();
        let flags = if unshare {
            PteFlags::YOUNG | (orig.flags() & (PteFlags::DIRTY | PteFlags::STICKY))
        } else {
            PteFlags::WRITE | dirty_flags()
        };
        p.set(Pte::Present {
            pfn: new.into_raw(),
            flags,
        });
        c.unlock();
        // ptep_clear_flush: one flush of one page.
        mm.counters.tlb_flush(1);
        inv.end();
        if let Some(old) = old {
            old.meta().dec_mapcount();
            // Drop the mapping's reference (the handle's own goes with it).
            let _ = phys.frame(pfn).put();
            mm.release_frame(old);
        }
        mm.counters.fault(FaultKind::Cow);
        Ok(())
    }

    /// `remove_device_exclusive_entry`: restore the CPU mapping of a page a device held
    /// for exclusive access, after a one-page CLEAR invalidation with no owner.
    fn restore_exclusive(
        &self,
        c: &mut Cursor<'_>,
        orig: Pte,
        pfn: crate::addr::Pfn,
        flags: PteFlags,
    ) -> Result<(), FaultError> {
        let mm = self.mm;
        let Ok(folio) = mm.phys().frame(pfn).try_get() else {
            return Ok(());
        };
        c.unlock();
        folio.folio().meta().lock();
        let range = NotifierRange::new(
            mm.id(),
            self.page(),
            NotifierEvent::Clear,
            Some(self.vma.info()),
        );
        let inv = mm.notifiers().invalidate_range_start(range);
        if let Some(Slot::Pte(p)) = c.current() {
            if p.get() == orig {
                p.set(super::fork::restore_exclusive(
                    mm.phys(),
                    self.vma,
                    pfn,
                    flags,
                ));
                mm.counters.fault(FaultKind::DeviceExclusive);
            }
        }
        c.unlock();
        folio.folio().meta().unlock();
        inv.end();
        mm.release_frame(folio);
        Ok(())
    }
}

/// Sleeps until the migration that locked `folio` (found behind a migration entry) is
/// done (`migration_entry_wait_on_locked`). No reference is taken: one would be a reference
/// the migration does not expect, and it would back off and put every page back. Frame
/// metadata lives as long as the machine, so if the folio was freed and reused meanwhile
/// the wait is at worst spurious, and the fault is retried either way.
#[doc(alias = "migration_entry_wait_on_locked")]
pub(crate) fn wait_on_migration(folio: FrameRef<'_>) {
    folio.meta().wait_unlocked();
}
