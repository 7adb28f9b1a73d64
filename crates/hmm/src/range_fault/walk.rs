//! The page walk behind `hmm_range_fault`, plain or migrating (`hmm_vma_walk_*`).
//!
//! One pass visits each page of the range once, in order, and writes its word. A page
//! that needs a fault ends the current page-table walk: the fault runs with no page-table
//! lock held, and the pass goes on from that page (a restart, counted as such). A
//! migration entry that must be faulted is waited on the same way.
//!
//! A migrating pass (a [`Collector`] is given) also *prepares* each page whose request has
//! `REQ_MIGRATE`, under the same page-table lock and right after any fault it needed: a
//! hole or the zero page of anonymous memory is collected as an empty entry without a
//! fault; any other page is collected by the rules of `migrate_vma_collect_pmd`
//! (selection by flags and owner, trylock, the anon-exclusive pin rule, a migration entry
//! in place of the PTE). A PMD-mapped THP is split first, a PTE-mapped one too, and a
//! folio that cannot be split ends collection in its PMD: the pages from it to the PMD's
//! end are reported but not collected, and collection goes on at the next PMD (the
//! kernel's `migrate_vma_collect_skip(addr, end)` in `migrate_vma_collect_pmd`).

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE};
use crate::migrate::{Collector, Next, PmdNext};
use crate::mm::userfaultfd::UffdWait;
use crate::mm::{handle_mm_fault_retry, FaultError, FaultFlags, Faulted, MmapReadGuard, Vma};
use crate::notifier::{IntervalSub, Owner, ReadSeq};
use crate::pgtable::{Huge, Pte, PteFlags, Slot, WalkMode};
use crate::phys::PhysMem;
use crate::prot::VmFlags;
use crate::stats::RangeWalker;

use super::{HmmError, HmmPfn, HmmPfnFlags, HmmRange};

/// What the fault needed for one page, from its request and the CPU state
/// (`hmm_pte_need_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    None,
    Fault,
    WriteFault,
}

/// One pass over a range: its arguments, where the output stops, and the collector of a
/// migrating pass.
pub(crate) struct Walk<'r, 'g, 'a> {
    pub(crate) start: VirtAddr,
    pub(crate) end: VirtAddr,
    pub(crate) pfns: &'r mut [HmmPfn],
    pub(crate) default_flags: HmmPfnFlags,
    pub(crate) pfn_flags_mask: HmmPfnFlags,
    pub(crate) owner: Option<Owner>,
    /// The early collision check of a plain pass; a migrating pass has none (see
    /// `hmm_range_fault_migrate`).
    pub(crate) seq: Option<(&'r IntervalSub, ReadSeq)>,
    pub(crate) collect: Option<&'r mut Collector<'g, 'a>>,
    /// The first page whose word still holds its input.
    last: VirtAddr,
    /// The caller can drop the mmap lock: faults may wait outside it
    /// (`hmm_range_fault_unlocked_timeout`).
    pub(crate) allow_retry: bool,
    /// Set when a fault must wait outside the mmap lock; the pass then ends with `Busy`,
    /// and the caller drops the lock, waits, and starts a new pass.
    pub(crate) dropped: Option<UffdWait>,
}

