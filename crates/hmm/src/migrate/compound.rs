//! Compound units: migrating a PMD-sized unit whole (device THP migration,
//! `MIGRATE_VMA_SELECT_COMPOUND`, `MIGRATE_PFN_COMPOUND`).
//!
//! # The unit
//!
//! With [`SELECT_COMPOUND`](super::MigrateVmaFlags::SELECT_COMPOUND), a 2 MiB-aligned unit
//! that lies wholly inside the range is collected as one entry: the word of its first page
//! has `COMPOUND`, the 511 words after it are 0 (so that the unit can still be split
//! later). Three things become units:
//!
//! * an anonymous THP mapped by a PMD leaf (with `SELECT_SYSTEM`; a device-coherent THP
//!   with `SELECT_DEVICE_COHERENT` and the owner): the leaf becomes one PMD migration
//!   entry, the word names the head (`WRITE` if the leaf was writable);
//! * a device THP of the owner, mapped by a device-private PMD (with
//!   `SELECT_DEVICE_PRIVATE`): likewise;
//! * an empty PMD of an anonymous VMA, or the huge zero page: `MIGRATE | COMPOUND` with no
//!   page (nothing changes in the page table; the huge zero page stays mapped).
//!
//! Anything else, and any unit not wholly inside the range, is collected page by page as
//! before (a PMD leaf is split first). A THP whose exclusive page is pinned is split too,
//! as the kernel falls back when `set_pmd_migration_entry` fails.
//!
//! # Committing a unit (`migrate_vma_pages`)
//!
//! The driver gives the unit one order-9 destination (its word then has `COMPOUND`), or
//! order-0 destinations for each of its 512 entries, or none:
//!
//! | source | destination | what happens |
//! |---|---|---|
//! | page | order 9 | the folio's metadata moves whole; finalize maps the destination with one PMD |
//! | page | order 0 | the still-unmapped source is split (`migrate_vma_split_unmapped_folio`): its PMD migration entries become 512 PTE migration entries, the folio 512 order-0 folios, the one word 512 words; each entry then migrates with its destination, or not |
//! | hole | order 9 | one PMD leaf is inserted (`migrate_vma_insert_huge_pmd_page`): a device-private PMD, or a present one; over an empty PMD or the huge zero page only |
//! | hole | order 0 | the entries are inserted page by page |
//! | not a unit | order 9 | the entry does not migrate |
//!
//! Finalize turns a PMD migration entry into a PMD mapping of the destination (or of the
//! source, where the unit did not migrate), in this address space and, through the
//! reverse map, in every other one that maps the folio.

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT, PMD_NR, PMD_ORDER, PMD_SIZE};
use crate::mm::tlb::TlbGather;
use crate::mm::{split_pmd, Mm, MmState};
use crate::pgtable::{
    Huge, LeafSlot, MigrationKind, MigrationPfn, PmdEntry, Pte, PteFlags, WalkMode,
};
use crate::phys::{FrameFlags, FrameRef, PhysMem};

use super::collect::Refused;
use super::commit::{map_new_anon, State};
use super::pfn::{MigratePfn, MigratePfnFlags, MigrateVmaFlags};

/// What the walk does with a PMD leaf of a migrating range.
pub(crate) enum PmdNext {
    /// Collected whole as one unit.
    Collected,
    /// Not selected: the leaf stays as it is and its pages are not collected.
    Skip,
    /// Split the leaf and collect its pages one by one.
    Split,
}

/// Whether any page of the folio headed by `head` is mapped (`folio_mapped`).
pub(crate) fn folio_mapped(phys: &PhysMem, head: FrameRef<'_>) -> bool {
    let m = head.meta();
    m.entire_mapcount() > 0
        || (0..1u64 << m.order()).any(|k| phys.frame_nr(head.nr() + k).meta().mapcount() > 0)
}

impl State<'_, '_> {
    /// Whether entries `i..i + 512` may be collected as one unit: `SELECT_COMPOUND`, and
    /// the unit starts at a 2 MiB boundary with all its pages inside the range.
    pub(super) fn unit_fits(&self, i: usize) -> bool {
        let va = self.addr(i);
        self.flags.contains(MigrateVmaFlags::SELECT_COMPOUND)
            && va.is_aligned(PMD_SIZE)
            && i + PMD_NR as usize <= self.src.len()
    }

