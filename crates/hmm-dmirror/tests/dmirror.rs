//! dmirror's commands: the kernel's outputs and errors, device memory, its own mmap, the
//! invalidation counters, and a munmap racing device reads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{page, RW};

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Prot};
use hmm::zone_device::MemoryType;
use hmm_dmirror::{
    prot, Dmirror, DmirrorCmd, DmirrorError, HmmDmirrorCmd, HMM_DMIRROR_FLAG_FAIL_ALLOC,
};

/// The shared rig with device 0 opened by its process.
struct Rig {
    rig: common::Rig,
    mirror: Arc<Dmirror>,
}

impl std::ops::Deref for Rig {
    type Target = common::Rig;

    fn deref(&self) -> &common::Rig {
        &self.rig
    }
}

fn rig() -> Rig {
    let rig = common::rig();
    let mirror = rig.open(0);
    Rig { rig, mirror }
}

fn cmd(addr: VirtAddr, ptr: VirtAddr, npages: u64) -> HmmDmirrorCmd {
    HmmDmirrorCmd {
        addr: addr.as_u64(),
        ptr: ptr.as_u64(),
        npages,
        ..HmmDmirrorCmd::default()
    }
}

#[test]
fn read_and_write_report_pages_and_fault_calls() {
    let r = rig();
    let a =
        r.mm.mmap(None, 16 * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let data: Vec<u8> = (0..16 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    r.mm.write(a, &data).unwrap();
    let mut c = cmd(a, r.buf, 16);
    r.mirror.ioctl(DmirrorCmd::Read, &mut c).unwrap();
    assert_eq!(
        (c.cpages, c.faults),
        (16, 1),
        "one fault call covers the range"
    );
    let mut back = vec![0u8; data.len()];
    r.mm.read(r.buf, &mut back).unwrap();
    assert_eq!(back, data);
    // Mapped now: no fault.
    let mut c = cmd(a, r.buf, 16);
    r.mirror.ioctl(DmirrorCmd::Read, &mut c).unwrap();
    assert_eq!((c.cpages, c.faults), (16, 0));
    assert_eq!(r.mirror.nr_mapped(), 16);

    // Write: pages mapped read-only (the zero page) need a write fault.
    let b =
        r.mm.mmap(None, 4 * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let mut c = cmd(b, r.buf, 4);
    r.mirror.ioctl(DmirrorCmd::Read, &mut c).unwrap();
    r.mm.write(r.buf, &[0x77; 4 * PAGE_SIZE as usize]).unwrap();
    let mut c = cmd(b, r.buf, 4);
    r.mirror.ioctl(DmirrorCmd::Write, &mut c).unwrap();
    assert_eq!((c.cpages, c.faults), (4, 1));
    assert_eq!(r.mm.read_val::<u8>(b).unwrap(), 0x77);
    let s = r.mirror.stats();
    assert_eq!(s.device_faults, 3);
    r.mm.audit().unwrap();
}

#[test]
fn errors_leave_the_command_block_unchanged() {
    let r = rig();
    let a =
        r.mm.mmap(None, 4 * PAGE_SIZE, Prot::READ, MapFlags::PRIVATE)
            .unwrap();
    let stale = HmmDmirrorCmd {
        cpages: 99,
        faults: 98,
        ..cmd(a, r.buf, 4)
    };
    let mut c = stale;
    assert_eq!(
        r.mirror.ioctl(DmirrorCmd::Write, &mut c),
        Err(DmirrorError::Perm)
    );
    assert_eq!(c, stale, "not copied back on failure");
    assert_eq!(DmirrorError::Perm.errno(), libc::EPERM);

    let inval = |e: Result<(), DmirrorError>| matches!(e, Err(DmirrorError::Inval { .. }));
    for (addr, npages) in [
        (a.as_u64() + 1, 1),
        (a.as_u64(), 0),
        (a.as_u64(), u64::MAX / PAGE_SIZE),
        (!(PAGE_SIZE - 1), 1),
    ] {
        let mut c = HmmDmirrorCmd {
            addr,
            ptr: r.buf.as_u64(),
            npages,
            ..HmmDmirrorCmd::default()
        };
        for which in [DmirrorCmd::Read, DmirrorCmd::Write, DmirrorCmd::Snapshot] {
            assert!(
                inval(r.mirror.ioctl(which, &mut c)),
                "{which:?} {addr:#x} {npages}"
            );
        }
    }
    let mut c = cmd(a, r.buf, 1);
    assert!(inval(r.mirror.ioctl_raw(0xC028_48FF, &mut c)));
    r.mirror
        .ioctl_raw(DmirrorCmd::Read.ioctl(), &mut c)
        .unwrap();
    // A user buffer that is not mapped.
    let mut c = cmd(a, VirtAddr::new(0x1000), 1);
    assert_eq!(
        r.mirror.ioctl(DmirrorCmd::Read, &mut c),
        Err(DmirrorError::Fault)
    );
    assert_eq!(DmirrorError::Fault.errno(), libc::EFAULT);
}

#[test]
fn flags_set_the_test_flags() {
    let r = rig();
    let mut c = cmd(r.buf, r.buf, HMM_DMIRROR_FLAG_FAIL_ALLOC);
    r.mirror.ioctl(DmirrorCmd::Flags, &mut c).unwrap();
    assert_eq!(r.mirror.flags(), HMM_DMIRROR_FLAG_FAIL_ALLOC);
    assert_eq!((c.cpages, c.faults), (0, 0));
}

#[test]
fn invalidations_clear_exactly_the_range_and_are_counted() {
    let r = rig();
    let a =
        r.mm.mmap(None, 8 * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    r.mm.write(a, &[1; 8 * PAGE_SIZE as usize]).unwrap();
    let mut c = cmd(a, r.buf, 8);
    r.mirror.ioctl(DmirrorCmd::Read, &mut c).unwrap();
    let before = r.mirror.stats();
    r.mm.munmap(a.checked_add(2 * PAGE_SIZE).unwrap(), 2 * PAGE_SIZE)
        .unwrap();
    let s = r.mirror.stats();
    assert_eq!(s.invalidations - before.invalidations, 1);
    assert_eq!(s.pages_invalidated - before.pages_invalidated, 2);
    assert!(r.mirror.lookup(a.checked_add(PAGE_SIZE).unwrap()).is_some());
    assert!(
        r.mirror
            .lookup(a.checked_add(4 * PAGE_SIZE).unwrap())
            .is_some(),
        "end is exclusive"
    );
    assert_eq!(r.mirror.nr_mapped(), 6);
}

#[test]
fn the_drivers_own_mmap_is_a_mixedmap_the_device_can_read() {
    let r = rig();
    let m = r.mirror.mmap(4 * PAGE_SIZE, RW, MapFlags::SHARED).unwrap();
    let vma = r.mm.vmas().into_iter().find(|v| v.start() == m).unwrap();
    assert!(vma.flags().contains(hmm::prot::VmFlags::MIXEDMAP));
    assert_eq!(r.mm.read_val::<u64>(m).unwrap(), 0, "zeroed pages");
    r.mm.write_val(m.checked_add(PAGE_SIZE).unwrap(), 0xdead_beef_u64)
        .unwrap();
    let mut c = cmd(m, r.buf, 4);
    r.mirror.ioctl(DmirrorCmd::Read, &mut c).unwrap();
    assert_eq!(c.faults, 1);
    let mut got = [0u8; 8];
    r.mm.read(r.buf.checked_add(PAGE_SIZE).unwrap(), &mut got)
        .unwrap();
    assert_eq!(u64::from_le_bytes(got), 0xdead_beef);
    let mut c = cmd(m, r.buf, 4);
    r.mirror.ioctl(DmirrorCmd::Snapshot, &mut c).unwrap();
    let mut snap = [0u8; 4];
    r.mm.read(r.buf, &mut snap).unwrap();
    assert_eq!(snap, [prot::WRITE; 4]);
    r.mm.audit().unwrap();
    r.mm.munmap(m, 4 * PAGE_SIZE).unwrap();
}

#[test]
fn device_memory_comes_in_chunks_up_to_capacity() {
    let r = rig();
    for kind in [MemoryType::DevicePrivate, MemoryType::DeviceCoherent] {
        let dev = r
            .driver
            .devices()
            .iter()
            .find(|d| d.kind() == kind)
            .unwrap()
            .clone();
        let mut held = Vec::new();
        // Two chunks of 4 MiB: four 2 MiB folios, then nothing.
        for _ in 0..4 {
            held.push(dev.alloc(9).unwrap());
        }
        assert!(dev.alloc(0).is_err(), "capacity reached");
        assert_eq!(dev.nr_chunks(), 2);
        assert!(held.iter().all(|f| dev.owns(f)));
        // Dropping a locked folio unlocks it and frees it.
        drop(held);
        let (calloc, cfree) = dev.counts();
        assert_eq!((calloc, cfree), (2048, 2048));
        assert_eq!(dev.nr_in_use(), 0);
    }
    let d0 = r.driver.device(0);
    let d1 = r.driver.device(1);
    assert_ne!(d0.owner(), d1.owner());
    let f = d1.alloc(0).unwrap();
    assert!(!d0.owns(&f) && d1.owns(&f));
    drop(f.unlock());
}

#[test]
fn commands_after_exit_are_einval() {
    let Rig { rig, mirror } = rig();
    let a = rig.buf;
    drop(rig.mm);
    let mut c = cmd(a, a, 1);
    assert!(matches!(
        mirror.ioctl(DmirrorCmd::Snapshot, &mut c),
        Err(DmirrorError::Inval { .. })
    ));
    assert_eq!(rig.phys.nr_in_use(), 0, "exit freed every frame");
    assert_eq!(mirror.nr_mapped(), 0, "RELEASE cleared the device table");
}

#[test]
fn device_reads_racing_munmap_never_see_stale_data() {
    // A CPU thread maps, fills with version v, and unmaps, again and again at the same
    // address; a device thread reads. Every page a successful read returns must hold
    // zeros (mapped, not yet written), version v of that page for a v that was live at
    // some point during the read, or a mix of the two (the write in flight): never a
    // version unmapped before the read began.
    let r = rig();
    const N: u64 = 8;
    let a =
        r.mm.mmap(None, N * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    r.mm.munmap(a, N * PAGE_SIZE).unwrap();
    let version = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let tag = |v: u64, i: u64| (v * 0x9e37 + i) as u32;
    let page_of = |v: u64, i: u64| -> Vec<u8> {
        (0..PAGE_SIZE as usize / 4)
            .flat_map(|_| tag(v, i).to_le_bytes())
            .collect()
    };
    let (mut ok, mut failed) = (0u64, 0u64);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let v = version.load(Ordering::SeqCst);
                r.mm.mmap(
                    Some(a),
                    N * PAGE_SIZE,
                    RW,
                    MapFlags::PRIVATE | MapFlags::FIXED,
                )
                .unwrap();
                for i in 0..N {
                    r.mm.write(a.checked_add(i * PAGE_SIZE).unwrap(), &page_of(v, i))
                        .unwrap();
                }
                r.mm.munmap(a, N * PAGE_SIZE).unwrap();
                version.fetch_add(1, Ordering::SeqCst);
            }
        });
        // The writer stops when this scope's body ends, even by a panic (a failed check
        // must fail the test, not leave it waiting for the writer for ever).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        for _ in 0..300 {
            let v0 = version.load(Ordering::SeqCst);
            let mut c = cmd(a, r.buf, N);
            let res = r.mirror.ioctl(DmirrorCmd::Read, &mut c);
            let v1 = version.load(Ordering::SeqCst);
            match res {
                Ok(()) => {
                    ok += 1;
                    let mut got = vec![0u8; (N * PAGE_SIZE) as usize];
                    r.mm.read(r.buf, &mut got).unwrap();
                    for i in 0..N {
                        let p = &got[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
                        // The CPU's write of a version may be in flight while the device
                        // copies the page (as on real hardware), so each word is either
                        // still zero or that version's: one live version's words and
                        // zeros, never a version unmapped before the read began.
                        let words: std::collections::BTreeSet<u32> = p
                            .chunks_exact(4)
                            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
                            .filter(|&w| w != 0)
                            .collect();
                        let fine = words.is_empty()
                            || words.len() == 1 && (v0..=v1).any(|v| words.contains(&tag(v, i)));
                        assert!(
                            fine,
                            "page {i} holds data not live during the read ({v0}..={v1}): {words:x?}"
                        );
                    }
                }
                // Unmapped under the read, or invalidations that kept colliding for the
                // whole retry timeout (EBUSY, as in the kernel; a loaded host makes it
                // likelier): nothing was read.
                Err(DmirrorError::Fault) | Err(DmirrorError::Busy) => failed += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
    });
    assert!(ok + failed == 300);
    r.mm.audit().unwrap();
}

#[test]
fn release_again_and_again_never_runs_out_of_device_memory() {
    // Each RELEASE retires the device's chunks and the next migration creates them
    // again: the retired section must come back, or the device stops allocating after
    // NR_SECTIONS chunks (found by `hmm stress`).
    let Rig { rig, mirror } = rig();
    let a = rig.map(8);
    for i in 0..8 {
        rig.mm.write_val(page(a, i), i).unwrap();
    }
    let sections = hmm::phys::NR_SECTIONS as u64;
    for round in 0..sections + 8 {
        let moved = rig.run(&mirror, DmirrorCmd::MigrateToDev, a, 8).unwrap();
        assert_eq!(moved.cpages, 8, "round {round}");
        assert_eq!(rig.driver.device(0).release().unwrap(), 8);
    }
    for i in 0..8 {
        assert_eq!(rig.mm.read_val::<u64>(page(a, i)).unwrap(), i);
    }
}

#[test]
fn typed_commands_do_what_the_ioctl_form_does() {
    let phys = hmm::phys::PhysMem::new(hmm::phys::PhysConfig::with_size(16 << 20)).unwrap();
    let driver = hmm_dmirror::DmirrorDriver::new(&phys, hmm_dmirror::DmirrorConfig::default());
    let mm = hmm::mm::Mm::new(phys.clone());
    let d = hmm_dmirror::Dmirror::open(driver.device(0), &mm).unwrap();
    let rw = hmm::mm::Prot::READ | hmm::mm::Prot::WRITE;
    let ps = hmm::addr::PAGE_SIZE;
    let a = mm
        .mmap(None, 4 * ps, rw, hmm::mm::MapFlags::PRIVATE)
        .unwrap();
    let out = mm
        .mmap(None, 4 * ps, rw, hmm::mm::MapFlags::PRIVATE)
        .unwrap();
    mm.write_slice(a, &[7u64; 2048]).unwrap();
    // READ, as `ioctl(Read, ..)` would: every page, one device fault.
    let done = d.read(a, 4, out).unwrap();
    assert_eq!((done.cpages, done.faults), (4, 1));
    assert_eq!(mm.read_val::<u64>(out + 3 * ps).unwrap(), 7);
    // To the device and back; the snapshot says where the pages are.
    assert_eq!(d.migrate_to_dev(a, 4, out).unwrap().cpages, 4);
    d.snapshot(a, 4, out).unwrap();
    let mut bytes = [0u8; 4];
    mm.read(out, &mut bytes).unwrap();
    assert!(bytes
        .iter()
        .all(|&b| b == hmm_dmirror::prot::DEV_PRIVATE_LOCAL | hmm_dmirror::prot::WRITE));
    assert_eq!(d.migrate_to_sys(a, 4).unwrap().cpages, 4);
    // Bad input gets the same typed error as the ioctl form.
    assert_eq!(d.read(a + 1, 4, out).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(d.read(a, 0, out).unwrap_err().ret(), -libc::EINVAL);
}

#[test]
fn mirror_counters_read_as_a_line_and_subtract() {
    let zero = hmm_dmirror::MirrorStats::default();
    assert_eq!(zero.to_string(), "nothing counted");
    let s = hmm_dmirror::MirrorStats {
        device_faults: 2,
        pages_mapped: 8,
        ..zero
    };
    assert_eq!(s.to_string(), "2 device faults, 8 pages mapped");
    assert_eq!(s.since(&s), zero);
}

/// `HMM_DMIRROR_READ_UNLOCKED` (Linux 2026): READ through
/// `hmm_range_fault_unlocked_timeout`: the same pages, bytes and counts as READ, retried
/// through invalidations that collide with it, and `-EINTR` once the process is killed.
#[test]
fn read_unlocked_reads_as_read_does_and_stops_on_a_fatal_signal() {
    let r = rig();
    let d = r.open(0);
    let a = r.map(8);
    let data = common::pattern(8, 3);
    r.mm.write(a, &data).unwrap();
    let c = r.run(&d, DmirrorCmd::ReadUnlocked, a, 8).unwrap();
    assert_eq!((c.cpages, c.faults), (8, 1));
    assert_eq!(r.buf_bytes(data.len()), data);
    assert_eq!(d.nr_mapped(), 8);
    // The typed form, on pages the device already maps: no fault.
    let done = d.read_unlocked(a, 8, r.buf).unwrap();
    assert_eq!((done.cpages, done.faults), (8, 0));

    // Invalidations racing the unlocked walk make it retry, never fail.
    let b = r.map(64);
    r.mm.write(b, &common::pattern(64, 5)).unwrap();
    /// Stops the churn however the reader's checks end, so a failed one cannot hang.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                r.mm.mprotect(b, 64 * PAGE_SIZE, Prot::READ).unwrap();
                r.mm.mprotect(b, 64 * PAGE_SIZE, RW).unwrap();
            }
        });
        let _stop = StopOnDrop(&stop);
        for _ in 0..20 {
            let c = r.run(&d, DmirrorCmd::ReadUnlocked, b, 64).unwrap();
            assert_eq!(c.cpages, 64);
            assert_eq!(r.buf_bytes(64 * PAGE_SIZE as usize), common::pattern(64, 5));
        }
    });

    // A killed process: the fault gives up with EINTR, the block unchanged.
    let c = r.map(4);
    r.mm.kill();
    assert_eq!(
        r.run(&d, DmirrorCmd::ReadUnlocked, c, 4),
        Err(DmirrorError::Intr)
    );
    assert_eq!(DmirrorError::Intr.ret(), -4);
    // The locked READ is not killable, as in the kernel's dmirror_fault.
    assert_eq!(r.run(&d, DmirrorCmd::Read, c, 4).unwrap().cpages, 4);
}
