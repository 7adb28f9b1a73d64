//! The driver under real threads: two GPU threads and a CPU thread writing and checking the
//! same buffer (twice the size of device memory, so chunks are evicted all the time), a
//! thread prefetching spans to the device and reclaiming device memory, and a churner that
//! forks (write-protecting everything), changes protections of a scratch area and maps and
//! unmaps it while a GPU thread uses it. After the run every page holds its owner's last
//! value on both sides, the address space audits clean, and once everything is dropped no
//! frame is in use.
//!
//! `HMM_STRESS_ITERS` rounds per thread (default 200):
//!
//! ```text
//! HMM_STRESS_ITERS=5000 cargo test --release -p hmm-svm --test stress
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::policy::prefetch::TreePrefetch;
use hmm_svm::{GpuConfig, GpuDevice, GpuVm, SvmError, VmPolicies};

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn iters() -> u64 {
    std::env::var("HMM_STRESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    a.checked_add(i * PAGE_SIZE).unwrap()
}

/// Page `i`'s first word at version `v`.
fn word(i: u64, v: u64) -> u64 {
    (i << 32) | v
}

/// A tiny deterministic generator per thread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn gpu_and_cpu_threads_with_eviction_prefetch_fork_and_unmap() {
    let phys = PhysMem::new(PhysConfig::with_size(128 << 20)).unwrap();
    let gpu = GpuDevice::new(
        &phys,
        GpuConfig {
            vram_bytes: 4 << 20,
            fault_buffer_entries: 64,
            ..GpuConfig::default()
        },
    )
    .unwrap();
    let mm = Mm::new(phys.clone());
    let policies = VmPolicies {
        prefetch: Box::new(TreePrefetch::default()),
        ..VmPolicies::default()
    };
    let vm = GpuVm::with_policies(&gpu, &mm, policies);
    // 8 MiB: twice the device memory. Page i belongs to writer i % 3.
    let n: u64 = 2048;
    let a = mm.mmap(None, n * PAGE_SIZE, RW, MapFlags::PRIVATE).unwrap();
    for i in 0..n {
        mm.write_val(page(a, i), word(i, 0)).unwrap();
    }
    let scratch_pages = 64;
    let scratch = mm
        .mmap(None, scratch_pages * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap();
    let rounds = iters();
    let stop = AtomicBool::new(false);
    let last: Vec<u64> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (vm, mm) = (&vm, &mm);
                s.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9 + w);
                    let mut version = vec![0u64; n as usize];
                    for round in 1..=rounds {
                        let i = rng.below(n / 3) * 3 + w;
                        let v = word(i, round);
                        let at = page(a, i);
                        let mut got = [0u8; 8];
                        if w < 2 {
                            vm.write(at, &v.to_le_bytes()).unwrap();
                            vm.read(at, &mut got).unwrap();
                        } else {
                            mm.write_val(at, v).unwrap();
                            mm.read(at, &mut got).unwrap();
                        }
                        assert_eq!(u64::from_le_bytes(got), v, "writer {w}, page {i}");
                        version[i as usize] = round;
                    }
                    version
                })
            })
            .collect();
        // Prefetch spans and reclaim device memory.
        s.spawn(|| {
            let mut rng = Rng(77);
            while !stop.load(Ordering::Relaxed) {
                let start = rng.below(n - 64);
                vm.prefetch(page(a, start), (1 + rng.below(63)) * PAGE_SIZE)
                    .unwrap();
                gpu.reclaim(rng.below(1024));
            }
        });
        // Fork (write-protects every page: the GPU's writable entries must go), and churn
        // the scratch area under a GPU thread that uses it.
        s.spawn(|| {
            let mut rng = Rng(99);
            while !stop.load(Ordering::Relaxed) {
                match rng.below(3) {
                    0 => drop(mm.fork().unwrap()),
                    1 => {
                        let p = page(scratch, rng.below(scratch_pages));
                        let _ = mm.mprotect(p, PAGE_SIZE, Prot::READ);
                        let _ = mm.mprotect(p, PAGE_SIZE, RW);
                    }
                    _ => {
                        let _ = mm.munmap(scratch, scratch_pages * PAGE_SIZE);
                        let _ = mm.mmap(
                            Some(scratch),
                            scratch_pages * PAGE_SIZE,
                            RW,
                            MapFlags::PRIVATE | MapFlags::FIXED,
                        );
                    }
                }
            }
        });
        s.spawn(|| {
            let mut rng = Rng(5);
            while !stop.load(Ordering::Relaxed) {
                let p = page(scratch, rng.below(scratch_pages));
                // The scratch page may be unmapped or read-only right now.
                match vm.write(p, &[1]) {
                    Ok(()) | Err(SvmError::Fatal { .. }) => {}
                    Err(e) => panic!("scratch write: {e}"),
                }
            }
        });
        // The other threads stop when the writers are done, or when one of them failed
        // (the panic then ends the test instead of leaving the churners running).
        let joined: Vec<_> = writers.into_iter().map(|h| h.join()).collect();
        stop.store(true, Ordering::Relaxed);
        let versions: Vec<Vec<u64>> = joined
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect();
        (0..n)
            .map(|i| versions[(i % 3) as usize][i as usize])
            .collect()
    });
    for i in 0..n {
        let want = word(i, last[i as usize]);
        assert_eq!(
            mm.read_val::<u64>(page(a, i)).unwrap(),
            want,
            "page {i}, CPU"
        );
        let mut got = [0u8; 8];
        vm.read(page(a, i), &mut got).unwrap();
        assert_eq!(u64::from_le_bytes(got), want, "page {i}, GPU");
    }
    mm.audit().unwrap();
    let s = vm.stats();
    eprintln!("{s:#?}");
    assert!(s.gpu_faults > 0 && s.evictions > 0, "{s:?}");
    drop(vm);
    drop(mm);
    assert_eq!(gpu.vram_pages_in_use(), 0, "device frames leaked");
    drop(gpu);
    assert_eq!(phys.nr_in_use(), 0, "frames leaked");
}

