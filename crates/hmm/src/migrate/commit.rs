//! The state a migration carries through its stages, the commit (`migrate_vma_pages`) and
//! the finalize (`migrate_vma_finalize`, `remove_migration_ptes`).

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT};
use crate::mm::tlb::TlbGather;
use crate::mm::{split_pmd, MmapReadGuard, Vma};
use crate::notifier::{Invalidation, NotifierEvent, NotifierRange, Owner};
use crate::pgtable::{Huge, MigrationKind, Pte, PteFlags, Slot, WalkMode};
use crate::phys::{put_folios, FrameFlags, FrameRef, Freed, PhysMem, Zone};
use crate::prot::VmFlags;

use super::collect::remove_migration_ptes;
use super::compound::{insert_huge, split_unmapped};
use super::pfn::{MigratePfn, MigratePfnFlags, MigrateVmaFlags};
use super::{MigrateOutcome, MigrateVma};
use crate::mm::{Mm, MmState};

/// How far a migration got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Setup done; destinations may be set.
    Collected,
    /// `pages` done.
    Committed,
    /// Finalized (or moved out): nothing left to do on drop.
    Done,
}

/// Everything a migration carries from setup to finalize.
pub(super) struct State<'g, 'a> {
    pub(super) mmap: &'g MmapReadGuard<'a>,
    pub(super) vma: &'g Vma,
    pub(super) range: VaRange,
    pub(super) owner: Option<Owner>,
    pub(super) flags: MigrateVmaFlags,
    /// The fault page's frame number.
    pub(super) fault_page: Option<u64>,
    pub(super) src: Vec<MigratePfn>,
    pub(super) dst: Vec<MigratePfn>,
    /// Entry `i`'s page was also mapped elsewhere when it was collected.
    pub(super) shared: Vec<bool>,
    pub(super) cpages: u64,
    stage: Stage,
}

impl<'g, 'a> State<'g, 'a> {
    pub(super) fn new(
        mmap: &'g MmapReadGuard<'a>,
        vma: &'g Vma,
        range: VaRange,
        args: MigrateVma,
    ) -> Self {
        let n = range.npages() as usize;
        State {
            mmap,
            vma,
            range,
            owner: args.pgmap_owner,
            flags: args.flags,
            fault_page: args.fault_page.map(|p| p.as_u64()),
            src: vec![MigratePfn::default(); n],
            dst: vec![MigratePfn::default(); n],
            shared: vec![false; n],
            cpages: 0,
            stage: Stage::Collected,
        }
    }

    /// Moves the state out, leaving one that does nothing on drop.
    pub(super) fn take(&mut self) -> Self {
        let taken = State {
            mmap: self.mmap,
            vma: self.vma,
            range: self.range,
            owner: self.owner,
            flags: self.flags,
            fault_page: self.fault_page,
            src: std::mem::take(&mut self.src),
            dst: std::mem::take(&mut self.dst),
            shared: std::mem::take(&mut self.shared),
            cpages: self.cpages,
            stage: self.stage,
        };
        self.stage = Stage::Done;
        taken
    }

    /// The migrating address space with its mmap lock held, for reverse-map walks.
    pub(super) fn held(&self) -> Option<(&'g Mm, &'g MmState)> {
        Some((self.mmap.mm(), self.mmap.state()))
    }

