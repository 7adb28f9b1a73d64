//! A device driver of your own on hmm-rs: device-private memory with its own
//! `migrate_to_ram`, a buffer migrated to it with `migrate_vma`, and CPU accesses faulting
//! its pages back.
//!
//! ```text
//! cargo run -p hmm --example custom_driver
//! ```
//!
//! In kernel terms: [`memremap_pages`] registers the device's memory as a `dev_pagemap`
//! whose `dev_pagemap_ops` are the driver's ([`DevPagemapOps`]); `migrate_vma_setup`,
//! `migrate_vma_pages` and `migrate_vma_finalize` move a range into it; a CPU touching one
//! of its pages finds a device-private entry and calls the pagemap's `migrate_to_ram`,
//! which migrates the page home (with `fault_page` set) before the access is retried. See
//! `docs/writing-a-driver.md` for the walk-through.

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::migrate::{migrate_vma_setup, MigratePfnFlags, MigrateVma, MigrateVmaFlags};
use hmm::mm::{DeviceFault, MapFlags, Mm, Prot, SwapKind, VmFault};
use hmm::notifier::Owner;
use hmm::phys::{FrameFlags, PhysConfig, PhysMem};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

/// What the kernel calls on the device's memory (`struct dev_pagemap_ops`).
struct GpuOps {
    owner: Owner,
    cpu_faults: AtomicU64,
}

impl DevPagemapOps for GpuOps {
    /// A CPU touched one of our pages: migrate it home. The fault path holds the mmap lock
    /// for reading (`vmf.mmap()`) and has locked the page; `migrate_args` selects exactly
    /// it (or its 2 MiB unit) as one of our own device-private pages.
    fn migrate_to_ram(&self, vmf: &DeviceFault<'_>) -> Result<(), VmFault> {
        self.cpu_faults.fetch_add(1, Ordering::Relaxed);
        let phys = Arc::clone(vmf.mmap().mm().phys());
        let mut mig = migrate_vma_setup(vmf.mmap(), vmf.migrate_args(self.owner))
            .map_err(|_| VmFault::Sigbus)?;
        for i in 0..mig.src().len() {
            let w = mig.src()[i];
            let Some(src) = mig.src_page(i).filter(|_| w.is_migrating()) else {
                continue;
            };
            // A system page, locked, with the device page's bytes (the DMA in a real driver).
            let dst = phys
                .alloc(0, FrameFlags::empty())
                .map_err(|_| VmFault::Oom)?
                .lock();
            dst.copy_from(&src);
            let writable = w.flags().contains(MigratePfnFlags::WRITE);
            mig.set_dst(i, dst, writable)
                .expect("one destination per entry");
        }
        mig.pages().finalize();
        Ok(())
    }
}

/// The driver: its memory and its owner cookie.
struct Gpu {
    mem: Arc<DevPagemap>,
    ops: Arc<GpuOps>,
}

impl Gpu {
    /// Registers `bytes` of device-private memory (`devm_memremap_pages`).
    fn new(phys: &Arc<PhysMem>, bytes: u64) -> Result<Gpu, Box<dyn Error>> {
        let owner = Owner::new_unique();
        let ops = Arc::new(GpuOps {
            owner,
            cpu_faults: AtomicU64::new(0),
        });
        let config = PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner,
            size_bytes: bytes,
        };
        let mem = memremap_pages(phys, config, Arc::clone(&ops) as Arc<dyn DevPagemapOps>)?;
        Ok(Gpu { mem, ops })
    }

    /// Migrates `npages` at `start` of `mm` into device memory; returns the pages moved.
    fn migrate_to_device(
        &self,
        mm: &Mm,
        start: VirtAddr,
        npages: u64,
    ) -> Result<u64, Box<dyn Error>> {
        let mmap = mm.mmap_read();
        let mut mig = migrate_vma_setup(
            &mmap,
            MigrateVma {
                start,
                end: start + npages * PAGE_SIZE,
                // Carried by the MIGRATE invalidation, so our own mirror could skip it.
                pgmap_owner: Some(self.ops.owner),
                flags: MigrateVmaFlags::SELECT_SYSTEM,
                fault_page: None,
            },
        )?;
        for i in 0..mig.src().len() {
            if !mig.src()[i].is_migrating() {
                continue; // not selected: shared, pinned, locked by someone else...
            }
            let dst = self.mem.alloc(0, FrameFlags::empty())?;
            match mig.src_page(i) {
                Some(src) => dst.copy_from(&src),
                None => dst.zero(), // a hole or the zero page: a fresh zeroed page
            }
            mig.set_dst(i, dst, true)
                .expect("one destination per entry");
        }
        Ok(mig.pages().finalize().migrated)
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20))?;
    let gpu = Gpu::new(&phys, 16 << 20)?;
    let mm = Mm::new(Arc::clone(&phys));

    let npages = 256;
    let buf = mm.mmap(
        None,
        npages * PAGE_SIZE,
        Prot::READ | Prot::WRITE,
        MapFlags::PRIVATE,
    )?;
    let data: Vec<u64> = (0..npages * PAGE_SIZE / 8)
        .map(|i| i * 0x9e37_79b9)
        .collect();
    mm.write_slice(buf, &data)?;

    let moved = gpu.migrate_to_device(&mm, buf, npages)?;
    println!(
        "migrated {moved} pages to the device; it now holds {} pages",
        gpu.mem.nr_in_use()
    );
    assert_eq!(moved, npages);
    let on_device = mm
        .pagemap(buf, npages)?
        .iter()
        .filter(|e| e.swap == Some(SwapKind::DevicePrivate))
        .count();
    println!("the CPU page table has {on_device} device-private entries");
    assert_eq!(on_device as u64, npages);

    // One CPU load of page 7: a device-private entry, so the pagemap's migrate_to_ram.
    let before = mm.stats();
    let v: u64 = mm.read_val(buf + 7 * PAGE_SIZE)?;
    assert_eq!(v, data[(7 * PAGE_SIZE / 8) as usize]);
    let d = mm.stats().since(&before);
    println!(
        "one CPU read of page 7: {} device-private fault, {} call of migrate_to_ram, {} page moved home",
        d.faults.device_private,
        gpu.ops.cpu_faults.load(Ordering::Relaxed),
        d.migrate.pages_migrated
    );
    assert_eq!(d.faults.device_private, 1);
    assert_eq!(gpu.mem.nr_in_use(), npages - 1);

    // Reading the whole buffer brings every page home, one fault each; every byte checked.
    let mut back = vec![0u64; data.len()];
    mm.read_slice(buf, &mut back)?;
    assert_eq!(back, data);
    println!(
        "read back all {} bytes: {} CPU faults served by the driver, device memory in use: {} pages",
        npages * PAGE_SIZE,
        gpu.ops.cpu_faults.load(Ordering::Relaxed),
        gpu.mem.nr_in_use()
    );
    assert_eq!(gpu.mem.nr_in_use(), 0);
    println!("\nwhat it cost the process:\n{}", mm.stats());
    Ok(())
}
