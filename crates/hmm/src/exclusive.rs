//! `make_device_exclusive`: give a device exclusive access to a system page, for device
//! atomics, until the CPU touches it.
//!
//! The page is faulted in writable (a THP mapping is split to PTEs first), its folio
//! locked, an `MMU_NOTIFY_EXCLUSIVE` invalidation carrying the caller's owner raised for
//! the one page, and, if the same page is still mapped writable, its PTE replaced by a
//! device-exclusive entry (which keeps the mapping's reference and map count; the dirty
//! bit moves to the folio). The page comes back locked and referenced in an
//! [`ExclusivePage`]; dropping it unlocks and releases it.
//!
//! Any later CPU access revokes it: the fault restores the PTE after a one-page CLEAR
//! invalidation with no owner (see `mm::fault`); fork restores it before copying.
//!
//! ```
//! use hmm::addr::PAGE_SIZE;
//! use hmm::exclusive::make_device_exclusive;
//! use hmm::mm::{MapFlags, Mm, Prot, SwapKind};
//! use hmm::notifier::Owner;
//! use hmm::phys::{PhysConfig, PhysMem};
//!
//! let mm = Mm::new(PhysMem::new(PhysConfig::with_size(16 << 20))?);
//! let a = mm.mmap(None, PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
//! mm.write_val(a, 41u64)?;
//! {
//!     let mmap = mm.mmap_read();
//!     let page = make_device_exclusive(&mmap, a, Some(Owner::new_unique()))?;
//!     page.page().write(0, &42u64.to_le_bytes()); // the device's atomic
//! } // the page is unlocked; the entry stays device-exclusive
//! assert_eq!(mm.pagemap(a, 1)?[0].swap, Some(SwapKind::DeviceExclusive));
//! assert_eq!(mm.read_val::<u64>(a)?, 42); // the CPU's access revokes it
//! assert!(mm.pagemap(a, 1)?[0].present);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use thiserror::Error;

use crate::addr::{VaRange, VirtAddr};
use crate::mm::{FaultError, FaultFlags, MmapReadGuard, Vma};
use crate::notifier::{NotifierEvent, NotifierRange, Owner};
use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
use crate::phys::{Frame, FrameFlags, FrameRef};
use crate::prot::VmFlags;

/// Why a page could not be made exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ExclusiveError {
    /// No VMA, a VMA without write permission, or the fault failed (`-EFAULT`).
    #[error("cannot fault {addr} in writable")]
    Fault {
        /// The address.
        addr: VirtAddr,
    },
    /// The page faulted in writable is not anonymous (shared memory, a shared file
    /// mapping; a private file mapping's COW copy is anonymous), or hugetlb
    /// (`-EOPNOTSUPP`).
    #[error("{addr} is not private anonymous memory")]
    NotSupported {
        /// The address.
        addr: VirtAddr,
    },
    /// No memory to fault the page in (`-ENOMEM`).
    #[error("out of memory faulting {addr}")]
    NoMem {
        /// The address.
        addr: VirtAddr,
    },
}

/// A page made device-exclusive: its folio is locked and referenced until this is
/// dropped.
#[must_use = "the folio stays locked until the page is dropped"]
pub struct ExclusivePage<'a> {
    page: Frame<'a>,
}

impl<'a> ExclusivePage<'a> {
    /// The page (map it for the device's atomics, then drop this).
    pub fn page(&self) -> FrameRef<'a> {
        *self.page
    }
}

impl Drop for ExclusivePage<'_> {
    fn drop(&mut self) {
        let page = &self.page;
        crate::sync::drop_work(|| page.folio().meta().unlock());
    }
}

impl std::fmt::Debug for ExclusivePage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExclusivePage")
            .field("pfn", &self.page.pfn())
            .finish()
    }
}

/// Makes the page at `addr` exclusive to a device (`make_device_exclusive`), with the
/// caller's `owner` on the EXCLUSIVE invalidation; see the [module documentation](self).
pub fn make_device_exclusive<'g>(
    mmap: &'g MmapReadGuard<'_>,
    addr: VirtAddr,
    owner: Option<Owner>,
) -> Result<ExclusivePage<'g>, ExclusiveError> {
    let addr = addr.page_down();
    let vma: &Vma = mmap
        .vma_lookup(addr)
        .ok_or(ExclusiveError::Fault { addr })?;
    if !vma.flags().contains(VmFlags::WRITE) {
        return Err(ExclusiveError::Fault { addr });
    }
    if vma.flags().contains(VmFlags::HUGETLB) {
        return Err(ExclusiveError::NotSupported { addr });
    }
    let mm = mmap.mm();
    let phys: &'g crate::phys::PhysMem = mm.phys();
    let page = VaRange::page_of(addr);
    loop {
        // Fault the page in writable, with PTEs (FOLL_WRITE | FOLL_SPLIT_PMD).
        let mut c = mmap.page_table().cursor(page, WalkMode::Lookup);
        let found = match c.next() {
            Some(Slot::Pte(p)) => match p.get() {
                Pte::Present { pfn, flags } if flags.contains(PteFlags::WRITE) => {
                    Some((pfn, phys.frame(pfn).get()))
                }
                _ => None,
            },
            Some(Slot::Pud(_)) => unreachable!("PUD leaves map only hugetlb VMAs"),
            Some(Slot::Pmd(p)) => {
                let base = p.range().start();
                c.unlock();
                let mut tlb = crate::mm::tlb::TlbGather::new(mm);
                crate::mm::split_pmd(mm, mmap.page_table(), Some(vma.info()), base, &mut tlb);
                continue;
            }
            Some(Slot::Hole(_)) | None => None,
        };
        drop(c);
        let Some((pfn, held)) = found else {
            mmap.handle_mm_fault(addr, FaultFlags::WRITE | FaultFlags::REMOTE)
                .map_err(|e| match e {
                    FaultError::Oom { .. } => ExclusiveError::NoMem { addr },
                    FaultError::Segv { .. }
                    | FaultError::Bus { .. }
                    | FaultError::Killed { .. } => ExclusiveError::Fault { addr },
                })?;
            continue;
        };
        let folio = held.folio();
        if !folio.meta().flags().contains(FrameFlags::ANON) {
            return Err(ExclusiveError::NotSupported { addr });
        }
        folio.meta().lock();
        let inv = mm.notifiers().invalidate_range_start(
            NotifierRange::new(mm.id(), page, NotifierEvent::Exclusive, Some(vma.info()))
                .with_owner(owner),
        );
        let mut c = mmap.page_table().cursor(page, WalkMode::Lookup);
        let done = match c.next() {
            Some(Slot::Pte(p)) => match p.get() {
                Pte::Present { pfn: now, flags }
                    if now == pfn && flags.contains(PteFlags::WRITE) =>
                {
                    if flags.contains(PteFlags::DIRTY) {
                        folio.meta().set_flags(FrameFlags::DIRTY);
                    }
                    p.set(Pte::DeviceExclusive {
                        pfn,
                        flags: flags & PteFlags::STICKY,
                    });
                    true
                }
                _ => false,
            },
            _ => false,
        };
        drop(c);
        if done {
            // ptep_clear_flush of the one page.
            mm.counters().tlb_flush(1);
        }
        inv.end();
        if done {
            return Ok(ExclusivePage { page: held });
        }
        // The entry changed meanwhile: try again.
        folio.meta().unlock();
        drop(held);
    }
}
