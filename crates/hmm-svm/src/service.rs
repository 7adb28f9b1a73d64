//! Servicing the fault buffer: batches, ranges, migration, `get_pages`, bind, replay; and
//! the access-counter notifications and explicit prefetches, which reuse the same
//! "make resident" path with another cause.
//!
//! ```text
//! service_faults: while the buffer has entries
//!     fetch <= batch_max, coalesce, sort, group by 2 MiB block   (fault::FaultBatch)
//!     garbage-collect the ranges UNMAP reached                     (collect_garbage)
//!     per block:
//!         drop faults whose page is mapped by now                  ("valid" faults)
//!         per fault: window notifier, VMA check, find or insert the range
//!         per range: placement (policy, advice) -> Device:
//!                        region = prefetch(resident, faulted, range) minus thrashing pages
//!                        make room (eviction), migrate each run in one walk
//!                    get_pages over what to map (the region, or the whole range when
//!                    it stays in system memory), bind under the notifier lock
//!     replay (batch flush)
//! ```
//!
//! The migration to the device is the seed series' migrate on fault: one walk faults in
//! what is missing and collects every system page of the run, a second walk
//! (`get_pages`) maps what the range holds now; drm_gpusvm and UVM need a third when
//! pages are absent.

use std::sync::Arc;
use std::time::Instant;

use hmm::addr::{VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE, PMD_NR, PMD_SHIFT};
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
use crate::migrate::{by_peer, copy_to_system, copy_to_vram, zap_sources, Sources};
use crate::peer::PeerPolicy;
use crate::policy::prefetch::{BlockMask, BlockView};
use crate::policy::{Cause, Placement, PlacementQuery};
use crate::range::{choose_chunk, find, SvmRange, Window};
use crate::stats::{add, Counters};
use crate::vm::{user_range, GpuVm, VmState};

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

/// The faults of one range in a batch, and what the VMA allows.
#[derive(Debug, Clone, Copy)]
struct RangeFaults {
    range: SvmRange,
    /// The strongest access.
    access: Access,
    /// Pages (in the block) that faulted.
    faulted: BlockMask,
    /// Of those, the pages that faulted for write.
    written: BlockMask,
    /// Whether the VMA's pages may migrate (private anonymous memory).
    migratable: bool,
    /// Whether the VMA is writable (holes migrate to writable pages).
    vm_write: bool,
}

/// A run of page indexes, `[start, end)`.
type Run = (usize, usize);

/// Whether `get_pages` mapped the range, or found it no longer fits the CPU's mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapped {
    Yes,
    Stale,
}

impl GpuVm {
    /// Drains the fault buffer batch by batch and services every fault (see the module
    /// documentation); each batch ends with one replay. Pending access-counter
    /// notifications are serviced after the faults. Fatal faults are reported and recorded
    /// for their access; errors that are not about one fault (`Exited`, `NoMem`, `Busy`)
    /// end the call, and the faults of the batch not serviced yet are raised again by
    /// their replays.
    pub fn service_faults(&self) -> Result<ServiceReport, SvmError> {
        let _serial = self.shared.service_lock.lock();
        if !self.device.is_online() {
            // The faults of a device that went away are dropped with it.
            self.buffer.fetch(usize::MAX);
            return Err(SvmError::Offline);
        }
        let mut report = ServiceReport::default();
        let batch_max = self.device.config().batch_max;
        loop {
            let faults = self.buffer.fetch(batch_max);
            if faults.is_empty() {
                break;
            }
            let mm = self.mm()?;
            let batch = FaultBatch::new(faults);
            tracing::debug!(
                target: "hmm_svm::fault",
                vm = self.id,
                faults = batch.blocks.iter().map(|b| b.faults.len()).sum::<usize>(),
                duplicates = batch.duplicates,
                blocks = batch.blocks.len(),
                "fault batch"
            );
            let c = &self.shared.counters;
            add(&c.fault_batches, 1);
            add(&c.duplicate_faults, batch.duplicates);
            self.collect_garbage(&mm);
            for block in &batch.blocks {
                report.faults += block.faults.len() as u64;
                self.service_block(&mm, block, &mut report)?;
            }
            add(&c.replays, 1);
            report.batches += 1;
        }
        self.access_counters_locked()?;
        Ok(report)
    }

