//! Migration through dmirror: to the device and back, CPU faults on device pages, holes,
//! re-migration (seed 002), two devices, fork, pins, allocation failures, bad input.

mod common;

use common::{assert_maps_only_what_the_process_maps, page, pattern, rig, Rig, RW};
use hmm::addr::PAGE_SIZE;
use hmm::mm::{GupFlags, MapFlags, MemFile, Prot, SwapKind};
use hmm::notifier::NotifierEvent;
use hmm_dmirror::{prot, DmirrorCmd, DmirrorError, HmmDmirrorCmd, HMM_DMIRROR_FLAG_FAIL_ALLOC};

#[test]
fn migrate_to_device_and_fault_back() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(16);
    let data = pattern(16, 1);
    r.mm.write(a, &data).unwrap();
    let before = r.mm.stats();
    let c = r.run(&d, DmirrorCmd::MigrateToDev, a, 16).unwrap();
    assert_eq!(c.cpages, 16);
    assert_eq!(
        r.buf_bytes(data.len()),
        data,
        "read back from device memory"
    );
    let s = r.mm.stats().since(&before);
    assert_eq!(s.migrate.pages_collected, 16);
    assert_eq!(s.migrate.pages_migrated, 16);
    assert_eq!(s.notifier.invalidations[NotifierEvent::Migrate as usize], 1);
    assert_eq!(d.stats().pages_copied_to_device, 16);
    assert_eq!(
        d.stats().invalidations,
        0,
        "the mirror skipped its own MIGRATE"
    );
    assert_eq!(r.driver.device(0).nr_in_use(), 16);
    assert!(r
        .snapshot(&d, a, 16)
        .iter()
        .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE));
    let pm = r.mm.pagemap(a, 1).unwrap()[0];
    assert_eq!(pm.swap, Some(hmm::mm::SwapKind::DevicePrivate));
    r.mm.audit().unwrap();

    // The CPU touches page 3: migrate_to_ram brings it back.
    let before = r.mm.stats();
    let mut b = vec![0u8; PAGE_SIZE as usize];
    r.mm.read(page(a, 3), &mut b).unwrap();
    assert_eq!(b, &data[3 * PAGE_SIZE as usize..4 * PAGE_SIZE as usize]);
    let s = r.mm.stats().since(&before);
    assert_eq!(s.faults.device_private, 1);
    assert_eq!(s.migrate.pages_migrated, 1);
    assert_eq!(r.driver.device(0).nr_in_use(), 15);
    assert_eq!(
        d.lookup(page(a, 3)),
        None,
        "the device's entry went with the page"
    );
    let snap = r.snapshot(&d, a, 4);
    assert_eq!(snap[3], prot::WRITE, "a system page again");
    // Writes go to the system page now.
    r.mm.write_val(page(a, 3), 0xeeu8).unwrap();
    r.mm.audit().unwrap();

    // Back to system memory with MIGRATE_TO_SYS.
    let c = r.run(&d, DmirrorCmd::MigrateToSys, a, 16).unwrap();
    assert_eq!(c.cpages, 15);
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    let mut all = vec![0u8; data.len()];
    r.mm.read(a, &mut all).unwrap();
    let mut want = data.clone();
    want[3 * PAGE_SIZE as usize] = 0xee;
    assert_eq!(all, want);
    assert_eq!(
        d.nr_mapped(),
        0,
        "MIGRATE_TO_SYS erased the device's entries"
    );
    r.mm.audit().unwrap();
}

#[test]
fn holes_and_zero_pages_become_zeroed_device_pages() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(8);
    r.mm.read_val::<u8>(page(a, 2)).unwrap(); // zero page
    let c = r.run(&d, DmirrorCmd::MigrateToDev, a, 8).unwrap();
    assert_eq!(c.cpages, 8);
    assert!(r.buf_bytes(8 * PAGE_SIZE as usize).iter().all(|&b| b == 0));
    assert_eq!(d.stats().pages_zero_filled, 8);
    assert_eq!(d.stats().pages_copied_to_device, 0, "nothing to copy");
    assert!(r
        .snapshot(&d, a, 8)
        .iter()
        .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE));
    assert_eq!(r.mm.read_val::<u64>(page(a, 5)).unwrap(), 0);
    r.mm.audit().unwrap();
}