impl<'r, 'g, 'a> Walk<'r, 'g, 'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        start: VirtAddr,
        end: VirtAddr,
        pfns: &'r mut [HmmPfn],
        default_flags: HmmPfnFlags,
        pfn_flags_mask: HmmPfnFlags,
        owner: Option<Owner>,
        seq: Option<(&'r IntervalSub, ReadSeq)>,
        collect: Option<&'r mut Collector<'g, 'a>>,
    ) -> Self {
        Walk {
            start,
            end,
            pfns,
            default_flags,
            pfn_flags_mask,
            owner,
            seq,
            collect,
            last: start,
            allow_retry: false,
            dropped: None,
        }
    }

    /// The pass `hmm_range_fault` makes over `range`: plain (with the early collision
    /// check) without a collector, migrating (with none) with one.
    pub(crate) fn of_range(
        range: &'r mut HmmRange<'_>,
        collect: Option<&'r mut Collector<'g, 'a>>,
    ) -> Self {
        let seq = collect
            .is_none()
            .then_some((range.notifier, range.notifier_seq));
        Walk::new(
            range.start,
            range.end,
            range.hmm_pfns,
            range.default_flags,
            range.pfn_flags_mask,
            range.dev_private_owner,
            seq,
            collect,
        )
    }

    fn index(&self, va: VirtAddr) -> usize {
        ((va.as_u64() - self.start.as_u64()) >> PAGE_SHIFT) as usize
    }

    fn request(&self, i: usize) -> HmmPfnFlags {
        (self.pfns[i].flags() & self.pfn_flags_mask) | self.default_flags
    }

    /// Whether every page of `unit` (inside the range) is to be prepared for migration.
    fn unit_migrating(&self, unit: VaRange) -> bool {
        unit.end() <= self.end
            && unit.start() >= self.start
            && (self.index(unit.start())..self.index(unit.end())).all(|i| self.migrating(i))
    }

    /// Whether page `i` is to be prepared for migration.
    fn migrating(&self, i: usize) -> bool {
        self.collect.as_ref().is_some_and(|c| !c.skips(i))
            && self.request(i).contains(HmmPfnFlags::REQ_MIGRATE)
    }

    /// What a page with CPU flags `cpu` needs to satisfy request `req`.
    fn need(req: HmmPfnFlags, cpu: HmmPfnFlags) -> Need {
        if !req.contains(HmmPfnFlags::REQ_FAULT) {
            Need::None
        } else if req.contains(HmmPfnFlags::REQ_WRITE) && !cpu.contains(HmmPfnFlags::WRITE) {
            Need::WriteFault
        } else if !cpu.contains(HmmPfnFlags::VALID) {
            Need::Fault
        } else {
            Need::None
        }
    }

    /// The strongest need of the pages of `r`.
    fn need_range(&self, r: VaRange, cpu: HmmPfnFlags) -> Need {
        // Without per-page requests one page speaks for all (hmm_range_need_fault).
        if self.pfn_flags_mask.is_empty() {
            return Self::need(self.default_flags, cpu);
        }
        let (a, b) = (self.index(r.start()), self.index(r.end()));
        (a..b)
            .map(|i| Self::need(self.request(i), cpu))
            .max()
            .unwrap_or(Need::None)
    }

    /// Writes `out(input)` for every page of `r` and moves `last` past it.
    fn fill(&mut self, r: VaRange, out: impl Fn(u64, HmmPfn) -> HmmPfn) {
        let (a, b) = (self.index(r.start()), self.index(r.end()));
        for (k, w) in self.pfns[a..b].iter_mut().enumerate() {
            *w = out(k as u64, *w);
        }
        self.last = r.end();
    }

    /// Writes page `va`'s word and moves `last` past it.
    fn put(&mut self, va: VirtAddr, word: HmmPfn) {
        let i = self.index(va);
        self.pfns[i] = word;
        self.last = va.checked_add(PAGE_SIZE).expect("below end");
    }

    /// Writes the word of page `va`, collected: `MIGRATE`, with the frame if it has one.
    fn put_collected(&mut self, va: VirtAddr) {
        let i = self.index(va);
        let src = self.collect.as_ref().expect("a migrating pass").src(i);
        let word = HmmPfn::from_migrate(src).with_inout(self.pfns[i]);
        self.put(va, word);
    }
}

/// What a page-table walk ended with.
enum Step {
    /// Every page is written.
    Done,
    /// Fault `range` (with write if asked), then walk again from `last`.
    Fault { range: VaRange, write: bool },
    /// Fault these pages (with write where asked), then walk again from `last`.
    FaultPages(Vec<(VirtAddr, bool)>),
    /// A migration entry was waited on: walk again from `last`.
    Again,
}

