//! Address spaces: [`Mm`] with its VMAs, page table, mmap lock, notifiers and counters; the
//! operations on it (one per file: `mmap`, `munmap`, `mprotect`, `madvise`); the CPU fault
//! path (`fault`) and CPU loads and stores (`access`).
//!
//! # Locking
//!
//! Lock order (the kernel's): **mmap lock → shmem object lock → folio lock → page-table
//! lock (PMD lock → PTE lock)**. Notifier callbacks run with the mmap lock held and no
//! page-table lock held; they may take a driver's mirror lock, so a driver never holds its
//! mirror lock while calling into this module.
//!
//! * The mmap lock ([`Mm::mmap_read`]) is a real reader-writer lock around the VMAs and the
//!   page table. `mmap`, `munmap` and `mprotect` take it for writing; faults, CPU accesses
//!   and `madvise(DONTNEED)` for reading, so they run concurrently and serialise on
//!   page-table locks.
//! * A CPU access copies bytes while holding the page-table lock of the entry it
//!   translated. Every path that removes or restricts an entry takes that lock and flushes
//!   before it frees the frame (`mm::tlb`, the kernel's `mmu_gather`), so an access never touches a frame after its
//!   mapping is gone: the lock plays the part of the TLB shootdown's IPI.
//!
//! # Reference counting of mapped frames
//!
//! Every present entry mapping a frame (other than the zero pages) holds one reference and
//! one map count on it. A shared object holds one more reference on each of its pages.
//! [`Mm::audit`] checks all of it.

mod access;
mod audit;
mod device;
mod driver;
mod error;
mod fault;
mod file;
mod fork;
mod gup;
mod hugetlb;
mod khugepaged;
mod madvise;
mod mmap;
mod mprotect;
mod mremap;
mod mthp;
mod munmap;
mod pagemap;
mod rmap;
mod shmem;
mod thp;
pub(crate) mod tlb;
pub mod userfaultfd;
mod vma;
mod vmscan;
mod zap;

use std::sync::{Arc, Weak};

use crate::sync::{RwLock, RwLockReadGuard};

pub use access::Scalar;
pub use audit::{AuditError, AuditReport};
pub use device::DeviceFault;
pub use driver::{VmFault, VmOps};
pub use error::{FaultError, MmError, SegvCause};
pub use fault::FaultFlags;
pub(crate) use fault::{handle_mm_fault_retry, wait_on_migration, Faulted};
pub use file::MemFile;
pub use gup::{GupFlags, UserPages};
pub use khugepaged::{KhugepagedLimits, KhugepagedStats};
pub use madvise::Advice;
pub use mmap::MapFlags;
pub use mremap::MremapFlags;
pub use mthp::{MthpMode, MTHP_MAX_ORDER, MTHP_MIN_ORDER};
pub use pagemap::{PagemapEntry, SwapKind};
pub(crate) use rmap::rmap_walk;
pub use rmap::{device_folio_mappings, folio_mappings, RmapEntry};
pub use thp::ThpMode;
pub(crate) use thp::{split_folio, split_frozen_folio, split_pmd};
pub use vma::{Vma, VmaKind};
pub use vmscan::{reclaim, Kswapd, ReclaimStats};

pub use crate::prot::{Prot, VmFlags};

use crate::addr::{VirtAddr, PAGE_SIZE};
use crate::notifier::{
    IntervalNotifier, IntervalNotifierOps, MmId, MmNotifiers, MmuNotifier, MmuNotifierHandle,
    NotifierError,
};
use crate::pgtable::PageTable;
use crate::phys::{Frame, Freed, PhysMem};
use crate::stats::{MmCounters, MmStats};
use rmap::AnonVma;
use vma::VmaTree;

/// The lowest address a mapping may use (`vm.mmap_min_addr`).
#[doc(alias = "mmap_min_addr")]
pub const MMAP_MIN_ADDR: u64 = 0x10000;
/// Where top-down address selection starts (`mm->mmap_base`).
#[doc(alias = "mmap_base")]
pub const MMAP_BASE: u64 = 0x7f00_0000_0000;

