//! Model checks of the driver's protocols with [shuttle](https://docs.rs/shuttle), on
//! hmm's shuttle build (its locks and protocol atomics are shuttle's; so are the driver's
//! notifier lock and fault buffer, which use `hmm::sync`):
//!
//! 1. a GPU fault (service, migration to the device, bind, replay) against an eviction of
//!    the same chunk: the GPU's write and every byte survive, nothing stays locked or
//!    leaks, and the GPU never maps a frame the CPU does not map there;
//! 2. a GPU fault against a CPU invalidation of the same page (a CPU write that faults the
//!    page back from the device, and an `mprotect` round trip): both writes survive (the
//!    GPU's is refused, and writes nothing, when it faults while the page is read-only)
//!    and the GPU's entries stay coherent;
//! 3. a peer migration (a GPU taking pages straight from a peer of its group) against a
//!    CPU fault on the same page: the CPU's write and every byte survive, both GPUs stay
//!    coherent;
//! 4. a peer migration against the source device going offline: every byte survives, the
//!    source ends with no page, the destination stays coherent.
//!
//! Budget: `HMM_SHUTTLE_ITERS` schedules per scheduler (default 300):
//!
//! ```text
//! cargo test --release -p hmm-svm --features shuttle --test shuttle
//! ```

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::{
    EvictTarget, GpuConfig, GpuDevice, GpuVm, Location, PeerGroup, PeerPolicy, SvmError, VmPolicies,
};
use shuttle::scheduler::{PctScheduler, RandomScheduler, Scheduler};
use shuttle::{thread, Config, Runner};

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn iterations() -> usize {
    std::env::var("HMM_SHUTTLE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

fn run_with(scheduler: impl Scheduler + 'static, f: impl Fn() + Send + Sync + 'static) {
    let mut config = Config::new();
    config.silence_warnings = true;
    config.stack_size = 1 << 20;
    Runner::new(scheduler, config).run(f);
}

fn explore(f: impl Fn() + Send + Sync + Clone + 'static) {
    let n = iterations();
    run_with(RandomScheduler::new(n), f.clone());
    run_with(PctScheduler::new(3, n), f);
}

/// A GPU with one 2 MiB chunk of memory, a process with a 16-page buffer whose page `i`
/// starts with `i + 1`, already on the device.
struct World {
    phys: Arc<PhysMem>,
    gpu: Arc<GpuDevice>,
    mm: Arc<Mm>,
    vm: Arc<GpuVm>,
    a: VirtAddr,
}

const NPAGES: u64 = 16;

impl World {
    fn new() -> World {
        let phys = PhysMem::new(PhysConfig::with_size(8 << 20)).unwrap();
        let config = GpuConfig {
            vram_bytes: 2 << 20,
            fault_buffer_entries: 8,
            ..GpuConfig::default()
        };
        let gpu = GpuDevice::new(&phys, config).unwrap();
        let mm = Mm::new(Arc::clone(&phys));
        let vm = GpuVm::with_policies(&gpu, &mm, VmPolicies::plain());
        let a = mm
            .mmap(None, NPAGES * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
        for i in 0..NPAGES {
            mm.write_val(page(a, i), i + 1).unwrap();
        }
        let mut b = [0u8; 8];
        vm.read(a, &mut b).unwrap();
        World {
            phys,
            gpu,
            mm,
            vm,
            a,
        }
    }

    fn check_coherent(&self) {
        check_coherent(&self.mm, &self.vm, self.a);
    }

    fn teardown(self) {
        self.check_coherent();
        self.mm.audit().unwrap();
        let World {
            phys,
            gpu,
            mm,
            vm,
            a,
        } = self;
        mm.munmap(a, NPAGES * PAGE_SIZE).unwrap();
        drop(vm);
        drop(mm);
        assert_eq!(gpu.vram_pages_in_use(), 0, "a device frame leaked");
        drop(gpu);
        assert_eq!(phys.nr_in_use(), 0, "a system frame leaked");
    }
}

/// Every GPU entry of `vm` maps what the CPU maps at that address (the same frame, or a
/// device's page behind a device-private entry).
fn check_coherent(mm: &Mm, vm: &GpuVm, a: VirtAddr) {
    let cpu = mm.pagemap(a, NPAGES).unwrap();
    for (i, e) in cpu.iter().enumerate() {
        if let Some(p) = vm.lookup(page(a, i as u64)) {
            assert_eq!(
                e.pfn,
                Some(p.frame_nr),
                "page {i}: the GPU maps a stale frame"
            );
            if p.location != Location::System {
                assert!(
                    e.swap.is_some(),
                    "page {i}: device memory mapped but the CPU maps RAM"
                );
            }
        }
    }
}

fn page(base: VirtAddr, i: u64) -> VirtAddr {
    base.checked_add(i * PAGE_SIZE).unwrap()
}

#[test]
fn a_gpu_fault_against_an_eviction_of_its_chunk() {
    explore(|| {
        let w = Arc::new(World::new());
        let gpu_side = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                // Page 3 is on the device: a store hits, or faults if evicted meanwhile.
                w.vm.write(page(w.a, 3), &0xaaaa_u64.to_le_bytes()).unwrap();
                let mut b = [0u8; 8];
                w.vm.read(page(w.a, 9), &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), 10);
            })
        };
        // Pressure from outside: the whole chunk must go.
        w.gpu.reclaim(w.gpu.vram_pages());
        gpu_side.join().unwrap();
        let w = Arc::into_inner(w).expect("the threads are done");
        assert_eq!(w.mm.read_val::<u64>(page(w.a, 3)).unwrap(), 0xaaaa);
        for i in (0..NPAGES).filter(|&i| i != 3) {
            assert_eq!(
                w.mm.read_val::<u64>(page(w.a, i)).unwrap(),
                i + 1,
                "page {i}"
            );
        }
        w.teardown();
    });
}

