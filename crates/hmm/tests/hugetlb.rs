//! hugetlb: the pool, reservations at mmap, faults, COW after fork, pinned pages at fork,
//! shared hugetlb memory, racing first faults, alignment rules, and pages returning to the
//! pool. The fork, pin, sharing and racing cases run at both page sizes; `hugetlb_1g.rs`
//! has what is particular to 1 GiB pages.

mod common;

use common::{hugetlb_machine, map_hugetlb, page, Machine, RW};
use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, FaultError, GupFlags, MapFlags, MmError, MremapFlags, Prot};
use hmm::notifier::NotifierEvent;
use hmm::phys::{HugetlbSize, HugetlbStats};

const NR: u64 = PMD_SIZE / PAGE_SIZE;

/// A hugetlb mapping of `pmds` 2 MiB pages.
fn huge(m: &Machine, pmds: u64, shared: bool) -> hmm::addr::VirtAddr {
    let kind = if shared {
        MapFlags::SHARED
    } else {
        MapFlags::PRIVATE
    };
    m.mm.mmap(None, pmds * PMD_SIZE, RW, kind | MapFlags::HUGETLB)
        .unwrap()
}

fn pool(total: u64, free: u64, reserved: u64) -> HugetlbStats {
    HugetlbStats {
        total,
        free,
        reserved,
    }
}

#[test]
fn pool_sizing_and_reservation_at_mmap() {
    let m = Machine::new(16);
    assert_eq!(m.phys.set_nr_hugepages(3), 3);
    assert_eq!(m.phys.hugetlb(), pool(3, 3, 0));
    assert_eq!(m.phys.nr_in_use(), 0, "free pool pages are not in use");
    let a = huge(&m, 2, false);
    assert!(a.is_aligned(PMD_SIZE));
    assert_eq!(m.phys.hugetlb(), pool(3, 3, 2));
    // Only one unreserved page is left: a 2-page mapping fails cleanly.
    let err =
        m.mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::SHARED | MapFlags::HUGETLB)
            .unwrap_err();
    assert!(matches!(err, MmError::NoMem { .. }));
    assert_eq!(m.mm.vmas().len(), 1);
    // A length is rounded up to 2 MiB.
    let b =
        m.mm.mmap(None, PAGE_SIZE, RW, MapFlags::SHARED | MapFlags::HUGETLB)
            .unwrap();
    assert_eq!(
        m.mm.vmas()
            .iter()
            .find(|v| v.start() == b)
            .unwrap()
            .range()
            .npages(),
        NR
    );
    assert_eq!(m.phys.hugetlb(), pool(3, 3, 3));
    // Reserved pages keep the pool from shrinking.
    assert_eq!(m.phys.set_nr_hugepages(0), 3);
    m.mm.munmap(b, PMD_SIZE).unwrap();
    m.mm.munmap(a, 2 * PMD_SIZE).unwrap();
    assert_eq!(m.phys.hugetlb(), pool(3, 3, 0));
    assert_eq!(m.phys.set_nr_hugepages(0), 0);
    // An empty pool fails every hugetlb mapping and leaves what was there.
    let c = m.map(NR, RW, MapFlags::PRIVATE);
    assert!(c.is_aligned(PMD_SIZE));
    m.mm.write_val(c, 1u8).unwrap();
    assert!(matches!(
        m.mm.mmap(
            Some(c),
            PMD_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::HUGETLB | MapFlags::FIXED
        ),
        Err(MmError::NoMem { .. })
    ));
    assert_eq!(m.mm.read_val::<u8>(c).unwrap(), 1);
    assert!(matches!(
        m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB),
        Err(MmError::NoMem { .. })
    ));
}

