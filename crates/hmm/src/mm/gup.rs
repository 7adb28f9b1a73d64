//! `get_user_pages` and `pin_user_pages`: fault pages in and hold them (the kernel's
//! `mm/gup.c`).
//!
//! For each page the walk checks the entry under its lock; if it does not satisfy the
//! request it runs the fault path (`FAULT_FLAG_REMOTE`, plus `WRITE` or `UNSHARE`) and
//! looks again, in the same walk. A satisfied entry gets one folio reference (`FOLL_GET`)
//! or one reference and one pin (`FOLL_PIN`), taken under the page-table lock, so the page
//! cannot be freed between the check and the reference.
//!
//! * A write request breaks COW first, so the page held is the one the process sees.
//! * A read-only pin of a shared anonymous page unshares it first (`gup_must_unshare`): a
//!   pinned page must be anon-exclusive, or a later COW would leave the pin holder looking
//!   at a page the process no longer maps. A read-only *long-term* pin of the shared zero
//!   page, the huge zero page (whose PMD is split first) or a page-cache page of a private
//!   writable mapping unshares too: the pin holds an exclusive anonymous copy, which the
//!   process's next write reuses instead of copying away from it, as the kernel promises
//!   since 6.2. A short-term read-only pin of those pins them as they are.
//! * Pins are what later operations check: `fork` copies pinned exclusive pages instead of
//!   sharing them, `MADV_COLLAPSE` and `MADV_FREE` reclaim skip them, and migration
//!   refuses them.
//! * A long-term pin (`FOLL_LONGTERM`) never holds device-coherent memory: such pages are
//!   migrated to system memory first, then the walk is retried
//!   (`migrate_longterm_unpinnable_folios`), so the pin holds the system copy.
//! * The mmap lock is taken per PMD-sized piece of the range, so no caller-sized range
//!   holds it long; the page list is bounded by `kvmalloc`'s limit before anything is taken.
//!
//! Unlike the kernel, which returns how many pages it got before the first failure, a
//! failure here releases what was taken and returns the error (see DESIGN.md).
//!
//! `MADV_POPULATE_READ`/`WRITE` run the same walk without taking anything
//! (`faultin_page_range`, `FOLL_MADV_POPULATE`): a read populate needs `VM_READ`, a write
//! populate `VM_WRITE` and breaks COW; their errors are madvise's (see [`Mm::populate`]).

use std::sync::Arc;

use bitflags::bitflags;

use crate::addr::{Pfn, VaRange, VirtAddr, PAGE_SIZE, PMD_SIZE};
use crate::pgtable::{Pte, Slot, WalkMode};
use crate::phys::{PhysMem, Zone};

use super::error::{FaultError, MmError};
use super::fault::{check_access, handle_mm_fault_retry, must_unshare, FaultFlags, Faulted};
use super::userfaultfd::UffdWait;
use super::Mm;

bitflags! {
    /// `FOLL_*` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct GupFlags: u32 {
        /// The caller will write to the pages (`FOLL_WRITE`).
        #[doc(alias = "FOLL_WRITE")]
        const WRITE = 1 << 0;
        /// Pin rather than just reference (`FOLL_PIN`): the pages are in use for DMA.
        #[doc(alias = "FOLL_PIN")]
        const PIN = 1 << 1;
        /// The pin lasts indefinitely (`FOLL_LONGTERM`); requires `PIN`.
        #[doc(alias = "FOLL_LONGTERM")]
        const LONGTERM = 1 << 2;
    }
}

/// Pages held by [`Mm::get_user_pages`] / [`Mm::pin_user_pages`]. Dropping it releases
/// them (`put_page` / `unpin_user_pages`); the address space may be gone by then.
#[must_use = "dropping the pages releases them at once"]
pub struct UserPages {
    phys: Arc<PhysMem>,
    pfns: Vec<Pfn>,
    flags: GupFlags,
}

impl UserPages {
    /// The page frames, in address order.
    pub fn pfns(&self) -> &[Pfn] {
        &self.pfns
    }

