//! Real threads: a CPU writer/reader, device 0 migrating the range to itself and back
//! (and evicting all of its memory now and then), device 1 reading it. No byte may be lost or stale, no frame leaked, no deadlock.
//! `HMM_STRESS_ITERS=N` sets the number of rounds (default 200).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{iters, word};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, DmirrorError, HmmDmirrorCmd};

const RW: Prot = Prot::READ.union(Prot::WRITE);
const N: u64 = 32;

fn cmd(
    mm: &Mm,
    d: &Dmirror,
    which: DmirrorCmd,
    a: VirtAddr,
    ptr: VirtAddr,
) -> Result<u64, DmirrorError> {
    let _ = mm;
    let mut c = HmmDmirrorCmd {
        addr: a.as_u64(),
        ptr: ptr.as_u64(),
        npages: N,
        ..HmmDmirrorCmd::default()
    };
    d.ioctl(which, &mut c).map(|()| c.cpages)
}

#[test]
fn cpu_writes_race_migrations_and_device_reads() {
    let phys = PhysMem::new(PhysConfig::with_size(32 << 20)).unwrap();
    let driver = DmirrorDriver::new(
        &phys,
        DmirrorConfig {
            chunk_bytes: 4 << 20,
            max_chunks: 1,
        },
    );
    let mm = Mm::new(phys.clone());
    let a = mm.mmap(None, N * PAGE_SIZE, RW, MapFlags::PRIVATE).unwrap();
    let buf0 = mm.mmap(None, N * PAGE_SIZE, RW, MapFlags::PRIVATE).unwrap();
    let buf1 = mm.mmap(None, N * PAGE_SIZE, RW, MapFlags::PRIVATE).unwrap();
    let d0 = Dmirror::open(driver.device(0), &mm).unwrap();
    let d1 = Dmirror::open(driver.device(1), &mm).unwrap();
    let versions: Vec<AtomicU64> = (0..N).map(|_| AtomicU64::new(0)).collect();
    for i in 0..N {
        mm.write_val(a.checked_add(i * PAGE_SIZE).unwrap(), word(i, 0))
            .unwrap();
    }
    let stop = AtomicBool::new(false);
    let migrations = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    let rounds = iters();
    std::thread::scope(|s| {
        // The CPU: bump each page's version, and check it reads back what it wrote; for
        // `rounds` rounds, then until both devices have done something (in a release build
        // the rounds can end before the device threads run), for 10 s at most.
        s.spawn(|| {
            let started = std::time::Instant::now();
            let mut r = 0;
            while r < rounds
                || ((migrations.load(Ordering::Relaxed) == 0 || reads.load(Ordering::Relaxed) == 0)
                    && started.elapsed() < std::time::Duration::from_secs(10))
            {
                r += 1;
                for i in 0..N {
                    let va = a.checked_add(i * PAGE_SIZE).unwrap();
                    mm.write_val(va, word(i, r)).unwrap();
                    versions[i as usize].store(r, Ordering::Release);
                    assert_eq!(mm.read_val::<u64>(va).unwrap(), word(i, r), "page {i}");
                }
            }
            stop.store(true, Ordering::Release);
        });
        // Device 0: to itself and back, and now and then evicts all of its memory.
        s.spawn(|| {
            let mut round = 0u64;
            while !stop.load(Ordering::Acquire) {
                round += 1;
                match cmd(&mm, &d0, DmirrorCmd::MigrateToDev, a, buf0) {
                    // The CPU may take pages back before the read-back: ENOENT.
                    Ok(_) | Err(DmirrorError::NoEnt) => {}
                    Err(e) => panic!("migrate to device: {e}"),
                }
                let back = if round % 8 == 0 {
                    DmirrorCmd::Release
                } else {
                    DmirrorCmd::MigrateToSys
                };
                cmd(&mm, &d0, back, a, buf0).unwrap();
                migrations.fetch_add(1, Ordering::Relaxed);
                // Leave the other device windows to finish a read in.
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        });
        // Device 1: reads never return a version older than the one the CPU had finished
        // writing before the read began.
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let floor: Vec<u64> = versions.iter().map(|v| v.load(Ordering::Acquire)).collect();
                match cmd(&mm, &d1, DmirrorCmd::Read, a, buf1) {
                    Ok(_) => reads.fetch_add(1, Ordering::Relaxed),
                    // Invalidations kept colliding for the whole retry timeout: allowed,
                    // as in the kernel; nothing was read.
                    Err(DmirrorError::Busy) => continue,
                    Err(e) => panic!("device read: {e}"),
                };
                for i in 0..N {
                    let w = mm
                        .read_val::<u64>(buf1.checked_add(i * PAGE_SIZE).unwrap())
                        .unwrap();
                    assert_eq!(w >> 32, i, "page {i} holds another page's data");
                    assert!(
                        w & 0xffff_ffff >= floor[i as usize],
                        "page {i}: stale version"
                    );
                }
            }
        });
    });
    assert!(migrations.load(Ordering::Relaxed) > 0);
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "device 1 never completed a read"
    );
    for i in 0..N {
        let va = a.checked_add(i * PAGE_SIZE).unwrap();
        let last = versions[i as usize].load(Ordering::Acquire);
        assert!(last >= rounds);
        assert_eq!(mm.read_val::<u64>(va).unwrap(), word(i, last));
    }
    mm.audit().unwrap();
    drop(mm);
    assert_eq!(phys.nr_in_use(), 0, "no RAM frame leaked");
    for d in driver.devices() {
        assert_eq!(d.nr_in_use(), 0, "no device frame leaked");
    }
}
