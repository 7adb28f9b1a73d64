//! Isolation: a device never obtains a mapping of another device's private pages, nor of a
//! process it does not mirror; and exclusive access is revoked by every kind of CPU access.
//!
//! "Obtains a mapping" is checked where a device could get one: the frames its table
//! holds after each command (every entry must be a frame the mirrored process maps at that
//! address, never a device-private frame of another owner), and what `hmm_range_fault`
//! reports to a driver of another owner.

mod common;

use std::sync::Arc;

use common::{assert_maps_only_what_the_process_maps, page, pattern, rig, Rig, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{GupFlags, MapFlags, Mm, Prot, SwapKind};
use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange};
use hmm::range_fault::{hmm_range_fault, HmmPfn, HmmPfnFlags, HmmRange};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorError, DptTag};

#[test]
fn a_device_never_maps_another_devices_private_pages() {
    let r = rig();
    let (d0, d1) = (r.open(0), r.open(1));
    let a = r.map(8);
    let data = pattern(8, 3);
    r.mm.write(a, &data).unwrap();
    assert_eq!(
        r.run(&d0, DmirrorCmd::MigrateToDev, a, 8).unwrap().cpages,
        8
    );
    assert_eq!(assert_maps_only_what_the_process_maps(&d0, &r.mm, a, 8), 8);
    // Device 1 reads: device 0's pages come back to RAM first; device 1 maps RAM.
    r.run(&d1, DmirrorCmd::Read, a, 8).unwrap();
    assert_eq!(r.buf_bytes(data.len()), data);
    assert_eq!(assert_maps_only_what_the_process_maps(&d1, &r.mm, a, 8), 8);
    for e in r.mm.pagemap(a, 8).unwrap() {
        assert!(
            e.present,
            "device 1's fault migrated device 0's page back: {e:?}"
        );
    }
    // Device 0 takes them again; device 1's entries are gone with the migration.
    r.run(&d0, DmirrorCmd::MigrateToDev, a, 8).unwrap();
    assert_eq!(assert_maps_only_what_the_process_maps(&d1, &r.mm, a, 8), 0);
    // Device 1 migrating the range moves none of device 0's pages, maps none of them.
    let moved = r.run(&d1, DmirrorCmd::MigrateToDev, a, 8);
    assert_eq!(
        moved,
        Err(DmirrorError::NoEnt),
        "nothing of device 1's to read back"
    );
    assert_eq!(assert_maps_only_what_the_process_maps(&d1, &r.mm, a, 8), 0);
    // (Its MIGRATE event, not device 0's own, cleared device 0's table; the pages stay.)
    assert_maps_only_what_the_process_maps(&d0, &r.mm, a, 8);
    for e in r.mm.pagemap(a, 8).unwrap() {
        assert_eq!(
            e.swap,
            Some(SwapKind::DevicePrivate),
            "device 0's page moved"
        );
    }
    r.run(&d0, DmirrorCmd::Read, a, 8).unwrap();
    assert_eq!(r.buf_bytes(data.len()), data);
    assert_eq!(assert_maps_only_what_the_process_maps(&d0, &r.mm, a, 8), 8);
    r.mm.audit().unwrap();
}

/// A driver of another owner asking `hmm_range_fault` for a snapshot (no fault) of
/// device-private pages gets no frame: the kernel never hands out another device's page.
#[test]
fn hmm_range_fault_reports_no_frame_of_another_owners_private_page() {
    struct SetSeq;
    impl IntervalNotifierOps for SetSeq {
        fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
            sub.set_seq(seq);
            true
        }
    }
    let r = rig();
    let d0 = r.open(0);
    let a = r.map(4);
    r.mm.write(a, &pattern(4, 5)).unwrap();
    r.run(&d0, DmirrorCmd::MigrateToDev, a, 4).unwrap();
    let n =
        r.mm.interval_notifier_insert(a, 4 * PAGE_SIZE, Arc::new(SetSeq))
            .unwrap();
    let snapshot = |owner| {
        let mut pfns = [HmmPfn::default(); 4];
        let mut range = HmmRange {
            notifier: &n,
            notifier_seq: n.read_begin(),
            start: a,
            end: page(a, 4),
            hmm_pfns: &mut pfns,
            default_flags: HmmPfnFlags::empty(),
            pfn_flags_mask: HmmPfnFlags::empty(),
            dev_private_owner: owner,
        };
        hmm_range_fault(&r.mm.mmap_read(), &mut range).unwrap();
        pfns
    };
    for owner in [None, Some(r.driver.device(1).owner())] {
        for p in snapshot(owner) {
            assert!(
                !p.is_valid() && p.frame_nr() == 0,
                "owner {owner:?} got {p:?}"
            );
        }
    }
    // The owner itself is told the pages are its own.
    let pfns = snapshot(Some(r.driver.device(0).owner()));
    assert!(pfns.iter().all(|p| p.is_valid()));
}