#[test]
fn faults_map_whole_zeroed_pages_and_free_them_back_to_the_pool() {
    let m = Machine::new(16);
    m.phys.set_nr_hugepages(2);
    let a = huge(&m, 2, false);
    assert_eq!(m.mm.read_val::<u64>(page(a, 7)).unwrap(), 0);
    m.mm.write_val(page(a, 8), 5u64).unwrap();
    m.mm.write_val(page(a, NR + 1), 6u64).unwrap();
    let s = m.mm.stats();
    assert_eq!(
        (s.faults.hugetlb, s.faults.wp_reuse),
        (2, 1),
        "read, then reuse on write"
    );
    assert_eq!(m.phys.hugetlb(), pool(2, 0, 0));
    assert_eq!(m.phys.nr_in_use(), 2 * NR);
    let pm = m.mm.pagemap(a, 2 * NR).unwrap();
    assert!(pm.iter().all(|e| e.present && e.order == 9 && e.exclusive));
    m.mm.audit().unwrap();
    m.mm.munmap(a, 2 * PMD_SIZE).unwrap();
    assert_eq!(m.phys.hugetlb(), pool(2, 2, 0));
    assert_eq!(m.phys.nr_in_use(), 0);
}

/// The pages a test writes and checks in a hugetlb page of `size`: every one of a 2 MiB
/// page; the first, last, middle and a few more of a 1 GiB page (a debug build writes
/// 262,144 pages slowly).
fn marks(size: HugetlbSize) -> Vec<u64> {
    let nr = size.nr_pages();
    if nr <= NR {
        (0..nr).collect()
    } else {
        vec![0, 1, 2, 9, nr / 2, nr - 2, nr - 1]
    }
}

#[test]
fn fork_shares_then_copies_the_whole_page_and_sigbus_when_the_pool_is_dry() {
    for size in HugetlbSize::ALL {
        let m = hugetlb_machine(size, 2);
        let a = map_hugetlb(&m, size, 1, false);
        let marks = marks(size);
        for &i in &marks {
            m.mm.write_val(page(a, i), i).unwrap();
        }
        let child = m.mm.fork().unwrap();
        m.events();
        child.write_val(page(a, 3), 33u64).unwrap();
        assert_eq!(child.stats().faults.cow, 1);
        assert!(
            m.events().is_empty(),
            "the child's CLEAR goes to the child's notifiers"
        );
        for &i in &marks {
            let want = if i == 3 { 33 } else { i };
            assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), want);
            assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), i);
        }
        assert_eq!(child.read_val::<u64>(page(a, 3)).unwrap(), 33);
        m.mm.audit().unwrap();
        child.audit().unwrap();
        // A second child shares the parent's page; the pool has no free page for its copy.
        let c2 = m.mm.fork().unwrap();
        assert_eq!(m.phys.hugetlb_of(size).free, 0);
        assert_eq!(c2.write_val(a, 1u8), Err(FaultError::Bus { addr: a }));
        drop(child);
        c2.write_val(a, 1u8).unwrap();
        assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0);
        let last = size.nr_pages() - 1;
        assert_eq!(m.mm.read_val::<u64>(page(a, last)).unwrap(), last);
        drop(c2);
        // The parent's write to its page, shared no more, reuses it.
        m.events();
        m.mm.write_val(a, 9u8).unwrap();
        assert!(m.events().is_empty(), "{size:?}: no copy");
        m.mm.audit().unwrap();
    }
}

#[test]
fn pinned_hugetlb_page_is_copied_at_fork() {
    for size in HugetlbSize::ALL {
        let m = hugetlb_machine(size, 2);
        let a = map_hugetlb(&m, size, 1, false);
        m.mm.write_val(page(a, 9), 9u64).unwrap();
        let pin = m.mm.pin_user_pages(page(a, 9), 1, GupFlags::WRITE).unwrap();
        let child = m.mm.fork().unwrap();
        assert_eq!(child.stats().frames_allocated, 1);
        assert_ne!(
            child.pagemap(a, 1).unwrap()[0].pfn,
            m.mm.pagemap(a, 1).unwrap()[0].pfn
        );
        pin.write(0, 0, &10u64.to_le_bytes());
        assert_eq!(m.mm.read_val::<u64>(page(a, 9)).unwrap(), 10);
        assert_eq!(child.read_val::<u64>(page(a, 9)).unwrap(), 9);
        drop(pin);
        m.mm.audit().unwrap();
        child.audit().unwrap();
    }
}

