//! The kernel's `tools/testing/selftests/mm/gup_longterm.c`, ported: a long-term pin
//! (`FOLL_PIN | FOLL_LONGTERM`), read-only or read-write, of a file page mapped shared or
//! private. Every case of the file, in its order, on a memfd and a hugetlb memfd of each
//! hugetlb size of [`common::hugetlb_sizes`] (2 MiB, and 1 GiB with `HMM_HUGETLB_1G` set,
//! as CI runs them in a release build); the table in `docs/mm-selftests.md` says which of
//! the file's memory kinds are expressible.
//!
//! In the kernel the pin goes through the `gup_test` module (`PIN_LONGTERM_TEST_START`);
//! here it is [`Mm::pin_user_pages`](hmm::mm::Mm::pin_user_pages) with the same flags.
//! GUP-fast is the same walk in the model, so the `_fast` cases pin the same way. Beyond
//! the C, each case checks that the pinned page is the page the process maps.

mod common;

use common::{hugetlb_machine, hugetlb_sizes, Machine, RW};
use hmm::addr::PAGE_SIZE;
use hmm::mm::{GupFlags, MapFlags, MemFile, Prot};
use hmm::phys::HugetlbSize;

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
fn do_test(hugetlb: Option<HugetlbSize>, ty: TestType, shared: bool) {
    let (m, file, size) = match hugetlb {
        // The file's page and a private mapping's copy.
        Some(s) => {
            let m = hugetlb_machine(s, 2);
            let f = MemFile::new_hugetlb_of(&m.phys, s);
            (m, f, s.bytes())
        }
        None => {
            let m = Machine::new(16);
            let f = MemFile::new(&m.phys);
            (m, f, PAGE_SIZE)
        }
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
    // Fault the pages in, as the C's memset does (2 MiB at a time).
    let zeros = vec![0u8; size.min(2 << 20) as usize];
    for off in (0..size).step_by(zeros.len()) {
        m.mm.write(mem + off, &zeros).unwrap();
    }
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

/// `run_with_memfd`: one page of a memfd; and `run_with_memfd_hugetlb` at each hugetlb
/// size.
fn run_with_memfd(ty: TestType, shared: bool) {
    do_test(None, ty, shared);
    for size in hugetlb_sizes() {
        do_test(Some(size), ty, shared);
    }
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
