//! The device reading and writing anonymous memory: `open_close`, the `anon_*` cases, and
//! `userfaultfd_read`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmm::mm::userfaultfd::{CopyMode, RegisterMode, UffdFeatures, UffdMsg, Userfaultfd};
use hmm::mm::{Advice, MapFlags, Mm, Prot};

use super::harness::{
    align, bytes, cmd, expect, fill, load, migrate_sys_to_dev, Buffer, EFAULT, EPERM,
    HMM_BUFFER_SIZE, NTIMES, PRIVATE, RW,
};
use super::{Fixture, Stop};
use crate::DmirrorCmd;

/// `npages` and `size` of the cases on `HMM_BUFFER_SIZE`.
pub(super) fn buffer_pages(s: &Fixture) -> Result<(u64, u64), Stop> {
    let npages = HMM_BUFFER_SIZE.div_ceil(s.page_size);
    check_ne!(npages, 0);
    Ok((npages, npages << s.page_shift))
}

/// A private anonymous buffer of `size` bytes with a mirror as large.
pub(super) fn anon_buffer(s: &Fixture, size: u64, prot: Prot) -> Result<Buffer, Stop> {
    let ptr = check_ok!(s.mm.mmap(None, size, prot, PRIVATE));
    s.buffer(ptr, size, size, 0)
}

/// `TEST_F(hmm, open_close)`: the fixture opens and closes the device.
pub(super) fn open_close(_: &mut Fixture) -> Result<(), Stop> {
    Ok(())
}

