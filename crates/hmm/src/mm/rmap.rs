//! The reverse map: from a folio to every (address space, address) that maps it (the
//! kernel's `rmap_walk`).
//!
//! As in the kernel, a folio does not list its mappings. It records what it belongs to and
//! its page index there (`folio->mapping`, `folio->index`, see
//! [`FrameMeta::set_mapping`](crate::phys::FrameMeta::set_mapping)):
//!
//! * an anonymous folio belongs to the [`AnonVma`] of the address space that faulted it
//!   in (the kernel's `anon_vma`), and its index is the VMA's page offset at the faulting
//!   address. Anonymous VMAs get `pgoff = start >> PAGE_SHIFT` at `mmap` and keep it across
//!   splits, `mremap` and `fork`, so `addr = vma.start + (index - vma.pgoff) * PAGE_SIZE`
//!   holds in every address space that maps the folio;
//! * a shared-memory page belongs to its [`ShmemObject`](super::shmem::ShmemObject), and its
//!   index is its offset in the object (the kernel's `i_mmap` walk).
//!
//! A walk visits each live member address space, computes the address in every VMA whose
//! page offsets cover the folio, and reads the entries there. Each address space has its
//! own `AnonVma`, chained to its parent's; a fork adds the child to its own and to every
//! ancestor's, so the members of a folio's `AnonVma` are the address space that faulted
//! it in and its descendants: the ones that can map it. The kernel's chain is per VMA
//! (`anon_vma_chain`) and its members are VMAs in an interval tree; here it is per
//! address space, and the walk looks through the member's VMAs for the offsets. A
//! child's own pages cost one visit in a family of any size (`benches/rmap.rs`).
//!
//! # Locking
//!
//! A walk takes each visited address space's mmap lock for reading with
//! [`read_unqueued`](crate::sync::read_unqueued), which gets in whenever a reader is
//! inside, even with a writer waiting, and never stays parked in the lock's queue: a
//! walker holding folio locks cannot be left waiting behind a writer that waits for a
//! reader that waits for those folio locks. The address space the caller has already
//! locked is passed in as `held` and not locked again. No operation that holds an mmap
//! lock for writing waits for a folio lock or another address space, so the walk may run
//! with a folio locked.
//!
//! # Fork during a walk
//!
//! A walk must not miss an entry that `fork` copies while it runs: a migration entry
//! copied into a child that `remove_migration_ptes` never visits waits forever on a page
//! that is freed (found by `hmm stress` with device removal). The kernel closes this with
//! the anon_vma lock, which the walker holds for its whole walk and `fork` must take to
//! link the child before it copies a single entry. Here `fork` holds the parent's mmap
//! lock for writing while it adds the child to the set and copies, and a walker may not
//! hold the set's lock while it takes an mmap lock (that order is the reverse of
//! `fork`'s). So the walk goes in rounds: it visits the members it sees, then looks at
//! the set again and visits the ones that joined meanwhile, until a round finds none.
//! A child that joined after the walk's first look and before its visit of the parent
//! is then visited in a later round, after its copy is complete (`fork` holds the
//! child's lock until then); a child that joined after the visit of the parent copied
//! what the walk had already written there.

use std::sync::{Arc, Weak};

use crate::sync::Mutex;

use crate::addr::{DevicePfn, Pfn, VaRange, VirtAddr, PAGE_SHIFT};
use crate::notifier::MmId;
use crate::pgtable::{Huge, MigrationPfn, Pte, Slot, WalkMode};
use crate::phys::{FrameRef, MappingHandle, PhysMem, Zone};

use super::driver::DriverMapping;
use super::shmem::ShmemObject;
use super::vma::{Backing, Vma};
use super::{Mm, MmState};

/// A set of address spaces, held weakly (an `anon_vma`'s or a file's list of mappers).
#[derive(Default)]
pub(crate) struct MmSet(Mutex<Vec<Weak<Mm>>>);

impl MmSet {
    /// Adds `mm`, pruning members that have exited.
    pub(crate) fn add(&self, mm: &Weak<Mm>) {
        let mut v = self.0.lock();
        v.retain(|m| m.strong_count() > 0 && !m.ptr_eq(mm));
        v.push(mm.clone());
    }

    /// The live members.
    pub(crate) fn members(&self) -> Vec<Arc<Mm>> {
        self.0.lock().iter().filter_map(Weak::upgrade).collect()
    }
}

