//! The setup stage: collecting one entry (`migrate_vma_collect_pmd`'s loop body, run by
//! the one collect walk, `range_fault`'s migrating walk) and the unmap and pin check
//! (`migrate_device_unmap`).

use crate::addr::VaRange;
use crate::mm::tlb::TlbGather;
use crate::mm::{Mm, MmState};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::pgtable::{Huge, MigrationKind, MigrationPfn, Pte, PteFlags, PteSlot, Slot, WalkMode};
use crate::phys::{FrameFlags, FrameRef, Zone};

use super::commit::{remap_entry, State};
use super::compound::folio_mapped;
use super::pfn::{MigratePfn, MigratePfnFlags, MigrateVmaFlags};

/// What the walk does after an entry.
pub(crate) enum Next<'g> {
    Go,
    /// The entry maps a page of a large folio: split it, then look again.
    SplitFolio(FrameRef<'g>),
}

/// Collects entry `k` of the run `p` under its lock (`migrate_vma_collect_pmd`'s loop
/// body); `s.src` says whether it was selected.
pub(crate) fn collect_pte<'g>(
    s: &mut State<'g, '_>,
    p: &PteSlot<'_>,
    k: usize,
    tlb: &mut TlbGather<'_>,
) -> Next<'g> {
    let phys = s.phys();
    let va = p.va_at(k);
    let i = s.index(va);
    let entry = p.get_at(k);
    let (page, mpfn_write, flags) = match entry {
        Pte::None => {
            if s.vma.is_anonymous() {
                s.src[i] = MigratePfn::flags_only(MigratePfnFlags::MIGRATE);
                s.cpages += 1;
            }
            return Next::Go;
        }
        Pte::Present { pfn, .. } if phys.is_zero_pfn(pfn) => {
            if s.flags.contains(MigrateVmaFlags::SELECT_SYSTEM) {
                s.src[i] = MigratePfn::flags_only(MigratePfnFlags::MIGRATE);
                s.cpages += 1;
            }
            return Next::Go;
        }
        Pte::Present { pfn, flags } => {
            let page = phys.frame(pfn);
            if !s.selects(page.zone()) {
                return Next::Go;
            }
            (page, flags.contains(PteFlags::WRITE), flags)
        }
        Pte::DevicePrivate { pfn, flags } => {
            let page = phys.device_frame(pfn);
            if !s.selects(page.zone()) {
                return Next::Go;
            }
            (page, flags.contains(PteFlags::WRITE), flags)
        }
        // migrate_vma_collect_pmd: a swap entry is neither a hole nor a page to move.
        Pte::Migration { .. } | Pte::DeviceExclusive { .. } | Pte::Swap { .. } => return Next::Go,
    };
    let folio = page.folio();
    let fm = folio.meta();
    if fm.order() > 0 {
        return Next::SplitFolio(folio);
    }
    let Ok(anon_exclusive) = s.take_folio(folio) else {
        return Next::Go;
    };
    let kind = MigrationKind::for_mapping(mpfn_write, anon_exclusive);
    let keep = flags & PteFlags::CARRIED;
    let target = match entry {
        Pte::DevicePrivate { pfn, .. } => MigrationPfn::Device(pfn),
        _ => MigrationPfn::Cpu(page.pfn()),
    };
    p.set_at(
        k,
        Pte::Migration {
            pfn: target,
            kind,
            flags: keep,
        },
    );
    if flags.contains(PteFlags::DIRTY) {
        fm.set_flags(FrameFlags::DIRTY);
    }
    if matches!(entry, Pte::Present { flags, .. } if !flags.contains(PteFlags::PROTNONE)) {
        tlb.add_range(VaRange::page_of(va));
    }
    // The entry's map count and reference go; the migration holds its own reference.
    let left = page.meta().dec_mapcount();
    let _ = folio.put();
    s.shared[i] = left > 0;
    let mut mflags = MigratePfnFlags::MIGRATE;
    if mpfn_write {
        mflags |= MigratePfnFlags::WRITE;
    }
    s.src[i] = MigratePfn::new(folio.nr(), mflags);
    s.cpages += 1;
    Next::Go
}