#[test]
fn a_device_sees_only_the_process_it_mirrors() {
    let r = rig();
    let other = Mm::new(r.phys.clone());
    // The same addresses in both processes, different bytes.
    let a = r.map(4);
    let b = other
        .mmap(
            Some(a),
            4 * PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        )
        .unwrap();
    assert_eq!(a, b);
    r.mm.write(a, &pattern(4, 1)).unwrap();
    other.write(b, &pattern(4, 2)).unwrap();
    let d = r.open(0);
    r.run(&d, DmirrorCmd::Read, a, 4).unwrap();
    assert_eq!(r.buf_bytes(4 * PAGE_SIZE as usize), pattern(4, 1));
    assert_eq!(assert_maps_only_what_the_process_maps(&d, &r.mm, a, 4), 4);
    let theirs = other.pagemap(b, 4).unwrap();
    for i in 0..4 {
        let e = d.lookup(page(a, i)).unwrap();
        assert_ne!(
            Some(e.frame_nr),
            theirs[i as usize].pfn,
            "a frame of the other process"
        );
    }
    // The device writes: only the mirrored process changes.
    r.mm.write(r.buf, &vec![0xee; 4 * PAGE_SIZE as usize])
        .unwrap();
    r.run(&d, DmirrorCmd::Write, a, 4).unwrap();
    let mut back = vec![0u8; 4 * PAGE_SIZE as usize];
    other.read(b, &mut back).unwrap();
    assert_eq!(back, pattern(4, 2));
    // Migration moves only the mirrored process's pages.
    r.run(&d, DmirrorCmd::MigrateToDev, a, 4).unwrap();
    assert!(other.pagemap(b, 4).unwrap().iter().all(|e| e.present));
    // A mirror of a process that has exited sees nothing: every command is refused.
    let gone = Mm::new(r.phys.clone());
    let g = gone
        .mmap(None, 4 * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap();
    gone.write(g, &pattern(4, 9)).unwrap();
    let dg = Dmirror::open(r.driver.device(1), &gone).unwrap();
    drop(gone);
    for cmd in [
        DmirrorCmd::Read,
        DmirrorCmd::Write,
        DmirrorCmd::MigrateToDev,
        DmirrorCmd::Exclusive,
    ] {
        let mut c = hmm_dmirror::HmmDmirrorCmd {
            addr: g.as_u64(),
            ptr: g.as_u64(),
            npages: 4,
            ..Default::default()
        };
        assert!(
            dg.ioctl(cmd, &mut c).is_err(),
            "{cmd:?} on an exited process"
        );
        assert_eq!(dg.nr_mapped(), 0);
    }
    r.mm.audit().unwrap();
    other.audit().unwrap();
}

/// Makes 4 pages at `a` exclusive to device 0 and checks they are.
fn exclusive(r: &Rig, d: &Dmirror, a: VirtAddr) {
    r.run(d, DmirrorCmd::Exclusive, a, 4).unwrap();
    assert_eq!(
        r.run(d, DmirrorCmd::CheckExclusive, a, 4),
        Err(DmirrorError::Perm)
    );
    for i in 0..4 {
        assert_eq!(d.lookup(page(a, i)).map(|e| e.tag), Some(DptTag::Atomic));
    }
}

#[test]
fn every_kind_of_cpu_access_revokes_exclusive_access() {
    type Access = fn(&Rig, VirtAddr);
    let accesses: [(&str, Access); 9] = [
        ("load", |r, a| {
            r.mm.read_val::<u8>(page(a, 1)).unwrap();
        }),
        ("store", |r, a| r.mm.write_val(page(a, 1), 7u8).unwrap()),
        ("get_user_pages", |r, a| {
            drop(
                r.mm.get_user_pages(page(a, 1), 1, GupFlags::empty())
                    .unwrap(),
            );
        }),
        ("pin_user_pages", |r, a| {
            drop(
                r.mm.get_user_pages(page(a, 1), 1, GupFlags::PIN | GupFlags::WRITE)
                    .unwrap(),
            );
        }),
        ("mprotect", |r, a| {
            r.mm.mprotect(page(a, 1), PAGE_SIZE, Prot::READ).unwrap()
        }),
        ("madvise(DONTNEED)", |r, a| {
            r.mm.madvise(page(a, 1), PAGE_SIZE, hmm::mm::Advice::DontNeed)
                .unwrap()
        }),
        ("munmap", |r, a| r.mm.munmap(page(a, 1), PAGE_SIZE).unwrap()),
        ("fork", |r, _| drop(r.mm.fork().unwrap())),
        ("another device's read", |r, a| {
            let d1 = r.open(1);
            r.run(&d1, DmirrorCmd::Read, page(a, 1), 1).unwrap();
        }),
    ];
    for (what, access) in accesses {
        let r = rig();
        let d = r.open(0);
        let a = r.map(4);
        let data = pattern(4, 7);
        r.mm.write(a, &data).unwrap();
        exclusive(&r, &d, a);
        access(&r, a);
        let tag = d.lookup(page(a, 1)).map(|e| e.tag);
        assert_ne!(
            tag,
            Some(DptTag::Atomic),
            "{what} left page 1 exclusive to the device"
        );
        // mprotect keeps a (read-only) device-exclusive entry, as the kernel's
        // change_pte_range does; the device's mapping went with the invalidation.
        let e = r.mm.pagemap(page(a, 1), 1).unwrap()[0];
        if what != "mprotect" {
            assert_ne!(e.swap, Some(SwapKind::DeviceExclusive), "{what}");
        }
        // The other pages stay exclusive (fork restores every entry: none stay).
        let left = (0..4)
            .filter(|&i| d.lookup(page(a, i)).map(|e| e.tag) == Some(DptTag::Atomic))
            .count();
        assert_eq!(left, if what == "fork" { 0 } else { 3 }, "{what}");
        r.mm.audit().unwrap();
    }
}