    /// Services the access-counter notifications: each block whose remote accesses
    /// reached the threshold has its ranges placed again with cause `AccessCounter`, and
    /// migrated if the policy says so; its counter starts again from zero.
    pub fn service_access_counters(&self) -> Result<(), SvmError> {
        let _serial = self.shared.service_lock.lock();
        self.access_counters_locked()
    }

    fn access_counters_locked(&self) -> Result<(), SvmError> {
        if !self.device.is_online() {
            self.notifications.lock().clear();
            return Err(SvmError::Offline);
        }
        let blocks = {
            let mut n = self.notifications.lock();
            self.notified
                .store(false, std::sync::atomic::Ordering::Relaxed);
            std::mem::take(&mut *n)
        };
        if blocks.is_empty() {
            return Ok(());
        }
        let mm = self.mm()?;
        for block in blocks {
            let ranges: Vec<SvmRange> = {
                let st = self.shared.state.read();
                st.gpt.clear_remote(block);
                let first = block * PMD_NR;
                st.ranges
                    .range(first..first + PMD_NR)
                    .map(|(_, r)| *r)
                    .filter(|r| !r.is_dead())
                    .collect()
            };
            for range in ranges {
                let Some((migratable, vm_write)) = vma_traits(&mm, range.start) else {
                    continue;
                };
                let rf = RangeFaults {
                    range,
                    access: Access::Read,
                    faulted: range_mask(range),
                    written: BlockMask::EMPTY,
                    migratable,
                    vm_write,
                };
                // A range that no longer fits is left to the next fault in it.
                if self.make_resident(&mm, &rf, Cause::AccessCounter)? == Mapped::Stale {
                    self.mark_stale(range);
                }
            }
        }
        Ok(())
    }

