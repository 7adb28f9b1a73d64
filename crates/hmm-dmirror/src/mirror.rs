//! A mirror: one open of a device by one process (`struct dmirror`), with its own device
//! page table, an interval notifier over the whole address space, and the commands.
//!
//! # Locking
//!
//! The mirror lock (the kernel's `dmirror->mutex`) guards the device page table. The
//! interval notifier's `invalidate` takes it (or, for a non-blockable range, tries it and
//! refuses) before any CPU entry in the range changes, records the sequence and erases the
//! range. Device accesses copy bytes while holding it, so a frame is never read or written
//! by the device after the CPU side let go of it. The mirror lock is never held while
//! calling into `hmm` (faults, `hmm_range_fault`, CPU copies to the user buffer), because
//! those may invalidate and the callback would wait for it: lock order is mmap lock →
//! (notifier) → mirror lock.
//!
//! The callback ignores `MIGRATE` events that carry this device's owner: the migration code
//! keeps the table consistent itself (the seed series' owner filter). Every other event
//! erases exactly `[start, end)` (the kernel also erases the page at `end`, a quirk not
//! kept).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hmm::addr::{
    Pfn, VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE, PMD_ORDER, PMD_SIZE, PUD_ORDER, USER_VA_END,
};
use hmm::exclusive::{make_device_exclusive, ExclusiveError};
use hmm::migrate::{
    hmm_range_fault_migrate, migrate_hmm_range_setup, migrate_vma_setup, MigrateVma,
    MigrateVmaFlags, Migration,
};
use hmm::mm::{MapFlags, Mm, MmError, MmapReadGuard, Prot, VmFault, VmOps};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent,
    NotifierRange, Owner,
};
use hmm::phys::{FrameFlags, PhysMem, Zone};
use hmm::prot::VmFlags;
use hmm::range_fault::{
    fault_and_commit, hmm_range_fault_unlocked_timeout, HmmPfn, HmmPfnFlags, HmmRange,
    HMM_RANGE_DEFAULT_TIMEOUT,
};
use hmm::zone_device::MemoryType;
use parking_lot::Mutex;

use crate::device::DmirrorDevice;
use crate::dpt::{DevicePageTable, DptEntry, DptTag};
use crate::migrate::{alloc_and_copy_to_device, alloc_and_copy_to_system, map_migrated};
use crate::uapi::{prot, DmirrorCmd, DmirrorError, HmmDmirrorCmd, HMM_DMIRROR_FLAG_FAIL_ALLOC};

/// Pages per `hmm_range_fault` call of the device fault and snapshot paths.
const RANGE_CHUNK: u64 = 32;

/// Pages per migration (`PTRS_PER_PTE`, as the kernel driver's loop), and the most pages
/// any command handles under one hold of the mirror lock or the mmap lock: a command over
/// a huge range lets invalidations (and `munmap`) in between pieces, so they wait
/// microseconds, not for the whole range.
const MIGRATE_CHUNK: u64 = 512;

/// One line a person can read, zeros left out (`nothing counted` when all are).
impl std::fmt::Display for MirrorStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("invalidations", self.invalidations),
            ("pages invalidated", self.pages_invalidated),
            ("own MIGRATE skipped", self.migrate_skips),
            ("device faults", self.device_faults),
            ("pages mapped", self.pages_mapped),
            ("pages accessed", self.pages_accessed),
            ("pages copied to the device", self.pages_copied_to_device),
            ("pages copied to system memory", self.pages_copied_to_system),
            ("pages zero-filled", self.pages_zero_filled),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{n} {name}"))
        .collect();
        if parts.is_empty() {
            f.write_str("nothing counted")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What a typed command ([`Dmirror::read`] and the others) reports: the outputs of the
/// ioctl form's block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Done {
    /// Pages processed (`cpages`).
    pub cpages: u64,
    /// Device faults taken (`faults`: calls of the fault routine, not pages).
    pub faults: u64,
}

/// What a mirror has done, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MirrorStats {
    /// Invalidation callbacks that cleared part of the device page table (device TLB
    /// invalidations).
    pub invalidations: u64,
    /// Device entries those callbacks erased.
    pub pages_invalidated: u64,
    /// `MIGRATE` callbacks with this device's owner, skipped without invalidating.
    pub migrate_skips: u64,
    /// Calls of the device fault routine (`dmirror_fault`).
    pub device_faults: u64,
    /// Device entries stored by faults.
    pub pages_mapped: u64,
    /// Pages the device read or wrote.
    pub pages_accessed: u64,
    /// Pages copied from system memory into device memory by migrations.
    pub pages_copied_to_device: u64,
    /// Pages copied from device memory back into system memory (commands and CPU faults).
    pub pages_copied_to_system: u64,
    /// Device pages zero-filled for holes and zero pages (nothing to copy).
    pub pages_zero_filled: u64,
}

impl MirrorStats {
    /// What happened between `earlier` and `self` (as [`MmStats::since`](hmm::stats::MmStats::since)).
    pub fn since(&self, earlier: &MirrorStats) -> MirrorStats {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        MirrorStats {
            invalidations: d(self.invalidations, earlier.invalidations),
            pages_invalidated: d(self.pages_invalidated, earlier.pages_invalidated),
            migrate_skips: d(self.migrate_skips, earlier.migrate_skips),
            device_faults: d(self.device_faults, earlier.device_faults),
            pages_mapped: d(self.pages_mapped, earlier.pages_mapped),
            pages_accessed: d(self.pages_accessed, earlier.pages_accessed),
            pages_copied_to_device: d(self.pages_copied_to_device, earlier.pages_copied_to_device),
            pages_copied_to_system: d(self.pages_copied_to_system, earlier.pages_copied_to_system),
            pages_zero_filled: d(self.pages_zero_filled, earlier.pages_zero_filled),
        }
    }
}

