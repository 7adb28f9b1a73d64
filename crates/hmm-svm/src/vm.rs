//! A GPU VM: one process's address space as one GPU sees it (`drm_gpusvm`, UVM's
//! `va_space`), and the GPU's loads and stores through it.
//!
//! # State and locking
//!
//! [`VmShared::state`] is drm_gpusvm's *notifier lock*, an rw-lock over the GPU page table
//! and the range tree:
//!
//! * a GPU access holds it for reading while it looks up its pages and moves their bytes,
//!   so a page it reaches cannot be freed under it;
//! * the interval notifiers take it for writing before any CPU entry in their window
//!   changes, and zap the GPU entries of the range (except for this device's own MIGRATE
//!   events, whose pages the migrating path zaps itself, page by page);
//! * the fault path takes it for writing to insert ranges and, after `read_retry`, to
//!   commit GPU entries.
//!
//! It is never held across a call into `hmm` that can fault or invalidate: lock order is
//! mmap lock → (notifier) → notifier lock, as for dmirror's mirror lock.
//!
//! # Accesses
//!
//! [`GpuVm::try_read`] / [`GpuVm::try_write`] are what a GPU thread does: an access whose
//! pages are all mapped (with write permission for a store) completes, local memory or
//! remote over the link; the first page that is not raises a [`GpuFault`] into the fault
//! buffer and the access stalls (the caller retries after the replay). [`GpuVm::read`] and
//! [`GpuVm::write`] are the blocking form: raise, service the buffer on the calling thread
//! (a simulated GPU must not sleep and wake per page), replay.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use hmm::addr::{VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT};
use hmm::mm::Mm;
use hmm::notifier::{IntervalNotifier, Owner};
use hmm::sync::{Mutex, RwLock};

use crate::clock::Clock;
use crate::device::GpuDevice;
use crate::error::SvmError;
use crate::fault::{Access, FaultBuffer, GpuFault};
use crate::gpt::{GpuPageTable, GpuPte, Location};
use crate::peer::PeerPolicy;
use crate::policy::prefetch::PrefetchPolicy;
use crate::policy::thrashing::{PageHistory, ThrashHint, ThrashingDetector};
use crate::policy::{Advice, MigrationPolicy, VmPolicies};
use crate::range::SvmRange;
use crate::stats::{add, Counters, SvmStats};

/// Replays a blocking access waits through before it gives up with `Busy`.
const MAX_REPLAYS: u32 = 1000;

/// What the notifiers, the fault path and the device's CPU-fault handler share.
pub(crate) struct VmShared {
    pub(crate) owner: Owner,
    pub(crate) state: RwLock<VmState>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) thrashing: Option<ThrashingDetector>,
    /// Thrashing histories by virtual page number (a leaf lock: nothing is taken under it).
    pub(crate) history: Mutex<Histories>,
    /// Serialises fault servicing, prefetch and garbage collection of this VM (Xe's
    /// `vm->lock`): range lookup, migration and bind of one fault never interleave with
    /// another's on the same VM; taking a device offline takes it to wait for them.
    pub(crate) service_lock: Mutex<()>,
}

/// Histories kept before old ones are first pruned.
const HISTORY_PRUNE_AT: usize = 1 << 16;

/// The thrashing detector's per-page histories, pruned of old ones when they grow past
/// `prune_at`; the mark then moves to twice what is left, so that a working set of recent
/// pages larger than the first mark is not scanned again at every migration (which made
/// a run of 262144 recent pages quadratic).
pub(crate) struct Histories {
    pages: HashMap<u64, PageHistory>,
    prune_at: usize,
}

impl Default for Histories {
    fn default() -> Self {
        Histories {
            pages: HashMap::new(),
            prune_at: HISTORY_PRUNE_AT,
        }
    }
}