    /// Migrates `[addr, addr + len)` to the device and maps it, as the driver would for
    /// `cudaMemPrefetchAsync` (Xe's VM_BIND prefetch): every range over it is created if
    /// needed and its pages in the span moved, whatever the migration policy says (the
    /// prefetch is the decision); counted as prefetched pages. Memory that cannot migrate
    /// (shared, file-backed) is mapped where it is.
    ///
    /// Errors: `Inval` for a bad span, `Fatal` for a page no VMA maps, `Exited`, `NoMem`.
    pub fn prefetch(&self, addr: VirtAddr, len: u64) -> Result<(), SvmError> {
        let span = user_range(addr, len)?;
        let _serial = self.shared.service_lock.lock();
        if !self.device.is_online() {
            return Err(SvmError::Offline);
        }
        let mm = self.mm()?;
        let mut at = span.start();
        while at < span.end() {
            let (range, migratable, vm_write) = loop {
                let found = {
                    let mmap = mm.mmap_read();
                    let vma = mmap.vma_lookup(at).ok_or(SvmError::Fatal {
                        addr: at,
                        why: "no VMA",
                    })?;
                    let traits = traits_of(vma);
                    self.range_for(at, vma.range())
                        .map(|r| (r, traits.0, traits.1))
                };
                match found {
                    Some(r) => break r,
                    // A dead range in the way: collect it, then look again.
                    None => self.collect_garbage(&mm),
                }
            };
            let part = range
                .range()
                .intersect(&span)
                .expect("the range holds `at`");
            let want = span_mask(range, part);
            if migratable {
                let moved = self.migrate_region(&mm, range, Access::Read, want, vm_write)?;
                add(&self.shared.counters.prefetched_pages, moved.count() as u64);
            }
            if self.get_pages(&mm, range, want, BlockMask::EMPTY)? == Mapped::Stale {
                // The range no longer fits: drop it and make the span's pages again.
                self.mark_stale(range);
                self.collect_garbage(&mm);
                continue;
            }
            at = part.end();
        }
        Ok(())
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
        let mut todo: Vec<RangeFaults> = Vec::new();
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
                        // A dead range in the way: left for the replay, after the
                        // garbage collector of the next batch.
                        let Some(range) = self.range_for(f.addr, v.range()) else {
                            continue;
                        };
                        let page = page_in_block(f.vpn());
                        let i = match todo.iter().position(|t| t.range.start == range.start) {
                            Some(i) => i,
                            None => {
                                let (migratable, vm_write) = traits_of(v);
                                todo.push(RangeFaults {
                                    range,
                                    access: Access::Read,
                                    faulted: BlockMask::EMPTY,
                                    written: BlockMask::EMPTY,
                                    migratable,
                                    vm_write,
                                });
                                todo.len() - 1
                            }
                        };
                        let t = &mut todo[i];
                        t.access = t.access.max(f.access);
                        t.faulted.set(page);
                        if f.access == Access::Write {
                            t.written.set(page);
                        }
                        None
                    }
                };
                if let Some(why) = why {
                    self.cancel(f, why, report);
                }
            }
        }
        for t in todo {
            Counters::by_size(&c.faults_by_size, t.range.size, 1);
            if self.make_resident(mm, &t, Cause::Fault)? == Mapped::Stale {
                // The faults replay once the garbage collector has dropped the range and
                // the next fault makes one that fits what the CPU maps now.
                self.mark_stale(t.range);
            }
        }
        Ok(())
    }

    /// Flags `range` for the garbage collector: it no longer fits the CPU's mappings.
    fn mark_stale(&self, range: SvmRange) {
        let mut st = self.shared.state.write();
        let first = range.vpns().0;
        if let Some(r) = st.ranges.get_mut(&first).filter(|r| !r.is_dead()) {
            r.stale = true;
            st.gc.push(first);
        }
    }

    /// UVM's "make resident" for one range: place it (policy, advice; memory that cannot
    /// migrate stays in system memory); for the device, migrate the prefetch region around
    /// the faulted pages except those the thrashing detector holds, and map that region;
    /// for system memory, map the whole range remotely.
    fn make_resident(&self, mm: &Mm, t: &RangeFaults, cause: Cause) -> Result<Mapped, SvmError> {
        let range = t.range;
        let all = range_mask(range);
        let (resident, advice) = {
            let st = self.shared.state.read();
            (resident_mask(&st, range), st.advice_for(&range.range()))
        };
        let q = PlacementQuery {
            range: range.range(),
            size: range.size,
            access: t.access,
            cause,
            advice,
            vram_free_pages: self.device.vram_pages_free(),
        };
        let place = if t.migratable {
            self.migration.place(&q)
        } else {
            Placement::System
        };
        tracing::trace!(
            target: "hmm_svm::fault",
            start = %format_args!("{:#x}", range.start.as_u64()),
            size = ?range.size,
            cause = ?cause,
            placement = ?place,
            "make resident"
        );
        let map = match place {
            Placement::System => all,
            Placement::Device => {
                let region = self
                    .prefetch
                    .region(&BlockView {
                        resident,
                        faulted: t.faulted,
                        range: all,
                    })
                    .or(&t.faulted.and(&all));
                let want = region.minus(&resident);
                let migrated = self.migrate_region(mm, range, t.access, want, t.vm_write)?;
                let extra = migrated.minus(&t.faulted).count() as u64;
                add(&self.shared.counters.prefetched_pages, extra);
                region
            }
        };
        self.get_pages(mm, range, map, t.written)
    }

    /// Migrates the pages of `want` (within `range`'s block) to the device, run by run,
    /// after making room; pages the thrashing detector holds stay where they are. Returns
    /// the pages that moved.
    fn migrate_region(
        &self,
        mm: &Mm,
        range: SvmRange,
        access: Access,
        want: BlockMask,
        vm_write: bool,
    ) -> Result<BlockMask, SvmError> {
        let base = block_base(range);
        let held = self.shared.held(
            (0..PMD_NR as usize)
                .filter(|&p| want.get(p))
                .map(|p| base + p as u64),
        );
        let mut want = want;
        if !held.is_empty() {
            let mut h = BlockMask::EMPTY;
            held.iter().for_each(|&v| h.set(page_in_block(v)));
            add(&self.shared.counters.thrash_held_pages, h.count() as u64);
            want = want.minus(&h);
        }
        let mut moved = BlockMask::EMPTY;
        if want.is_empty() {
            return Ok(moved);
        }
        // Room first, with no lock held and no page collected (UVM preallocates its
        // chunks for the same reason): eviction takes folio locks and mmap locks of its
        // own. Without room, what does not fit stays and is mapped remotely.
        self.device.make_room(want.count() as u64);
        for (s, e) in want.runs() {
            let start = VirtAddr::new((base + s as u64) << PAGE_SHIFT);
            let end = VirtAddr::new((base + e as u64) << PAGE_SHIFT);
            let run = VaRange::new(start, end).expect("a run");
            let unit = range.size == GpuPageSize::Size2M && e - s == PMD_NR as usize;
            for i in self.migrate_run(mm, run, access, unit, vm_write)? {
                moved.set(s + i);
            }
        }
        self.shared.migrated(
            (0..PMD_NR as usize)
                .filter(|&p| moved.get(p))
                .map(|p| base + p as u64),
        );
        if !moved.is_empty() {
            Counters::by_size(&self.shared.counters.migrations_by_size, range.size, 1);
        }
        Ok(moved)
    }

    /// Moves `run` to device memory: its system pages in one walk
    /// ([`migrate_system_run`](Self::migrate_system_run)), then the pages a peer of the
    /// group holds, by the VM's [`PeerPolicy`]. Returns the indexes (in the run) of the
    /// pages that moved.
    fn migrate_run(
        &self,
        mm: &Mm,
        run: VaRange,
        access: Access,
        unit: bool,
        vm_write: bool,
    ) -> Result<Vec<usize>, SvmError> {
        let (mut moved, peers) = self.migrate_system_run(mm, run, access, unit, vm_write)?;
        if self.peer == PeerPolicy::RemoteMap {
            return Ok(moved);
        }
        for (s, e) in peers {
            let sub = VaRange::new(
                run.start()
                    .checked_add((s as u64) << PAGE_SHIFT)
                    .expect("in the run"),
                run.start()
                    .checked_add((e as u64) << PAGE_SHIFT)
                    .expect("in the run"),
            )
            .expect("a run of pages");
            let sub_unit = unit && s == 0 && e as u64 == run.npages();
            let taken = match self.peer {
                PeerPolicy::SourceCopy => self.migrate_from_peers(mm, sub, sub_unit, vm_write)?,
                PeerPolicy::Bounce => {
                    self.bounce_from_peers(mm, sub, sub_unit);
                    self.migrate_system_run(mm, sub, access, sub_unit, vm_write)?
                        .0
                }
                PeerPolicy::RemoteMap => unreachable!("returned above"),
            };
            moved.extend(taken.into_iter().map(|i| s + i));
        }
        moved.sort_unstable();
        Ok(moved)
    }

    /// Moves `run`'s system pages to device memory in one walk: faults in what is missing
    /// and collects every system page (as one unit when `unit`), zaps the GPU entries of
    /// what it collected in every VM of this device's group on this address space, copies
    /// to device pages, commits. Returns the indexes (in the run) of the pages that moved,
    /// and the runs of indexes whose pages a peer holds (the walk hands them over as they
    /// are: they carry the group's owner).
    fn migrate_system_run(
        &self,
        mm: &Mm,
        run: VaRange,
        access: Access,
        unit: bool,
        vm_write: bool,
    ) -> Result<(Vec<usize>, Vec<Run>), SvmError> {
        let window = self.ensure_window(mm, run.start())?;
        let mut pfns = vec![HmmPfn::default(); run.npages() as usize];
        let mut flags = HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_MIGRATE;
        if access == Access::Write {
            flags |= HmmPfnFlags::REQ_WRITE;
        }
        let mut select = MigrateVmaFlags::SELECT_SYSTEM;
        if unit {
            select |= MigrateVmaFlags::SELECT_COMPOUND;
        }
        // A migrating walk checks no sequence; the words it returns are not mirrored.
        let seq = window.read_begin();
        let mmap = mm.mmap_read();
        let mut r = HmmRange {
            notifier: &window,
            notifier_seq: seq,
            start: run.start(),
            end: run.end(),
            hmm_pfns: &mut pfns,
            default_flags: flags,
            pfn_flags_mask: HmmPfnFlags::empty(),
            dev_private_owner: Some(self.device.owner()),
        };
        let collected = match hmm_range_fault_migrate(&mmap, &mut r, select) {
            Ok(c) => c,
            Err(HmmError::NoMem { .. }) => return Err(SvmError::NoMem),
            // What cannot migrate (no VMA any more, a VMA that cannot migrate, a page
            // that cannot be faulted) is left to get_pages, which maps it or finds the
            // range stale.
            Err(_) => return Ok((Vec::new(), Vec::new())),
        };
        let mut m = migrate_hmm_range_setup(collected);
        for vm in self.device.vms_of(mm.id()) {
            zap_sources(&vm, &m);
        }
        let fill = copy_to_vram(&mut m, &self.device, vm_write, Sources::System);
        let pages = m.pages();
        let moved = migrating(pages.src());
        let out = pages.finalize();
        drop(mmap);
        self.device.migration_done(&fill.frames);
        let c = &self.shared.counters;
        add(&c.vram_alloc_failures, fill.failed);
        add(&c.pages_h2d, out.migrated);
        tracing::debug!(
            target: "hmm_svm::migrate",
            start = %format_args!("{:#x}", run.start().as_u64()),
            pages = out.migrated,
            failed = fill.failed,
            "to device"
        );
        // The pages not collected that a peer holds, in runs.
        let phys = self.device.phys();
        let mut peers: Vec<Run> = Vec::new();
        for (i, p) in pfns.iter().enumerate() {
            let held = p.is_valid()
                && !p.is_migrating()
                && self.device.peer_of(&phys.frame_nr(p.frame_nr())).is_some();
            match peers.last_mut() {
                Some((_, e)) if held && *e == i => *e = i + 1,
                _ if held => peers.push((i, i + 1)),
                _ => {}
            }
        }
        Ok((moved, peers))
    }

    /// Moves the pages of `run` that peers hold to this device directly, each peer
    /// copying its own (Xe's source-side peer migration): one `migrate_vma` with the
    /// group's owner and `SELECT_DEVICE_PRIVATE`, the group's GPU entries of what it
    /// collected zapped first. This device's own pages, collected too, stay where they are.
    /// Returns the indexes (in the run) of the pages that moved.
    fn migrate_from_peers(
        &self,
        mm: &Mm,
        run: VaRange,
        unit: bool,
        vm_write: bool,
    ) -> Result<Vec<usize>, SvmError> {
        let mmap = mm.mmap_read();
        let Some(mut m) = self.collect_peers(&mmap, run, unit) else {
            return Ok(Vec::new());
        };
        let fill = copy_to_vram(&mut m, &self.device, vm_write, Sources::Peers);
        let pages = m.pages();
        let from = by_peer(pages.src(), &self.device);
        let moved = migrating(pages.src());
        pages.finalize();
        drop(mmap);
        self.device.migration_done(&fill.frames);
        add(&self.shared.counters.vram_alloc_failures, fill.failed);
        for (peer, n) in from {
            tracing::debug!(target: "hmm_svm::migrate", from = peer, pages = n, "from a peer");
            self.device.received_from_peer(peer, n);
        }
        Ok(moved)
    }

    /// Moves the pages of `run` that peers hold to system memory, each peer copying its
    /// own: the first half of a bounce (amdkfd's VRAM to VRAM through RAM). Out of system
    /// memory, what found no room stays on the peer, and `get_pages` maps it there.
    fn bounce_from_peers(&self, mm: &Mm, run: VaRange, unit: bool) {
        let mmap = mm.mmap_read();
        let Some(mut m) = self.collect_peers(&mmap, run, unit) else {
            return;
        };
        let device = &self.device;
        let _ = copy_to_system(&mut m, mm.phys(), &|f| device.peer_of(f).is_some());
        let pages = m.pages();
        let from = by_peer(pages.src(), device);
        pages.finalize();
        for (peer, n) in from {
            tracing::debug!(target: "hmm_svm::migrate", from = peer, pages = n, "bounced home");
            device.bounced_from_peer(peer, n);
        }
    }

    /// Collects the device-private pages of `run` that carry the group's owner (as one
    /// unit when `unit`) and zaps the group's GPU entries of what it collected; `None`
    /// when the range cannot be collected any more (the fault path finds out later).
    fn collect_peers<'g, 'a>(
        &self,
        mmap: &'g hmm::mm::MmapReadGuard<'a>,
        run: VaRange,
        unit: bool,
    ) -> Option<hmm::migrate::Migration<'g, 'a>> {
        let mut flags = MigrateVmaFlags::SELECT_DEVICE_PRIVATE;
        if unit {
            flags |= MigrateVmaFlags::SELECT_COMPOUND;
        }
        let args = MigrateVma {
            start: run.start(),
            end: run.end(),
            pgmap_owner: Some(self.device.owner()),
            flags,
            fault_page: None,
        };
        let m = migrate_vma_setup(mmap, args).ok()?;
        for vm in self.device.vms_of(mmap.mm().id()) {
            zap_sources(&vm, &m);
        }
        Some(m)
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
    /// does; `None` while an UNMAP left a dead range there that the garbage collector has
    /// not removed yet (the fault is replayed, and the next batch collects it first).
    fn range_for(&self, addr: VirtAddr, vma: VaRange) -> Option<SvmRange> {
        let vpn = addr.as_u64() >> PAGE_SHIFT;
        let mut st = self.shared.state.write();
        if let Some(r) = find(&st.ranges, vpn) {
            return (!r.is_dead()).then_some(r);
        }
        let r = choose_chunk(addr, vma, &st.ranges)
            .expect("a page inside a VMA and in no range fits at least a 4 KiB chunk");
        st.ranges.insert(r.vpns().0, r);
        add(&self.shared.counters.ranges_created, 1);
        Some(r)
    }

    /// drm_gpusvm's `get_pages` and the bind: `hmm_range_fault` over the pages of `map`
    /// (write requested for those in `written`; this device's pages as they are,
    /// everything else faulted to system memory) under the window's sequence, then under
    /// the notifier lock, if no invalidation came in between and the range is still
    /// alive, GPU entries for them. `Stale` when the range no longer fits the CPU's
    /// mappings (a VMA under it went or changed).
    fn get_pages(
        &self,
        mm: &Mm,
        range: SvmRange,
        map: BlockMask,
        written: BlockMask,
    ) -> Result<Mapped, SvmError> {
        let window = self.ensure_window(mm, range.start)?;
        let n = range.size.pages() as usize;
        let offset = page_in_block(range.vpns().0);
        let request = |i: usize| {
            if !map.get(offset + i) {
                HmmPfn::default()
            } else if written.get(offset + i) {
                HmmPfn::request(HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE)
            } else {
                HmmPfn::request(HmmPfnFlags::REQ_FAULT)
            }
        };
        let mut pfns: Vec<HmmPfn> = (0..n).map(request).collect();
        // TIMEOUT: the kernel's HMM_RANGE_DEFAULT_TIMEOUT budget for collisions.
        let deadline = Instant::now().checked_add(HMM_RANGE_DEFAULT_TIMEOUT);
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(SvmError::Busy { addr: range.start });
            }
            let seq = window.read_begin();
            for (i, p) in pfns.iter_mut().enumerate() {
                *p = request(i);
            }
            let mut r = HmmRange {
                notifier: &window,
                notifier_seq: seq,
                start: range.start,
                end: range.range().end(),
                hmm_pfns: &mut pfns,
                default_flags: HmmPfnFlags::empty(),
                pfn_flags_mask: HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE,
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
                Err(HmmError::Fault { .. })
                | Err(HmmError::Perm { .. })
                | Err(HmmError::Range { .. })
                | Err(HmmError::Inval { .. })
                | Err(HmmError::Interrupted) => return Ok(Mapped::Stale),
            }
            let mut st = self.shared.state.write();
            if window.read_retry(seq) {
                continue;
            }
            if st.ranges.get(&range.vpns().0) != Some(&range) {
                // Dropped or flagged meanwhile: nothing to bind to.
                return Ok(Mapped::Stale);
            }
            self.bind(&mut st, range, &pfns, &|i| map.get(offset + i));
            return Ok(Mapped::Yes);
        }
    }

    /// Writes the GPU entries of the pages of `range` that `wanted` names from `pfns`
    /// (each of them valid), with the largest entry size each run allows: 2 MiB for a
    /// whole range of one contiguous, aligned folio with one location and permission, else
    /// 64 KiB per such aligned 16 pages, else 4 KiB.
    fn bind(
        &self,
        st: &mut VmState,
        range: SvmRange,
        pfns: &[HmmPfn],
        wanted: &dyn Fn(usize) -> bool,
    ) {
        let phys = self.device.phys();
        let (first, _) = range.vpns();
        let ptes: Vec<Option<GpuPte>> = pfns
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (wanted(i) && p.is_valid()).then(|| {
                    let frame = phys.frame_nr(p.frame_nr());
                    GpuPte {
                        frame_nr: p.frame_nr(),
                        writable: p.is_writable(),
                        location: if self.device.owns(&frame) {
                            Location::Vram
                        } else if self.device.peer_of(&frame).is_some() {
                            Location::Peer
                        } else {
                            Location::System
                        },
                        size: GpuPageSize::Size4K,
                    }
                })
            })
            .collect();
        let c = &self.shared.counters;
        let mut i = 0;
        while i < ptes.len() {
            let Some(head) = ptes[i] else {
                i += 1;
                continue;
            };
            let size = [GpuPageSize::Size2M, GpuPageSize::Size64K]
                .into_iter()
                .find(|s| fits(&ptes[i..], first + i as u64, *s))
                .unwrap_or(GpuPageSize::Size4K);
            let n = size.pages() as usize;
            for (k, pte) in ptes[i..i + n].iter().enumerate() {
                let pte = pte.expect("a run of valid entries");
                st.gpt.set(first + (i + k) as u64, GpuPte { size, ..pte });
                st.fatal.remove(&(first + (i + k) as u64));
            }
            match head.location {
                Location::Vram => {
                    add(&c.local_mapped_pages, n as u64);
                    self.device.used(head.frame_nr);
                }
                Location::Peer => add(&c.peer_mapped_pages, n as u64),
                Location::System => add(&c.remote_mapped_pages, n as u64),
            }
            Counters::by_size(&c.binds_by_size, size, 1);
            i += n;
        }
    }

    /// The garbage collector (`drm_gpusvm_range_remove` from Xe's GC worker): ranges
    /// an UNMAP covered, or found stale, are dropped; a range an UNMAP covered in part
    /// first has its remaining device pages moved to system memory, then its GPU entries
    /// are zapped and the range dropped.
    pub(crate) fn collect_garbage(&self, mm: &Mm) {
        let gc: Vec<SvmRange> = {
            let mut st = self.shared.state.write();
            let keys = std::mem::take(&mut st.gc);
            keys.into_iter()
                .filter_map(|k| st.ranges.get(&k).copied())
                .filter(SvmRange::is_dead)
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
    }

    /// Moves this device's pages of what is still mapped of `range` to system memory
    /// (MIGRATE events with this device's owner; the GPU entries of the pages taken are
    /// zapped first, in every VM of the device on this address space).
    fn evict_range(&self, mm: &Mm, range: SvmRange) {
        let mmap = mm.mmap_read();
        let r = range.range();
        let mut at = r.start();
        while at < r.end() {
            let Some(vma) = mmap.vma_lookup(at) else {
                at = at.checked_add(PAGE_SIZE).expect("inside the range");
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
                // Gathered once the pages are collected (a VM made meanwhile may map them).
                for vm in self.device.vms_of(mm.id()) {
                    zap_sources(&vm, &m);
                }
                // Out of system memory: what had no destination stays on the device.
                // Peers' pages, collected with the group's owner, stay where they are.
                let device = &self.device;
                let _ = copy_to_system(&mut m, mm.phys(), &|f| device.owns(f));
                let out = m.pages().finalize();
                add(&self.shared.counters.pages_d2h, out.migrated);
            }
            at = end;
        }
    }
}