/// Why [`State::take_folio`] refused a folio.
pub(super) enum Refused {
    /// Someone else holds its lock.
    Locked,
    /// It is anon-exclusive and pinned: its exclusivity cannot move into an entry.
    Pinned,
}

impl State<'_, '_> {
    /// Takes the migration's reference and the lock on the mapped `folio` (the fault page
    /// is locked already), and moves anon exclusivity out of it
    /// (`folio_try_share_anon_rmap_*`); returns whether it was anon-exclusive, for the
    /// kind of migration entry. A refusal leaves the folio as it was.
    pub(super) fn take_folio(&self, folio: FrameRef<'_>) -> Result<bool, Refused> {
        let fm = folio.meta();
        fm.get();
        let is_fault_page = self.fault_page == Some(folio.nr());
        if !is_fault_page && !fm.trylock() {
            let _ = folio.put();
            return Err(Refused::Locked);
        }
        // The folio is collected whole: a page, or a THP mapped by one PMD (its head).
        let anon_exclusive = fm.flags().contains(FrameFlags::ANON) && folio.anon_exclusive();
        if anon_exclusive {
            if fm.pincount() > 0 {
                if !is_fault_page {
                    fm.unlock();
                }
                let _ = folio.put();
                return Err(Refused::Pinned);
            }
            folio.clear_anon_exclusive();
        }
        Ok(anon_exclusive)
    }
}

/// Unmaps collected pages from every other place that maps them (`try_to_migrate`) and
/// puts back those that cannot migrate: still mapped, or referenced beyond the migration
/// (a pin, a GUP reference) (`migrate_device_unmap`, `migrate_vma_check_page`). A unit is
/// checked as one folio.
pub(super) fn unmap_and_check(s: &mut State<'_, '_>) {
    for i in 0..s.src.len() {
        let w = s.src[i];
        if !w.is_valid() || !w.is_migrating() {
            continue;
        }
        let page = s.frame(w.frame_nr());
        if s.shared[i] {
            try_to_migrate(s.held(), page);
        }
        let fm = page.folio().meta();
        let file = !fm.flags().contains(FrameFlags::ANON) && fm.mapping_id().is_some();
        let expected = 1 + u32::from(s.fault_page == Some(page.nr())) + u32::from(file);
        if folio_mapped(s.phys(), page.folio()) || fm.refcount() > expected || fm.pincount() > 0 {
            s.restore(i);
        }
    }
}

/// Which migration entry, if any, replaces `entry` when the folio of `nr` frames from
/// `head` (`private`: device-private) is being migrated: its target, whether it was
/// writable, its flags, and whether it was CPU-present.
fn migration_of(
    entry: Pte,
    head: u64,
    nr: u64,
    private: bool,
) -> Option<(MigrationPfn, bool, PteFlags, bool)> {
    let inside = |n: u64| n >= head && n < head + nr;
    match entry {
        Pte::Present { pfn, flags } if !private && inside(pfn.as_u64()) => Some((
            MigrationPfn::Cpu(pfn),
            flags.contains(PteFlags::WRITE),
            flags,
            !flags.contains(PteFlags::PROTNONE),
        )),
        Pte::DevicePrivate { pfn, flags } if private && inside(pfn.as_u64()) => Some((
            MigrationPfn::Device(pfn),
            flags.contains(PteFlags::WRITE),
            flags,
            false,
        )),
        _ => None,
    }
}

