//! A simulated GPU: its device memory (one device-private pagemap with the GPU's owner),
//! its configuration, its counters, and the `dev_pagemap_ops` the core calls when a CPU
//! touches one of its pages.
//!
//! Every VM of the device, and of every device of its [`PeerGroup`], shares the group's
//! owner, so every one of them skips the group's MIGRATE events; whoever migrates
//! therefore zaps the sources in **every** VM of the group bound to the address space
//! being migrated ([`GpuDevice::vms_of`]). Mappings of the same page in other address
//! spaces (after fork) are taken by the reverse map with CLEAR events, which their VMs do
//! not skip.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use hmm::addr::{PAGE_SHIFT, PMD_NR, PMD_SIZE};
use hmm::migrate::{migrate_device_range, migrate_vma_setup};
use hmm::mm::{DeviceFault, VmFault};
use hmm::notifier::{MmId, Owner};
use hmm::phys::MAX_SECTION_BYTES;
use hmm::phys::{FrameFlags, FrameRef, LockedFolio, PhysMem, Zone};
use hmm::sync::Mutex;
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

use crate::error::SvmError;
use crate::migrate::{copy_to_device, copy_to_system, zap_sources};
use crate::peer::PeerGroup;
use crate::policy::eviction::{EvictionPolicy, Lru};
use crate::stats::{add, Counters, SvmStats};
use crate::vm::VmShared;
use crate::vram::ChunkTracker;

/// Sizes and knobs of one GPU (the anchors' defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    /// Device memory in bytes (a multiple of 2 MiB).
    pub vram_bytes: u64,
    /// Entries of the fault buffer (1 to 2^20).
    pub fault_buffer_entries: usize,
    /// Faults serviced per batch (UVM: 256).
    pub batch_max: usize,
    /// Bytes covered by one interval notifier (drm_gpusvm: 512 MiB), a power of two of at
    /// least 2 MiB.
    pub notifier_bytes: u64,
    /// Where evicted chunks go.
    pub evict_to: EvictTarget,
}

/// Where the pages of an evicted chunk go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum EvictTarget {
    /// System memory (UVM, drm_pagemap's `evict_to_ram`).
    #[default]
    Host,
    /// A peer of the device's group with room for the whole chunk, copied there by this
    /// device; system memory when no peer has room.
    Peer,
}

/// What [`GpuDevice::offline`] moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct OfflineReport {
    /// Pages moved to system memory.
    pub pages_home: u64,
    /// Pages moved to peers.
    pub pages_to_peers: u64,
    /// GPU entries its VMs dropped.
    pub entries_dropped: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            vram_bytes: 64 << 20,
            fault_buffer_entries: 4096,
            batch_max: crate::fault::FAULT_BATCH_MAX,
            notifier_bytes: 512 << 20,
            evict_to: EvictTarget::Host,
        }
    }
}

/// One GPU.
pub struct GpuDevice {
    phys: Arc<PhysMem>,
    owner: Owner,
    group: Arc<PeerGroup>,
    vram: Arc<DevPagemap>,
    ops: Arc<DeviceOps>,
    eviction: Box<dyn EvictionPolicy>,
    config: GpuConfig,
}

/// The pagemap callbacks, and what they need: the registry of GPU VMs by id, the chunks.
pub(crate) struct DeviceOps {
    owner: Owner,
    group: Arc<PeerGroup>,
    vms: Mutex<HashMap<u64, (MmId, Weak<VmShared>)>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) chunks: ChunkTracker,
    /// Pages copied into this device from each peer, by the peer's pagemap id (a leaf
    /// lock).
    pub(crate) peer_in: Mutex<Vec<(u32, u64)>>,
    /// Cleared while the device is offline: its VMs refuse accesses and faults.
    online: AtomicBool,
}

static NEXT_VM_ID: AtomicU64 = AtomicU64::new(1);

