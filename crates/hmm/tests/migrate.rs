//! `migrate_vma` at the core API: which pages migrate (the "does not migrate" rows), the
//! events and owners raised, bytes both ways, and what a dropped stage leaves behind.

mod common;

use common::{copy_to, device, fill, page, Machine, RW};
use hmm::addr::{DevicePfn, VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::migrate::{
    migrate_device_range, migrate_vma_setup, MigrateError, MigratePfn, MigrateVma, MigrateVmaFlags,
};
use hmm::mm::{GupFlags, MapFlags, MemFile, Mm, Prot, SwapKind, ThpMode};
use hmm::notifier::{NotifierEvent, Owner};
use hmm::phys::{FrameFlags, FrameRef};
use hmm::zone_device::DevPagemap;

fn args(start: VirtAddr, npages: u64, owner: Owner, flags: MigrateVmaFlags) -> MigrateVma {
    MigrateVma {
        start,
        end: page(start, npages),
        pgmap_owner: Some(owner),
        flags,
        fault_page: None,
    }
}

/// Migrates `npages` from `a` to `dev`, copying; returns the src words after setup.
fn to_device(m: &Machine, dev: &DevPagemap, a: VirtAddr, npages: u64) -> Vec<MigratePfn> {
    let mmap = m.mm.mmap_read();
    let mig = migrate_vma_setup(
        &mmap,
        args(a, npages, dev.owner(), MigrateVmaFlags::SELECT_SYSTEM),
    )
    .unwrap();
    let src = mig.src().to_vec();
    copy_to(dev, mig);
    src
}

fn device_byte(m: &Machine, mm: &Mm, a: VirtAddr) -> Option<u8> {
    let e = mm.pagemap(a, 1).unwrap()[0];
    (e.swap == Some(hmm::mm::SwapKind::DevicePrivate)).then(|| {
        let mut b = [0u8];
        m.phys
            .device_frame(DevicePfn::new(e.pfn.unwrap()))
            .read(0, &mut b);
        b[0]
    })
}

#[test]
fn bad_arguments_are_einval() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let a = m.map(4, RW, MapFlags::PRIVATE);
    // Adjacent, with another protection so the two do not merge.
    let b = m.map(4, Prot::READ, MapFlags::PRIVATE);
    assert_eq!(b.checked_add(4 * PAGE_SIZE).unwrap(), a, "adjacent VMAs");
    m.phys.set_nr_hugepages(1);
    let h =
        m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB)
            .unwrap();
    let mmap = m.mm.mmap_read();
    let sel = MigrateVmaFlags::SELECT_SYSTEM;
    let inval = |r: Result<_, MigrateError>| matches!(r, Err(MigrateError::Inval { .. }));
    let mut unaligned = args(a, 1, owner, sel);
    unaligned.start = a.checked_add(1).unwrap();
    assert!(inval(migrate_vma_setup(&mmap, unaligned).map(|_| ())));
    assert!(inval(
        migrate_vma_setup(&mmap, args(a, 0, owner, sel)).map(|_| ())
    ));
    assert!(
        inval(migrate_vma_setup(&mmap, args(b, 8, owner, sel)).map(|_| ())),
        "two VMAs"
    );
    assert!(inval(
        migrate_vma_setup(&mmap, args(VirtAddr::new(0x10000), 1, owner, sel)).map(|_| ())
    ));
    assert!(
        inval(migrate_vma_setup(&mmap, args(h, 1, owner, sel)).map(|_| ())),
        "hugetlb"
    );
    let dev = device(&m, owner);
    let f = dev.alloc(0, FrameFlags::empty()).unwrap();
    let mut fp = args(a, 1, owner, MigrateVmaFlags::SELECT_DEVICE_PRIVATE);
    fp.fault_page = Some(f.device_pfn());
    let f = f.unlock();
    assert!(
        inval(migrate_vma_setup(&mmap, fp).map(|_| ())),
        "unlocked fault page"
    );
    drop(f);
    drop(mmap);
    assert_eq!(m.mm.stats().migrate.setups, 0);
    assert!(m.events().is_empty(), "a refused setup raises nothing");
}