#[test]
fn shared_hugetlb_is_shared_across_fork() {
    for size in HugetlbSize::ALL {
        let m = hugetlb_machine(size, 1);
        let a = map_hugetlb(&m, size, 1, true);
        let last = size.nr_pages() - 2;
        m.mm.write_val(page(a, 1), 1u64).unwrap();
        let child = m.mm.fork().unwrap();
        child.write_val(page(a, 2), 2u64).unwrap();
        child.write_val(page(a, last), 3u64).unwrap();
        assert_eq!(m.mm.read_val::<u64>(page(a, 2)).unwrap(), 2);
        assert_eq!(m.mm.read_val::<u64>(page(a, last)).unwrap(), 3);
        assert_eq!(child.read_val::<u64>(page(a, 1)).unwrap(), 1);
        assert!(m.mm.pagemap(a, 1).unwrap()[0].file);
        m.mm.audit().unwrap();
        child.audit().unwrap();
        drop(child);
        m.mm.munmap(a, size.bytes()).unwrap();
        assert_eq!(m.phys.hugetlb_of(size), pool(1, 1, 0));
    }
}

#[test]
fn concurrent_first_faults_of_a_page_map_it_once() {
    // Threads race to fault in the same page, private and shared, at both sizes, with a
    // pool of exactly one page: the faults are serialized (`hugetlb_fault_mutex`), so none
    // finds the reservation gone and the pool empty, and every write is kept.
    for size in HugetlbSize::ALL {
        for shared in [false, true] {
            let m = hugetlb_machine(size, 1);
            let a = map_hugetlb(&m, size, 1, shared);
            let stride = size.nr_pages() / 256;
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let mm = &m.mm;
                    s.spawn(move || {
                        for k in 0..64 {
                            let i = (t * 64 + k) * stride;
                            mm.write_val(page(a, i), i + 1).unwrap();
                        }
                    });
                }
            });
            for i in (0..256).map(|j| j * stride) {
                assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), i + 1);
            }
            assert_eq!(m.phys.hugetlb_of(size).free, 0);
            assert_eq!(m.mm.stats().faults.hugetlb, 1, "{size:?} shared={shared}");
            m.mm.audit().unwrap();
            m.mm.munmap(a, size.bytes()).unwrap();
            assert_eq!(m.phys.hugetlb_of(size), pool(1, 1, 0));
        }
    }
}

#[test]
fn operations_may_not_cut_a_hugetlb_page() {
    let m = Machine::new(16);
    m.phys.set_nr_hugepages(2);
    let a = huge(&m, 2, false);
    m.mm.write_val(a, 1u8).unwrap();
    let mid = page(a, 3);
    let inval = |r: Result<(), MmError>| matches!(r, Err(MmError::Inval { .. }));
    assert!(inval(m.mm.munmap(mid, PAGE_SIZE)));
    assert!(inval(m.mm.mprotect(mid, PAGE_SIZE, Prot::READ)));
    assert!(inval(m.mm.madvise(mid, PAGE_SIZE, Advice::DontNeed)));
    assert!(inval(m.mm.madvise(a, PMD_SIZE, Advice::Free)));
    assert!(inval(m.mm.madvise(a, PMD_SIZE, Advice::Collapse)));
    assert!(matches!(
        m.mm.mremap(a, PMD_SIZE, PMD_SIZE, MremapFlags::MAYMOVE, None),
        Err(MmError::Inval { .. })
    ));
    assert!(matches!(
        m.mm.mmap(
            Some(page(a, 1)),
            PMD_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::HUGETLB | MapFlags::FIXED
        ),
        Err(MmError::Inval { .. })
    ));
    assert_eq!(m.mm.read_val::<u8>(a).unwrap(), 1);
    // Whole pages are fine: protect one, drop the other.
    m.mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    assert!(m.mm.write_val(a, 2u8).is_err());
    m.events();
    m.mm.madvise(page(a, NR), PMD_SIZE, Advice::DontNeed)
        .unwrap();
    assert_eq!(m.events()[0].0, NotifierEvent::Clear);
    m.mm.audit().unwrap();
}