/// What one chunk's eviction moved.
#[derive(Debug, Default)]
struct Evicted {
    home: u64,
    peers: u64,
    /// System memory ran out: pages stayed.
    out_of_memory: bool,
}

/// Passes over device memory that move nothing before [`GpuDevice::offline`] gives up.
const OFFLINE_IDLE_PASSES: u32 = 10_000;

/// The largest fault buffer a configuration may ask for.
const MAX_FAULT_BUFFER: usize = 1 << 20;

impl GpuDevice {
    /// A GPU on `phys` with `config`, its device memory registered as a device-private
    /// pagemap with a fresh owner (a group of its own).
    ///
    /// Errors: `Inval` for a device-memory size the pagemap refuses or a notifier size
    /// that is not a power of two of at least 2 MiB; `NoMem` when no section is left.
    pub fn new(phys: &Arc<PhysMem>, config: GpuConfig) -> Result<Arc<GpuDevice>, SvmError> {
        GpuDevice::with_eviction(phys, config, Box::new(Lru))
    }

    /// [`new`](Self::new) with an eviction policy (the default is [`Lru`]).
    pub fn with_eviction(
        phys: &Arc<PhysMem>,
        config: GpuConfig,
        eviction: Box<dyn EvictionPolicy>,
    ) -> Result<Arc<GpuDevice>, SvmError> {
        GpuDevice::in_group_with_eviction(phys, config, &PeerGroup::new(), eviction)
    }

    /// [`new`](Self::new), a member of `group`: its memory carries the group's owner.
    pub fn in_group(
        phys: &Arc<PhysMem>,
        config: GpuConfig,
        group: &Arc<PeerGroup>,
    ) -> Result<Arc<GpuDevice>, SvmError> {
        GpuDevice::in_group_with_eviction(phys, config, group, Box::new(Lru))
    }

    /// [`in_group`](Self::in_group) with an eviction policy.
    pub fn in_group_with_eviction(
        phys: &Arc<PhysMem>,
        config: GpuConfig,
        group: &Arc<PeerGroup>,
        eviction: Box<dyn EvictionPolicy>,
    ) -> Result<Arc<GpuDevice>, SvmError> {
        if !config.notifier_bytes.is_power_of_two() || config.notifier_bytes < PMD_SIZE {
            return Err(SvmError::Inval {
                what: "notifier size must be a power of two of at least 2 MiB",
            });
        }
        // Checked before anything is sized by them.
        if config.vram_bytes == 0
            || config.vram_bytes % PMD_SIZE != 0
            || config.vram_bytes > MAX_SECTION_BYTES
        {
            return Err(SvmError::Inval {
                what: "device memory must be a non-zero multiple of 2 MiB of at most 256 GiB",
            });
        }
        if !(1..=MAX_FAULT_BUFFER).contains(&config.fault_buffer_entries) {
            return Err(SvmError::Inval {
                what: "the fault buffer holds from 1 to 2^20 entries",
            });
        }
        if config.batch_max == 0 {
            return Err(SvmError::Inval {
                what: "a batch holds at least one fault",
            });
        }
        let owner = group.owner();
        let counters = Arc::new(Counters::default());
        // CAST: a pagemap is at most 256 GiB, 2^17 chunks.
        let nchunks = (config.vram_bytes / PMD_SIZE) as usize;
        let ops = Arc::new(DeviceOps {
            owner,
            group: Arc::clone(group),
            vms: Mutex::new(HashMap::new()),
            counters,
            chunks: ChunkTracker::new(nchunks),
            peer_in: Mutex::new(Vec::new()),
            online: AtomicBool::new(true),
        });
        let pagemap_ops: Arc<dyn DevPagemapOps> = ops.clone();
        let vram = memremap_pages(
            phys,
            PagemapConfig {
                kind: MemoryType::DevicePrivate,
                owner,
                size_bytes: config.vram_bytes,
            },
            pagemap_ops,
        )
        .map_err(|e| match e {
            hmm::zone_device::PagemapError::Inval { .. } => SvmError::Inval {
                what: "device memory must be a non-zero multiple of 2 MiB of at most 256 GiB",
            },
            _ => SvmError::NoMem,
        })?;
        ops.chunks.set_base(vram.frame(0).device_pfn().as_u64());
        let id = vram.id();
        let device = Arc::new(GpuDevice {
            phys: Arc::clone(phys),
            owner,
            group: Arc::clone(group),
            vram,
            ops: Arc::clone(&ops),
            eviction,
            config,
        });
        group.join(id, &ops, &device);
        Ok(device)
    }