#[test]
fn a_gpu_fault_against_a_cpu_invalidation_of_its_page() {
    explore(|| {
        let w = Arc::new(World::new());
        let gpu_side = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                match w.vm.write(page(w.a, 5), &0xbbbb_u64.to_le_bytes()) {
                    Ok(()) => true,
                    // A GPU write that faults while the page is read-only (between the
                    // two mprotects) is refused, as the kernel's -EPERM; it wrote nothing.
                    Err(SvmError::Fatal { why, .. }) if why.contains("read-only") => false,
                    Err(e) => panic!("the GPU write failed: {e:?}"),
                }
            })
        };
        // The CPU writes the second word of the same page (a fault from the device
        // page), then changes its protection back and forth (PROTECTION_VMA events).
        w.mm.write_val(page(w.a, 5).checked_add(8).unwrap(), 0xcccc_u64)
            .unwrap();
        w.mm.mprotect(page(w.a, 5), PAGE_SIZE, Prot::READ).unwrap();
        w.mm.mprotect(page(w.a, 5), PAGE_SIZE, RW).unwrap();
        let wrote = gpu_side.join().unwrap();
        let w = Arc::into_inner(w).expect("the threads are done");
        // Page 5 started with 6 (`World::new`).
        let want = if wrote { 0xbbbb } else { 6 };
        assert_eq!(w.mm.read_val::<u64>(page(w.a, 5)).unwrap(), want);
        assert_eq!(
            w.mm.read_val::<u64>(page(w.a, 5).checked_add(8).unwrap())
                .unwrap(),
            0xcccc
        );
        w.teardown();
    });
}

/// Two GPUs of one group, each with one chunk; a 16-page buffer whose page `i` starts with
/// `i + 1`, on the first GPU; the second takes pages straight from it.
struct Peers {
    phys: Arc<PhysMem>,
    gpus: [Arc<GpuDevice>; 2],
    mm: Arc<Mm>,
    vms: [Arc<GpuVm>; 2],
    a: VirtAddr,
}