/// Replaces every mapping of the folio `page` heads, through the reverse map, each VMA
/// range under a CLEAR invalidation (`try_to_migrate_one`): its PTEs become PTE migration
/// entries, a PMD leaf mapping it a PMD migration entry. An anon-exclusive folio hands
/// its exclusivity to the entry (writable or readable-exclusive) and loses the flag, as
/// in the kernel; a pinned one stays mapped. `held` is an address space whose mmap lock
/// the caller holds.
pub(crate) fn try_to_migrate(held: Option<(&Mm, &MmState)>, page: FrameRef<'_>) {
    let folio = page.folio();
    let (head, nr) = (folio.nr(), 1u64 << folio.meta().order());
    let private = matches!(page.zone(), Zone::DevicePrivate { .. });
    crate::mm::rmap_walk(folio, held, |mm, st, vma, range| {
        let inv = mm.notifiers().invalidate_range_start(NotifierRange::new(
            mm.id(),
            range,
            NotifierEvent::Clear,
            Some(vma.info()),
        ));
        let mut tlb = TlbGather::new(mm);
        let mut c = st.pt.cursor(range, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (entry, span) = match &slot {
                // Hugetlb memory (the only PUD leaves) does not migrate here.
                Slot::Hole(_) | Slot::Pud(_) => continue,
                Slot::Pte(p) => (p.get(), VaRange::page_of(p.va())),
                Slot::Pmd(p) => (p.get(), p.range()),
            };
            let Some((target, writable, flags, present)) = migration_of(entry, head, nr, private)
            else {
                continue;
            };
            // folio_try_share_anon_rmap_*: exclusivity moves from the mapped page (the head
            // for a PMD) into the entry (readable-exclusive or writable), so that a fork
            // copying the entry meanwhile makes it shared; a pinned exclusive page stays
            // mapped (and the caller puts it back).
            let fm = folio.meta();
            let mapped = mm.phys().frame_nr(target.nr());
            let anon_exclusive = fm.flags().contains(FrameFlags::ANON) && mapped.anon_exclusive();
            if anon_exclusive {
                if fm.pincount() > 0 {
                    continue;
                }
                mapped.clear_anon_exclusive();
            }
            let migration = Pte::Migration {
                pfn: target,
                kind: MigrationKind::for_mapping(writable, anon_exclusive),
                flags: flags & PteFlags::CARRIED,
            };
            match &slot {
                Slot::Pte(p) => {
                    p.set(migration);
                    mm.phys().frame_nr(target.nr()).meta().dec_mapcount();
                }
                Slot::Pmd(p) => {
                    p.set(migration);
                    fm.dec_entire_mapcount();
                }
                Slot::Hole(_) | Slot::Pud(_) => unreachable!(),
            }
            if present {
                tlb.add_range(span);
            }
            let _ = folio.put();
        }
        drop(c);
        tlb.finish();
        inv.end();
    });
}

/// Puts the migration entries of the folio `page` heads back as mappings of the folio
/// `target` heads (the same page within it), wherever the reverse map finds them
/// (`remove_migration_ptes`): PTE entries as PTEs, a PMD entry as a PMD leaf. `held` is
/// an address space whose mmap lock the caller holds.
pub(crate) fn remove_migration_ptes(
    held: Option<(&Mm, &MmState)>,
    page: FrameRef<'_>,
    target: FrameRef<'_>,
) {
    replace_migration_ptes(held, page, |mm, vma, entry, level, off| {
        let to = mm.phys().frame_nr(target.nr() + off);
        remap_entry(vma, entry, to, level)
    });
}

/// Replaces every migration entry of the folio `page` heads, wherever the reverse map
/// finds them, with `new(mm, vma, entry, level, offset of the page in the folio)`.
pub(crate) fn replace_migration_ptes(
    held: Option<(&Mm, &MmState)>,
    page: FrameRef<'_>,
    mut new: impl FnMut(&Mm, &crate::mm::Vma, Pte, Huge, u64) -> Pte,
) {
    let folio = page.folio();
    let (head, nr) = (folio.nr(), 1u64 << folio.meta().order());
    crate::mm::rmap_walk(folio, held, |mm, st, vma, range| {
        let mut c = st.pt.cursor(range, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (entry, level) = match &slot {
                Slot::Hole(_) | Slot::Pud(_) => continue,
                Slot::Pte(p) => (p.get(), Huge::Pte),
                Slot::Pmd(p) => (p.get(), Huge::Pmd),
            };
            let Pte::Migration { pfn, .. } = entry else {
                continue;
            };
            let n = pfn.nr();
            if n < head || n >= head + nr || (level == Huge::Pmd && n != head) {
                continue;
            }
            let e = new(mm, vma, entry, level, n - head);
            match slot {
                Slot::Pte(p) => p.set(e),
                Slot::Pmd(p) => p.set(e),
                Slot::Hole(_) | Slot::Pud(_) => unreachable!(),
            }
        }
    });
}