#[test]
fn remigrating_costs_nothing_for_pages_already_there() {
    // Seed 002: migrate, the CPU takes half back, migrate the whole range again.
    let r = rig();
    let d = r.open(0);
    let a = r.map(32);
    let data = pattern(32, 2);
    r.mm.write(a, &data).unwrap();
    r.run(&d, DmirrorCmd::MigrateToDev, a, 32).unwrap();
    let mut b = vec![0u8; 16 * PAGE_SIZE as usize];
    r.mm.read(a, &mut b).unwrap();
    let before = d.stats();
    let mm_before = r.mm.stats();
    let c = r.run(&d, DmirrorCmd::MigrateToDev, a, 32).unwrap();
    assert_eq!(c.cpages, 32);
    assert_eq!(r.buf_bytes(data.len()), data);
    let after = d.stats();
    assert_eq!(after.invalidations - before.invalidations, 0);
    assert_eq!(after.pages_invalidated - before.pages_invalidated, 0);
    assert_eq!(
        after.pages_copied_to_device - before.pages_copied_to_device,
        16,
        "only the pages that came back are copied"
    );
    assert_eq!(r.mm.stats().since(&mm_before).migrate.pages_collected, 16);
    r.mm.audit().unwrap();
}

#[test]
fn without_the_owner_filter_remigration_invalidates_the_device() {
    let r = rig();
    let d = r.open(0);
    d.set_owner_filter(false);
    let a = r.map(32);
    r.mm.write(a, &pattern(32, 3)).unwrap();
    // The first migration's own MIGRATE already erases what the device mapped.
    r.run(&d, DmirrorCmd::MigrateToDev, a, 32).unwrap();
    let mut b = vec![0u8; 16 * PAGE_SIZE as usize];
    r.mm.read(a, &mut b).unwrap();
    let before = d.stats();
    let res = r.run(&d, DmirrorCmd::MigrateToDev, a, 32);
    let after = d.stats();
    assert!(after.invalidations > before.invalidations);
    assert_eq!(
        after.pages_invalidated - before.pages_invalidated,
        16,
        "the pages already on the device lost their device mapping"
    );
    assert_eq!(
        res.unwrap_err(),
        DmirrorError::NoEnt,
        "and cannot be read back"
    );
}

#[test]
fn another_devices_pages_are_left_alone() {
    let r = rig();
    let (d0, d1) = (r.open(0), r.open(1));
    let a = r.map(16);
    let data = pattern(16, 4);
    r.mm.write(a, &data).unwrap();
    r.run(&d0, DmirrorCmd::MigrateToDev, a, 8).unwrap();
    // Device 1 migrates the whole range: only the system half moves.
    let res = r.run(&d1, DmirrorCmd::MigrateToDev, a, 16);
    assert_eq!(
        res.unwrap_err(),
        DmirrorError::NoEnt,
        "device 0's pages are not device 1's"
    );
    assert_eq!(r.driver.device(0).nr_in_use(), 8);
    assert_eq!(r.driver.device(1).nr_in_use(), 8);
    let snap = r.snapshot(&d1, a, 16);
    assert!(snap[..8].iter().all(|&b| b == prot::NONE), "{snap:x?}");
    assert!(snap[8..]
        .iter()
        .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE));
    let snap0 = r.snapshot(&d0, a, 16);
    assert!(snap0[..8]
        .iter()
        .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE));
    assert!(snap0[8..].iter().all(|&b| b == prot::NONE));
    // Device 1 reading device 0's pages faults them back through device 0.
    let c = r.run(&d1, DmirrorCmd::Read, a, 16).unwrap();
    assert_eq!(c.cpages, 16);
    assert_eq!(r.buf_bytes(data.len()), data);
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    assert_eq!(r.driver.device(1).nr_in_use(), 8);
    // Device 0 migrating back selects nothing of device 1.
    let c = r.run(&d0, DmirrorCmd::MigrateToSys, a, 16).unwrap();
    assert_eq!(c.cpages, 0);
    r.mm.audit().unwrap();
}