#[derive(Default)]
struct Counters {
    invalidations: AtomicU64,
    pages_invalidated: AtomicU64,
    migrate_skips: AtomicU64,
    device_faults: AtomicU64,
    pages_mapped: AtomicU64,
    pages_accessed: AtomicU64,
    pages_copied_to_device: AtomicU64,
    pages_copied_to_system: AtomicU64,
    pages_zero_filled: AtomicU64,
}

/// What the notifier callback, the device's fault handler and the mirror share.
pub(crate) struct Shared {
    id: u64,
    owner: Owner,
    /// The mirror lock and the table it guards.
    pub(crate) pt: Mutex<DevicePageTable>,
    counters: Counters,
    /// The test flags (`HMM_DMIRROR_FLAGS`).
    flags: AtomicU64,
    /// Whether MIGRATE events with this device's owner are skipped (the seed series'
    /// behaviour). Off, they invalidate like any other event: how drivers behaved before
    /// `pgmap_owner` reached the notifier, kept to measure the difference.
    filter_own_migrate: AtomicBool,
    /// The largest bounce buffer given back so far, reused by the next command.
    bounce_cache: Mutex<Vec<u8>>,
}

impl Shared {
    /// Consumes the one-shot `HMM_DMIRROR_FLAG_FAIL_ALLOC`: true if this allocation must
    /// fail.
    pub(crate) fn take_fail_alloc(&self) -> bool {
        self.flags
            .fetch_and(!HMM_DMIRROR_FLAG_FAIL_ALLOC, Ordering::Relaxed)
            & HMM_DMIRROR_FLAG_FAIL_ALLOC
            != 0
    }

    /// Counts pages copied by a migration.
    pub(crate) fn count_copies(&self, to_device: u64, to_system: u64) {
        let c = &self.counters;
        c.pages_copied_to_device
            .fetch_add(to_device, Ordering::Relaxed);
        c.pages_copied_to_system
            .fetch_add(to_system, Ordering::Relaxed);
    }
}

impl IntervalNotifierOps for Shared {
    fn invalidate(&self, sub: &IntervalSub, range: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        let mut pt = if range.is_blockable() {
            self.pt.lock()
        } else {
            match self.pt.try_lock() {
                Some(g) => g,
                None => return false,
            }
        };
        sub.set_seq(cur_seq);
        // The migrating driver updates its own table: its own MIGRATE events erase
        // nothing. The sequence still moves (above), so that a device fault that read the
        // page table before the migration changed it retries instead of mapping the page
        // the migration is taking away.
        if range.event == NotifierEvent::Migrate
            && range.owner == Some(self.owner)
            && self.filter_own_migrate.load(Ordering::Relaxed)
        {
            self.counters.migrate_skips.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let erased = pt.erase(
            range.start().as_u64() >> PAGE_SHIFT,
            range.end().as_u64() >> PAGE_SHIFT,
        );
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        self.counters
            .pages_invalidated
            .fetch_add(erased, Ordering::Relaxed);
        true
    }
}

/// A notifier that only records the sequence (`dmirror_mrn_ops`), for snapshots.
struct SeqOnly;

impl IntervalNotifierOps for SeqOnly {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        sub.set_seq(cur_seq);
        true
    }
}

/// One open of a device by a process.
pub struct Dmirror {
    device: Arc<DmirrorDevice>,
    mm: Weak<Mm>,
    shared: Arc<Shared>,
    notifier: IntervalNotifier,
}

/// Ids of mirrors, for the device pages that name the mirror that migrated them.
static NEXT_MIRROR_ID: AtomicU64 = AtomicU64::new(1);

impl Dmirror {
    /// Opens `device` for the process `mm` (`dmirror_fops_open`): a mirror with an empty
    /// device page table and an interval notifier over the whole address space. The
    /// mirror holds the address space weakly, as the kernel's holds no `mm_users`.
    pub fn open(device: &Arc<DmirrorDevice>, mm: &Arc<Mm>) -> Result<Arc<Dmirror>, DmirrorError> {
        let shared = Arc::new(Shared {
            id: NEXT_MIRROR_ID.fetch_add(1, Ordering::Relaxed),
            owner: device.owner(),
            pt: Mutex::new(DevicePageTable::default()),
            counters: Counters::default(),
            flags: AtomicU64::new(0),
            filter_own_migrate: AtomicBool::new(true),
            bounce_cache: Mutex::new(Vec::new()),
        });
        let ops: Arc<dyn IntervalNotifierOps> = shared.clone();
        let notifier = mm
            .interval_notifier_insert(VirtAddr::new(0), USER_VA_END, ops)
            .map_err(|_| DmirrorError::NoMem)?;
        device.register_mirror(shared.id, Arc::downgrade(&shared));
        Ok(Arc::new(Dmirror {
            device: Arc::clone(device),
            mm: Arc::downgrade(mm),
            shared,
            notifier,
        }))
    }

    /// Turns the owner filter off (`false`) or on: off, the mirror invalidates on its own
    /// MIGRATE events as drivers did before the notifier carried the migration's owner.
    /// For measuring what the filter saves; the default is on.
    pub fn set_owner_filter(&self, on: bool) {
        self.shared.filter_own_migrate.store(on, Ordering::Relaxed);
    }

    /// The device.
    pub fn device(&self) -> &Arc<DmirrorDevice> {
        &self.device
    }

