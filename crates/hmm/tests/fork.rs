//! `fork` and exit: copy-on-write across chains of forks, shared memory staying shared,
//! pinned pages copied eagerly, the PROTECTION_PAGE event, the reverse map, and every frame
//! returned when the last address space exits.

mod common;

use std::sync::Arc;

use common::{page, Machine, RW};
use hmm::addr::PAGE_SIZE;
use hmm::mm::{
    folio_mappings, Advice, FaultError, GupFlags, MapFlags, Mm, MmError, Prot, SegvCause,
};
use hmm::notifier::{NotifierEvent, Recorder};
use hmm::pgtable::Huge;

#[test]
fn fork_shares_private_pages_copy_on_write() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    for i in 0..4 {
        m.mm.write_val(page(a, i), 100 + i).unwrap();
    }
    m.mm.read_val::<u64>(page(a, 5)).unwrap(); // zero page
    m.events();
    let before = m.mm.stats();
    let child = m.mm.fork().unwrap();
    // One PROTECTION_PAGE over the VMA in the parent, one flush for the write-protects.
    assert_eq!(
        m.events(),
        [(
            NotifierEvent::ProtectionPage,
            a.as_u64(),
            a.as_u64() + 8 * PAGE_SIZE
        )]
    );
    let s = m.mm.stats().since(&before);
    assert_eq!((s.tlb_flush_ops, s.tlb_flush_pages), (1, 4));
    assert_eq!(m.phys.nr_in_use(), 4, "no page copied");
    m.mm.audit().unwrap();
    child.audit().unwrap();
    // Both see the same bytes; the reverse map finds both mappings.
    for i in 0..4 {
        assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), 100 + i);
    }
    let pfn = m.mm.pagemap(a, 1).unwrap()[0].pfn.unwrap();
    let maps = folio_mappings(&m.phys, hmm::addr::Pfn::new(pfn));
    assert_eq!(maps.len(), 2);
    assert!(maps.iter().all(|e| e.addr == a && e.level == Huge::Pte));
    // A write in the child copies; the parent keeps its value.
    child.write_val(a, 7u64).unwrap();
    assert_eq!(child.stats().faults.cow, 1);
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 100);
    assert_eq!(child.read_val::<u64>(a).unwrap(), 7);
    assert_eq!(folio_mappings(&m.phys, hmm::addr::Pfn::new(pfn)).len(), 1);
    // The parent's page is now mapped once: its write reuses it without copying.
    m.mm.write_val(a, 8u64).unwrap();
    let s = m.mm.stats();
    assert_eq!((s.faults.cow, s.faults.wp_reuse), (0, 1));
    assert_eq!(m.phys.nr_in_use(), 5);
    m.mm.audit().unwrap();
    child.audit().unwrap();
    drop(child);
    assert_eq!(m.phys.nr_in_use(), 4);
    m.mm.audit().unwrap();
}

#[test]
fn cow_holds_across_a_chain_of_forks() {
    let m = Machine::new(32);
    let a = m.map(16, RW, MapFlags::PRIVATE);
    for i in 0..16 {
        m.mm.write_val(page(a, i), i).unwrap();
    }
    // parent -> c1 -> c2 -> c3, each writing its own page index.
    let mut gens: Vec<Arc<Mm>> = vec![m.mm.clone()];
    for g in 1..4u64 {
        let child = gens.last().unwrap().fork().unwrap();
        child.write_val(page(a, g), 1000 * g).unwrap();
        gens.push(child);
    }
    for (g, mm) in gens.iter().enumerate() {
        let g = g as u64;
        for i in 0..16 {
            // Generation g sees its own write, those of its ancestors, and none after.
            let want = if (1..=g).contains(&i) { 1000 * i } else { i };
            assert_eq!(
                mm.read_val::<u64>(page(a, i)).unwrap(),
                want,
                "gen {g} page {i}"
            );
        }
        mm.audit().unwrap();
    }
    // Page 0 was never written after fork: one frame, four mappings.
    let pfn = m.mm.pagemap(a, 1).unwrap()[0].pfn.unwrap();
    assert_eq!(folio_mappings(&m.phys, hmm::addr::Pfn::new(pfn)).len(), 4);
    assert!(gens
        .iter()
        .all(|mm| mm.pagemap(a, 1).unwrap()[0].pfn == Some(pfn)));
    // 16 shared pages + 3 copies.
    assert_eq!(m.phys.nr_in_use(), 19);
    // Exiting in the middle of the chain keeps the others intact.
    let c2 = gens.remove(2);
    drop(c2);
    for mm in &gens {
        mm.audit().unwrap();
    }
    assert_eq!(gens[2].read_val::<u64>(page(a, 3)).unwrap(), 3000);
    drop(gens);
    let Machine { phys, mm, rec, .. } = m;
    drop(mm);
    assert_eq!(rec.releases().len(), 1);
    assert_eq!(phys.nr_in_use(), 0, "every frame returned after exit");
}

