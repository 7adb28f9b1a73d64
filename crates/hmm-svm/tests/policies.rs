//! Each policy against hand-computed expectations, through the driver: the prefetchers,
//! the thrashing detector on a manual clock, access counters, advice, explicit prefetch.

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::clock::ManualClock;
use hmm_svm::policy::prefetch::{NoPrefetch, PrefetchPolicy, TreePrefetch};
use hmm_svm::policy::thrashing::ThrashingDetector;
use hmm_svm::policy::CounterDriven;
use hmm_svm::{Advice, GpuConfig, GpuDevice, GpuVm, Location, Placement, VmPolicies};

const RW: Prot = Prot::READ.union(Prot::WRITE);

struct Rig {
    gpu: Arc<GpuDevice>,
    mm: Arc<Mm>,
    vm: Arc<GpuVm>,
    a: VirtAddr,
}

/// A 2 MiB buffer (one 2 MiB range) filled by the CPU, and a VM with `policies`.
fn rig(policies: VmPolicies) -> Rig {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).unwrap();
    let gpu = GpuDevice::new(&phys, GpuConfig::default()).unwrap();
    let mm = Mm::new(phys.clone());
    let vm = GpuVm::with_policies(&gpu, &mm, policies);
    let a = mm
        .mmap(None, 512 * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap();
    let data: Vec<u8> = (0..512 * PAGE_SIZE)
        .map(|i| (i / PAGE_SIZE) as u8)
        .collect();
    mm.write(a, &data).unwrap();
    Rig { gpu, mm, vm, a }
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    a.checked_add(i * PAGE_SIZE).unwrap()
}

fn with_prefetch(p: Box<dyn PrefetchPolicy>) -> VmPolicies {
    VmPolicies {
        prefetch: p,
        ..VmPolicies::plain()
    }
}

fn on_device(r: &Rig, i: u64) -> bool {
    r.vm.lookup(page(r.a, i))
        .is_some_and(|p| p.location == Location::Vram)
}

/// Nine faults on pages 0..=8 in one batch: the tree fetches the 16-page subtree they
/// fill to 56 % (the hand computation is in `prefetch.rs`), seven pages more; nothing else
/// of the range is mapped, and a later fault at page 300 fetches its 64 KiB big page.
#[test]
fn the_tree_prefetcher_fetches_the_dense_subtree() {
    let r = rig(with_prefetch(Box::new(TreePrefetch::default())));
    let mut b = [0u8; 1];
    for i in 0..=8 {
        assert!(r.vm.try_read(page(r.a, i), &mut b).unwrap().is_some());
    }
    r.vm.service_faults().unwrap();
    let s = r.vm.stats();
    assert_eq!((s.pages_h2d, s.prefetched_pages), (16, 7));
    assert!((0..16).all(|i| on_device(&r, i)));
    assert_eq!(
        r.vm.lookup(page(r.a, 16)),
        None,
        "the rest of the range stays unmapped"
    );
    r.vm.read(page(r.a, 300), &mut b).unwrap();
    assert_eq!(b[0], 300u64 as u8);
    assert_eq!(r.vm.stats().pages_h2d, 32, "page 300's big page, 288..304");
    assert!((288..304).all(|i| on_device(&r, i)));
    assert_eq!(r.gpu.vram_pages_in_use(), 32);
}

#[test]
fn without_prefetch_only_the_faulted_pages_move() {
    let r = rig(with_prefetch(Box::new(NoPrefetch)));
    let mut b = [0u8; 1];
    for i in [3, 4, 200] {
        r.vm.try_read(page(r.a, i), &mut b).unwrap();
    }
    r.vm.service_faults().unwrap();
    let s = r.vm.stats();
    assert_eq!((s.pages_h2d, s.prefetched_pages), (3, 0));
    assert!(on_device(&r, 3) && on_device(&r, 4) && on_device(&r, 200));
    assert_eq!(r.vm.mapped_pages(), 3);
}

