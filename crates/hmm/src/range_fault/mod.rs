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
//! One call is one pass over the range ([`RangeWalkStats`](crate::stats::RangeWalkStats)):
//! one page-table walk if nothing needs a fault. A fault ends the page-table walk: the
//! pages of that slot are faulted with no page-table lock held, and the pass goes on at the
//! first page not yet written (entries before it hold their output, entries from it on
//! their input), as the kernel's `-EBUSY` loop around `walk_page_range` does. A migration
//! entry that must be faulted is waited on and the pass goes on the same way. Before each
//! page-table walk the notifier sequence is checked; a collision returns `Busy`.
//!
//! The same walk, given `REQ_MIGRATE` requests, also prepares pages for migration:
//! [`hmm_range_fault_migrate`](crate::migrate::hmm_range_fault_migrate).
//!
//! # Example
//!
//! A device faulting 4 pages in for writing, with the loop [`fault_and_commit`] runs; the
//! device's table is a map from page to frame under the lock its notifier takes:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use hmm::addr::PAGE_SIZE;
//! use hmm::mm::{MapFlags, Mm, Prot};
//! use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange};
//! use hmm::phys::{PhysConfig, PhysMem};
//! use hmm::range_fault::{fault_and_commit, HmmPfn, HmmPfnFlags, HmmRange, HMM_RANGE_DEFAULT_TIMEOUT};
//! use hmm::sync::Mutex;
//!
//! struct Mirror(Mutex<BTreeMap<u64, u64>>);
//! impl IntervalNotifierOps for Mirror {
//!     fn invalidate(&self, sub: &IntervalSub, r: &NotifierRange, seq: InvalidateSeq) -> bool {
//!         let mut table = self.0.lock();
//!         sub.set_seq(seq);
//!         table.retain(|va, _| !r.range.contains(hmm::addr::VirtAddr::new(*va)));
//!         true
//!     }
//! }
//!
//! let mm = Mm::new(PhysMem::new(PhysConfig::with_size(16 << 20))?);
//! let a = mm.mmap(None, 4 * PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
//! let mirror = Arc::new(Mirror(Mutex::new(BTreeMap::new())));
//! let notifier = mm.interval_notifier_insert(a, 4 * PAGE_SIZE, mirror.clone())?;
//! let mut pfns = [HmmPfn::default(); 4];
//! let mut range = HmmRange {
//!     notifier: &notifier,
//!     notifier_seq: notifier.read_begin(),
//!     start: a,
//!     end: a + 4 * PAGE_SIZE,
//!     hmm_pfns: &mut pfns,
//!     default_flags: HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE,
//!     pfn_flags_mask: HmmPfnFlags::empty(),
//!     dev_private_owner: None,
//! };
//! fault_and_commit(&mm, &mut range, HMM_RANGE_DEFAULT_TIMEOUT, &mirror.0, |table, range| {
//!     for (i, w) in range.hmm_pfns.iter().enumerate() {
//!         assert!(w.is_valid() && w.is_writable());
//!         table.insert((range.start + i as u64 * PAGE_SIZE).as_u64(), w.frame_nr());
//!     }
//! })?;
//! assert_eq!(mirror.0.lock().len(), 4);
//! assert_eq!(mm.stats().faults.anon_write, 4); // faulted in through the CPU fault path
//! mm.munmap(a, PAGE_SIZE)?; // an UNMAP invalidation: the device entry goes
//! assert_eq!(mirror.0.lock().len(), 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::{Duration, Instant};

use crate::sync::Mutex;
use bitflags::bitflags;
use thiserror::Error;

mod walk;

use crate::addr::{VaRange, VirtAddr};
use crate::migrate::MigratePfn;
use crate::mm::{Mm, MmapReadGuard};
use crate::notifier::{IntervalSub, Owner, ReadSeq};
use crate::phys::{FrameRef, PhysMem};
use crate::stats::RangeWalker;

pub(crate) use walk::{run as run_walk, Walk};

