//! Transparent huge pages: PMD leaves on fault, the huge zero page, PMD splits on partial
//! munmap / mprotect / madvise / write-protect faults / fork of pinned THPs, MADV_COLLAPSE,
//! and that every byte survives each of them.

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VaRange, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, GupFlags, MapFlags, MmError, Prot, ThpMode};
use hmm::notifier::{
    IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent, NotifierRange,
};

const NR: u64 = PMD_SIZE / PAGE_SIZE;

/// A 2 MiB-aligned private mapping of `pmds` PMDs with MADV_HUGEPAGE.
fn huge_map(m: &Machine, pmds: u64) -> hmm::addr::VirtAddr {
    let a = m.map(pmds * NR, RW, MapFlags::PRIVATE);
    assert!(a.is_aligned(PMD_SIZE));
    m.mm.madvise(a, pmds * PMD_SIZE, Advice::HugePage).unwrap();
    a
}

/// Writes a distinct word at the start of every page.
fn fill(m: &Machine, a: hmm::addr::VirtAddr, pages: u64, tag: u64) {
    for i in 0..pages {
        m.mm.write_val(page(a, i), tag + i).unwrap();
    }
}

fn check(m: &Machine, a: hmm::addr::VirtAddr, pages: impl Iterator<Item = u64>, tag: u64) {
    for i in pages {
        assert_eq!(
            m.mm.read_val::<u64>(page(a, i)).unwrap(),
            tag + i,
            "page {i}"
        );
    }
}

#[test]
fn write_fault_maps_a_thp_and_read_fault_the_huge_zero_page() {
    let m = Machine::new(32);
    let a = huge_map(&m, 2);
    assert_eq!(m.mm.read_val::<u64>(page(a, 3)).unwrap(), 0);
    m.mm.write_val(page(a, NR + 5), 9u64).unwrap();
    let s = m.mm.stats();
    assert_eq!((s.faults.thp_zero, s.faults.thp_anon), (1, 1));
    assert_eq!(s.frames_allocated, 1);
    assert_eq!(m.phys.nr_in_use(), NR);
    let pm = m.mm.pagemap(a, 2 * NR).unwrap();
    assert!(pm.iter().all(|e| e.present && e.order == 9));
    assert!(pm[NR as usize..].iter().all(|e| e.exclusive));
    // The rest of the THP needs no fault.
    let before = m.mm.stats();
    fill(&m, page(a, NR), NR, 0);
    assert_eq!(m.mm.stats().since(&before).faults.total(), 0);
    // Writing the huge zero page splits it and copies one 4 KiB page.
    m.events();
    m.mm.write_val(page(a, 3), 1u64).unwrap();
    assert_eq!(
        m.events(),
        [
            (NotifierEvent::Clear, a.as_u64(), a.as_u64() + PMD_SIZE),
            (
                NotifierEvent::Clear,
                page(a, 3).as_u64(),
                page(a, 4).as_u64()
            )
        ]
    );
    let s = m.mm.stats();
    assert_eq!((s.thp_split_pmd, s.faults.cow), (1, 1));
    assert_eq!(m.mm.read_val::<u64>(page(a, 4)).unwrap(), 0);
    m.mm.audit().unwrap();
}

#[test]
fn thp_mode_and_vma_eligibility() {
    let m = Machine::new(32);
    // Default Madvise: no THP without MADV_HUGEPAGE.
    let a = m.map(NR, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 1u8).unwrap();
    assert_eq!(m.mm.stats().faults.thp_anon, 0);
    m.mm.set_thp_mode(ThpMode::Always);
    m.mm.write_val(page(a, 1), 1u8).unwrap(); // PTE table already there: 4 KiB
    let b = m.map(NR, RW, MapFlags::PRIVATE);
    m.mm.write_val(b, 1u8).unwrap();
    assert_eq!(m.mm.stats().faults.thp_anon, 1);
    // NOHUGEPAGE wins over Always; a range smaller than 2 MiB never gets one.
    let c = m.map(NR, RW, MapFlags::PRIVATE);
    m.mm.madvise(c, PMD_SIZE, Advice::NoHugePage).unwrap();
    m.mm.write_val(c, 1u8).unwrap();
    let d = m.map(NR / 2, RW, MapFlags::PRIVATE);
    m.mm.write_val(d, 1u8).unwrap();
    // Shared memory has no anonymous THPs.
    let e = m.map(NR, RW, MapFlags::SHARED);
    m.mm.write_val(e, 1u8).unwrap();
    assert_eq!(m.mm.stats().faults.thp_anon, 1);
    assert_eq!(
        m.mm.fork().unwrap().thp_mode(),
        ThpMode::Always,
        "inherited"
    );
    m.mm.set_thp_mode(ThpMode::Never);
    let f = m.map(NR, RW, MapFlags::PRIVATE);
    m.mm.madvise(f, PMD_SIZE, Advice::HugePage).unwrap();
    m.mm.write_val(f, 1u8).unwrap();
    assert_eq!(m.mm.stats().faults.thp_anon, 1);
    m.mm.audit().unwrap();
}