/// Many devices under real threads: four GPUs in two peer groups, each with its own peer
/// policy (a direct copy, a bounce, a peer mapping) and device memory a quarter of the
/// buffer, one writer thread per GPU and one on the CPU, each owning every fifth page; a
/// thread taking two of the GPUs offline (home or to a peer) and back again; a thread
/// forking and unmapping a scratch area under a GPU. Writers meet an offline device as a
/// clean `Offline` and try again. After the run every page holds its owner's last value,
/// the address space audits clean, and nothing leaks.
#[test]
fn four_devices_in_two_groups_with_peer_migration_and_offline_cycles() {
    use hmm_svm::{EvictTarget, PeerGroup, PeerPolicy};
    let phys = PhysMem::new(PhysConfig::with_size(128 << 20)).unwrap();
    let groups = [PeerGroup::new(), PeerGroup::new()];
    let gpus: Vec<_> = (0..4)
        .map(|g| {
            let config = GpuConfig {
                vram_bytes: 2 << 20,
                fault_buffer_entries: 64,
                evict_to: if g % 2 == 1 {
                    EvictTarget::Peer
                } else {
                    EvictTarget::Host
                },
                ..GpuConfig::default()
            };
            GpuDevice::in_group(&phys, config, &groups[g / 2]).unwrap()
        })
        .collect();
    let mm = Mm::new(phys.clone());
    let peer = [
        PeerPolicy::SourceCopy,
        PeerPolicy::Bounce,
        PeerPolicy::RemoteMap,
        PeerPolicy::SourceCopy,
    ];
    let vms: Vec<_> = gpus
        .iter()
        .zip(peer)
        .map(|(g, peer)| {
            let policies = VmPolicies {
                peer,
                ..VmPolicies::default()
            };
            GpuVm::with_policies(g, &mm, policies)
        })
        .collect();
    // 4 MiB: twice the memory of one group. Page i belongs to writer i % 5 (4: the CPU).
    let n: u64 = 1024;
    let a = mm.mmap(None, n * PAGE_SIZE, RW, MapFlags::PRIVATE).unwrap();
    for i in 0..n {
        mm.write_val(page(a, i), word(i, 0)).unwrap();
    }
    let scratch_pages = 32;
    let scratch = mm
        .mmap(None, scratch_pages * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap();
    let rounds = iters();
    let stop = AtomicBool::new(false);
    /// Retries `f` while the device is offline.
    fn retry(mut f: impl FnMut() -> Result<(), SvmError>) {
        loop {
            match f() {
                Err(SvmError::Offline) => std::thread::yield_now(),
                r => return r.unwrap(),
            }
        }
    }
    let last: Vec<u64> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..5u64)
            .map(|w| {
                let (vms, mm) = (&vms, &mm);
                s.spawn(move || {
                    let mut rng = Rng(0x5eed + w);
                    let mut version = vec![0u64; n as usize];
                    for round in 1..=rounds {
                        let i = rng.below(n / 5) * 5 + w;
                        let v = word(i, round);
                        let at = page(a, i);
                        let mut got = [0u8; 8];
                        if let Some(vm) = vms.get(w as usize) {
                            retry(|| vm.write(at, &v.to_le_bytes()));
                            retry(|| vm.read(at, &mut got));
                        } else {
                            mm.write_val(at, v).unwrap();
                            mm.read(at, &mut got).unwrap();
                        }
                        assert_eq!(u64::from_le_bytes(got), v, "writer {w}, page {i}");
                        version[i as usize] = round;
                    }
                    version
                })
            })
            .collect();
        // GPUs 1 and 3 go offline (home, or to their peer) and come back.
        s.spawn(|| {
            let mut rng = Rng(31);
            while !stop.load(Ordering::Relaxed) {
                let g = &gpus[1 + 2 * rng.below(2) as usize];
                let to = if rng.below(2) == 0 {
                    EvictTarget::Host
                } else {
                    EvictTarget::Peer
                };
                loop {
                    match g.offline(to) {
                        Ok(_) => break,
                        Err(SvmError::InUse { .. }) => continue,
                        Err(e) => panic!("offline: {e}"),
                    }
                }
                assert_eq!(g.vram_pages_in_use(), 0);
                for _ in 0..rng.below(64) {
                    std::thread::yield_now();
                }
                g.online().unwrap();
            }
        });
        // Fork and unmap under GPU 0.
        s.spawn(|| {
            let mut rng = Rng(99);
            while !stop.load(Ordering::Relaxed) {
                if rng.below(2) == 0 {
                    drop(mm.fork().unwrap());
                } else {
                    let _ = mm.munmap(scratch, scratch_pages * PAGE_SIZE);
                    let _ = mm.mmap(
                        Some(scratch),
                        scratch_pages * PAGE_SIZE,
                        RW,
                        MapFlags::PRIVATE | MapFlags::FIXED,
                    );
                }
                let p = page(scratch, rng.below(scratch_pages));
                match vms[0].write(p, &[1]) {
                    Ok(()) | Err(SvmError::Fatal { .. }) => {}
                    Err(e) => panic!("scratch write: {e}"),
                }
            }
        });
        let joined: Vec<_> = writers.into_iter().map(|h| h.join()).collect();
        stop.store(true, Ordering::Relaxed);
        let versions: Vec<Vec<u64>> = joined
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect();
        (0..n)
            .map(|i| versions[(i % 5) as usize][i as usize])
            .collect()
    });
    for g in &gpus {
        g.online().unwrap();
    }
    for i in 0..n {
        let want = word(i, last[i as usize]);
        let mut got = [0u8; 8];
        vms[(i % 4) as usize].read(page(a, i), &mut got).unwrap();
        assert_eq!(u64::from_le_bytes(got), want, "page {i}, GPU {}", i % 4);
        assert_eq!(
            mm.read_val::<u64>(page(a, i)).unwrap(),
            want,
            "page {i}, CPU"
        );
    }
    mm.audit().unwrap();
    let s: Vec<_> = vms.iter().map(|v| v.stats()).collect();
    eprintln!("{s:#?}");
    assert!(
        s.iter().map(|s| s.pages_d2d_in).sum::<u64>() > 0,
        "peers copied"
    );
    assert!(s[1].pages_bounced > 0 || s[0].pages_d2d_in > 0, "{s:?}");
    drop(vms);
    drop(mm);
    for g in &gpus {
        assert_eq!(g.vram_pages_in_use(), 0, "device frames leaked");
    }
    drop(gpus);
    assert_eq!(phys.nr_in_use(), 0, "frames leaked");
}
