//! The simulated devices and their memory (`struct dmirror_device`, `struct
//! dmirror_chunk`).
//!
//! The driver has [`DMIRROR_NDEVICES`] devices: 0 and 1 with device-private memory, 2 and 3
//! with device-coherent memory (the kernel needs special-purpose RAM for those; here they
//! are simulated like the others). Each device has its own [`Owner`], so one device never
//! treats another's pages as its own. Device memory is a list of chunks, each a
//! [`DevPagemap`] of the device's kind and owner, created on demand up to a capacity; the
//! chunks' allocators are the free lists, and `folio_free` counts returned pages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use hmm::addr::PMD_ORDER;
use hmm::fault_inject::FaultAttr;
use hmm::migrate::{migrate_device_range, migrate_vma_setup};
use hmm::mm::{DeviceFault, VmFault};
use hmm::notifier::Owner;
use hmm::phys::{AllocError, FrameFlags, FrameRef, LockedFolio, PhysMem, Zone};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};
use parking_lot::Mutex;

use crate::migrate::{alloc_and_copy_to_system, alloc_locked, Copier, HANDED_ONCE};
use crate::mirror::Shared;
use crate::DmirrorError;

/// How long `release` keeps retrying pages that are busy (locked by a migration or a CPU
/// fault in progress) before it gives up with `Busy`.
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Number of devices (`DMIRROR_NDEVICES`).
pub const DMIRROR_NDEVICES: usize = 4;

/// Bytes per memory chunk by default (`DEVMEM_CHUNK_SIZE`, 256 MiB).
pub const DEVMEM_CHUNK_SIZE: u64 = 256 << 20;

/// How the driver's devices are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmirrorConfig {
    /// Bytes per memory chunk (a multiple of 2 MiB).
    pub chunk_bytes: u64,
    /// Chunks a device may create at most (its memory capacity is `chunk_bytes` times this).
    pub max_chunks: usize,
}

impl Default for DmirrorConfig {
    /// 256 MiB chunks, up to 4 per device (1 GiB of device memory each), committed lazily.
    fn default() -> Self {
        DmirrorConfig {
            chunk_bytes: DEVMEM_CHUNK_SIZE,
            max_chunks: 4,
        }
    }
}

/// The loaded driver: its devices on one machine (the `test_hmm` module). Dropping it
/// (module unload) evicts every device page back to system memory.
#[derive(Debug)]
pub struct DmirrorDriver {
    devices: Vec<Arc<DmirrorDevice>>,
}

impl Drop for DmirrorDriver {
    fn drop(&mut self) {
        for d in &self.devices {
            // A page a driver still holds cannot move; it stays where it is.
            let _ = d.release();
        }
    }
}

impl DmirrorDriver {
    /// Loads the driver on `phys` (`hmm_dmirror_init`): devices 0 and 1 device-private,
    /// 2 and 3 device-coherent, each with its own owner.
    pub fn new(phys: &Arc<PhysMem>, config: DmirrorConfig) -> DmirrorDriver {
        let devices = (0..DMIRROR_NDEVICES)
            .map(|minor| {
                let kind = if minor < 2 {
                    MemoryType::DevicePrivate
                } else {
                    MemoryType::DeviceCoherent
                };
                DmirrorDevice::new(phys, minor, kind, config)
            })
            .collect();
        DmirrorDriver { devices }
    }

    /// Device `minor` (`/dev/hmm_dmirror<minor>`).
    ///
    /// # Panics
    ///
    /// Panics if `minor` is not below [`DMIRROR_NDEVICES`].
    #[track_caller]
    pub fn device(&self, minor: usize) -> &Arc<DmirrorDevice> {
        &self.devices[minor]
    }

    /// All devices.
    pub fn devices(&self) -> &[Arc<DmirrorDevice>] {
        &self.devices
    }
}

/// One simulated device (`struct dmirror_device`).
pub struct DmirrorDevice {
    minor: usize,
    kind: MemoryType,
    owner: Owner,
    phys: Arc<PhysMem>,
    config: DmirrorConfig,
    /// The ids of the device's memory chunks (`devmem_chunks`, under `devmem_lock`); the
    /// machine owns the pagemaps.
    chunks: Mutex<Vec<u32>>,
    ops: Arc<DeviceOps>,
    /// Fault injection in front of [`alloc`](DmirrorDevice::alloc).
    fail_alloc: FaultAttr,
}

/// The pagemap ops of a device's chunks. They hold no strong reference to the machine
/// (which owns its pagemaps and, through them, these ops) and reach the mirrors weakly.
struct DeviceOps {
    owner: Owner,
    /// Open mirrors by id: a device page's `zone_device_data` names the mirror that
    /// migrated it (the kernel stores the `dmirror` pointer in the backing page).
    mirrors: Mutex<HashMap<u64, Weak<Shared>>>,
    /// Pages handed out (`calloc`).
    calloc: AtomicU64,
    /// Pages given back (`cfree`).
    cfree: AtomicU64,
}

