//! `mprotect`: change VMA protection and downgrade or upgrade entries under one
//! PROTECTION_VMA invalidation per VMA.

use crate::addr::{VaRange, VirtAddr, TASK_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{MigrationKind, PageTable, Pte, PteFlags, Slot, WalkMode};
use crate::phys::FrameFlags;
use crate::prot::{Prot, VmFlags};

use super::error::MmError;
use super::tlb::TlbGather;
use super::vma::Vma;
use super::{hugetlb, page_align_len, thp, Mm};

impl Mm {
    /// Changes the protection of `[addr, addr + len)` (len rounded up to pages).
    ///
    /// Errors: `Inval` for an unaligned address; `NoMem` for a range beyond the address
    /// space or one not entirely mapped; `Access` for a protection a VMA may not have.
    /// Unlike Linux, which changes the VMAs before the first hole and then fails, a range
    /// with a hole changes nothing (see DESIGN.md).
    #[doc(alias = "do_mprotect_pkey")]
    pub fn mprotect(&self, addr: VirtAddr, len: u64, prot: Prot) -> Result<(), MmError> {
        if !addr.is_page_aligned() {
            return Err(MmError::Inval {
                what: "unaligned address",
            });
        }
        if len == 0 {
            return Ok(());
        }
        let nomem = MmError::NoMem {
            what: "range beyond the address space",
        };
        let len = page_align_len(len).ok_or(nomem)?;
        if addr.as_u64() > TASK_SIZE || len > TASK_SIZE - addr.as_u64() {
            return Err(nomem);
        }
        let range = VaRange::from_len(addr, len).expect("validated range");
        let mut st = self.lock.write();
        if st.vmas.first_hole(range).is_some() {
            return Err(MmError::NoMem {
                what: "range not fully mapped",
            });
        }
        hugetlb::check_range(&st.vmas, range)?;
        let want = VmFlags::from_prot(prot);
        for v in st.vmas.overlapping(range) {
            let may = VmFlags::from_bits_truncate(
                (v.flags() & (VmFlags::MAYREAD | VmFlags::MAYWRITE | VmFlags::MAYEXEC)).bits() >> 4,
            );
            if !may.contains(want) {
                return Err(MmError::Access {
                    what: "protection not allowed by the mapping",
                });
            }
        }
        let changed = st
            .vmas
            .update_flags(range, |f| (f - VmFlags::ACCESS) | want);
        for v in &changed {
            self.change_protection(&st.pt, v, v.range(), CpMode::Prot);
        }
        Ok(())
    }

    /// `change_protection` over `range` of one VMA (already carrying its new flags). The
    /// PROTECTION_VMA invalidation starts at the first populated slot, as the kernel starts
    /// it at the first non-empty PMD. A PMD leaf the range covers only in part is split.
    pub(super) fn change_protection(&self, pt: &PageTable, vma: &Vma, part: VaRange, mode: CpMode) {
        let mut c = pt.cursor(part, WalkMode::Lookup);
        let mut inv = None;
        let mut tlb = TlbGather::new(self);
        while let Some(slot) = c.next() {
            let (old, range) = match &slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.get(), VaRange::page_of(p.va())),
                Slot::Pmd(p) | Slot::Pud(p) => (p.get(), p.range()),
            };
            if old.is_none() {
                continue;
            }
            if inv.is_none() {
                // Start the invalidation with no page-table lock held, then re-take the slot.
                let start = range.start().max(part.start());
                c.unlock();
                let r = VaRange::new(start, part.end()).expect("inside the range");
                inv = Some(self.notifiers.invalidate_range_start(NotifierRange::new(
                    self.id,
                    r,
                    NotifierEvent::ProtectionVma,
                    Some(vma.info()),
                )));
                c.again();
                continue;
            }
            if matches!(slot, Slot::Pmd(_)) && !part.contains_range(&range) {
                c.unlock();
                thp::split_pmd(self, pt, Some(vma.info()), range.start(), &mut tlb);
                c.again();
                continue;
            }
            let new = self.protect_entry(vma, old, mode);
            if new != old {
                match slot {
                    Slot::Pte(p) => p.set(new),
                    Slot::Pmd(p) | Slot::Pud(p) => p.set(new),
                    Slot::Hole(_) => unreachable!(),
                }
                if old.is_accessible() {
                    tlb.add_range(range);
                }
            }
        }
        drop(c);
        tlb.finish();
        if let Some(inv) = inv {
            inv.end();
        }
    }

    /// The entry `old` becomes under `vma`'s protection, with its uffd-wp bit set,
    /// cleared or kept as `mode` says. An entry with the bit is never made writable
    /// (`can_change_pte_writable`).
    fn protect_entry(&self, vma: &Vma, old: Pte, mode: CpMode) -> Pte {
        let phys = self.phys();
        let flags = vma.flags();
        let wp = match mode {
            CpMode::Prot => old.is_uffd_wp(),
            CpMode::UffdWp => true,
            CpMode::UffdWpResolve => false,
        };
        match old {
            Pte::None => old,
            Pte::Present { pfn, flags: f } => {
                let mut nf = f - PteFlags::WRITE - PteFlags::PROTNONE - PteFlags::UFFD_WP;
                if wp {
                    nf |= PteFlags::UFFD_WP;
                }
                if !vma.is_accessible() {
                    nf |= PteFlags::PROTNONE;
                } else if !wp
                    && flags.contains(VmFlags::WRITE)
                    && !phys.is_zero_pfn(pfn)
                    && !phys.is_huge_zero_pfn(pfn)
                {
                    // can_change_pte_writable: shared pages, or anon-exclusive ones, and
                    // not while soft-dirty tracking waits for this page's first write.
                    let shared = vma.is_shared();
                    let exclusive = phys.frame(pfn).anon_exclusive();
                    let tracking =
                        !flags.contains(VmFlags::SOFTDIRTY) && !f.contains(PteFlags::SOFT_DIRTY);
                    if (shared || exclusive) && !tracking {
                        nf |= PteFlags::WRITE;
                    }
                }
                Pte::Present { pfn, flags: nf }
            }
            Pte::Migration {
                pfn,
                kind: MigrationKind::Write,
                flags: f,
            } => {
                // "A protection check is difficult so just be safe and disable write."
                let folio = phys.frame_nr(pfn.nr()).folio();
                let kind = if folio.meta().flags().contains(FrameFlags::ANON) {
                    MigrationKind::ReadExclusive
                } else {
                    MigrationKind::Read
                };
                Pte::Migration {
                    pfn,
                    kind,
                    flags: f,
                }
                .with_uffd_wp(wp)
            }
            Pte::DevicePrivate { pfn, flags: f } => Pte::DevicePrivate {
                pfn,
                flags: f - PteFlags::WRITE,
            }
            .with_uffd_wp(wp),
            Pte::Migration { .. } | Pte::DeviceExclusive { .. } | Pte::Swap { .. } => {
                old.with_uffd_wp(wp)
            }
        }
    }
}

/// What [`Mm::change_protection`] does to the entries (`MM_CP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CpMode {
    /// Apply the VMA's protection (`mprotect`); uffd-wp bits stay.
    Prot,
    /// Set the uffd-wp bit, write-protecting (`MM_CP_UFFD_WP`).
    UffdWp,
    /// Clear the uffd-wp bit and make writable where allowed
    /// (`MM_CP_UFFD_WP_RESOLVE | MM_CP_TRY_CHANGE_WRITABLE`).
    UffdWpResolve,
}