    pub(super) fn phys(&self) -> &'g PhysMem {
        self.mmap.mm().phys()
    }

    pub(super) fn frame(&self, nr: u64) -> FrameRef<'g> {
        self.phys().frame_nr(nr)
    }

    /// The owner of pagemap `id`.
    pub(super) fn owner_of(&self, id: u32) -> Option<Owner> {
        self.phys().pagemap(id).map(|p| p.owner())
    }

    /// Whether the flags and the owner select a page of `zone` (`migrate_vma_collect_pmd`'s
    /// checks, the same for a page and a PMD-mapped folio): system memory with
    /// `SELECT_SYSTEM`, device memory of the owner with its kind's flag.
    pub(super) fn selects(&self, zone: Zone) -> bool {
        let (flag, pagemap) = match zone {
            Zone::System => return self.flags.contains(MigrateVmaFlags::SELECT_SYSTEM),
            Zone::DeviceCoherent { pagemap } => (MigrateVmaFlags::SELECT_DEVICE_COHERENT, pagemap),
            Zone::DevicePrivate { pagemap } => (MigrateVmaFlags::SELECT_DEVICE_PRIVATE, pagemap),
        };
        self.flags.contains(flag) && self.owner_of(pagemap) == self.owner
    }

    pub(super) fn index(&self, va: VirtAddr) -> usize {
        ((va.as_u64() - self.range.start().as_u64()) >> PAGE_SHIFT) as usize
    }

    pub(super) fn addr(&self, i: usize) -> VirtAddr {
        self.range
            .start()
            .checked_add((i as u64) << PAGE_SHIFT)
            .expect("inside the range")
    }

    /// Puts collected entry `i` back as it was, now (a page that failed the pin check).
    pub(super) fn restore(&mut self, i: usize) {
        let w = self.src[i];
        let page = self.frame(w.frame_nr());
        self.remap_own(&[(i, page)]);
        if self.shared[i] {
            remove_migration_ptes(self.held(), page, page);
        }
        self.release_src(page);
        self.src[i] = MigratePfn::default();
        self.cpages -= 1;
        self.mmap.mm().counters().migrate_done(0, w.npages());
    }

    /// Drops the migration's hold on a source page: its lock (unless the fault path holds
    /// it) and its reference.
    fn release_src(&self, page: FrameRef<'_>) {
        if self.fault_page != Some(page.nr()) {
            page.meta().unlock();
        }
        self.put(page);
    }

    /// Drops one reference, counting a freed RAM frame.
    fn put(&self, page: FrameRef<'_>) {
        let ram = matches!(page.zone(), Zone::System);
        if page.put() == Freed::Yes && ram {
            self.mmap.mm().counters().frames_freed(1);
        }
    }

    /// Replaces the migration entries at the given entries' addresses in the migrating
    /// range with mappings of the given targets, in one walk. A unit's entry (`COMPOUND`)
    /// covers its 512 addresses: one PMD migration entry, or 512 PTE ones where the PMD
    /// was split for a folio split that then failed; each page's entry maps the same page
    /// of the target.
    fn remap_own(&self, targets: &[(usize, FrameRef<'_>)]) {
        let (Some(&(first, _)), Some(&(last, _))) = (targets.first(), targets.last()) else {
            return;
        };
        let end = last + self.src[last].npages() as usize;
        let span = VaRange::new(
            self.addr(first),
            self.addr(end - 1)
                .checked_add(1 << PAGE_SHIFT)
                .expect("inside the range"),
        )
        .expect("non-empty span");
        let mut c = self.mmap.state().pt.cursor(span, WalkMode::Lookup);
        let mut k = 0;
        while let Some(slot) = c.next() {
            let (va, entry, level) = match &slot {
                Slot::Hole(_) | Slot::Pud(_) => continue,
                Slot::Pte(p) => (p.va(), p.get(), Huge::Pte),
                Slot::Pmd(p) => (p.range().start(), p.get(), Huge::Pmd),
            };
            if va < self.range.start() {
                continue;
            }
            let j = self.index(va);
            while k < targets.len() && targets[k].0 + self.src[targets[k].0].npages() as usize <= j
            {
                k += 1;
            }
            let Some(&(i, target)) = targets.get(k) else {
                break;
            };
            if j < i {
                continue;
            }
            let off = (j - i) as u64;
            let page = match level {
                Huge::Pte => self.frame(target.nr() + off),
                Huge::Pmd => target,
                Huge::Pud => unreachable!("hugetlb memory does not migrate here"),
            };
            // A concurrent MADV_DONTNEED may have zapped the migration entry.
            let src_nr = self.src[i].frame_nr() + off;
            if matches!(entry, Pte::Migration { pfn, .. } if pfn.nr() == src_nr) {
                let new = remap_entry(self.vma, entry, page, level);
                match slot {
                    Slot::Pte(p) => p.set(new),
                    Slot::Pmd(p) => p.set(new),
                    Slot::Hole(_) | Slot::Pud(_) => unreachable!(),
                }
            }
        }
    }
}

impl Drop for State<'_, '_> {
    fn drop(&mut self) {
        if self.stage != Stage::Done {
            crate::sync::drop_work(|| {
                finalize(self);
            });
        }
    }
}

/// The entry that replaces `migration` (a migration entry, at PTE or PMD `level`) once
/// `target` is the page (for a PMD, the head of an order-9 folio): a device-private entry
/// for device-private memory, else a present entry; writable if the migration entry was,
/// anon-exclusive unless it was a plain read entry (`remove_migration_pte`,
/// `remove_migration_pmd`). Takes the mapping's reference and map count (the entire map
/// count for a PMD) on `target`.
pub(crate) fn remap_entry(vma: &Vma, migration: Pte, target: FrameRef<'_>, level: Huge) -> Pte {
    let Pte::Migration { kind, flags, .. } = migration else {
        unreachable!("only migration entries are remapped")
    };
    let folio = target.folio();
    folio.meta().get();
    match level {
        Huge::Pte => target.meta().inc_mapcount(),
        Huge::Pmd => {
            debug_assert_eq!(folio.nr(), target.nr(), "a PMD maps a folio head");
            target.meta().inc_entire_mapcount();
        }
        Huge::Pud => unreachable!("hugetlb memory does not migrate here"),
    }
    if kind != MigrationKind::Read && folio.meta().flags().contains(FrameFlags::ANON) {
        target.set_anon_exclusive();
    }
    let write = kind == MigrationKind::Write;
    match target.zone() {
        Zone::DevicePrivate { .. } => Pte::DevicePrivate {
            pfn: target.device_pfn(),
            flags: if write {
                PteFlags::WRITE | (flags & PteFlags::STICKY)
            } else {
                flags & PteFlags::STICKY
            },
        },
        Zone::System | Zone::DeviceCoherent { .. } => {
            let mut f = flags & PteFlags::CARRIED;
            if !vma.is_accessible() {
                f |= PteFlags::PROTNONE;
            } else if write && !f.contains(PteFlags::UFFD_WP) {
                f |= PteFlags::WRITE;
            }
            Pte::Present {
                pfn: target.pfn(),
                flags: f,
            }
        }
    }
}

/// `migrate_vma_pages`: entries without a destination stop migrating; holes and zero
/// pages get theirs inserted under a second MIGRATE invalidation (opened at the first
/// such entry, to the end of the range); pages get their metadata moved. A unit
/// (`COMPOUND`) moves whole with an order-9 destination, is split for order-0 ones (see
/// the `compound` module); an order-9 destination for anything but a unit is refused.
pub(super) fn pages(s: &mut State<'_, '_>) {
    let mm = s.mmap.mm();
    let mut inv: Option<Invalidation<'_>> = None;
    let mut tlb = TlbGather::new(mm);
    let mut i = 0;
    while i < s.src.len() {
        let (w, d) = (s.src[i], s.dst[i]);
        let unit = w.flags().contains(MigratePfnFlags::COMPOUND);
        let dst_unit = d.flags().contains(MigratePfnFlags::COMPOUND);
        let next = i + w.npages() as usize;
        if !w.is_migrating() {
            i += 1;
            continue;
        }
        if d.is_empty() || (dst_unit && !unit) {
            s.src[i] = w.without(MigratePfnFlags::MIGRATE);
            i += 1;
            continue;
        }
        if w.is_valid() {
            if unit && !dst_unit {
                if !split_unmapped(s, i) {
                    // The unit stays one folio and goes back whole; its PMD migration
                    // entry may be 512 PTE migration entries by now (see `remap_own`).
                    s.src[i] = w.without(MigratePfnFlags::MIGRATE);
                    i = next;
                    continue;
                }
                (i..next).for_each(|k| commit_page(s, k));
            } else {
                commit_page(s, i);
            }
            i = next;
            continue;
        }
        let va = s.addr(i);
        if inv.is_none() {
            let r = VaRange::new(va, s.range.end()).expect("inside the range");
            inv = Some(
                mm.notifiers().invalidate_range_start(
                    NotifierRange::new(mm.id(), r, NotifierEvent::Migrate, Some(s.vma.info()))
                        .with_owner(s.owner),
                ),
            );
        }
        if unit && dst_unit {
            if !insert_huge(s, va, s.frame(d.frame_nr()), &mut tlb) {
                s.src[i] = w.without(MigratePfnFlags::MIGRATE);
            }
        } else {
            // A unit with order-0 destinations is filled page by page.
            for k in i..next {
                let d = s.dst[k];
                s.src[k] = if !d.is_empty()
                    && insert_page(s, s.addr(k), s.frame(d.frame_nr()), &mut tlb)
                {
                    MigratePfn::flags_only(MigratePfnFlags::MIGRATE)
                } else {
                    MigratePfn::default()
                };
            }
        }
        i = next;
    }
    drop(tlb);
    if let Some(inv) = inv {
        inv.end();
    }
    s.stage = Stage::Committed;
}

/// Moves the metadata of the page (or whole unit) of entry `i` to its destination
/// (`folio_migrate_mapping`, `folio_migrate_flags`), or stops the entry migrating: only
/// anonymous memory moves (file pages would need their page cache slot moved), and the
/// reference count must still be the migration's own.
fn commit_page(s: &mut State<'_, '_>, i: usize) {
    let (w, d) = (s.src[i], s.dst[i]);
    if !w.is_migrating() {
        return;
    }
    if d.is_empty() {
        s.src[i] = w.without(MigratePfnFlags::MIGRATE);
        return;
    }
    let src = s.frame(w.frame_nr());
    let sm = src.meta();
    let expected = 1 + u32::from(s.fault_page == Some(src.nr()));
    if !sm.flags().contains(FrameFlags::ANON) || sm.refcount() != expected {
        s.src[i] = w.without(MigratePfnFlags::MIGRATE);
        return;
    }
    let dm = s.frame(d.frame_nr()).meta();
    dm.inherit_mapping(sm, 0);
    let keep = sm.flags() & (FrameFlags::ANON | FrameFlags::DIRTY);
    dm.set_flags(keep | FrameFlags::UPTODATE);
}

/// Maps `dst` where a hole or the zero page was (`migrate_vma_insert_page`); false if
/// the entry changed meanwhile (a CPU fault won) or the VMA is not anonymous.
fn insert_page(
    s: &State<'_, '_>,
    va: VirtAddr,
    dst: FrameRef<'_>,
    tlb: &mut TlbGather<'_>,
) -> bool {
    let mm = s.mmap.mm();
    let st = s.mmap.state();
    if !s.vma.is_anonymous() {
        return false;
    }
    let mut c = st.pt.cursor(VaRange::page_of(va), WalkMode::Populate);
    loop {
        match c.current().expect("a one-page walk yields a slot") {
            Slot::Pmd(p) => {
                let leaf = p.get();
                let base = p.range().start();
                let huge_zero =
                    matches!(leaf, Pte::Present { pfn, .. } if s.phys().is_huge_zero_pfn(pfn));
                if !huge_zero {
                    return false;
                }
                c.unlock();
                split_pmd(mm, &st.pt, Some(s.vma.info()), base, tlb);
            }
            Slot::Pte(p) => {
                let old = p.get();
                let zero = match old {
                    Pte::None => false,
                    Pte::Present { pfn, .. } if s.phys().is_zero_pfn(pfn) => true,
                    _ => return false,
                };
                let entry = map_new_anon(s, va, dst, Huge::Pte);
                p.set(entry);
                if zero {
                    tlb.add_range(VaRange::page_of(va));
                }
                return true;
            }
            // Only hugetlb VMAs, never anonymous ones, hold PUD leaves.
            Slot::Pud(_) => return false,
            Slot::Hole(_) => unreachable!("populate walks yield no holes"),
        }
    }
}

/// Makes `dst` the new anonymous page (or, at PMD `level`, THP) of the hole at `va` and
/// returns the entry that maps it: a device-private entry for device-private memory, else
/// a present one, writable (and dirty) iff the VMA is (`migrate_vma_insert_page`,
/// `migrate_vma_insert_huge_pmd_page`). Takes the mapping's reference and map count.
pub(super) fn map_new_anon(s: &State<'_, '_>, va: VirtAddr, dst: FrameRef<'_>, level: Huge) -> Pte {
    let vm_write = s.vma.flags().contains(VmFlags::WRITE);
    let dm = dst.folio().meta();
    dm.set_flags(FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE | FrameFlags::UPTODATE);
    s.mmap.mm().new_anon_rmap(&dst, s.vma, va);
    dm.get();
    match level {
        Huge::Pte => dst.meta().inc_mapcount(),
        Huge::Pmd => dm.inc_entire_mapcount(),
        Huge::Pud => unreachable!("hugetlb memory does not migrate here"),
    }
    match dst.zone() {
        Zone::DevicePrivate { .. } => Pte::DevicePrivate {
            pfn: dst.device_pfn(),
            flags: if vm_write {
                PteFlags::WRITE
            } else {
                PteFlags::empty()
            },
        },
        Zone::System | Zone::DeviceCoherent { .. } => Pte::Present {
            pfn: dst.pfn(),
            flags: if vm_write {
                PteFlags::YOUNG | PteFlags::WRITE | PteFlags::DIRTY
            } else {
                PteFlags::YOUNG
            },
        },
    }
}

/// `migrate_vma_finalize`: every migration entry becomes a mapping of its destination
/// (entries still migrating) or of its source (the others), in one walk of the range plus
/// reverse-map walks for pages mapped elsewhere too; then locks and references go.
pub(super) fn finalize(s: &mut State<'_, '_>) -> MigrateOutcome {
    let committed = s.stage == Stage::Committed;
    let mut own = Vec::new();
    let mut out = MigrateOutcome::default();
    for i in 0..s.src.len() {
        let (w, d) = (s.src[i], s.dst[i]);
        let pages = w.npages();
        if !w.is_valid() {
            if !d.is_empty() {
                // A hole's destination: inserted (the entry holds its own reference) or not.
                if committed && w.is_migrating() {
                    out.migrated += pages;
                }
                let dst = s.frame(d.frame_nr());
                dst.meta().unlock();
                s.put(dst);
            }
            continue;
        }
        let src = s.frame(w.frame_nr());
        let target = if committed && w.is_migrating() && !d.is_empty() {
            out.migrated += pages;
            s.frame(d.frame_nr())
        } else {
            out.restored += pages;
            src
        };
        own.push((i, target));
    }
    s.remap_own(&own);
    // The sources' and destinations' references go in one batch each, by zone (RAM frees
    // are counted), after every folio is unlocked.
    let (mut ram, mut device) = (Vec::with_capacity(own.len()), Vec::new());
    for &(i, target) in &own {
        let src = s.frame(s.src[i].frame_nr());
        if s.shared[i] {
            remove_migration_ptes(s.held(), src, target);
        }
        if s.fault_page != Some(src.nr()) {
            src.meta().unlock();
        }
        let d = s.dst[i];
        let dst = (!d.is_empty()).then(|| s.frame(d.frame_nr()));
        if let Some(dst) = dst {
            dst.meta().unlock();
        }
        for f in std::iter::once(src).chain(dst) {
            if matches!(f.zone(), Zone::System) {
                ram.push(f);
            } else {
                device.push(f);
            }
        }
    }
    s.mmap.mm().counters().frames_freed(put_folios(&ram));
    put_folios(&device);
    s.mmap
        .mm()
        .counters()
        .migrate_done(out.migrated, out.restored);
    s.stage = Stage::Done;
    out
}
