//! `get_user_pages` / `pin_user_pages`: fault-in, references and pins, COW breaking,
//! unsharing for read-only pins (anonymous pages, and for long-term pins the zero pages,
//! page-cache pages and private hugetlb pages), release, and bad input.

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, GupFlags, MapFlags, MemFile, MmError, Prot};

#[test]
fn gup_faults_pages_in_and_holds_references() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let pages = m.mm.get_user_pages(a, 4, GupFlags::WRITE).unwrap();
    assert_eq!(pages.len(), 4);
    assert!(!pages.is_pinned());
    assert_eq!(m.mm.stats().faults.anon_write, 4);
    for (i, pfn) in pages.pfns().iter().enumerate() {
        let f = m.phys.frame(*pfn);
        assert_eq!(
            (f.meta().refcount(), f.meta().pincount()),
            (2, 0),
            "page {i}"
        );
    }
    // Device-style writes through the held pages are what the process reads.
    pages.write(2, 8, &42u64.to_le_bytes());
    assert_eq!(
        m.mm.read_val::<u64>(page(a, 2).checked_add(8).unwrap())
            .unwrap(),
        42
    );
    // The audit sees references it cannot account for while they are held.
    assert!(m.mm.audit().is_err());
    drop(pages);
    m.mm.audit().unwrap();
    // After munmap the references keep the frames alive until released.
    let pages = m.mm.get_user_pages(a, 4, GupFlags::empty()).unwrap();
    m.mm.munmap(a, 4 * PAGE_SIZE).unwrap();
    assert_eq!(m.phys.nr_in_use(), 4);
    let mut b = [0u8; 8];
    pages.read(2, 8, &mut b);
    assert_eq!(u64::from_le_bytes(b), 42);
    pages.release();
    assert_eq!(m.phys.nr_in_use(), 0);
}

#[test]
fn pins_count_and_write_pins_break_cow() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 1u64).unwrap();
    let child = m.mm.fork().unwrap();
    let shared = m.mm.pagemap(a, 1).unwrap()[0].pfn;
    let pin =
        m.mm.pin_user_pages(a, 1, GupFlags::WRITE | GupFlags::LONGTERM)
            .unwrap();
    assert!(pin.is_pinned());
    assert_ne!(
        Some(pin.pfns()[0].as_u64()),
        shared,
        "COW broken before pinning"
    );
    assert_eq!(m.phys.frame(pin.pfns()[0]).meta().pincount(), 1);
    m.mm.audit().unwrap();
    pin.write(0, 0, &2u64.to_le_bytes());
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 2);
    assert_eq!(child.read_val::<u64>(a).unwrap(), 1);
    // A read pin of the zero page is allowed and needs no fault afterwards.
    let z =
        m.mm.pin_user_pages(page(a, 1), 1, GupFlags::empty())
            .unwrap();
    assert_eq!(z.pfns()[0], m.phys.zero_pfn());
    drop((pin, z));
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn read_pin_of_a_shared_anonymous_page_unshares_it() {
    let m = Machine::new(16);
    let a = m.map(1, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 10u64).unwrap();
    let child = m.mm.fork().unwrap();
    m.events();
    let pin = m.mm.pin_user_pages(a, 1, GupFlags::empty()).unwrap();
    assert_eq!(m.mm.stats().faults.cow, 1, "unshare copies");
    assert_eq!(m.events().len(), 1, "one CLEAR for the replaced page");
    let e = m.mm.pagemap(a, 1).unwrap()[0];
    assert!(e.exclusive);
    assert_eq!(e.pfn, Some(pin.pfns()[0].as_u64()));
    // The unshared page is still read-only; a write reuses it, so the pin stays coherent.
    m.mm.write_val(a, 11u64).unwrap();
    let s = m.mm.stats();
    assert_eq!((s.faults.cow, s.faults.wp_reuse), (1, 1));
    let mut b = [0u8; 8];
    pin.read(0, 0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 11);
    assert_eq!(child.read_val::<u64>(a).unwrap(), 10);
    drop(pin);
    m.mm.audit().unwrap();
}

