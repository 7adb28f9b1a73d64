//! The SVM driver end to end: GPU faults, batches, ranges, migration on first touch, the
//! owner filter, CPU faults back, unmaps and the garbage collector, overflow of the fault
//! buffer, fatal faults. Every test checks bytes.

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::policy::RemoteMap;
use hmm_svm::{GpuConfig, GpuDevice, GpuPageSize, GpuVm, Location, SvmError, VmPolicies};

const RW: Prot = Prot::READ.union(Prot::WRITE);

struct Rig {
    phys: Arc<PhysMem>,
    gpu: Arc<GpuDevice>,
    mm: Arc<Mm>,
    vm: Arc<GpuVm>,
}

fn rig_with(vram_mib: u64, fault_buffer_entries: usize) -> Rig {
    let phys = PhysMem::new(PhysConfig::with_size(128 << 20)).unwrap();
    let gpu = GpuDevice::new(
        &phys,
        GpuConfig {
            vram_bytes: vram_mib << 20,
            fault_buffer_entries,
            ..GpuConfig::default()
        },
    )
    .unwrap();
    let mm = Mm::new(phys.clone());
    // Exact counts below: no thrashing detector on the wall clock, no access counters.
    let vm = GpuVm::with_policies(&gpu, &mm, VmPolicies::plain());
    Rig { phys, gpu, mm, vm }
}

fn rig() -> Rig {
    rig_with(16, 4096)
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    a.checked_add(i * PAGE_SIZE).unwrap()
}

fn pattern(npages: u64, seed: u8) -> Vec<u8> {
    (0..npages * PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i / PAGE_SIZE) as u8) ^ seed)
        .collect()
}