#[test]
fn partial_munmap_splits_and_keeps_the_rest() {
    let m = Machine::new(32);
    let a = huge_map(&m, 1);
    fill(&m, a, NR, 0x1000);
    m.events();
    m.mm.munmap(page(a, 100), 10 * PAGE_SIZE).unwrap();
    // UNMAP, CLEAR of the 2 MiB for the PMD split, then the folio split's CLEAR for each
    // VMA part still mapping it.
    assert_eq!(
        m.events(),
        [
            (
                NotifierEvent::Unmap,
                page(a, 100).as_u64(),
                page(a, 110).as_u64()
            ),
            (NotifierEvent::Clear, a.as_u64(), a.as_u64() + PMD_SIZE),
            (NotifierEvent::Clear, a.as_u64(), page(a, 100).as_u64()),
            (
                NotifierEvent::Clear,
                page(a, 110).as_u64(),
                page(a, NR).as_u64()
            ),
        ]
    );
    let s = m.mm.stats();
    assert_eq!((s.thp_split_pmd, s.thp_split_folio), (1, 1));
    check(&m, a, (0..100).chain(110..NR), 0x1000);
    assert!(m.mm.read_val::<u8>(page(a, 105)).is_err());
    let pm = m.mm.pagemap(a, NR).unwrap();
    assert!(pm.iter().all(|e| e.order == 0));
    m.mm.audit().unwrap();
    // The folio was split: the unmapped pages are free, each other page is its own folio.
    assert_eq!(m.phys.nr_in_use(), NR - 10);
    let f = m.phys.frame(hmm::addr::Pfn::new(pm[5].pfn.unwrap()));
    assert_eq!((f.meta().order(), f.folio().pfn()), (0, f.pfn()));
    m.mm.munmap(a, 50 * PAGE_SIZE).unwrap();
    assert_eq!(m.phys.nr_in_use(), NR - 60);
    m.mm.munmap(a, PMD_SIZE).unwrap();
    assert_eq!(m.phys.nr_in_use(), 0);
}

#[test]
fn a_pinned_or_shared_thp_is_not_split_but_keeps_its_bytes() {
    let m = Machine::new(32);
    let a = huge_map(&m, 1);
    fill(&m, a, NR, 0x2000);
    let pin =
        m.mm.pin_user_pages(page(a, 300), 1, GupFlags::empty())
            .unwrap();
    m.mm.munmap(page(a, 10), PAGE_SIZE).unwrap();
    assert_eq!(m.mm.stats().thp_split_folio, 0);
    assert_eq!(m.phys.nr_in_use(), NR);
    m.mm.audit().unwrap();
    drop(pin);
    // Shared with a child: a page unmapped in one address space is still mapped in the
    // other, so nothing is queued; once both unmap it, the split unmaps and remaps the
    // folio in both.
    let child = m.mm.fork().unwrap();
    m.mm.munmap(page(a, 20), PAGE_SIZE).unwrap();
    assert_eq!(m.mm.stats().thp_split_folio, 0);
    child.munmap(page(a, 20), PAGE_SIZE).unwrap();
    assert_eq!(child.stats().thp_split_folio, 1);
    check(&m, a, (0..10).chain(11..20).chain(21..NR), 0x2000);
    for i in (0..10).chain(11..20).chain(21..NR) {
        assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), 0x2000 + i);
    }
    m.mm.audit().unwrap();
    child.audit().unwrap();
    drop(child);
    assert_eq!(m.phys.nr_in_use(), NR - 2);
}

