//! `hmm_range_fault`: how a device mirrors a range of a process's page table.
//!
//! [`hmm_range_fault`] walks the CPU page table over `[start, end)` and writes one
//! [`HmmPfn`] word per page: the frame number, `VALID`, `WRITE`, `ERROR` and the order of
//! the CPU mapping the page belongs to. Each word's *request* is
//! `(input & pfn_flags_mask) | default_flags`: with `REQ_FAULT` the page must end up valid
//! (faulted in through the CPU fault path, `REMOTE`), with `REQ_WRITE` also writable (a
//! write fault: COW, unshare, a new page). Without requests the call is a snapshot and
//! never faults. Device-private pages whose pagemap owner is `dev_private_owner` are
//! reported as they are (the caller's own memory); other owners' device-private pages are
//! faulted back through their `migrate_to_ram` when a fault is requested.
//!
//! # Protocol
//!
//! The result holds no references: it is valid only until the next invalidation of the
//! range. A driver therefore runs the interval-notifier loop (§1.5 of the kernel's
//! documentation), which [`fault_and_commit`] packages:
//!
//! 1. `seq = notifier.read_begin()`;
//! 2. take the mmap lock for reading, [`hmm_range_fault`], drop the lock; `Busy` → 1;
//! 3. take the driver lock (the one its `invalidate` takes); if
//!    `notifier.read_retry(seq)` → drop it and go to 1;
//! 4. program the device page table from the words, under the driver lock.
//!
//! Retries stop after a timeout ([`HMM_RANGE_DEFAULT_TIMEOUT`]) with `Busy`.
//!
//! # Walks
//!
//! One call walks the range once if nothing needs a fault. A fault ends the walk: the pages
//! of that slot are faulted with no page-table lock held, and the walk restarts at the first
//! page not yet written (entries before it hold their output, entries from it on their
//! input), as the kernel's `-EBUSY` loop around `walk_page_range` does. A migration entry
//! that must be faulted is waited on and the walk restarts the same way. Before each walk
//! the notifier sequence is checked; a collision returns `Busy`.

use std::time::{Duration, Instant};

use bitflags::bitflags;
use parking_lot::Mutex;
use thiserror::Error;

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE, PMD_ORDER};
use crate::mm::{FaultError, FaultFlags, Mm, MmapReadGuard, Vma};
use crate::notifier::{IntervalSub, Owner, ReadSeq};
use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
use crate::phys::{FrameRef, PhysMem};
use crate::prot::VmFlags;

/// The conventional bound of the `Busy` retry loop (`HMM_RANGE_DEFAULT_TIMEOUT`, 1000 ms).
pub const HMM_RANGE_DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// First bit of the mapping-order field of an [`HmmPfn`] (`HMM_PFN_ORDER_SHIFT`).
pub const HMM_PFN_ORDER_SHIFT: u32 = 53;
const HMM_PFN_ORDER_MASK: u64 = 0x1f << HMM_PFN_ORDER_SHIFT;
const HMM_PFN_PFN_MASK: u64 = (1 << HMM_PFN_ORDER_SHIFT) - 1;

bitflags! {
    /// The flag bits of an [`HmmPfn`] word (`enum hmm_pfn_flags`). Requests share bits with
    /// the outputs they ask for.
    #[doc(alias = "hmm_pfn_flags")]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HmmPfnFlags: u64 {
        /// Output: the frame number is meaningful and the page at least readable.
        #[doc(alias = "HMM_PFN_VALID")]
        const VALID = 1 << 63;
        /// Output: the CPU mapping is writable.
        #[doc(alias = "HMM_PFN_WRITE")]
        const WRITE = 1 << 62;
        /// Output: the device must not access this page (no VMA, no read permission).
        #[doc(alias = "HMM_PFN_ERROR")]
        const ERROR = 1 << 61;
        /// Sticky: the page is DMA-mapped by the caller; kept from input to output.
        #[doc(alias = "HMM_PFN_DMA_MAPPED")]
        const DMA_MAPPED = 1 << 60;
        /// Sticky: a peer-to-peer page.
        #[doc(alias = "HMM_PFN_P2PDMA")]
        const P2PDMA = 1 << 59;
        /// Sticky: a bus-address peer-to-peer mapping.
        #[doc(alias = "HMM_PFN_P2PDMA_BUS")]
        const P2PDMA_BUS = 1 << 58;
        /// Request: the page must end up `VALID` (fault it in if needed).
        #[doc(alias = "HMM_PFN_REQ_FAULT")]
        const REQ_FAULT = Self::VALID.bits();
        /// Request: the page must end up `WRITE` (with `REQ_FAULT`).
        #[doc(alias = "HMM_PFN_REQ_WRITE")]
        const REQ_WRITE = Self::WRITE.bits();
    }
}

