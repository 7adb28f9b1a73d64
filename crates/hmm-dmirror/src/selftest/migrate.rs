//! Migration of 4 KiB pages to the device and back: `migrate`, `migrate_file_private`,
//! `migrate_fault`, `migrate_release`, `migrate_shared`, `migrate_mixed`,
//! `migrate_multiple`.

use hmm::mm::{MapFlags, Prot};

use super::anon::{anon_buffer, buffer_pages};
use super::file::create_file;
use super::harness::{
    cmd, expect, fill, load, migrate_dev_to_sys, migrate_sys_to_dev, store, EINVAL, ENOENT, NTIMES,
    PRIVATE, RW,
};
use super::{Fixture, Stop};
use crate::DmirrorCmd;

/// `TEST_F(hmm, migrate)`.
pub(super) fn migrate(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, migrate_file_private)`: the private copies of a file mapping's pages
/// migrate.
pub(super) fn migrate_file_private(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let file = create_file(s, size)?;
    let ints = size / 4;
    let ptr = check_ok!(s.mm.mmap_file(None, size, RW, PRIVATE, &file, 0));
    let mut b = s.buffer(ptr, size, size, 0)?;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, migrate_fault)`: migrate, fault half back with CPU reads, migrate the mix
/// of system and device pages again.
pub(super) fn migrate_fault(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    // Fault half the pages back to system memory and check them.
    expect(&s.mm, "ptr", b.ptr, 0..ints / 2, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, migrate_release)`: migrate, release all of the device's memory
/// (`HMM_DMIRROR_RELEASE`), fault back.
pub(super) fn migrate_release(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let mut b = anon_buffer(s, size, RW)?;
    let ints = size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Release, &mut b, npages);
    check_eq!(ret, 0);
    expect(&s.mm, "ptr", b.ptr, 0..ints / 2, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, migrate_shared)`: shared anonymous memory is not selected.
pub(super) fn migrate_shared(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let ptr = check_ok!(s.mm.mmap(None, size, RW, MapFlags::SHARED));
    let mut b = s.buffer(ptr, size, size, 0)?;
    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, -ENOENT);
    s.free(b)
}

/// `TEST_F(hmm2, migrate_mixed)`: a range of a PROT_NONE page, a hole, the zero page, a
/// read-only page and two writable pages; then device 0 leaves device 1's page alone.
pub(super) fn migrate_mixed(s: &mut Fixture) -> Result<(), Stop> {
    let npages = 6;
    let ps = s.page_size;
    let size = npages << s.page_shift;
    let p = check_ok!(s.mm.mmap(None, size, Prot::NONE, PRIVATE));
    let mut b = s.buffer(p, size, size, 0)?;

    // Migrating a protected area is an error.
    let ret = migrate_sys_to_dev(s.fd1(), &mut b, npages);
    check_eq!(ret, -EINVAL);

    // Punch a hole after the first page; a range the VMA does not cover is an error.
    check_ok!(s.mm.munmap(p + ps, ps));
    let ret = migrate_sys_to_dev(s.fd1(), &mut b, 3);
    check_eq!(ret, -EINVAL);

    // Page 2: the read-only zero page.
    check_ok!(s.mm.mprotect(p + 2 * ps, ps, Prot::READ));
    let val = load::<i32>(&s.mm, p + 2 * ps)? + 3;
    check_eq!(val, 3);

    // Page 3: read-only.
    check_ok!(s.mm.mprotect(p + 3 * ps, ps, RW));
    store(&s.mm, p + 3 * ps, val)?;
    check_ok!(s.mm.mprotect(p + 3 * ps, ps, Prot::READ));

    // Pages 4 and 5: read-write.
    check_ok!(s.mm.mprotect(p + 4 * ps, 2 * ps, RW));
    store(&s.mm, p + 4 * ps, val)?;
    store(&s.mm, p + 5 * ps, val)?;

    // Pages 2 to 5 migrate to device 1.
    b.ptr = p + 2 * ps;
    let ret = migrate_sys_to_dev(s.fd1(), &mut b, 4);
    check_eq!(ret, 0);
    check_eq!(b.cpages, 4);

    // Page 5 does not migrate to device 0: it is on device 1.
    b.ptr = p + 5 * ps;
    let ret = migrate_sys_to_dev(s.fd0(), &mut b, 1);
    check_eq!(ret, -ENOENT);

    b.ptr = p;
    s.free(b)
}

/// `TEST_F(hmm, migrate_multiple)`: ten rounds of migrating to the device and back, by CPU
/// faults for device-private memory and by `HMM_DMIRROR_MIGRATE_TO_SYS` for
/// device-coherent memory (which the CPU reads without faulting).
pub(super) fn migrate_multiple(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let ints = size / 4;
    for _ in 0..NTIMES {
        let mut b = anon_buffer(s, size, RW)?;
        fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

        let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
        check_eq!(ret, 0);
        check_eq!(b.cpages, npages);
        expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

        if s.coherent() {
            let ret = migrate_dev_to_sys(s.fd(), &mut b, npages);
            check_eq!(ret, 0);
            check_eq!(b.cpages, npages);
        }
        expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
        s.free(b)?;
    }
    Ok(())
}