    /// Whether the device is online (it is from its creation until
    /// [`offline`](Self::offline)).
    pub fn is_online(&self) -> bool {
        self.ops.online.load(Ordering::Acquire)
    }

    /// Takes the device away (hot unplug, driver unbind: the multi-device SVM RFC's
    /// revoke), while CPU threads and other devices go on using the same memory:
    ///
    /// 1. every access, fault service and prefetch of its VMs fails with `Offline` from
    ///    now on; each VM's service lock is taken to wait for those in flight, then all its
    ///    GPU entries and ranges are dropped;
    /// 2. every page of its memory moves out by [`migrate_device_range`] (each mapping
    ///    invalidated with CLEAR, so peers mapping a page over the link drop it): to a peer
    ///    of the group with room when `to` is [`EvictTarget::Peer`], else to system memory;
    /// 3. its pagemap is revoked (`memunmap_pages`): no frame of it is valid any more.
    ///
    /// Errors: `InUse` when pages kept being held by someone else (the device stays
    /// offline: call again); `NoMem` when system memory ran out (the pages that found no
    /// room stay, and the device stays offline). [`online`](Self::online) brings it back.
    pub fn offline(&self, to: EvictTarget) -> Result<OfflineReport, SvmError> {
        tracing::info!(target: "hmm_svm::device", pagemap = self.pagemap_id(), to = ?to, "offline");
        self.ops.online.store(false, Ordering::Release);
        let mut report = OfflineReport::default();
        let vms: Vec<Arc<VmShared>> = self
            .ops
            .vms
            .lock()
            .values()
            .filter_map(|(_, v)| v.upgrade())
            .collect();
        for vm in vms {
            let _serial = vm.service_lock.lock();
            let before = vm.counters.pages_invalidated.load(Ordering::Relaxed);
            vm.forget_all();
            report.entries_dropped +=
                vm.counters.pages_invalidated.load(Ordering::Relaxed) - before;
        }
        // Pages still held by a migration in flight (a peer collecting them, a CPU fault)
        // are waited for; a pass that moves nothing yields first. An allocation that passed
        // the online check just before the flag fell can still land a page: the pagemap is
        // retired only once it is empty.
        let mut idle = 0;
        loop {
            if self.vram.nr_in_use() == 0 {
                match self.vram.memunmap() {
                    Ok(()) => return Ok(report),
                    Err(_) => continue,
                }
            }
            let mut moved = 0;
            let mut oom = false;
            for chunk in self.ops.chunks.candidates(&[]) {
                let e = self.evict_chunk(chunk.index, to);
                report.pages_home += e.home;
                report.pages_to_peers += e.peers;
                moved += e.home + e.peers;
                oom |= e.out_of_memory;
            }
            if oom {
                return Err(SvmError::NoMem);
            }
            if moved > 0 {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle > OFFLINE_IDLE_PASSES {
                return Err(SvmError::InUse {
                    pages: self.vram.nr_in_use(),
                });
            }
            hmm::sync::yield_now();
        }
    }

    /// Brings an offline device back: its memory is registered again (the pagemap it
    /// had, all of it free) and its VMs fault again from nothing. Errors: `NoMem` when the
    /// pagemap cannot be had; `InUse` when the device was not taken offline completely
    /// (call [`offline`](Self::offline) again first). Online already: nothing to do.
    pub fn online(&self) -> Result<(), SvmError> {
        if self.is_online() {
            return Ok(());
        }
        if self.vram.is_live() {
            return Err(SvmError::InUse {
                pages: self.vram.nr_in_use(),
            });
        }
        let ops: Arc<dyn DevPagemapOps> = self.ops.clone();
        let again = memremap_pages(
            &self.phys,
            PagemapConfig {
                kind: MemoryType::DevicePrivate,
                owner: self.owner,
                size_bytes: self.config.vram_bytes,
            },
            ops,
        )
        .map_err(|_| SvmError::NoMem)?;
        debug_assert!(
            Arc::ptr_eq(&again, &self.vram),
            "the retired pagemap comes back"
        );
        tracing::info!(target: "hmm_svm::device", pagemap = self.pagemap_id(), "online");
        self.ops.online.store(true, Ordering::Release);
        Ok(())
    }

    /// The owner cookie of the GPU's memory (`pgmap->owner`): its group's.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The GPU's peer group.
    pub fn group(&self) -> &Arc<PeerGroup> {
        &self.group
    }

    /// The id of the GPU's device memory (its pagemap's, as [`Zone::DevicePrivate`]
    /// names it).
    pub fn pagemap_id(&self) -> u32 {
        self.vram.id()
    }

    /// Pages copied into this GPU's memory directly from each peer, by the peer's
    /// [`pagemap_id`](Self::pagemap_id), in the order the peers first sent any.
    pub fn peer_pages_in(&self) -> Vec<(u32, u64)> {
        self.ops.peer_in.lock().clone()
    }

    /// The machine.
    pub fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }

    /// The configuration.
    pub fn config(&self) -> &GpuConfig {
        &self.config
    }

    /// Device-memory pages in use.
    pub fn vram_pages_in_use(&self) -> u64 {
        self.vram.nr_in_use()
    }

    /// Device-memory pages in all.
    pub fn vram_pages(&self) -> u64 {
        self.vram.nr_frames()
    }

    /// Whether `frame` is this GPU's memory.
    pub fn owns(&self, frame: &FrameRef<'_>) -> bool {
        matches!(frame.zone(), Zone::DevicePrivate { pagemap } if pagemap == self.vram.id())
    }

    /// The pagemap id of the peer (another member of the group) whose memory `frame` is.
    pub(crate) fn peer_of(&self, frame: &FrameRef<'_>) -> Option<u32> {
        match frame.zone() {
            Zone::DevicePrivate { pagemap } if pagemap != self.vram.id() => {
                self.group.member(pagemap).is_some().then_some(pagemap)
            }
            _ => None,
        }
    }

    /// The counters of every VM on this GPU.
    pub fn stats(&self) -> SvmStats {
        self.ops.counters.snapshot()
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.ops.counters
    }

    /// Commits the host memory behind device memory now (a benchmark's set-up, so that
    /// the host's first touch is not timed).
    pub fn prefault(&self) {
        self.vram.prefault();
    }

    /// Pages this device's VMs have migrated home so far (CPU faults, evictions, ranges
    /// destroyed): one counter, cheaper than [`stats`](Self::stats).
    pub fn pages_d2h(&self) -> u64 {
        self.ops
            .counters
            .pages_d2h
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Device-memory pages free.
    pub fn vram_pages_free(&self) -> u64 {
        self.vram_pages() - self.vram_pages_in_use()
    }

    /// A device folio of `2^order` pages (0 or 9), locked; its chunk is busy until
    /// [`migration_done`](Self::migration_done) is called with its frame. None while the
    /// device is offline.
    pub(crate) fn alloc(&self, order: u32) -> Option<LockedFolio<'_>> {
        if !self.is_online() {
            return None;
        }
        let f = self.vram.alloc(order, FrameFlags::empty()).ok()?;
        self.ops
            .chunks
            .allocated(f.device_pfn().as_u64(), 1 << order);
        Some(f)
    }

