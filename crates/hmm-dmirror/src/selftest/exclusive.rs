//! Exclusive device access and what the CPU side does to device pages (GUP, COW):
//! `exclusive`, `exclusive_mprotect`, `exclusive_cow`, `hmm_gup_test`,
//! `hmm_cow_in_device`.

use std::sync::Arc;

use hmm::mm::{GupFlags, Mm, Prot};

use super::anon::{anon_buffer, buffer_pages, in_child};
use super::harness::{bytes, cmd, expect, fill, migrate_sys_to_dev, EPERM, RW};
use super::{Fixture, Stop};
use crate::{prot, DmirrorCmd};

/// `for (...) ASSERT_EQ(ptr[i]++, i); for (...) ASSERT_EQ(ptr[i], i + 1);`: the CPU reads
/// every int, then increments it, then reads it again.
fn increment(mm: &Mm, ptr: hmm::addr::VirtAddr, ints: u64) -> Result<(), Stop> {
    expect(mm, "ptr", ptr, 0..ints, |i| i as i32)?;
    fill(mm, ptr, 0..ints, |i| i as i32 + 1)?;
    expect(mm, "ptr", ptr, 0..ints, |i| i as i32 + 1)
}

/// `TEST_F(hmm, exclusive)`: the CPU's touch revokes exclusive access.
pub(super) fn exclusive(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Exclusive, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    // Fault the pages back to system memory and check them.
    increment(&s.mm, b.ptr, ints)?;

    // Atomic access is revoked.
    let ret = cmd(s.fd(), DmirrorCmd::CheckExclusive, &mut b, npages);
    check_eq!(ret, 0);
    s.free(b)
}

/// `TEST_F(hmm, exclusive_mprotect)`.
pub(super) fn exclusive_mprotect(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Exclusive, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    check_ok!(s.mm.mprotect(b.ptr, size, Prot::READ));
    let ret = cmd(s.fd(), DmirrorCmd::Write, &mut b, npages);
    check_eq!(ret, -EPERM);
    s.free(b)
}

/// `TEST_F(hmm, exclusive_cow)`: fork over exclusive pages; parent and child each
/// increment their copy at the same time.
pub(super) fn exclusive_cow(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Exclusive, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);

    let child = check_ok!(s.mm.fork());
    let ptr = b.ptr;
    let parent = &s.mm;
    std::thread::scope(|sc| {
        let c = sc.spawn(|| in_child(child, |mm| increment(mm, ptr, ints)));
        let p = increment(parent, ptr, ints);
        // Wait for the child, then report the parent's failure first.
        let c = c
            .join()
            .unwrap_or_else(|_| Err(Stop::Fail("child panicked".into())));
        p.and(c)
    })?;
    s.free(b)
}

/// `gup_test_exec`: one of the `gup_test` module's commands on one page at `addr`, always
/// with `FOLL_WRITE`; the pages are released when the command ends, as the module does.
fn gup_test_exec(mm: &Arc<Mm>, addr: hmm::addr::VirtAddr, cmd: GupTest) -> Result<(), Stop> {
    let flags = GupFlags::WRITE;
    let pages = match cmd {
        // get_user_pages(), and get_user_pages_fast(), which ends in the same walk here.
        GupTest::Basic | GupTest::FastBenchmark => mm.get_user_pages(addr, 1, flags),
        // pin_user_pages_fast(FOLL_LONGTERM) and pin_user_pages(FOLL_LONGTERM).
        GupTest::PinFastLongterm | GupTest::PinLongtermBenchmark => {
            mm.pin_user_pages(addr, 1, flags | GupFlags::LONGTERM)
        }
    };
    match pages {
        Ok(p) => {
            p.release();
            Ok(())
        }
        Err(e) => Err(Stop::Fail(format!("gup_test {cmd:?} at {addr}: {e}"))),
    }
}

/// The `gup_test` commands the case uses.
#[derive(Debug, Clone, Copy)]
enum GupTest {
    /// `GUP_BASIC_TEST`.
    Basic,
    /// `GUP_FAST_BENCHMARK`.
    FastBenchmark,
    /// `PIN_FAST_BENCHMARK` with `FOLL_LONGTERM`.
    PinFastLongterm,
    /// `PIN_LONGTERM_BENCHMARK`.
    PinLongtermBenchmark,
}

/// `TEST_F(hmm, hmm_gup_test)`: plain GUP of a device-private page faults it to system
/// memory and leaves a device-coherent one in place; a long-term pin migrates either to
/// system memory.
pub(super) fn hmm_gup_test(s: &mut Fixture) -> Result<(), Stop> {
    let npages = 4;
    let ps = s.page_size;
    let size = npages << s.page_shift;
    let ints = size / 4;
    let mut b = anon_buffer(s, size, RW)?;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    gup_test_exec(&s.mm, b.ptr, GupTest::Basic)?;
    gup_test_exec(&s.mm, b.ptr + ps, GupTest::FastBenchmark)?;
    gup_test_exec(&s.mm, b.ptr + 2 * ps, GupTest::PinFastLongterm)?;
    gup_test_exec(&s.mm, b.ptr + 3 * ps, GupTest::PinLongtermBenchmark)?;

    let ret = cmd(s.fd(), DmirrorCmd::Snapshot, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    let m = bytes(&s.mm, b.mirror, npages)?;
    if s.coherent() {
        check_eq!(prot::DEV_COHERENT_LOCAL | prot::WRITE, m[0]);
        check_eq!(prot::DEV_COHERENT_LOCAL | prot::WRITE, m[1]);
    } else {
        check_eq!(prot::WRITE, m[0]);
        check_eq!(prot::WRITE, m[1]);
    }
    check_eq!(prot::WRITE, m[2]);
    check_eq!(prot::WRITE, m[3]);
    // No byte was corrupted on the way.
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, hmm_cow_in_device)`: the parent writes device pages it shares with a live
/// child; each write gets the parent a new page in system memory (a device-private page
/// is migrated home first, a device-coherent one is copied directly).
pub(super) fn hmm_cow_in_device(s: &mut Fixture) -> Result<(), Stop> {
    let npages = 4;
    let size = npages << s.page_shift;
    let ints = size / 4;
    let mut b = anon_buffer(s, size, RW)?;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);

    // The child only lives (it spins until killed in the C).
    let child = check_ok!(s.mm.fork());
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;
    // SIGKILL: the child's address space goes.
    drop(child);

    let ret = cmd(s.fd(), DmirrorCmd::Snapshot, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    let m = bytes(&s.mm, b.mirror, npages)?;
    for (i, &got) in m.iter().enumerate() {
        if got != prot::WRITE {
            return Err(Stop::Fail(format!(
                "Expected HMM_DMIRROR_PROT_WRITE == m[{i}] ({got:#x})"
            )));
        }
    }
    s.free(b)
}
