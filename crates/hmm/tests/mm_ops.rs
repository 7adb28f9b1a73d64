//! Integration tests of every address-space operation: semantics, the notifier events
//! each fires (kind, range, owner, VMA) and the counters.

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{Advice, FaultError, MapFlags, Prot, SegvCause, VmaKind};
use hmm::notifier::NotifierEvent;

#[test]
fn read_fault_maps_the_zero_page_and_write_fault_allocates() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0);
    let s = m.mm.stats();
    assert_eq!(s.faults.anon_read_zero, 1);
    assert_eq!(s.frames_allocated, 0);
    assert_eq!(m.phys.nr_in_use(), 0);
    // Writing over the zero page is a COW from the zero page: CLEAR for that one page.
    m.mm.write_val(a, 0xdead_beef_u64).unwrap();
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0xdead_beef);
    assert_eq!(
        m.events(),
        [(NotifierEvent::Clear, a.as_u64(), a.as_u64() + PAGE_SIZE)]
    );
    let s = m.mm.stats();
    assert_eq!(
        (s.faults.cow, s.frames_allocated, s.tlb_flush_ops),
        (1, 1, 1)
    );
    // A first write to an empty page allocates without any invalidation.
    m.mm.write_val(page(a, 1), 7u32).unwrap();
    assert!(m.events().is_empty());
    let s = m.mm.stats();
    assert_eq!((s.faults.anon_write, s.frames_allocated), (1, 2));
    assert_eq!(m.mm.read_val::<u32>(page(a, 1)).unwrap(), 7);
    assert_eq!(m.mm.audit().unwrap().frames_referenced, 2);
    assert_eq!(m.phys.nr_in_use(), 2);
}

#[test]
fn accesses_cross_pages_and_set_dirty_bits() {
    let m = Machine::new(16);
    let a = m.map(3, RW, MapFlags::PRIVATE);
    let data: Vec<u8> = (0..2 * PAGE_SIZE as usize + 100).map(|i| i as u8).collect();
    let at = a.checked_add(PAGE_SIZE - 50).unwrap();
    m.mm.write(at, &data).unwrap_err();
    let at = a.checked_add(50).unwrap();
    m.mm.write(at, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    m.mm.read(at, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(m.mm.stats().faults.anon_write, 3);
    m.mm.audit().unwrap();
}

#[test]
fn faults_outside_vmas_or_against_prot_are_segv_and_change_nothing() {
    let m = Machine::new(16);
    let a = m.map(2, Prot::READ, MapFlags::PRIVATE);
    let before = m.mm.stats();
    assert_eq!(
        m.mm.write(a, &[1]),
        Err(FaultError::Segv {
            addr: a,
            cause: SegvCause::AccErr
        })
    );
    let hole = page(a, 2);
    assert!(matches!(
        m.mm.read_val::<u8>(hole),
        Err(FaultError::Segv {
            cause: SegvCause::MapErr,
            ..
        })
    ));
    // A read spanning into the hole fails as a whole, without faulting the first page.
    let mut buf = [0u8; 16];
    assert!(m
        .mm
        .read(page(a, 2).checked_sub(8).unwrap(), &mut buf)
        .is_err());
    let after = m.mm.stats().since(&before);
    assert_eq!(after.faults.total(), 0);
    assert_eq!(m.phys.nr_in_use(), 0);
    let n = m.map(1, Prot::NONE, MapFlags::PRIVATE);
    assert!(matches!(
        m.mm.read_val::<u8>(n),
        Err(FaultError::Segv {
            cause: SegvCause::AccErr,
            ..
        })
    ));
}

#[test]
fn munmap_raises_unmap_frees_frames_and_splits_vmas() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    for i in 0..8 {
        m.mm.write_val(page(a, i), i).unwrap();
    }
    assert_eq!(m.phys.nr_in_use(), 8);
    let before = m.mm.stats();
    m.mm.munmap(page(a, 2), 3 * PAGE_SIZE).unwrap();
    assert_eq!(
        m.events(),
        [(
            NotifierEvent::Unmap,
            page(a, 2).as_u64(),
            page(a, 5).as_u64()
        )]
    );
    let d = m.mm.stats().since(&before);
    assert_eq!(d.notifier.of(NotifierEvent::Unmap), 1);
    assert_eq!((d.tlb_flush_ops, d.tlb_flush_pages), (1, 3));
    assert_eq!(d.frames_freed, 3);
    assert_eq!(m.phys.nr_in_use(), 5);
    let vmas = m.mm.vmas();
    assert_eq!(vmas.len(), 2);
    assert_eq!(vmas[0].range().npages() + vmas[1].range().npages(), 5);
    assert!(m.mm.read_val::<u64>(page(a, 3)).is_err());
    for i in [0, 1, 5, 6, 7] {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), i);
    }
    // Unmapping a hole is fine and tells nobody.
    m.mm.munmap(page(a, 3), PAGE_SIZE).unwrap();
    assert!(m.events().is_empty());
    m.mm.munmap(a, 8 * PAGE_SIZE).unwrap();
    assert_eq!(m.phys.nr_in_use(), 0);
    assert!(m.mm.vmas().is_empty());
    let w = m.mm.stats().walk;
    assert_eq!(
        (w.nr_pte_tables, w.nr_pmd_tables, w.nr_pud_tables),
        (0, 0, 0)
    );
}

