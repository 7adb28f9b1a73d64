//! The kernel's `tools/testing/selftests/mm/split_huge_page_test.c`, ported: the cases on
//! anonymous memory the model can express, through [`Mm::split_huge_pages`] (the
//! `/sys/kernel/debug/split_huge_pages` interface). `is_backed_by_folio` (pagemap and
//! `/proc/kpageflags`) is the order of the folio a page's frame belongs to;
//! `check_huge_anon` counts PMD mappings. `docs/mm-selftests.md` lists what is not
//! expressible and why.
//!
//! [`Mm::split_huge_pages`]: hmm::mm::Mm::split_huge_pages

mod common;

use common::{page, Machine, RW};
use hmm::addr::{Pfn, VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, MmError, MremapFlags, ThpMode};

/// `is_backed_by_folio`: the page at `va` is mapped and its folio has `order`.
fn backed_by_folio(m: &Machine, va: VirtAddr, order: u32) -> bool {
    let e = m.mm.pagemap(va, 1).unwrap()[0];
    e.present
        && e.pfn
            .is_some_and(|p| m.phys.frame(Pfn::new(p)).folio().meta().order() == order)
}

/// `check_huge_anon`: the range holds exactly `nr` PMD mappings.
fn check_huge_anon(mm: &Mm, p: VirtAddr, len: u64, nr: u64) -> bool {
    let huge = (0..len / PMD_SIZE)
        .filter(|k| mm.pagemap(p + k * PMD_SIZE, 1).unwrap()[0].order == 9)
        .count() as u64;
    huge == nr
}

/// Byte `i` of the area holds `(char)i`.
fn fill(mm: &Mm, p: VirtAddr, len: u64) {
    let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
    mm.write(p, &bytes).unwrap();
}

fn corrupted(mm: &Mm, p: VirtAddr, len: u64) -> Option<u64> {
    let mut b = vec![0u8; len as usize];
    mm.read(p, &mut b).unwrap();
    (0..len).find(|&i| b[i as usize] != i as u8)
}

fn machine() -> Machine {
    let m = Machine::new(64);
    m.mm.set_thp_mode(ThpMode::Madvise);
    m
}