#[test]
fn one_migrate_range_with_the_owner_and_none_from_pages_without_holes() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 8, 1);
    m.events();
    to_device(&m, &dev, a, 8);
    let ranges = m.rec.take();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert_eq!(ranges[0].event, NotifierEvent::Migrate);
    assert_eq!(ranges[0].owner, Some(owner));
    assert_eq!((ranges[0].start(), ranges[0].end()), (a, page(a, 8)));
    for i in 0..8 {
        let want = data[(i * PAGE_SIZE) as usize];
        assert_eq!(device_byte(&m, &m.mm, page(a, i)), Some(want));
    }
    m.mm.audit().unwrap();
    // Holes: the pages stage opens a second MIGRATE range from the first hole to the end.
    let b = m.map(8, RW, MapFlags::PRIVATE);
    fill(&m, b, 2, 2);
    m.events();
    let src = to_device(&m, &dev, b, 8);
    assert_eq!(src.iter().filter(|w| w.is_migrating()).count(), 8);
    assert_eq!(src.iter().filter(|w| w.is_valid()).count(), 2);
    let ranges = m.rec.take();
    assert_eq!(ranges.len(), 2);
    assert_eq!(
        (ranges[1].event, ranges[1].owner),
        (NotifierEvent::Migrate, Some(owner))
    );
    assert_eq!(
        (ranges[1].start(), ranges[1].end()),
        (page(b, 2), page(b, 8))
    );
    assert_eq!(device_byte(&m, &m.mm, page(b, 5)), Some(0));
    m.mm.audit().unwrap();
}

#[test]
fn selection_rows_that_do_not_migrate() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    fill(&m, a, 8, 3);
    let mmap = m.mm.mmap_read();
    // Without SELECT_SYSTEM, system pages are not selected (holes would be).
    let mig = migrate_vma_setup(&mmap, args(a, 8, owner, MigrateVmaFlags::empty())).unwrap();
    assert_eq!(mig.cpages(), 0);
    assert!(mig.src().iter().all(|w| w.is_empty()));
    drop(mig);
    // A locked page is skipped (trylock).
    let locked = m.mm.pagemap(page(a, 1), 1).unwrap()[0].pfn.unwrap();
    let lp = m.phys.frame(hmm::addr::Pfn::new(locked));
    assert!(lp.meta().trylock());
    let mig = migrate_vma_setup(&mmap, args(a, 8, owner, MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
    assert_eq!(mig.cpages(), 7);
    assert!(mig.src()[1].is_empty());
    drop(mig);
    lp.meta().unlock();
    drop(mmap);
    // Shared memory: holes cannot be filled (src 0), pages are not anonymous and are put
    // back by the pages stage.
    let s = m.map(4, RW, MapFlags::SHARED);
    fill(&m, s, 2, 4);
    let src = to_device(&m, &dev, s, 4);
    assert!(
        src[2].is_empty() && src[3].is_empty(),
        "holes of shared memory"
    );
    assert_eq!(dev.nr_in_use(), 0, "shared pages stay in system memory");
    assert_eq!(m.mm.stats().migrate.pages_migrated, 0);
    // A private file page that was never written stays too.
    let f = MemFile::new(&m.phys);
    f.pwrite(0, &[5; 4096]).unwrap();
    let p =
        m.mm.mmap_file(None, PAGE_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    m.mm.read_val::<u8>(p).unwrap();
    to_device(&m, &dev, p, 1);
    assert_eq!(dev.nr_in_use(), 0);
    assert_eq!(m.mm.read_val::<u8>(p).unwrap(), 5);
    m.mm.audit().unwrap();
}

#[test]
fn pins_and_references_keep_pages_in_place() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 4, 5);
    let pin = m.mm.pin_user_pages(page(a, 0), 1, GupFlags::WRITE).unwrap();
    let gup =
        m.mm.get_user_pages(page(a, 1), 1, GupFlags::empty())
            .unwrap();
    let src = to_device(&m, &dev, a, 4);
    // A pinned exclusive page is not collected; a page with an extra reference is, and
    // the pin check puts it back before setup returns: neither is in `src`.
    assert!(src[0].is_empty() && src[1].is_empty());
    assert!(src[2].is_migrating() && src[3].is_migrating());
    assert_eq!(dev.nr_in_use(), 2);
    let s = m.mm.stats().migrate;
    assert_eq!(
        (s.pages_collected, s.pages_migrated, s.pages_restored),
        (2, 2, 1)
    );
    drop(pin);
    drop(gup);
    let mut back = vec![0u8; 2 * PAGE_SIZE as usize];
    m.mm.read(a, &mut back).unwrap();
    assert_eq!(back, &data[..back.len()]);
    m.mm.audit().unwrap();
}