/// Runs one pass over `w`'s range, counted as a pass by `by`: page-table walks from the
/// first unwritten page until every page is written, faulting in between.
pub(crate) fn run(
    mmap: &MmapReadGuard<'_>,
    w: &mut Walk<'_, '_, '_>,
    by: RangeWalker,
) -> Result<(), HmmError> {
    let counters = mmap.mm().counters();
    counters.range_walk(by);
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            counters.range_walk_restart();
        }
        if let Some((sub, seq)) = w.seq {
            if sub.check_retry(seq) {
                return Err(HmmError::Busy);
            }
        }
        let todo = VaRange::new(w.last, w.end).expect("last is below end");
        match walk(mmap, w, todo)? {
            Step::Done => return Ok(()),
            Step::Again => {}
            Step::Fault { range: r, write } => {
                for va in r.pages() {
                    fault(mmap, w, va, write)?;
                }
            }
            Step::FaultPages(pages) => {
                for (va, write) in pages {
                    fault(mmap, w, va, write)?;
                }
            }
        }
    }
}

/// Faults the page at `va` for the walk (`handle_mm_fault` with `REMOTE`, and
/// `ALLOW_RETRY` when the caller can drop the lock: a fault that must wait outside it
/// ends the pass with `Busy` and leaves the wait in `w.dropped`).
fn fault(
    mmap: &MmapReadGuard<'_>,
    w: &mut Walk<'_, '_, '_>,
    va: VirtAddr,
    write: bool,
) -> Result<(), HmmError> {
    let mut flags = FaultFlags::REMOTE;
    if write {
        flags |= FaultFlags::WRITE;
    }
    if w.allow_retry {
        flags |= FaultFlags::ALLOW_RETRY;
    }
    let faulted =
        handle_mm_fault_retry(mmap.mm(), mmap.state(), va, flags).map_err(|e| match e {
            FaultError::Oom { addr } => HmmError::NoMem { addr },
            FaultError::Killed { .. } => HmmError::Interrupted,
            FaultError::Segv { addr, .. } | FaultError::Bus { addr } => HmmError::Fault { addr },
        })?;
    match faulted {
        Faulted::Done => Ok(()),
        Faulted::Retry(wait) => {
            w.dropped = Some(wait);
            Err(HmmError::Busy)
        }
    }
}

