//! `MADV_POPULATE_READ` / `MADV_POPULATE_WRITE`: the cases of the kernel's
//! `tools/testing/selftests/mm/madv_populate.c` (permissions, holes, populated ranges,
//! soft-dirty) plus COW, SIGBUS past a shared object and bad input.

mod common;

use common::{page, Machine, RW};
use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, MmError, MremapFlags, Prot};

const PAGES: u64 = 16;
const SIZE: u64 = PAGES * PAGE_SIZE;

fn populated(m: &Machine, a: hmm::addr::VirtAddr, pages: u64) -> bool {
    m.mm.pagemap(a, pages).unwrap().iter().all(|e| e.present)
}

fn errno(r: Result<(), MmError>) -> i32 {
    r.map_or_else(|e| e.errno(), |()| 0)
}

#[test]
fn read_populate_needs_read_and_write_populate_needs_write() {
    // test_prot_read
    let m = Machine::new(16);
    let a = m.map(PAGES, Prot::READ, MapFlags::PRIVATE);
    assert_eq!(errno(m.mm.madvise(a, SIZE, Advice::PopulateRead)), 0);
    assert_eq!(
        errno(m.mm.madvise(a, SIZE, Advice::PopulateWrite)),
        libc::EINVAL
    );
    // test_prot_write
    let w = m.map(PAGES, Prot::WRITE, MapFlags::PRIVATE);
    assert_eq!(
        errno(m.mm.madvise(w, SIZE, Advice::PopulateRead)),
        libc::EINVAL
    );
    assert_eq!(errno(m.mm.madvise(w, SIZE, Advice::PopulateWrite)), 0);
    assert!(populated(&m, w, PAGES));
    // PROT_NONE allows neither.
    let n = m.map(PAGES, Prot::NONE, MapFlags::PRIVATE);
    for advice in [Advice::PopulateRead, Advice::PopulateWrite] {
        assert_eq!(errno(m.mm.madvise(n, SIZE, advice)), libc::EINVAL);
    }
    m.mm.audit().unwrap();
}

#[test]
fn a_range_with_a_hole_is_enomem() {
    // test_holes: a hole in the middle, at the start and at the end of the range.
    let m = Machine::new(16);
    let a = m.map(PAGES, RW, MapFlags::PRIVATE);
    m.mm.munmap(page(a, PAGES / 2), PAGE_SIZE).unwrap();
    let hole = page(a, PAGES / 2);
    for advice in [Advice::PopulateRead, Advice::PopulateWrite] {
        assert_eq!(errno(m.mm.madvise(a, SIZE, advice)), libc::ENOMEM);
        assert_eq!(errno(m.mm.madvise(hole, PAGE_SIZE, advice)), libc::ENOMEM);
        assert_eq!(
            errno(m.mm.madvise(page(a, 1), (PAGES / 2) * PAGE_SIZE, advice)),
            libc::ENOMEM
        );
        assert_eq!(
            errno(m.mm.madvise(hole, (PAGES / 2) * PAGE_SIZE, advice)),
            libc::ENOMEM
        );
    }
    // The model's madvise rule: a range with a hole changes nothing.
    assert_eq!(m.phys.nr_in_use(), 0);
    assert!(m
        .mm
        .pagemap(a, PAGES / 2)
        .unwrap()
        .iter()
        .all(|e| !e.present));
    m.mm.audit().unwrap();
}

#[test]
fn read_populate_maps_the_zero_page_and_write_populate_private_pages() {
    // test_populate_read, test_populate_write
    let m = Machine::new(16);
    let a = m.map(PAGES, RW, MapFlags::PRIVATE);
    assert!(!populated(&m, a, PAGES));
    m.mm.madvise(a, SIZE, Advice::PopulateRead).unwrap();
    assert!(populated(&m, a, PAGES));
    assert_eq!(m.mm.stats().faults.anon_read_zero, PAGES);
    assert_eq!(m.phys.nr_in_use(), 0, "the shared zero page");
    m.mm.madvise(a, SIZE, Advice::PopulateWrite).unwrap();
    assert!(populated(&m, a, PAGES));
    assert_eq!(m.phys.nr_in_use(), PAGES);
    // Writes now find writable entries: no more faults, and the bytes are still zeros.
    let faults = m.mm.stats().faults;
    for i in 0..PAGES {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), 0);
        m.mm.write_val(page(a, i), i).unwrap();
    }
    assert_eq!(m.mm.stats().faults, faults);
    // Populating again changes neither bytes nor frames.
    let before = m.mm.pagemap(a, PAGES).unwrap();
    m.mm.madvise(a, SIZE, Advice::PopulateWrite).unwrap();
    m.mm.madvise(a, SIZE, Advice::PopulateRead).unwrap();
    assert_eq!(m.mm.pagemap(a, PAGES).unwrap(), before);
    for i in 0..PAGES {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), i);
    }
    m.mm.audit().unwrap();
}

