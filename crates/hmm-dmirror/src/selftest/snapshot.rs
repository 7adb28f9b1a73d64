//! What `hmm_range_fault` reports without faulting (`HMM_DMIRROR_SNAPSHOT`), and two
//! devices reading one range: `mixedmap`, `snapshot`, `compound`, `double_map`.

use hmm::mm::{MapFlags, Prot};

use super::harness::{
    bytes, cmd, expect, fill, load, migrate_sys_to_dev, store, PRIVATE, RW, TWOMEG,
};
use super::{Fixture, Stop};
use crate::{prot, DmirrorCmd};

/// `TEST_F(hmm, mixedmap)`: the driver's own mapping of its pages (`VM_MIXEDMAP`) reads
/// as a present read-only page.
pub(super) fn mixedmap(s: &mut Fixture) -> Result<(), Stop> {
    let npages = 1;
    let size = npages << s.page_shift;
    let ptr = check_ok!(s.fd().mmap(size, RW, PRIVATE));
    let mut b = s.buffer(ptr, size, npages, 0)?;

    let ret = cmd(s.fd(), DmirrorCmd::Snapshot, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    let m = bytes(&s.mm, b.mirror, npages)?;
    check_eq!(m[0], prot::READ);
    s.free(b)
}

/// `TEST_F(hmm2, snapshot)`: a PROT_NONE page, a hole, the zero page, a read-only page, a
/// writable page, a page on device 0 and a page on device 1, as device 0 sees them.
pub(super) fn snapshot(s: &mut Fixture) -> Result<(), Stop> {
    let npages = 7;
    let ps = s.page_size;
    let size = npages << s.page_shift;
    let p = check_ok!(s.mm.mmap(None, size, Prot::NONE, PRIVATE));
    let mut b = s.buffer(p, size, npages, 0)?;

    // Punch a hole after the first page.
    check_ok!(s.mm.munmap(p + ps, ps));

    // Page 2: the read-only zero page.
    check_ok!(s.mm.mprotect(p + 2 * ps, ps, Prot::READ));
    let val = load::<i32>(&s.mm, p + 2 * ps)? + 3;
    check_eq!(val, 3);

    // Page 3: read-only.
    check_ok!(s.mm.mprotect(p + 3 * ps, ps, RW));
    store(&s.mm, p + 3 * ps, val)?;
    check_ok!(s.mm.mprotect(p + 3 * ps, ps, Prot::READ));

    // Pages 4 to 6: read-write.
    check_ok!(s.mm.mprotect(p + 4 * ps, 3 * ps, RW));
    store(&s.mm, p + 4 * ps, val)?;

    // Page 5 migrates to device 0, page 6 to device 1.
    b.ptr = p + 5 * ps;
    let ret = migrate_sys_to_dev(s.fd0(), &mut b, 1);
    check_eq!(ret, 0);
    check_eq!(b.cpages, 1);
    b.ptr = p + 6 * ps;
    let ret = migrate_sys_to_dev(s.fd1(), &mut b, 1);
    check_eq!(ret, 0);
    check_eq!(b.cpages, 1);

    b.ptr = p;
    let ret = cmd(s.fd0(), DmirrorCmd::Snapshot, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);

    let m = bytes(&s.mm, b.mirror, npages)?;
    check_eq!(m[0], prot::ERROR);
    check_eq!(m[1], prot::ERROR);
    check_eq!(m[2], prot::ZERO | prot::READ);
    check_eq!(m[3], prot::READ);
    check_eq!(m[4], prot::WRITE);
    if !s.coherent() {
        check_eq!(m[5], prot::DEV_PRIVATE_LOCAL | prot::WRITE);
        check_eq!(m[6], prot::NONE);
    } else {
        check_eq!(m[5], prot::DEV_COHERENT_LOCAL | prot::WRITE);
        check_eq!(m[6], prot::DEV_COHERENT_REMOTE | prot::WRITE);
    }
    s.free(b)
}

/// `TEST_F(hmm, compound)`: a hugetlb page is reported as one large mapping (PMD, or PUD
/// for 1 GiB pages), writable, then read-only after `mprotect`.
pub(super) fn compound(s: &mut Fixture) -> Result<(), Stop> {
    if s.hugetlb_free_pages() == 0 {
        skip!("Not enough huge pages");
    }
    let size = TWOMEG;
    let npages = size >> s.page_shift;
    let Ok(ptr) = s.mm.mmap(None, size, RW, PRIVATE | MapFlags::HUGETLB) else {
        // The C returns here and passes; saying so is more use to a reader.
        skip!("Huge page could not be allocated");
    };
    let mut b = s.buffer(ptr, size, npages, 0)?;
    fill(&s.mm, b.ptr, 0..size / 4, |i| i as i32)?;

    for access in [prot::WRITE, prot::READ] {
        if access == prot::READ {
            check_ok!(s.mm.mprotect(b.ptr, size, Prot::READ));
        }
        let ret = cmd(s.fd(), DmirrorCmd::Snapshot, &mut b, npages);
        check_eq!(ret, 0);
        check_eq!(b.cpages, npages);
        // Every page at the level of the first, so a mapping that mixes levels fails.
        let m = bytes(&s.mm, b.mirror, npages)?;
        let level = if m[0] & prot::PUD != 0 {
            prot::PUD
        } else {
            prot::PMD
        };
        for (i, &got) in m.iter().enumerate() {
            if got != access | level {
                return Err(Stop::Fail(format!(
                    "Expected m[{i}] ({got:#x}) == {:#x}",
                    access | level
                )));
            }
        }
    }
    s.free(b)
}

/// `TEST_F(hmm2, double_map)`: both devices read the range; after device 1 migrated it,
/// device 0 reads it again (faulting the pages home).
pub(super) fn double_map(s: &mut Fixture) -> Result<(), Stop> {
    let npages = 6;
    let size = npages << s.page_shift;
    let ints = size / 4;
    let ptr = check_ok!(s.mm.mmap(None, size, RW, PRIVATE));
    let mut b = s.buffer(ptr, size, size, 0)?;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;
    check_ok!(s.mm.mprotect(b.ptr, size, Prot::READ));

    for fd in [s.fd0(), s.fd1()] {
        let ret = cmd(fd, DmirrorCmd::Read, &mut b, npages);
        check_eq!(ret, 0);
        check_eq!(b.cpages, npages);
        check_eq!(b.faults, 1);
        expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;
    }

    // Migrate the pages to device 1 and read them from device 0.
    let ret = migrate_sys_to_dev(s.fd1(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    let ret = cmd(s.fd0(), DmirrorCmd::Read, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;
    s.free(b)
}