/// Bits carried from input to output (`HMM_PFN_INOUT_FLAGS`).
const INOUT: HmmPfnFlags = HmmPfnFlags::DMA_MAPPED
    .union(HmmPfnFlags::P2PDMA)
    .union(HmmPfnFlags::P2PDMA_BUS);

/// One word of `hmm_pfns`: on input, per-page request flags; on output, a frame number,
/// flags and the CPU mapping order. `0` on output means "not present, but a fault could
/// make it so".
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct HmmPfn(u64);

impl HmmPfn {
    /// A word with just these flags (an input request).
    pub const fn request(flags: HmmPfnFlags) -> HmmPfn {
        HmmPfn(flags.bits())
    }

    /// The raw word.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The flag bits (order and frame number masked off).
    pub fn flags(self) -> HmmPfnFlags {
        HmmPfnFlags::from_bits_truncate(self.0)
    }

    /// Whether `VALID` is set.
    pub fn is_valid(self) -> bool {
        self.flags().contains(HmmPfnFlags::VALID)
    }

    /// Whether `WRITE` is set.
    pub fn is_writable(self) -> bool {
        self.flags().contains(HmmPfnFlags::WRITE)
    }

    /// Whether `ERROR` is set.
    pub fn is_error(self) -> bool {
        self.flags().contains(HmmPfnFlags::ERROR)
    }

    /// The order of the CPU mapping the page belongs to: 0 for a PTE, 9 for a PMD leaf
    /// (THP, hugetlb, device THP) (`hmm_pfn_to_map_order`). Every page of one large mapping
    /// carries the same order; the mapping may extend beyond the range.
    #[doc(alias = "hmm_pfn_to_map_order")]
    pub fn map_order(self) -> u32 {
        ((self.0 & HMM_PFN_ORDER_MASK) >> HMM_PFN_ORDER_SHIFT) as u32
    }

    /// The frame number: a CPU pfn, or a device pfn for the caller's own device-private
    /// page (the two share one numbering). Meaningful only when valid.
    pub fn frame_nr(self) -> u64 {
        self.0 & HMM_PFN_PFN_MASK
    }

    /// The frame a valid word names (`hmm_pfn_to_page`); `None` if it is not valid.
    #[doc(alias = "hmm_pfn_to_page")]
    pub fn frame(self, phys: &PhysMem) -> Option<FrameRef<'_>> {
        self.is_valid().then(|| phys.frame_nr(self.frame_nr()))
    }

    fn output(nr: u64, flags: HmmPfnFlags, order: u32, input: HmmPfn) -> HmmPfn {
        HmmPfn(
            nr | flags.bits()
                | (u64::from(order) << HMM_PFN_ORDER_SHIFT)
                | (input.flags() & INOUT).bits(),
        )
    }

    fn with_flags(flags: HmmPfnFlags, input: HmmPfn) -> HmmPfn {
        Self::output(0, flags, 0, input)
    }
}

impl std::fmt::Debug for HmmPfn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HmmPfn({:#x}, {:?}, order {})",
            self.frame_nr(),
            self.flags(),
            self.map_order()
        )
    }
}

/// A range to mirror (`struct hmm_range`).
#[doc(alias = "hmm_range")]
#[derive(Debug)]
pub struct HmmRange<'a> {
    /// The interval notifier covering the range; its address space is the one walked.
    pub notifier: &'a IntervalSub,
    /// What `notifier.read_begin()` returned; the call fails with `Busy` once an
    /// invalidation collides with it.
    pub notifier_seq: ReadSeq,
    /// First address (page aligned).
    pub start: VirtAddr,
    /// End address, exclusive (page aligned, above `start`).
    pub end: VirtAddr,
    /// One word per page: requests in, results out.
    pub hmm_pfns: &'a mut [HmmPfn],
    /// Requests applied to every page.
    pub default_flags: HmmPfnFlags,
    /// Which per-page request bits count.
    pub pfn_flags_mask: HmmPfnFlags,
    /// Device-private pages of this owner are reported, not faulted.
    pub dev_private_owner: Option<Owner>,
}

