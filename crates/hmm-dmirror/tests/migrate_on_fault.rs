//! MIGRATE_ON_FAULT_TO_DEV: one walk moves a range that MIGRATE_TO_DEV cannot (another
//! device's pages), counted; and the walk's own invalidations under a concurrent CPU
//! writer, a concurrent munmap and another device migrating the same range: no lost byte,
//! no leaked frame, no deadlock, never `Busy`.
//! `HMM_STRESS_ITERS=N` sets the number of rounds of the race (default 200).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{iters, page, pattern, rig, word};
use hmm::addr::PAGE_SIZE;
use hmm::mm::{MapFlags, Prot};
use hmm_dmirror::{prot, DmirrorCmd, DmirrorError};

const RW: Prot = Prot::READ.union(Prot::WRITE);

#[test]
fn one_walk_moves_what_migrate_to_dev_leaves_behind() {
    let r = rig();
    let d0 = r.open(0);
    let d1 = r.open(1);
    // 0..8 on device 1; 8..16 holes; 16..24 system pages; 24..32 already on device 0.
    let a = r.map(32);
    let data = pattern(32, 3);
    let pg = |i: u64| (i * PAGE_SIZE) as usize;
    r.mm.write(a, &data[..pg(8)]).unwrap();
    r.mm.write(page(a, 16), &data[pg(16)..]).unwrap();
    r.run(&d1, DmirrorCmd::MigrateToDev, a, 8).unwrap();
    r.run(&d0, DmirrorCmd::MigrateToDev, page(a, 24), 8)
        .unwrap();
    let mut want = data.clone();
    want[pg(8)..pg(16)].fill(0);

    // The classic command leaves device 1's pages alone and cannot read them back.
    assert_eq!(
        r.run(&d0, DmirrorCmd::MigrateToDev, a, 32).unwrap_err(),
        DmirrorError::NoEnt
    );
    assert_eq!(r.driver.device(1).nr_in_use(), 8);

    let stats0 = d0.stats();
    let before = r.mm.stats();
    let c = r.run(&d0, DmirrorCmd::MigrateOnFaultToDev, a, 32).unwrap();
    assert_eq!(c.cpages, 32);
    assert_eq!(r.buf_bytes(want.len()), want, "read back from device 0");
    let s = r.mm.stats().since(&before);
    assert_eq!(s.range_walks.hmm, 1, "one walk for the whole range");
    assert_eq!(s.range_walks.migrate, 0);
    assert_eq!(
        s.range_walks.fault_handler, 8,
        "device 1 gave back its pages"
    );
    assert_eq!(s.faults.device_private, 8);
    assert_eq!(r.driver.device(1).nr_in_use(), 0);
    assert_eq!(r.driver.device(0).nr_in_use(), 32);
    let d = d0.stats();
    assert_eq!(
        d.pages_copied_to_device - stats0.pages_copied_to_device,
        8,
        "only device 1's former pages were copied: holes are zero-filled, \
         the earlier command moved the system pages, its own pages stay"
    );
    assert_eq!(d.pages_invalidated, stats0.pages_invalidated);
    assert!(r
        .snapshot(&d0, a, 32)
        .iter()
        .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE));
    // The CPU reads every byte back through faults.
    let mut b = vec![0u8; want.len()];
    r.mm.read(a, &mut b).unwrap();
    assert_eq!(b, want);
    r.mm.audit().unwrap();
}

