//! `fork`: a child address space that shares its parent's anonymous pages copy-on-write
//! (the kernel's `dup_mmap` and `copy_page_range`).
//!
//! # Protocol
//!
//! The parent's mmap lock is held for writing for the whole copy, so no fault, access or
//! device walk of the parent runs meanwhile; the child is locked too, though nothing can
//! see it yet except reverse-map walks of its family, which wait.
//!
//! * Shared VMAs are copied without their entries: the child faults them in from the shared
//!   object or file (`vma_needs_copy` is false for them).
//! * A private VMA's entries are copied (anonymous memory and private file mappings, whose
//!   file pages are shared read-only like anonymous ones). If the VMA is a COW mapping (private and
//!   `MAYWRITE`) and holds any entry, one `PROTECTION_PAGE` invalidation covering the VMA
//!   brackets the copy, because writable entries become read-only in the parent.
//! * Present anonymous pages are shared: one more reference and map count, the page (the
//!   head, for a PMD) loses `ANON_EXCLUSIVE`, and writable entries are write-protected in parent and child, so the
//!   first write on either side copies (or reuses, once the other side is gone). The child's
//!   entries start old (not young).
//! * An anon-exclusive page that may be pinned (`pincount > 0`) is copied into the child at
//!   once instead (`copy_present_page`): a pin holder must keep seeing the parent's page.
//! * Migration entries are copied; writable and readable-exclusive ones become readable in
//!   both. Device-exclusive entries are first restored to present entries in the parent
//!   (`try_restore_exclusive_pte`), then copied as present.
//! * PMD leaves: the huge zero page, anonymous THPs and device THPs (device-private PMDs,
//!   read-only on both sides like their PTEs) are shared at PMD level; a THP that may be
//!   pinned is split and copied page by page.
//! * One TLB flush of the parent ends the fork (`flush_tlb_mm`).

use std::sync::Arc;

use crate::addr::{DevicePfn, VaRange, VirtAddr};
use crate::notifier::{Invalidation, NotifierEvent, NotifierRange};
use crate::pgtable::{MigrationKind, Pte, PteFlags, Slot, WalkMode};
use crate::phys::{AllocError, FrameFlags};
use crate::prot::VmFlags;

use super::error::MmError;
use super::rmap::AnonVma;
use super::tlb::TlbGather;
use super::userfaultfd::ForkCtxs;
use super::vma::{Backing, Vma};
use super::{hugetlb, thp, Mm, MmState};

impl Mm {
    /// Creates a child address space with a copy of this one's mappings (`fork`). Private
    /// memory is shared copy-on-write; shared memory stays shared.
    ///
    /// Errors: `NoMem` if a page that must be copied at once (a pinned anonymous page)
    /// cannot be allocated; the child is torn down and the parent keeps every byte (its
    /// entries may have been write-protected, which costs a later reuse fault at most).
    #[doc(alias = "dup_mm")]
    #[doc(alias = "dup_mmap")]
    pub fn fork(&self) -> Result<Arc<Mm>, MmError> {
        let parent = self.lock.write();
        let child = Mm::new_in_family(self.phys.clone(), AnonVma::new(Some(self.anon_vma.clone())));
        child.set_thp_mode(self.thp_mode());
        child.mthp_settings().copy_from(self.mthp_settings());
        let mut uffds = ForkCtxs::default();
        let copied = {
            let mut dst = child.lock.write();
            let mut tlb = TlbGather::new(self);
            let mut result = Ok(());
            // dup_mmap skips VM_DONTCOPY (MADV_DONTFORK) VMAs.
            for v in parent
                .vmas
                .iter()
                .filter(|v| !v.flags().contains(VmFlags::DONTCOPY))
            {
                // dup_userfaultfd: the registration follows only with fork events.
                let cv = uffds.child_vma(&child, v);
                let child_wp = cv.flags().contains(VmFlags::UFFD_WP);
                dst.vmas.insert(cv);
                match v.backing() {
                    Backing::Shmem(obj) => obj.mappers.add(&child.this),
                    Backing::Driver(d) => d.mappers.add(&child.this),
                    Backing::Anon => {}
                }
                // vma_needs_copy: private memory, and driver mappings (VM_COPY_ON_FORK).
                if !v.is_shared() || v.flags().contains(VmFlags::MIXEDMAP) {
                    result = self.copy_page_range(&parent, &child, &dst, v, child_wp, &mut tlb);
                    if result.is_err() {
                        break;
                    }
                }
            }
            tlb.finish();
            result
        };
        drop(parent);
        match copied {
            Ok(()) => {
                // dup_userfaultfd_complete: with no mmap lock held.
                uffds.send();
                Ok(child)
            }
            Err(_) => Err(MmError::NoMem {
                what: "no memory to copy a pinned page for the child",
            }),
        }
    }