/// Why [`hmm_range_fault`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HmmError {
    /// The range was invalidated (the notifier sequence changed), or the retry loop timed
    /// out: start over from `read_begin` (`-EBUSY`).
    #[error("range invalidated during the walk; retry")]
    Busy,
    /// A requested fault is impossible: no VMA, no read permission, or the fault path
    /// raised SIGSEGV/SIGBUS (`-EFAULT`).
    #[error("cannot fault the page at {addr}")]
    Fault {
        /// The page.
        addr: VirtAddr,
    },
    /// A write was requested on a VMA without write permission (`-EPERM`).
    #[error("write requested on read-only VMA at {addr}")]
    Perm {
        /// The page.
        addr: VirtAddr,
    },
    /// No memory to fault the page in (`-ENOMEM`).
    #[error("out of memory faulting the page at {addr}")]
    NoMem {
        /// The page.
        addr: VirtAddr,
    },
    /// Bad arguments: unaligned or empty range, a PFN array of the wrong length, or a
    /// notifier of another address space (`-EINVAL`).
    #[error("invalid hmm_range: {what}")]
    Inval {
        /// What was wrong.
        what: &'static str,
    },
}

/// What the fault needed for one page, from its request and the CPU state
/// (`hmm_pte_need_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    None,
    Fault,
    WriteFault,
}

/// Walk state: where the output stops, and what to fault next.
struct Walk<'r, 'a> {
    range: &'r mut HmmRange<'a>,
    /// The first page whose word still holds its input.
    last: VirtAddr,
}

impl Walk<'_, '_> {
    fn index(&self, va: VirtAddr) -> usize {
        ((va.as_u64() - self.range.start.as_u64()) >> PAGE_SHIFT) as usize
    }