/// What the anonymous folios an address space faults in belong to (the kernel's
/// `anon_vma`): the address spaces that can map them are that one and its fork
/// descendants, and no other.
///
/// Each address space has its own, chained to its parent's (`anon_vma_fork`). A fork adds
/// the child to its own `AnonVma` and to every ancestor's, so a folio's walk visits the
/// address space that faulted it in and the ones forked from it since: a child's own pages
/// cost one visit however large the family, where the parent's pages from before a fork
/// are visited in every child. The chain holds its ancestors alive (`anon_vma->parent`),
/// so a folio mapped in a child keeps its owner after the parent exits.
#[doc(alias = "anon_vma")]
pub(crate) struct AnonVma {
    pub(crate) mms: MmSet,
    /// The parent address space's, at the time of the fork.
    parent: Option<Arc<AnonVma>>,
    /// What its folios store as their mapping.
    pub(crate) handle: MappingHandle,
}

impl AnonVma {
    /// A new one with no member yet, below `parent` (`anon_vma_alloc`).
    pub(crate) fn new(parent: Option<Arc<AnonVma>>) -> Arc<AnonVma> {
        Arc::new_cyclic(|this: &Weak<AnonVma>| AnonVma {
            mms: MmSet::default(),
            parent,
            handle: MappingHandle::register(this.clone()),
        })
    }

    /// Adds `mm` to this one and to every ancestor: the folios of each can now be mapped
    /// there (`anon_vma_fork`'s chain clone).
    pub(crate) fn add_to_chain(&self, mm: &Weak<Mm>) {
        let mut av = Some(self);
        while let Some(a) = av {
            a.mms.add(mm);
            av = a.parent.as_deref();
        }
    }
}

impl Drop for AnonVma {
    /// Unlinks a long chain one link at a time instead of recursively.
    fn drop(&mut self) {
        let mut next = self.parent.take();
        while let Some(p) = next {
            next = match Arc::try_unwrap(p) {
                Ok(mut only) => only.parent.take(),
                Err(_) => None,
            };
        }
    }
}

/// What a folio belongs to, downcast from its metadata.
pub(crate) enum Owner {
    Anon(Arc<AnonVma>),
    File(Arc<ShmemObject>),
    Driver(Arc<DriverMapping>),
    /// Nothing the reverse map knows (a page that was never mapped).
    Unknown,
}

impl Owner {
    pub(crate) fn of(owner: Arc<dyn std::any::Any + Send + Sync>) -> Owner {
        let owner = match owner.downcast::<AnonVma>() {
            Ok(a) => return Owner::Anon(a),
            Err(o) => o,
        };
        let owner = match owner.downcast::<ShmemObject>() {
            Ok(f) => return Owner::File(f),
            Err(o) => o,
        };
        match owner.downcast::<DriverMapping>() {
            Ok(d) => Owner::Driver(d),
            Err(_) => Owner::Unknown,
        }
    }
}

/// One mapping found by [`folio_mappings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmapEntry {
    /// The address space.
    pub mm: MmId,
    /// The virtual address of the entry (for a PMD leaf, the start of its 2 MiB).
    pub addr: VirtAddr,
    /// The entry: present, migration or device-exclusive.
    pub entry: Pte,
    /// Whether it is a PTE or a PMD leaf.
    pub level: Huge,
}

/// Where a folio's pages live in its owner: what a walk needs, captured so that it stays
/// valid while the folio itself is being split.
pub(crate) struct FolioRange {
    owner: Owner,
    index: u64,
    nr: u64,
}

impl FolioRange {
    /// The owner, index and size recorded in the metadata of the folio headed by `head`;
    /// `None` for a folio that belongs to nothing.
    pub(crate) fn of(head: FrameRef<'_>) -> Option<FolioRange> {
        let meta = head.meta();
        let (owner, index) = meta.mapping()?;
        Some(FolioRange {
            owner: Owner::of(owner),
            index,
            nr: 1u64 << meta.order(),
        })
    }
}

/// Calls `visit` with every address space and virtual range where the folio headed by
/// `head` (of `nr` pages, with `index` and owner as recorded in its metadata) may be
/// mapped. `held` is an address space whose mmap lock the caller holds.
pub(crate) fn rmap_walk(
    head: FrameRef<'_>,
    held: Option<(&Mm, &MmState)>,
    visit: impl FnMut(&Mm, &MmState, &Vma, VaRange),
) {
    if let Some(r) = FolioRange::of(head) {
        rmap_walk_range(&r, held, visit);
    }
}