    /// Copies the entries of one private VMA into `child`.
    fn copy_page_range(
        &self,
        src: &MmState,
        child: &Mm,
        dst: &MmState,
        vma: &Vma,
        child_wp: bool,
        tlb: &mut TlbGather<'_>,
    ) -> Result<(), AllocError> {
        // is_cow_mapping: private and may become writable.
        let cow = !vma.is_shared() && vma.flags().contains(VmFlags::MAYWRITE);
        let mut inv: Option<Invalidation<'_>> = None;
        let mut sc = src.pt.cursor(vma.range(), WalkMode::Lookup);
        let mut dc = dst.pt.cursor(vma.range(), WalkMode::Populate);
        let mut result = Ok(());
        while let Some(slot) = sc.next() {
            let (va, entry) = match &slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.va(), p.get()),
                Slot::Pmd(p) | Slot::Pud(p) => (p.range().start(), p.get()),
            };
            if entry.is_none() {
                continue;
            }
            if cow && inv.is_none() {
                // One PROTECTION_PAGE for the VMA, started with no page-table lock held.
                sc.unlock();
                inv = Some(self.notifiers.invalidate_range_start(NotifierRange::new(
                    self.id,
                    vma.range(),
                    NotifierEvent::ProtectionPage,
                    Some(vma.info()),
                )));
                sc.again();
                continue;
            }
            let copy = CopyCtx {
                parent: self,
                child,
                vma,
                cow,
                child_wp,
            };
            match slot {
                Slot::Hole(_) => unreachable!(),
                Slot::Pte(p) => {
                    dc.seek(va);
                    let Some(Slot::Pte(d)) = dc.next() else {
                        unreachable!("populate walks yield PTEs where the source has a table")
                    };
                    let (src_new, dst_new) = match copy.pte(p.get(), tlb, va) {
                        Ok(pair) => pair,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    };
                    if src_new != entry {
                        p.set(src_new);
                    }
                    d.set(copy.child_entry(dst_new, entry));
                }
                Slot::Pmd(p) => {
                    let leaf = p.range();
                    let copied = match copy.pmd(&p, tlb) {
                        Ok(c) => c,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    };
                    match copied {
                        Some(dst_new) => {
                            sc.unlock();
                            dc.unlock();
                            let pmd = dst.pt.lock_pmd(leaf.start(), WalkMode::Populate);
                            pmd.expect("populated")
                                .set_leaf(copy.child_entry(dst_new, entry));
                        }
                        None => {
                            // A pinned THP: split it in the parent and copy its PTEs.
                            sc.unlock();
                            thp::split_pmd(self, &src.pt, Some(vma.info()), leaf.start(), tlb);
                            sc.again();
                        }
                    }
                }
                Slot::Pud(p) => {
                    // A 1 GiB hugetlb page (copy_hugetlb_page_range at PUD level).
                    let leaf = p.range();
                    let dst_new = match copy.pmd(&p, tlb) {
                        Ok(c) => c.expect("a hugetlb page is copied or shared, never split"),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    };
                    sc.unlock();
                    dc.unlock();
                    let pud = dst.pt.lock_pud(leaf.start(), WalkMode::Populate);
                    let set = pud
                        .expect("populated")
                        .set_leaf(copy.child_entry(dst_new, entry));
                    assert!(set, "the child's new hugetlb VMA maps nothing");
                }
            }
        }
        drop(sc);
        drop(dc);
        if let Some(inv) = inv {
            inv.end();
        }
        result
    }
}

struct CopyCtx<'a> {
    parent: &'a Mm,
    child: &'a Mm,
    vma: &'a Vma,
    cow: bool,
    /// The child's VMA is registered for userfaultfd write-protection.
    child_wp: bool,
}