    /// The mirror's counters.
    pub fn stats(&self) -> MirrorStats {
        let c = &self.shared.counters;
        MirrorStats {
            invalidations: c.invalidations.load(Ordering::Relaxed),
            pages_invalidated: c.pages_invalidated.load(Ordering::Relaxed),
            migrate_skips: c.migrate_skips.load(Ordering::Relaxed),
            device_faults: c.device_faults.load(Ordering::Relaxed),
            pages_mapped: c.pages_mapped.load(Ordering::Relaxed),
            pages_accessed: c.pages_accessed.load(Ordering::Relaxed),
            pages_copied_to_device: c.pages_copied_to_device.load(Ordering::Relaxed),
            pages_copied_to_system: c.pages_copied_to_system.load(Ordering::Relaxed),
            pages_zero_filled: c.pages_zero_filled.load(Ordering::Relaxed),
        }
    }

    /// Pages the device page table maps now.
    pub fn nr_mapped(&self) -> usize {
        self.shared.pt.lock().len()
    }

    /// The device's entry for the page at `addr`, if it maps it.
    pub fn lookup(&self, addr: VirtAddr) -> Option<DptEntry> {
        self.shared.pt.lock().get(addr.as_u64() >> PAGE_SHIFT)
    }

    /// The bounce buffer of a command over `range` ([`Bounce`]): a range above the
    /// `kvmalloc` bound (or more than the host can give) is `-ENOMEM` before anything
    /// happens, as in the kernel.
    fn bounce(&self, range: VaRange) -> Result<Bounce<'_>, DmirrorError> {
        let len = range.len_bytes();
        hmm::kvmalloc::check_array::<u8>(len).map_err(|_| DmirrorError::NoMem)?;
        let n = usize::try_from(len).map_err(|_| DmirrorError::NoMem)?;
        let mut buf = std::mem::take(&mut *self.shared.bounce_cache.lock());
        buf.clear();
        buf.try_reserve_exact(n).map_err(|_| DmirrorError::NoMem)?;
        buf.resize(n, 0);
        Ok(Bounce {
            buf,
            cache: &self.shared.bounce_cache,
        })
    }

    /// The test flags set by [`DmirrorCmd::Flags`].
    pub fn flags(&self) -> u64 {
        self.shared.flags.load(Ordering::Relaxed)
    }

    /// Runs a command (`dmirror_fops_unlocked_ioctl`). `cmd.ptr` is a virtual address of
    /// the same process: data moves between it and the device as `copy_to_user` /
    /// `copy_from_user` would. The common checks come first (`addr` page aligned,
    /// `npages` non-zero and not overflowing, else `Inval`), then `cpages` and `faults`
    /// start at zero. On success the outputs are written back to `cmd`; on failure `cmd`
    /// is left as it was, as the kernel does not copy the block back.
    pub fn ioctl(&self, which: DmirrorCmd, cmd: &mut HmmDmirrorCmd) -> Result<(), DmirrorError> {
        let range = check_range(cmd.addr, cmd.npages)?;
        let mut out = HmmDmirrorCmd {
            cpages: 0,
            faults: 0,
            ..*cmd
        };
        match which {
            DmirrorCmd::Read => self.cmd_read(range, &mut out, FaultPath::Locked)?,
            // dmirror_read_unlocked with a timeout of 0: retry forever.
            DmirrorCmd::ReadUnlocked => {
                self.cmd_read(range, &mut out, FaultPath::Unlocked(Duration::ZERO))?
            }
            DmirrorCmd::Write => self.cmd_write(range, &mut out)?,
            DmirrorCmd::MigrateToDev => self.cmd_migrate_to_dev(range, &mut out)?,
            DmirrorCmd::MigrateToSys => self.cmd_migrate_to_sys(range, &mut out)?,
            DmirrorCmd::MigrateOnFaultToDev => self.cmd_migrate_on_fault_to_dev(range, &mut out)?,
            DmirrorCmd::Snapshot => self.cmd_snapshot(range, &mut out)?,
            DmirrorCmd::Exclusive => self.cmd_exclusive(range, &mut out)?,
            DmirrorCmd::CheckExclusive => self.cmd_check_exclusive(range)?,
            DmirrorCmd::Release => {
                self.device.release()?;
            }
            DmirrorCmd::Flags => self.shared.flags.store(cmd.npages, Ordering::Relaxed),
        }
        *cmd = out;
        Ok(())
    }

    /// Runs `which` over `npages` at `addr` with the user buffer `ptr`: [`ioctl`](Self::ioctl)
    /// without the command block (built here, its outputs returned). The typed methods
    /// below are this with the command fixed.
    pub fn run(
        &self,
        which: DmirrorCmd,
        addr: VirtAddr,
        npages: u64,
        ptr: VirtAddr,
    ) -> Result<Done, DmirrorError> {
        let mut c = HmmDmirrorCmd {
            addr: addr.as_u64(),
            ptr: ptr.as_u64(),
            npages,
            ..HmmDmirrorCmd::default()
        };
        self.ioctl(which, &mut c)?;
        Ok(Done {
            cpages: c.cpages,
            faults: c.faults,
        })
    }

    /// The device reads `npages` at `addr` into the user buffer `out`, faulting missing
    /// pages (`HMM_DMIRROR_READ`).
    #[doc(alias = "HMM_DMIRROR_READ")]
    pub fn read(&self, addr: VirtAddr, npages: u64, out: VirtAddr) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::Read, addr, npages, out)
    }

    /// [`read`](Self::read) with the faults through `hmm_range_fault_unlocked_timeout`
    /// and no timeout (`HMM_DMIRROR_READ_UNLOCKED`); `Intr` if the process has a fatal
    /// signal pending.
    #[doc(alias = "HMM_DMIRROR_READ_UNLOCKED")]
    pub fn read_unlocked(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: VirtAddr,
    ) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::ReadUnlocked, addr, npages, out)
    }

    /// The device writes `npages` from the user buffer `data` at `addr`, faulting pages it
    /// cannot write (`HMM_DMIRROR_WRITE`).
    #[doc(alias = "HMM_DMIRROR_WRITE")]
    pub fn write(&self, addr: VirtAddr, npages: u64, data: VirtAddr) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::Write, addr, npages, data)
    }

    /// Migrates `npages` at `addr` to device memory, then reads them into `out`
    /// (`HMM_DMIRROR_MIGRATE_TO_DEV`).
    #[doc(alias = "HMM_DMIRROR_MIGRATE_TO_DEV")]
    pub fn migrate_to_dev(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: VirtAddr,
    ) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::MigrateToDev, addr, npages, out)
    }

    /// Migrates this device's pages of `npages` at `addr` back to system memory
    /// (`HMM_DMIRROR_MIGRATE_TO_SYS`).
    #[doc(alias = "HMM_DMIRROR_MIGRATE_TO_SYS")]
    pub fn migrate_to_sys(&self, addr: VirtAddr, npages: u64) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::MigrateToSys, addr, npages, VirtAddr::ZERO)
    }

    /// Faults and migrates `npages` at `addr` to device memory in one walk, then reads
    /// them into `out` (`HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV`).
    #[doc(alias = "HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV")]
    pub fn migrate_on_fault_to_dev(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: VirtAddr,
    ) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::MigrateOnFaultToDev, addr, npages, out)
    }

    /// Writes one byte per page of `npages` at `addr` into `out`, describing what the CPU
    /// page table holds (`HMM_DMIRROR_SNAPSHOT`, the bytes of [`prot`](crate::prot)).
    #[doc(alias = "HMM_DMIRROR_SNAPSHOT")]
    pub fn snapshot(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: VirtAddr,
    ) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::Snapshot, addr, npages, out)
    }

    /// Takes exclusive device access to `npages` at `addr`, then reads them into `out`
    /// (`HMM_DMIRROR_EXCLUSIVE`).
    #[doc(alias = "HMM_DMIRROR_EXCLUSIVE")]
    pub fn exclusive(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: VirtAddr,
    ) -> Result<Done, DmirrorError> {
        self.run(DmirrorCmd::Exclusive, addr, npages, out)
    }

    /// Checks that the device still holds exclusive access to `npages` at `addr`
    /// (`HMM_DMIRROR_CHECK_EXCLUSIVE`).
    #[doc(alias = "HMM_DMIRROR_CHECK_EXCLUSIVE")]
    pub fn check_exclusive(&self, addr: VirtAddr, npages: u64) -> Result<(), DmirrorError> {
        self.run(DmirrorCmd::CheckExclusive, addr, npages, VirtAddr::ZERO)
            .map(|_| ())
    }

    /// [`ioctl`](Self::ioctl) by request number; an unknown number is `Inval`.
    pub fn ioctl_raw(&self, request: u32, cmd: &mut HmmDmirrorCmd) -> Result<(), DmirrorError> {
        let which = DmirrorCmd::from_ioctl(request).ok_or(DmirrorError::Inval {
            what: "unknown command",
        })?;
        self.ioctl(which, cmd)
    }

    fn mm(&self) -> Result<Arc<Mm>, DmirrorError> {
        self.mm.upgrade().ok_or(DmirrorError::Inval {
            what: "the process has exited",
        })
    }

    fn phys(&self) -> &PhysMem {
        self.device.phys()
    }

    /// `dmirror_read`: copy from the device's mappings, faulting the rest of the range at
    /// the first page it lacks, then copy to the user buffer.
    fn cmd_read(
        &self,
        range: VaRange,
        cmd: &mut HmmDmirrorCmd,
        path: FaultPath,
    ) -> Result<(), DmirrorError> {
        let mm = self.mm()?;
        let mut bounce = self.bounce(range)?;
        self.access_loop(&mm, range, cmd, DeviceAccess::Read(&mut bounce), path)?;
        mm.write(
            VirtAddr::try_new(cmd.ptr).map_err(|_| DmirrorError::Fault)?,
            &bounce,
        )
        .map_err(|_| DmirrorError::Fault)
    }

    /// `dmirror_write`: copy from the user buffer first, then into the device's writable
    /// mappings, faulting with write at the first page it cannot write.
    fn cmd_write(&self, range: VaRange, cmd: &mut HmmDmirrorCmd) -> Result<(), DmirrorError> {
        let mm = self.mm()?;
        let mut bounce = self.bounce(range)?;
        mm.read(
            VirtAddr::try_new(cmd.ptr).map_err(|_| DmirrorError::Fault)?,
            &mut bounce,
        )
        .map_err(|_| DmirrorError::Fault)?;
        self.access_loop(
            &mm,
            range,
            cmd,
            DeviceAccess::Write(&bounce),
            FaultPath::Locked,
        )
    }

    fn access_loop(
        &self,
        mm: &Mm,
        range: VaRange,
        cmd: &mut HmmDmirrorCmd,
        mut access: DeviceAccess<'_>,
        path: FaultPath,
    ) -> Result<(), DmirrorError> {
        let write = matches!(access, DeviceAccess::Write(_));
        loop {
            match self.device_access(range, &mut cmd.cpages, &mut access) {
                Err(DmirrorError::NoEnt) => {}
                other => return other,
            }
            let from = range
                .start()
                .checked_add(cmd.cpages << PAGE_SHIFT)
                .expect("inside the range");
            self.device_fault(mm, from, range.end(), write, path)?;
            cmd.faults += 1;
        }
    }

    /// Copies pages from `*cpages` on between the device's mappings and the bounce buffer,
    /// under the mirror lock, taken for at most [`MIGRATE_CHUNK`] pages at a time; `NoEnt`
    /// at the first page it cannot use. A page the device writes is marked dirty
    /// (`set_page_dirty`): no CPU entry records the write, and reclaim must not discard a
    /// lazy-free page that holds it.
    fn device_access(
        &self,
        range: VaRange,
        cpages: &mut u64,
        access: &mut DeviceAccess<'_>,
    ) -> Result<(), DmirrorError> {
        let first = range.start().as_u64() >> PAGE_SHIFT;
        while *cpages < range.npages() {
            let pt = self.shared.pt.lock();
            let stop = range.npages().min(*cpages + MIGRATE_CHUNK);
            while *cpages < stop {
                let entry = pt.get(first + *cpages).ok_or(DmirrorError::NoEnt)?;
                let frame = self.phys().frame_nr(entry.frame_nr);
                let off = (*cpages * PAGE_SIZE) as usize;
                let page = off..off + PAGE_SIZE as usize;
                match access {
                    DeviceAccess::Read(buf) => frame.read(0, &mut buf[page]),
                    DeviceAccess::Write(buf) => {
                        if !entry.tag.is_writable() {
                            return Err(DmirrorError::NoEnt);
                        }
                        frame.write(0, &buf[page]);
                        frame.mark_dirty();
                    }
                }
                *cpages += 1;
                self.shared
                    .counters
                    .pages_accessed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The device fault routine (`dmirror_fault`, `dmirror_fault_unlocked`): mirror
    /// `[start, end)` in chunks of 32 pages through the driver loop, storing what
    /// `hmm_range_fault` returns in the device page table under the mirror lock.
    fn device_fault(
        &self,
        mm: &Mm,
        start: VirtAddr,
        end: VirtAddr,
        write: bool,
        path: FaultPath,
    ) -> Result<(), DmirrorError> {
        self.shared
            .counters
            .device_faults
            .fetch_add(1, Ordering::Relaxed);
        let mut flags = HmmPfnFlags::REQ_FAULT;
        if write {
            flags |= HmmPfnFlags::REQ_WRITE;
        }
        let mut pfns = [HmmPfn::default(); RANGE_CHUNK as usize];
        let mut at = start;
        while at < end {
            let n = ((end.as_u64() - at.as_u64()) >> PAGE_SHIFT).min(RANGE_CHUNK);
            let next = at.checked_add(n << PAGE_SHIFT).expect("inside the range");
            let mut range = HmmRange {
                notifier: &self.notifier,
                notifier_seq: self.notifier.read_begin(),
                start: at,
                end: next,
                hmm_pfns: &mut pfns[..n as usize],
                default_flags: flags,
                pfn_flags_mask: HmmPfnFlags::empty(),
                dev_private_owner: Some(self.device.owner()),
            };
            match path {
                FaultPath::Locked => fault_and_commit(
                    mm,
                    &mut range,
                    HMM_RANGE_DEFAULT_TIMEOUT,
                    &self.shared.pt,
                    |pt, r| self.store(pt, r),
                )?,
                // dmirror_range_fault_unlocked: the walk retries `Busy` itself; a collision
                // seen under the mirror lock calls it again.
                FaultPath::Unlocked(timeout) => loop {
                    hmm_range_fault_unlocked_timeout(mm, &mut range, timeout)?;
                    let mut pt = self.shared.pt.lock();
                    if !self.notifier.read_retry(range.notifier_seq) {
                        self.store(&mut pt, &range);
                        break;
                    }
                },
            }
            at = next;
        }
        Ok(())
    }

    /// `dmirror_do_fault`: store each page the walk returned, tagged writable if the CPU
    /// mapping is. A page of this device is stored as itself: it holds the data.
    fn store(&self, pt: &mut DevicePageTable, r: &HmmRange<'_>) {
        let first = r.start.as_u64() >> PAGE_SHIFT;
        for (i, p) in r.hmm_pfns.iter().enumerate() {
            // A fault was requested for every page, so every word is valid on success.
            debug_assert!(p.is_valid() && !p.is_error(), "{p:?}");
            pt.store(first + i as u64, dpt_entry(*p));
        }
        self.shared
            .counters
            .pages_mapped
            .fetch_add(r.hmm_pfns.len() as u64, Ordering::Relaxed);
    }

    /// Calls `f` with the mmap lock and each piece of `range` a migration may cover: one
    /// VMA, at most 512 pages (`-EINVAL` for a hole or a VMA without read permission).
    /// The mmap lock is taken for each piece (the kernel driver holds it for the whole
    /// range), so a `munmap` racing a huge command waits for one piece at most.
    fn for_each_piece(
        &self,
        mm: &Mm,
        range: VaRange,
        mut f: impl FnMut(&MmapReadGuard<'_>, &hmm::mm::Vma, VaRange) -> Result<(), DmirrorError>,
    ) -> Result<(), DmirrorError> {
        let mut at = range.start();
        while at < range.end() {
            let mmap = mm.mmap_read();
            let vma = mmap
                .vma_lookup(at)
                .filter(|v| v.flags().contains(VmFlags::READ))
                .ok_or(DmirrorError::Inval {
                    what: "no readable VMA",
                })?;
            let chunk_end = at
                .checked_add(MIGRATE_CHUNK << PAGE_SHIFT)
                .unwrap_or(range.end());
            let next = range.end().min(vma.end()).min(chunk_end);
            f(&mmap, vma, VaRange::new(at, next).expect("non-empty piece"))?;
            at = next;
        }
        Ok(())
    }

    /// `dmirror_migrate_to_device`: migrate the range's system pages (and holes) to
    /// device memory, map them in the device's table, then read the range back from that
    /// table without faulting.
    fn cmd_migrate_to_dev(
        &self,
        range: VaRange,
        cmd: &mut HmmDmirrorCmd,
    ) -> Result<(), DmirrorError> {
        let mm = self.mm()?;
        // The read-back's buffer first: a range too large for it fails before any page moves.
        let mut bounce = self.bounce(range)?;
        self.for_each_piece(&mm, range, |mmap, vma, piece| {
            let args = MigrateVma {
                start: piece.start(),
                end: piece.end(),
                pgmap_owner: Some(self.device.owner()),
                flags: MigrateVmaFlags::SELECT_SYSTEM | MigrateVmaFlags::SELECT_COMPOUND,
                fault_page: None,
            };
            let m = migrate_vma_setup(mmap, args)?;
            self.finish_to_device(m, vma, piece);
            Ok(())
        })?;
        self.read_back(&mm, range, cmd, &mut bounce)
    }

    /// `dmirror_migrate_on_fault_to_device` (the migrate-on-fault series): one walk per
    /// piece faults in what cannot migrate as it is and collects everything
    /// ([`hmm_range_fault_migrate`]); the pages it reports valid but did not collect (this
    /// device's own pages, pinned pages) are mirrored if no invalidation collided, as the
    /// device fault does; the rest migrates as MIGRATE_TO_DEV does. Never retried: a
    /// collision only means those few pages are not mirrored now. The walk's own MIGRATE
    /// event is such a collision when it collected anything (the mirror records the
    /// sequence of its own events too), so in practice the
    /// uncollected pages are mirrored here only when nothing migrates.
    fn cmd_migrate_on_fault_to_dev(
        &self,
        range: VaRange,
        cmd: &mut HmmDmirrorCmd,
    ) -> Result<(), DmirrorError> {
        let mm = self.mm()?;
        // The read-back's buffer first: a range too large for it fails before any page moves.
        let mut bounce = self.bounce(range)?;
        let mut pfns = Vec::new();
        self.for_each_piece(&mm, range, |mmap, vma, piece| {
            pfns.clear();
            pfns.resize(piece.npages() as usize, HmmPfn::default());
            let mut r = HmmRange {
                notifier: &self.notifier,
                notifier_seq: self.notifier.read_begin(),
                start: piece.start(),
                end: piece.end(),
                hmm_pfns: &mut pfns,
                default_flags: HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_MIGRATE,
                pfn_flags_mask: HmmPfnFlags::empty(),
                dev_private_owner: Some(self.device.owner()),
            };
            let select = MigrateVmaFlags::SELECT_SYSTEM | MigrateVmaFlags::SELECT_COMPOUND;
            let collected = hmm_range_fault_migrate(mmap, &mut r, select)?;
            {
                let mut pt = self.shared.pt.lock();
                if !self.notifier.read_retry(r.notifier_seq) {
                    let first = piece.start().as_u64() >> PAGE_SHIFT;
                    let mut mapped = 0;
                    for (i, p) in r.hmm_pfns.iter().enumerate() {
                        if p.is_valid() && !p.is_migrating() {
                            pt.store(first + i as u64, dpt_entry(*p));
                            mapped += 1;
                        }
                    }
                    self.shared
                        .counters
                        .pages_mapped
                        .fetch_add(mapped, Ordering::Relaxed);
                }
            }
            self.finish_to_device(migrate_hmm_range_setup(collected), vma, piece);
            Ok(())
        })?;
        self.read_back(&mm, range, cmd, &mut bounce)
    }

    /// The rest of a migration to this device once collected: allocate and copy, commit,
    /// map the new pages in the device's table, finalize (`dmirror_migrate_alloc_and_copy`,
    /// `dmirror_migrate_finalize_and_map`).
    fn finish_to_device(&self, mut m: Migration<'_, '_>, vma: &hmm::mm::Vma, piece: VaRange) {
        let vm_write = vma.flags().contains(VmFlags::WRITE);
        let open = self.device.open_mirrors();
        let pts: Vec<_> = open.iter().map(|s| &s.pt).collect();
        let counts =
            alloc_and_copy_to_device(&mut m, &self.device, self.shared.id, vm_write, &pts, || {
                self.shared.take_fail_alloc()
            });
        self.shared.count_copies(counts.copied, 0);
        self.shared
            .counters
            .pages_zero_filled
            .fetch_add(counts.zeroed, Ordering::Relaxed);
        let p = m.pages();
        map_migrated(&p, piece.start(), &mut self.shared.pt.lock());
        let _ = p.finalize();
    }

    /// `dmirror_migrate_to_system`: migrate this device's pages in the range back to
    /// system memory; `cpages` counts the pages that moved.
    fn cmd_migrate_to_sys(
        &self,
        range: VaRange,
        cmd: &mut HmmDmirrorCmd,
    ) -> Result<(), DmirrorError> {
        let mm = self.mm()?;
        let select = MigrateVmaFlags::SELECT_COMPOUND
            | match self.device.kind() {
                MemoryType::DevicePrivate => MigrateVmaFlags::SELECT_DEVICE_PRIVATE,
                MemoryType::DeviceCoherent => MigrateVmaFlags::SELECT_DEVICE_COHERENT,
            };
        self.for_each_piece(&mm, range, |mmap, _, piece| {
            let args = MigrateVma {
                start: piece.start(),
                end: piece.end(),
                pgmap_owner: Some(self.device.owner()),
                flags: select,
                fault_page: None,
            };
            let mut m = migrate_vma_setup(mmap, args)?;
            let open = self.device.open_mirrors();
            let pts: Vec<_> = open.iter().map(|s| &s.pt).collect();
            let copied =
                alloc_and_copy_to_system(&mut m, &pts, false, || self.shared.take_fail_alloc());
            if let Ok(c) = copied {
                self.shared.count_copies(0, c.copied);
            }
            let p = m.pages();
            cmd.cpages += p
                .src()
                .iter()
                .filter(|w| w.is_valid() && w.is_migrating())
                .count() as u64;
            let _ = p.finalize();
            copied.map(|_| ()).map_err(|_| DmirrorError::NoMem)
        })
    }

    /// Reads the range from the device's table into the user buffer without faulting
    /// (`ENOENT` at the first page the device does not map), as MIGRATE_TO_DEV and
    /// EXCLUSIVE end.
    fn read_back(
        &self,
        mm: &Mm,
        range: VaRange,
        cmd: &mut HmmDmirrorCmd,
        bounce: &mut [u8],
    ) -> Result<(), DmirrorError> {
        self.device_access(range, &mut cmd.cpages, &mut DeviceAccess::Read(bounce))?;
        mm.write(
            VirtAddr::try_new(cmd.ptr).map_err(|_| DmirrorError::Fault)?,
            bounce,
        )
        .map_err(|_| DmirrorError::Fault)
    }

    /// `dmirror_exclusive`: every page made exclusive to the device and mapped for
    /// atomics, then the range read back from the device's table without faulting.
    fn cmd_exclusive(&self, range: VaRange, cmd: &mut HmmDmirrorCmd) -> Result<(), DmirrorError> {
        let mm = self.mm()?;
        // The read-back's buffer first: a range too large for it fails before any page moves.
        let mut bounce = self.bounce(range)?;
        for piece in range.pieces(PMD_SIZE) {
            let mmap = mm.mmap_read();
            for va in piece.pages() {
                // dmirror passes no owner: its own EXCLUSIVE event clears the entry, which
                // it stores again, tagged atomic.
                let page = make_device_exclusive(&mmap, va, None).map_err(|e| match e {
                    ExclusiveError::Fault { .. } => DmirrorError::Fault,
                    ExclusiveError::NotSupported { .. } => DmirrorError::NotSupported,
                    ExclusiveError::NoMem { .. } => DmirrorError::NoMem,
                })?;
                self.shared.pt.lock().store(
                    va.as_u64() >> PAGE_SHIFT,
                    DptEntry {
                        frame_nr: page.page().pfn().as_u64(),
                        tag: DptTag::Atomic,
                    },
                );
            }
        }
        self.read_back(&mm, range, cmd, &mut bounce)
    }

    /// `dmirror_check_atomic`: `Perm` while a page of the range is still mapped for
    /// atomics. Looks at the mapped pages only, so the mirror lock is held for a time
    /// bounded by what the device maps, whatever the range.
    fn cmd_check_exclusive(&self, range: VaRange) -> Result<(), DmirrorError> {
        let first = range.start().as_u64() >> PAGE_SHIFT;
        let atomic = self
            .shared
            .pt
            .lock()
            .any_in(first, first + range.npages(), |e| e.tag == DptTag::Atomic);
        if atomic {
            Err(DmirrorError::Perm)
        } else {
            Ok(())
        }
    }

    /// `dmirror_snapshot`: one byte per page describing the CPU mapping, 32 pages at a
    /// time under a temporary interval notifier, no faults; each chunk's bytes are copied
    /// to the user buffer as they are made, as the kernel's loop does, so the memory used
    /// is one chunk whatever the range.
    fn cmd_snapshot(&self, range: VaRange, cmd: &mut HmmDmirrorCmd) -> Result<(), DmirrorError> {
        let mm = self.mm()?;
        let user = VirtAddr::try_new(cmd.ptr).map_err(|_| DmirrorError::Fault)?;
        let mut bytes = [0u8; RANGE_CHUNK as usize];
        let mut pfns = [HmmPfn::default(); RANGE_CHUNK as usize];
        let mut at = range.start();
        while at < range.end() {
            let n = ((range.end().as_u64() - at.as_u64()) >> PAGE_SHIFT).min(RANGE_CHUNK);
            let next = at.checked_add(n << PAGE_SHIFT).expect("inside the range");
            let notifier = mm
                .interval_notifier_insert(at, n << PAGE_SHIFT, Arc::new(SeqOnly))
                .map_err(|_| DmirrorError::NoMem)?;
            let mut r = HmmRange {
                notifier: &notifier,
                notifier_seq: notifier.read_begin(),
                start: at,
                end: next,
                hmm_pfns: &mut pfns[..n as usize],
                default_flags: HmmPfnFlags::empty(),
                pfn_flags_mask: HmmPfnFlags::empty(),
                dev_private_owner: Some(self.device.owner()),
            };
            fault_and_commit(
                &mm,
                &mut r,
                HMM_RANGE_DEFAULT_TIMEOUT,
                &self.shared.pt,
                |_, r| {
                    for (b, p) in bytes.iter_mut().zip(r.hmm_pfns.iter()) {
                        *b = self.prot_byte(*p);
                    }
                },
            )?;
            let to = user.checked_add(cmd.cpages).ok_or(DmirrorError::Fault)?;
            mm.write(to, &bytes[..n as usize])
                .map_err(|_| DmirrorError::Fault)?;
            cmd.cpages += n;
            at = next;
        }
        Ok(())
    }

    /// `dmirror_mkentry`: the snapshot byte of one word.
    fn prot_byte(&self, p: HmmPfn) -> u8 {
        if p.is_error() {
            return prot::ERROR;
        }
        let Some(frame) = p.frame(self.phys()) else {
            return prot::NONE;
        };
        let mut b = match frame.zone() {
            Zone::DevicePrivate { .. } if self.device.owns(&frame) => prot::DEV_PRIVATE_LOCAL,
            Zone::DevicePrivate { .. } => prot::DEV_PRIVATE_REMOTE,
            Zone::DeviceCoherent { .. } if self.device.owns(&frame) => prot::DEV_COHERENT_LOCAL,
            Zone::DeviceCoherent { .. } => prot::DEV_COHERENT_REMOTE,
            Zone::System if self.phys().is_zero_pfn(Pfn::new(p.frame_nr())) => prot::ZERO,
            Zone::System => prot::NONE,
        };
        b |= if p.is_writable() {
            prot::WRITE
        } else {
            prot::READ
        };
        if p.map_order() == PMD_ORDER {
            b |= prot::PMD;
        } else if p.map_order() == PUD_ORDER {
            b |= prot::PUD;
        }
        b
    }

    /// The driver's own `mmap` (`dmirror_fops_mmap`): a driver mapping (`VM_MIXEDMAP`) of
    /// `len` bytes with a zeroed page of the driver's inserted at every address.
    pub fn mmap(&self, len: u64, prot: Prot, flags: MapFlags) -> Result<VirtAddr, DmirrorError> {
        let mm = self.mm()?;
        // Checked before a page is taken: the driver allocates one page per page mapped.
        if len == 0 || len > USER_VA_END {
            return Err(DmirrorError::Inval {
                what: "length zero or beyond the address space",
            });
        }
        let npages = len.div_ceil(PAGE_SIZE);
        let phys = Arc::clone(self.device.phys());
        // All or nothing: on a failure the frames taken so far go back as they drop.
        let frames: Vec<_> = (0..npages)
            .map(|_| phys.alloc_zeroed(0, FrameFlags::UPTODATE))
            .collect::<Result<_, _>>()
            .map_err(|_| DmirrorError::NoMem)?;
        let pages = frames.into_iter().map(|f| f.into_raw()).collect();
        let ops = Arc::new(DriverPages {
            phys: Arc::clone(&phys),
            pages,
        });
        let addr = mm
            .mmap_driver(None, len, prot, flags, ops.clone())
            .map_err(mm_error)?;
        for (i, &pfn) in ops.pages.iter().enumerate() {
            let va = addr
                .checked_add(i as u64 * PAGE_SIZE)
                .expect("inside the mapping");
            mm.vm_insert_page(va, pfn).map_err(mm_error)?;
        }
        Ok(addr)
    }
}

impl Drop for Dmirror {
    fn drop(&mut self) {
        self.device.unregister_mirror(self.shared.id);
    }
}

impl std::fmt::Debug for Dmirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dmirror")
            .field("device", &self.device.minor())
            .field("mapped", &self.nr_mapped())
            .finish_non_exhaustive()
    }
}

/// How the device fault routine calls `hmm_range_fault`.
#[derive(Debug, Clone, Copy)]
enum FaultPath {
    /// Under the mmap lock, in the driver loop (`dmirror_range_fault`).
    Locked,
    /// Through `hmm_range_fault_unlocked_timeout` with this retry budget
    /// (`dmirror_range_fault_unlocked`).
    Unlocked(Duration),
}

/// Which way a device access copies.
enum DeviceAccess<'b> {
    Read(&'b mut [u8]),
    Write(&'b [u8]),
}

/// The pages behind a driver mapping: the driver keeps a reference on each for as long as
/// the mapping exists.
struct DriverPages {
    phys: Arc<PhysMem>,
    pages: Vec<Pfn>,
}

impl VmOps for DriverPages {
    fn fault(&self, pgoff: u64, _write: bool) -> Result<Pfn, VmFault> {
        self.pages
            .get(pgoff as usize)
            .copied()
            .ok_or(VmFault::Sigbus)
    }
}

impl Drop for DriverPages {
    fn drop(&mut self) {
        for &pfn in &self.pages {
            let _ = self.phys.frame(pfn).put();
        }
    }
}

/// The device entry for a valid word: the frame, writable if the CPU mapping is.
fn dpt_entry(p: HmmPfn) -> DptEntry {
    let tag = if p.is_writable() {
        DptTag::Write
    } else {
        DptTag::Read
    };
    DptEntry {
        frame_nr: p.frame_nr(),
        tag,
    }
}

/// The checks every command starts with: `addr` page aligned, and
/// `addr + npages * PAGE_SIZE` above `addr` and inside the address space.
fn check_range(addr: u64, npages: u64) -> Result<VaRange, DmirrorError> {
    let inval = |what| DmirrorError::Inval { what };
    let start = VirtAddr::try_new(addr).map_err(|_| inval("address out of range"))?;
    if !start.is_page_aligned() {
        return Err(inval("unaligned address"));
    }
    let len = npages
        .checked_mul(PAGE_SIZE)
        .filter(|&l| l > 0)
        .ok_or(inval("no pages, or too many"))?;
    VaRange::from_len(start, len)
        .ok()
        .filter(|r| r.end().as_u64() <= USER_VA_END)
        .ok_or(inval("range overflows the address space"))
}

fn mm_error(e: MmError) -> DmirrorError {
    match e {
        MmError::NoMem { .. } => DmirrorError::NoMem,
        MmError::Fault { .. } => DmirrorError::Fault,
        MmError::Perm { .. } | MmError::Access { .. } => DmirrorError::Perm,
        MmError::Busy { .. } | MmError::Again { .. } => DmirrorError::Busy,
        MmError::Inval { what } => DmirrorError::Inval { what },
        MmError::Exists { .. } => DmirrorError::Inval {
            what: "mapping exists",
        },
        MmError::Intr { .. } => DmirrorError::Intr,
    }
}

/// The bounce buffer of a device read or write (`dmirror_bounce_init`), zeroed. It comes
/// from the mirror's cache when one is there: the kernel `kvmalloc`s one per command,
/// which costs a kernel little, but a fresh host allocation of a large range costs one
/// host page fault per 4 KiB on first touch (65536 per 256 MiB command). Concurrent
/// commands take their own. Dropping it gives it back, the larger buffer being kept.
struct Bounce<'m> {
    buf: Vec<u8>,
    cache: &'m Mutex<Vec<u8>>,
}

impl std::ops::Deref for Bounce<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for Bounce<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Bounce<'_> {
    fn drop(&mut self) {
        let mut cached = self.cache.lock();
        if self.buf.capacity() > cached.capacity() {
            *cached = std::mem::take(&mut self.buf);
        }
    }
}