#[test]
fn fork_shares_device_pages_until_a_write() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(4);
    let data = pattern(4, 5);
    r.mm.write(a, &data).unwrap();
    r.run(&d, DmirrorCmd::MigrateToDev, a, 4).unwrap();
    let child = r.mm.fork().unwrap();
    r.mm.audit().unwrap();
    // The child reads: the page comes back for both (one system page, read-only).
    let mut b = vec![0u8; 4 * PAGE_SIZE as usize];
    child.read(a, &mut b).unwrap();
    assert_eq!(b, data);
    // The child writes: copy on write, the parent keeps its data.
    child.write_val(a, 0x11u8).unwrap();
    let mut p = vec![0u8; 4 * PAGE_SIZE as usize];
    r.mm.read(a, &mut p).unwrap();
    assert_eq!(p, data);
    assert_eq!(child.read_val::<u8>(a).unwrap(), 0x11);
    r.mm.audit().unwrap();
    child.audit().unwrap();
    drop(child);
    r.mm.audit().unwrap();
}

#[test]
fn pinned_pages_do_not_migrate() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(4);
    r.mm.write(a, &pattern(4, 6)).unwrap();
    let pin =
        r.mm.pin_user_pages(page(a, 1), 1, GupFlags::WRITE | GupFlags::PIN)
            .unwrap();
    assert_eq!(
        r.run(&d, DmirrorCmd::MigrateToDev, a, 4).unwrap_err(),
        DmirrorError::NoEnt
    );
    assert_eq!(r.driver.device(0).nr_in_use(), 3);
    let snap = r.snapshot(&d, a, 4);
    assert_eq!(
        snap[1],
        prot::WRITE,
        "the pinned page stayed in system memory"
    );
    drop(pin);
    r.mm.audit().unwrap();
}

#[test]
fn fail_alloc_skips_one_page() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(4);
    r.mm.write(a, &pattern(4, 7)).unwrap();
    let mut c = HmmDmirrorCmd {
        addr: a.as_u64(),
        ptr: r.buf.as_u64(),
        npages: HMM_DMIRROR_FLAG_FAIL_ALLOC,
        ..HmmDmirrorCmd::default()
    };
    d.ioctl(DmirrorCmd::Flags, &mut c).unwrap();
    assert_eq!(
        r.run(&d, DmirrorCmd::MigrateToDev, a, 4).unwrap_err(),
        DmirrorError::NoEnt
    );
    assert_eq!(r.driver.device(0).nr_in_use(), 3);
    assert_eq!(d.flags(), 0, "the flag is one-shot");
    let c = r.run(&d, DmirrorCmd::MigrateToDev, a, 4).unwrap();
    assert_eq!(c.cpages, 4);
    r.mm.audit().unwrap();
}

#[test]
fn bad_ranges_are_einval_and_move_nothing() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(4);
    r.mm.write(a, &pattern(4, 8)).unwrap();
    let none =
        r.mm.mmap(None, 2 * PAGE_SIZE, Prot::NONE, MapFlags::PRIVATE)
            .unwrap();
    for which in [DmirrorCmd::MigrateToDev, DmirrorCmd::MigrateToSys] {
        assert!(matches!(
            r.run(&d, which, none, 2),
            Err(DmirrorError::Inval { .. })
        ));
    }
    r.mm.munmap(page(a, 2), PAGE_SIZE).unwrap();
    // The hole stops the command: the pages before it migrate (as in the kernel).
    assert!(matches!(
        r.run(&d, DmirrorCmd::MigrateToDev, a, 4),
        Err(DmirrorError::Inval { .. })
    ));
    assert_eq!(r.driver.device(0).nr_in_use(), 2);
    r.mm.audit().unwrap();
}