impl DeviceOps {
    /// Every open mirror of the device.
    fn open_mirrors(&self) -> Vec<Arc<Shared>> {
        self.mirrors
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }
}

impl DevPagemapOps for DeviceOps {
    fn folio_free(&self, _folio: FrameRef<'_>, order: u32) {
        self.cfree.fetch_add(1 << order, Ordering::Relaxed);
    }

    /// `dmirror_devmem_fault`: migrate the faulting page back to system memory (the
    /// whole 2 MiB unit for a device-private PMD), erasing the entries of the mirror that
    /// migrated it.
    fn migrate_to_ram(&self, vmf: &DeviceFault<'_>) -> Result<(), VmFault> {
        let phys = vmf.mmap().mm().phys();
        let id = phys.device_frame(vmf.page()).meta().zone_device_data();
        let mirror = self.mirrors.lock().get(&id).and_then(Weak::upgrade);
        let open = self.open_mirrors();
        let mut m = migrate_vma_setup(vmf.mmap(), vmf.migrate_args(self.owner))
            .map_err(|_| VmFault::Sigbus)?;
        let pts: Vec<_> = open.iter().map(|s| &s.pt).collect();
        // The CPU reads the page as soon as the fault retries: cached stores.
        let copied = alloc_and_copy_to_system(&mut m, &pts, true, || {
            mirror.as_deref().is_some_and(Shared::take_fail_alloc)
        });
        if let (Some(s), Ok(c)) = (&mirror, copied) {
            s.count_copies(0, c.copied);
        }
        m.pages().finalize();
        copied.map(|_| ()).map_err(|_| VmFault::Oom)
    }
}

impl DmirrorDevice {
    fn new(
        phys: &Arc<PhysMem>,
        minor: usize,
        kind: MemoryType,
        config: DmirrorConfig,
    ) -> Arc<Self> {
        let owner = Owner::new_unique();
        let ops = Arc::new(DeviceOps {
            owner,
            mirrors: Mutex::new(HashMap::new()),
            calloc: AtomicU64::new(0),
            cfree: AtomicU64::new(0),
        });
        Arc::new(DmirrorDevice {
            minor,
            kind,
            owner,
            phys: Arc::clone(phys),
            config,
            chunks: Mutex::new(Vec::new()),
            ops,
            fail_alloc: FaultAttr::new(),
        })
    }

    /// Registers an open mirror, so faults on the device pages it migrated find it.
    pub(crate) fn register_mirror(&self, id: u64, mirror: Weak<Shared>) {
        self.ops.mirrors.lock().insert(id, mirror);
    }

    /// Every open mirror of the device (whose tables may map its pages).
    pub(crate) fn open_mirrors(&self) -> Vec<Arc<Shared>> {
        self.ops.open_mirrors()
    }

    /// Forgets a mirror that is closing.
    pub(crate) fn unregister_mirror(&self, id: u64) {
        self.ops.mirrors.lock().remove(&id);
    }

    /// The device number.
    pub fn minor(&self) -> usize {
        self.minor
    }

    /// Private or coherent memory.
    pub fn kind(&self) -> MemoryType {
        self.kind
    }