/// Whether a VMA's pages may migrate (private anonymous memory: Xe migrates nothing
/// else, and `migrate_vma_pages` would put shared and file pages back) and whether it is
/// writable.
fn traits_of(vma: &hmm::mm::Vma) -> (bool, bool) {
    let f = vma.flags();
    let migratable =
        vma.is_anonymous() && !f.intersects(VmFlags::SHARED | VmFlags::HUGETLB | VmFlags::MIXEDMAP);
    (migratable, f.contains(VmFlags::WRITE))
}

/// [`traits_of`] the VMA at `addr`, if any.
fn vma_traits(mm: &Mm, addr: VirtAddr) -> Option<(bool, bool)> {
    let mmap = mm.mmap_read();
    mmap.vma_lookup(addr).map(traits_of)
}

/// The first virtual page number of `range`'s 2 MiB block.
fn block_base(range: SvmRange) -> u64 {
    (range.start.as_u64() >> PMD_SHIFT) * PMD_NR
}

/// Page `vpn`'s index in its 2 MiB block.
fn page_in_block(vpn: u64) -> usize {
    // CAST: below 512.
    (vpn % PMD_NR) as usize
}

/// The indexes of the entries of `words` that are migrating (a migration past `pages()`).
fn migrating(words: &[hmm::migrate::MigratePfn]) -> Vec<usize> {
    let mut moved = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let n = words[i].npages() as usize;
        if words[i].is_migrating() {
            moved.extend(i..i + n);
        }
        i += n;
    }
    moved
}

