//! `/proc/pid/pagemap` entries and soft-dirty tracking (`clear_refs`).

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, MmError, Prot};
use hmm::notifier::NotifierEvent;

#[test]
fn pagemap_reports_present_pfn_exclusive_and_file() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let s = m.map(1, RW, MapFlags::SHARED);
    m.mm.write_val(a, 1u8).unwrap();
    m.mm.read_val::<u8>(page(a, 1)).unwrap();
    m.mm.write_val(s, 1u8).unwrap();
    let pm = m.mm.pagemap(a, 4).unwrap();
    assert!(pm[0].present && pm[0].exclusive && !pm[0].file && pm[0].pfn.is_some());
    assert_eq!(pm[0].to_bits() >> 63, 1);
    assert_eq!(pm[0].to_bits() & ((1 << 55) - 1), pm[0].pfn.unwrap());
    // The zero page: present, not exclusive.
    assert!(pm[1].present && !pm[1].exclusive);
    assert_eq!(pm[1].pfn, Some(m.phys.zero_pfn().as_u64()));
    assert!(!pm[2].present && pm[2].swap.is_none() && pm[2].pfn.is_none());
    let sh = m.mm.pagemap(s, 1).unwrap()[0];
    assert!(sh.present && sh.file && sh.exclusive);
    assert_ne!(sh.to_bits() & (1 << 61), 0);
    // After fork the page is mapped twice: not exclusive.
    let child = m.mm.fork().unwrap();
    assert!(!m.mm.pagemap(a, 1).unwrap()[0].exclusive);
    drop(child);
    assert!(m.mm.pagemap(a, 1).unwrap()[0].exclusive);
    // Outside any VMA: zero entries, no error.
    let below = VirtAddr::new(0x10000);
    assert_eq!(m.mm.pagemap(below, 2).unwrap()[1].to_bits(), 0);
}

#[test]
fn pagemap_bad_input() {
    let m = Machine::new(16);
    let a = m.map(1, RW, MapFlags::PRIVATE);
    for (addr, n) in [
        (a.checked_add(8).unwrap(), 1),
        (a, 0),
        (a, u64::MAX),
        (VirtAddr::new(hmm::addr::USER_VA_END - PAGE_SIZE), 2),
    ] {
        assert!(matches!(m.mm.pagemap(addr, n), Err(MmError::Inval { .. })));
    }
}

#[test]
fn soft_dirty_is_cleared_and_set_again_by_writes() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let s = m.map(2, RW, MapFlags::SHARED);
    m.mm.write_val(a, 1u8).unwrap();
    m.mm.write_val(page(a, 1), 1u8).unwrap();
    m.mm.write_val(s, 1u8).unwrap();
    // New VMAs read as soft-dirty everywhere, even where nothing is mapped.
    assert!(m.mm.pagemap(a, 4).unwrap().iter().all(|e| e.soft_dirty));
    m.events();
    m.mm.clear_soft_dirty();
    assert_eq!(
        m.events(),
        [(NotifierEvent::SoftDirty, 0, hmm::addr::USER_VA_END)]
    );
    assert_eq!(m.mm.stats().tlb_flush_ops, 1);
    assert!(m.mm.pagemap(a, 4).unwrap().iter().all(|e| !e.soft_dirty));
    assert!(!m.mm.pagemap(s, 1).unwrap()[0].soft_dirty);
    // A write faults (the entry was write-protected) and sets the bit; reads do not.
    let before = m.mm.stats();
    m.mm.write_val(page(a, 1), 2u8).unwrap();
    m.mm.read_val::<u8>(a).unwrap();
    m.mm.write_val(s, 2u8).unwrap();
    m.mm.read_val::<u8>(page(s, 1)).unwrap();
    let d = m.mm.stats().since(&before);
    assert_eq!((d.faults.wp_reuse, d.faults.cow), (2, 0));
    let pm = m.mm.pagemap(a, 4).unwrap();
    assert_eq!(
        pm.iter().map(|e| e.soft_dirty).collect::<Vec<_>>(),
        [false, true, false, false]
    );
    // A shared page first read after clearing is mapped read-only, so its first write
    // is seen too.
    assert!(!m.mm.pagemap(page(s, 1), 1).unwrap()[0].soft_dirty);
    m.mm.write_val(page(s, 1), 3u8).unwrap();
    assert!(m.mm.pagemap(page(s, 1), 1).unwrap()[0].soft_dirty);
    // mprotect does not make a clean page writable while tracking.
    m.mm.mprotect(a, 4 * PAGE_SIZE, Prot::READ).unwrap();
    m.mm.mprotect(a, 4 * PAGE_SIZE, RW).unwrap();
    m.mm.write_val(a, 3u8).unwrap();
    assert!(m.mm.pagemap(a, 1).unwrap()[0].soft_dirty);
    // A new VMA is soft-dirty again.
    let b = m.map(1, RW, MapFlags::PRIVATE);
    assert!(m.mm.pagemap(b, 1).unwrap()[0].soft_dirty);
    m.mm.audit().unwrap();
}
