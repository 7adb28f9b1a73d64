//! The kernel's `tools/testing/selftests/mm/gup_longterm.c`, ported: a long-term pin
//! (`FOLL_PIN | FOLL_LONGTERM`), read-only or read-write, of a file page mapped shared or
//! private. Every case of the file, in its order, on a memfd and a 2 MiB hugetlb memfd; the
//! table in `docs/mm-selftests.md` says which of the file's memory kinds are expressible.
//!
//! In the kernel the pin goes through the `gup_test` module (`PIN_LONGTERM_TEST_START`);
//! here it is [`Mm::pin_user_pages`](hmm::mm::Mm::pin_user_pages) with the same flags.
//! GUP-fast is the same walk in the model, so the `_fast` cases pin the same way. Beyond
//! the C, each case checks that the pinned page is the page the process maps.

mod common;

use common::{Machine, RW};
use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use hmm::mm::{GupFlags, MapFlags, MemFile, Prot};

/// `enum test_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TestType {
    Ro,
    RoFast,
    Rw,
    RwFast,
}

/// `do_test(fd, size, type, shared)` on a memfd (shmem, the kernel's `TMPFS_MAGIC`) or a
/// hugetlb memfd (`HUGETLBFS_MAGIC`), both of which support writable long-term pinning,
/// so every case is expected to work.
fn do_test(size: u64, ty: TestType, shared: bool) {
    let m = Machine::new(16);
    let file = if size == PMD_SIZE {
        // The file's page and a private mapping's copy.
        assert_eq!(m.phys.set_nr_hugepages(2), 2);
        MemFile::new_hugetlb(&m.phys)
    } else {
        MemFile::new(&m.phys)
    };
    // ftruncate, then fallocate: every page of the file in the page cache.
    file.truncate(size).unwrap();
    file.fallocate(0, size).unwrap();
    let flags = if shared {
        MapFlags::SHARED
    } else {
        MapFlags::PRIVATE
    };
    let mem = m.mm.mmap_file(None, size, RW, flags, &file, 0).unwrap();
    // Fault the pages in, as the C's memset does.
    m.mm.write(mem, &vec![0u8; size as usize]).unwrap();
    let rw = matches!(ty, TestType::Rw | TestType::RwFast);
    if !rw {
        // More unsharing decisions are covered with the page mapped read-only.
        m.mm.mprotect(mem, size, Prot::READ).unwrap();
    }
    let mut gup = GupFlags::LONGTERM;
    if rw {
        gup |= GupFlags::WRITE;
    }
    let npages = size / PAGE_SIZE;
    let pin =
        m.mm.pin_user_pages(mem, npages, gup)
            .unwrap_or_else(|e| panic!("{ty:?} shared={shared}: should have worked: {e}"));
    let mapped = m.mm.pagemap(mem, npages).unwrap();
    for (i, e) in mapped.iter().enumerate() {
        assert_eq!(
            e.pfn,
            Some(pin.pfns()[i].as_u64()),
            "the pin holds what the process maps"
        );
    }
    if shared {
        assert!(
            mapped.iter().all(|e| e.file),
            "a shared pin holds the page-cache page"
        );
    }
    drop(pin);
    m.mm.audit().unwrap();
}

/// `run_with_memfd`: one page of a memfd; and `run_with_memfd_hugetlb` with the model's
/// one hugetlb size, 2 MiB.
fn run_with_memfd(ty: TestType, shared: bool) {
    do_test(PAGE_SIZE, ty, shared);
    do_test(PMD_SIZE, ty, shared);
}

#[test]
fn rw_longterm_gup_pin_in_map_shared_file_mapping() {
    run_with_memfd(TestType::Rw, true);
}

#[test]
fn rw_longterm_gup_fast_pin_in_map_shared_file_mapping() {
    run_with_memfd(TestType::RwFast, true);
}

#[test]
fn ro_longterm_gup_pin_in_map_shared_file_mapping() {
    run_with_memfd(TestType::Ro, true);
}

#[test]
fn ro_longterm_gup_fast_pin_in_map_shared_file_mapping() {
    run_with_memfd(TestType::RoFast, true);
}

#[test]
fn rw_longterm_gup_pin_in_map_private_file_mapping() {
    run_with_memfd(TestType::Rw, false);
}

#[test]
fn rw_longterm_gup_fast_pin_in_map_private_file_mapping() {
    run_with_memfd(TestType::RwFast, false);
}

#[test]
fn ro_longterm_gup_pin_in_map_private_file_mapping() {
    run_with_memfd(TestType::Ro, false);
}

#[test]
fn ro_longterm_gup_fast_pin_in_map_private_file_mapping() {
    run_with_memfd(TestType::RoFast, false);
}