    fn request(&self, i: usize) -> HmmPfnFlags {
        (self.range.hmm_pfns[i].flags() & self.range.pfn_flags_mask) | self.range.default_flags
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
        if self.range.pfn_flags_mask.is_empty() {
            return Self::need(self.range.default_flags, cpu);
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
        for (k, w) in self.range.hmm_pfns[a..b].iter_mut().enumerate() {
            *w = out(k as u64, *w);
        }
        self.last = r.end();
    }
}

/// What a walk ended with.
enum Step {
    /// Every page is written.
    Done,
    /// Fault `range` (with write if asked), then walk again from `last`.
    Fault { range: VaRange, write: bool },
    /// A migration entry was waited on: walk again from `last`.
    Again,
}

/// Fills `range.hmm_pfns` for `[range.start, range.end)` of the address space the mmap
/// lock `mmap` belongs to, faulting pages as requested (`hmm_range_fault`). See the
/// [module documentation](self) for the protocol, the errors and what the output means.
pub fn hmm_range_fault(mmap: &MmapReadGuard<'_>, range: &mut HmmRange<'_>) -> Result<(), HmmError> {
    let mm = mmap.mm();
    if range.notifier.mm() != mm.id() {
        return Err(HmmError::Inval {
            what: "the notifier watches another address space",
        });
    }
    let span = VaRange::new(range.start, range.end).map_err(|_| HmmError::Inval {
        what: "unaligned or empty range",
    })?;
    if range.hmm_pfns.len() as u64 != span.npages() {
        return Err(HmmError::Inval {
            what: "hmm_pfns length differs from the number of pages",
        });
    }
    let mut w = Walk {
        last: range.start,
        range,
    };
    loop {
        if w.range.notifier.check_retry(w.range.notifier_seq) {
            return Err(HmmError::Busy);
        }
        let todo = VaRange::new(w.last, w.range.end).expect("last is below end");
        match walk(mmap, &mut w, todo)? {
            Step::Done => return Ok(()),
            Step::Again => {}
            Step::Fault { range: r, write } => {
                let mut flags = FaultFlags::REMOTE;
                if write {
                    flags |= FaultFlags::WRITE;
                }
                for va in r.pages() {
                    mmap.handle_mm_fault(va, flags).map_err(|e| match e {
                        FaultError::Oom { addr } => HmmError::NoMem { addr },
                        FaultError::Segv { addr, .. } | FaultError::Bus { addr } => {
                            HmmError::Fault { addr }
                        }
                    })?;
                }
            }
        }
    }
}

/// One page-table walk over `todo` (`walk_page_range` with `hmm_walk_ops`).
fn walk(mmap: &MmapReadGuard<'_>, w: &mut Walk<'_, '_>, todo: VaRange) -> Result<Step, HmmError> {
    let phys = mmap.mm().phys();
    let owner = w.range.dev_private_owner;
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
                // hmm_vma_walk_test: no read permission → ERROR, or EFAULT if asked.
                let r = VaRange::new(at, v.end().min(todo.end())).expect("inside the VMA");
                if w.need_range(r, HmmPfnFlags::empty()) != Need::None {
                    return Err(HmmError::Fault { addr: at });
                }
                w.fill(r, |_, i| HmmPfn::with_flags(HmmPfnFlags::ERROR, i));
                if r.end() < todo.end() {
                    c.seek(r.end());
                }
                continue;
            }
        }
        let v = vma.expect("looked up above");
        let Some(slot) = c.next() else {
            return Ok(Step::Done);
        };
        match slot {
            Slot::Hole(h) => {
                let r = VaRange::new(at, h.end().min(v.end())).expect("hole from `at`");
                match w.need_range(r, HmmPfnFlags::empty()) {
                    Need::None => w.fill(r, |_, i| HmmPfn::with_flags(HmmPfnFlags::empty(), i)),
                    need => return fault_step(v, r, need),
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
                let mut wait = None;
                for k in 0..n {
                    let va = base.checked_add(k as u64 * PAGE_SIZE).expect("in the run");
                    let pte = p.get_at(k);
                    let i = w.index(va);
                    let req = w.request(i);
                    let (cpu, nr) = match usable(phys, owner, pte) {
                        Some(v) => v,
                        None if matches!(pte, Pte::Migration { .. })
                            && Walk::need(req, HmmPfnFlags::empty()) != Need::None =>
                        {
                            wait = Some(pte);
                            break;
                        }
                        None => (HmmPfnFlags::empty(), 0),
                    };
                    match Walk::need(req, cpu) {
                        Need::None => {
                            w.range.hmm_pfns[i] = HmmPfn::output(nr, cpu, 0, w.range.hmm_pfns[i]);
                            w.last = va.checked_add(PAGE_SIZE).expect("below end");
                        }
                        need => return fault_step(v, VaRange::page_of(va), need),
                    }
                }
                if let Some(entry) = wait {
                    c.unlock();
                    migration_wait(mmap, entry);
                    return Ok(Step::Again);
                }
                if n < p.len() {
                    // The VMA ends inside the run: go on from its end.
                    c.seek(w.last);
                }
            }
            Slot::Pmd(p) => {
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
                match w.need_range(r, cpu) {
                    Need::None => {
                        let first = (at.as_u64() - p.range().start().as_u64()) >> PAGE_SHIFT;
                        let order = if cpu.is_empty() { 0 } else { PMD_ORDER };
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
    if let Ok(page) = mmap.mm().phys().frame_nr(pfn.nr()).try_get() {
        page.folio().meta().wait_unlocked();
    }
}

/// Mirrors `range` with the documented driver loop and commits the result under the
/// driver's lock: `read_begin`, [`hmm_range_fault`] under the mmap lock, then `commit`
/// with `driver_lock` held, but only once `read_retry` confirms no invalidation collided.
/// `Busy` results and collisions are retried until `timeout` (usually
/// [`HMM_RANGE_DEFAULT_TIMEOUT`]) passes, then `Busy` is returned; other errors at once.
///
/// `driver_lock` must be the lock the notifier's `invalidate` takes, and must not be held by
/// the caller (a fault may invalidate, and `invalidate` would wait for it).
#[doc(alias = "dmirror_range_fault")]
pub fn fault_and_commit<T, R>(
    mm: &Mm,
    range: &mut HmmRange<'_>,
    timeout: Duration,
    driver_lock: &Mutex<T>,
    commit: impl FnOnce(&mut T, &HmmRange<'_>) -> R,
) -> Result<R, HmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        if Instant::now() >= deadline {
            return Err(HmmError::Busy);
        }
        range.notifier_seq = range.notifier.read_begin();
        let result = {
            let mmap = mm.mmap_read();
            hmm_range_fault(&mmap, range)
        };
        match result {
            Err(HmmError::Busy) => continue,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        let mut guard = driver_lock.lock();
        if range.notifier.read_retry(range.notifier_seq) {
            continue;
        }
        return Ok(commit(&mut guard, range));
    }
}
