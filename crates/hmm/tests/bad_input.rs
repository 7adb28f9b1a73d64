//! Bad input to every public entry point of the address space: unaligned, zero,
//! overflowing, outside any VMA. Each gets a typed error and changes nothing.

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, TASK_SIZE, USER_VA_END};
use hmm::mm::{Advice, FaultError, MapFlags, MmError, Prot, SegvCause, MMAP_MIN_ADDR};

/// Runs `f` and checks that the address space is exactly as before.
fn unchanged(m: &Machine, f: impl FnOnce()) {
    let vmas = format!("{:?}", m.mm.vmas());
    let in_use = m.phys.nr_in_use();
    f();
    assert_eq!(format!("{:?}", m.mm.vmas()), vmas);
    assert_eq!(m.phys.nr_in_use(), in_use);
    assert!(m.rec.take().is_empty(), "no notifier may fire");
    m.mm.audit().unwrap();
}

fn populated() -> (Machine, VirtAddr) {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    for i in 0..4 {
        m.mm.write_val(page(a, i), i + 1).unwrap();
    }
    m.rec.take();
    (m, a)
}

#[test]
fn mmap_rejects_bad_arguments() {
    let (m, a) = populated();
    let inval = |r: Result<VirtAddr, MmError>| assert_eq!(r.unwrap_err().errno(), libc::EINVAL);
    unchanged(&m, || {
        inval(m.mm.mmap(None, 0, RW, MapFlags::PRIVATE));
        inval(m.mm.mmap(None, PAGE_SIZE, RW, MapFlags::empty()));
        inval(m.mm.mmap(None, PAGE_SIZE, RW, MapFlags::PRIVATE | MapFlags::SHARED));
        inval(m.mm.mmap(
            Some(VirtAddr::new(0x10001)),
            PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        ));
        inval(m.mm.mmap(None, PAGE_SIZE, RW, MapFlags::PRIVATE | MapFlags::FIXED));
        let nomem =
            m.mm.mmap(None, u64::MAX, RW, MapFlags::PRIVATE)
                .unwrap_err();
        assert_eq!(nomem.errno(), libc::ENOMEM);
        let nomem =
            m.mm.mmap(None, TASK_SIZE + PAGE_SIZE, RW, MapFlags::PRIVATE);
        assert_eq!(nomem.unwrap_err().errno(), libc::ENOMEM);
        let beyond = m.mm.mmap(
            Some(VirtAddr::new(TASK_SIZE)),
            PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        );
        assert_eq!(beyond.unwrap_err().errno(), libc::ENOMEM);
        let low = m.mm.mmap(
            Some(VirtAddr::new(MMAP_MIN_ADDR - PAGE_SIZE)),
            PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        );
        assert_eq!(low.unwrap_err().errno(), libc::EPERM);
        let exists = m.mm.mmap(
            Some(a),
            PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
        );
        assert_eq!(exists.unwrap_err(), MmError::Exists { addr: a });
    });
}

#[test]
fn munmap_rejects_bad_arguments() {
    let (m, a) = populated();
    unchanged(&m, || {
        for (addr, len) in [
            (a.checked_add(1).unwrap(), PAGE_SIZE),
            (a, 0),
            (a, u64::MAX),
            (VirtAddr::new(TASK_SIZE), 2 * PAGE_SIZE),
            (VirtAddr::new(USER_VA_END), PAGE_SIZE),
        ] {
            assert_eq!(
                m.mm.munmap(addr, len).unwrap_err().errno(),
                libc::EINVAL,
                "{addr} {len}"
            );
        }
    });
}

#[test]
fn mprotect_rejects_bad_arguments_and_holes() {
    let (m, a) = populated();
    unchanged(&m, || {
        let e =
            m.mm.mprotect(a.checked_add(8).unwrap(), PAGE_SIZE, Prot::READ);
        assert_eq!(e.unwrap_err().errno(), libc::EINVAL);
        let e = m.mm.mprotect(a, u64::MAX - 100, Prot::READ);
        assert_eq!(e.unwrap_err().errno(), libc::ENOMEM);
        // The range runs past the end of the mapping into a hole: nothing changes.
        let e = m.mm.mprotect(a, 8 * PAGE_SIZE, Prot::READ);
        assert_eq!(e.unwrap_err().errno(), libc::ENOMEM);
        let e = m.mm.mprotect(VirtAddr::new(0x10000), PAGE_SIZE, Prot::READ);
        assert_eq!(e.unwrap_err().errno(), libc::ENOMEM);
        // Zero length succeeds and does nothing, as in Linux.
        m.mm.mprotect(a, 0, Prot::NONE).unwrap();
    });
    assert_eq!(m.mm.read_val::<u64>(page(a, 3)).unwrap(), 4);
}

#[test]
fn madvise_rejects_bad_arguments_and_holes() {
    let (m, a) = populated();
    unchanged(&m, || {
        let e =
            m.mm.madvise(a.checked_add(1).unwrap(), PAGE_SIZE, Advice::DontNeed);
        assert_eq!(e.unwrap_err().errno(), libc::EINVAL);
        let e = m.mm.madvise(a, u64::MAX, Advice::DontNeed);
        assert_eq!(e.unwrap_err().errno(), libc::EINVAL);
        let e = m.mm.madvise(a, 5 * PAGE_SIZE, Advice::DontNeed);
        assert_eq!(e.unwrap_err().errno(), libc::ENOMEM);
        m.mm.madvise(a, 0, Advice::DontNeed).unwrap();
    });
    for i in 0..4 {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), i + 1);
    }
}

#[test]
fn cpu_accesses_outside_vmas_fail_without_effect() {
    let (m, a) = populated();
    unchanged(&m, || {
        let end = VirtAddr::new(USER_VA_END - 4);
        assert!(matches!(
            m.mm.write(end, &[0; 8]),
            Err(FaultError::Segv {
                cause: SegvCause::MapErr,
                ..
            })
        ));
        assert!(matches!(
            m.mm.read_val::<u8>(VirtAddr::ZERO),
            Err(FaultError::Segv { .. })
        ));
        // A write that starts in the mapping and runs past it writes nothing.
        let tail = page(a, 4).checked_sub(4).unwrap();
        assert_eq!(
            m.mm.write(tail, &[0xff; 8]),
            Err(FaultError::Segv {
                addr: page(a, 4),
                cause: SegvCause::MapErr
            })
        );
        m.mm.write(a, &[]).unwrap();
    });
    assert_eq!(m.mm.read_val::<u64>(page(a, 3)).unwrap(), 4);
}
