//! The kernel's `tools/testing/selftests/mm/mremap_dontunmap.c`, ported: `mremap` with
//! `MREMAP_DONTUNMAP` moves the page tables and leaves the source mapped, empty (or, for
//! shared memory, still showing the shared pages). One test per case, in the file's order,
//! with its byte checks (`check_region_contains_byte`).

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, MemFile, MremapFlags};

/// `check_region_contains_byte`: every byte of `pages` pages at `a` is `byte`.
fn contains(m: &Machine, a: VirtAddr, pages: u64, byte: u8) -> bool {
    let mut b = vec![0u8; (pages * PAGE_SIZE) as usize];
    m.mm.read(a, &mut b).unwrap();
    b.iter().all(|&x| x == byte)
}

fn fill(m: &Machine, a: VirtAddr, pages: u64, byte: u8) {
    m.mm.write(a, &vec![byte; (pages * PAGE_SIZE) as usize])
        .unwrap();
}

const DONTUNMAP: MremapFlags = MremapFlags::DONTUNMAP.union(MremapFlags::MAYMOVE);

/// `kernel_support_for_mremap_dontunmap`: a one-page remap of a PROT_NONE mapping.
#[test]
fn kernel_support_for_mremap_dontunmap() {
    let m = Machine::new(16);
    let src = m.map(1, hmm::mm::Prot::NONE, MapFlags::PRIVATE);
    let dst =
        m.mm.mremap(src, PAGE_SIZE, PAGE_SIZE, DONTUNMAP, None)
            .unwrap();
    m.mm.munmap(dst, PAGE_SIZE).unwrap();
    m.mm.munmap(src, PAGE_SIZE).unwrap();
}

#[test]
fn mremap_dontunmap_simple() {
    let m = Machine::new(16);
    let n = 5;
    let src = m.map(n, RW, MapFlags::PRIVATE);
    fill(&m, src, n, b'a');
    let dst =
        m.mm.mremap(src, n * PAGE_SIZE, n * PAGE_SIZE, DONTUNMAP, None)
            .unwrap();
    assert!(contains(&m, dst, n, b'a'), "pages did not migrate");
    assert!(contains(&m, src, n, 0), "source should have no ptes");
    m.mm.audit().unwrap();
    m.mm.munmap(dst, n * PAGE_SIZE).unwrap();
    m.mm.munmap(src, n * PAGE_SIZE).unwrap();
}

#[test]
fn mremap_dontunmap_simple_shmem() {
    let m = Machine::new(16);
    let n = 5;
    let f = MemFile::new(&m.phys);
    f.truncate(n * PAGE_SIZE).unwrap();
    let src =
        m.mm.mmap_file(None, n * PAGE_SIZE, RW, MapFlags::SHARED, &f, 0)
            .unwrap();
    drop(f);
    fill(&m, src, n, b'a');
    let dst =
        m.mm.mremap(src, n * PAGE_SIZE, n * PAGE_SIZE, DONTUNMAP, None)
            .unwrap();
    assert!(contains(&m, dst, n, b'a'), "pages did not migrate");
    // Shared memory: the source still shows the same pages.
    assert!(
        contains(&m, src, n, b'a'),
        "the source shows the shared pages"
    );
    m.mm.audit().unwrap();
    m.mm.munmap(dst, n * PAGE_SIZE).unwrap();
    m.mm.munmap(src, n * PAGE_SIZE).unwrap();
}

#[test]
fn mremap_dontunmap_simple_fixed() {
    let m = Machine::new(16);
    let n = 5;
    let dst = m.map(n, RW, MapFlags::PRIVATE);
    fill(&m, dst, n, b'X');
    let src = m.map(n, RW, MapFlags::PRIVATE);
    fill(&m, src, n, b'a');
    let flags = DONTUNMAP | MremapFlags::FIXED;
    let r =
        m.mm.mremap(src, n * PAGE_SIZE, n * PAGE_SIZE, flags, Some(dst))
            .unwrap();
    assert_eq!(r, dst, "placed at dest_mapping");
    assert!(contains(&m, dst, n, b'a'), "pages did not migrate");
    assert!(contains(&m, src, n, 0), "source should have no ptes");
    m.mm.audit().unwrap();
}

#[test]
fn mremap_dontunmap_partial_mapping() {
    let m = Machine::new(16);
    let src = m.map(10, RW, MapFlags::PRIVATE);
    fill(&m, src, 10, b'a');
    let dst =
        m.mm.mremap(page(src, 5), 5 * PAGE_SIZE, 5 * PAGE_SIZE, DONTUNMAP, None)
            .unwrap();
    assert!(
        contains(&m, src, 5, b'a'),
        "first 5 pages of source keep their pages"
    );
    assert!(
        contains(&m, page(src, 5), 5, 0),
        "final 5 pages of source have no ptes"
    );
    assert!(contains(&m, dst, 5, b'a'), "dest holds the source's ptes");
    m.mm.audit().unwrap();
}

#[test]
fn mremap_dontunmap_partial_mapping_overwrite() {
    let m = Machine::new(16);
    let src = m.map(5, RW, MapFlags::PRIVATE);
    fill(&m, src, 5, b'a');
    let dst = m.map(10, RW, MapFlags::PRIVATE);
    fill(&m, dst, 10, b'X');
    let flags = DONTUNMAP | MremapFlags::FIXED;
    let r =
        m.mm.mremap(src, 5 * PAGE_SIZE, 5 * PAGE_SIZE, flags, Some(dst))
            .unwrap();
    assert_eq!(r, dst);
    assert!(contains(&m, src, 5, 0), "source has no ptes");
    assert!(contains(&m, dst, 5, b'a'), "dest holds the source's ptes");
    assert!(
        contains(&m, page(dst, 5), 5, b'X'),
        "the rest of dest is untouched"
    );
    m.mm.audit().unwrap();
}