impl CopyCtx<'_> {
    /// The child's entry with the uffd-wp bit of the parent's `src` entry where the
    /// child's VMA keeps write-protection, and without it elsewhere (`copy_present_pte`,
    /// `copy_nonpresent_pte`: `pte_clear_uffd_wp` unless `userfaultfd_wp(dst_vma)`).
    fn child_entry(&self, child: Pte, src: Pte) -> Pte {
        child.with_uffd_wp(self.child_wp && src.is_uffd_wp())
    }

    /// The new parent entry and the child's entry for one PTE (`copy_present_pte`,
    /// `copy_nonpresent_pte`).
    fn pte(
        &self,
        entry: Pte,
        tlb: &mut TlbGather<'_>,
        va: VirtAddr,
    ) -> Result<(Pte, Pte), AllocError> {
        let phys = self.parent.phys();
        match entry {
            Pte::None => Ok((entry, entry)),
            Pte::Present { pfn, flags } => {
                let child_flags = flags - PteFlags::YOUNG;
                if phys.is_zero_pfn(pfn) {
                    return Ok((
                        entry,
                        Pte::Present {
                            pfn,
                            flags: child_flags,
                        },
                    ));
                }
                let page = phys.frame(pfn);
                let folio = page.folio();
                let fm = folio.meta();
                // folio_try_dup_anon_rmap_pte: an exclusive page of a pinned folio (maybe
                // pinned for DMA) is copied; otherwise the page, and only it, is shared.
                if page.anon_exclusive() && fm.pincount() > 0 {
                    // copy_present_page: the child gets its own copy now.
                    let new = phys.alloc(
                        0,
                        FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE,
                    )?;
                    self.child.counters.frame_allocated();
                    new.copy_from(&page);
                    self.child.new_anon_rmap(&new, self.vma, va);
                    new.meta().inc_mapcount();
                    let mut nf = PteFlags::YOUNG | PteFlags::DIRTY | PteFlags::SOFT_DIRTY;
                    if !self.vma.is_accessible() {
                        nf |= PteFlags::PROTNONE;
                    } else if self.vma.flags().contains(VmFlags::WRITE) {
                        nf |= PteFlags::WRITE;
                    }
                    return Ok((
                        entry,
                        Pte::Present {
                            pfn: new.into_raw(),
                            flags: nf,
                        },
                    ));
                }
                fm.get();
                page.meta().inc_mapcount();
                page.clear_anon_exclusive();
                if self.cow && flags.contains(PteFlags::WRITE) {
                    tlb.add_range(VaRange::page_of(va));
                    let wp = Pte::Present {
                        pfn,
                        flags: flags - PteFlags::WRITE,
                    };
                    let child = Pte::Present {
                        pfn,
                        flags: child_flags - PteFlags::WRITE,
                    };
                    return Ok((wp, child));
                }
                Ok((
                    entry,
                    Pte::Present {
                        pfn,
                        flags: child_flags,
                    },
                ))
            }
            Pte::Migration { pfn, kind, flags } => {
                let kind = if self.cow { MigrationKind::Read } else { kind };
                let e = Pte::Migration { pfn, kind, flags };
                Ok((e, e))
            }
            Pte::DeviceExclusive { pfn, flags } => {
                // try_restore_exclusive_pte, then copy as present. The entry keeps the
                // reference and map count it held; the PTE lock serialises the change.
                let restored = restore_exclusive(phys, self.vma, pfn, flags);
                let (p, c) = self.pte(restored, tlb, va)?;
                Ok((p, c))
            }
            Pte::DevicePrivate { pfn, flags } => {
                // copy_nonpresent_pte: the page cannot be pinned, so it is always shared;
                // a writable entry becomes readable on both sides in a COW mapping (no
                // flush: the CPU never mapped it). Soft-dirty is not kept.
                let page = phys.device_frame(pfn);
                page.folio().meta().get();
                page.meta().inc_mapcount();
                page.clear_anon_exclusive();
                Ok(self.share_device_private(pfn, flags))
            }
            Pte::Swap { slot, flags, .. } => {
                // copy_nonpresent_pte: swap_duplicate, and the page is exclusive to
                // neither side any more (pte_swp_clear_exclusive in both).
                phys.swap().expect("a swap entry has a device").dup(slot);
                let e = Pte::Swap {
                    slot,
                    exclusive: false,
                    flags,
                };
                Ok((e, e))
            }
        }
    }

    /// The parent's and the child's entries for a device-private entry (PTE or PMD) the
    /// two now share: read-only on both sides in a COW mapping, soft-dirty not kept in the
    /// child. The caller has taken the child's reference and map count.
    fn share_device_private(&self, pfn: DevicePfn, flags: PteFlags) -> (Pte, Pte) {
        let parent = Pte::DevicePrivate {
            pfn,
            flags: if self.cow {
                flags - PteFlags::WRITE
            } else {
                flags
            },
        };
        let child = Pte::DevicePrivate {
            pfn,
            flags: parent.flags() - PteFlags::SOFT_DIRTY,
        };
        (parent, child)
    }

    /// The child's entry for a PMD or PUD leaf (`copy_huge_pmd`,
    /// `copy_hugetlb_page_range`), updating the parent's; `None` when a THP may be pinned
    /// and must be split and copied by PTE instead. A pinned exclusive hugetlb page is
    /// copied whole at once; a hugetlb page that is not exclusive is shared, pinned or not
    /// (`hugetlb_try_dup_anon_rmap` fails only for exclusive pinned pages).
    fn pmd(
        &self,
        p: &crate::pgtable::LeafSlot<'_>,
        tlb: &mut TlbGather<'_>,
    ) -> Result<Option<Pte>, AllocError> {
        let phys = self.parent.phys();
        let entry = p.get();
        Ok(match entry {
            Pte::Present { pfn, flags } => {
                let child_flags = flags - PteFlags::YOUNG;
                if phys.is_huge_zero_pfn(pfn) {
                    return Ok(Some(Pte::Present {
                        pfn,
                        flags: child_flags,
                    }));
                }
                let fm = phys.frame(pfn).meta();
                let exclusive = fm.flags().contains(FrameFlags::ANON_EXCLUSIVE);
                let hugetlb = hugetlb::is_hugetlb(self.vma);
                if fm.pincount() > 0 && exclusive && hugetlb {
                    return self.copy_hugetlb_page(pfn, p.range().start()).map(Some);
                }
                if fm.pincount() > 0 && !hugetlb {
                    return Ok(None);
                }
                fm.get();
                fm.inc_entire_mapcount();
                fm.clear_flags(FrameFlags::ANON_EXCLUSIVE);
                if self.cow && flags.contains(PteFlags::WRITE) {
                    tlb.add_range(p.range());
                    p.set(Pte::Present {
                        pfn,
                        flags: flags - PteFlags::WRITE,
                    });
                    return Ok(Some(Pte::Present {
                        pfn,
                        flags: child_flags - PteFlags::WRITE,
                    }));
                }
                Some(Pte::Present {
                    pfn,
                    flags: child_flags,
                })
            }
            Pte::Migration { pfn, kind, flags } => {
                let kind = if self.cow { MigrationKind::Read } else { kind };
                let e = Pte::Migration { pfn, kind, flags };
                p.set(e);
                Some(e)
            }
            Pte::None => Some(Pte::None),
            Pte::DevicePrivate { pfn, flags } => {
                // copy_huge_pmd of a device THP: shared, like the PTE case, and read-only
                // on both sides in a COW mapping (no flush: the CPU never mapped it).
                let fm = phys.device_frame(pfn).meta();
                fm.get();
                fm.inc_entire_mapcount();
                fm.clear_flags(FrameFlags::ANON_EXCLUSIVE);
                let (e, child) = self.share_device_private(pfn, flags);
                p.set(e);
                Some(child)
            }
            Pte::DeviceExclusive { .. } | Pte::Swap { .. } => {
                unreachable!("device-exclusive and swap entries are PTEs")
            }
        })
    }

    /// A copy of the pinned hugetlb page `pfn` mapped at `va`, for the child, from pool
    /// pages nobody reserved (a child has no reservations).
    fn copy_hugetlb_page(&self, pfn: crate::addr::Pfn, va: VirtAddr) -> Result<Pte, AllocError> {
        let phys = self.parent.phys();
        let flags = FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE;
        let order = phys.frame(pfn).meta().order();
        let size = crate::phys::HugetlbSize::of_order(order).expect("a hugetlb folio");
        let new = phys
            .hugetlb_alloc(size, false, flags)
            .ok_or(AllocError { order })?;
        self.child.counters.frame_allocated();
        hugetlb::copy_huge_page(self.parent, pfn, &new, size);
        self.child.new_anon_rmap(&new, self.vma, va);
        new.meta().inc_entire_mapcount();
        let mut nf = PteFlags::YOUNG | PteFlags::DIRTY | PteFlags::SOFT_DIRTY;
        if !self.vma.is_accessible() {
            nf |= PteFlags::PROTNONE;
        } else if self.vma.flags().contains(VmFlags::WRITE) {
            nf |= PteFlags::WRITE;
        }
        Ok(Pte::Present {
            pfn: new.into_raw(),
            flags: nf,
        })
    }
}

/// The present entry a device-exclusive entry stands for (`restore_exclusive_pte`):
/// writable if the VMA is and the page is anon-exclusive.
pub(super) fn restore_exclusive(
    phys: &crate::phys::PhysMem,
    vma: &Vma,
    pfn: crate::addr::Pfn,
    flags: PteFlags,
) -> Pte {
    let page = phys.frame(pfn);
    let meta = page.folio().meta();
    let mut new = flags & PteFlags::STICKY;
    if !vma.is_accessible() {
        new |= PteFlags::PROTNONE;
    } else if vma.flags().contains(VmFlags::WRITE)
        && page.anon_exclusive()
        && !new.contains(PteFlags::UFFD_WP)
    {
        new |= PteFlags::WRITE;
        if meta.flags().contains(FrameFlags::DIRTY) {
            new |= PteFlags::DIRTY;
        }
    }
    Pte::Present { pfn, flags: new }
}