impl Rig {
    /// A 2 MiB-aligned private anonymous buffer of `npages`.
    fn map(&self, npages: u64) -> VirtAddr {
        self.mm
            .mmap(None, npages * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap()
    }

    fn cpu_bytes(&self, a: VirtAddr, npages: u64) -> Vec<u8> {
        let mut b = vec![0u8; (npages * PAGE_SIZE) as usize];
        self.mm.read(a, &mut b).unwrap();
        b
    }

    fn gpu_bytes(&self, a: VirtAddr, npages: u64) -> Vec<u8> {
        let mut b = vec![0u8; (npages * PAGE_SIZE) as usize];
        self.vm.read(a, &mut b).unwrap();
        b
    }
}

#[test]
fn first_touch_migrates_the_range_and_the_cpu_faults_it_back() {
    let r = rig();
    let n = 512;
    let a = r.map(n);
    let data = pattern(n, 1);
    r.mm.write(a, &data).unwrap();
    // One GPU load of one byte: the whole 2 MiB range moves (the range is the unit).
    let mut one = [0u8; 1];
    r.vm.read(page(a, 7), &mut one).unwrap();
    assert_eq!(one[0], data[7 * PAGE_SIZE as usize]);
    let s = r.vm.stats();
    assert_eq!((s.gpu_faults, s.fault_batches, s.replays), (1, 1, 1));
    assert_eq!(s.ranges_created, 1);
    assert_eq!(s.pages_h2d, n);
    assert_eq!(s.faults_by_size, [0, 0, 1]);
    assert_eq!(r.gpu.vram_pages_in_use(), n);
    assert!((0..n).all(|i| r.vm.lookup(page(a, i)).unwrap().location == Location::Vram));
    // Everything is on the device: the GPU reads it without another fault.
    assert_eq!(r.gpu_bytes(a, n), data);
    assert_eq!(r.vm.stats().gpu_faults, 1);
    assert!(r.vm.stats().local_accesses >= n);
    // The GPU writes, the CPU reads: each CPU touch of a device page migrates it home.
    let new = pattern(n, 2);
    r.vm.write(a, &new).unwrap();
    assert_eq!(r.cpu_bytes(a, n), new);
    assert_eq!(r.gpu.vram_pages_in_use(), 0);
    assert_eq!(r.vm.stats().pages_d2h, n);
    assert_eq!(
        r.vm.mapped_pages(),
        0,
        "the CPU faults zapped the GPU entries"
    );
    r.mm.audit().unwrap();
}

#[test]
fn a_thp_moves_as_one_unit_and_is_mapped_by_one_2m_entry() {
    let r = rig();
    let a = r.map(512);
    r.mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
    let data = pattern(512, 3);
    r.mm.write(a, &data).unwrap();
    assert_eq!(
        r.mm.pagemap(a, 1).unwrap()[0].order,
        9,
        "the CPU maps a THP"
    );
    assert_eq!(r.gpu_bytes(a, 512), data);
    let pte = r.vm.lookup(page(a, 100)).unwrap();
    assert_eq!(
        (pte.location, pte.size),
        (Location::Vram, GpuPageSize::Size2M)
    );
    let s = r.vm.stats();
    assert_eq!(s.binds_by_size, [0, 0, 1]);
    assert_eq!(s.migrations_by_size, [0, 0, 1]);
    assert_eq!(r.cpu_bytes(a, 512), data);
    r.mm.audit().unwrap();
}

#[test]
fn small_vmas_get_small_ranges() {
    let r = rig();
    // 20 pages: a 64 KiB range at the start, then 4 KiB ranges.
    let a = r.map(20);
    let data = pattern(20, 4);
    r.mm.write(a, &data).unwrap();
    assert_eq!(r.gpu_bytes(a, 20), data);
    let s = r.vm.stats();
    assert_eq!(s.ranges_created, 1 + 4);
    assert_eq!(s.faults_by_size, [4, 1, 0]);
    assert_eq!(r.vm.nr_ranges(), 5);
}

/// The seed series in a real driver: the GPU migrates a range again after the CPU took
/// half of it back; its own MIGRATE event is skipped, so the half still on the device
/// keeps its GPU entries (no invalidation for them), and only the half that came back is
/// copied.
#[test]
fn re_migration_costs_no_invalidation_for_pages_already_on_the_device() {
    let r = rig();
    let a = r.map(512);
    let data = pattern(512, 5);
    r.mm.write(a, &data).unwrap();
    assert_eq!(r.gpu_bytes(a, 512), data);
    let cpu_half = r.cpu_bytes(a, 256);
    assert_eq!(cpu_half, data[..256 * PAGE_SIZE as usize]);
    let before = r.vm.stats();
    assert_eq!(
        r.vm.mapped_pages(),
        256,
        "the CPU faults zapped their pages only"
    );
    // The GPU touches the first half again.
    assert_eq!(r.gpu_bytes(a, 512), data);
    let after = r.vm.stats();
    assert_eq!(
        after.pages_h2d - before.pages_h2d,
        256,
        "only the half that came back"
    );
    assert_eq!(
        after.pages_invalidated, before.pages_invalidated,
        "the device's own migration zapped nothing: the sources were not mapped by the GPU"
    );
    assert!(after.own_migrate_skips > before.own_migrate_skips);
    assert_eq!(r.vm.mapped_pages(), 512);
    assert_eq!(r.gpu.vram_pages_in_use(), 512);
}

#[test]
fn the_remote_policy_maps_system_memory_over_the_link() {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).unwrap();
    let gpu = GpuDevice::new(&phys, GpuConfig::default()).unwrap();
    let mm = Mm::new(phys.clone());
    let policies = VmPolicies {
        migration: Box::new(RemoteMap),
        ..VmPolicies::plain()
    };
    let vm = GpuVm::with_policies(&gpu, &mm, policies);
    let a = mm
        .mmap(None, 64 * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap();
    let data = pattern(64, 6);
    mm.write(a, &data).unwrap();
    let mut b = vec![0u8; data.len()];
    vm.read(a, &mut b).unwrap();
    assert_eq!(b, data);
    assert_eq!(gpu.vram_pages_in_use(), 0);
    assert_eq!(vm.lookup(a).unwrap().location, Location::System);
    // A GPU store through a read-only remote mapping faults for write, and lands.
    vm.write(page(a, 3), b"remote").unwrap();
    let mut back = [0u8; 6];
    mm.read(page(a, 3), &mut back).unwrap();
    assert_eq!(&back, b"remote");
    let s = vm.stats();
    assert_eq!(s.pages_h2d, 0);
    assert!(s.remote_accesses > 0 && s.local_accesses == 0);
    assert!(s.remote_mapped_pages >= 64);
}

/// Oversubscription: working sets of 1.5x, 2x and 4x the device memory, touched by the
/// GPU in passes with the CPU writing between them. Chunks are evicted to make room (by
/// each eviction policy in turn); every byte is checked after every pass.
#[test]
fn working_sets_larger_than_device_memory_keep_every_byte() {
    use hmm_svm::policy::eviction::{EvictionPolicy, Fifo, Lfu, Lru, RandomEviction};
    let vram_mib = 4;
    for (factor_x2, policy) in [
        (3, Box::new(Lru) as Box<dyn EvictionPolicy>),
        (4, Box::new(Fifo)),
        (8, Box::new(Lfu)),
        (4, Box::new(RandomEviction::new(5))),
    ] {
        let name = policy.name();
        let phys = PhysMem::new(PhysConfig::with_size(128 << 20)).unwrap();
        let config = GpuConfig {
            vram_bytes: vram_mib << 20,
            ..GpuConfig::default()
        };
        let gpu = GpuDevice::with_eviction(&phys, config, policy).unwrap();
        let mm = Mm::new(phys.clone());
        let vm = GpuVm::with_policies(&gpu, &mm, VmPolicies::plain());
        let n = vram_mib * 256 * factor_x2 / 2;
        let a = mm.mmap(None, n * PAGE_SIZE, RW, MapFlags::PRIVATE).unwrap();
        let mut want = pattern(n, 7);
        mm.write(a, &want).unwrap();
        for pass in 0..3u8 {
            let mut got = vec![0u8; want.len()];
            vm.read(a, &mut got).unwrap();
            assert!(
                got == want,
                "{name} x{}/2, pass {pass}: GPU read",
                factor_x2
            );
            // The GPU rewrites every other page, the CPU every third.
            for i in (0..n).step_by(2) {
                let at = (i * PAGE_SIZE) as usize;
                want[at..at + 8].copy_from_slice(&(i << 8 | u64::from(pass)).to_le_bytes());
                vm.write(page(a, i), &want[at..at + 8]).unwrap();
            }
            for i in (0..n).step_by(3) {
                let at = (i * PAGE_SIZE) as usize + 100;
                want[at] = pass ^ 0x5a;
                mm.write(page(a, i).checked_add(100).unwrap(), &[want[at]])
                    .unwrap();
            }
            let mut cpu = vec![0u8; want.len()];
            mm.read(a, &mut cpu).unwrap();
            assert!(
                cpu == want,
                "{name} x{}/2, pass {pass}: CPU read",
                factor_x2
            );
        }
        let s = vm.stats();
        assert!(s.evictions > 0 && s.evicted_pages > 0, "{name}: {s:?}");
        eprintln!(
            "{name}: working set {}x device memory, {} chunks evicted ({} pages), {} pages \
             migrated to the device, {} home, {} bytes verified 6 times",
            factor_x2 as f64 / 2.0,
            s.evictions,
            s.evicted_pages,
            s.pages_h2d,
            s.pages_d2h,
            want.len()
        );
        assert!(gpu.vram_pages_in_use() <= gpu.vram_pages());
        mm.audit().unwrap();
        drop(vm);
        drop(mm);
        assert_eq!(gpu.vram_pages_in_use(), 0, "{name}: device frames leaked");
        assert_eq!(phys.nr_in_use(), 0, "{name}: frames leaked");
    }
}

#[test]
fn munmap_zaps_the_gpu_and_the_range_goes_to_the_garbage_collector() {
    let r = rig();
    let a = r.map(512);
    r.mm.write(a, &pattern(512, 9)).unwrap();
    r.gpu_bytes(a, 16);
    assert_eq!(r.vm.nr_ranges(), 1);
    r.mm.munmap(a, PMD_SIZE).unwrap();
    assert_eq!(r.vm.mapped_pages(), 0);
    assert_eq!(
        r.gpu.vram_pages_in_use(),
        0,
        "munmap freed the device pages"
    );
    let mut b = [0u8; 8];
    let e = r.vm.read(a, &mut b).unwrap_err();
    assert!(matches!(e, SvmError::Fatal { why: "no VMA", .. }), "{e:?}");
    let s = r.vm.stats();
    assert_eq!((s.ranges_destroyed, s.fatal_faults), (1, 1));
    assert_eq!(r.vm.nr_ranges(), 0);
}

/// drm_gpusvm never splits a range: a partial unmap evicts what is left of it to system
/// memory and destroys it; the GPU then faults the rest in again as new ranges.
#[test]
fn a_partial_unmap_evicts_and_destroys_the_whole_range() {
    let r = rig();
    let a = r.map(512);
    let data = pattern(512, 10);
    r.mm.write(a, &data).unwrap();
    r.gpu_bytes(a, 512);
    assert_eq!(r.gpu.vram_pages_in_use(), 512);
    r.mm.munmap(a, 16 * PAGE_SIZE).unwrap();
    // The next batch collects the garbage first.
    let rest = page(a, 16);
    assert_eq!(r.gpu_bytes(rest, 496), data[16 * PAGE_SIZE as usize..]);
    let s = r.vm.stats();
    assert_eq!(s.ranges_destroyed, 1);
    assert_eq!(
        s.pages_d2h, 496,
        "the rest went home before the range was destroyed"
    );
    assert!(r.vm.nr_ranges() > 1, "the rest came back as smaller ranges");
    assert_eq!(r.cpu_bytes(rest, 496), data[16 * PAGE_SIZE as usize..]);
    r.mm.audit().unwrap();
}

#[test]
fn faults_are_coalesced_and_an_overflow_only_delays_them() {
    let r = rig_with(16, 2);
    let a = r.map(512);
    let data = pattern(512, 11);
    r.mm.write(a, &data).unwrap();
    // Eight stalled accesses (two of them on the same page) fill the two-entry buffer.
    let mut b = [0u8; 4];
    for i in [0, 0, 1, 2, 3, 4, 5, 6] {
        assert!(r.vm.try_read(page(a, 50 * i), &mut b).unwrap().is_some());
    }
    let s = r.vm.stats();
    assert_eq!((s.gpu_faults, s.buffer_overflows), (8, 6));
    let report = r.vm.service_faults().unwrap();
    assert_eq!(
        (report.batches, report.faults),
        (1, 1),
        "the duplicate was coalesced"
    );
    assert_eq!(r.vm.stats().duplicate_faults, 1);
    // The replay: every access runs again; the one 2 MiB range covers them all now.
    for i in 0..7 {
        assert_eq!(r.vm.try_read(page(a, 50 * i), &mut b).unwrap(), None);
        let at = (50 * i * PAGE_SIZE) as usize;
        assert_eq!(b, data[at..at + 4]);
    }
}

#[test]
fn accesses_the_process_does_not_allow_are_fatal() {
    let r = rig();
    let ro =
        r.mm.mmap(None, 4 * PAGE_SIZE, Prot::READ, MapFlags::PRIVATE)
            .unwrap();
    let mut b = [0u8; 4];
    r.vm.read(ro, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    let e = r.vm.write(ro, b"no").unwrap_err();
    assert!(matches!(e, SvmError::Fatal { .. }), "{e:?}");
    let e = r.vm.read(VirtAddr::new(0x1000), &mut b).unwrap_err();
    assert!(matches!(e, SvmError::Fatal { why: "no VMA", .. }), "{e:?}");
    assert_eq!(
        r.vm.read(VirtAddr::new(hmm::addr::USER_VA_END - 2), &mut b),
        Err(SvmError::Inval {
            what: "access past the address space"
        })
    );
    assert_eq!(r.vm.stats().fatal_faults, 2);
}

#[test]
fn the_gpu_and_the_cpu_write_the_same_buffers_from_threads() {
    let r = Arc::new(rig_with(4, 64));
    let n: u64 = 1024; // 4 MiB: twice the device memory the range mix can take at once
    let a = r.map(n);
    r.mm.write(a, &vec![0u8; (n * PAGE_SIZE) as usize]).unwrap();
    // Page i belongs to writer i % 3 (two GPU threads, one CPU thread); each writes its
    // pages' first word many times, then every page must hold its writer's last value.
    const ROUNDS: u64 = 20;
    std::thread::scope(|s| {
        for w in 0..3u64 {
            let r = Arc::clone(&r);
            s.spawn(move || {
                for round in 1..=ROUNDS {
                    for i in (w..n).step_by(3 * 7) {
                        let v = (i << 32) | round;
                        let at = page(a, i);
                        if w < 2 {
                            r.vm.write(at, &v.to_le_bytes()).unwrap();
                        } else {
                            r.mm.write(at, &v.to_le_bytes()).unwrap();
                        }
                    }
                }
            });
        }
    });
    for i in 0..n {
        let w = i % 3;
        let expect = if (i - w) % 21 == 0 {
            (i << 32) | ROUNDS
        } else {
            0
        };
        let mut cpu = [0u8; 8];
        r.mm.read(page(a, i), &mut cpu).unwrap();
        assert_eq!(u64::from_le_bytes(cpu), expect, "page {i}, CPU");
        let mut gpu = [0u8; 8];
        r.vm.read(page(a, i), &mut gpu).unwrap();
        assert_eq!(u64::from_le_bytes(gpu), expect, "page {i}, GPU");
    }
    r.mm.audit().unwrap();
    drop(Arc::try_unwrap(r).ok().map(|r| r.vm));
}

#[test]
fn bad_configurations_are_refused() {
    let phys = PhysMem::new(PhysConfig::with_size(16 << 20)).unwrap();
    for config in [
        GpuConfig {
            vram_bytes: 0,
            ..GpuConfig::default()
        },
        GpuConfig {
            vram_bytes: (2 << 20) + 4096,
            ..GpuConfig::default()
        },
        GpuConfig {
            notifier_bytes: 3 << 20,
            ..GpuConfig::default()
        },
        GpuConfig {
            notifier_bytes: 4096,
            ..GpuConfig::default()
        },
    ] {
        assert!(
            matches!(GpuDevice::new(&phys, config), Err(SvmError::Inval { .. })),
            "{config:?}"
        );
    }
}

#[test]
fn nothing_leaks_when_the_process_exits_with_pages_on_the_gpu() {
    let r = rig();
    let a = r.map(512);
    r.mm.write(a, &pattern(512, 12)).unwrap();
    r.gpu_bytes(a, 512);
    assert_eq!(r.gpu.vram_pages_in_use(), 512);
    let Rig { phys, gpu, mm, vm } = r;
    drop(mm);
    assert_eq!(gpu.vram_pages_in_use(), 0, "exit freed the device pages");
    let mut b = [0u8; 1];
    assert_eq!(vm.read(a, &mut b), Err(SvmError::Exited));
    drop(vm);
    drop(gpu);
    assert_eq!(phys.nr_in_use(), 0, "no frame left in use");
}

/// Two VMs of one GPU on one process (Xe allows several): both skip the device's own
/// MIGRATE events, so a migration by one, and a CPU fault on a page the other maps, must
/// zap the other's entries too.
#[test]
fn a_second_vm_of_the_same_device_never_keeps_a_stale_entry() {
    let r = rig();
    let remote = VmPolicies {
        migration: Box::new(RemoteMap),
        ..VmPolicies::plain()
    };
    let vm2 = GpuVm::with_policies(&r.gpu, &r.mm, remote);
    let a = r.map(16);
    r.mm.write(a, &pattern(16, 13)).unwrap();
    // vm2 maps the system pages remotely, then vm1 moves them to the device.
    let mut b = [0u8; 8];
    vm2.read(a, &mut b).unwrap();
    assert_eq!(vm2.lookup(a).unwrap().location, Location::System);
    r.vm.read(a, &mut b).unwrap();
    assert_eq!(
        vm2.lookup(a),
        None,
        "vm2's entry for the page that left was zapped"
    );
    // vm2 maps the device page now (its own device's page, as it is); the CPU takes it
    // back, and vm2 must not write the freed device page.
    vm2.read(a, &mut b).unwrap();
    assert_eq!(vm2.lookup(a).unwrap().location, Location::Vram);
    let mut cpu = [0u8; 8];
    r.mm.read(a, &mut cpu).unwrap();
    assert_eq!(vm2.lookup(a), None);
    vm2.write(a, b"from vm2").unwrap();
    r.mm.read(a, &mut cpu).unwrap();
    assert_eq!(&cpu, b"from vm2");
    r.mm.audit().unwrap();
}

#[test]
fn shared_memory_is_mapped_where_it_is() {
    let r = rig();
    let s =
        r.mm.mmap(None, 16 * PAGE_SIZE, RW, MapFlags::SHARED)
            .unwrap();
    r.mm.write(s, &pattern(16, 14)).unwrap();
    assert_eq!(r.gpu_bytes(s, 16), pattern(16, 14));
    assert_eq!(r.vm.lookup(s).unwrap().location, Location::System);
    let st = r.vm.stats();
    assert_eq!(
        (st.pages_h2d, st.own_migrate_skips),
        (0, 0),
        "no migration was tried"
    );
}

/// A range whose VMA was split under it (mprotect) no longer fits: the next fault finds
/// it stale, the garbage collector drops it and a range that fits is made; a prefetch
/// over a partly unmapped range collects it first.
#[test]
fn ranges_that_no_longer_fit_are_rebuilt() {
    let r = rig();
    let a = r.map(512);
    let data = pattern(512, 15);
    r.mm.write(a, &data).unwrap();
    r.gpu_bytes(a, 512);
    r.mm.mprotect(page(a, 511), PAGE_SIZE, Prot::READ).unwrap();
    let mut b = [0u8; 8];
    r.mm.read(page(a, 2), &mut b).unwrap(); // the CPU takes page 2 back
    r.vm.write(page(a, 2), b"rebuilt!").unwrap();
    r.mm.read(page(a, 2), &mut b).unwrap();
    assert_eq!(&b, b"rebuilt!");
    assert!(matches!(
        r.vm.write(page(a, 511), b"no"),
        Err(SvmError::Fatal { .. })
    ));
    // Prefetch after a partial unmap.
    let c = r.map(512);
    r.mm.write(c, &data).unwrap();
    r.gpu_bytes(c, 8);
    r.mm.munmap(c, PAGE_SIZE).unwrap();
    r.vm.prefetch(page(c, 8), 4 * PAGE_SIZE).unwrap();
    assert_eq!(r.vm.lookup(page(c, 8)).unwrap().location, Location::Vram);
    assert_eq!(r.cpu_bytes(page(c, 1), 511), data[PAGE_SIZE as usize..]);
    r.mm.audit().unwrap();
}
