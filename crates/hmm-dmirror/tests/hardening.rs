//! Regression tests for the hardening issue, through the driver: commands over huge but
//! valid ranges fail before they allocate or work in bounded memory, no command holds a
//! lock for a time proportional to its range, and a device write is never lost to
//! lazy-free reclaim.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{page, pattern, rig, Rig, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{Advice, MapFlags, Prot};
use hmm_dmirror::{DmirrorCmd, DmirrorError, HmmDmirrorCmd};

/// 64 TiB: half the user address space, never populated.
const HUGE_PAGES: u64 = 1 << 34;

/// Runs `f` on another thread; fails the test if it has not returned after `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("the operation did not finish in time")
}

fn huge(r: &Rig) -> VirtAddr {
    r.mm.mmap(None, HUGE_PAGES * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap()
}

#[test]
fn read_and_write_beyond_the_kvmalloc_bound_are_enomem_before_anything_happens() {
    let r = rig();
    let d = r.open(0);
    let a = huge(&r);
    let in_use = r.phys.nr_in_use();
    // 2 GiB is one byte more than INT_MAX: the bounce buffer's kvmalloc fails.
    let over = (1u64 << 31) / PAGE_SIZE;
    for n in [over, HUGE_PAGES] {
        for cmd in [DmirrorCmd::Read, DmirrorCmd::Write] {
            assert_eq!(
                r.run(&d, cmd, a, n).unwrap_err(),
                DmirrorError::NoMem,
                "{cmd:?} {n}"
            );
        }
    }
    // The commands that read the range back refuse first too, before migrating a page.
    for cmd in [
        DmirrorCmd::MigrateToDev,
        DmirrorCmd::MigrateOnFaultToDev,
        DmirrorCmd::Exclusive,
    ] {
        assert_eq!(
            r.run(&d, cmd, a, over).unwrap_err(),
            DmirrorError::NoMem,
            "{cmd:?}"
        );
    }
    assert_eq!(d.stats().device_faults, 0);
    assert_eq!(r.mm.stats().migrate.setups, 0);
    assert_eq!(r.phys.nr_in_use(), in_use);
    assert_eq!(d.nr_mapped(), 0);
}

/// SNAPSHOT copies each chunk out as it goes (the kernel's loop): over a huge range its
/// memory is one chunk, and a bad user buffer stops it at the first chunk instead of after
/// a buffer of one byte per page (16 GiB here) was filled.
#[test]
fn snapshot_of_a_huge_range_works_chunk_by_chunk() {
    let r = Arc::new(rig());
    let d = r.open(0);
    let a = huge(&r);
    let (r2, d2) = (Arc::clone(&r), Arc::clone(&d));
    let err = within(30, move || {
        let mut c = HmmDmirrorCmd {
            addr: a.as_u64(),
            ptr: 0x10_0000, // mapped by nothing
            npages: HUGE_PAGES,
            ..HmmDmirrorCmd::default()
        };
        let e = d2.ioctl(DmirrorCmd::Snapshot, &mut c).unwrap_err();
        drop(r2);
        e
    });
    assert_eq!(err, DmirrorError::Fault);
    // A snapshot longer than a chunk writes every chunk where it belongs.
    let n = 100;
    r.mm.write(page(a, 40), &[1]).unwrap();
    let snap = r.snapshot(&d, a, n);
    assert_eq!(snap.len(), n as usize);
    assert!(
        snap.iter().enumerate().all(|(i, &b)| (i == 40) == (b != 0)),
        "{snap:?}"
    );
}

/// CHECK_EXCLUSIVE looks at what the device maps, not at every page index of the range:
/// over 2^34 pages it answers at once (it used to walk them all under the mirror lock for
/// minutes, and every invalidation of the process waited behind it).
#[test]
fn check_exclusive_over_a_huge_range_answers_at_once() {
    let r = Arc::new(rig());
    let d = r.open(0);
    let a = huge(&r);
    r.mm.write(page(a, HUGE_PAGES - 1), &[7]).unwrap();
    r.run(&d, DmirrorCmd::Exclusive, page(a, HUGE_PAGES - 1), 1)
        .unwrap();
    let (r2, d2) = (Arc::clone(&r), Arc::clone(&d));
    let res = within(20, move || {
        let busy = r2.run(&d2, DmirrorCmd::CheckExclusive, a, HUGE_PAGES);
        // A CPU access revokes the exclusive access.
        r2.mm.write(page(a, HUGE_PAGES - 1), &[8]).unwrap();
        let free = r2.run(&d2, DmirrorCmd::CheckExclusive, a, HUGE_PAGES);
        (busy.map(|_| ()), free.map(|_| ()))
    });
    assert_eq!(res, (Err(DmirrorError::Perm), Ok(())));
}

/// A migration command over a huge range takes the mmap lock one piece at a time: a
/// `munmap` of that very range gets in after one piece (and the command then stops with
/// `EINVAL`, its VMA gone), where it used to wait for the whole range.
#[test]
fn munmap_racing_a_huge_migration_waits_for_one_piece() {
    let r = Arc::new(rig());
    let d = r.open(0);
    let a = huge(&r);
    let done = Arc::new(AtomicBool::new(false));
    let (r2, d2, done2) = (Arc::clone(&r), Arc::clone(&d), Arc::clone(&done));
    let worker = std::thread::spawn(move || {
        let res = r2.run(&d2, DmirrorCmd::MigrateToSys, a, HUGE_PAGES);
        done2.store(true, Ordering::SeqCst);
        res.map(|_| ())
    });
    while r.mm.stats().migrate.setups == 0 {
        std::thread::yield_now();
    }
    let (r3, done3) = (Arc::clone(&r), Arc::clone(&done));
    let finished_first = within(20, move || {
        r3.mm.munmap(a, HUGE_PAGES * PAGE_SIZE).unwrap();
        done3.load(Ordering::SeqCst)
    });
    assert!(!finished_first, "munmap waited for the whole command");
    let res = within(20, move || worker.join().unwrap());
    assert!(matches!(res, Err(DmirrorError::Inval { .. })), "{res:?}");
}

/// `set_page_dirty` for device writes: a page written by the device after `MADV_FREE` is
/// dirty, so lazy-free reclaim keeps it (it used to discard it, and the CPU then read
/// zeros where the device had written).
#[test]
fn a_device_write_survives_lazy_free_reclaim() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(2);
    r.mm.write(a, &pattern(2, 1)).unwrap();
    r.mm.madvise(a, 2 * PAGE_SIZE, Advice::Free).unwrap();
    let new = pattern(1, 9);
    r.mm.write(r.buf, &new).unwrap();
    r.run(&d, DmirrorCmd::Write, a, 1).unwrap();
    let mut back = vec![0u8; PAGE_SIZE as usize];
    r.mm.read(a, &mut back).unwrap();
    assert_eq!(back, new, "the CPU sees the device's write");
    assert_eq!(
        r.mm.reclaim_lazyfree(),
        1,
        "only the page nobody wrote is discarded"
    );
    r.mm.read(a, &mut back).unwrap();
    assert_eq!(back, new, "the device's write was kept");
    r.mm.read(page(a, 1), &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "the untouched page was discarded"
    );
    // A device read does not make a page dirty: it is discarded like any clean one.
    let b = r.map(1);
    r.mm.write(b, &[3]).unwrap();
    r.mm.madvise(b, PAGE_SIZE, Advice::Free).unwrap();
    r.run(&d, DmirrorCmd::Read, b, 1).unwrap();
    assert_eq!(r.mm.reclaim_lazyfree(), 1);
    r.mm.audit().unwrap();
}

#[test]
fn driver_mmap_checks_its_length_before_allocating() {
    let r = rig();
    let d = r.open(0);
    let in_use = r.phys.nr_in_use();
    for len in [0, u64::MAX, 1 << 60] {
        assert!(
            matches!(
                d.mmap(len, Prot::READ, MapFlags::SHARED),
                Err(DmirrorError::Inval { .. })
            ),
            "{len:#x}"
        );
    }
    assert_eq!(r.phys.nr_in_use(), in_use);
}
