//! 1 GiB hugetlb pages: the gigantic pool next to the 2 MiB one, `MAP_HUGETLB |
//! MAP_HUGE_1GB` and `MFD_HUGETLB | MFD_HUGE_1GB` mappings by PUD leaves, their alignment
//! rules, and pages going back to the pool. COW after fork, pinned pages at fork, shared
//! memory and racing first faults run at both sizes in `hugetlb.rs`.
//!
//! RAM is sparse: a machine of a few GiB commits host memory only for the frames written.

mod common;

use common::{hugetlb_machine, map_hugetlb, page, Machine, RW};
use hmm::addr::{PAGE_SIZE, PMD_SIZE, PUD_NR, PUD_SIZE};
use hmm::mm::{Advice, FaultError, MapFlags, MemFile, MmError, MremapFlags, Prot};
use hmm::notifier::NotifierEvent;
use hmm::phys::{HugetlbSize, HugetlbStats};

const GIG: HugetlbSize = HugetlbSize::Size1G;

fn pool(total: u64, free: u64, reserved: u64) -> HugetlbStats {
    HugetlbStats {
        total,
        free,
        reserved,
    }
}

#[test]
fn the_gigantic_pool_takes_free_aligned_gigabytes_beside_the_2m_pool() {
    // The first GiB holds the zero pages, so 3 GiB of RAM hold two 1 GiB pages.
    let m = Machine::new(3 << 10);
    let free = m.phys.nr_free();
    assert_eq!(m.phys.set_nr_hugepages_of(GIG, 5), 2);
    assert_eq!(m.phys.hugetlb_of(GIG), pool(2, 2, 0));
    assert_eq!(m.phys.nr_free(), free - 2 * PUD_NR);
    assert_eq!(m.phys.nr_in_use(), 0, "free pool pages are not in use");
    // The 2 MiB pool is its own, and comes out of the first GiB.
    assert_eq!(m.phys.set_nr_hugepages(3), 3);
    assert_eq!(m.phys.hugetlb(), pool(3, 3, 0));
    assert_eq!(m.phys.hugetlb_of(GIG), pool(2, 2, 0));
    // Reserved pages keep the pool from shrinking; free ones go back whole.
    let a = map_hugetlb(&m, GIG, 1, false);
    assert_eq!(m.phys.hugetlb_of(GIG), pool(2, 2, 1));
    assert_eq!(m.phys.set_nr_hugepages_of(GIG, 0), 1);
    m.mm.munmap(a, PUD_SIZE).unwrap();
    assert_eq!(m.phys.set_nr_hugepages_of(GIG, 0), 0);
    assert_eq!(m.phys.set_nr_hugepages(0), 0);
    assert_eq!(m.phys.nr_free(), free);
    // Memory in use in a GiB keeps it from becoming a gigantic page: 512 pages of 2 MiB
    // do not fit in the first GiB, so they take one of the others.
    let blocks = PUD_SIZE / PMD_SIZE;
    assert_eq!(m.phys.set_nr_hugepages(blocks), blocks);
    assert_eq!(m.phys.set_nr_hugepages_of(GIG, 2), 1);
    assert_eq!(m.phys.set_nr_hugepages(0), 0);
    assert_eq!(m.phys.set_nr_hugepages_of(GIG, 2), 2);
}