    /// Pages collected: `cpages`, with each unit counted as its 512 pages.
    pub(super) fn collected_pages(&self) -> u64 {
        self.src
            .iter()
            .filter(|w| w.is_migrating())
            .map(|w| w.npages())
            .sum()
    }

    /// The index of the head of the unit entry `i` belongs to, if it belongs to one. A
    /// unit starts at a 2 MiB boundary, so the only candidate is the entry of the boundary
    /// at or below entry `i`'s address: one look, whatever `i` (a driver copying a unit
    /// page by page asks 512 times).
    pub(super) fn unit_head(&self, i: usize) -> Option<usize> {
        let off = (self.addr(i).as_u64() >> PAGE_SHIFT) % PMD_NR;
        let h = i.checked_sub(off as usize)?;
        self.src[h]
            .flags()
            .contains(MigratePfnFlags::COMPOUND)
            .then_some(h)
    }

    /// Collects entry `i` and the 511 after it as one empty unit (an empty PMD or the huge
    /// zero page of anonymous memory).
    pub(super) fn collect_empty_unit(&mut self, i: usize) {
        self.src[i] = MigratePfn::flags_only(MigratePfnFlags::MIGRATE | MigratePfnFlags::COMPOUND);
        self.cpages += 1;
    }

    /// Collects the PMD leaf `p` (`migrate_vma_collect_huge_pmd`): a THP or a device THP of
    /// the owner becomes one unit behind a PMD migration entry if `whole` (the unit fits
    /// and every page of it is to migrate), else its pages are collected after a split;
    /// the huge zero page is left to the caller (an empty unit, or a split).
    pub(super) fn collect_pmd(
        &mut self,
        p: &LeafSlot<'_>,
        whole: bool,
        tlb: &mut TlbGather<'_>,
    ) -> PmdNext {
        let phys = self.phys();
        let leaf = p.get();
        let (head, writable, flags, target, present) = match leaf {
            Pte::Present { pfn, flags } => {
                if !self.selects(phys.frame(pfn).zone()) {
                    return PmdNext::Skip;
                }
                (
                    phys.frame(pfn),
                    flags.contains(PteFlags::WRITE),
                    flags,
                    MigrationPfn::Cpu(pfn),
                    !flags.contains(PteFlags::PROTNONE),
                )
            }
            Pte::DevicePrivate { pfn, flags } => {
                if !self.selects(phys.device_frame(pfn).zone()) {
                    return PmdNext::Skip;
                }
                (
                    phys.device_frame(pfn),
                    flags.contains(PteFlags::WRITE),
                    flags,
                    MigrationPfn::Device(pfn),
                    false,
                )
            }
            Pte::Migration { .. } | Pte::None | Pte::DeviceExclusive { .. } | Pte::Swap { .. } => {
                return PmdNext::Skip
            }
        };
        if !whole {
            return PmdNext::Split;
        }
        let fm = head.meta();
        debug_assert_eq!(fm.order(), PMD_ORDER, "a PMD leaf maps a THP head");
        let anon_exclusive = match self.take_folio(head) {
            Ok(exclusive) => exclusive,
            Err(Refused::Locked) => return PmdNext::Skip,
            // A pinned exclusive THP cannot be shared: the kernel then splits it and goes
            // on page by page (set_pmd_migration_entry fails).
            Err(Refused::Pinned) => return PmdNext::Split,
        };
        p.set(Pte::Migration {
            pfn: target,
            kind: MigrationKind::for_mapping(writable, anon_exclusive),
            flags: flags & PteFlags::CARRIED,
        });
        if flags.contains(PteFlags::DIRTY) {
            fm.set_flags(FrameFlags::DIRTY);
        }
        if present {
            tlb.add_range(p.range());
        }
        // The leaf's entire map count and reference go; the migration holds its own.
        fm.dec_entire_mapcount();
        let _ = head.put();
        let i = self.index(p.range().start());
        self.shared[i] = folio_mapped(phys, head);
        let mut mflags = MigratePfnFlags::MIGRATE | MigratePfnFlags::COMPOUND;
        if writable {
            mflags |= MigratePfnFlags::WRITE;
        }
        self.src[i] = MigratePfn::new(head.nr(), mflags);
        self.cpages += 1;
        PmdNext::Collected
    }
}

