//! Regression tests for the hardening issue: huge but valid ranges get a typed error or work
//! in bounded memory, a driver cannot crash the process with a wrong destination, a panic
//! in the middle of a migration unwinds without aborting and leaves nothing locked, and a
//! long-term pin moves device-coherent pages to system memory first.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{device, fill, page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::kvmalloc;
use hmm::migrate::{migrate_vma_setup, MigrateError, MigrateVma, MigrateVmaFlags};
use hmm::mm::{GupFlags, MapFlags, MmError};
use hmm::notifier::Owner;
use hmm::phys::FrameFlags;

fn args(a: VirtAddr, n: u64, owner: Owner, flags: MigrateVmaFlags) -> MigrateVma {
    MigrateVma {
        start: a,
        end: page(a, n),
        pgmap_owner: Some(owner),
        flags,
        fault_page: None,
    }
}

/// Runs `f` on another thread and fails the test if it takes longer than `secs` (a page
/// left locked makes the next access wait for ever).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("the operation hung")
}

#[test]
fn set_dst_refuses_a_wrong_entry_and_gives_the_folio_back() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 4, 3);
    let in_use = (m.phys.nr_in_use(), dev.nr_in_use());
    // Page 1 is locked by someone else, so it is not collected.
    let p1 = m.mm.pagemap(page(a, 1), 1).unwrap()[0].pfn.unwrap();
    let locked = m.phys.frame(hmm::addr::Pfn::new(p1));
    assert!(locked.meta().trylock());
    {
        let mmap = m.mm.mmap_read();
        let mut mig =
            migrate_vma_setup(&mmap, args(a, 4, owner, MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
        assert!(!mig.src()[1].is_migrating());
        for (i, reason) in [
            (4, "no such entry"),
            (usize::MAX, "no such entry"),
            (1, "the entry is not migrating"),
        ] {
            let e = mig
                .set_dst(i, dev.alloc(0, FrameFlags::empty()).unwrap(), true)
                .unwrap_err();
            assert_eq!((e.index, e.reason), (i, reason));
            assert!(
                e.folio.meta().is_locked(),
                "given back as it was handed over"
            );
        }
        let first = dev.alloc(0, FrameFlags::empty()).unwrap();
        first.copy_from(&mig.src_page(0).unwrap());
        mig.set_dst(0, first, true).unwrap();
        let e = mig
            .set_dst(0, dev.alloc(0, FrameFlags::empty()).unwrap(), true)
            .unwrap_err();
        assert_eq!(e.reason, "the entry has a destination");
        drop(e);
        assert_eq!(
            dev.nr_in_use(),
            1,
            "refused folios are freed with the error"
        );
        assert_eq!(mig.pages().finalize().migrated, 1);
    }
    locked.meta().unlock();
    // Page 0 is on the device (this pagemap has no migrate_to_ram: read it there), the
    // rest were put back.
    let on_dev = m.mm.pagemap(a, 1).unwrap()[0].pfn.unwrap();
    let mut back = vec![0u8; data.len()];
    m.phys
        .device_frame(hmm::addr::DevicePfn::new(on_dev))
        .read(0, &mut back[..PAGE_SIZE as usize]);
    m.mm.read(page(a, 1), &mut back[PAGE_SIZE as usize..])
        .unwrap();
    assert_eq!(back, data);
    m.mm.audit().unwrap();
    assert_eq!(
        m.phys.nr_in_use(),
        in_use.0 - 1,
        "page 0's system frame was freed"
    );
    assert_eq!(dev.nr_in_use(), in_use.1 + 1);
}

/// A driver that panics between `set_dst` and `pages` (its copy code, say): the migration
/// is dropped while unwinding, puts every page back and frees the destinations; nothing
/// aborts, nothing stays locked, the bytes are intact.
#[test]
fn a_panic_in_the_middle_of_a_migration_unwinds_and_loses_nothing() {
    let m = Arc::new(Machine::new(32));
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 8, 9);
    let ram_in_use = m.phys.nr_in_use();
    let (m2, dev2) = (Arc::clone(&m), Arc::clone(&dev));
    let unwound = within(20, move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mmap = m2.mm.mmap_read();
            let mut mig =
                migrate_vma_setup(&mmap, args(a, 8, owner, MigrateVmaFlags::SELECT_SYSTEM))
                    .unwrap();
            for i in 0..4 {
                let d = dev2.alloc(0, FrameFlags::empty()).unwrap();
                d.copy_from(&mig.src_page(i).unwrap());
                mig.set_dst(i, d, true).unwrap();
            }
            panic!("the driver's copy engine failed");
        }))
        .is_err()
    });
    assert!(unwound);
    let m2 = Arc::clone(&m);
    let back = within(20, move || {
        let mut back = vec![0u8; 8 * PAGE_SIZE as usize];
        m2.mm.read(a, &mut back).unwrap();
        back
    });
    assert_eq!(back, data);
    m.mm.audit().unwrap();
    assert_eq!(dev.nr_in_use(), 0, "the destinations were freed");
    assert_eq!(m.phys.nr_in_use(), ram_in_use);
}