    /// Number of pages held.
    pub fn len(&self) -> usize {
        self.pfns.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    /// Whether the pages are pinned (`FOLL_PIN`) rather than referenced.
    pub fn is_pinned(&self) -> bool {
        self.flags.contains(GupFlags::PIN)
    }

    /// Reads from page `i` at `offset`, as a device doing DMA would.
    ///
    /// # Panics
    ///
    /// Panics if `i` is out of range or the access leaves the page.
    pub fn read(&self, i: usize, offset: usize, buf: &mut [u8]) {
        self.phys.frame(self.pfns[i]).read(offset, buf);
    }

    /// Writes to page `i` at `offset` and marks the folio dirty
    /// (`unpin_user_pages_dirty_lock` would).
    ///
    /// # Panics
    ///
    /// Panics if the pages were taken without `WRITE`, `i` is out of range, or the access
    /// leaves the page.
    pub fn write(&self, i: usize, offset: usize, data: &[u8]) {
        assert!(
            self.flags.contains(GupFlags::WRITE),
            "pages taken without FOLL_WRITE"
        );
        let f = self.phys.frame(self.pfns[i]);
        f.write(offset, data);
        f.mark_dirty();
    }

    /// Releases the pages now (the same as dropping).
    #[doc(alias = "unpin_user_pages")]
    #[doc(alias = "put_page")]
    pub fn release(self) {}
}

impl Drop for UserPages {
    fn drop(&mut self) {
        crate::sync::drop_work(|| {
            for pfn in self.pfns.drain(..) {
                let f = self.phys.frame(pfn);
                if self.flags.contains(GupFlags::PIN) {
                    f.folio().meta().dec_pincount();
                }
                let _ = f.put();
            }
        });
    }
}

impl std::fmt::Debug for UserPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPages")
            .field("pages", &self.pfns.len())
            .field("flags", &self.flags)
            .finish()
    }
}

impl Mm {
    /// Faults in and references `npages` pages from `start` (`get_user_pages`; with
    /// [`GupFlags::PIN`], `pin_user_pages`).
    ///
    /// The walk takes the mmap lock for one PMD-sized piece of the range at a time (as
    /// the kernel's pagemap read does), so a concurrent `munmap` never waits for more
    /// than 512 pages. With `LONGTERM`, device-coherent pages are first migrated to
    /// system memory and the walk is retried (`check_and_migrate_movable_folios`): a
    /// long-term pin must not hold device memory.
    ///
    /// Errors: `Inval` for an unaligned start, zero pages, a range beyond the address
    /// space, or `LONGTERM` without `PIN`; `NoMem` for more pages than a kvmalloc'd page
    /// array holds ([`kvmalloc::max_len`](crate::kvmalloc::max_len)), checked before
    /// anything is taken, or when a fault runs out of memory; `Fault` (EFAULT) where a
    /// page is not mapped or does not allow the access; `Busy` when a device-coherent page
    /// could not be migrated for a long-term pin. Nothing is held after an error.
    #[doc(alias = "get_user_pages_remote")]
    pub fn get_user_pages(
        &self,
        start: VirtAddr,
        npages: u64,
        flags: GupFlags,
    ) -> Result<UserPages, MmError> {
        if flags.contains(GupFlags::LONGTERM) && !flags.contains(GupFlags::PIN) {
            return Err(MmError::Inval {
                what: "FOLL_LONGTERM without FOLL_PIN",
            });
        }
        let range = super::page_range(start, npages)?;
        crate::kvmalloc::check_array::<Pfn>(npages).map_err(|_| MmError::NoMem {
            what: "more pages than a kvmalloc'd page array holds",
        })?;
        loop {
            let mut held = UserPages {
                phys: self.phys.clone(),
                pfns: Vec::new(),
                flags,
            };
            let mut coherent = Vec::new();
            for piece in range.pieces(PMD_SIZE) {
                self.faultin(
                    piece,
                    flags,
                    Take::Refs {
                        held: &mut held,
                        coherent: &mut coherent,
                    },
                )?;
            }
            if coherent.is_empty() {
                return Ok(held);
            }
            // The pins go first: a pinned page cannot migrate.
            drop(held);
            coherent.dedup();
            for head in coherent {
                crate::migrate::migrate_device_coherent_folio(self.phys(), head).map_err(|e| {
                    match e {
                        crate::migrate::CoherentMigrateError::Busy => MmError::Busy {
                            what: "a device-coherent page could not be migrated for FOLL_LONGTERM",
                        },
                        crate::migrate::CoherentMigrateError::NoMem => MmError::NoMem {
                            what: "no system memory to migrate a device-coherent page to",
                        },
                    }
                })?;
            }
        }
    }