#[test]
fn unmap_and_exit_free_device_pages() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(8);
    r.mm.write(a, &pattern(8, 9)).unwrap();
    r.run(&d, DmirrorCmd::MigrateToDev, a, 8).unwrap();
    r.mm.munmap(a, 4 * PAGE_SIZE).unwrap();
    assert_eq!(r.driver.device(0).nr_in_use(), 4);
    assert_eq!(d.nr_mapped(), 4, "UNMAP erased the device's entries");
    let (calloc, cfree) = r.driver.device(0).counts();
    assert_eq!((calloc, cfree), (8, 4));
    drop(r.mm);
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    assert_eq!(r.phys.nr_in_use(), 0);
}

#[test]
fn coherent_devices_migrate_with_present_entries() {
    let r = rig();
    let d = r.open(2);
    let a = r.map(4);
    let data = pattern(4, 10);
    r.mm.write(a, &data).unwrap();
    let c = r.run(&d, DmirrorCmd::MigrateToDev, a, 4).unwrap();
    assert_eq!(c.cpages, 4);
    assert!(r
        .snapshot(&d, a, 4)
        .iter()
        .all(|&b| b == prot::DEV_COHERENT_LOCAL | prot::WRITE));
    // Device 3 sees device 2's coherent memory as a CPU page of another device.
    let d3 = r.open(3);
    assert!(r
        .snapshot(&d3, a, 4)
        .iter()
        .all(|&b| b == prot::DEV_COHERENT_REMOTE | prot::WRITE));
    // The CPU reads coherent memory directly: no fault.
    let before = r.mm.stats();
    let mut b = vec![0u8; data.len()];
    r.mm.read(a, &mut b).unwrap();
    assert_eq!(b, data);
    assert_eq!(r.mm.stats().since(&before).faults.total(), 0);
    let c = r.run(&d, DmirrorCmd::MigrateToSys, a, 4).unwrap();
    assert_eq!(c.cpages, 4);
    assert!(r.snapshot(&d, a, 4).iter().all(|&b| b == prot::WRITE));
    r.mm.audit().unwrap();
}

#[test]
fn release_evicts_every_device_page_wherever_it_is_mapped() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(16);
    let data = pattern(16, 11);
    r.mm.write(a, &data).unwrap();
    r.run(&d, DmirrorCmd::MigrateToDev, a, 16).unwrap();
    let child = r.mm.fork().unwrap();
    assert_eq!(r.driver.device(0).nr_in_use(), 16);
    let before = r.mm.stats();
    r.run(&d, DmirrorCmd::Release, a, 1).unwrap();
    let dev = r.driver.device(0);
    assert_eq!((dev.nr_in_use(), dev.nr_chunks()), (0, 0));
    assert_eq!(dev.counts(), (0, 0), "counts start again");
    assert_eq!(
        d.nr_mapped(),
        0,
        "the CLEARs of the eviction erased the device's entries"
    );
    // Both processes see system pages with the data, without faulting to the device.
    for mm in [&r.mm, &child] {
        let mut b = vec![0u8; data.len()];
        mm.read(a, &mut b).unwrap();
        assert_eq!(b, data);
        assert!(mm.pagemap(a, 16).unwrap().iter().all(|e| e.swap.is_none()));
    }
    assert_eq!(r.mm.stats().since(&before).faults.device_private, 0);
    r.mm.audit().unwrap();
    child.audit().unwrap();
    // The device works again afterwards, with a new chunk; the pages the child shares
    // move for both processes.
    assert_eq!(r.run(&d, DmirrorCmd::MigrateToDev, a, 4).unwrap().cpages, 4);
    assert_eq!((dev.nr_in_use(), dev.nr_chunks()), (4, 1));
    assert_eq!(
        child.pagemap(a, 1).unwrap()[0].swap,
        Some(hmm::mm::SwapKind::DevicePrivate)
    );
    drop(child);
    r.mm.audit().unwrap();
}

#[test]
fn unloading_the_driver_brings_device_memory_home() {
    let r = rig();
    let d = r.open(1);
    let a = r.map(8);
    let data = pattern(8, 12);
    r.mm.write(a, &data).unwrap();
    r.run(&d, DmirrorCmd::MigrateToDev, a, 8).unwrap();
    drop(d);
    let Rig {
        phys, driver, mm, ..
    } = r;
    drop(driver);
    let mut b = vec![0u8; data.len()];
    mm.read(a, &mut b).unwrap();
    assert_eq!(b, data);
    mm.audit().unwrap();
    drop(mm);
    assert_eq!(phys.nr_in_use(), 0);
}

