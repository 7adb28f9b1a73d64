//! Servicing the fault buffer: batches, ranges, migration, `get_pages`, bind, replay.
//!
//! ```text
//! service_faults: while the buffer has entries
//!     fetch <= batch_max, coalesce, sort, group by 2 MiB block   (fault::FaultBatch)
//!     garbage-collect the ranges UNMAP reached                     (collect_garbage)
//!     per block:
//!         drop faults whose page is mapped by now                  ("valid" faults)
//!         per fault: window notifier, VMA check, find or insert the range
//!         per range: policy -> Device: migrate in one walk         (hmm_range_fault_migrate)
//!                    get_pages: hmm_range_fault under the window's sequence, then, under
//!                    the notifier lock and after read_retry, bind GPU entries
//!     replay (batch flush)
//! ```
//!
//! The migration to the device is the seed series' migrate on fault: one walk faults in
//! what is missing and collects every system page of the range, a second walk
//! (`get_pages`) maps what the range holds now; drm_gpusvm and UVM need a third when
//! pages are absent.

use std::sync::Arc;
use std::time::Instant;

use hmm::addr::{VaRange, VirtAddr, PAGE_SHIFT, PMD_NR};
use hmm::migrate::{hmm_range_fault_migrate, migrate_hmm_range_setup, migrate_vma_setup};
use hmm::migrate::{MigrateVma, MigrateVmaFlags};
use hmm::mm::Mm;
use hmm::prot::VmFlags;
use hmm::range_fault::HMM_RANGE_DEFAULT_TIMEOUT;
use hmm::range_fault::{hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange};

use crate::addr::GpuPageSize;
use crate::error::SvmError;
use crate::fault::{Access, BlockFaults, FaultBatch, GpuFault};
use crate::gpt::{GpuPte, Location};
use crate::migrate::{copy_to_system, copy_to_vram, zap_sources};
use crate::policy::{Placement, PlacementQuery};
use crate::range::{choose_chunk, find, SvmRange, Window};
use crate::stats::{add, Counters};
use crate::vm::{GpuVm, VmState};

/// What one [`GpuVm::service_faults`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceReport {
    /// Batches serviced.
    pub batches: u64,
    /// Faults serviced after coalescing.
    pub faults: u64,
    /// Faults cancelled (the next access to their page fails with `Fatal`).
    pub fatal: Vec<GpuFault>,
}

impl GpuVm {
    /// Drains the fault buffer batch by batch and services every fault (see the module
    /// documentation); each batch ends with one replay. Fatal faults are reported and
    /// recorded for their access; errors that are not about one fault (`Exited`, `NoMem`)
    /// end the call.
    pub fn service_faults(&self) -> Result<ServiceReport, SvmError> {
        let mut report = ServiceReport::default();
        let batch_max = self.device.config().batch_max.max(1);
        loop {
            let faults = self.buffer.fetch(batch_max);
            if faults.is_empty() {
                return Ok(report);
            }
            let mm = self.mm()?;
            let batch = FaultBatch::new(faults);
            let c = &self.shared.counters;
            add(&c.fault_batches, 1);
            add(&c.duplicate_faults, batch.duplicates);
            self.collect_garbage(&mm)?;
            for block in &batch.blocks {
                report.faults += block.faults.len() as u64;
                self.service_block(&mm, block, &mut report)?;
            }
            add(&c.replays, 1);
            report.batches += 1;
        }
    }