impl VmShared {
    /// Records a migration (either way) of each page in `vpns` with the thrashing detector.
    pub(crate) fn migrated(&self, vpns: impl Iterator<Item = u64>) {
        let Some(d) = &self.thrashing else { return };
        let now = self.clock.now_ns();
        let mut h = self.history.lock();
        for vpn in vpns {
            let e = d.on_migration(h.pages.entry(vpn).or_default(), now);
            if e.detected {
                add(&self.counters.thrash_detections, 1);
                match e.hint {
                    ThrashHint::Pin { .. } => add(&self.counters.thrash_pins, 1),
                    ThrashHint::Throttle { .. } => add(&self.counters.thrash_throttles, 1),
                    ThrashHint::None => {}
                }
            }
        }
        if h.pages.len() > h.prune_at {
            let epoch = d.config.lapse_ns.saturating_mul(d.config.epoch_lapses);
            h.pages
                .retain(|_, p| now.saturating_sub(p.last_event) <= epoch || p.pinned_until > now);
            h.prune_at = HISTORY_PRUNE_AT.max(2 * h.pages.len());
        }
    }

    /// Forgets everything the GPU maps through this VM (its device went away): every GPU
    /// entry zapped, every range dropped. Called with the service lock held.
    pub(crate) fn forget_all(&self) {
        let mut st = self.state.write();
        let zapped = st.gpt.unmap(0, hmm::addr::USER_VA_END >> PAGE_SHIFT);
        st.ranges.clear();
        st.gc.clear();
        st.fatal.clear();
        add(&self.counters.pages_invalidated, zapped);
    }

    /// The pages of `vpns` the detector says to leave where they are now.
    pub(crate) fn held(&self, vpns: impl Iterator<Item = u64>) -> Vec<u64> {
        let Some(d) = &self.thrashing else {
            return Vec::new();
        };
        let now = self.clock.now_ns();
        let h = self.history.lock();
        vpns.filter(|v| {
            h.pages
                .get(v)
                .is_some_and(|p| d.hint(p, now) != ThrashHint::None)
        })
        .collect()
    }
}

/// Under the notifier lock.
#[derive(Default)]
pub(crate) struct VmState {
    pub(crate) gpt: GpuPageTable,
    /// SVM ranges by first virtual page number.
    pub(crate) ranges: BTreeMap<u64, SvmRange>,
    /// Ranges an UNMAP reached, for the garbage collector (first page numbers).
    pub(crate) gc: Vec<u64>,
    /// Pages whose last fault was fatal, and why: the next access to one fails once.
    pub(crate) fatal: HashMap<u64, &'static str>,
    /// Advice by range, the latest last.
    pub(crate) advice: Vec<(VaRange, Advice)>,
}

impl VmState {
    /// The latest advice that covers any of `range`.
    pub(crate) fn advice_for(&self, range: &VaRange) -> Option<Advice> {
        self.advice
            .iter()
            .rev()
            .find(|(r, _)| r.overlaps(range))
            .map(|&(_, a)| a)
    }
}

/// One process's address space on one GPU.
pub struct GpuVm {
    pub(crate) id: u64,
    pub(crate) device: Arc<GpuDevice>,
    pub(crate) mm: Weak<Mm>,
    pub(crate) shared: Arc<VmShared>,
    /// The interval notifiers, one per window of `notifier_bytes`, by window index.
    pub(crate) windows: Mutex<BTreeMap<u64, Arc<IntervalNotifier>>>,
    pub(crate) buffer: FaultBuffer,
    pub(crate) migration: Box<dyn MigrationPolicy>,
    pub(crate) prefetch: Box<dyn PrefetchPolicy>,
    pub(crate) counter_threshold: Option<u32>,
    pub(crate) peer: PeerPolicy,
    /// Blocks whose access counter fired, waiting for service (UVM's notification buffer).
    pub(crate) notifications: Mutex<Vec<u64>>,
    pub(crate) notified: AtomicBool,
}