/// One page-table walk over `todo` (`walk_page_range` with `hmm_walk_ops`).
fn walk(
    mmap: &MmapReadGuard<'_>,
    w: &mut Walk<'_, '_, '_>,
    todo: VaRange,
) -> Result<Step, HmmError> {
    let phys = mmap.mm().phys();
    let owner = w.owner;
    let mut c = mmap.page_table().cursor(todo, WalkMode::Lookup);
    c.set_batch(true);
    // The VMA of the current position, looked up once per VMA.
    let mut vma: Option<&Vma> = None;
    loop {
        let at = w.last;
        if at >= todo.end() {
            return Ok(Step::Done);
        }
        if !vma.is_some_and(|v| v.range().contains(at)) {
            vma = mmap.vma_lookup(at);
            let Some(v) = vma else {
                // A hole without a VMA, up to the next VMA or the end (hmm_vma_walk_hole).
                let next = next_vma_start(mmap, at, todo.end());
                let hole = VaRange::new(at, next).expect("non-empty hole");
                if w.need_range(hole, HmmPfnFlags::empty()) != Need::None {
                    return Err(HmmError::Fault { addr: at });
                }
                w.fill(hole, |_, i| HmmPfn::with_flags(HmmPfnFlags::ERROR, i));
                if next < todo.end() {
                    c.seek(next);
                }
                continue;
            };
            if !v.flags().contains(VmFlags::READ) {
                // hmm_vma_walk_test: no read permission → ERROR, or EFAULT if asked. A
                // migrating pass still collects the pages (they migrate like any other).
                let r = VaRange::new(at, v.end().min(todo.end())).expect("inside the VMA");
                if w.need_range(r, HmmPfnFlags::empty()) != Need::None {
                    return Err(HmmError::Fault { addr: at });
                }
                if w.collect.is_none() {
                    w.fill(r, |_, i| HmmPfn::with_flags(HmmPfnFlags::ERROR, i));
                    if r.end() < todo.end() {
                        c.seek(r.end());
                    }
                    continue;
                }
            }
        }
        let v = vma.expect("looked up above");
        let Some(slot) = c.next() else {
            return Ok(Step::Done);
        };
        match slot {
            Slot::Hole(h) => {
                let r = VaRange::new(at, h.end().min(v.end())).expect("hole from `at`");
                if w.collect.is_some() && v.is_anonymous() {
                    // Empty anonymous pages migrate without a fault: the destination is
                    // zero-filled and inserted by migrate_vma_pages; an empty 2 MiB is
                    // one unit with SELECT_COMPOUND.
                    let mut va = r.start();
                    while va < r.end() {
                        let i = w.index(va);
                        if w.migrating(i) {
                            let unit = VaRange::from_len(va, PMD_SIZE)
                                .ok()
                                .filter(|u| u.end() <= r.end() && w.unit_migrating(*u));
                            let col = w.collect.as_deref_mut().expect("migrating");
                            if let Some(u) = unit.filter(|_| col.unit_fits(i)) {
                                col.collect_empty_unit(i);
                                u.pages().for_each(|va| w.put_collected(va));
                                va = u.end();
                            } else {
                                col.collect_empty(i);
                                w.put_collected(va);
                                va = w.last;
                            }
                            continue;
                        }
                        match Walk::need(w.request(i), HmmPfnFlags::empty()) {
                            Need::None => {
                                let word = HmmPfn::with_flags(HmmPfnFlags::empty(), w.pfns[i]);
                                w.put(va, word);
                                va = w.last;
                            }
                            need => return fault_step(v, VaRange::page_of(va), need),
                        }
                    }
                } else {
                    match w.need_range(r, HmmPfnFlags::empty()) {
                        Need::None => w.fill(r, |_, i| HmmPfn::with_flags(HmmPfnFlags::empty(), i)),
                        need => return fault_step(v, r, need),
                    }
                }
                if r.end() < h.end() {
                    c.seek(r.end());
                }
            }
            Slot::Pte(p) => {
                // A run of PTEs of one table (the walk is batched), clipped to the VMA.
                let base = p.va();
                let in_vma = ((v.end().as_u64() - base.as_u64()) >> PAGE_SHIFT) as usize;
                let n = p.len().min(in_vma);
                let mut stop = None;
                for k in 0..n {
                    let va = p.va_at(k);
                    let pte = p.get_at(k);
                    let i = w.index(va);
                    let req = w.request(i);
                    let migrating = w.migrating(i);
                    if migrating && w.collect.as_ref().is_some_and(|c| c.migrates_empty(pte)) {
                        let col = w.collect.as_deref_mut().expect("migrating");
                        let _ = col.collect(&p, k);
                        w.put_collected(va);
                        continue;
                    }
                    let (cpu, nr) = match usable(phys, owner, pte) {
                        Some(v) => v,
                        None if matches!(pte, Pte::Migration { .. })
                            && Walk::need(req, HmmPfnFlags::empty()) != Need::None =>
                        {
                            stop = Some(RunStop::Wait(pte));
                            break;
                        }
                        None => (HmmPfnFlags::empty(), 0),
                    };
                    if Walk::need(req, cpu) != Need::None {
                        return fault_run(phys, w, v, &p, k, n);
                    }
                    if migrating {
                        let col = w.collect.as_deref_mut().expect("migrating");
                        if let Next::SplitFolio(folio) = col.collect(&p, k) {
                            stop = Some(RunStop::Split(folio));
                            break;
                        }
                        if col.src(i).is_migrating() {
                            w.put_collected(va);
                            continue;
                        }
                    }
                    let word = HmmPfn::output(nr, cpu, 0, w.pfns[i]);
                    w.put(va, word);
                }
                let short = n < p.len();
                match stop {
                    Some(RunStop::Wait(entry)) => {
                        c.unlock();
                        migration_wait(mmap, entry);
                        return Ok(Step::Again);
                    }
                    Some(RunStop::Split(folio)) => {
                        c.unlock();
                        let col = w.collect.as_deref_mut().expect("migrating");
                        col.split_folio(folio, w.last);
                        c.seek(w.last);
                    }
                    // The VMA ends inside the run: go on from its end.
                    None if short => c.seek(w.last),
                    None => {}
                }
            }
            // A PUD leaf is a 1 GiB hugetlb page: reported with its order, as the kernel's
            // hmm_vma_walk_hugetlb_entry reports huge_page_order(), and never collected.
            Slot::Pmd(p) | Slot::Pud(p) => {
                let leaf = p.get();
                let r = VaRange::new(at, p.range().end().min(todo.end())).expect("leaf from `at`");
                let (cpu, head) = match usable(phys, owner, leaf) {
                    Some(v) => v,
                    None if matches!(leaf, Pte::Migration { .. })
                        && w.need_range(r, HmmPfnFlags::empty()) != Need::None =>
                    {
                        c.unlock();
                        migration_wait(mmap, leaf);
                        return Ok(Step::Again);
                    }
                    None => (HmmPfnFlags::empty(), 0),
                };
                let need = w.need_range(r, cpu);
                let migrating = w.collect.is_some()
                    && p.level() == Huge::Pmd
                    && (w.index(r.start())..w.index(r.end())).any(|i| w.migrating(i));
                if migrating {
                    // A THP or device THP is collected whole as one unit when the unit
                    // fits and all of it migrates, else split and collected page by page;
                    // the huge zero page likewise, needing no fault first (it migrates
                    // empty).
                    let unit = p.range();
                    let whole = r == unit && w.unit_migrating(unit);
                    let i = w.index(at);
                    let col = w.collect.as_deref_mut().expect("migrating");
                    let whole = whole && col.unit_fits(i);
                    let next = if col.migrates_empty(leaf) {
                        if whole {
                            col.collect_empty_unit(i);
                            PmdNext::Collected
                        } else {
                            PmdNext::Split
                        }
                    } else if need == Need::None {
                        col.collect_pmd(&p, whole)
                    } else {
                        PmdNext::Skip
                    };
                    match next {
                        PmdNext::Collected => {
                            r.pages().for_each(|va| w.put_collected(va));
                            continue;
                        }
                        PmdNext::Split => {
                            c.unlock();
                            let col = w.collect.as_deref_mut().expect("migrating");
                            col.split_pmd(unit.start());
                            c.seek(at);
                            continue;
                        }
                        PmdNext::Skip => {}
                    }
                }
                match need {
                    Need::None => {
                        let first = (at.as_u64() - p.range().start().as_u64()) >> PAGE_SHIFT;
                        let order = if cpu.is_empty() { 0 } else { p.level().order() };
                        w.fill(r, |k, i| {
                            let nr = if cpu.is_empty() { 0 } else { head + first + k };
                            HmmPfn::output(nr, cpu, order, i)
                        });
                    }
                    need => return fault_step(v, r, need),
                }
            }
        }
    }
}