#[test]
fn bad_input_is_typed_and_moves_nothing() {
    let r = rig();
    let d0 = r.open(0);
    let a = r.map(4);
    let ro =
        r.mm.mmap(None, 4 * PAGE_SIZE, Prot::NONE, MapFlags::PRIVATE)
            .unwrap();
    let mut c = hmm_dmirror::HmmDmirrorCmd {
        addr: a.as_u64() + 1,
        ptr: r.buf.as_u64(),
        npages: 4,
        ..Default::default()
    };
    assert!(matches!(
        d0.ioctl(DmirrorCmd::MigrateOnFaultToDev, &mut c),
        Err(DmirrorError::Inval { .. })
    ));
    assert!(matches!(
        r.run(&d0, DmirrorCmd::MigrateOnFaultToDev, ro, 4),
        Err(DmirrorError::Inval { .. })
    ));
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    assert_eq!(
        d0.ioctl_raw(DmirrorCmd::MigrateOnFaultToDev.ioctl(), &mut c)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
}

#[test]
fn own_invalidations_race_a_writer_munmap_and_another_device() {
    const STABLE: u64 = 32;
    const CHURN: u64 = 32;
    let r = rig();
    let d0 = r.open(0);
    let d1 = r.open(1);
    let a = r.map(STABLE + CHURN);
    let churn = page(a, STABLE);
    let versions: Vec<AtomicU64> = (0..STABLE).map(|_| AtomicU64::new(0)).collect();
    for i in 0..STABLE {
        r.mm.write_val(page(a, i), word(i, 0)).unwrap();
    }
    let buf1 =
        r.mm.mmap(None, (STABLE + CHURN) * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let stop = AtomicBool::new(false);
    let rounds = iters();
    let (moves, whole, unmaps) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        // A watchdog: a deadlock fails the test instead of hanging it.
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "deadlock: no progress in 120 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // The CPU writer: bumps each stable page's version and reads it back, for
        // `rounds` rounds and then until device 0 has finished at least one pass (in
        // a release build the rounds can end before the device thread is scheduled).
        s.spawn(|| {
            let mut v = 0;
            while v < rounds || moves.load(Ordering::Relaxed) == 0 {
                v += 1;
                for i in 0..STABLE {
                    r.mm.write_val(page(a, i), word(i, v)).unwrap();
                    versions[i as usize].store(v, Ordering::Release);
                    assert_eq!(r.mm.read_val::<u64>(page(a, i)).unwrap(), word(i, v));
                }
            }
            stop.store(true, Ordering::Release);
        });
        // munmap churn on the second half of the range: unmapped, mapped again, touched.
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                r.mm.munmap(churn, CHURN * PAGE_SIZE).unwrap();
                r.mm.mmap(
                    Some(churn),
                    CHURN * PAGE_SIZE,
                    RW,
                    MapFlags::PRIVATE | MapFlags::FIXED,
                )
                .unwrap();
                r.mm.write_val(churn, 0xfeed_u64).unwrap();
                unmaps.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Device 1 takes the range to itself, so device 0's walk must fault it back.
        s.spawn(|| {
            let mut c = hmm_dmirror::HmmDmirrorCmd::default();
            while !stop.load(Ordering::Acquire) {
                c.addr = a.as_u64();
                c.ptr = buf1.as_u64();
                c.npages = STABLE + CHURN;
                match d1.ioctl(DmirrorCmd::MigrateToDev, &mut c) {
                    Ok(()) | Err(DmirrorError::NoEnt) | Err(DmirrorError::Inval { .. }) => {}
                    Err(e) => panic!("device 1: {e}"),
                }
            }
        });
        // Device 0 migrates on fault, over and over.
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                match r.run(&d0, DmirrorCmd::MigrateOnFaultToDev, a, STABLE + CHURN) {
                    Ok(_) => {
                        whole.fetch_add(1, Ordering::Relaxed);
                    }
                    // ENOENT: a page left the device before the read-back (the CPU
                    // writer faulted it home); EINVAL: the churn half was unmapped.
                    Err(DmirrorError::NoEnt) | Err(DmirrorError::Inval { .. }) => {}
                    Err(e) => panic!("migrate on fault must never fail with {e}"),
                }
                moves.fetch_add(1, Ordering::Relaxed);
            }
        });
    });
    assert!(moves.load(Ordering::Relaxed) > 0);
    // Every stable page holds the last version written, whichever device it is on.
    for i in 0..STABLE {
        let v = versions[i as usize].load(Ordering::Acquire);
        assert_eq!(
            r.mm.read_val::<u64>(page(a, i)).unwrap(),
            word(i, v),
            "page {i}"
        );
    }
    // And device 0 reads the same bytes through its own table.
    let c = r.run(&d0, DmirrorCmd::Read, a, STABLE).unwrap();
    assert_eq!(c.cpages, STABLE);
    for i in 0..STABLE {
        let v = versions[i as usize].load(Ordering::Acquire);
        let got = r.mm.read_val::<u64>(page(r.buf, i)).unwrap();
        assert_eq!(got, word(i, v), "device view of page {i}");
    }
    r.mm.audit().unwrap();
    // No frame leaked: unmapping everything empties both devices.
    r.mm.munmap(a, (STABLE + CHURN) * PAGE_SIZE).unwrap();
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    assert_eq!(r.driver.device(1).nr_in_use(), 0);
    r.mm.audit().unwrap();
    eprintln!(
        "{} migrations on fault ({} read back whole), {} munmap rounds",
        moves.load(Ordering::Relaxed),
        whole.load(Ordering::Relaxed),
        unmaps.load(Ordering::Relaxed)
    );
}