/// What the mmap lock protects.
pub(crate) struct MmState {
    pub(crate) vmas: VmaTree,
    pub(crate) pt: PageTable,
}

/// An address space (`struct mm_struct`).
pub struct Mm {
    id: MmId,
    /// This address space, weakly (what reverse maps hold).
    this: Weak<Mm>,
    /// What the anonymous folios it faults in belong to (chained to its ancestors').
    anon_vma: Arc<AnonVma>,
    phys: Arc<PhysMem>,
    lock: RwLock<MmState>,
    notifiers: Arc<MmNotifiers>,
    counters: MmCounters,
    thp: thp::ThpSetting,
    mthp: mthp::MthpSettings,
    /// THPs partly unmapped, to split (`deferred_split_queue`); each holds a reference.
    deferred_split: crate::sync::Mutex<Vec<crate::addr::Pfn>>,
    /// A fatal signal was sent to the process (`fatal_signal_pending` of its tasks).
    killed: std::sync::atomic::AtomicBool,
    /// The userfaultfds opened on it, whose sleepers a fatal signal wakes.
    uffds: crate::sync::Mutex<Vec<Weak<userfaultfd::UffdCtx>>>,
}

/// The mmap lock held for reading; VMAs and page table can be read through it.
///
/// Either this guard took the lock ([`Mm::mmap_read`]), or it stands for a lock a caller
/// up the stack holds: the fault path hands such a guard to a driver's `migrate_to_ram`
/// ([`DeviceFault::mmap`]), which runs with the faulting access's lock held, as in the
/// kernel.
pub struct MmapReadGuard<'a> {
    mm: &'a Mm,
    state: StateRef<'a>,
}

/// The state under the mmap lock, owned by a guard or borrowed from a holder's guard.
enum StateRef<'a> {
    Locked(RwLockReadGuard<'a, MmState>),
    Held(&'a MmState),
}

impl std::ops::Deref for StateRef<'_> {
    type Target = MmState;

    fn deref(&self) -> &MmState {
        match self {
            StateRef::Locked(g) => g,
            StateRef::Held(s) => s,
        }
    }
}

impl<'a> MmapReadGuard<'a> {
    /// The VMA containing `addr` (`vma_lookup`).
    pub fn vma_lookup(&self, addr: VirtAddr) -> Option<&Vma> {
        self.state.vmas.find(addr)
    }

    /// The address space.
    pub fn mm(&self) -> &Mm {
        self.mm
    }

    /// The page table (walk it with [`PageTable::cursor`]).
    pub fn page_table(&self) -> &PageTable {
        &self.state.pt
    }

    /// Resolves a fault at `addr` (`handle_mm_fault`): afterwards the entry satisfies the
    /// access, or a concurrent change won and the caller retries.
    ///
    /// The caller holds the lock across the fault, so the fault may not drop it:
    /// `ALLOW_RETRY` is ignored, and a fault a userfaultfd handler would resolve fails
    /// with `Bus`, as in the kernel. [`Mm::fixup_user_fault`] takes the lock itself and
    /// waits for the handler.
    pub fn handle_mm_fault(&self, addr: VirtAddr, flags: FaultFlags) -> Result<(), FaultError> {
        fault::handle_mm_fault(self.mm, &self.state, addr, flags - FaultFlags::ALLOW_RETRY)
    }

    /// A guard standing for the lock a caller up the stack holds over `state`.
    pub(crate) fn held(mm: &'a Mm, state: &'a MmState) -> Self {
        MmapReadGuard {
            mm,
            state: StateRef::Held(state),
        }
    }

    pub(crate) fn state(&self) -> &MmState {
        &self.state
    }
}

impl std::fmt::Debug for MmapReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmapReadGuard")
            .field("mm", &self.mm.id)
            .finish()
    }
}

impl Mm {
    /// A new, empty address space on `phys`.
    pub fn new(phys: Arc<PhysMem>) -> Arc<Mm> {
        Self::new_in_family(phys, AnonVma::new(None))
    }