#[test]
fn migrate_vma_setup_over_a_huge_range_is_refused_before_allocating() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    // 1 TiB + 4 KiB of unpopulated anonymous memory: one page more than a kvmalloc'd
    // array of src words may hold.
    let pages = kvmalloc::max_len::<u64>() + 1;
    let a =
        m.mm.mmap(None, pages * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let mmap = m.mm.mmap_read();
    let r =
        migrate_vma_setup(&mmap, args(a, pages, owner, MigrateVmaFlags::SELECT_SYSTEM)).map(|_| ());
    assert!(matches!(r, Err(MigrateError::Inval { .. })), "{r:?}");
    drop(mmap);
    assert_eq!(m.mm.stats().migrate.setups, 0);
    assert!(m.events().is_empty(), "a refused setup raises nothing");
}

#[test]
fn get_user_pages_and_pagemap_over_huge_ranges_fail_cleanly() {
    let m = Machine::new(32);
    // 64 TiB of unpopulated memory, read through the zero page.
    let pages = 1u64 << 34;
    let a =
        m.mm.mmap(None, pages * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let before = m.phys.nr_in_use();
    for flags in [
        GupFlags::empty(),
        GupFlags::PIN,
        GupFlags::PIN | GupFlags::LONGTERM,
    ] {
        let r = m.mm.get_user_pages(a, pages, flags);
        assert!(matches!(r, Err(MmError::NoMem { .. })), "{flags:?}: {r:?}");
    }
    let r = m.mm.pagemap(a, pages);
    assert!(matches!(r, Err(MmError::NoMem { .. })), "{r:?}");
    assert_eq!(m.phys.nr_in_use(), before, "nothing faulted in");
    m.mm.audit().unwrap();
}

/// A driver that breaks the migration's invariants through the raw metadata (it unlocks a
/// destination it already handed over) and then panics: finalizing while unwinding hits
/// the broken invariant and panics a second time. That second panic is contained (the
/// process goes on, the test harness sees one failure) instead of aborting.
#[test]
fn a_second_panic_while_unwinding_does_not_abort() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    fill(&m, a, 2, 1);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mmap = m.mm.mmap_read();
        let mut mig =
            migrate_vma_setup(&mmap, args(a, 2, owner, MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
        let d = dev.alloc(0, FrameFlags::empty()).unwrap();
        let raw = *d;
        mig.set_dst(0, d, true).unwrap();
        raw.meta().unlock();
        panic!("driver bug");
    }));
    assert!(r.is_err());
}

/// A device-coherent pagemap with owner `owner` (8 MiB, no callbacks).
fn coherent_device(m: &Machine, owner: Owner) -> Arc<hmm::zone_device::DevPagemap> {
    hmm::zone_device::memremap_pages(
        &m.phys,
        hmm::zone_device::PagemapConfig {
            kind: hmm::zone_device::MemoryType::DeviceCoherent,
            owner,
            size_bytes: 8 << 20,
        },
        Arc::new(common::NoOps),
    )
    .unwrap()
}

/// `hmm_gup_test`'s coherent variant: a long-term pin of pages on a coherent device moves
/// them to system memory first (`migrate_longterm_unpinnable_folios`); a plain pin keeps
/// them where they are.
#[test]
fn longterm_pins_migrate_device_coherent_pages_to_system_memory() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = coherent_device(&m, owner);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 4, 5);
    let on_device = |i| {
        let pfn = m.mm.pagemap(page(a, i), 1).unwrap()[0].pfn.unwrap();
        !m.phys.is_ram(hmm::addr::Pfn::new(pfn))
    };
    {
        let mmap = m.mm.mmap_read();
        let mig =
            migrate_vma_setup(&mmap, args(a, 4, owner, MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
        assert_eq!(common::copy_to(&dev, mig), 4);
    }
    assert!((0..4).all(on_device));

    // A short-term pin (and a long-term one of pages already in RAM) pins in place.
    let short = m.mm.pin_user_pages(a, 2, GupFlags::empty()).unwrap();
    assert!(short.pfns().iter().all(|&p| !m.phys.is_ram(p)));
    drop(short);
    assert_eq!(dev.nr_in_use(), 4);

    // A long-term pin of pages 1..3 migrates exactly those, then pins the system copies.
    m.events();
    let pinned =
        m.mm.pin_user_pages(page(a, 1), 2, GupFlags::LONGTERM | GupFlags::WRITE)
            .unwrap();
    assert!(pinned.pfns().iter().all(|&p| m.phys.is_ram(p)));
    assert!(on_device(0) && !on_device(1) && !on_device(2) && on_device(3));
    assert_eq!(dev.nr_in_use(), 2);
    let mut b = vec![0u8; PAGE_SIZE as usize];
    for (k, i) in [1usize, 2].into_iter().enumerate() {
        pinned.read(k, 0, &mut b);
        assert_eq!(
            b,
            data[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize]
        );
    }
    // The pin is the page the process sees: a DMA write is read by the CPU.
    pinned.write(0, 8, b"dma");
    let mut seen = [0u8; 3];
    m.mm.read(page(a, 1).checked_add(8).unwrap(), &mut seen)
        .unwrap();
    assert_eq!(&seen, b"dma");
    drop(pinned);
    let mut back = vec![0u8; data.len()];
    m.mm.read(a, &mut back).unwrap();
    assert_eq!(back[..PAGE_SIZE as usize], data[..PAGE_SIZE as usize]);
    m.mm.audit().unwrap();
}
