//! Migrate on fault: the collector the walk of `range_fault` drives, the one collect walk
//! of `migrate_vma_setup`, and the public `hmm_range_fault_migrate` /
//! `migrate_hmm_range_setup` (see the `migrate` module's documentation).

use crate::addr::{VaRange, VirtAddr, PMD_SIZE};
use crate::mm::tlb::TlbGather;
use crate::mm::{split_folio, split_pmd, MmapReadGuard, Vma};
use crate::notifier::{Invalidation, NotifierEvent, NotifierRange};
use crate::pgtable::{LeafSlot, Pte, PteSlot};
use crate::phys::FrameRef;
use crate::prot::VmFlags;
use crate::range_fault::{check, run_walk, HmmError, HmmPfnFlags, HmmRange, Walk};
use crate::stats::RangeWalker;

use super::collect::{collect_pte, unmap_and_check, Next};
use super::commit::State;
use super::compound::PmdNext;
use super::{MigratePfn, MigratePfnFlags, MigrateVma, MigrateVmaFlags, Migration};

/// The migration side of a migrating walk: the collected state, the TLB flush it owes,
/// and its `MIGRATE` invalidation, open from creation to [`finish`](Self::finish) (or
/// drop, which also puts every collected page back).
pub(crate) struct Collector<'g, 'a> {
    tlb: TlbGather<'g>,
    inv: Invalidation<'g>,
    state: State<'g, 'a>,
    /// A folio could not be split: no entry below this index is collected (the rest of
    /// that folio's PMD, as `migrate_vma_collect_skip` does).
    skip_until: usize,
}

impl<'g, 'a> Collector<'g, 'a> {
    /// Starts collecting `args`' range of `vma` (checked by the caller) under one
    /// `MIGRATE` invalidation carrying the owner.
    pub(crate) fn new(mmap: &'g MmapReadGuard<'a>, vma: &'g Vma, args: MigrateVma) -> Self {
        let mm = mmap.mm();
        let range = VaRange::new(args.start, args.end).expect("checked by the caller");
        let inv = mm.notifiers().invalidate_range_start(
            NotifierRange::new(mm.id(), range, NotifierEvent::Migrate, Some(vma.info()))
                .with_owner(args.pgmap_owner),
        );
        Collector {
            tlb: TlbGather::new(mm),
            inv,
            state: State::new(mmap, vma, range, args),
            skip_until: 0,
        }
    }

    /// Whether entry `i` is left alone because a folio before it in its PMD could not be
    /// split.
    pub(crate) fn skips(&self, i: usize) -> bool {
        i < self.skip_until
    }

    /// Entry `i`'s source word.
    pub(crate) fn src(&self, i: usize) -> MigratePfn {
        self.state.src[i]
    }

    /// Whether `entry` migrates as an empty entry, with no fault first: a hole of
    /// anonymous memory, or the (huge) zero page when system pages are selected.
    pub(crate) fn migrates_empty(&self, entry: Pte) -> bool {
        let phys = self.state.phys();
        match entry {
            Pte::None => self.state.vma.is_anonymous(),
            Pte::Present { pfn, .. } => {
                (phys.is_zero_pfn(pfn) || phys.is_huge_zero_pfn(pfn))
                    && self.state.flags.contains(MigrateVmaFlags::SELECT_SYSTEM)
            }
            _ => false,
        }
    }

    /// Collects entry `i`, a hole of anonymous memory, as an empty entry.
    pub(crate) fn collect_empty(&mut self, i: usize) {
        self.state.src[i] = MigratePfn::flags_only(MigratePfnFlags::MIGRATE);
        self.state.cpages += 1;
    }