/// The conventional bound of the `Busy` retry loop (`HMM_RANGE_DEFAULT_TIMEOUT`, 1000 ms).
pub const HMM_RANGE_DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// First bit of the mapping-order field of an [`HmmPfn`] (`HMM_PFN_ORDER_SHIFT`): two
/// below the kernel's 53, as the migrate-on-fault series moves it to make room for
/// `HMM_PFN_MIGRATE` and `HMM_PFN_COMPOUND`.
pub const HMM_PFN_ORDER_SHIFT: u32 = 51;
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
        /// Output of a migrating walk: the page is collected for migration (locked,
        /// unmapped behind a migration entry); with `VALID` the frame is the source,
        /// without it the entry is a hole or the zero page (the destination is
        /// zero-filled). Not a mapping the device may use.
        #[doc(alias = "HMM_PFN_MIGRATE")]
        const MIGRATE = 1 << 57;
        /// Request: prepare the page for migration in the same walk (after faulting it
        /// if it must be); see [`hmm_range_fault_migrate`](crate::migrate::hmm_range_fault_migrate).
        #[doc(alias = "HMM_PFN_REQ_MIGRATE")]
        const REQ_MIGRATE = Self::MIGRATE.bits();
        /// Output of a migrating walk, with `MIGRATE`: the word is the head of a PMD-sized
        /// unit collected whole (`SELECT_COMPOUND`); the next 511 words are 0
        /// (`MIGRATE_PFN_COMPOUND` once converted).
        #[doc(alias = "HMM_PFN_COMPOUND")]
        const COMPOUND = 1 << 56;
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

    /// Whether `MIGRATE` is set: the page is collected by a migrating walk.
    pub fn is_migrating(self) -> bool {
        self.flags().contains(HmmPfnFlags::MIGRATE)
    }

    /// Whether `ERROR` is set.
    pub fn is_error(self) -> bool {
        self.flags().contains(HmmPfnFlags::ERROR)
    }

    /// The order of the CPU mapping the page belongs to: 0 for a PTE, 9 for a PMD leaf
    /// (THP, 2 MiB hugetlb, device THP), 18 for a PUD leaf (1 GiB hugetlb)
    /// (`hmm_pfn_to_map_order`). Every page of one large mapping
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

    /// The word a migrating walk reports for collected `src` word (the inverse of
    /// [`MigratePfn::from_hmm`]): `MIGRATE` (and `COMPOUND` for the head of a unit), plus
    /// `VALID`, the frame and `WRITE` when it has a source page; 0 for a word that is not
    /// migrating.
    pub(crate) fn from_migrate(src: MigratePfn) -> HmmPfn {
        use crate::migrate::MigratePfnFlags as M;
        if !src.is_migrating() {
            return HmmPfn::default();
        }
        let mut flags = HmmPfnFlags::MIGRATE;
        if src.flags().contains(M::COMPOUND) {
            flags |= HmmPfnFlags::COMPOUND;
        }
        if !src.is_valid() {
            return HmmPfn(flags.bits());
        }
        flags |= HmmPfnFlags::VALID;
        if src.flags().contains(M::WRITE) {
            flags |= HmmPfnFlags::WRITE;
        }
        HmmPfn(src.frame_nr() | flags.bits())
    }

    /// This word with the sticky in/out bits of `input`.
    fn with_inout(self, input: HmmPfn) -> HmmPfn {
        HmmPfn(self.0 | (input.flags() & INOUT).bits())
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
    /// A migrating walk's range is not inside one VMA (`-ERANGE`).
    #[error("a migrating walk must stay inside one VMA: {addr} is not in it")]
    Range {
        /// The first page outside the VMA of the range's start.
        addr: VirtAddr,
    },
    /// Bad arguments: unaligned or empty range, a PFN array of the wrong length, a
    /// notifier of another address space, `REQ_MIGRATE` on a plain walk, or a migrating
    /// walk over a VMA that cannot migrate (hugetlb, `VM_MIXEDMAP`) (`-EINVAL`).
    #[error("invalid hmm_range: {what}")]
    Inval {
        /// What was wrong.
        what: &'static str,
    },
    /// The process has a fatal signal pending
    /// ([`hmm_range_fault_unlocked_timeout`] only) (`-EINTR`).
    #[error("interrupted: the process has a fatal signal pending")]
    Interrupted,
}

/// Fills `range.hmm_pfns` for `[range.start, range.end)` of the address space the mmap
/// lock `mmap` belongs to, faulting pages as requested (`hmm_range_fault`). See the
/// [module documentation](self) for the protocol, the errors and what the output means.
/// Requests of `REQ_MIGRATE` are refused (`Inval`): a migrating walk hands back locked
/// pages and is [`hmm_range_fault_migrate`](crate::migrate::hmm_range_fault_migrate).
pub fn hmm_range_fault(mmap: &MmapReadGuard<'_>, range: &mut HmmRange<'_>) -> Result<(), HmmError> {
    check(mmap, range)?;
    if (range.default_flags | range.pfn_flags_mask).contains(HmmPfnFlags::REQ_MIGRATE) {
        return Err(HmmError::Inval {
            what: "REQ_MIGRATE needs hmm_range_fault_migrate",
        });
    }
    let mut w = Walk::of_range(range, None);
    walk::run(mmap, &mut w, RangeWalker::Hmm)
}