/// The pages of its block `range` covers.
fn range_mask(range: SvmRange) -> BlockMask {
    span_mask(range, range.range())
}

/// The pages of `range`'s block that `span` (inside the block) covers.
fn span_mask(range: SvmRange, span: VaRange) -> BlockMask {
    let base = block_base(range);
    let s = (span.start().as_u64() >> PAGE_SHIFT) - base;
    let e = (span.end().as_u64() >> PAGE_SHIFT) - base;
    // CAST: both within the block, at most 512.
    BlockMask::range(s as usize, e as usize)
}

/// The pages of `range` the GPU maps in its own memory.
fn resident_mask(st: &VmState, range: SvmRange) -> BlockMask {
    let (first, end) = range.vpns();
    let mut m = BlockMask::EMPTY;
    for vpn in first..end {
        if st
            .gpt
            .lookup(vpn)
            .is_some_and(|p| p.location == Location::Vram)
        {
            m.set(page_in_block(vpn));
        }
    }
    m
}

/// Whether `ptes` (from virtual page `vpn`) start a run that one entry of `size` can map:
/// `vpn` aligned, the run long enough and all present, one contiguous run of frames
/// aligned the same way, one location and one permission.
fn fits(ptes: &[Option<GpuPte>], vpn: u64, size: GpuPageSize) -> bool {
    let n = size.pages();
    let Some(run) = ptes.get(..n as usize) else {
        return false;
    };
    let Some(head) = run[0] else { return false };
    vpn % n == 0
        && head.frame_nr % n == 0
        && run.iter().enumerate().all(|(k, p)| {
            p.is_some_and(|p| {
                p.frame_nr == head.frame_nr + k as u64
                    && p.location == head.location
                    && p.writable == head.writable
            })
        })
}