    /// Collects entry `k` of the run `p` (under its lock) if the rules select it.
    pub(crate) fn collect(&mut self, p: &PteSlot<'_>, k: usize) -> Next<'g> {
        collect_pte(&mut self.state, p, k, &mut self.tlb)
    }

    /// Whether entry `i` may head a unit: `SELECT_COMPOUND`, and its 2 MiB starts there
    /// and lies inside the range.
    pub(crate) fn unit_fits(&self, i: usize) -> bool {
        self.state.unit_fits(i)
    }

    /// Collects entry `i` and the 511 after it, an empty PMD or the huge zero page of
    /// anonymous memory, as one empty unit.
    pub(crate) fn collect_empty_unit(&mut self, i: usize) {
        self.state.collect_empty_unit(i);
    }

    /// Collects the PMD leaf `p` (under its lock) whole if `whole` and the rules select
    /// it; see [`PmdNext`].
    pub(crate) fn collect_pmd(&mut self, p: &LeafSlot<'_>, whole: bool) -> PmdNext {
        self.state.collect_pmd(p, whole, &mut self.tlb)
    }

    /// Splits the PMD leaf at `base` (no page-table lock held).
    pub(crate) fn split_pmd(&mut self, base: VirtAddr) {
        let mm = self.state.mmap.mm();
        let st = self.state.mmap.state();
        split_pmd(mm, &st.pt, Some(self.state.vma.info()), base, &mut self.tlb);
    }

    /// Splits the large folio that the page at `va` belongs to (no page-table lock held);
    /// if it cannot be split, the rest of `va`'s PMD is not collected, and collection
    /// goes on at the next PMD (`migrate_vma_collect_skip` to the end of the PMD's range).
    pub(crate) fn split_folio(&mut self, folio: FrameRef<'_>, va: VirtAddr) {
        let mm = self.state.mmap.mm();
        if !split_folio(mm, self.state.mmap.state(), folio.get()) {
            let end = self.state.range.end();
            let pmd_end = va
                .align_down(PMD_SIZE)
                .checked_add(PMD_SIZE)
                .map_or(end, |e| e.min(end));
            self.skip_until = self.state.index(pmd_end);
        }
    }

    /// Ends the walk: the TLB flush for the entries replaced, the end of the
    /// invalidation; the collected state goes on.
    pub(super) fn finish(self) -> State<'g, 'a> {
        let Collector {
            tlb, inv, state, ..
        } = self;
        tlb.finish();
        inv.end();
        state
    }
}

/// The one collect walk of `migrate_vma_setup`, faulting if `args.flags` has `FAULT`.
pub(super) fn collect<'g, 'a>(
    mmap: &'g MmapReadGuard<'a>,
    vma: &'g Vma,
    args: MigrateVma,
) -> Result<State<'g, 'a>, HmmError> {
    let mut col = Collector::new(mmap, vma, args);
    let mut request = HmmPfnFlags::REQ_MIGRATE;
    if args.flags.contains(MigrateVmaFlags::FAULT) {
        request |= HmmPfnFlags::REQ_FAULT;
    }
    let n = (args.end.as_u64() - args.start.as_u64()) >> crate::addr::PAGE_SHIFT;
    let mut words = vec![Default::default(); n as usize];
    let mut w = Walk::new(
        args.start,
        args.end,
        &mut words,
        request,
        HmmPfnFlags::empty(),
        args.pgmap_owner,
        None,
        Some(&mut col),
    );
    // A migrate_to_ram handler's migration is part of a CPU fault, not a driver's pass.
    let by = if args.fault_page.is_some() {
        RangeWalker::FaultHandler
    } else {
        RangeWalker::Migrate
    };
    run_walk(mmap, &mut w, by)?;
    Ok(col.finish())
}

/// Pages a migrating walk collected: locked, unmapped from the walked range behind
/// migration entries, waiting for [`migrate_hmm_range_setup`]. Dropping it puts every
/// page back as it was.
#[must_use = "dropping puts every collected page back; call migrate_hmm_range_setup"]
pub struct HmmMigrate<'g, 'a> {
    state: State<'g, 'a>,
}

impl HmmMigrate<'_, '_> {
    /// One word per page: what the walk collected, as `migrate_hmm_range_setup` converts
    /// the range's `HMM_PFN_MIGRATE` words ([`MigratePfn::from_hmm`]).
    pub fn src(&self) -> &[MigratePfn] {
        &self.state.src
    }

    /// Entries collected so far (before the pin check of
    /// [`migrate_hmm_range_setup`]).
    pub fn cpages(&self) -> u64 {
        self.state.cpages
    }
}

impl std::fmt::Debug for HmmMigrate<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmmMigrate")
            .field("range", &self.state.range)
            .field("cpages", &self.state.cpages)
            .finish_non_exhaustive()
    }
}