    fn service_block(
        &self,
        mm: &Arc<Mm>,
        block: &BlockFaults,
        report: &mut ServiceReport,
    ) -> Result<(), SvmError> {
        let c = &self.shared.counters;
        let pending: Vec<GpuFault> = {
            let st = self.shared.state.read();
            block
                .faults
                .iter()
                .copied()
                .filter(|f| {
                    !st.gpt
                        .lookup(f.vpn())
                        .is_some_and(|p| f.access == Access::Read || p.writable)
                })
                .collect()
        };
        add(&c.valid_faults, (block.faults.len() - pending.len()) as u64);
        let mut todo: Vec<(SvmRange, Access)> = Vec::new();
        for f in &pending {
            self.ensure_window(mm, f.addr)?;
        }
        {
            let mmap = mm.mmap_read();
            for f in pending {
                let why = match mmap.vma_lookup(f.addr) {
                    None => Some("no VMA"),
                    Some(v) if !v.flags().contains(VmFlags::READ) => Some("no read permission"),
                    Some(v) if f.access == Access::Write && !v.flags().contains(VmFlags::WRITE) => {
                        Some("write to read-only memory")
                    }
                    Some(v) => {
                        let range = self.range_for(f.addr, v.range());
                        match todo.iter_mut().find(|(r, _)| r.start == range.start) {
                            Some((_, a)) => *a = (*a).max(f.access),
                            None => todo.push((range, f.access)),
                        }
                        None
                    }
                };
                if let Some(why) = why {
                    self.cancel(f, why, report);
                }
            }
        }
        for (range, access) in todo {
            Counters::by_size(&c.faults_by_size, range.size, 1);
            let q = PlacementQuery {
                range: range.range(),
                size: range.size,
                access,
                vram_free_pages: self.device.vram_pages() - self.device.vram_pages_in_use(),
            };
            if self.policy.place(&q) == Placement::Device {
                // Room first, with no lock held and no page collected (UVM preallocates
                // its chunks for the same reason): eviction takes folio locks and mmap
                // locks of its own. Without room, what does not fit is mapped remotely.
                self.device.make_room(range.size.pages());
                self.migrate_to_vram(mm, range, access)?;
            }
            if let Err(fatal) = self.get_pages(mm, range, access)? {
                self.cancel(
                    GpuFault {
                        addr: range.start,
                        access,
                    },
                    fatal,
                    report,
                );
            }
        }
        Ok(())
    }

    /// Cancels a fault: counted, reported, and recorded so the access sees it.
    fn cancel(&self, f: GpuFault, why: &'static str, report: &mut ServiceReport) {
        add(&self.shared.counters.fatal_faults, 1);
        self.shared.state.write().fatal.insert(f.vpn(), why);
        report.fatal.push(f);
    }

    /// The window notifier over `addr`, inserted if missing (no mmap lock held).
    fn ensure_window(
        &self,
        mm: &Mm,
        addr: VirtAddr,
    ) -> Result<Arc<hmm::notifier::IntervalNotifier>, SvmError> {
        let bytes = self.device.config().notifier_bytes;
        let index = addr.as_u64() / bytes;
        let mut windows = self.windows.lock();
        if let Some(w) = windows.get(&index) {
            return Ok(Arc::clone(w));
        }
        let start = VirtAddr::new(index * bytes);
        let len = bytes.min(hmm::addr::USER_VA_END - start.as_u64());
        let ops = Arc::new(Window {
            vm: Arc::clone(&self.shared),
        });
        let n = Arc::new(
            mm.interval_notifier_insert(start, len, ops)
                .map_err(|_| SvmError::NoMem)?,
        );
        windows.insert(index, Arc::clone(&n));
        Ok(n)
    }

    /// The range holding `addr`, inserted with the chunk [`choose_chunk`] picks if none
    /// does.
    fn range_for(&self, addr: VirtAddr, vma: VaRange) -> SvmRange {
        let vpn = addr.as_u64() >> PAGE_SHIFT;
        let mut st = self.shared.state.write();
        if let Some(r) = find(&st.ranges, vpn).filter(|r| !r.unmapped && !r.partial_unmap) {
            return r;
        }
        let r = choose_chunk(addr, vma, &st.ranges)
            .expect("a page inside a VMA and no range always fits a 4 KiB chunk");
        st.ranges.insert(r.vpns().0, r);
        add(&self.shared.counters.ranges_created, 1);
        r
    }