/// What one GPU access did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It completed: this many of its pages were in device memory, this many remote,
    /// this many in a peer's memory.
    Done {
        /// Pages in the GPU's memory.
        local: u32,
        /// Pages in system memory, over the link.
        remote: u32,
        /// Pages in a peer's memory, over the peer link.
        peer: u32,
    },
    /// A page was not mapped (or not writable for a store): this fault was raised and the
    /// access stalls until the replay.
    Faulted(GpuFault),
}

impl Outcome {
    /// The fault, if it faulted.
    pub fn fault(self) -> Option<GpuFault> {
        match self {
            Outcome::Faulted(f) => Some(f),
            Outcome::Done { .. } => None,
        }
    }
}

/// Which way an access moves bytes.
enum Op<'b> {
    Read(&'b mut [u8]),
    Write(&'b [u8]),
}

impl Op<'_> {
    fn len(&self) -> usize {
        match self {
            Op::Read(b) => b.len(),
            Op::Write(b) => b.len(),
        }
    }

    fn access(&self) -> Access {
        match self {
            Op::Read(_) => Access::Read,
            Op::Write(_) => Access::Write,
        }
    }
}

impl GpuVm {
    /// Binds `mm` to `device` with the default policies ([`VmPolicies::default`]: migrate
    /// on first touch, the whole range, UVM's thrashing detector and access counters on
    /// the wall clock). The VM holds the address space weakly, as a driver holds no
    /// `mm_users`.
    pub fn new(device: &Arc<GpuDevice>, mm: &Arc<Mm>) -> Arc<GpuVm> {
        GpuVm::with_policies(device, mm, VmPolicies::default())
    }

    /// [`new`](Self::new) with other policies.
    pub fn with_policies(
        device: &Arc<GpuDevice>,
        mm: &Arc<Mm>,
        policies: VmPolicies,
    ) -> Arc<GpuVm> {
        let VmPolicies {
            migration,
            prefetch,
            thrashing,
            access_counter_threshold,
            clock,
            peer,
        } = policies;
        let shared = Arc::new(VmShared {
            owner: device.owner(),
            state: RwLock::new(VmState::default()),
            counters: Arc::clone(device.counters()),
            clock,
            thrashing,
            history: Mutex::new(Histories::default()),
            service_lock: Mutex::new(()),
        });
        let id = device.register_vm(mm.id(), Arc::downgrade(&shared));
        Arc::new(GpuVm {
            id,
            device: Arc::clone(device),
            mm: Arc::downgrade(mm),
            shared,
            windows: Mutex::new(BTreeMap::new()),
            buffer: FaultBuffer::new(device.config().fault_buffer_entries),
            migration,
            prefetch,
            counter_threshold: access_counter_threshold.filter(|&t| t > 0),
            peer,
            notifications: Mutex::new(Vec::new()),
            notified: AtomicBool::new(false),
        })
    }

    /// Gives `advice` on `[addr, addr + len)` (`cudaMemAdvise`); later advice wins where
    /// ranges overlap. It is read when a range faults or its counter fires.
    ///
    /// Errors: `Inval` for an unaligned address, zero length or a range past the address
    /// space.
    pub fn advise(&self, addr: VirtAddr, len: u64, advice: Advice) -> Result<(), SvmError> {
        let range = user_range(addr, len)?;
        let mut st = self.shared.state.write();
        // Advice that the new one covers entirely can never be read again.
        st.advice.retain(|(r, _)| !range.contains_range(r));
        st.advice.push((range, advice));
        Ok(())
    }