#[test]
fn dropping_a_stage_loses_nothing() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 6, 6);
    {
        let mmap = m.mm.mmap_read();
        let mut mig =
            migrate_vma_setup(&mmap, args(a, 8, owner, MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
        assert_eq!(mig.cpages(), 8);
        // Destinations for some entries, then the migration is dropped before pages().
        for i in [0usize, 6] {
            let d = dev.alloc(0, FrameFlags::empty()).unwrap();
            mig.set_dst(i, d, true).unwrap();
        }
    }
    assert_eq!(dev.nr_in_use(), 0, "the destinations were freed");
    let mut back = vec![0u8; data.len()];
    m.mm.read(a, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(m.mm.stats().migrate.pages_restored, 6);
    m.mm.audit().unwrap();
    // Dropped after pages(): finalized.
    {
        let mmap = m.mm.mmap_read();
        let mut mig =
            migrate_vma_setup(&mmap, args(a, 2, owner, MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
        let d = dev.alloc(0, FrameFlags::empty()).unwrap();
        d.copy_from(&mig.src_page(0).unwrap());
        mig.set_dst(0, d, true).unwrap();
        let _pages = mig.pages();
    }
    assert_eq!(device_byte(&m, &m.mm, a), Some(data[0]));
    assert_eq!(
        m.mm.read_val::<u8>(page(a, 1)).unwrap(),
        data[PAGE_SIZE as usize]
    );
    m.mm.audit().unwrap();
}

#[test]
fn a_cpu_fault_in_a_hole_wins_over_the_insertion() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    let mm2 = m.mm.clone();
    let mmap = m.mm.mmap_read();
    let mut mig =
        migrate_vma_setup(&mmap, args(a, 2, owner, MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
    assert_eq!(mig.cpages(), 2);
    // A CPU write fills the hole meanwhile (it only needs the mmap lock for reading).
    std::thread::scope(|s| {
        s.spawn(|| mm2.write_val(a, 0x42u8).unwrap());
    });
    for i in 0..2 {
        let d = dev.alloc(0, FrameFlags::empty()).unwrap();
        d.zero();
        mig.set_dst(i, d, true).unwrap();
    }
    let p = mig.pages();
    assert!(!p.src()[0].is_migrating(), "the insertion lost the race");
    assert!(p.src()[1].is_migrating());
    let out = p.finalize();
    assert_eq!((out.migrated, out.restored), (1, 0));
    drop(mmap);
    assert_eq!(m.mm.read_val::<u8>(a).unwrap(), 0x42);
    assert_eq!(dev.nr_in_use(), 1);
    m.mm.audit().unwrap();
}

#[test]
fn thp_ranges_are_split_and_keep_every_byte() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    m.mm.set_thp_mode(ThpMode::Always);
    let t = m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE).unwrap();
    let data = fill(&m, t, 512, 7);
    assert_eq!(m.mm.stats().faults.thp_anon, 1);
    to_device(&m, &dev, page(t, 100), 8);
    assert_eq!(dev.nr_in_use(), 8);
    assert!(m.mm.stats().thp_split_folio >= 1);
    assert_eq!(
        device_byte(&m, &m.mm, page(t, 103)),
        Some(data[103 * PAGE_SIZE as usize])
    );
    // The rest of the former THP is still system memory with its bytes.
    let mut back = vec![0u8; 8 * PAGE_SIZE as usize];
    m.mm.read(page(t, 92), &mut back).unwrap();
    assert_eq!(
        back,
        &data[92 * PAGE_SIZE as usize..100 * PAGE_SIZE as usize]
    );
    m.mm.audit().unwrap();
}

#[test]
fn forked_pages_migrate_in_every_address_space() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 2, 8);
    let child = m.mm.fork().unwrap();
    let src = to_device(&m, &dev, a, 2);
    assert!(src.iter().all(|w| w.is_migrating()));
    // The child's mapping was moved too (through the reverse map), read-only.
    for mm in [&m.mm, &child] {
        assert_eq!(device_byte(&m, mm, a), Some(data[0]));
    }
    let f: FrameRef<'_> = m
        .phys
        .device_frame(DevicePfn::new(m.mm.pagemap(a, 1).unwrap()[0].pfn.unwrap()));
    assert_eq!((f.meta().mapcount(), f.meta().refcount()), (2, 2));
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn exclusive_entries_and_unsplittable_thps_are_not_collected() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    // A device-exclusive entry gives src 0 (only its holder may touch it).
    let a = m.map(2, RW, MapFlags::PRIVATE);
    fill(&m, a, 2, 9);
    {
        let mmap = m.mm.mmap_read();
        let _excl = hmm::exclusive::make_device_exclusive(&mmap, a, None).unwrap();
    }
    let src = to_device(&m, &dev, a, 2);
    assert!(src[0].is_empty() && src[1].is_migrating());
    // A THP that cannot be split (a pin) ends collection in its PMD
    // (`migrate_vma_collect_skip` to the PMD's end); the next PMD's THP splits and moves.
    m.mm.set_thp_mode(ThpMode::Always);
    let t =
        m.mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let data = fill(&m, t, 1024, 10);
    let pin =
        m.mm.pin_user_pages(page(t, 300), 1, GupFlags::empty())
            .unwrap();
    let before = dev.nr_in_use();
    let src = to_device(&m, &dev, page(t, 8), 16);
    assert!(
        src.iter().all(|w| w.is_empty()),
        "nothing after the failed split in its PMD"
    );
    assert_eq!(dev.nr_in_use(), before);
    let src = to_device(&m, &dev, page(t, 504), 16);
    assert!(
        src[..8].iter().all(|w| w.is_empty()),
        "the pinned THP's PMD"
    );
    assert!(src[8..].iter().all(|w| w.is_migrating()), "the next PMD");
    assert_eq!(dev.nr_in_use(), before + 8);
    drop(pin);
    // Every byte survived: in system memory around the eight pages on the device, whose
    // first bytes the device's frames hold.
    let at = |k: u64| (k * PAGE_SIZE) as usize;
    for (from, to) in [(0, 512), (520, 1024)] {
        let mut b = vec![0u8; at(to - from)];
        m.mm.read(page(t, from), &mut b).unwrap();
        assert!(b == data[at(from)..at(to)], "pages {from}..{to}");
    }
    for k in 512..520 {
        assert_eq!(device_byte(&m, &m.mm, page(t, k)), Some(data[at(k)]));
    }
    m.mm.audit().unwrap();
}

/// A fork while a device eviction holds a page's migration entries (the eviction takes no
/// mmap lock) makes the page shared: exclusivity lives in the entry during a migration
/// (`folio_try_share_anon_rmap_pte`), fork turns the entry readable, and whichever way the
/// eviction ends, neither process may write through to the other.
#[test]
fn a_fork_during_a_device_eviction_leaves_the_page_shared() {
    let m = Machine::new(32);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(1, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 0x1111_u64).unwrap();
    to_device(&m, &dev, a, 1);
    let dpfn = DevicePfn::new(m.mm.pagemap(a, 1).unwrap()[0].pfn.unwrap());
    let exclusive = |f: FrameRef<'_>| {
        f.folio()
            .meta()
            .flags()
            .contains(FrameFlags::ANON_EXCLUSIVE)
    };
    assert!(exclusive(m.phys.device_frame(dpfn)));

    // The eviction unmaps the page; a fork copies its migration entry; the eviction then
    // fails (no destination) and puts the page back in both.
    let eviction = migrate_device_range(&m.phys, dev.frame(0), dev.nr_frames()).unwrap();
    let child = m.mm.fork().unwrap();
    drop(eviction);
    assert!(!exclusive(m.phys.device_frame(dpfn)));
    for mm in [&m.mm, &child] {
        assert_eq!(
            mm.pagemap(a, 1).unwrap()[0].swap,
            Some(SwapKind::DevicePrivate)
        );
        mm.audit().unwrap();
    }

    // The child migrates the page home (as its migrate_to_ram would): both map the new
    // page read-only, and the child's store copies it.
    let mmap = child.mmap_read();
    let mut mig = migrate_vma_setup(
        &mmap,
        args(a, 1, owner, MigrateVmaFlags::SELECT_DEVICE_PRIVATE),
    )
    .unwrap();
    let sys = m.phys.alloc(0, FrameFlags::empty()).unwrap().lock();
    sys.copy_from(&mig.src_page(0).unwrap());
    mig.set_dst(0, sys, false).unwrap();
    assert_eq!(mig.pages().finalize().migrated, 1);
    drop(mmap);
    child.write_val(a, 0xeeee_u64).unwrap();
    assert_eq!(
        m.mm.read_val::<u64>(a).unwrap(),
        0x1111,
        "the child wrote into the parent"
    );
    assert_eq!(child.read_val::<u64>(a).unwrap(), 0xeeee);
    m.mm.audit().unwrap();
    child.audit().unwrap();
}