#[test]
fn shared_memory_stays_shared_and_is_not_copied() {
    let m = Machine::new(16);
    let s = m.map(4, RW, MapFlags::SHARED);
    m.mm.write_val(s, 1u32).unwrap();
    m.events();
    let child = m.mm.fork().unwrap();
    assert!(m.events().is_empty(), "no write-protect of shared memory");
    child.write_val(page(s, 1), 2u32).unwrap();
    assert_eq!(m.mm.read_val::<u32>(page(s, 1)).unwrap(), 2);
    m.mm.write_val(s, 3u32).unwrap();
    assert_eq!(child.read_val::<u32>(s).unwrap(), 3);
    let c = child.stats();
    assert_eq!((c.faults.cow, c.faults.shared), (0, 2));
    m.mm.audit().unwrap();
    child.audit().unwrap();
    drop(child);
    m.mm.audit().unwrap();
}

#[test]
fn pinned_exclusive_pages_are_copied_at_fork() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 5u64).unwrap();
    m.mm.write_val(page(a, 1), 6u64).unwrap();
    let pin = m.mm.pin_user_pages(a, 1, GupFlags::WRITE).unwrap();
    let child = m.mm.fork().unwrap();
    assert_eq!(
        child.stats().frames_allocated,
        1,
        "the pinned page was copied"
    );
    // The parent's pinned page stays writable and exclusive: a write does not fault.
    let before = m.mm.stats();
    m.mm.write_val(a, 9u64).unwrap();
    assert_eq!(m.mm.stats().since(&before).faults.total(), 0);
    let mut b = [0u8; 8];
    pin.read(0, 0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 9, "the pin sees the parent's writes");
    assert_eq!(child.read_val::<u64>(a).unwrap(), 5);
    // The unpinned page is shared as usual.
    assert_eq!(
        child.pagemap(page(a, 1), 1).unwrap()[0].pfn,
        m.mm.pagemap(page(a, 1), 1).unwrap()[0].pfn
    );
    m.mm.audit().unwrap();
    child.audit().unwrap();
    drop(pin);
    m.mm.audit().unwrap();
}

#[test]
fn fork_of_a_read_only_mapping_needs_no_invalidation() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 1u8).unwrap();
    m.mm.mprotect(a, 2 * PAGE_SIZE, Prot::READ).unwrap();
    m.events();
    let child = m.mm.fork().unwrap();
    // Still a COW mapping (MAYWRITE): PROTECTION_PAGE even though nothing is writable.
    assert_eq!(m.events().len(), 1);
    assert_eq!(m.mm.stats().tlb_flush_ops, 1, "only mprotect flushed");
    assert_eq!(child.read_val::<u8>(a).unwrap(), 1);
    child.audit().unwrap();
}

#[test]
fn exit_releases_notifiers_and_frames() {
    let m = Machine::new(16);
    let a = m.map(64, RW, MapFlags::PRIVATE);
    let s = m.map(8, RW, MapFlags::SHARED);
    for i in 0..64 {
        m.mm.write_val(page(a, i), i).unwrap();
    }
    m.mm.write_val(s, 1u8).unwrap();
    let child = m.mm.fork().unwrap();
    let crec = Arc::new(Recorder::new());
    let _h = child.register_notifier(crec.clone()).unwrap();
    child.write_val(page(a, 3), 0u8).unwrap();
    let phys = m.phys.clone();
    let in_use = phys.nr_in_use();
    drop(child);
    assert_eq!(
        crec.releases().len(),
        1,
        "release() to the full-mm notifier"
    );
    assert_eq!(phys.nr_in_use(), in_use - 1, "the child's copy is freed");
    drop(m);
    assert_eq!(phys.nr_in_use(), 0);
}