/// Why a run of PTEs stopped early.
enum RunStop<'g> {
    /// At a migration entry to wait on.
    Wait(Pte),
    /// At a page of a large folio to split before collecting.
    Split(crate::phys::FrameRef<'g>),
}

/// The faults to run for a run of PTEs whose entry `k` needs one (`hmm_vma_fault` from
/// that page to the end of the run, as the kernel faults to the end of the PMD range): each
/// page of `k..n` that needs a fault, with its own need, up to a migration entry (waited on
/// when the walk comes back to it). `Perm` if a write is needed on a VMA without write
/// permission, checked before any fault.
fn fault_run(
    phys: &PhysMem,
    w: &Walk<'_, '_, '_>,
    vma: &Vma,
    p: &crate::pgtable::PteSlot<'_>,
    k: usize,
    n: usize,
) -> Result<Step, HmmError> {
    let mut pages = Vec::new();
    for j in k..n {
        let va = p.va_at(j);
        let pte = p.get_at(j);
        let i = w.index(va);
        if w.migrating(i) && w.collect.as_ref().is_some_and(|c| c.migrates_empty(pte)) {
            continue;
        }
        let cpu = match usable(phys, w.owner, pte) {
            Some((cpu, _)) => cpu,
            None if matches!(pte, Pte::Migration { .. }) && j > k => break,
            None => HmmPfnFlags::empty(),
        };
        match Walk::need(w.request(i), cpu) {
            Need::None => {}
            need => {
                let write = need == Need::WriteFault;
                if write && !vma.flags().contains(VmFlags::WRITE) {
                    return Err(HmmError::Perm { addr: va });
                }
                pages.push((va, write));
            }
        }
    }
    Ok(Step::FaultPages(pages))
}