    /// Moves `range` to device memory in one walk: faults in what is missing and
    /// collects every system page (a 2 MiB range as one unit where it can), zaps the GPU
    /// entries of what it collected, copies to device pages, commits. Pages the device
    /// has no room for stay in system memory.
    fn migrate_to_vram(&self, mm: &Mm, range: SvmRange, access: Access) -> Result<(), SvmError> {
        let window = self.ensure_window(mm, range.start)?;
        let n = range.size.pages() as usize;
        let mut pfns = vec![HmmPfn::default(); n];
        let mut flags = HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_MIGRATE;
        if access == Access::Write {
            flags |= HmmPfnFlags::REQ_WRITE;
        }
        let mut select = MigrateVmaFlags::SELECT_SYSTEM;
        if range.size == GpuPageSize::Size2M {
            select |= MigrateVmaFlags::SELECT_COMPOUND;
        }
        let mmap = mm.mmap_read();
        let mut r = HmmRange {
            notifier: &window,
            notifier_seq: window.read_begin(),
            start: range.start,
            end: range.range().end(),
            hmm_pfns: &mut pfns,
            default_flags: flags,
            pfn_flags_mask: HmmPfnFlags::empty(),
            dev_private_owner: Some(self.device.owner()),
        };
        let collected = match hmm_range_fault_migrate(&mmap, &mut r, select) {
            Ok(c) => c,
            Err(HmmError::NoMem { .. }) => return Err(SvmError::NoMem),
            // What cannot migrate (no VMA any more, a VMA that cannot migrate, a page
            // that cannot be faulted) is left to get_pages, which maps it or cancels.
            Err(_) => return Ok(()),
        };
        let mut m = migrate_hmm_range_setup(collected);
        zap_sources(&self.shared, &m);
        let fill = copy_to_vram(&mut m, &self.device, self.id);
        let out = m.pages().finalize();
        self.device.migration_done(&fill.frames);
        let c = &self.shared.counters;
        add(&c.vram_alloc_failures, fill.failed);
        add(&c.pages_h2d, out.migrated);
        if out.migrated > 0 {
            Counters::by_size(&c.migrations_by_size, range.size, 1);
        }
        Ok(())
    }