    /// Faults in `range` so every page allows a read, or with `write` a write, without
    /// taking a reference (`faultin_page_range`, for `MADV_POPULATE_READ`/`WRITE`). The
    /// mmap lock is taken per PMD-sized piece.
    ///
    /// Errors, as the kernel's `madvise_populate`: `NoMem` where no VMA maps a page or
    /// memory runs out; `Inval` for a VMA without `VM_READ` (read) or `VM_WRITE` (write);
    /// `Fault` where the fault raises SIGBUS or SIGSEGV (past the end of a shared object).
    /// Pages before the failing one stay populated, as in Linux.
    #[doc(alias = "faultin_page_range")]
    pub(super) fn populate(&self, range: VaRange, write: bool) -> Result<(), MmError> {
        let flags = if write {
            GupFlags::WRITE
        } else {
            GupFlags::empty()
        };
        for piece in range.pieces(PMD_SIZE) {
            self.faultin(piece, flags, Take::Nothing)?;
        }
        Ok(())
    }

    /// [`faultin_piece`](Self::faultin_piece) until the piece is done: a fault that waits
    /// for a userfaultfd handler drops the mmap lock, and the piece goes on from that
    /// page once it is woken (`FOLL_UNLOCKABLE`).
    fn faultin(&self, piece: VaRange, flags: GupFlags, mut take: Take<'_>) -> Result<(), MmError> {
        let mut from = piece.start();
        loop {
            let rest = VaRange::new(from, piece.end()).expect("inside the piece");
            let Some((wait, at)) = self.faultin_piece(rest, flags, take.reborrow())? else {
                return Ok(());
            };
            wait.wait(self);
            if self.fatal_signal_pending() {
                return Err(MmError::Intr {
                    what: "a fatal signal while a fault waited for userfaultfd",
                });
            }
            from = at;
        }
    }

    /// One piece of [`get_user_pages`](Self::get_user_pages) or [`populate`](Self::populate)
    /// under the mmap lock: faults in what does not satisfy the request and does with each
    /// page what `take` says. Stops at a fault that must wait for a userfaultfd handler,
    /// returning the wait and the page it stopped at.
    fn faultin_piece(
        &self,
        range: VaRange,
        flags: GupFlags,
        mut take: Take<'_>,
    ) -> Result<Option<(UffdWait, VirtAddr)>, MmError> {
        let write = flags.contains(GupFlags::WRITE);
        let pin = flags.contains(GupFlags::PIN);
        let longterm = flags.contains(GupFlags::LONGTERM);
        let guard = self.mmap_read();
        let st = &*guard.state;
        let phys = self.phys();
        let mut fault = match take {
            Take::Refs { .. } => FaultFlags::REMOTE | FaultFlags::ALLOW_RETRY,
            Take::Nothing => FaultFlags::ALLOW_RETRY,
        };
        if write {
            fault |= FaultFlags::WRITE;
        } else if pin {
            fault |= FaultFlags::UNSHARE;
        }
        let mut c = st.pt.cursor(range, WalkMode::Lookup);
        let mut va = range.start();
        while va < range.end() {
            let vma = match take {
                Take::Refs { .. } => {
                    check_access(st.vmas.find(va), va, write).map_err(|e| fault_error(va, e))?
                }
                Take::Nothing => check_populate(st.vmas.find(va), write)?,
            };
            let slot = c.next().expect("walk covers the range");
            let next_page = va.checked_add(PAGE_SIZE).expect("inside the range");
            // The entry, the address its pfn maps, and the end of what it can serve.
            let (entry, base, end) = match &slot {
                Slot::Hole(_) => (Pte::None, va, next_page),
                Slot::Pte(p) => (p.get(), p.va(), next_page),
                Slot::Pmd(p) | Slot::Pud(p) => {
                    // At most to the next 2 MiB boundary under the leaf's lock: all of a
                    // PMD leaf, a 2 MiB piece of a 1 GiB PUD leaf.
                    let piece = va.align_down(PMD_SIZE).checked_add(PMD_SIZE);
                    let end = p.range().end().min(range.end());
                    (
                        p.get(),
                        p.range().start(),
                        piece.map_or(end, |e| e.min(end)),
                    )
                }
            };
            let ok = if write {
                entry.is_writable()
            } else {
                entry.is_accessible()
            };
            let head = entry.pfn().filter(|_| ok);
            match head {
                Some(pfn) if !(pin && !write && must_unshare(self, vma, pfn, longterm)) => {
                    if let Take::Refs { held, coherent } = &mut take {
                        let folio = phys.frame(pfn).folio();
                        if longterm && matches!(folio.zone(), Zone::DeviceCoherent { .. }) {
                            coherent.push(folio.nr());
                        }
                        for page in VaRange::new(va, end).expect("non-empty").pages() {
                            let off = page.offset_from(base).expect("inside the leaf") / PAGE_SIZE;
                            folio.meta().get();
                            if pin {
                                folio.meta().inc_pincount();
                            }
                            held.pfns.push(Pfn::new(pfn.as_u64() + off));
                        }
                    }
                    va = end;
                }
                _ => {
                    c.unlock();
                    let faulted = handle_mm_fault_retry(self, st, va, fault)
                        .map_err(|e| fault_error(va, e))?;
                    if let Faulted::Retry(wait) = faulted {
                        return Ok(Some((wait, va)));
                    }
                    c.again();
                }
            }
        }
        Ok(None)
    }