    /// The GPU.
    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.device
    }

    /// The fault buffer.
    pub fn fault_buffer(&self) -> &FaultBuffer {
        &self.buffer
    }

    /// The GPU's counters (shared by every VM of the device).
    pub fn stats(&self) -> SvmStats {
        self.device.stats()
    }

    /// The GPU entry for the page at `addr`.
    pub fn lookup(&self, addr: VirtAddr) -> Option<GpuPte> {
        self.shared
            .state
            .read()
            .gpt
            .lookup(addr.as_u64() >> PAGE_SHIFT)
    }

    /// GPU pages mapped.
    pub fn mapped_pages(&self) -> u64 {
        self.shared.state.read().gpt.mapped()
    }

    /// SVM ranges alive.
    pub fn nr_ranges(&self) -> usize {
        self.shared.state.read().ranges.len()
    }

    /// Whether access-counter notifications wait for
    /// [`service_access_counters`](Self::service_access_counters) (one atomic load).
    pub fn has_notifications(&self) -> bool {
        self.notified.load(Ordering::Relaxed)
    }

    /// A GPU load of `buf.len()` bytes at `addr`: `Ok(None)` when it completed, or the
    /// fault it raised (pushed into the fault buffer, or dropped on overflow) when a page
    /// was not mapped. Errors: `Inval` for a range past the address space, `Fatal` when
    /// the last fault on the page was cancelled.
    pub fn try_read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<Option<GpuFault>, SvmError> {
        self.try_op(addr, &mut Op::Read(buf), &mut 0)
            .map(Outcome::fault)
    }

    /// A GPU store of `data` at `addr`; see [`try_read`](Self::try_read). A store needs a
    /// writable entry: a read-only one raises a write fault.
    pub fn try_write(&self, addr: VirtAddr, data: &[u8]) -> Result<Option<GpuFault>, SvmError> {
        self.try_op(addr, &mut Op::Write(data), &mut 0)
            .map(Outcome::fault)
    }

    /// [`try_read`](Self::try_read) (or, with `write`, [`try_write`](Self::try_write) of
    /// `buf`), saying how many of the pages it touched were local and how many remote: what
    /// a workload engine charges an access for.
    pub fn try_access(
        &self,
        addr: VirtAddr,
        write: bool,
        buf: &mut [u8],
    ) -> Result<Outcome, SvmError> {
        if write {
            self.try_op(addr, &mut Op::Write(buf), &mut 0)
        } else {
            self.try_op(addr, &mut Op::Read(buf), &mut 0)
        }
    }

    /// A GPU load that faults, services the fault buffer on the calling thread and replays
    /// until it completes. A long access is many GPU accesses, one per page: a replay
    /// resumes at the page that faulted, so pages moved out again meanwhile (device
    /// memory smaller than the access) do not make it start over. Errors: those of
    /// [`try_read`](Self::try_read) and [`service_faults`](Self::service_faults), and
    /// `Busy` when one page kept faulting.
    pub fn read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), SvmError> {
        self.blocking(addr, &mut Op::Read(buf))
    }

    /// A GPU store; see [`read`](Self::read).
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), SvmError> {
        self.blocking(addr, &mut Op::Write(data))
    }

    fn blocking(&self, addr: VirtAddr, op: &mut Op<'_>) -> Result<(), SvmError> {
        let mut done = 0;
        let mut replays = 0;
        loop {
            let before = done;
            match self.try_op(addr, op, &mut done)?.fault() {
                None => {
                    if self.notified.load(Ordering::Relaxed) {
                        self.service_access_counters()?;
                    }
                    return Ok(());
                }
                Some(fault) => {
                    // The budget is per page: progress resets it.
                    replays = if done > before { 1 } else { replays + 1 };
                    if replays > MAX_REPLAYS {
                        return Err(SvmError::Busy { addr: fault.addr });
                    }
                    self.service_faults()?;
                }
            }
        }
    }

    /// The access from byte `*done` on; `*done` advances past every page it completes.
    fn try_op(
        &self,
        addr: VirtAddr,
        op: &mut Op<'_>,
        done: &mut usize,
    ) -> Result<Outcome, SvmError> {
        let len = op.len() as u64;
        let end = addr
            .checked_add(len)
            .filter(|e| e.as_u64() <= hmm::addr::USER_VA_END)
            .ok_or(SvmError::Inval {
                what: "access past the address space",
            })?;
        if !self.device.is_online() {
            return Err(SvmError::Offline);
        }
        let access = op.access();
        let phys = self.device.phys();
        let c = &self.shared.counters;
        let mut at = addr.checked_add(*done as u64).expect("inside the access");
        // The notifier lock is held for one 2 MiB block at a time, so a long access never
        // holds off an invalidation for long.
        let mut st = self.shared.state.read();
        let mut block = at.as_u64() >> PMD_SHIFT;
        let (mut local, mut remote, mut peer) = (0, 0, 0);
        while at < end {
            if at.as_u64() >> PMD_SHIFT != block {
                drop(st);
                st = self.shared.state.read();
                block = at.as_u64() >> PMD_SHIFT;
            }
            let vpn = at.as_u64() >> PAGE_SHIFT;
            let off = (at.as_u64() & (PAGE_SIZE - 1)) as usize;
            let n = (PAGE_SIZE as usize - off).min((end.as_u64() - at.as_u64()) as usize);
            let pte = st
                .gpt
                .lookup(vpn)
                .filter(|p| access == Access::Read || p.writable);
            let Some(pte) = pte else {
                drop(st);
                if let Some(why) = self.shared.state.write().fatal.remove(&vpn) {
                    return Err(SvmError::Fatal { addr: at, why });
                }
                let fault = GpuFault { addr: at, access };
                self.raise(fault);
                return Ok(Outcome::Faulted(fault));
            };
            let frame = phys.frame_nr(pte.frame_nr);
            let bytes = *done..*done + n;
            match op {
                Op::Read(buf) => frame.read(off, &mut buf[bytes]),
                Op::Write(data) => {
                    frame.write(off, &data[bytes]);
                    frame.mark_dirty();
                }
            }
            match pte.location {
                Location::Vram => {
                    local += 1;
                    add(&c.local_accesses, 1);
                }
                Location::Peer => {
                    peer += 1;
                    add(&c.peer_accesses, 1);
                }
                Location::System => {
                    remote += 1;
                    add(&c.remote_accesses, 1);
                    if self
                        .counter_threshold
                        .is_some_and(|t| st.gpt.count_remote(vpn) == t)
                    {
                        self.notifications
                            .lock()
                            .push(vpn >> (PMD_SHIFT - PAGE_SHIFT));
                        self.notified.store(true, Ordering::Relaxed);
                        add(&c.access_counter_notifications, 1);
                    }
                }
            }
            at = at.checked_add(n as u64).expect("inside the access");
            *done += n;
        }
        Ok(Outcome::Done {
            local,
            remote,
            peer,
        })
    }

    /// The GPU writes `fault` into the fault buffer (or drops it when full).
    fn raise(&self, fault: GpuFault) {
        let c = &self.shared.counters;
        add(&c.gpu_faults, 1);
        if self.buffer.push(fault).is_err() {
            add(&c.buffer_overflows, 1);
        }
    }

    /// The address space, if the process is still alive.
    pub(crate) fn mm(&self) -> Result<Arc<Mm>, SvmError> {
        self.mm.upgrade().ok_or(SvmError::Exited)
    }
}

impl Drop for GpuVm {
    fn drop(&mut self) {
        self.device.unregister_vm(self.id);
    }
}

impl std::fmt::Debug for GpuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVm")
            .field("id", &self.id)
            .field("mapped_pages", &self.mapped_pages())
            .field("ranges", &self.nr_ranges())
            .finish_non_exhaustive()
    }
}

/// `[addr, addr + len)` checked: page aligned, not empty, inside the address space.
pub(crate) fn user_range(addr: VirtAddr, len: u64) -> Result<VaRange, SvmError> {
    VaRange::from_len(addr, len)
        .ok()
        .filter(|r| r.end().as_u64() <= hmm::addr::USER_VA_END)
        .ok_or(SvmError::Inval {
            what: "unaligned, empty or past the address space",
        })
}