    /// drm_gpusvm's `get_pages` and the bind: `hmm_range_fault` over the range (this
    /// device's pages as they are, everything else faulted to system memory) under the
    /// window's sequence, then under the notifier lock, if no invalidation came in
    /// between, GPU entries for every page. `Ok(Err(why))` when the range cannot be
    /// mapped (its VMA went, or does not allow the access): the fault is fatal.
    fn get_pages(
        &self,
        mm: &Mm,
        range: SvmRange,
        access: Access,
    ) -> Result<Result<(), &'static str>, SvmError> {
        let window = self.ensure_window(mm, range.start)?;
        let n = range.size.pages() as usize;
        let mut pfns = vec![HmmPfn::default(); n];
        let mut flags = HmmPfnFlags::REQ_FAULT;
        if access == Access::Write {
            flags |= HmmPfnFlags::REQ_WRITE;
        }
        // TIMEOUT: the kernel's HMM_RANGE_DEFAULT_TIMEOUT budget for collisions.
        let deadline = Instant::now().checked_add(HMM_RANGE_DEFAULT_TIMEOUT);
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(SvmError::Busy { addr: range.start });
            }
            let seq = window.read_begin();
            let mut r = HmmRange {
                notifier: &window,
                notifier_seq: seq,
                start: range.start,
                end: range.range().end(),
                hmm_pfns: &mut pfns,
                default_flags: flags,
                pfn_flags_mask: HmmPfnFlags::empty(),
                dev_private_owner: Some(self.device.owner()),
            };
            add(&self.shared.counters.get_pages, 1);
            let res = {
                let mmap = mm.mmap_read();
                hmm_range_fault(&mmap, &mut r)
            };
            match res {
                Ok(()) => {}
                Err(HmmError::Busy) => continue,
                Err(HmmError::NoMem { .. }) => return Err(SvmError::NoMem),
                Err(HmmError::Fault { .. }) | Err(HmmError::Range { .. }) => {
                    return Ok(Err("the range is no longer mapped"))
                }
                Err(HmmError::Perm { .. }) => return Ok(Err("access not allowed")),
                Err(HmmError::Inval { what }) => return Ok(Err(what)),
            }
            let mut st = self.shared.state.write();
            if window.read_retry(seq) {
                continue;
            }
            self.bind(&mut st, range, &pfns);
            return Ok(Ok(()));
        }
    }

    /// Writes the GPU entries of `range` from `pfns` (every word valid), with the largest
    /// entry size each run allows: 2 MiB for a whole range of one contiguous, aligned
    /// folio with one location and permission, else 64 KiB per such aligned 16 pages,
    /// else 4 KiB.
    fn bind(&self, st: &mut VmState, range: SvmRange, pfns: &[HmmPfn]) {
        let phys = self.device.phys();
        let (first, _) = range.vpns();
        let ptes: Vec<GpuPte> = pfns
            .iter()
            .map(|p| {
                debug_assert!(p.is_valid(), "a fault was requested for every page");
                let frame = phys.frame_nr(p.frame_nr());
                GpuPte {
                    frame_nr: p.frame_nr(),
                    writable: p.is_writable(),
                    location: if self.device.owns(&frame) {
                        Location::Vram
                    } else {
                        Location::System
                    },
                    size: GpuPageSize::Size4K,
                }
            })
            .collect();
        let c = &self.shared.counters;
        let mut i = 0;
        while i < ptes.len() {
            let size = [GpuPageSize::Size2M, GpuPageSize::Size64K]
                .into_iter()
                .find(|s| fits(&ptes[i..], first + i as u64, *s))
                .unwrap_or(GpuPageSize::Size4K);
            let n = size.pages() as usize;
            for (k, pte) in ptes[i..i + n].iter().enumerate() {
                st.gpt.set(first + (i + k) as u64, GpuPte { size, ..*pte });
                st.fatal.remove(&(first + (i + k) as u64));
            }
            match ptes[i].location {
                Location::Vram => {
                    add(&c.local_mapped_pages, n as u64);
                    self.device.used(ptes[i].frame_nr);
                }
                Location::System => add(&c.remote_mapped_pages, n as u64),
            }
            Counters::by_size(&c.binds_by_size, size, 1);
            i += n;
        }
    }

    /// The garbage collector (`drm_gpusvm_range_remove` from Xe's GC worker): ranges
    /// an UNMAP covered are dropped; a range an UNMAP covered in part first has its
    /// remaining device pages moved to system memory, then its GPU entries zapped and the
    /// range dropped.
    pub(crate) fn collect_garbage(&self, mm: &Mm) -> Result<(), SvmError> {
        let gc: Vec<SvmRange> = {
            let mut st = self.shared.state.write();
            let keys = std::mem::take(&mut st.gc);
            keys.into_iter()
                .filter_map(|k| st.ranges.get(&k).copied())
                .collect()
        };
        for range in gc {
            if range.partial_unmap {
                self.evict_range(mm, range);
            }
            let mut st = self.shared.state.write();
            let (first, end) = range.vpns();
            st.gpt.unmap(first, end);
            st.ranges.remove(&first);
            add(&self.shared.counters.ranges_destroyed, 1);
        }
        Ok(())
    }

    /// Moves this device's pages of what is still mapped of `range` to system memory
    /// (MIGRATE events with this device's owner; the GPU entries of the pages taken are
    /// zapped first).
    fn evict_range(&self, mm: &Mm, range: SvmRange) {
        let mmap = mm.mmap_read();
        let r = range.range();
        let mut at = r.start();
        while at < r.end() {
            let Some(vma) = mmap.vma_lookup(at) else {
                at = next_vma_start(&mmap, at, r.end());
                continue;
            };
            let end = vma.range().end().min(r.end());
            let args = MigrateVma {
                start: at,
                end,
                pgmap_owner: Some(self.device.owner()),
                flags: MigrateVmaFlags::SELECT_DEVICE_PRIVATE | MigrateVmaFlags::SELECT_COMPOUND,
                fault_page: None,
            };
            if let Ok(mut m) = migrate_vma_setup(&mmap, args) {
                zap_sources(&self.shared, &m);
                // Out of system memory: what had no destination stays on the device.
                let _ = copy_to_system(&mut m, mm.phys());
                let out = m.pages().finalize();
                add(&self.shared.counters.pages_d2h, out.migrated);
            }
            at = end;
        }
    }
}

/// Whether `ptes` (from virtual page `vpn`) start a run that one entry of `size` can map:
/// `vpn` aligned, the run long enough, one contiguous run of frames aligned the same way,
/// one location and one permission.
fn fits(ptes: &[GpuPte], vpn: u64, size: GpuPageSize) -> bool {
    let n = size.pages();
    let Some(run) = ptes.get(..n as usize) else {
        return false;
    };
    let head = run[0];
    vpn % n == 0
        && head.frame_nr % n == 0
        && n <= PMD_NR
        && run.iter().enumerate().all(|(k, p)| {
            p.frame_nr == head.frame_nr + k as u64
                && p.location == head.location
                && p.writable == head.writable
        })
}

/// The start of the first VMA after `at` (before `end`), or `end`.
fn next_vma_start(mmap: &hmm::mm::MmapReadGuard<'_>, at: VirtAddr, end: VirtAddr) -> VirtAddr {
    let mut p = at;
    while p < end {
        if mmap.vma_lookup(p).is_some() {
            return p;
        }
        p = p.checked_add(hmm::addr::PAGE_SIZE).unwrap_or(end);
    }
    end
}