/// Splits the unmapped source of unit `i` for order-0 destinations
/// (`migrate_vma_split_unmapped_folio`), see [`split_unmapped_folio`]; the unit's word
/// becomes 512 words. False if the folio is referenced beyond the migration.
pub(super) fn split_unmapped(s: &mut State<'_, '_>, i: usize) -> bool {
    let w = s.src[i];
    let head = s.frame(w.frame_nr());
    let expected = 1 + u32::from(s.fault_page == Some(head.nr()));
    if !split_unmapped_folio(s.phys(), s.held(), head, expected) {
        return false;
    }
    expand_unit(&mut s.src, i);
    let shared = s.shared[i];
    s.shared[i..i + PMD_NR as usize].fill(shared);
    s.mmap.mm().counters().thp_split_folio();
    true
}

/// Splits the locked order-9 folio `head`, unmapped for a migration and holding exactly
/// `expected` references (the migration's, and the fault path's if it is the fault page):
/// its PMD migration entries, wherever the reverse map finds them, become 512 PTE
/// migration entries (`split_huge_pmd_address` with `freeze`, under a CLEAR invalidation
/// each), then the folio 512 locked order-0 folios, the head keeping `expected`
/// references and each other page one. False (and nothing changed) if the count is not
/// `expected`. `held` is an address space whose mmap lock the caller holds.
pub(super) fn split_unmapped_folio(
    phys: &PhysMem,
    held: Option<(&Mm, &MmState)>,
    head: FrameRef<'_>,
    expected: u32,
) -> bool {
    if head.meta().refcount() != expected {
        return false;
    }
    crate::mm::rmap_walk(head, held, |m, st, vma, range| {
        let mut at = range.start().align_up(PMD_SIZE);
        while let Some(base) = at.filter(|&a| a < range.end()) {
            let leaf = st
                .pt
                .lock_pmd(base, WalkMode::Lookup)
                .and_then(|pmd| match pmd.get() {
                    PmdEntry::Leaf(leaf) => Some(leaf),
                    _ => None,
                });
            if matches!(leaf, Some(Pte::Migration { pfn, .. }) if pfn.nr() == head.nr()) {
                split_pmd(m, &st.pt, Some(vma.info()), base, &mut TlbGather::new(m));
            }
            at = base.checked_add(PMD_SIZE);
        }
    });
    if !head.meta().freeze(expected) {
        return false;
    }
    crate::mm::split_frozen_folio(phys, head, expected);
    true
}

/// Turns the unit word at `i` into the 512 words of its pages, with its flags.
pub(super) fn expand_unit(src: &mut [MigratePfn], i: usize) {
    let w = src[i];
    let flags = w.flags() - MigratePfnFlags::COMPOUND - MigratePfnFlags::VALID;
    for (k, word) in src[i..i + PMD_NR as usize].iter_mut().enumerate() {
        *word = MigratePfn::new(w.frame_nr() + k as u64, flags);
    }
}

/// Maps the order-9 destination `dst` over the empty PMD (or the huge zero page) of the
/// unit at `va` (`migrate_vma_insert_huge_pmd_page`): a device-private PMD for
/// device-private memory, else a present one, writable if the VMA is; false if the PMD
/// holds anything else now (a fault won) or the VMA is not anonymous.
pub(super) fn insert_huge(
    s: &State<'_, '_>,
    va: VirtAddr,
    dst: FrameRef<'_>,
    tlb: &mut TlbGather<'_>,
) -> bool {
    if !s.vma.is_anonymous() {
        return false;
    }
    let pmd = s
        .mmap
        .state()
        .pt
        .lock_pmd(va, WalkMode::Populate)
        .expect("populate");
    let zero = match pmd.get() {
        PmdEntry::None => false,
        PmdEntry::Leaf(Pte::Present { pfn, .. }) if s.phys().is_huge_zero_pfn(pfn) => true,
        _ => return false,
    };
    let entry = map_new_anon(s, va, dst, Huge::Pmd);
    pmd.set_leaf(entry);
    if zero {
        tlb.add_range(VaRange::from_len(va, PMD_SIZE).expect("aligned unit"));
    }
    true
}