/// `len` bytes of private memory, 2 MiB aligned, with `MADV_HUGEPAGE` (the C's mmap of
/// one more PMD, aligned up, and madvise); their start.
fn hugepage_area(m: &Machine, len: u64) -> VirtAddr {
    let raw =
        m.mm.mmap(None, len + PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let p = raw.align_up(PMD_SIZE).unwrap();
    m.mm.madvise(p, len, Advice::HugePage).unwrap();
    p
}

/// `split_pmd_thp_to_order`'s set-up: four PMD-mapped THPs, filled; their start.
fn four_thps(m: &Machine) -> VirtAddr {
    let len = 4 * PMD_SIZE;
    let p = hugepage_area(m, len);
    fill(&m.mm, p, len);
    assert!(check_huge_anon(&m.mm, p, len, 4), "no THP is allocated");
    p
}

/// `split_pmd_thp_to_order(0)`: four PMD-mapped THPs split to order 0 through the
/// interface; every byte kept, every page an order-0 folio, no THP left.
#[test]
fn split_pmd_thp_to_order_0() {
    let m = machine();
    let len = 4 * PMD_SIZE;
    let p = four_thps(&m);
    assert_eq!(m.mm.split_huge_pages(p, p + len, 0), Ok(4));
    assert_eq!(corrupted(&m.mm, p, len), None, "byte corrupted");
    // check_after_split_folio_orders: 4 << 9 folios of order 0.
    let order0 = (0..4 * PMD_NR)
        .filter(|&i| backed_by_folio(&m, page(p, i), 0))
        .count() as u64;
    assert_eq!(order0, 4 * PMD_NR, "unexpected THP split");
    assert!(
        check_huge_anon(&m.mm, p, len, 0),
        "still AnonHugePages not split"
    );
    m.mm.audit().unwrap();
}

/// `split_pmd_thp_to_order(order)` for orders 2 to 8 (the C skips 1: no order-1
/// anonymous folio): four THPs split into `4 << (9 - order)` folios of that order, every
/// byte kept, no THP left.
#[test]
fn split_pmd_thp_to_orders_2_to_8() {
    for order in 2..9u32 {
        let m = machine();
        let len = 4 * PMD_SIZE;
        let p = four_thps(&m);
        assert_eq!(m.mm.split_huge_pages(p, p + len, order), Ok(4));
        assert_eq!(
            corrupted(&m.mm, p, len),
            None,
            "order {order}: byte corrupted"
        );
        // check_after_split_folio_orders: every folio has the new order and starts where
        // it should.
        let folios = (0..4 * PMD_NR)
            .step_by(1 << order)
            .filter(|&i| {
                backed_by_folio(&m, page(p, i), order)
                    && (0..1u64 << order).all(|k| {
                        let head = m.mm.pagemap(page(p, i), 1).unwrap()[0].pfn.unwrap();
                        m.mm.pagemap(page(p, i + k), 1).unwrap()[0].pfn == Some(head + k)
                    })
            })
            .count() as u64;
        assert_eq!(
            folios,
            4 << (9 - order),
            "order {order}: unexpected THP split"
        );
        assert!(
            check_huge_anon(&m.mm, p, len, 0),
            "still AnonHugePages not split"
        );
        // The new folios work as any: split them further, write, fork.
        assert_eq!(
            m.mm.split_huge_pages(p, p + PMD_SIZE, 0),
            Ok(PMD_NR >> order)
        );
        let child = m.mm.fork().unwrap();
        m.mm.write(p + PMD_SIZE, b"parent").unwrap();
        assert_eq!(corrupted(&child, p, len), None);
        m.mm.audit().unwrap();
        child.audit().unwrap();
    }
}

/// `split_pmd_zero_pages`: four THPs of zeros split to pages through the interface; the
/// pages of zeros are mapped by the shared zero page afterwards (Linux 6.12's
/// `RMP_USE_SHARED_ZEROPAGE`), so the anonymous RSS drops: here, every frame goes back.
#[test]
fn split_pmd_zero_pages() {
    let m = machine();
    let nr_hpages = 4;
    let len = nr_hpages * PMD_SIZE;
    // allocate_zero_filled_hugepage: aligned, MADV_HUGEPAGE, memset(0).
    let p = hugepage_area(&m, len);
    m.mm.write(p, &vec![0u8; len as usize]).unwrap();
    assert!(check_huge_anon(&m.mm, p, len, nr_hpages));
    let rss_anon_before = m.phys.nr_in_use();
    assert_eq!(rss_anon_before, nr_hpages * PMD_NR);
    assert_eq!(m.mm.split_huge_pages(p, p + len, 0), Ok(nr_hpages));
    let mut b = vec![1u8; len as usize];
    m.mm.read(p, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "byte corrupted");
    assert!(
        check_huge_anon(&m.mm, p, PMD_SIZE, 0),
        "still AnonHugePages not split"
    );
    let rss_anon_after = m.phys.nr_in_use();
    assert!(
        rss_anon_after < rss_anon_before,
        "Incorrect RSS anon value. Before: {rss_anon_before} After: {rss_anon_after}"
    );
    assert_eq!(rss_anon_after, 0);
    assert!(m
        .mm
        .pagemap(p, len / PAGE_SIZE)
        .unwrap()
        .iter()
        .all(|e| e.pfn.is_some_and(|f| m.phys.is_zero_pfn(Pfn::new(f)))));
    // A write after the split takes a fresh page, as on any zero-page mapping.
    m.mm.write_val(p + PAGE_SIZE, 7u8).unwrap();
    assert_eq!(m.phys.nr_in_use(), 1);
    m.mm.audit().unwrap();
}

/// A split to pages keeps the pages that hold data, maps those of zeros by the zero page
/// with their soft-dirty bit, and does neither for a split to a larger order.
#[test]
fn a_split_maps_only_pages_of_zeros_to_the_zero_page() {
    let m = machine();
    let p = hugepage_area(&m, PMD_SIZE);
    m.mm.write_val(page(p, 5), 5u8).unwrap();
    assert!(check_huge_anon(&m.mm, p, PMD_SIZE, 1));
    // A split to order 2 keeps every page in a folio.
    assert_eq!(m.mm.split_huge_pages(p, p + PMD_SIZE, 2), Ok(1));
    assert_eq!(m.phys.nr_in_use(), PMD_NR);
    // To pages: only the page with data stays.
    assert_eq!(m.mm.split_huge_pages(p, p + PMD_SIZE, 0), Ok(PMD_NR / 4));
    assert_eq!(m.phys.nr_in_use(), 1);
    let map = m.mm.pagemap(p, PMD_NR).unwrap();
    for (i, e) in map.iter().enumerate() {
        let zero = e.pfn.is_some_and(|f| m.phys.is_zero_pfn(Pfn::new(f)));
        assert_eq!(zero, i != 5, "page {i}");
        assert!(e.soft_dirty, "page {i} keeps its soft-dirty bit");
    }
    assert_eq!(m.mm.read_val::<u8>(page(p, 5)).unwrap(), 5);
    m.mm.audit().unwrap();
}

/// The interface refuses a new order of 9 or more and an unaligned range, and leaves an
/// anonymous THP whole when asked for order 1 (the kernel's split refuses it).
#[test]
fn split_to_order_1_or_9_is_refused() {
    let m = machine();
    let p = hugepage_area(&m, PMD_SIZE);
    fill(&m.mm, p, PMD_SIZE);
    assert_eq!(m.mm.split_huge_pages(p, p + PMD_SIZE, 1), Ok(0));
    assert!(check_huge_anon(&m.mm, p, PMD_SIZE, 1));
    for order in [9, 10, u32::MAX] {
        assert!(matches!(
            m.mm.split_huge_pages(p, p + PMD_SIZE, order),
            Err(MmError::Inval { .. })
        ));
    }
    assert!(matches!(
        m.mm.split_huge_pages(p + 1, p + PMD_SIZE, 0),
        Err(MmError::Inval { .. })
    ));
    m.mm.audit().unwrap();
}

/// `split_pte_mapped_thp`: one page of each of four THPs is moved by `mremap` into a
/// page area (the THPs become PTE-mapped, still whole), and the THPs are split through
/// those pages alone.
#[test]
fn split_pte_mapped_thp() {
    let m = machine();
    let nr_thps = 4;
    let thp_area_size = nr_thps * PMD_SIZE;
    let page_area_size = nr_thps * PAGE_SIZE;
    let thp_area =
        m.mm.mmap(
            Some(VirtAddr::new(1 << 30)),
            thp_area_size,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
        )
        .unwrap();
    m.mm.madvise(thp_area, thp_area_size, Advice::HugePage)
        .unwrap();
    fill(&m.mm, thp_area, thp_area_size);
    assert!(
        check_huge_anon(&m.mm, thp_area, thp_area_size, nr_thps),
        "not all THPs allocated"
    );
    let page_area =
        m.mm.mmap(None, page_area_size, RW, MapFlags::PRIVATE)
            .unwrap();
    let fixed = MremapFlags::MAYMOVE | MremapFlags::FIXED;
    for i in 0..nr_thps {
        let from = thp_area + PMD_SIZE * i + PAGE_SIZE * i;
        let to = page_area + PAGE_SIZE * i;
        assert_eq!(
            m.mm.mremap(from, PAGE_SIZE, PAGE_SIZE, fixed, Some(to)),
            Ok(to)
        );
    }
    for i in 0..nr_thps {
        assert!(
            backed_by_folio(&m, page(page_area, i), 9),
            "THP {i} missing after mremap"
        );
    }
    // Split all THPs through the remapped pages.
    assert_eq!(
        m.mm.split_huge_pages(page_area, page_area + page_area_size, 0),
        Ok(nr_thps)
    );
    assert_eq!(
        corrupted(&m.mm, page_area, page_area_size),
        None,
        "byte corrupted"
    );
    for i in 0..nr_thps {
        assert!(
            backed_by_folio(&m, page(page_area, i), 0),
            "THP {i} not split"
        );
    }
    m.mm.audit().unwrap();
}