    /// The migration that allocated the device frames `frames` finished.
    pub(crate) fn migration_done(&self, frames: &[u64]) {
        for &nr in frames {
            self.ops.chunks.done(nr);
        }
    }

    /// The GPU mapped the device frame `nr`.
    pub(crate) fn used(&self, nr: u64) {
        self.ops.chunks.used(nr);
    }

    /// Evicts chunks chosen by the eviction policy until `npages` pages of device memory
    /// are free, or no chunk gives anything more (every candidate tried once), as memory
    /// pressure from outside (another allocation of the device) would. Returns whether
    /// there is room now.
    pub fn reclaim(&self, npages: u64) -> bool {
        self.make_room(npages)
    }

    /// [`reclaim`](Self::reclaim), for a migration about to allocate.
    pub(crate) fn make_room(&self, npages: u64) -> bool {
        let mut tried = Vec::new();
        while self.vram_pages_free() < npages {
            let candidates = self.ops.chunks.candidates(&tried);
            if candidates.is_empty() {
                return false;
            }
            // A policy's answer is checked: one that is not a candidate ends the pass.
            let victim = self.eviction.victim(&candidates);
            if !candidates.iter().any(|c| c.index == victim) {
                return false;
            }
            tried.push(victim);
            self.evict_chunk(victim, self.config.evict_to);
        }
        true
    }

    /// Moves every in-use page of chunk `index` it can take out of device memory
    /// (`migrate_device_range`): to a peer with room for all of them when `to` says so and
    /// there is one, else to system memory.
    fn evict_chunk(&self, index: u32, to: EvictTarget) -> Evicted {
        let first = u64::from(index) * PMD_NR;
        let mut m = migrate_device_range(&self.phys, self.vram.frame(first), PMD_NR)
            .expect("a chunk lies inside its pagemap");
        let wanted: u64 = m
            .src()
            .iter()
            .filter(|w| w.is_migrating())
            .map(|w| w.npages())
            .sum();
        let peer = match to {
            EvictTarget::Peer if wanted > 0 => self.group.devices().into_iter().find(|d| {
                !std::ptr::eq(d.as_ref(), self) && d.is_online() && d.vram_pages_free() >= wanted
            }),
            _ => None,
        };
        let frames = peer
            .as_ref()
            .map_or_else(Vec::new, |p| copy_to_device(&mut m, p));
        // What the peer could not take (it filled meanwhile) goes home; out of system
        // memory, what had no destination stays on the device.
        let copied = copy_to_system(&mut m, &self.phys, &|_| true);
        let pages = m.pages();
        let to_peer = peer.as_ref().map_or(0, |p| {
            let phys = &self.phys;
            pages
                .src()
                .iter()
                .zip(pages.dst())
                .filter(|(w, d)| w.is_migrating() && !d.is_empty())
                .filter(|(_, d)| p.owns(&phys.frame_nr(d.frame_nr())))
                .map(|(w, _)| w.npages())
                .sum()
        });
        let moved = pages.finalize().migrated;
        if let Some(p) = &peer {
            p.migration_done(&frames);
            p.received_from_peer(self.pagemap_id(), to_peer);
        }
        let home = moved - to_peer;
        tracing::debug!(
            target: "hmm_svm::evict",
            pagemap = self.pagemap_id(),
            chunk = index,
            home,
            to_peer,
            "evict chunk"
        );
        let c = &self.ops.counters;
        if moved > 0 {
            add(&c.evictions, 1);
        }
        add(&c.evicted_pages, moved);
        add(&c.pages_d2h, home);
        Evicted {
            home,
            peers: to_peer,
            out_of_memory: copied.is_err(),
        }
    }

    /// Registers a VM of the address space `mm`; returns its id.
    pub(crate) fn register_vm(&self, mm: MmId, vm: Weak<VmShared>) -> u64 {
        let id = NEXT_VM_ID.fetch_add(1, Ordering::Relaxed);
        self.ops.vms.lock().insert(id, (mm, vm));
        id
    }

