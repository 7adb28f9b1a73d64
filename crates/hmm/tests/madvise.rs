//! `madvise`: FREE and lazy-free reclaim, HUGEPAGE / NOHUGEPAGE on VMAs, DONTNEED on
//! every kind of memory, and bad input.

mod common;

use common::{page, Machine, RW};
use hmm::addr::PAGE_SIZE;
use hmm::mm::{Advice, GupFlags, MapFlags, MmError};
use hmm::notifier::NotifierEvent;
use hmm::prot::VmFlags;

#[test]
fn free_then_reclaim_discards_clean_pages_and_keeps_rewritten_ones() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    for i in 0..4 {
        m.mm.write_val(page(a, i), 10 + i).unwrap();
    }
    let pin =
        m.mm.pin_user_pages(page(a, 3), 1, GupFlags::empty())
            .unwrap();
    m.events();
    m.mm.madvise(a, 4 * PAGE_SIZE, Advice::Free).unwrap();
    assert_eq!(
        m.events(),
        [(NotifierEvent::Clear, a.as_u64(), page(a, 4).as_u64())]
    );
    // Until reclaim runs, contents are still there.
    assert_eq!(m.mm.read_val::<u64>(page(a, 0)).unwrap(), 10);
    m.mm.write_val(page(a, 1), 99u64).unwrap();
    m.events();
    assert_eq!(
        m.mm.reclaim_lazyfree(),
        2,
        "pages 0 and 2; 1 was rewritten, 3 is pinned"
    );
    assert_eq!(m.events().len(), 2);
    assert_eq!(m.mm.read_val::<u64>(page(a, 0)).unwrap(), 0);
    assert_eq!(m.mm.read_val::<u64>(page(a, 1)).unwrap(), 99);
    assert_eq!(m.mm.read_val::<u64>(page(a, 2)).unwrap(), 0);
    assert_eq!(m.mm.read_val::<u64>(page(a, 3)).unwrap(), 13);
    // Reclaim found page 3 referenced beyond its mapping: no longer lazy-free, as the
    // kernel re-marks such a folio swap-backed.
    drop(pin);
    assert_eq!(m.mm.reclaim_lazyfree(), 0);
    m.mm.audit().unwrap();
    // Shared memory cannot be freed lazily.
    let s = m.map(1, RW, MapFlags::SHARED);
    assert!(matches!(
        m.mm.madvise(s, PAGE_SIZE, Advice::Free),
        Err(MmError::Inval { .. })
    ));
}

#[test]
fn free_skips_pages_shared_with_a_child() {
    let m = Machine::new(16);
    let a = m.map(1, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 5u64).unwrap();
    let child = m.mm.fork().unwrap();
    m.mm.madvise(a, PAGE_SIZE, Advice::Free).unwrap();
    assert_eq!(m.mm.reclaim_lazyfree(), 0);
    assert_eq!(child.read_val::<u64>(a).unwrap(), 5);
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 5);
}

#[test]
fn hugepage_advice_sets_vma_flags_splitting_and_merging() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    m.mm.madvise(page(a, 2), 2 * PAGE_SIZE, Advice::HugePage)
        .unwrap();
    let v = m.mm.vmas();
    assert_eq!(v.len(), 3);
    assert!(v[1].flags().contains(VmFlags::HUGEPAGE));
    m.mm.madvise(page(a, 2), 2 * PAGE_SIZE, Advice::NoHugePage)
        .unwrap();
    assert!(m.mm.vmas()[1].flags().contains(VmFlags::NOHUGEPAGE));
    m.mm.madvise(a, 8 * PAGE_SIZE, Advice::NoHugePage).unwrap();
    assert_eq!(m.mm.vmas().len(), 1, "merged again");
    assert!(m.events().is_empty(), "VMA flags only: no invalidation");
}

#[test]
fn dontneed_on_shared_memory_keeps_the_object_contents() {
    let m = Machine::new(16);
    let s = m.map(2, RW, MapFlags::SHARED);
    m.mm.write_val(s, 3u64).unwrap();
    m.mm.madvise(s, 2 * PAGE_SIZE, Advice::DontNeed).unwrap();
    assert_eq!(m.mm.read_val::<u64>(s).unwrap(), 3);
    m.mm.audit().unwrap();
}

#[test]
fn madvise_bad_input() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    for adv in [
        Advice::DontNeed,
        Advice::Free,
        Advice::HugePage,
        Advice::NoHugePage,
        Advice::Collapse,
    ] {
        assert!(matches!(
            m.mm.madvise(a.checked_add(1).unwrap(), PAGE_SIZE, adv),
            Err(MmError::Inval { .. })
        ));
        assert!(matches!(
            m.mm.madvise(a, 3 * PAGE_SIZE, adv),
            Err(MmError::NoMem { .. })
        ));
        assert!(matches!(
            m.mm.madvise(a, u64::MAX, adv),
            Err(MmError::Inval { .. })
        ));
        m.mm.madvise(a, 0, adv).unwrap();
    }
    assert_eq!(m.mm.vmas().len(), 1);
}