/// A private file mapping's COW copies are anonymous folios: they migrate to the device and
/// back, as in Linux; the file's own pages and the holes of a file mapping do not. (Found by
/// the differential fuzzer, whose audit called such a device-private entry a bug.)
#[test]
fn cow_copies_in_a_private_file_mapping_migrate() {
    let r = rig();
    let d = r.open(0);
    let file = MemFile::new(&r.phys);
    file.truncate(4 * PAGE_SIZE).unwrap();
    let data = pattern(4, 1);
    file.pwrite(0, &data).unwrap();
    let a =
        r.mm.mmap_file(None, 4 * PAGE_SIZE, RW, MapFlags::PRIVATE, &file, 0)
            .unwrap();
    r.mm.write_val(a, 0xaa_u8).unwrap();
    r.mm.write_val(page(a, 1), 0xbb_u8).unwrap();
    r.mm.read_val::<u8>(page(a, 2)).unwrap();
    assert_eq!(
        r.run(&d, DmirrorCmd::MigrateToDev, a, 4),
        Err(DmirrorError::NoEnt),
        "the file page and the hole stay"
    );
    let pm = r.mm.pagemap(a, 4).unwrap();
    let kinds: Vec<_> = pm.iter().map(|e| (e.present, e.swap)).collect();
    let private = (false, Some(SwapKind::DevicePrivate));
    assert_eq!(kinds, [private, private, (true, None), (false, None)]);
    r.mm.audit().unwrap();
    let mut want = data.clone();
    want[0] = 0xaa;
    want[PAGE_SIZE as usize] = 0xbb;
    let mut back = vec![0u8; want.len()];
    r.mm.read(a, &mut back).unwrap();
    assert_eq!(back, want, "the CPU reads the copies back from the device");
    let mut f = vec![0u8; data.len()];
    assert_eq!(file.pread(0, &mut f).unwrap(), data.len());
    assert_eq!(f, data, "the file never changed");
    r.mm.audit().unwrap();
}

/// Two mirrors of one device on one process: the second maps the pages by reading them,
/// then the first migrates them to the device. Both skip the migration's MIGRATE event as
/// their device's own, so the driver itself erases, from every mirror of the device, the
/// entries that map the system pages leaving; the second mirror then faults the pages in
/// again through `hmm_range_fault` and reads the device's copies, not the freed frames.
#[test]
fn migrating_to_a_device_erases_the_pages_from_its_other_mirrors() {
    let r = rig();
    let (a_mirror, b_mirror) = (r.open(0), r.open(0));
    let a = r.map(8);
    let data = pattern(8, 3);
    r.mm.write(a, &data).unwrap();
    r.run(&b_mirror, DmirrorCmd::Read, a, 8).unwrap();
    assert_eq!(b_mirror.nr_mapped(), 8);
    let c = r.run(&a_mirror, DmirrorCmd::MigrateToDev, a, 8).unwrap();
    assert_eq!(c.cpages, 8);
    assert_eq!(b_mirror.stats().invalidations, 0, "B skipped the MIGRATE");
    for i in 0..8 {
        assert_eq!(b_mirror.lookup(page(a, i)), None, "page {i} left B's table");
    }
    assert_maps_only_what_the_process_maps(&a_mirror, &r.mm, a, 8);
    // The freed frames go to new pages with other bytes; B reads the device's copies.
    let other = r.map(8);
    r.mm.write(other, &pattern(8, 4)).unwrap();
    r.run(&b_mirror, DmirrorCmd::Read, a, 8).unwrap();
    assert_eq!(r.buf_bytes(data.len()), data);
    assert_maps_only_what_the_process_maps(&b_mirror, &r.mm, a, 8);
    assert_eq!(
        r.mm.pagemap(a, 8).unwrap()[0].swap,
        Some(SwapKind::DevicePrivate),
        "B's read mapped the device page, it did not bring it home"
    );
}
