//! Huge pages: THPs written by the device, migrated whole to device THPs and back, split by
//! unmaps and moved by `mremap`, with device allocation failures; and a hugetlb page.
//! `anon_write_huge`, `anon_write_hugetlbfs` and the `migrate_*huge*`, `migrate_*_fault`
//! cases.

use hmm::addr::{VirtAddr, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, MremapFlags, Prot};

use super::harness::{
    bytes, cmd, expect, fill, load, migrate_dev_to_sys, migrate_sys_to_dev, Buffer, PRIVATE, RW,
    TWOMEG,
};
use super::{Fixture, Stop};
use crate::{prot, DmirrorCmd, HMM_DMIRROR_FLAG_FAIL_ALLOC};

/// `read_pmd_pagesize()`.
const PMD: u64 = PMD_SIZE;

/// `mmap` of `2 * size` bytes with `prot`, the buffer at the `size`-aligned address inside
/// it, advised `advice`, and a mirror of `mirror_size` bytes of `0xFF`. `b.size` covers
/// the whole mapping, at `old_ptr`.
fn aligned_buffer(
    s: &Fixture,
    size: u64,
    prot: Prot,
    advice: Option<Advice>,
    mirror_size: u64,
) -> Result<(Buffer, VirtAddr), Stop> {
    let old_ptr = check_ok!(s.mm.mmap(None, 2 * size, prot, PRIVATE));
    let mut b = s.buffer(old_ptr, 2 * size, mirror_size, 0xFF)?;
    let map = super::harness::align(old_ptr, size);
    if let Some(advice) = advice {
        check_ok!(s.mm.madvise(map, size, advice));
    }
    b.ptr = map;
    Ok((b, old_ptr))
}