#[test]
fn a_1g_mapping_reserves_faults_one_pud_leaf_and_frees_it_back() {
    let m = hugetlb_machine(GIG, 1);
    // A length is rounded up to 1 GiB, and the address is 1 GiB aligned.
    let a =
        m.mm.mmap(
            None,
            PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::HUGETLB | MapFlags::HUGE_1GB,
        )
        .unwrap();
    assert!(a.is_aligned(PUD_SIZE));
    assert_eq!(m.mm.vmas()[0].range().npages(), PUD_NR);
    assert_eq!(m.phys.hugetlb_of(GIG), pool(1, 1, 1));
    assert_eq!(
        m.phys.hugetlb(),
        pool(0, 0, 0),
        "the 2 MiB pool is not touched"
    );
    // The pool has no second page: a second mapping fails cleanly.
    assert!(matches!(
        m.mm.mmap(
            None,
            PUD_SIZE,
            RW,
            MapFlags::SHARED | MapFlags::HUGETLB | MapFlags::HUGE_1GB
        ),
        Err(MmError::NoMem { .. })
    ));
    let pmd_tables = m.mm.stats().walk.nr_pmd_tables;
    assert_eq!(m.mm.read_val::<u64>(page(a, 7)).unwrap(), 0);
    m.mm.write_val(page(a, PUD_NR - 1), 5u64).unwrap();
    m.mm.write_val(page(a, 8), 6u64).unwrap();
    let s = m.mm.stats();
    assert_eq!(
        (s.faults.hugetlb, s.faults.wp_reuse),
        (1, 1),
        "read, then reuse on write; the other pages are in the same leaf"
    );
    assert_eq!(
        m.mm.stats().walk.nr_pmd_tables,
        pmd_tables,
        "a PUD leaf needs no PMD table"
    );
    assert_eq!(m.phys.hugetlb_of(GIG), pool(1, 0, 0));
    assert_eq!(m.phys.nr_in_use(), PUD_NR);
    // pagemap reports each page of the one folio, with its order.
    let pm = m.mm.pagemap(page(a, PUD_NR - 4), 4).unwrap();
    let first = pm[0].pfn.unwrap();
    for (k, e) in pm.iter().enumerate() {
        assert!(e.present && e.exclusive && !e.file);
        assert_eq!(e.order, 18);
        assert_eq!(e.pfn, Some(first + k as u64));
    }
    assert_eq!(
        first % PUD_NR,
        PUD_NR - 4,
        "a gigantic folio is 1 GiB aligned"
    );
    // Long reads and writes cross the leaf's 2 MiB pieces.
    let data: Vec<u8> = (0..3 * PMD_SIZE).map(|i| (i % 251) as u8).collect();
    let at = a.checked_add(PMD_SIZE / 2).unwrap();
    m.mm.write(at, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    m.mm.read(at, &mut back).unwrap();
    assert_eq!(back, data);
    m.mm.audit().unwrap();
    m.events();
    m.mm.munmap(a, PUD_SIZE).unwrap();
    assert_eq!(
        m.events(),
        [(NotifierEvent::Unmap, a.as_u64(), a.as_u64() + PUD_SIZE)]
    );
    assert_eq!(m.phys.hugetlb_of(GIG), pool(1, 1, 0));
    assert_eq!(m.phys.nr_in_use(), 0);
    m.mm.audit().unwrap();
}

#[test]
fn map_huge_flags_are_checked() {
    let m = hugetlb_machine(GIG, 1);
    let both = MapFlags::PRIVATE | MapFlags::HUGETLB | MapFlags::HUGE_1GB | MapFlags::HUGE_2MB;
    assert!(matches!(
        m.mm.mmap(None, PUD_SIZE, RW, both),
        Err(MmError::Inval { .. })
    ));
    // A fixed address must be aligned to the page size, not only to 2 MiB.
    let fixed = MapFlags::PRIVATE | MapFlags::HUGETLB | MapFlags::HUGE_1GB | MapFlags::FIXED;
    let at = hmm::addr::VirtAddr::new(64 * PUD_SIZE + PMD_SIZE);
    assert!(matches!(
        m.mm.mmap(Some(at), PUD_SIZE, RW, fixed),
        Err(MmError::Inval { .. })
    ));
    let at = hmm::addr::VirtAddr::new(64 * PUD_SIZE);
    assert_eq!(m.mm.mmap(Some(at), PUD_SIZE, RW, fixed).unwrap(), at);
    // Without MAP_HUGETLB the size flags are ignored, as in Linux.
    let sizes = MapFlags::HUGE_1GB | MapFlags::HUGE_2MB;
    let plain =
        m.mm.mmap(None, PAGE_SIZE, RW, MapFlags::PRIVATE | sizes)
            .unwrap();
    assert_eq!(
        m.mm.vmas()
            .iter()
            .find(|v| v.start() == plain)
            .unwrap()
            .range()
            .npages(),
        1
    );
    // MAP_HUGE_2MB is the 2 MiB pool's.
    assert!(matches!(
        m.mm.mmap(
            None,
            PMD_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::HUGETLB | MapFlags::HUGE_2MB
        ),
        Err(MmError::NoMem { .. })
    ));
}

#[test]
fn operations_may_not_cut_a_1g_page() {
    let m = hugetlb_machine(GIG, 1);
    let a = map_hugetlb(&m, GIG, 1, false);
    m.mm.write_val(a, 1u8).unwrap();
    let inside = page(a, PMD_SIZE / PAGE_SIZE);
    let inval = |r: Result<(), MmError>| assert!(matches!(r, Err(MmError::Inval { .. })), "{r:?}");
    inval(m.mm.munmap(inside, PMD_SIZE));
    inval(m.mm.munmap(a, PMD_SIZE));
    inval(m.mm.mprotect(a, PMD_SIZE, Prot::READ));
    inval(m.mm.madvise(inside, PMD_SIZE, Advice::DontNeed));
    assert!(matches!(
        m.mm.mremap(a, PUD_SIZE, 2 * PUD_SIZE, MremapFlags::MAYMOVE, None),
        Err(MmError::Inval { .. })
    ));
    assert_eq!(m.mm.read_val::<u8>(a).unwrap(), 1, "nothing changed");
    // Whole pages are fine: read-only, then writable again, then discarded.
    m.mm.mprotect(a, PUD_SIZE, Prot::READ).unwrap();
    assert!(matches!(
        m.mm.write_val(page(a, 3), 1u8),
        Err(FaultError::Segv { .. })
    ));
    m.mm.mprotect(a, PUD_SIZE, RW).unwrap();
    m.mm.write_val(page(a, 3), 2u8).unwrap();
    // DONTNEED rounds its end down to whole pages: 2 MiB of a 1 GiB page is nothing.
    m.mm.madvise(a, PMD_SIZE, Advice::DontNeed).unwrap();
    assert_eq!(m.mm.read_val::<u8>(page(a, 3)).unwrap(), 2);
    m.mm.madvise(a, PUD_SIZE, Advice::DontNeed).unwrap();
    assert_eq!(m.phys.hugetlb_of(GIG).free, 1);
    assert_eq!(m.mm.read_val::<u8>(page(a, 3)).unwrap(), 0);
    m.mm.audit().unwrap();
}

#[test]
fn a_1g_memfd_maps_its_pool_pages_shared_and_private() {
    let m = hugetlb_machine(GIG, 2);
    let f = MemFile::new_hugetlb_of(&m.phys, GIG);
    assert_eq!(f.hugetlb_size(), Some(GIG));
    // Its size moves in whole 1 GiB pages.
    assert!(matches!(f.truncate(PMD_SIZE), Err(MmError::Inval { .. })));
    f.fallocate(0, 1).unwrap();
    assert_eq!((f.size(), f.nr_cached_pages()), (PUD_SIZE, 1));
    assert_eq!(m.phys.hugetlb_of(GIG).free, 1);
    // A mapping's offset is aligned to the page size.
    assert!(matches!(
        m.mm.mmap_file(None, PUD_SIZE, RW, MapFlags::SHARED, &f, PMD_SIZE),
        Err(MmError::Inval { .. })
    ));
    let s1 =
        m.mm.mmap_file(None, PUD_SIZE, RW, MapFlags::SHARED, &f, 0)
            .unwrap();
    let s2 =
        m.mm.mmap_file(None, PUD_SIZE, RW, MapFlags::SHARED, &f, 0)
            .unwrap();
    assert!(s1.is_aligned(PUD_SIZE) && s2.is_aligned(PUD_SIZE));
    m.mm.write_val(page(s1, 5), 55u64).unwrap();
    assert_eq!(m.mm.read_val::<u64>(page(s2, 5)).unwrap(), 55);
    let mut buf = [0u8; 8];
    f.pread(5 * PAGE_SIZE, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 55);
    // A private mapping reads the file's page, and its first write copies it.
    let p =
        m.mm.mmap_file(None, PUD_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    assert_eq!(m.mm.read_val::<u64>(page(p, 5)).unwrap(), 55);
    m.mm.write_val(page(p, 5), 66u64).unwrap();
    assert_eq!(m.phys.hugetlb_of(GIG).free, 0, "the copy took a pool page");
    assert_eq!(m.mm.read_val::<u64>(page(s1, 5)).unwrap(), 55);
    assert_eq!(m.mm.read_val::<u64>(page(p, 5)).unwrap(), 66);
    m.mm.audit().unwrap();
    m.mm.munmap(p, PUD_SIZE).unwrap();
    assert_eq!(m.phys.hugetlb_of(GIG).free, 1);
    m.mm.munmap(s1, PUD_SIZE).unwrap();
    m.mm.munmap(s2, PUD_SIZE).unwrap();
    drop(f);
    assert_eq!(m.phys.hugetlb_of(GIG), pool(2, 2, 0));
}