#[test]
fn dontneed_rounds_its_end_down_to_whole_hugetlb_pages() {
    // madvise_dontneed_free_valid_vma (Linux 6.1): the start must be aligned, the end is
    // rounded down, so a length rounded up to base pages loses no data.
    let m = Machine::new(16);
    m.phys.set_nr_hugepages(2);
    let a = huge(&m, 2, false);
    m.mm.write_val(a, 1u8).unwrap();
    m.mm.write_val(page(a, NR), 2u8).unwrap();
    m.mm.madvise(a, PMD_SIZE + PAGE_SIZE, Advice::DontNeed)
        .unwrap();
    assert_eq!(m.mm.read_val::<u8>(a).unwrap(), 0, "the first page is gone");
    assert_eq!(
        m.mm.read_val::<u8>(page(a, NR)).unwrap(),
        2,
        "the second is kept"
    );
    // Less than a page: nothing at all, and no error.
    m.events();
    m.mm.madvise(page(a, NR), PAGE_SIZE, Advice::DontNeed)
        .unwrap();
    assert!(m.events().is_empty());
    assert_eq!(m.mm.read_val::<u8>(page(a, NR)).unwrap(), 2);
    // A start inside a page is still EINVAL.
    assert!(matches!(
        m.mm.madvise(page(a, 1), PMD_SIZE, Advice::DontNeed),
        Err(MmError::Inval { .. })
    ));
    m.mm.audit().unwrap();
}