    /// The owner cookie of every chunk of this device (the kernel uses the
    /// `dmirror_device` pointer).
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The machine.
    pub fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }

    /// Whether `frame` is memory of this device.
    pub fn owns(&self, frame: &FrameRef<'_>) -> bool {
        match frame.zone() {
            Zone::DevicePrivate { pagemap } | Zone::DeviceCoherent { pagemap } => self
                .phys
                .pagemap(pagemap)
                .is_some_and(|p| p.owner() == self.owner),
            Zone::System => false,
        }
    }

    /// Allocates device memory: a folio of `2^order` pages (0 or 9), locked and referenced
    /// as `zone_device_folio_init` leaves it, from the first chunk with room, creating a
    /// chunk when none has (`dmirror_allocate_chunk`). Fails when the device is at its
    /// capacity, or when [`fail_alloc`](Self::fail_alloc) says so.
    pub fn alloc(&self, order: u32) -> Result<LockedFolio<'_>, AllocError> {
        if self.fail_alloc.should_fail() {
            return Err(AllocError { order });
        }
        let mut chunks = self.chunks.lock();
        for &id in chunks.iter() {
            if let Ok(f) = self.chunk(id).alloc(order, FrameFlags::empty()) {
                self.ops.calloc.fetch_add(1 << order, Ordering::Relaxed);
                return Ok(f);
            }
        }
        if chunks.len() >= self.config.max_chunks {
            return Err(AllocError { order });
        }
        let config = PagemapConfig {
            kind: self.kind,
            owner: self.owner,
            size_bytes: self.config.chunk_bytes,
        };
        let ops: Arc<dyn DevPagemapOps> = self.ops.clone();
        let id = memremap_pages(&self.phys, config, ops)
            .map_err(|_| AllocError { order })?
            .id();
        chunks.push(id);
        let f = self.chunk(id).alloc(order, FrameFlags::empty())?;
        self.ops.calloc.fetch_add(1 << order, Ordering::Relaxed);
        Ok(f)
    }

    /// Chunk `id`, borrowed from the machine that owns it.
    fn chunk(&self, id: u32) -> &DevPagemap {
        self.phys.pagemap(id).expect("a chunk of this device")
    }

    /// Evicts every page of every chunk back to system memory and retires the chunks
    /// (`dmirror_device_remove_chunks`): each chunk is migrated with
    /// `migrate_device_range` (every CPU mapping of its pages becomes a mapping of a
    /// system copy, wherever it is), then unregistered. Pages locked by a concurrent
    /// migration are retried; `Busy` if some page still cannot be moved after that (a
    /// driver holding its own reference). Counts start again from zero.
    #[doc(alias = "dmirror_device_remove_chunks")]
    pub fn release(&self) -> Result<u64, DmirrorError> {
        let mut chunks = self.chunks.lock();
        let mut evicted = 0;
        let deadline = std::time::Instant::now() + RELEASE_TIMEOUT;
        for &id in chunks.iter() {
            let chunk = self.chunk(id);
            while chunk.nr_in_use() != 0 {
                evicted += self.evict_chunk(chunk)?;
                if chunk.nr_in_use() == 0 {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    return Err(DmirrorError::Busy);
                }
                std::thread::yield_now();
            }
            chunk.memunmap().map_err(|_| DmirrorError::Busy)?;
        }
        chunks.clear();
        self.ops.calloc.store(0, Ordering::Relaxed);
        self.ops.cfree.store(0, Ordering::Relaxed);
        Ok(evicted)
    }

    /// One eviction pass over `chunk` (`dmirror_device_evict_chunk`): a device THP gets a
    /// system THP, or 512 pages if none can be had (the core then splits the device
    /// folio).
    fn evict_chunk(&self, chunk: &DevPagemap) -> Result<u64, DmirrorError> {
        let mut m = migrate_device_range(&self.phys, chunk.frame(0), chunk.nr_frames())
            .expect("a chunk's own frames");
        let alloc = |order| alloc_locked(&self.phys, order);
        let mut copier = Copier::default();
        let mut i = 0;
        while i < m.src().len() {
            let w = m.src()[i];
            let n = w.npages() as usize;
            if !w.is_migrating() {
                i += 1;
                continue;
            }
            if let Some(folio) = (n > 1).then(|| alloc(PMD_ORDER)).flatten() {
                copier.fill(*folio, m.src_page(i));
                m.set_dst(i, folio, true).expect(HANDED_ONCE);
            } else {
                for k in i..i + n {
                    let page = alloc(0).ok_or(DmirrorError::NoMem)?;
                    copier.fill(*page, m.src_page(k));
                    m.set_dst(k, page, true).expect(HANDED_ONCE);
                }
            }
            i += n;
        }
        copier.finish();
        Ok(m.pages().finalize().migrated)
    }

    /// The fault injection in front of the device's memory allocator: every device page a
    /// migration, a fault or an exclusive grant takes comes through
    /// [`alloc`](Self::alloc). (The per-mirror `FAIL_ALLOC` flag of the uapi fails one
    /// migration's allocation; this fails any, on any schedule.)
    pub fn fail_alloc(&self) -> &FaultAttr {
        &self.fail_alloc
    }

    /// Device pages handed out and given back so far (`calloc`, `cfree`).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.ops.calloc.load(Ordering::Relaxed),
            self.ops.cfree.load(Ordering::Relaxed),
        )
    }

    /// Pages of device memory in use now.
    pub fn nr_in_use(&self) -> u64 {
        self.chunks
            .lock()
            .iter()
            .map(|&id| self.chunk(id).nr_in_use())
            .sum()
    }

    /// Memory chunks created so far.
    pub fn nr_chunks(&self) -> usize {
        self.chunks.lock().len()
    }
}

impl std::fmt::Debug for DmirrorDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmirrorDevice")
            .field("minor", &self.minor)
            .field("kind", &self.kind)
            .field("owner", &self.owner)
            .field("chunks", &self.nr_chunks())
            .finish_non_exhaustive()
    }
}