    /// Pins `npages` pages from `start` (`pin_user_pages`): [`get_user_pages`] with
    /// [`GupFlags::PIN`].
    ///
    /// [`get_user_pages`]: Self::get_user_pages
    pub fn pin_user_pages(
        &self,
        start: VirtAddr,
        npages: u64,
        flags: GupFlags,
    ) -> Result<UserPages, MmError> {
        self.get_user_pages(start, npages, flags | GupFlags::PIN)
    }
}

/// What [`Mm::faultin_piece`] does with each page that satisfies the request.
enum Take<'h> {
    /// `get_user_pages`: a reference (and a pin with `PIN`) on each page into `held`; with
    /// `LONGTERM`, the head of each device-coherent folio into `coherent`.
    Refs {
        held: &'h mut UserPages,
        coherent: &'h mut Vec<u64>,
    },
    /// `FOLL_MADV_POPULATE`: nothing.
    Nothing,
}

impl Take<'_> {
    fn reborrow(&mut self) -> Take<'_> {
        match self {
            Take::Refs { held, coherent } => Take::Refs { held, coherent },
            Take::Nothing => Take::Nothing,
        }
    }
}

/// The VMA checks of `FOLL_MADV_POPULATE` (`check_vma_flags` without `FOLL_FORCE`): no
/// VMA is ENOMEM, a VMA that does not allow the access EINVAL.
fn check_populate(vma: Option<&super::Vma>, write: bool) -> Result<&super::Vma, MmError> {
    let vma = vma.ok_or(MmError::NoMem {
        what: "range not fully mapped",
    })?;
    let need = if write {
        crate::prot::VmFlags::WRITE
    } else {
        crate::prot::VmFlags::READ
    };
    if vma.flags().contains(need) {
        Ok(vma)
    } else {
        Err(MmError::Inval {
            what: "the mapping does not allow the access MADV_POPULATE asks for",
        })
    }
}

fn fault_error(addr: VirtAddr, e: FaultError) -> MmError {
    match e {
        FaultError::Oom { .. } => MmError::NoMem {
            what: "out of memory while faulting pages in",
        },
        FaultError::Segv { .. } | FaultError::Bus { .. } => MmError::Fault { addr },
        FaultError::Killed { .. } => MmError::Intr {
            what: "a fatal signal while faulting pages in",
        },
    }
}