impl Peers {
    fn new() -> Peers {
        let phys = PhysMem::new(PhysConfig::with_size(8 << 20)).unwrap();
        let group = PeerGroup::new();
        let config = GpuConfig {
            vram_bytes: 2 << 20,
            fault_buffer_entries: 8,
            ..GpuConfig::default()
        };
        let gpus = [0, 1].map(|_| GpuDevice::in_group(&phys, config, &group).unwrap());
        let mm = Mm::new(Arc::clone(&phys));
        let vms = [0, 1].map(|g| {
            let policies = VmPolicies {
                peer: PeerPolicy::SourceCopy,
                ..VmPolicies::plain()
            };
            GpuVm::with_policies(&gpus[g], &mm, policies)
        });
        let a = mm
            .mmap(None, NPAGES * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
        for i in 0..NPAGES {
            mm.write_val(page(a, i), i + 1).unwrap();
        }
        let mut b = [0u8; 8];
        vms[0].read(a, &mut b).unwrap();
        assert_eq!(gpus[0].vram_pages_in_use(), NPAGES);
        Peers {
            phys,
            gpus,
            mm,
            vms,
            a,
        }
    }

    fn teardown(self) {
        for vm in &self.vms {
            check_coherent(&self.mm, vm, self.a);
        }
        self.mm.audit().unwrap();
        let Peers {
            phys,
            gpus,
            mm,
            vms,
            a,
        } = self;
        mm.munmap(a, NPAGES * PAGE_SIZE).unwrap();
        drop(vms);
        drop(mm);
        for g in &gpus {
            assert_eq!(g.vram_pages_in_use(), 0, "a device frame leaked");
        }
        drop(gpus);
        assert_eq!(phys.nr_in_use(), 0, "a system frame leaked");
    }
}

#[test]
fn a_peer_migration_against_a_cpu_fault_on_its_page() {
    explore(|| {
        let w = Arc::new(Peers::new());
        let gpu_side = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                let mut b = [0u8; 8];
                w.vms[1].read(page(w.a, 3), &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), 4);
            })
        };
        // The CPU writes the second word of the same page: a fault on the device page,
        // wherever it is by then.
        w.mm.write_val(page(w.a, 3).checked_add(8).unwrap(), 0xcccc_u64)
            .unwrap();
        gpu_side.join().unwrap();
        let w = Arc::into_inner(w).expect("the threads are done");
        assert_eq!(
            w.mm.read_val::<u64>(page(w.a, 3).checked_add(8).unwrap())
                .unwrap(),
            0xcccc
        );
        for i in 0..NPAGES {
            assert_eq!(
                w.mm.read_val::<u64>(page(w.a, i)).unwrap(),
                i + 1,
                "page {i}"
            );
        }
        w.teardown();
    });
}

#[test]
fn a_peer_migration_against_the_source_going_offline() {
    explore(|| {
        let w = Arc::new(Peers::new());
        let gpu_side = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                let mut b = [0u8; 8];
                w.vms[1].read(page(w.a, 9), &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), 10);
            })
        };
        loop {
            match w.gpus[0].offline(EvictTarget::Host) {
                Ok(_) => break,
                Err(SvmError::InUse { .. }) => continue,
                Err(e) => panic!("offline: {e}"),
            }
        }
        assert_eq!(w.gpus[0].vram_pages_in_use(), 0);
        let mut b = [0u8; 8];
        assert_eq!(w.vms[0].read(w.a, &mut b), Err(SvmError::Offline));
        gpu_side.join().unwrap();
        let w = Arc::into_inner(w).expect("the threads are done");
        for i in 0..NPAGES {
            assert_eq!(
                w.mm.read_val::<u64>(page(w.a, i)).unwrap(),
                i + 1,
                "page {i}"
            );
        }
        w.gpus[0].online().unwrap();
        w.teardown();
    });
}