    /// Every live VM of this device's group bound to the address space `mm`: those a
    /// migration with the group's owner must zap itself.
    pub(crate) fn vms_of(&self, mm: MmId) -> Vec<Arc<VmShared>> {
        self.group.vms_of(mm)
    }

    /// `pages` came into this device's memory from the peer `from` (a pagemap id),
    /// copied by the peer: counted on both sides.
    pub(crate) fn received_from_peer(&self, from: u32, pages: u64) {
        if pages == 0 {
            return;
        }
        add(&self.ops.counters.pages_d2d_in, pages);
        if let Some(src) = self.group.member(from) {
            add(&src.counters.pages_d2d_out, pages);
        }
        let mut m = self.ops.peer_in.lock();
        match m.iter_mut().find(|(p, _)| *p == from) {
            Some((_, n)) => *n += pages,
            None => m.push((from, pages)),
        }
    }

    /// `pages` of the peer `from` (a pagemap id) went to system memory on their way to
    /// this device (the peer's copy engine moved them): counted as the peer's pages
    /// migrated home, and as this device's bounced pages.
    pub(crate) fn bounced_from_peer(&self, from: u32, pages: u64) {
        add(&self.ops.counters.pages_bounced, pages);
        if let Some(src) = self.group.member(from) {
            add(&src.counters.pages_d2h, pages);
        }
    }

    pub(crate) fn unregister_vm(&self, id: u64) {
        self.ops.vms.lock().remove(&id);
    }
}

impl DeviceOps {
    /// This device's own live VMs bound to `mm` (the group gathers its members').
    pub(crate) fn own_vms_of(&self, mm: MmId) -> Vec<Arc<VmShared>> {
        self.vms
            .lock()
            .values()
            .filter(|(m, _)| *m == mm)
            .filter_map(|(_, v)| v.upgrade())
            .collect()
    }
}

impl DevPagemapOps for DeviceOps {
    fn folio_free(&self, folio: FrameRef<'_>, order: u32) {
        self.chunks.freed(folio.device_pfn().as_u64(), 1 << order);
    }

    /// A CPU touched one of this GPU's pages: migrate the page (or, for a device-private
    /// PMD, its 2 MiB unit) back to system memory, zapping the GPU entries of every VM of
    /// this device's group on the faulting address space first (their notifiers skip the
    /// group's MIGRATE events, and a peer may map the page over its link).
    fn migrate_to_ram(&self, vmf: &DeviceFault<'_>) -> Result<(), VmFault> {
        let mm = vmf.mmap().mm();
        let phys = mm.phys();
        let args = vmf.migrate_args(self.owner);
        let first = args.start.as_u64() >> PAGE_SHIFT;
        let mut m = migrate_vma_setup(vmf.mmap(), args).map_err(|_| VmFault::Sigbus)?;
        // The VMs are gathered once the pages are collected: a VM made meanwhile may have
        // mapped them (its notifier skips the group's MIGRATE).
        let vms = self.group.vms_of(mm.id());
        vms.iter().for_each(|vm| zap_sources(vm, &m));
        let copied = copy_to_system(&mut m, phys, &|_| true);
        let out = m.pages().finalize();
        add(&self.counters.pages_d2h, out.migrated);
        tracing::debug!(
            target: "hmm_svm::migrate",
            start = %format_args!("{:#x}", first << PAGE_SHIFT),
            pages = out.migrated,
            "migrate_to_ram"
        );
        // A thrashing event for each page that came back.
        for vm in &vms {
            vm.migrated((first..).take(out.migrated as usize));
        }
        copied.map(|_| ()).map_err(|_| VmFault::Oom)
    }
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("owner", &self.owner)
            .field("vram_pages", &self.vram_pages())
            .field("vram_in_use", &self.vram_pages_in_use())
            .finish_non_exhaustive()
    }
}