#[test]
fn gup_bad_input_is_a_typed_error_and_holds_nothing() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    let ro = m.map(1, Prot::READ, MapFlags::PRIVATE);
    let cases: [(VirtAddr, u64, GupFlags); 5] = [
        (a.checked_add(1).unwrap(), 1, GupFlags::empty()),
        (a, 0, GupFlags::empty()),
        (a, 1, GupFlags::LONGTERM),
        (a, u64::MAX / 2, GupFlags::empty()),
        (
            VirtAddr::new(hmm::addr::USER_VA_END - PAGE_SIZE),
            2,
            GupFlags::empty(),
        ),
    ];
    for (start, n, f) in cases {
        let err = m.mm.get_user_pages(start, n, f).unwrap_err();
        assert!(
            matches!(err, MmError::Inval { .. }),
            "{start} {n} {f:?}: {err}"
        );
    }
    // Past the end of the mapping: EFAULT, and the pages faulted before are released.
    let err = m.mm.get_user_pages(a, 3, GupFlags::WRITE).unwrap_err();
    assert_eq!(err, MmError::Fault { addr: page(a, 2) });
    assert_eq!(err.errno(), libc::EFAULT);
    let err = m.mm.pin_user_pages(ro, 1, GupFlags::WRITE).unwrap_err();
    assert!(matches!(err, MmError::Fault { .. }));
    m.mm.audit().unwrap();
    for pfn in m.mm.pagemap(a, 2).unwrap().iter().filter_map(|e| e.pfn) {
        let f = m.phys.frame(hmm::addr::Pfn::new(pfn));
        assert_eq!(f.meta().refcount(), 1);
    }
}

/// Writes `v` through the CPU at `a` and checks that the pin `pin` (of page 0 there) sees
/// it: the process kept the pinned page.
fn write_reaches_the_pin(m: &Machine, pin: &hmm::mm::UserPages, i: usize, a: VirtAddr, v: u64) {
    m.mm.write_val(a, v).unwrap();
    let mut b = [0u8; 8];
    pin.read(i, 0, &mut b);
    assert_eq!(u64::from_le_bytes(b), v, "the pin sees the process's write");
    assert_eq!(
        m.mm.pagemap(a, 1).unwrap()[0].pfn,
        Some(pin.pfns()[i].as_u64()),
        "the process maps the pinned page"
    );
}

#[test]
fn a_long_term_read_pin_of_the_zero_page_pins_an_exclusive_copy() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0);
    assert_eq!(
        m.mm.pagemap(a, 1).unwrap()[0].pfn,
        Some(m.phys.zero_pfn().as_u64())
    );
    let pin = m.mm.pin_user_pages(a, 1, GupFlags::LONGTERM).unwrap();
    assert_ne!(pin.pfns()[0], m.phys.zero_pfn(), "unshared before the pin");
    assert_eq!(m.mm.stats().faults.cow, 1);
    // The copy is mapped read-only, so the write faults, reuses it, and copies nothing.
    write_reaches_the_pin(&m, &pin, 0, a, 5);
    assert_eq!(m.mm.stats().faults.cow, 1);
    // A short-term read pin of the zero page pins it as it is.
    let z =
        m.mm.pin_user_pages(page(a, 1), 1, GupFlags::empty())
            .unwrap();
    assert_eq!(z.pfns()[0], m.phys.zero_pfn());
    drop((pin, z));
    m.mm.audit().unwrap();
}

#[test]
fn a_long_term_read_pin_of_the_huge_zero_page_splits_and_unshares() {
    let m = Machine::new(16);
    let a = m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE).unwrap();
    m.mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0);
    let e = m.mm.pagemap(a, 1).unwrap()[0];
    assert_eq!(e.order, 9, "the huge zero page");
    let p3 = page(a, 3);
    let pin = m.mm.pin_user_pages(p3, 1, GupFlags::LONGTERM).unwrap();
    assert!(!m.phys.is_huge_zero_pfn(pin.pfns()[0]) && pin.pfns()[0] != m.phys.zero_pfn());
    let entries = m.mm.pagemap(a, 512).unwrap();
    assert!(entries.iter().all(|e| e.order == 0), "the PMD was split");
    assert_eq!(
        entries[0].pfn,
        Some(m.phys.zero_pfn().as_u64()),
        "the rest is zero pages"
    );
    write_reaches_the_pin(&m, &pin, 0, p3, 9);
    assert_eq!(m.mm.read_val::<u64>(page(a, 4)).unwrap(), 0);
    drop(pin);
    m.mm.audit().unwrap();
}

