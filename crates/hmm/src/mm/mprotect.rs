//! `mprotect`: change VMA protection and downgrade or upgrade entries under one
//! PROTECTION_VMA invalidation per VMA.

use crate::addr::{VaRange, VirtAddr, TASK_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{MigrationKind, PageTable, Pte, PteFlags, PteSlot, Slot, WalkMode};
use crate::phys::FrameFlags;
use crate::prot::{Prot, VmFlags};

use super::error::MmError;
use super::tlb::TlbGather;
use super::vma::{Backing, Vma};
use super::{page_align_len, Mm};

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
        let changed: Vec<Vma> = st
            .vmas
            .isolate(range)
            .filter(|v| v.flags() & VmFlags::ACCESS != want)
            .map(|v| {
                v.set_flags((v.flags() - VmFlags::ACCESS) | want);
                v.clone()
            })
            .collect();
        for v in &changed {
            self.change_protection(&st.pt, v);
        }
        for v in st
            .vmas
            .overlapping(range)
            .map(|v| v.start())
            .collect::<Vec<_>>()
        {
            if st.vmas.find(v).is_some_and(|x| x.start() == v) {
                st.vmas.merge_around(v);
            }
        }
        if let Some(after) = st.vmas.find(range.end()).map(|v| v.start()) {
            st.vmas.merge_around(after);
        }
        Ok(())
    }

    /// `change_protection` over one VMA (already carrying its new flags). The
    /// PROTECTION_VMA invalidation starts at the first populated slot, as the kernel starts
    /// it at the first non-empty PMD.
    fn change_protection(&self, pt: &PageTable, vma: &Vma) {
        let phys = self.phys();
        let flags = vma.flags();
        let accessible = vma.is_accessible();
        let writable = flags.contains(VmFlags::WRITE);
        let shared = matches!(vma.backing(), Backing::Shmem(_));
        let process = |p: &PteSlot<'_>, tlb: &mut TlbGather<'_>| {
            let old = p.get();
            let new = match old {
                Pte::None => return,
                Pte::Present { pfn, flags: f } => {
                    let mut nf = f - PteFlags::WRITE - PteFlags::PROTNONE;
                    if !accessible {
                        nf |= PteFlags::PROTNONE;
                    } else if writable && !phys.is_zero_pfn(pfn) {
                        // MM_CP_TRY_CHANGE_WRITABLE: shared pages, or anon-exclusive ones.
                        let exclusive = phys
                            .frame(pfn)
                            .folio()
                            .meta()
                            .flags()
                            .contains(FrameFlags::ANON_EXCLUSIVE);
                        if shared || exclusive {
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
                    let folio = phys.frame(pfn).folio();
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
                }
                Pte::DevicePrivate { pfn, flags: f } => Pte::DevicePrivate {
                    pfn,
                    flags: f - PteFlags::WRITE,
                },
                Pte::Migration { .. } | Pte::DeviceExclusive { .. } => old,
            };
            if new != old {
                p.set(new);
                if old.is_accessible() {
                    tlb.add_range(VaRange::page_of(p.va()));
                }
            }
        };
        let mut c = pt.cursor(vma.range(), WalkMode::Lookup);
        let mut inv = None;
        let mut tlb = TlbGather::new(self);
        while let Some(slot) = c.next() {
            let p = match slot {
                Slot::Hole(_) => continue,
                Slot::Pmd(p) => unreachable!("PMD leaf at {:?} before THP support", p.range()),
                Slot::Pte(p) => p,
            };
            if inv.is_some() {
                process(&p, &mut tlb);
                continue;
            }
            // Start the invalidation with no page-table lock held, then re-take the slot.
            let va = p.va();
            c.unlock();
            let r = VaRange::new(va, vma.end()).expect("inside VMA");
            inv = Some(self.notifiers.invalidate_range_start(NotifierRange::new(
                self.id,
                r,
                NotifierEvent::ProtectionVma,
                Some(vma.info()),
            )));
            let Some(Slot::Pte(p)) = c.current() else {
                unreachable!("the table stays while the mmap lock is held for writing")
            };
            process(&p, &mut tlb);
        }
        drop(c);
        tlb.finish();
        if let Some(inv) = inv {
            inv.end();
        }
    }
}