/// `TEST_F(hmm, anon_write_huge)`.
pub(super) fn anon_write_huge(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    let (mut b, old_ptr) = aligned_buffer(s, size, RW, Some(Advice::HugePage), size)?;
    fill(&s.mm, b.mirror, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Write, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
    b.ptr = old_ptr;
    s.free(b)
}

/// `TEST_F(hmm, anon_write_hugetlbfs)`.
pub(super) fn anon_write_hugetlbfs(s: &mut Fixture) -> Result<(), Stop> {
    if s.hugetlb_free_pages() == 0 {
        skip!("Not enough huge pages");
    }
    let size = TWOMEG;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    let Ok(ptr) = s.mm.mmap(None, size, RW, PRIVATE | MapFlags::HUGETLB) else {
        skip!("Huge page could not be allocated");
    };
    let mut b = s.buffer(ptr, size, size, 0)?;
    fill(&s.mm, b.mirror, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Write, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, migrate_anon_huge_empty)`: an untouched THP-sized range migrates as zeros.
pub(super) fn migrate_anon_huge_empty(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let (mut b, old_ptr) = aligned_buffer(s, size, Prot::READ, Some(Advice::HugePage), size)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..size / 4, |_| 0)?;
    b.ptr = old_ptr;
    s.free(b)
}

/// `TEST_F(hmm, migrate_anon_huge_zero)`: the huge zero page migrates and faults back as
/// zeros.
pub(super) fn migrate_anon_huge_zero(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let (mut b, old_ptr) = aligned_buffer(s, size, Prot::READ, Some(Advice::HugePage), size)?;

    // Map the read-only huge zero page.
    let val: i32 = load(&s.mm, b.ptr)?;
    check_eq!(val, 0);

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..size / 4, |_| 0)?;
    expect(&s.mm, "ptr", b.ptr, 0..size / 4, |_| 0)?;
    b.ptr = old_ptr;
    s.free(b)
}

/// `TEST_F(hmm, migrate_anon_huge_free)`: `MADV_FREE` of a THP on the device.
pub(super) fn migrate_anon_huge_free(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    let (mut b, old_ptr) = aligned_buffer(s, size, RW, Some(Advice::HugePage), size)?;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    check_ok!(s.mm.madvise(b.ptr, size, Advice::Free));
    b.ptr = old_ptr;
    s.free(b)
}

/// `TEST_F(hmm, migrate_anon_huge_fault)`: a collapsed THP migrates to one device PMD
/// (pagemap: swap, not present) and faults back whole.
pub(super) fn migrate_anon_huge_fault(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    let (mut b, old_ptr) = aligned_buffer(s, size, RW, None, size)?;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;
    check_ok!(s.mm.madvise(b.ptr, size, Advice::Collapse));

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    if !s.coherent() {
        let ret = cmd(s.fd(), DmirrorCmd::Snapshot, &mut b, npages);
        check_eq!(ret, 0);
        check_eq!(b.cpages, npages);
        let want = prot::DEV_PRIVATE_LOCAL | prot::WRITE | prot::PMD;
        let m = bytes(&s.mm, b.mirror, npages)?;
        for (i, &got) in m.iter().enumerate() {
            if got != want {
                return Err(Stop::Fail(format!(
                    "Expected m[{i}] ({got:#x}) == {want:#x}"
                )));
            }
        }
        for (i, e) in check_ok!(s.mm.pagemap(b.ptr, npages)).iter().enumerate() {
            check_ne!((i, e.swap), (i, None));
            check_eq!((i, e.present), (i, false));
        }
    }

    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
    b.ptr = old_ptr;
    s.free(b)
}

/// `TEST_F(hmm, migrate_partial_unmap_fault)`: migrate 2 MiB (a THP or 512 pages), unmap
/// a quarter-aligned half of it, fault the rest back.
pub(super) fn migrate_partial_unmap_fault(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    let unmap_size = size / 2;
    for advice in [Advice::NoHugePage, Advice::HugePage] {
        for offset in [0, size / 4, size / 2] {
            let (mut b, old_ptr) = aligned_buffer(s, size, RW, Some(advice), size)?;
            fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

            let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
            check_eq!(ret, 0);
            check_eq!(b.cpages, npages);
            expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

            check_ok!(s.mm.munmap(b.ptr + offset, unmap_size));
            let (lo, hi) = (offset / 4, (offset + unmap_size) / 4);
            expect(&s.mm, "ptr", b.ptr, 0..lo, |i| i as i32)?;
            expect(&s.mm, "ptr", b.ptr, hi..ints, |i| i as i32)?;
            b.ptr = old_ptr;
            s.free(b)?;
        }
    }
    Ok(())
}

/// `TEST_F(hmm, migrate_remap_fault)`: `mremap` (MAYMOVE | FIXED, with and without
/// DONTUNMAP) before or after the migration, to three offsets, with and without THP; the
/// pages fault back at the new address.
pub(super) fn migrate_remap_fault(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    for before in [false, true] {
        for dont_unmap in [false, true] {
            for advice in [Advice::NoHugePage, Advice::HugePage] {
                for offset in [0, size / 4, size / 2] {
                    let mut flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
                    if dont_unmap {
                        flags |= MremapFlags::DONTUNMAP;
                    }
                    let old_ptr = check_ok!(s.mm.mmap(None, 8 * size, RW, PRIVATE));
                    let mut b = s.buffer(old_ptr, 8 * size, size, 0xFF)?;
                    let map = super::harness::align(old_ptr, size);
                    check_ok!(s.mm.madvise(map, size, advice));
                    check_ok!(s.mm.munmap(map + size, size * 2));
                    b.ptr = map;
                    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

                    let target = map + size + offset;
                    let mut new_ptr = VirtAddr::ZERO;
                    if before {
                        new_ptr = check_ok!(s.mm.mremap(map, size, size, flags, Some(target)));
                        b.ptr = new_ptr;
                    }

                    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
                    check_eq!(ret, 0);
                    check_eq!(b.cpages, npages);
                    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

                    if !before {
                        new_ptr = check_ok!(s.mm.mremap(map, size, size, flags, Some(target)));
                        b.ptr = new_ptr;
                    }

                    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;
                    check_ok!(s.mm.munmap(new_ptr, size));
                    b.ptr = old_ptr;
                    s.free(b)?;
                }
            }
        }
    }
    Ok(())
}

/// `HMM_DMIRROR_FLAGS` with `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the device's next THP
/// allocation fails.
fn fail_next_alloc(s: &Fixture, b: &mut Buffer) -> Result<(), Stop> {
    let ret = cmd(s.fd(), DmirrorCmd::Flags, b, HMM_DMIRROR_FLAG_FAIL_ALLOC);
    check_eq!(ret, 0);
    Ok(())
}

/// `TEST_F(hmm, migrate_anon_huge_err)`: a THP migrates as pages when the device cannot
/// allocate a THP, and comes back as pages when system memory cannot.
pub(super) fn migrate_anon_huge_err(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    let (mut b, old_ptr) = aligned_buffer(s, size, RW, Some(Advice::HugePage), 2 * size)?;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    fail_next_alloc(s, &mut b)?;
    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;

    // Fault back a single page.
    check_eq!(load::<i32>(&s.mm, b.ptr + 2048 * 4)?, 2048);

    // Unmap and map the region again to reset things.
    check_ok!(s.mm.munmap(old_ptr, 2 * size));
    let old_ptr = check_ok!(s.mm.mmap(None, 2 * size, RW, PRIVATE));
    let map = super::harness::align(old_ptr, size);
    check_ok!(s.mm.madvise(map, size, Advice::HugePage));
    b.ptr = map;
    fill(&s.mm, b.ptr, 0..ints, |i| i as i32)?;

    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);

    // An allocation failure when the device THP comes back.
    fail_next_alloc(s, &mut b)?;
    let ret = migrate_dev_to_sys(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(load::<i32>(&s.mm, b.ptr + 2048 * 4)?, 2048);

    b.ptr = old_ptr;
    s.free(b)
}

/// `TEST_F(hmm, migrate_anon_huge_zero_err)`: the huge zero page migrates as pages when
/// the device cannot allocate a THP.
pub(super) fn migrate_anon_huge_zero_err(s: &mut Fixture) -> Result<(), Stop> {
    let size = PMD;
    let npages = size >> s.page_shift;
    let ints = size / 4;
    let (mut b, old_ptr) = aligned_buffer(s, size, Prot::READ, Some(Advice::HugePage), 2 * size)?;

    fail_next_alloc(s, &mut b)?;
    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |_| 0)?;

    // Fault back a single page.
    check_eq!(load::<i32>(&s.mm, b.ptr + 2048 * 4)?, 0);

    // Unmap and map the region again to reset things.
    check_ok!(s.mm.munmap(old_ptr, 2 * size));
    let old_ptr = check_ok!(s.mm.mmap(None, 2 * size, Prot::READ, PRIVATE));
    let map = super::harness::align(old_ptr, size);
    check_ok!(s.mm.madvise(map, size, Advice::HugePage));
    b.ptr = map;

    // Map the huge zero page. (The C reads through its stale pointer to the old mapping,
    // which works only where the new mapping lands at the same address; this reads the
    // new one.)
    check_eq!(load::<i32>(&s.mm, b.ptr)?, 0);

    fail_next_alloc(s, &mut b)?;
    let ret = migrate_sys_to_dev(s.fd(), &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    expect(&s.mm, "ptr", b.ptr, 0..ints, |_| 0)?;

    b.ptr = old_ptr;
    s.free(b)
}