/// A page the GPU and the CPU take in turns: the third migration within a lapse is
/// thrashing, so the GPU's next fault leaves the page in system memory and maps it
/// remotely (throttle); after the lapse it migrates again.
#[test]
fn a_page_that_ping_pongs_is_throttled_then_migrates_again() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let policies = VmPolicies {
        prefetch: Box::new(NoPrefetch),
        thrashing: Some(ThrashingDetector::default()),
        clock: clock.clone(),
        ..VmPolicies::plain()
    };
    let r = rig(policies);
    let p = page(r.a, 10);
    let mut b = [0u8; 1];
    r.vm.read(p, &mut b).unwrap(); // event 1: to the GPU
    assert!(on_device(&r, 10));
    clock.advance(100_000);
    r.mm.read(p, &mut b).unwrap(); // event 2: back to the CPU
    clock.advance(100_000);
    r.vm.read(p, &mut b).unwrap(); // event 3: thrashing detected, throttled
    let s = r.vm.stats();
    assert_eq!((s.thrash_detections, s.thrash_throttles), (1, 1));
    assert!(
        on_device(&r, 10),
        "the migration that completed the pattern went through"
    );
    clock.advance(100_000);
    r.mm.read(p, &mut b).unwrap(); // back to the CPU
    clock.advance(100_000);
    r.vm.read(p, &mut b).unwrap(); // within the throttle: stays, mapped remotely
    assert_eq!(r.vm.lookup(p).unwrap().location, Location::System);
    assert_eq!(r.vm.stats().thrash_held_pages, 1);
    // After the lapse a fault migrates it again.
    clock.advance(1_000_000);
    r.mm.write(p, &[7]).unwrap();
    // A protection change invalidates the remote entry, so the GPU faults again.
    r.mm.mprotect(p, PAGE_SIZE, Prot::READ).unwrap();
    r.mm.mprotect(p, PAGE_SIZE, RW).unwrap();
    r.vm.read(p, &mut b).unwrap();
    assert!(on_device(&r, 10));
    assert_eq!(b[0], 7);
}

/// UVM's access counters: a block read remotely 256 times is migrated to the device
/// (the counter-driven policy maps on a fault and migrates on the counter).
#[test]
fn access_counters_migrate_a_block_read_remotely_256_times() {
    let policies = VmPolicies {
        migration: Box::new(CounterDriven),
        access_counter_threshold: Some(256),
        ..VmPolicies::plain()
    };
    let r = rig(policies);
    let mut b = [0u8; 1];
    r.vm.read(page(r.a, 5), &mut b).unwrap();
    assert_eq!(
        r.vm.lookup(page(r.a, 5)).unwrap().location,
        Location::System
    );
    for k in 1..255 {
        r.vm.read(page(r.a, k % 512), &mut b).unwrap();
    }
    assert_eq!(
        r.vm.stats().access_counter_notifications,
        0,
        "255 remote accesses"
    );
    r.vm.read(page(r.a, 9), &mut b).unwrap();
    let s = r.vm.stats();
    assert_eq!(s.access_counter_notifications, 1);
    assert_eq!(
        s.pages_h2d, 512,
        "the notification migrated the block's range"
    );
    assert!(on_device(&r, 9));
    assert_eq!(s.gpu_faults, 1, "only the first access faulted");
}

#[test]
fn advice_and_explicit_prefetch() {
    let r = rig(VmPolicies::plain());
    let mut b = [0u8; 1];
    // Preferred location: system memory. The fault maps remotely.
    r.vm.advise(
        r.a,
        512 * PAGE_SIZE,
        Advice::PreferredLocation(Placement::System),
    )
    .unwrap();
    r.vm.read(page(r.a, 1), &mut b).unwrap();
    assert_eq!(
        r.vm.lookup(page(r.a, 1)).unwrap().location,
        Location::System
    );
    assert_eq!(r.vm.stats().pages_h2d, 0);
    // An explicit prefetch is a decision of its own: pages 64..128 move.
    r.vm.prefetch(page(r.a, 64), 64 * PAGE_SIZE).unwrap();
    let s = r.vm.stats();
    assert_eq!((s.pages_h2d, s.prefetched_pages), (64, 64));
    assert!((64..128).all(|i| on_device(&r, i)));
    assert_eq!(
        r.vm.lookup(page(r.a, 1)).unwrap().location,
        Location::System
    );
    let mut got = [0u8; 1];
    r.vm.read(page(r.a, 100), &mut got).unwrap();
    assert_eq!(got[0], 100);
    // Bad advice and prefetch arguments.
    assert!(r.vm.advise(r.a, 0, Advice::AccessedBy).is_err());
    assert!(r.vm.prefetch(VirtAddr::new(0x1234), PAGE_SIZE).is_err());
    assert!(
        r.vm.prefetch(VirtAddr::new(0x1000), PAGE_SIZE).is_err(),
        "no VMA"
    );
}