    /// A new, empty address space whose anonymous folios belong to `anon_vma`, a new one
    /// (chained to the parent's for a fork child).
    fn new_in_family(phys: Arc<PhysMem>, anon_vma: Arc<AnonVma>) -> Arc<Mm> {
        let id = MmId::new_unique();
        let mm = Arc::new_cyclic(|this| Mm {
            id,
            this: this.clone(),
            anon_vma,
            phys,
            lock: RwLock::new(MmState {
                vmas: VmaTree::default(),
                pt: PageTable::new(),
            }),
            notifiers: MmNotifiers::new(id),
            counters: MmCounters::default(),
            thp: thp::ThpSetting::default(),
            mthp: mthp::MthpSettings::default(),
            deferred_split: crate::sync::Mutex::new(Vec::new()),
            killed: std::sync::atomic::AtomicBool::new(false),
            uffds: crate::sync::Mutex::new(Vec::new()),
        });
        mm.anon_vma.add_to_chain(&mm.this);
        mm
    }

    /// Sends the process a fatal signal (`SIGKILL`): from now on every task of it has one
    /// pending, so the killable waits of work done on its behalf give up
    /// ([`hmm_range_fault_unlocked_timeout`](crate::range_fault::hmm_range_fault_unlocked_timeout)
    /// returns `Interrupted`). The address space itself lives until its last user drops
    /// it.
    #[doc(alias = "SIGKILL")]
    pub fn kill(&self) {
        self.killed
            .store(true, std::sync::atomic::Ordering::Release);
        // Threads asleep on a userfaultfd wake to die.
        let uffds: Vec<_> = self.uffds.lock().iter().filter_map(Weak::upgrade).collect();
        for c in uffds {
            c.wake_all();
        }
    }

    /// Resolves a fault at `addr` as a thread of the process would, taking the mmap lock
    /// itself and dropping it where the fault must wait (`fixup_user_fault` with
    /// `unlocked`): a fault a userfaultfd handler resolves is waited for, and retried.
    /// Returns whether the lock was dropped on the way.
    ///
    /// Errors: those of [`MmapReadGuard::handle_mm_fault`]; `Killed` if the process got a
    /// fatal signal while it waited.
    pub fn fixup_user_fault(&self, addr: VirtAddr, flags: FaultFlags) -> Result<bool, FaultError> {
        let mut unlocked = false;
        loop {
            let wait = {
                let guard = self.mmap_read();
                let flags = flags | FaultFlags::ALLOW_RETRY;
                match fault::handle_mm_fault_retry(self, &guard.state, addr, flags)? {
                    fault::Faulted::Done => return Ok(unlocked),
                    fault::Faulted::Retry(w) => w,
                }
            };
            unlocked = true;
            wait.wait(self);
            if self.fatal_signal_pending() {
                return Err(FaultError::Killed { addr });
            }
        }
    }

    /// Whether the process has a fatal signal pending (`fatal_signal_pending(current)` for
    /// a task of it).
    pub fn fatal_signal_pending(&self) -> bool {
        self.killed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The address space's id, as carried in notifier ranges.
    pub fn id(&self) -> MmId {
        self.id
    }

    /// The RAM it allocates from.
    pub fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }

    /// Its notifier subscriptions.
    pub fn notifiers(&self) -> &Arc<MmNotifiers> {
        &self.notifiers
    }

    /// Registers a full-mm notifier (`mmu_notifier_register`).
    #[doc(alias = "mmu_notifier_register")]
    pub fn register_notifier(
        &self,
        notifier: Arc<dyn MmuNotifier>,
    ) -> Result<MmuNotifierHandle, NotifierError> {
        self.notifiers.register(notifier)
    }

    /// Registers an interval notifier over `[start, start + len)`
    /// (`mmu_interval_notifier_insert`).
    #[doc(alias = "mmu_interval_notifier_insert")]
    pub fn interval_notifier_insert(
        &self,
        start: VirtAddr,
        len: u64,
        ops: Arc<dyn IntervalNotifierOps>,
    ) -> Result<IntervalNotifier, NotifierError> {
        self.notifiers.interval_insert(start, len, ops)
    }