/// Mirrors `range` and, in the same walk, prepares for migration every page whose
/// request (`(input & pfn_flags_mask) | default_flags`) has `REQ_MIGRATE`, selected by
/// `flags` and `range.dev_private_owner` as `migrate_vma_setup` selects
/// (`hmm_range_fault` with `HMM_PFN_REQ_MIGRATE`); see
/// [migrate on fault](crate::migrate#migrate-on-fault).
///
/// Each page is first faulted if its request says so (`REQ_FAULT`, `REQ_WRITE`: a write
/// request breaks COW before the page is collected, so it migrates writable); holes and
/// the zero page of anonymous memory need no fault. A collected page's word is
/// `MIGRATE` (with `VALID`, the frame and `WRITE` if it has a source page); a page that is
/// not collected gets the word `hmm_range_fault` would give it, for the caller to mirror
/// once `read_retry` under its lock says no invalidation collided. The walk counts as one
/// pass ([`RangeWalkStats::hmm`](crate::stats::RangeWalkStats::hmm)).
///
/// # Errors
///
/// `Range` if the range is not inside one VMA; `Inval` for bad arguments (as
/// [`hmm_range_fault`](crate::range_fault::hmm_range_fault)), a hugetlb or driver VMA, or
/// [`MigrateVmaFlags::FAULT`] (faulting is asked per page with `REQ_FAULT`); `Fault`,
/// `Perm`, `NoMem` as `hmm_range_fault`, after putting back every page collected. Never
/// `Busy`.
///
/// # Example
///
/// A range with written pages and holes goes to a device in one walk:
///
/// ```
/// use std::sync::Arc;
/// use hmm::addr::PAGE_SIZE;
/// use hmm::migrate::{hmm_range_fault_migrate, migrate_hmm_range_setup, MigrateVmaFlags};
/// use hmm::mm::{MapFlags, Mm, Prot};
/// use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange, Owner};
/// use hmm::phys::{FrameFlags, PhysConfig, PhysMem};
/// use hmm::range_fault::{HmmPfn, HmmPfnFlags, HmmRange};
/// use hmm::zone_device::{memremap_pages, DevPagemapOps, MemoryType, PagemapConfig};
///
/// struct Device;
/// impl DevPagemapOps for Device {}
/// struct Mirror;
/// impl IntervalNotifierOps for Mirror {
///     fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
///         sub.set_seq(seq);
///         true
///     }
/// }
///
/// let phys = PhysMem::new(PhysConfig::with_size(16 << 20))?;
/// let owner = Owner::new_unique();
/// let config = PagemapConfig { kind: MemoryType::DevicePrivate, owner, size_bytes: 4 << 20 };
/// let dev = memremap_pages(&phys, config, Arc::new(Device))?;
/// let mm = Mm::new(phys.clone());
/// let len = 8 * PAGE_SIZE;
/// let a = mm.mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
/// mm.write(a, b"pages 0 and 1 are written, 2..8 are holes")?;
/// mm.write(a.checked_add(PAGE_SIZE).unwrap(), b"page 1")?;
/// let notifier = mm.interval_notifier_insert(a, len, Arc::new(Mirror))?;
///
/// let mmap = mm.mmap_read();
/// let mut pfns = [HmmPfn::default(); 8];
/// let mut range = HmmRange {
///     notifier: &notifier,
///     notifier_seq: notifier.read_begin(),
///     start: a,
///     end: a.checked_add(len).unwrap(),
///     hmm_pfns: &mut pfns,
///     default_flags: HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_MIGRATE,
///     pfn_flags_mask: HmmPfnFlags::empty(),
///     dev_private_owner: Some(owner),
/// };
/// let collected = hmm_range_fault_migrate(&mmap, &mut range, MigrateVmaFlags::SELECT_SYSTEM)?;
/// assert!(range.hmm_pfns.iter().all(|w| w.is_migrating()));
/// assert!(range.hmm_pfns[0].is_valid() && !range.hmm_pfns[2].is_valid()); // page, hole
///
/// let mut m = migrate_hmm_range_setup(collected);
/// for i in 0..8 {
///     let d = dev.alloc(0, FrameFlags::empty())?;
///     match m.src_page(i) {
///         Some(src) => d.copy_from(&src),
///         None => d.zero(),
///     }
///     m.set_dst(i, d, true).expect("a migrating entry");
/// }
/// assert_eq!(m.pages().finalize().migrated, 8);
/// assert_eq!(mm.stats().range_walks.hmm, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[doc(alias = "HMM_PFN_REQ_MIGRATE")]
pub fn hmm_range_fault_migrate<'g, 'a>(
    mmap: &'g MmapReadGuard<'a>,
    range: &mut HmmRange<'_>,
    flags: MigrateVmaFlags,
) -> Result<HmmMigrate<'g, 'a>, HmmError> {
    let span = check(mmap, range)?;
    if flags.contains(MigrateVmaFlags::FAULT) {
        return Err(HmmError::Inval {
            what: "MIGRATE_VMA_FAULT is migrate_vma_setup's; request REQ_FAULT per page",
        });
    }
    let vma = mmap
        .vma_lookup(span.start())
        .ok_or(HmmError::Range { addr: span.start() })?;
    if !vma.range().contains_range(&span) {
        return Err(HmmError::Range { addr: vma.end() });
    }
    if vma.flags().intersects(VmFlags::HUGETLB | VmFlags::MIXEDMAP) {
        return Err(HmmError::Inval {
            what: "hugetlb or driver VMA cannot migrate",
        });
    }
    let args = MigrateVma {
        start: span.start(),
        end: span.end(),
        pgmap_owner: range.dev_private_owner,
        flags,
        fault_page: None,
    };
    let mut col = Collector::new(mmap, vma, args);
    let mut w = Walk::of_range(range, Some(&mut col));
    run_walk(mmap, &mut w, RangeWalker::Hmm)?;
    Ok(HmmMigrate {
        state: col.finish(),
    })
}

/// Finishes the setup of the pages a migrating walk collected
/// (`migrate_hmm_range_setup`): unmaps them from every other place that maps them and
/// puts back those that are pinned, as `migrate_vma_setup` does after its collect walk.
/// The result is an ordinary [`Migration`]: set destinations, `pages`, `finalize`.
pub fn migrate_hmm_range_setup<'g, 'a>(collected: HmmMigrate<'g, 'a>) -> Migration<'g, 'a> {
    let HmmMigrate { mut state } = collected;
    unmap_and_check(&mut state);
    state
        .mmap
        .mm()
        .counters()
        .migrate_setup(state.collected_pages());
    Migration { state }
}