/// The fault to run for `r` of `vma` (`hmm_vma_fault`): `Perm` for a write on a VMA
/// without write permission, checked before any fault.
fn fault_step(vma: &Vma, r: VaRange, need: Need) -> Result<Step, HmmError> {
    let write = need == Need::WriteFault;
    if write && !vma.flags().contains(VmFlags::WRITE) {
        return Err(HmmError::Perm { addr: r.start() });
    }
    Ok(Step::Fault { range: r, write })
}

/// The CPU flags and frame of an entry the caller may use as it is: an accessible present
/// entry, or a device-private entry of the caller's own device; `None` for anything that
/// would need a fault.
fn usable(phys: &PhysMem, owner: Option<Owner>, entry: Pte) -> Option<(HmmPfnFlags, u64)> {
    match entry {
        Pte::Present { pfn, flags } if !flags.contains(PteFlags::PROTNONE) => {
            Some((cpu_flags(flags), pfn.as_u64()))
        }
        Pte::DevicePrivate { pfn, flags }
            if owner.is_some() && phys.pagemap_of(pfn.as_u64()).map(|p| p.owner()) == owner =>
        {
            Some((cpu_flags(flags), pfn.as_u64()))
        }
        _ => None,
    }
}

/// `VALID`, plus `WRITE` if the entry is writable (`pte_to_hmm_pfn_flags`).
fn cpu_flags(flags: PteFlags) -> HmmPfnFlags {
    if flags.contains(PteFlags::WRITE) {
        HmmPfnFlags::VALID | HmmPfnFlags::WRITE
    } else {
        HmmPfnFlags::VALID
    }
}

/// The start of the first VMA above `at`, or `end`.
fn next_vma_start(mmap: &MmapReadGuard<'_>, at: VirtAddr, end: VirtAddr) -> VirtAddr {
    mmap.state()
        .vmas
        .iter()
        .map(|v| v.start())
        .find(|&s| s > at)
        .map_or(end, |s| s.min(end))
}

/// Sleeps until the migration the entry stands for is done (`migration_entry_wait`); the
/// caller dropped its page-table lock.
fn migration_wait(mmap: &MmapReadGuard<'_>, entry: Pte) {
    let Pte::Migration { pfn, .. } = entry else {
        unreachable!("only migration entries are waited on")
    };
    crate::mm::wait_on_migration(mmap.mm().phys().frame_nr(pfn.nr()).folio());
}
