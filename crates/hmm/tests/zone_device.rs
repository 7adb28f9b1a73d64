//! Device memory: pagemap registration, device frames with real bytes, the free callback,
//! retirement, and lookups in the shared frame-number space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hmm::addr::{DevicePfn, Pfn, PMD_NR};
use hmm::notifier::Owner;
use hmm::phys::{FrameFlags, FrameRef, PhysConfig, PhysMem, Zone, NR_SECTIONS};
use hmm::zone_device::{memremap_pages, DevPagemapOps, MemoryType, PagemapConfig, PagemapError};

#[derive(Default)]
struct CountingOps {
    freed_pages: AtomicU64,
    last_free: AtomicU64,
}

impl DevPagemapOps for CountingOps {
    fn folio_free(&self, folio: FrameRef<'_>, order: u32) {
        assert_eq!(folio.meta().refcount(), 0, "freed folios hold no reference");
        self.freed_pages.fetch_add(1 << order, Ordering::Relaxed);
        let nr = match folio.zone() {
            Zone::DevicePrivate { .. } => folio.device_pfn().as_u64(),
            _ => folio.pfn().as_u64(),
        };
        self.last_free.store(nr, Ordering::Relaxed);
    }
}

fn machine() -> Arc<PhysMem> {
    PhysMem::new(PhysConfig::with_size(8 << 20)).unwrap()
}

fn config(kind: MemoryType, owner: Owner, mib: u64) -> PagemapConfig {
    PagemapConfig {
        kind,
        owner,
        size_bytes: mib << 20,
    }
}

#[test]
fn sizes_are_validated() {
    let phys = machine();
    let owner = Owner::new_unique();
    for size in [0, 4096, (2 << 20) + 4096, 1 << 40] {
        let c = PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner,
            size_bytes: size,
        };
        let e = memremap_pages(&phys, c, Arc::new(CountingOps::default())).unwrap_err();
        assert!(matches!(e, PagemapError::Inval { size_bytes } if size_bytes == size));
    }
    assert_eq!(
        phys.pagemaps().count(),
        0,
        "a refused pagemap is not installed"
    );
}

#[test]
fn private_frames_hold_bytes_and_are_freed_through_the_driver() {
    let phys = machine();
    let ops = Arc::new(CountingOps::default());
    let owner = Owner::new_unique();
    let pgmap = memremap_pages(
        &phys,
        config(MemoryType::DevicePrivate, owner, 4),
        ops.clone(),
    )
    .unwrap();
    assert!(pgmap.is_private() && pgmap.is_live());
    assert_eq!(pgmap.owner(), owner);
    assert_eq!(pgmap.nr_frames(), 2 * PMD_NR);

    let f = pgmap.alloc(0, FrameFlags::empty()).unwrap();
    assert!(
        f.meta().is_locked(),
        "zone_device_folio_init hands out locked folios"
    );
    assert_eq!(f.meta().refcount(), 1);
    assert_eq!(
        f.zone(),
        Zone::DevicePrivate {
            pagemap: pgmap.id()
        }
    );
    f.write(100, b"device bytes");
    let dpfn = f.device_pfn();
    // The frame is found by its device pfn, and only by it.
    assert!(phys.contains_device(dpfn));
    assert!(!phys.contains(Pfn::new(dpfn.as_u64())));
    let mut back = [0u8; 12];
    phys.device_frame(dpfn).read(100, &mut back);
    assert_eq!(&back, b"device bytes");
    assert_eq!(pgmap.nr_in_use(), 1);

    drop(f.unlock());
    assert_eq!(ops.freed_pages.load(Ordering::Relaxed), 1);
    assert_eq!(ops.last_free.load(Ordering::Relaxed), dpfn.as_u64());
    assert_eq!(pgmap.nr_in_use(), 0);
    assert_eq!(phys.nr_in_use(), 0, "device memory is not RAM");
}

#[test]
fn thp_sized_device_folios_and_exhaustion() {
    let phys = machine();
    let ops = Arc::new(CountingOps::default());
    let pgmap = memremap_pages(
        &phys,
        config(MemoryType::DevicePrivate, Owner::new_unique(), 4),
        ops.clone(),
    )
    .unwrap();
    let big = pgmap.alloc(9, FrameFlags::empty()).unwrap();
    assert!(big.device_pfn().is_aligned_to_order(9));
    assert_eq!(big.meta().order(), 9);
    let tail = pgmap.device_frame(DevicePfn::new(big.device_pfn().as_u64() + 7));
    assert_eq!(tail.folio().device_pfn(), big.device_pfn());
    let big2 = pgmap.alloc(9, FrameFlags::empty()).unwrap();
    assert!(
        pgmap.alloc(0, FrameFlags::empty()).is_err(),
        "4 MiB are used up"
    );
    for f in [big, big2] {
        drop(f.unlock());
    }
    assert_eq!(ops.freed_pages.load(Ordering::Relaxed), 2 * PMD_NR);
    assert_eq!(pgmap.nr_in_use(), 0);
}

