//! The kernel's `tools/testing/selftests/mm/soft-dirty.c`, ported: the soft-dirty bit of
//! `/proc/pid/pagemap` ([`Mm::pagemap`](hmm::mm::Mm::pagemap)) after writes, after
//! `clear_refs` ([`Mm::clear_soft_dirty`](hmm::mm::Mm::clear_soft_dirty)), on new and
//! reused VMAs, on a THP, and across `mprotect`, for anonymous and file memory. One test
//! per case of the file (its 15 results), in its order.

mod common;

use common::{Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, MemFile, Prot};

/// `TEST_ITERATIONS`.
const TEST_ITERATIONS: u32 = 10_000;

fn soft_dirty(m: &Machine, a: VirtAddr) -> bool {
    m.mm.pagemap(a, 1).unwrap()[0].soft_dirty
}

/// `map[0]++`.
fn bump(m: &Machine, a: VirtAddr) {
    let v: u8 = m.mm.read_val(a).unwrap();
    m.mm.write_val(a, v.wrapping_add(1)).unwrap();
}

/// The loop of `test_simple` and `test_hugepage`: clean after `clear_refs`, dirty after a
/// write, every time.
fn clear_and_dirty(m: &Machine, map: VirtAddr) {
    m.mm.clear_soft_dirty();
    for i in 0..TEST_ITERATIONS {
        assert!(
            !soft_dirty(m, map),
            "dirty bit was 1, but should be 0 (i={i})"
        );
        m.mm.clear_soft_dirty();
        bump(m, map);
        assert!(
            soft_dirty(m, map),
            "dirty bit was 0, but should be 1 (i={i})"
        );
        m.mm.clear_soft_dirty();
    }
}

#[test]
fn test_simple() {
    let m = Machine::new(16);
    let map = m.map(1, RW, MapFlags::PRIVATE);
    clear_and_dirty(&m, map);
}

#[test]
fn test_vma_reuse() {
    let m = Machine::new(16);
    let map = m.map(1, RW, MapFlags::PRIVATE);
    // The kernel marks new regions soft-dirty.
    assert!(soft_dirty(&m, map), "dirty bit of allocated page");
    m.mm.clear_soft_dirty();
    m.mm.munmap(map, PAGE_SIZE).unwrap();
    let map2 = m.map(1, RW, MapFlags::PRIVATE);
    // Even when the address is reused (which the model's placement guarantees here).
    assert_eq!(map, map2, "the address is reused");
    assert!(soft_dirty(&m, map2), "dirty bit of reused address page");
}

#[test]
fn test_hugepage() {
    let m = Machine::new(16);
    let map = m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE).unwrap();
    assert!(map.is_aligned(PMD_SIZE));
    m.mm.madvise(map, PMD_SIZE, Advice::HugePage).unwrap();
    let bytes: Vec<u8> = (0..PMD_SIZE).map(|i| i as u8).collect();
    m.mm.write(map, &bytes).unwrap();
    // check_huge_anon: one THP.
    assert_eq!(
        m.mm.pagemap(map, 1).unwrap()[0].order,
        9,
        "huge page allocation"
    );
    clear_and_dirty(&m, map);
}

/// `test_mprotect`: written, cleared, through a read-only round trip, written again.
fn test_mprotect(anon: bool) {
    let m = Machine::new(16);
    let file = MemFile::new(&m.phys);
    let map = if anon {
        m.map(1, RW, MapFlags::PRIVATE)
    } else {
        file.truncate(PAGE_SIZE).unwrap();
        m.mm.mmap_file(None, PAGE_SIZE, RW, MapFlags::SHARED, &file, 0)
            .unwrap()
    };
    m.mm.write_val(map, 1u8).unwrap();
    assert!(soft_dirty(&m, map), "dirty bit of new written page");
    m.mm.clear_soft_dirty();
    assert!(!soft_dirty(&m, map), "soft-dirty clear after clear_refs");
    m.mm.mprotect(map, PAGE_SIZE, Prot::READ).unwrap();
    assert!(!soft_dirty(&m, map), "soft-dirty clear after marking RO");
    m.mm.mprotect(map, PAGE_SIZE, RW).unwrap();
    assert!(!soft_dirty(&m, map), "soft-dirty clear after marking RW");
    m.mm.write_val(map, 2u8).unwrap();
    assert!(soft_dirty(&m, map), "soft-dirty after rewritten");
    m.mm.audit().unwrap();
}

#[test]
fn test_mprotect_anon() {
    test_mprotect(true);
}

#[test]
fn test_mprotect_file() {
    test_mprotect(false);
}