#[test]
fn mprotect_raises_protection_vma_and_restricts_access() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    m.mm.write_val(page(a, 1), 42u64).unwrap();
    let before = m.mm.stats();
    m.mm.mprotect(page(a, 1), 2 * PAGE_SIZE, Prot::READ)
        .unwrap();
    let ev = m.rec.take();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event, NotifierEvent::ProtectionVma);
    assert_eq!(ev[0].owner, None);
    assert!(ev[0].is_blockable());
    let vma = ev[0].vma.expect("range carries the VMA");
    assert_eq!(vma.range.start(), page(a, 1));
    assert_eq!(vma.flags.prot(), Prot::READ);
    let d = m.mm.stats().since(&before);
    assert_eq!((d.tlb_flush_ops, d.tlb_flush_pages), (1, 1));
    assert_eq!(m.mm.vmas().len(), 3);
    assert!(m.mm.write_val(page(a, 1), 1u64).is_err());
    assert_eq!(m.mm.read_val::<u64>(page(a, 1)).unwrap(), 42);
    // Restoring write merges the VMAs back; the page is anon-exclusive, so the PTE becomes
    // writable again without a fault.
    m.mm.mprotect(a, 4 * PAGE_SIZE, RW).unwrap();
    assert_eq!(m.mm.vmas().len(), 1);
    let before = m.mm.stats();
    m.mm.write_val(page(a, 1), 43u64).unwrap();
    assert_eq!(m.mm.stats().since(&before).faults.total(), 0);
    // PROT_NONE keeps the data, denies every access.
    m.mm.mprotect(a, 4 * PAGE_SIZE, Prot::NONE).unwrap();
    assert!(m.mm.read_val::<u64>(page(a, 1)).is_err());
    m.mm.mprotect(a, 4 * PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(m.mm.read_val::<u64>(page(a, 1)).unwrap(), 43);
    m.mm.audit().unwrap();
}

#[test]
fn mprotect_of_an_unpopulated_vma_tells_nobody() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    m.mm.mprotect(a, 4 * PAGE_SIZE, Prot::READ).unwrap();
    assert!(m.events().is_empty());
    assert_eq!(m.mm.vmas()[0].prot(), Prot::READ);
}

#[test]
fn madvise_dontneed_raises_clear_and_zeroes_private_memory() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    for i in 0..4 {
        m.mm.write_val(page(a, i), 0x1111 * (i + 1)).unwrap();
    }
    m.mm.madvise(page(a, 1), 2 * PAGE_SIZE, Advice::DontNeed)
        .unwrap();
    assert_eq!(
        m.events(),
        [(
            NotifierEvent::Clear,
            page(a, 1).as_u64(),
            page(a, 3).as_u64()
        )]
    );
    assert_eq!(m.mm.read_val::<u64>(page(a, 1)).unwrap(), 0);
    assert_eq!(m.mm.read_val::<u64>(page(a, 3)).unwrap(), 0x4444);
    assert_eq!(m.phys.nr_in_use(), 2);
    assert_eq!(m.mm.vmas().len(), 1);
}