    /// Takes the mmap lock for reading (`mmap_read_lock`).
    #[doc(alias = "mmap_read_lock")]
    pub fn mmap_read(&self) -> MmapReadGuard<'_> {
        MmapReadGuard {
            mm: self,
            state: StateRef::Locked(self.lock.read()),
        }
    }

    /// A snapshot of every counter.
    ///
    /// Takes the mmap lock for reading (recursively), so it may be called while holding an
    /// [`MmapReadGuard`] but not from inside a write-locked operation.
    pub fn stats(&self) -> MmStats {
        let walk = self.lock.read_recursive().pt.stats();
        self.counters.snapshot(walk, self.notifiers.stats())
    }

    /// The current VMAs.
    pub fn vmas(&self) -> Vec<Vma> {
        self.lock.read().vmas.iter().cloned().collect()
    }

    /// Makes a new anonymous folio part of this address space's reverse map at `addr` of
    /// `vma` (`folio_add_new_anon_rmap`).
    #[doc(alias = "folio_add_new_anon_rmap")]
    pub(crate) fn new_anon_rmap(
        &self,
        frame: &crate::phys::FrameRef<'_>,
        vma: &Vma,
        addr: VirtAddr,
    ) {
        vma.prepare_anon_vma();
        frame.meta().set_mapping(
            self.anon_vma.handle.id(),
            vma.pgoff_of(addr.align_down(PAGE_SIZE << frame.meta().order())),
        );
    }

    /// The live counters.
    pub(crate) fn counters(&self) -> &MmCounters {
        &self.counters
    }

    /// Drops a reference taken for the mm, counting a free.
    pub(crate) fn release_frame(&self, frame: Frame<'_>) {
        if frame.release() == Freed::Yes {
            self.counters.frames_freed(1);
        }
    }
}

impl Drop for Mm {
    /// Tears the address space down (`exit_mmap`): RELEASE to notifiers, then every
    /// mapping is zapped and every frame released.
    fn drop(&mut self) {
        crate::sync::drop_work(|| self.exit_mmap());
    }
}

impl Mm {
    fn exit_mmap(&mut self) {
        self.notifiers.release();
        let state = self.lock.get_mut();
        let vmas = state.vmas.take_all();
        let mut tlb = tlb::TlbGather::new(self);
        let state = self.lock.read();
        for v in &vmas {
            zap::zap_range(self, &state.pt, Some(v.info()), v.range(), &mut tlb);
        }
        drop(state);
        tlb.finish();
        drop(vmas);
        // Folios this exit left partly mapped elsewhere stay whole (a dying address space
        // does not split them for the others).
        for pfn in std::mem::take(self.deferred_split.get_mut()) {
            let _ = self.phys.frame(pfn).put();
        }
    }
}

impl std::fmt::Debug for Mm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mm")
            .field("id", &self.id)
            .field("vmas", &self.lock.read_recursive().vmas.iter().count())
            .finish_non_exhaustive()
    }
}

/// The range of `npages` pages from `start`: `Inval` for an unaligned start, no pages, or a
/// range beyond the address space.
fn page_range(start: VirtAddr, npages: u64) -> Result<crate::addr::VaRange, MmError> {
    if !start.is_page_aligned() || npages == 0 {
        return Err(MmError::Inval {
            what: "unaligned address or no pages",
        });
    }
    npages
        .checked_mul(PAGE_SIZE)
        .and_then(|l| crate::addr::VaRange::from_len(start, l).ok())
        .filter(|r| r.end().as_u64() <= crate::addr::USER_VA_END)
        .ok_or(MmError::Inval {
            what: "range beyond the address space",
        })
}

/// Rounds a byte length up to whole pages, or `None` on overflow.
fn page_align_len(len: u64) -> Option<u64> {
    len.checked_add(PAGE_SIZE - 1).map(|l| l & !(PAGE_SIZE - 1))
}