#[test]
fn write_populate_sets_soft_dirty_and_read_populate_does_not() {
    // test_softdirty, on shared anonymous memory as the kernel's test uses.
    let m = Machine::new(16);
    let a = m.map(PAGES, RW, MapFlags::SHARED);
    m.mm.clear_soft_dirty();
    let soft_dirty = |m: &Machine| m.mm.pagemap(a, PAGES).unwrap().iter().any(|e| e.soft_dirty);
    assert!(!soft_dirty(&m));
    m.mm.madvise(a, SIZE, Advice::PopulateRead).unwrap();
    assert!(populated(&m, a, PAGES));
    assert!(!soft_dirty(&m));
    m.mm.madvise(a, SIZE, Advice::PopulateWrite).unwrap();
    assert!(m.mm.pagemap(a, PAGES).unwrap().iter().all(|e| e.soft_dirty));
    m.mm.audit().unwrap();
}

#[test]
fn write_populate_breaks_cow_and_leaves_the_child_its_bytes() {
    let m = Machine::new(16);
    let a = m.map(PAGES, RW, MapFlags::PRIVATE);
    for i in 0..PAGES {
        m.mm.write_val(page(a, i), 0x100 + i).unwrap();
    }
    let child = m.mm.fork().unwrap();
    let shared = m.mm.pagemap(a, PAGES).unwrap();
    assert!(shared.iter().all(|e| !e.exclusive));
    m.mm.madvise(a, SIZE, Advice::PopulateWrite).unwrap();
    let own = m.mm.pagemap(a, PAGES).unwrap();
    for i in 0..PAGES as usize {
        assert!(own[i].exclusive, "page {i}");
        assert_ne!(own[i].pfn, shared[i].pfn, "page {i} was copied");
    }
    assert_eq!(m.mm.stats().faults.cow, PAGES);
    for i in 0..PAGES {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), 0x100 + i);
        assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), 0x100 + i);
    }
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn populating_past_a_shared_object_is_efault_after_populating_what_is_inside() {
    let m = Machine::new(16);
    let s = m.map(2, RW, MapFlags::SHARED);
    let n =
        m.mm.mremap(s, 2 * PAGE_SIZE, 4 * PAGE_SIZE, MremapFlags::MAYMOVE, None)
            .unwrap();
    for advice in [Advice::PopulateRead, Advice::PopulateWrite] {
        assert_eq!(
            m.mm.madvise(n, 4 * PAGE_SIZE, advice),
            Err(MmError::Fault { addr: page(n, 2) })
        );
    }
    assert!(populated(&m, n, 2));
    m.mm.audit().unwrap();
}

#[test]
fn write_populate_of_a_thp_range_faults_huge_pages_and_bad_input_is_refused() {
    let m = Machine::new(16);
    let a =
        m.mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    m.mm.madvise(a, 2 * PMD_SIZE, Advice::HugePage).unwrap();
    m.mm.madvise(a, 2 * PMD_SIZE, Advice::PopulateWrite)
        .unwrap();
    assert_eq!(m.phys.nr_in_use(), 2 * PMD_SIZE / PAGE_SIZE);
    assert_eq!(m.mm.stats().faults.thp_anon, 2);
    assert!(m
        .mm
        .pagemap(a, 2 * PMD_SIZE / PAGE_SIZE)
        .unwrap()
        .iter()
        .all(|e| e.order == 9));
    m.mm.audit().unwrap();
    // Unaligned, overflowing, and empty (a no-op, as in Linux).
    assert_eq!(
        errno(m.mm.madvise(
            page(a, 0).checked_add(1).unwrap(),
            PAGE_SIZE,
            Advice::PopulateRead
        )),
        libc::EINVAL
    );
    assert_eq!(
        errno(m.mm.madvise(a, u64::MAX, Advice::PopulateWrite)),
        libc::EINVAL
    );
    assert_eq!(errno(m.mm.madvise(a, 0, Advice::PopulateWrite)), 0);
}