#[test]
fn shared_anonymous_memory_keeps_data_across_dontneed() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::SHARED);
    assert_eq!(m.mm.vmas()[0].kind(), VmaKind::AnonShared);
    // A read fault on shared memory allocates the page in the object (no zero page).
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0);
    m.mm.write_val(a, 99u64).unwrap();
    let s = m.mm.stats();
    assert_eq!(s.faults.shared, 1);
    assert_eq!(s.faults.anon_read_zero, 0);
    m.mm.madvise(a, PAGE_SIZE, Advice::DontNeed).unwrap();
    assert_eq!(m.phys.nr_in_use(), 1, "the object keeps the page");
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 99);
    assert_eq!(m.mm.audit().unwrap().frames_referenced, 1);
    // Read-only then writable again: the write upgrades in place, no copy.
    m.mm.mprotect(a, PAGE_SIZE, Prot::READ).unwrap();
    m.mm.mprotect(a, PAGE_SIZE, RW).unwrap();
    m.mm.write_val(a, 100u64).unwrap();
    assert_eq!(m.mm.stats().faults.cow, 0);
    m.mm.munmap(a, 2 * PAGE_SIZE).unwrap();
    assert_eq!(m.phys.nr_in_use(), 0);
}

#[test]
fn fixed_mappings_replace_or_refuse() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    m.mm.write_val(page(a, 1), 5u8).unwrap();
    let err =
        m.mm.mmap(
            Some(page(a, 1)),
            PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    let b =
        m.mm.mmap(
            Some(page(a, 1)),
            PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        )
        .unwrap();
    assert_eq!(b, page(a, 1));
    assert_eq!(
        m.events(),
        [(NotifierEvent::Unmap, b.as_u64(), b.as_u64() + PAGE_SIZE)]
    );
    assert_eq!(m.mm.read_val::<u8>(b).unwrap(), 0);
    assert_eq!(m.phys.nr_in_use(), 0);
    // The new mapping merged with its identical neighbours.
    assert_eq!(m.mm.vmas().len(), 1);
}

#[test]
fn large_mappings_are_pmd_aligned_and_hints_are_honoured() {
    let m = Machine::new(16);
    let big = m.mm.mmap(None, 4 << 20, RW, MapFlags::PRIVATE).unwrap();
    assert!(big.is_aligned(2 << 20));
    let hint = VirtAddr::new(0x1000_0000);
    let h =
        m.mm.mmap(Some(hint), PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    assert_eq!(h, hint);
    let again =
        m.mm.mmap(Some(hint), PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    assert_ne!(again, hint);
}

#[test]
fn dropping_the_mm_releases_notifiers_and_every_frame() {
    let m = Machine::new(16);
    let a = m.map(16, RW, MapFlags::PRIVATE);
    let s = m.map(2, RW, MapFlags::SHARED);
    for i in 0..16 {
        m.mm.write_val(page(a, i), i).unwrap();
    }
    m.mm.write_val(s, 1u8).unwrap();
    let id = m.mm.id();
    let phys = m.phys.clone();
    let rec = m.rec.clone();
    assert_eq!(phys.nr_in_use(), 17);
    drop(m);
    assert_eq!(phys.nr_in_use(), 0);
    assert_eq!(rec.releases(), [id]);
}

#[test]
fn address_arithmetic_typed_slices_and_readable_counters() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    // Arithmetic that reads like the C: `a + 2 * PAGE_SIZE`, `end - start`.
    let b = a + 2 * PAGE_SIZE;
    assert_eq!(b, page(a, 2));
    assert_eq!(b - a, 2 * PAGE_SIZE);
    assert_eq!(b - PAGE_SIZE, page(a, 1));
    let mut c = a;
    c += PAGE_SIZE;
    assert_eq!(c, page(a, 1));
    assert!(std::panic::catch_unwind(|| VirtAddr::new(hmm::addr::USER_VA_END) + 1).is_err());
    assert!(std::panic::catch_unwind(|| a - b).is_err());

    // Typed bulk access across a page boundary, all or nothing.
    let vals: Vec<u32> = (0..1500).collect();
    m.mm.write_slice(a + 100, &vals).unwrap();
    let mut back = vec![0u32; vals.len()];
    m.mm.read_slice(a + 100, &mut back).unwrap();
    assert_eq!(back, vals);
    assert_eq!(m.mm.read_val::<u32>(a + 100 + 4 * 1499).unwrap(), 1499);
    let past = a + 4 * PAGE_SIZE - 8;
    assert!(m.mm.write_slice(past, &[1u64, 2]).is_err());
    assert_eq!(m.mm.read_val::<u64>(past).unwrap(), 0, "nothing written");

    // The counters print as lines a person can read.
    let text = m.mm.stats().to_string();
    assert!(text.contains("faults: 2 anonymous write"), "{text}");
    assert!(text.lines().all(|l| !l.contains(" 0 ")), "{text}");
}