/// `TEST_F(hmm, anon_read)`.
pub(super) fn anon_read(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    // Leave the first two pages zero (pte_none and the zero page).
    let zero = 2 * s.page_size / 4;
    fill(&s.mm, b.ptr, zero..ints, |i| i as i32)?;
    check_ok!(s.mm.mprotect(b.ptr, size, Prot::READ));
    // Populate the CPU page table with the zero page.
    let val: i32 = load(&s.mm, b.ptr + s.page_size)?;
    check_eq!(val, 0);

    let ret = cmd(s.fd(), DmirrorCmd::Read, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "mirror", b.mirror, 0..zero, |_| 0)?;
    expect(&s.mm, "mirror", b.mirror, zero..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, anon_read_prot)`.
pub(super) fn anon_read_prot(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;
    // The mirror's contents show whether the device wrote it.
    fill(&s.mm, b.mirror, 0..ints, |i| -(i as i32))?;
    check_ok!(s.mm.mprotect(b.ptr, size, Prot::NONE));

    let ret = cmd(s.fd(), DmirrorCmd::Read, &mut b, npages);
    check_eq!(ret, -EFAULT);

    check_ok!(s.mm.mprotect(b.ptr, size, Prot::READ));
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| -(i as i32))?;
    s.free(b)
}

/// `TEST_F(hmm, anon_write)`.
pub(super) fn anon_write(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.mirror, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Write, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, anon_write_prot)`.
pub(super) fn anon_write_prot(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, Prot::READ)?;
    let ints = size / 4;

    // The device reads one zero page.
    let ret = cmd(s.fd(), DmirrorCmd::Read, &mut b, 1);
    check_eq!(ret, 0);
    check_eq!(b.cpages, 1);
    check_eq!(b.faults, 1);

    fill(&s.mm, b.mirror, 0..ints, |i| i as i32)?;
    let ret = cmd(s.fd(), DmirrorCmd::Write, &mut b, npages);
    check_eq!(ret, -EPERM);
    expect(&s.mm, "ptr", b.ptr, 0..ints, |_| 0)?;

    // Now allow writing and see that the zero page is replaced.
    check_ok!(s.mm.mprotect(b.ptr, size, RW));
    let ret = cmd(s.fd(), DmirrorCmd::Write, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// Runs `child` on its own thread with the forked address space `mm`, as a child process:
/// the thread's end is its `_exit`, which drops the address space. Returns what the child
/// returned (`waitpid` and `WIFEXITED` in the C).
pub(super) fn in_child(
    mm: Arc<Mm>,
    child: impl FnOnce(&Arc<Mm>) -> Result<(), Stop> + Send,
) -> Result<(), Stop> {
    std::thread::scope(|sc| {
        sc.spawn(move || {
            let r = child(&mm);
            drop(mm);
            r
        })
        .join()
        .unwrap_or_else(|p| {
            Err(Stop::Fail(format!(
                "the child panicked: {}",
                super::panic_message(&*p)
            )))
        })
    })
    .map_err(|e| match e {
        Stop::Fail(why) => Stop::Fail(format!("in the child: {why}")),
        skip => skip,
    })
}

/// `TEST_F(hmm, anon_write_child)`.
pub(super) fn anon_write_child(s: &mut Fixture) -> Result<(), Stop> {
    for migrate in [false, true] {
        for use_thp in [false, true] {
            let bytes = if use_thp {
                hmm::addr::PMD_SIZE
            } else {
                HMM_BUFFER_SIZE
            };
            let npages = bytes.div_ceil(s.page_size);
            check_ne!(npages, 0);
            let size = npages << s.page_shift;
            let old_ptr = check_ok!(s.mm.mmap(None, size * 2, RW, PRIVATE));
            let mut b = s.buffer(old_ptr, size * 2, size, 0)?;
            if use_thp {
                let map = align(b.ptr, size);
                check_ok!(s.mm.madvise(map, size, Advice::HugePage));
                b.ptr = map;
            }
            let ints = size / 4;
            fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;
            fill(&s.mm, b.mirror, 0..ints, |i| -(i as i32))?;
            if migrate {
                let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
                check_eq!(ret, 0);
                check_eq!(b.cpages, npages);
            }

            let child = check_ok!(s.mm.fork());
            let (ptr, mirror) = (b.ptr, b.mirror);
            let fixture = &*s;
            in_child(child, |mm| {
                // The child sees the parent's values.
                expect(mm, "ptr", ptr, 0..ints, |i| i as i32)?;
                if !migrate {
                    expect(mm, "mirror", mirror, 0..ints, |i| -(i as i32))?;
                }
                // The child needs its own mirror of its own address space.
                let child_fd = fixture.open(0, mm)?;
                let mut cb = b.clone();
                let ret = cmd(&child_fd, DmirrorCmd::Write, &mut cb, npages);
                check_eq!(ret, 0);
                check_eq!(cb.cpages, npages);
                check_eq!(cb.faults, 1);
                if !migrate {
                    expect(mm, "ptr", ptr, 0..ints, |i| -(i as i32))?;
                }
                Ok(())
            })?;
            // The parent's buffer did not change.
            expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
            b.ptr = old_ptr;
            s.free(b)?;
        }
    }
    Ok(())
}

/// `TEST_F(hmm, anon_write_child_shared)`.
pub(super) fn anon_write_child_shared(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let ptr = check_ok!(s.mm.mmap(None, size, RW, MapFlags::SHARED));
    let b = s.buffer(ptr, size, size, 0)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;
    fill(&s.mm, b.mirror, 0..ints, |i| -(i as i32))?;

    let child = check_ok!(s.mm.fork());
    let fixture = &*s;
    in_child(child, |mm| {
        expect(mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
        expect(mm, "mirror", b.mirror, 0..ints, |i| -(i as i32))?;
        let child_fd = fixture.open(0, mm)?;
        let mut cb = b.clone();
        let ret = cmd(&child_fd, DmirrorCmd::Write, &mut cb, npages);
        check_eq!(ret, 0);
        check_eq!(cb.cpages, npages);
        check_eq!(cb.faults, 1);
        expect(mm, "ptr", b.ptr, 0..ints, |i| -(i as i32))
    })?;
    // The parent's buffer changed: the memory is shared.
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| -(i as i32))?;
    s.free(b)
}

/// `TEST_F(hmm, anon_read_multiple)`.
pub(super) fn anon_read_multiple(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let ints = size / 4;
    for c in 0..NTIMES {
        let mut b = anon_buffer(s, size, RW)?;
        fill(&s.mm, b.ptr, 0..ints, |i| (i + c) as i32)?;
        let ret = cmd(s.fd(), DmirrorCmd::Read, &mut b, npages);
        check_eq!(ret, 0);
        check_eq!(b.cpages, npages);
        check_eq!(b.faults, 1);
        expect(&s.mm, "mirror", b.mirror, 0..ints, |i| (i + c) as i32)?;
        s.free(b)?;
    }
    Ok(())
}

/// A random number below `bound` (`hmm_random() % bound`, from `/dev/urandom` in the C):
/// std's randomly keyed hasher, fresh keys each call, hashing nothing.
fn random_below(bound: u64) -> u64 {
    RandomState::new().build_hasher().finish() % bound
}

/// `TEST_F(hmm, anon_teardown)`: the device reads while another thread unmaps the upper
/// half after a random delay; a read that succeeds read every page right.
pub(super) fn anon_teardown(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let ints = size / 4;
    for c in 0..NTIMES {
        let mut b = anon_buffer(s, size, RW)?;
        fill(&s.mm, b.ptr, 0..ints, |i| (i + c) as i32)?;
        let mm = &s.mm;
        let (ptr, half) = (b.ptr, size / 2);
        let (rc, unmapped) = std::thread::scope(|sc| {
            let unmapper = sc.spawn(move || {
                std::thread::sleep(Duration::from_nanos(random_below(32_000)));
                mm.munmap(ptr + half, half)
            });
            let rc = cmd(s.fd(), DmirrorCmd::Read, &mut b, npages);
            (rc, unmapper.join())
        });
        match unmapped {
            Ok(r) => check_ok!(r),
            Err(_) => return Err(Stop::Fail("the unmapping thread panicked".into())),
        }
        if rc == 0 {
            check_eq!(b.cpages, npages);
            check_eq!(b.faults, 1);
            expect(&s.mm, "mirror", b.mirror, 0..ints, |i| (i + c) as i32)?;
        }
        s.free(b)?;
    }
    Ok(())
}

/// `TEST_F(hmm, userfaultfd_read)` (linux-mm, the `hmm_range_fault_unlocked_timeout`
/// series): four pages registered with userfaultfd for missing pages; a handler thread
/// answers each fault with `UFFDIO_COPY` of a page of 0xAB; the device reads them through
/// `HMM_DMIRROR_READ_UNLOCKED`, whose faults drop the mmap lock while they wait. The
/// eventfd that stops the handler is an atomic flag its `poll` loop looks at.
pub(super) fn userfaultfd_read(s: &mut Fixture) -> Result<(), Stop> {
    let npages = 4;
    let size = npages << s.page_shift;
    // userfaultfd(O_CLOEXEC | O_NONBLOCK), then UFFDIO_API with no features.
    let uffd = check_ok!(Userfaultfd::new(&s.mm, UffdFeatures::empty()));
    let mut b = anon_buffer(s, size, RW)?;
    check_ok!(uffd.register(b.ptr, size, RegisterMode::MISSING));

    let stop = AtomicBool::new(false);
    let page_size = s.page_size;
    let fd = s.fd();
    let (ret, served) = std::thread::scope(|sc| {
        let handler = sc.spawn(|| {
            let mut served = 0;
            while !stop.load(Ordering::Acquire) {
                let Some(msg) = uffd.read_timeout(Duration::from_millis(10)) else {
                    continue;
                };
                let UffdMsg::PageFault { address, .. } = msg else {
                    break;
                };
                let dst = address.align_down(page_size);
                let page = vec![0xABu8; page_size as usize];
                if uffd.copy(dst, &page, CopyMode::empty()).is_err() {
                    break;
                }
                served += 1;
            }
            served
        });
        let ret = cmd(fd, DmirrorCmd::ReadUnlocked, &mut b, npages);
        stop.store(true, Ordering::Release);
        (ret, handler.join())
    });
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    let served = served.map_err(|_| Stop::Fail("the handler thread panicked".into()))?;
    check_eq!(served, npages);
    // The device read the data the handler supplied.
    let mirror = bytes(&s.mm, b.mirror, size)?;
    for (i, &v) in mirror.iter().enumerate() {
        if v != 0xAB {
            return Err(Stop::Fail(format!("mirror[{i}] = {v:#x}, expected 0xab")));
        }
    }
    drop(uffd);
    s.free(b)
}