#[test]
fn mprotect_of_a_whole_leaf_keeps_it_and_of_part_splits() {
    let m = Machine::new(32);
    let a = huge_map(&m, 2);
    fill(&m, a, 2 * NR, 0);
    m.mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    assert_eq!(m.mm.stats().thp_split_pmd, 0);
    assert_eq!(m.mm.pagemap(a, 1).unwrap()[0].order, 9);
    assert!(m.mm.write_val(a, 0u8).is_err());
    m.mm.mprotect(page(a, NR + 1), PAGE_SIZE, Prot::NONE)
        .unwrap();
    assert_eq!(m.mm.stats().thp_split_pmd, 1);
    assert!(m.mm.read_val::<u8>(page(a, NR + 1)).is_err());
    check(&m, a, (0..NR + 1).chain(NR + 2..2 * NR), 0);
    m.mm.audit().unwrap();
    // Restoring write access reuses the exclusive THP in place.
    m.mm.mprotect(a, PMD_SIZE, RW).unwrap();
    let before = m.mm.stats();
    m.mm.write_val(a, 5u64).unwrap();
    assert_eq!(m.mm.stats().since(&before).faults.total(), 0);
    m.mm.audit().unwrap();
}

#[test]
fn fork_shares_thps_and_a_write_splits_then_copies_one_page() {
    let m = Machine::new(32);
    let a = huge_map(&m, 1);
    fill(&m, a, NR, 0);
    let child = m.mm.fork().unwrap();
    assert_eq!(m.phys.nr_in_use(), NR);
    assert_eq!(child.pagemap(a, 1).unwrap()[0].order, 9);
    m.mm.audit().unwrap();
    child.audit().unwrap();
    child.write_val(page(a, 7), 77u64).unwrap();
    let c = child.stats();
    assert_eq!((c.thp_split_pmd, c.faults.cow), (1, 1));
    assert_eq!(m.mm.read_val::<u64>(page(a, 7)).unwrap(), 7);
    assert_eq!(child.read_val::<u64>(page(a, 7)).unwrap(), 77);
    assert_eq!(
        m.mm.pagemap(a, 1).unwrap()[0].order,
        9,
        "parent keeps its leaf"
    );
    m.mm.audit().unwrap();
    child.audit().unwrap();
    // The parent's THP is shared with the child's PTEs: a write splits and copies too.
    m.mm.write_val(page(a, 8), 88u64).unwrap();
    assert_eq!(child.read_val::<u64>(page(a, 8)).unwrap(), 8);
    drop(child);
    m.mm.audit().unwrap();
}

#[test]
fn fork_splits_a_pinned_thp() {
    let m = Machine::new(32);
    let a = huge_map(&m, 1);
    fill(&m, a, NR, 0);
    let pin = m.mm.pin_user_pages(page(a, 2), 2, GupFlags::WRITE).unwrap();
    let child = m.mm.fork().unwrap();
    assert_eq!(m.mm.stats().thp_split_pmd, 1);
    // The folio is anon-exclusive and pinned: every page copied for the child.
    assert_eq!(child.stats().frames_allocated, NR);
    check(&m, a, 0..NR, 0);
    for i in 0..NR {
        assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), i);
    }
    m.mm.audit().unwrap();
    child.audit().unwrap();
    drop(pin);
}

#[test]
fn madvise_dontneed_on_part_of_a_thp() {
    let m = Machine::new(32);
    let a = huge_map(&m, 1);
    fill(&m, a, NR, 1);
    m.mm.madvise(page(a, 10), 20 * PAGE_SIZE, Advice::DontNeed)
        .unwrap();
    check(&m, a, (0..10).chain(30..NR), 1);
    for i in 10..30 {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), 0);
    }
    m.mm.audit().unwrap();
}

#[test]
fn collapse_makes_one_thp_with_the_same_bytes() {
    let m = Machine::new(32);
    let a = m.map(NR, RW, MapFlags::PRIVATE);
    for i in (0..NR).step_by(3) {
        m.mm.write_val(page(a, i), 500 + i).unwrap();
    }
    m.mm.read_val::<u8>(page(a, 1)).unwrap();
    assert_eq!(m.phys.nr_in_use(), NR.div_ceil(3));
    m.events();
    m.mm.madvise(a, PMD_SIZE, Advice::Collapse).unwrap();
    assert_eq!(
        m.events(),
        [(NotifierEvent::Clear, a.as_u64(), a.as_u64() + PMD_SIZE)]
    );
    let s = m.mm.stats();
    assert_eq!(s.thp_collapse, 1);
    assert_eq!(m.phys.nr_in_use(), NR, "small pages freed, one THP");
    for i in 0..NR {
        let want = if i % 3 == 0 { 500 + i } else { 0 };
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), want);
    }
    assert!(m.mm.pagemap(a, NR).unwrap().iter().all(|e| e.order == 9));
    m.mm.audit().unwrap();
    // Already huge: nothing to do.
    m.mm.madvise(a, PMD_SIZE, Advice::Collapse).unwrap();
    assert_eq!(m.mm.stats().thp_collapse, 1);
}