/// [`rmap_walk`] over a captured [`FolioRange`].
pub(crate) fn rmap_walk_range(
    r: &FolioRange,
    held: Option<(&Mm, &MmState)>,
    mut visit: impl FnMut(&Mm, &MmState, &Vma, VaRange),
) {
    let (owner, index, nr) = (&r.owner, r.index, r.nr);
    let set = match owner {
        Owner::Anon(anon) => &anon.mms,
        Owner::File(obj) => &obj.mappers,
        Owner::Driver(d) => &d.mappers,
        Owner::Unknown => return,
    };
    let mut scan = |mm: &Mm, st: &MmState| {
        mm.counters().rmap_visit();
        for v in st.vmas.iter() {
            // Anonymous pages live in private VMAs, other pages in VMAs of their owner.
            let ours = match (v.backing(), owner) {
                (_, Owner::Anon(_)) => !v.is_shared(),
                (Backing::Shmem(o), Owner::File(obj)) => Arc::ptr_eq(o, obj),
                (Backing::Driver(o), Owner::Driver(d)) => Arc::ptr_eq(o, d),
                _ => false,
            };
            let (lo, hi) = (v.pgoff(), v.pgoff() + v.range().npages());
            let (from, to) = (index.max(lo), (index + nr).min(hi));
            if !ours || from >= to {
                continue;
            }
            let start = v
                .start()
                .checked_add((from - lo) << PAGE_SHIFT)
                .expect("inside the VMA");
            let r = VaRange::from_len(start, (to - from) << PAGE_SHIFT).expect("inside the VMA");
            visit(mm, st, v, r);
        }
    };
    // Rounds until no new member: a fork that copied an entry from a member before this
    // walk visited it has joined the set by then (see "Fork during a walk").
    let mut visited: Vec<MmId> = Vec::new();
    loop {
        let fresh: Vec<Arc<Mm>> = set
            .members()
            .into_iter()
            .filter(|m| !visited.contains(&m.id()))
            .collect();
        if fresh.is_empty() {
            return;
        }
        for mm in fresh {
            visited.push(mm.id());
            match held {
                Some((h, st)) if std::ptr::eq(h, &*mm) => scan(h, st),
                _ => {
                    let st = crate::sync::read_unqueued(&mm.lock);
                    scan(&mm, &st);
                }
            }
        }
    }
}

/// Every mapping of the folio containing `pfn`, in every address space: present entries,
/// migration entries and device-exclusive entries that refer to any of its pages.
#[doc(alias = "rmap_walk")]
pub fn folio_mappings(phys: &PhysMem, pfn: Pfn) -> Vec<RmapEntry> {
    collect(phys.frame(pfn), None)
}

/// Every mapping of the device-private folio containing `pfn`, in every address space:
/// the device-private entries that refer to any of its pages.
pub fn device_folio_mappings(phys: &PhysMem, pfn: DevicePfn) -> Vec<RmapEntry> {
    collect(phys.device_frame(pfn), None)
}

/// Whether `entry` refers to one of the `nr` frames from `first` (of `first`'s zone). CPU
/// pfns and device pfns share one numbering: only the entry kinds that can refer to a frame
/// of that zone match.
pub(crate) fn entry_refers_to(entry: Pte, first: FrameRef<'_>, nr: u64) -> bool {
    let private = matches!(first.zone(), Zone::DevicePrivate { .. });
    let kind_matches = match entry {
        Pte::DevicePrivate { .. }
        | Pte::Migration {
            pfn: MigrationPfn::Device(_),
            ..
        } => private,
        Pte::Present { .. } | Pte::Migration { .. } | Pte::DeviceExclusive { .. } => !private,
        Pte::None | Pte::Swap { .. } => false,
    };
    kind_matches
        && entry
            .frame_nr()
            .is_some_and(|n| n >= first.nr() && n < first.nr() + nr)
}

/// Every entry referring to a page of the folio containing `page`.
pub(crate) fn collect(page: FrameRef<'_>, held: Option<(&Mm, &MmState)>) -> Vec<RmapEntry> {
    let head = page.folio();
    let nr = 1u64 << head.meta().order();
    let mut out = Vec::new();
    rmap_walk(head, held, |mm, st, _vma, range| {
        let mut c = st.pt.cursor(range, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (addr, entry, level) = match slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.va(), p.get(), Huge::Pte),
                Slot::Pmd(p) | Slot::Pud(p) => (p.range().start(), p.get(), p.level()),
            };
            if entry_refers_to(entry, head, nr) {
                out.push(RmapEntry {
                    mm: mm.id(),
                    addr,
                    entry,
                    level,
                });
            }
        }
    });
    out.sort_by_key(|e| (e.mm, e.addr));
    out.dedup();
    out
}