#[test]
fn coherent_frames_are_cpu_addressable() {
    let phys = machine();
    let pgmap = memremap_pages(
        &phys,
        config(MemoryType::DeviceCoherent, Owner::new_unique(), 2),
        Arc::new(CountingOps::default()),
    )
    .unwrap();
    let f = pgmap.alloc(0, FrameFlags::ANON).unwrap();
    let pfn = f.pfn();
    assert!(!phys.is_ram(pfn));
    assert!(phys.contains(pfn));
    assert_eq!(
        phys.frame(pfn).zone(),
        Zone::DeviceCoherent {
            pagemap: pgmap.id()
        }
    );
    phys.frame(pfn).write(0, &[7; 16]);
    let mut b = [0u8; 16];
    f.read(0, &mut b);
    assert_eq!(b, [7; 16]);
    drop(f.unlock());
}

#[test]
fn pagemaps_get_distinct_sections_and_owners_stay_apart() {
    let phys = machine();
    let (a, b) = (Owner::new_unique(), Owner::new_unique());
    let ops = Arc::new(CountingOps::default());
    let p0 = memremap_pages(&phys, config(MemoryType::DevicePrivate, a, 2), ops.clone()).unwrap();
    let p1 = memremap_pages(&phys, config(MemoryType::DevicePrivate, b, 2), ops).unwrap();
    assert_ne!(p0.id(), p1.id());
    let f0 = p0.alloc(0, FrameFlags::empty()).unwrap();
    let f1 = p1.alloc(0, FrameFlags::empty()).unwrap();
    let (d0, d1) = (f0.device_pfn(), f1.device_pfn());
    assert_eq!(phys.pagemap_of(d0.as_u64()).unwrap().owner(), a);
    assert_eq!(phys.pagemap_of(d1.as_u64()).unwrap().owner(), b);
    for f in [f0, f1] {
        drop(f.unlock());
    }
}

#[test]
fn memunmap_waits_for_frames_and_retires_the_pagemap() {
    let phys = machine();
    let pgmap = memremap_pages(
        &phys,
        config(MemoryType::DevicePrivate, Owner::new_unique(), 2),
        Arc::new(CountingOps::default()),
    )
    .unwrap();
    let f = pgmap.alloc(0, FrameFlags::empty()).unwrap();
    let dpfn = f.device_pfn();
    assert!(matches!(
        pgmap.memunmap(),
        Err(PagemapError::Busy { in_use: 1 })
    ));
    assert!(pgmap.is_live(), "a refused memunmap changes nothing");
    drop(f.unlock());
    pgmap.memunmap().unwrap();
    assert!(!pgmap.is_live());
    assert!(!phys.contains_device(dpfn));
    assert!(pgmap.alloc(0, FrameFlags::empty()).is_err());
    pgmap.memunmap().unwrap();
    // Sections are never reused: the next pagemap gets a new one.
    let next = memremap_pages(
        &phys,
        config(MemoryType::DevicePrivate, Owner::new_unique(), 2),
        Arc::new(CountingOps::default()),
    )
    .unwrap();
    assert_ne!(next.id(), pgmap.id());
}

#[test]
fn sections_run_out_with_a_typed_error() {
    let phys = machine();
    let ops: Arc<dyn DevPagemapOps> = Arc::new(CountingOps::default());
    let owner = Owner::new_unique();
    for _ in 1..NR_SECTIONS {
        memremap_pages(
            &phys,
            config(MemoryType::DevicePrivate, owner, 2),
            ops.clone(),
        )
        .unwrap();
    }
    let e = memremap_pages(&phys, config(MemoryType::DevicePrivate, owner, 2), ops).unwrap_err();
    assert!(matches!(e, PagemapError::NoSpace));
}

#[test]
#[should_panic(expected = "is not a device-private frame")]
fn a_cpu_pfn_is_not_a_device_pfn() {
    let phys = machine();
    let _ = phys.device_frame(DevicePfn::new(5));
}