#[test]
fn a_long_term_read_pin_in_a_private_file_mapping_pins_a_private_copy() {
    let m = Machine::new(16);
    let f = MemFile::new(&m.phys);
    f.pwrite(0, &7u64.to_le_bytes()).unwrap();
    f.truncate(PAGE_SIZE).unwrap();
    let a =
        m.mm.mmap_file(None, PAGE_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 7);
    let cached = m.mm.pagemap(a, 1).unwrap()[0];
    assert!(cached.file);
    let pin = m.mm.pin_user_pages(a, 1, GupFlags::LONGTERM).unwrap();
    assert_ne!(
        Some(pin.pfns()[0].as_u64()),
        cached.pfn,
        "a private copy is pinned"
    );
    let mut b = [0u8; 8];
    pin.read(0, 0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 7, "with the file's bytes");
    write_reaches_the_pin(&m, &pin, 0, a, 8);
    f.pread(0, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 7, "the file is unchanged");
    // A short-term read pin of a page-cache page pins it as it is.
    let b2 =
        m.mm.mmap_file(None, PAGE_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    m.mm.read_val::<u64>(b2).unwrap();
    let short = m.mm.pin_user_pages(b2, 1, GupFlags::empty()).unwrap();
    assert_eq!(Some(short.pfns()[0].as_u64()), cached.pfn);
    drop((pin, short));
    m.mm.audit().unwrap();
}

#[test]
fn a_read_pin_of_a_shared_private_hugetlb_page_unshares_it() {
    let m = Machine::new(16);
    assert_eq!(m.phys.set_nr_hugepages(2), 2);
    let a =
        m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB)
            .unwrap();
    m.mm.write_val(a, 1u64).unwrap();
    let child = m.mm.fork().unwrap();
    let shared = m.mm.pagemap(a, 1).unwrap()[0].pfn;
    let pin = m.mm.pin_user_pages(a, 1, GupFlags::LONGTERM).unwrap();
    assert_ne!(
        Some(pin.pfns()[0].as_u64()),
        shared,
        "the parent's copy is pinned"
    );
    // The parent's write reuses the pinned copy; the child keeps the original.
    let cows = m.mm.stats().faults.cow;
    write_reaches_the_pin(&m, &pin, 0, a, 2);
    assert_eq!(m.mm.stats().faults.cow, cows, "no copy away from the pin");
    assert_eq!(child.read_val::<u64>(a).unwrap(), 1);
    drop(pin);
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

/// Anon-exclusivity is per page (`PageAnonExclusive`): sharing one page of a PTE-mapped
/// THP with a child leaves the other 511 exclusive, so a long-term pin of one of them stays
/// the page the process writes through `mprotect` and a second fork, which must copy the
/// pinned page for its child at once.
#[test]
fn sharing_one_page_of_a_thp_leaves_the_others_exclusive() {
    let m = Machine::new(32);
    let a = m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE).unwrap();
    m.mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
    m.mm.write(a, &vec![3u8; PMD_SIZE as usize]).unwrap();
    assert_eq!(m.mm.pagemap(a, 1).unwrap()[0].order, 9, "a THP");
    // Only page 0 goes to the child: the PMD is split, the folio stays whole.
    m.mm.madvise(page(a, 1), PMD_SIZE - PAGE_SIZE, Advice::DontFork)
        .unwrap();
    let child = m.mm.fork().unwrap();
    let e = m.mm.pagemap(a, 512).unwrap();
    assert!(e.iter().all(|e| e.order == 0));
    assert!(
        !e[0].exclusive && e[5].exclusive,
        "page 0 shared, page 5 not"
    );

    let p5 = page(a, 5);
    let pin =
        m.mm.pin_user_pages(p5, 1, GupFlags::WRITE | GupFlags::LONGTERM)
            .unwrap();
    assert_eq!(Some(pin.pfns()[0].as_u64()), e[5].pfn, "pinned in place");
    // mprotect may make the exclusive page writable again: the write reuses it.
    m.mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    m.mm.mprotect(a, PMD_SIZE, RW).unwrap();
    let cows = m.mm.stats().faults.cow;
    write_reaches_the_pin(&m, &pin, 0, p5, 55);
    assert_eq!(m.mm.stats().faults.cow, cows, "no copy away from the pin");

    // A fork that takes page 5 must copy it for the child now (it is pinned).
    m.mm.madvise(page(a, 1), PMD_SIZE - PAGE_SIZE, Advice::DoFork)
        .unwrap();
    let second = m.mm.fork().unwrap();
    let theirs = second.pagemap(p5, 1).unwrap()[0].pfn;
    assert_ne!(theirs, Some(pin.pfns()[0].as_u64()), "the child got a copy");
    write_reaches_the_pin(&m, &pin, 0, p5, 56);
    assert_eq!(second.read_val::<u64>(p5).unwrap(), 55);
    // The child's page 0 is still the parent's shared one; page 6 was never its.
    assert_eq!(child.read_val::<u8>(a).unwrap(), 3);
    drop(pin);
    for mm in [&m.mm, &child, &second] {
        mm.audit().unwrap();
    }
}