#[test]
fn a_shrinking_mremap_may_not_cut_a_hugetlb_page_in_its_tail() {
    let m = Machine::new(16);
    m.phys.set_nr_hugepages(1);
    let h = huge(&m, 1, false);
    m.mm.write_val(h, 1u8).unwrap();
    // Small pages right before the hugetlb page, so a tail can reach into it.
    let a =
        m.mm.mmap(
            Some(page(h, 0).checked_sub(4 * PAGE_SIZE).unwrap()),
            4 * PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        )
        .unwrap();
    let r =
        m.mm.mremap(a, 5 * PAGE_SIZE, 2 * PAGE_SIZE, MremapFlags::empty(), None);
    assert!(matches!(r, Err(MmError::Inval { .. })), "{r:?}");
    // Nothing changed: the small pages and the hugetlb page are still mapped.
    assert_eq!(m.mm.vmas().len(), 2);
    assert_eq!(m.mm.read_val::<u8>(h).unwrap(), 1);
    // A tail that covers the hugetlb page whole unmaps it.
    m.mm.mremap(
        a,
        4 * PAGE_SIZE + PMD_SIZE,
        2 * PAGE_SIZE,
        MremapFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(m.mm.vmas().len(), 1);
    assert_eq!(m.phys.hugetlb(), pool(1, 1, 0));
    m.mm.audit().unwrap();
}

/// `memfd_create(MFD_HUGETLB)`: a hugetlbfs file sized in whole 2 MiB pages, not
/// writable with `write`, filled by `fallocate` from the pool; a shared mapping writes its
/// page, a private one reads it and copies it on the first write; shrinking gives the
/// pages back to the pool.
#[test]
fn hugetlb_memfds_map_their_pool_pages_shared_and_private() {
    let m = Machine::new(32);
    assert_eq!(m.phys.set_nr_hugepages(3), 3);
    let f = hmm::mm::MemFile::new_hugetlb(&m.phys);
    assert!(f.is_hugetlb());
    assert!(matches!(f.truncate(PAGE_SIZE), Err(MmError::Inval { .. })));
    assert!(matches!(f.pwrite(0, &[1]), Err(MmError::Inval { .. })));
    f.truncate(PMD_SIZE).unwrap();
    // Bad ranges change nothing.
    assert!(matches!(f.fallocate(0, 0), Err(MmError::Inval { .. })));
    assert!(matches!(
        f.fallocate(u64::MAX - 1, 10),
        Err(MmError::Inval { .. })
    ));
    assert_eq!(f.nr_cached_pages(), 0);
    // fallocate takes the page the range touches from the pool.
    f.fallocate(0, PAGE_SIZE).unwrap();
    assert_eq!((m.phys.hugetlb().free, f.nr_cached_pages()), (2, 1));
    assert!(matches!(
        m.mm.mmap_file(None, PMD_SIZE, RW, MapFlags::SHARED, &f, PAGE_SIZE),
        Err(MmError::Inval { .. })
    ));
    let shared =
        m.mm.mmap_file(None, PMD_SIZE, RW, MapFlags::SHARED, &f, 0)
            .unwrap();
    let private =
        m.mm.mmap_file(None, PMD_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    m.mm.write_val(page(shared, 7), 0x1234u64).unwrap();
    let mut b = [0u8; 8];
    f.pread(7 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(
        u64::from_le_bytes(b),
        0x1234,
        "the shared mapping wrote the file"
    );
    // The private mapping reads the file's page, then copies it on a write.
    assert_eq!(m.mm.read_val::<u64>(page(private, 7)).unwrap(), 0x1234);
    let cached = m.mm.pagemap(shared, 1).unwrap()[0].pfn;
    assert_eq!(m.mm.pagemap(private, 1).unwrap()[0].pfn, cached);
    m.mm.write_val(page(private, 7), 0x5678u64).unwrap();
    assert_ne!(m.mm.pagemap(private, 1).unwrap()[0].pfn, cached);
    assert_eq!(m.mm.read_val::<u64>(page(shared, 7)).unwrap(), 0x1234);
    assert_eq!(m.phys.hugetlb().free, 1, "the copy took a pool page");
    m.mm.audit().unwrap();
    // Shrinking zaps the shared mapping and gives the file's page back.
    m.mm.munmap(private, PMD_SIZE).unwrap();
    f.truncate(0).unwrap();
    assert!(
        m.mm.read_val::<u8>(shared).is_err(),
        "past the end of file: SIGBUS"
    );
    assert_eq!(m.phys.hugetlb().free, 3);
    // A pool too small: ENOSPC (NoMem here), the pages before it kept.
    let g = hmm::mm::MemFile::new_hugetlb(&m.phys);
    assert!(matches!(
        g.fallocate(0, 4 * PMD_SIZE),
        Err(MmError::NoMem { .. })
    ));
    assert_eq!((g.nr_cached_pages(), m.phys.hugetlb().free), (3, 0));
    drop(g);
    assert_eq!(
        m.phys.hugetlb().free,
        3,
        "a dropped file gives its pages back"
    );
    m.mm.audit().unwrap();
}

#[test]
fn a_private_fault_on_a_hole_of_a_hugetlb_memfd_takes_an_anonymous_page() {
    // hugetlb_no_page for a private mapping of a file with no page there: one anonymous
    // pool page, mapped writable on a write, and the file stays empty (Linux does not
    // put a page in the file and copy it).
    let m = Machine::new(32);
    assert_eq!(m.phys.set_nr_hugepages(1), 1);
    let f = hmm::mm::MemFile::new_hugetlb(&m.phys);
    f.truncate(2 * PMD_SIZE).unwrap();
    let p =
        m.mm.mmap_file(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    m.mm.write_val(page(p, 3), 3u64).unwrap();
    assert_eq!(f.nr_cached_pages(), 0);
    assert_eq!(m.phys.hugetlb().free, 0, "one pool page, not two");
    let e = m.mm.pagemap(page(p, 3), 1).unwrap()[0];
    assert!(e.present && !e.file && e.exclusive);
    let mut b = [0u8; 8];
    f.pread(3 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0, "the file did not change");
    // Past the end of the file: SIGBUS, as for a shared mapping.
    f.truncate(PMD_SIZE).unwrap();
    let beyond = page(p, NR + 1);
    assert_eq!(
        m.mm.read_val::<u8>(beyond),
        Err(FaultError::Bus { addr: beyond })
    );
    m.mm.audit().unwrap();
    m.mm.munmap(p, 2 * PMD_SIZE).unwrap();
    assert_eq!(m.phys.hugetlb(), pool(1, 1, 0));
}