#[test]
fn dontfork_leaves_the_range_out_of_the_child_and_the_parent_unprotected() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    for i in 0..8 {
        m.mm.write_val(page(a, i), 100 + i).unwrap();
    }
    // The middle of the VMA: it splits in three.
    m.mm.madvise(page(a, 2), 4 * PAGE_SIZE, Advice::DontFork)
        .unwrap();
    m.events();
    let child = m.mm.fork().unwrap();
    // Only the copied VMAs are write-protected: one PROTECTION_PAGE each.
    assert_eq!(
        m.events(),
        [
            (
                NotifierEvent::ProtectionPage,
                a.as_u64(),
                page(a, 2).as_u64()
            ),
            (
                NotifierEvent::ProtectionPage,
                page(a, 6).as_u64(),
                page(a, 8).as_u64()
            ),
        ]
    );
    for i in 0..8 {
        let got = child.read_val::<u64>(page(a, i));
        if (2..6).contains(&i) {
            assert!(
                matches!(
                    got,
                    Err(FaultError::Segv {
                        cause: SegvCause::MapErr,
                        ..
                    })
                ),
                "page {i} is not the child's: {got:?}"
            );
        } else {
            assert_eq!(got.unwrap(), 100 + i);
        }
    }
    // The parent's pages there stayed writable: a store faults not at all.
    let before = m.mm.stats();
    for i in 2..6 {
        m.mm.write_val(page(a, i), 200 + i).unwrap();
    }
    let s = m.mm.stats().since(&before);
    assert_eq!(
        (s.faults.cow, s.faults.wp_reuse, s.tlb_flush_ops),
        (0, 0, 0)
    );
    m.mm.audit().unwrap();
    child.audit().unwrap();
    drop(child);
    // DOFORK undoes it; the VMA is one again.
    m.mm.madvise(page(a, 2), 4 * PAGE_SIZE, Advice::DoFork)
        .unwrap();
    assert_eq!(m.mm.vmas().len(), 1);
    let child = m.mm.fork().unwrap();
    assert_eq!(child.read_val::<u64>(page(a, 3)).unwrap(), 203);
    // A hole in the range is ENOMEM and changes nothing, an unaligned start EINVAL.
    assert!(matches!(
        m.mm.madvise(page(a, 6), 4 * PAGE_SIZE, Advice::DontFork),
        Err(MmError::NoMem { .. })
    ));
    assert!(matches!(
        m.mm.madvise(
            page(a, 0).checked_add(1).unwrap(),
            PAGE_SIZE,
            Advice::DontFork
        ),
        Err(MmError::Inval { .. })
    ));
    assert_eq!(m.mm.vmas().len(), 1);
}

/// The pfn mapped at `a` in `mm`.
fn pfn_at(mm: &Mm, a: hmm::addr::VirtAddr) -> hmm::addr::Pfn {
    hmm::addr::Pfn::new(mm.pagemap(a, 1).unwrap()[0].pfn.unwrap())
}

#[test]
fn a_walk_visits_the_address_spaces_that_can_map_the_folio_and_no_other() {
    // A root and three children; the second child forks a grandchild.
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 1u64).unwrap();
    let kids: Vec<Arc<Mm>> = (0..3).map(|_| m.mm.fork().unwrap()).collect();
    let grandchild = kids[1].fork().unwrap();
    let family: Vec<&Arc<Mm>> = std::iter::once(&m.mm)
        .chain(&kids)
        .chain(std::iter::once(&grandchild))
        .collect();
    let visits = || -> Vec<u64> { family.iter().map(|mm| mm.stats().rmap_visits).collect() };

    // The root's page from before the forks: every member can map it.
    let before = visits();
    assert_eq!(folio_mappings(&m.phys, pfn_at(&m.mm, a)).len(), 5);
    let after = visits();
    assert!(
        after.iter().zip(&before).all(|(x, y)| x - y == 1),
        "{after:?}"
    );

    // A page the second child faulted in after the fork: itself and its grandchild only.
    let b = page(a, 1);
    kids[1].write_val(b, 2u64).unwrap();
    let g2 = kids[1].fork().unwrap(); // one more descendant, after the fault
    let before = visits();
    let (b0, g2_before) = (before.clone(), g2.stats().rmap_visits);
    assert_eq!(folio_mappings(&m.phys, pfn_at(&kids[1], b)).len(), 2);
    let d: Vec<u64> = visits().iter().zip(&b0).map(|(x, y)| x - y).collect();
    assert_eq!(d, vec![0, 0, 1, 0, 1], "root, kids 0..3, grandchild");
    assert_eq!(g2.stats().rmap_visits - g2_before, 1);
}

#[test]
fn pages_of_an_exited_parent_keep_their_reverse_map_in_the_child() {
    let m = Machine::new(16);
    let a = m.map(1, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 0x5eed_u64).unwrap();
    let child = m.mm.fork().unwrap();
    let pfn = pfn_at(&child, a);
    let Machine { phys, mm, .. } = m;
    drop(mm); // the parent exits; the page stays mapped in the child
    assert_eq!(phys.nr_in_use(), 1);
    let maps = folio_mappings(&phys, pfn);
    assert_eq!(maps.len(), 1, "the child's mapping is still found");
    // The child's write reuses the page it now maps alone, and a migration (which must
    // find the mapping through the reverse map to put it back) keeps its bytes.
    child.write_val(a, 0xfeed_u64).unwrap();
    assert_eq!(child.stats().faults.wp_reuse, 1);
    child.audit().unwrap();
    assert_eq!(child.read_val::<u64>(a).unwrap(), 0xfeed);
}