/// `hmm_range_fault_unlocked_timeout` (Linux 2026, mm-stable): [`hmm_range_fault`] for a
/// caller that does not hold the mmap lock, as drivers now call it. The function takes
/// the lock itself (killable), starts each pass from a fresh `range.notifier_seq`
/// (`read_begin`), and retries `Busy` passes until `timeout` has passed since the call
/// (`Duration::ZERO`: retry forever); it returns with the lock dropped. The caller then
/// checks `read_retry(range.notifier_seq)` under its driver lock before it uses the result,
/// as with [`hmm_range_fault`], and calls again if it collided.
///
/// Errors: `Interrupted` (`-EINTR`) when the process has a fatal signal pending
/// ([`Mm::kill`]), checked before each pass; `Busy` when the timeout ran out; the errors
/// of [`hmm_range_fault`] otherwise.
///
/// A fault that must sleep outside the mmap lock (a userfaultfd handler supplies the
/// page) drops it; the function waits, takes the lock again and starts a new pass with a
/// fresh sequence, and the retry budget starts again, since the handler made progress
/// (v8 of the series). The locked [`hmm_range_fault`] cannot drop the lock: there the
/// same fault fails with `Fault` (`-EFAULT`).
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use hmm::addr::PAGE_SIZE;
/// use hmm::mm::{MapFlags, Mm, Prot};
/// use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange};
/// use hmm::phys::{PhysConfig, PhysMem};
/// use hmm::range_fault::{hmm_range_fault_unlocked_timeout, HmmError, HmmPfn, HmmPfnFlags, HmmRange};
///
/// struct Seq;
/// impl IntervalNotifierOps for Seq {
///     fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
///         sub.set_seq(seq);
///         true
///     }
/// }
/// let mm = Mm::new(PhysMem::new(PhysConfig::with_size(16 << 20))?);
/// let a = mm.mmap(None, 4 * PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
/// let n = mm.interval_notifier_insert(a, 4 * PAGE_SIZE, Arc::new(Seq))?;
/// let mut pfns = [HmmPfn::default(); 4];
/// let mut range = HmmRange {
///     notifier: &n,
///     notifier_seq: n.read_begin(),
///     start: a,
///     end: a + 4 * PAGE_SIZE,
///     hmm_pfns: &mut pfns,
///     default_flags: HmmPfnFlags::REQ_FAULT,
///     pfn_flags_mask: HmmPfnFlags::empty(),
///     dev_private_owner: None,
/// };
/// hmm_range_fault_unlocked_timeout(&mm, &mut range, Duration::ZERO)?; // no lock held
/// assert!(range.hmm_pfns.iter().all(|w| w.is_valid()));
/// assert!(!n.read_retry(range.notifier_seq)); // what a driver checks under its lock
/// mm.kill();
/// assert_eq!(hmm_range_fault_unlocked_timeout(&mm, &mut range, Duration::ZERO), Err(HmmError::Interrupted));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[doc(alias = "hmm_range_fault_unlocked")]
pub fn hmm_range_fault_unlocked_timeout(
    mm: &Mm,
    range: &mut HmmRange<'_>,
    timeout: Duration,
) -> Result<(), HmmError> {
    // A timeout too long to represent never expires, as 0 does.
    let budget = || {
        (!timeout.is_zero())
            .then(|| Instant::now().checked_add(timeout))
            .flatten()
    };
    let mut deadline = budget();
    loop {
        if mm.fatal_signal_pending() {
            return Err(HmmError::Interrupted);
        }
        range.notifier_seq = range.notifier.read_begin();
        let (result, dropped) = {
            let mmap = mm.mmap_read();
            check(&mmap, range)?;
            if (range.default_flags | range.pfn_flags_mask).contains(HmmPfnFlags::REQ_MIGRATE) {
                return Err(HmmError::Inval {
                    what: "REQ_MIGRATE needs hmm_range_fault_migrate",
                });
            }
            let mut w = Walk::of_range(range, None);
            w.allow_retry = true;
            let result = walk::run(&mmap, &mut w, RangeWalker::Hmm);
            (result, w.dropped.take())
        };
        if let Some(wait) = dropped {
            wait.wait(mm);
            deadline = budget();
            continue;
        }
        match result {
            Err(HmmError::Busy) if deadline.map_or(true, |d| Instant::now() < d) => continue,
            other => return other,
        }
    }
}

/// The argument checks every walk of a range makes (`-EINVAL`).
pub(crate) fn check(mmap: &MmapReadGuard<'_>, range: &HmmRange<'_>) -> Result<VaRange, HmmError> {
    if range.notifier.mm() != mmap.mm().id() {
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
    Ok(span)
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
    // A timeout too long to represent never expires.
    let deadline = Instant::now().checked_add(timeout);
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
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