/// A device that maps one small page writable and writes it until it is told to stop:
/// its write lands in the frame while the invalidation runs, before the callback returns.
struct LateWriter {
    phys: std::sync::Arc<hmm::phys::PhysMem>,
    pfn: hmm::addr::Pfn,
    wrote: std::sync::atomic::AtomicBool,
}

impl IntervalNotifierOps for LateWriter {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
        sub.set_seq(seq);
        if !self.wrote.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.phys.frame(self.pfn).write(0, &77u64.to_le_bytes());
        }
        true
    }
}

#[test]
fn collapse_keeps_a_device_write_made_before_its_invalidation_returned() {
    let m = Machine::new(32);
    let a = m.map(NR, RW, MapFlags::PRIVATE);
    fill(&m, a, NR, 100);
    let pfn = m.mm.pagemap(page(a, 7), 1).unwrap()[0].pfn.unwrap();
    let dev = std::sync::Arc::new(LateWriter {
        phys: m.phys.clone(),
        pfn: hmm::addr::Pfn::new(pfn),
        wrote: Default::default(),
    });
    let _sub =
        m.mm.interval_notifier_insert(a, PMD_SIZE, dev.clone())
            .unwrap();
    m.mm.madvise(a, PMD_SIZE, Advice::Collapse).unwrap();
    assert_eq!(m.mm.stats().thp_collapse, 1);
    // The copy into the THP came after the device's last write (collapse_huge_page).
    assert_eq!(m.mm.read_val::<u64>(page(a, 7)).unwrap(), 77);
    check(&m, a, (0..NR).filter(|&i| i != 7), 100);
    m.mm.audit().unwrap();
}

#[test]
fn collapse_refuses_pinned_pages_and_empty_or_unaligned_ranges() {
    let m = Machine::new(32);
    let a = m.map(2 * NR, RW, MapFlags::PRIVATE);
    let small = m.map(8, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 1u8).unwrap();
    let pin = m.mm.pin_user_pages(a, 1, GupFlags::empty()).unwrap();
    assert!(matches!(
        m.mm.madvise(a, PMD_SIZE, Advice::Collapse),
        Err(MmError::Again { .. })
    ));
    drop(pin);
    // Second PMD has no page table at all.
    assert!(matches!(
        m.mm.madvise(page(a, NR), PMD_SIZE, Advice::Collapse),
        Err(MmError::Inval { .. })
    ));
    assert!(matches!(
        m.mm.madvise(small, 8 * PAGE_SIZE, Advice::Collapse),
        Err(MmError::Inval { .. })
    ));
    let sh = m.map(NR, RW, MapFlags::SHARED);
    assert!(matches!(
        m.mm.madvise(sh, PMD_SIZE, Advice::Collapse),
        Err(MmError::Inval { .. })
    ));
    // Across both PMDs: the first collapses, the second fails, the call reports it.
    assert!(m.mm.madvise(a, 2 * PMD_SIZE, Advice::Collapse).is_err());
    assert_eq!(m.mm.stats().thp_collapse, 1);
    assert_eq!(m.mm.read_val::<u8>(a).unwrap(), 1);
    m.mm.audit().unwrap();
}

#[test]
fn pin_of_a_thp_page_and_unshare_after_fork() {
    let m = Machine::new(32);
    let a = huge_map(&m, 1);
    fill(&m, a, NR, 0);
    let child = m.mm.fork().unwrap();
    // A read-only pin in the child of a shared THP unshares: split and copy that page.
    let pin = child
        .pin_user_pages(page(a, 3), 1, GupFlags::empty())
        .unwrap();
    assert_eq!(child.stats().faults.cow, 1);
    let r = VaRange::from_len(page(a, 3), PAGE_SIZE).unwrap();
    assert_ne!(
        child.pagemap(r.start(), 1).unwrap()[0].pfn,
        m.mm.pagemap(r.start(), 1).unwrap()[0].pfn
    );
    let mut b = [0u8; 8];
    pin.read(0, 0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 3);
    // Still read-only in the child: a write faults and reuses the now exclusive page.
    child.write_val(page(a, 3), 33u64).unwrap();
    pin.read(0, 0, &mut b);
    assert_eq!(
        u64::from_le_bytes(b),
        33,
        "the pin sees what the child writes"
    );
    assert_eq!(m.mm.read_val::<u64>(page(a, 3)).unwrap(), 3);
    drop(pin);
    child.audit().unwrap();
    m.mm.audit().unwrap();
}
