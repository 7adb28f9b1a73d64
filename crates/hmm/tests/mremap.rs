//! `mremap`: shrink, grow in place, move (MAYMOVE, FIXED, DONTUNMAP), partial ranges,
//! THP leaves, shared memory, the UNMAP events, and bad input.

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{folio_mappings, Advice, MapFlags, MmError, MremapFlags, Prot};
use hmm::notifier::NotifierEvent;

const NR: u64 = PMD_SIZE / PAGE_SIZE;

fn fill(m: &Machine, a: VirtAddr, pages: u64) {
    for i in 0..pages {
        m.mm.write_val(page(a, i), 0xa000 + i).unwrap();
    }
}

fn check(m: &Machine, a: VirtAddr, pages: impl Iterator<Item = (u64, u64)>) {
    for (at, was) in pages {
        assert_eq!(
            m.mm.read_val::<u64>(page(a, at)).unwrap(),
            0xa000 + was,
            "page {at}"
        );
    }
}

#[test]
fn shrink_unmaps_the_tail_and_grow_extends_in_place() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    fill(&m, a, 8);
    m.events();
    let r =
        m.mm.mremap(a, 8 * PAGE_SIZE, 4 * PAGE_SIZE, MremapFlags::empty(), None)
            .unwrap();
    assert_eq!(r, a);
    assert_eq!(
        m.events(),
        [(
            NotifierEvent::Unmap,
            page(a, 4).as_u64(),
            page(a, 8).as_u64()
        )]
    );
    assert_eq!(m.phys.nr_in_use(), 4);
    let r =
        m.mm.mremap(a, 4 * PAGE_SIZE, 8 * PAGE_SIZE, MremapFlags::empty(), None)
            .unwrap();
    assert_eq!(r, a);
    assert!(m.events().is_empty());
    check(&m, a, (0..4).map(|i| (i, i)));
    assert_eq!(m.mm.read_val::<u64>(page(a, 6)).unwrap(), 0);
    assert_eq!(m.mm.vmas().len(), 1);
    m.mm.audit().unwrap();
}

#[test]
fn grow_without_room_needs_maymove_and_then_moves_every_entry() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    // Block growth with a mapping right after.
    m.mm.mmap(
        Some(page(a, 4)),
        PAGE_SIZE,
        Prot::READ,
        MapFlags::PRIVATE | MapFlags::FIXED,
    )
    .unwrap();
    fill(&m, a, 3);
    // PROT_NONE entries move too.
    m.mm.mprotect(a, 4 * PAGE_SIZE, Prot::NONE).unwrap();
    let r =
        m.mm.mremap(a, 4 * PAGE_SIZE, 8 * PAGE_SIZE, MremapFlags::empty(), None);
    assert!(matches!(r, Err(MmError::NoMem { .. })), "{r:?}");
    // A range across two VMAs is EFAULT.
    let r =
        m.mm.mremap(a, 5 * PAGE_SIZE, 8 * PAGE_SIZE, MremapFlags::MAYMOVE, None);
    assert_eq!(r, Err(MmError::Fault { addr: a }));
    let before = m.mm.pagemap(a, 4).unwrap();
    m.events();
    let n =
        m.mm.mremap(a, 4 * PAGE_SIZE, 8 * PAGE_SIZE, MremapFlags::MAYMOVE, None)
            .unwrap();
    assert_ne!(n, a);
    // UNMAP of the old range while moving, and again when unmapping it.
    let ev = m.events();
    assert_eq!(ev.len(), 2);
    assert!(ev
        .iter()
        .all(|e| *e == (NotifierEvent::Unmap, a.as_u64(), page(a, 4).as_u64())));
    assert!(m.mm.read_val::<u8>(a).is_err());
    // Same frames, now soft-dirty, at the new place; no copy.
    let after = m.mm.pagemap(n, 4).unwrap();
    for i in 0..4 {
        assert_eq!(after[i].pfn, before[i].pfn, "page {i}");
        assert!(after[i].soft_dirty);
    }
    m.mm.mprotect(n, 8 * PAGE_SIZE, RW).unwrap();
    check(&m, n, (0..3).map(|i| (i, i)));
    assert_eq!(m.mm.stats().faults.cow, 0);
    // The reverse map finds the moved pages at their new address.
    let pfn = hmm::addr::Pfn::new(after[0].pfn.unwrap());
    assert_eq!(folio_mappings(&m.phys, pfn)[0].addr, n);
    m.mm.audit().unwrap();
}

#[test]
fn fixed_move_of_part_of_a_vma_replaces_the_target() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let b = m.map(4, RW, MapFlags::PRIVATE);
    fill(&m, a, 8);
    m.mm.write_val(b, 1u8).unwrap();
    // Move pages 2..6 of `a` onto `b`, shrinking to 3 pages (page 5 is unmapped).
    let n =
        m.mm.mremap(
            page(a, 2),
            4 * PAGE_SIZE,
            3 * PAGE_SIZE,
            MremapFlags::MAYMOVE | MremapFlags::FIXED,
            Some(b),
        )
        .unwrap();
    assert_eq!(n, b);
    check(&m, b, (0..3).map(|i| (i, i + 2)));
    assert_eq!(
        m.mm.read_val::<u64>(page(b, 3)).unwrap(),
        0,
        "rest of b still mapped"
    );
    check(&m, a, [(0, 0), (1, 1), (6, 6), (7, 7)].into_iter());
    assert!(m.mm.read_val::<u8>(page(a, 3)).is_err());
    assert_eq!(m.phys.nr_in_use(), 7);
    m.mm.audit().unwrap();
}

#[test]
fn dontunmap_leaves_the_old_vma_empty() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    fill(&m, a, 2);
    let n =
        m.mm.mremap(
            a,
            2 * PAGE_SIZE,
            2 * PAGE_SIZE,
            MremapFlags::MAYMOVE | MremapFlags::DONTUNMAP,
            None,
        )
        .unwrap();
    check(&m, n, (0..2).map(|i| (i, i)));
    assert_eq!(
        m.mm.read_val::<u64>(a).unwrap(),
        0,
        "old VMA still mapped, empty"
    );
    assert_eq!(m.mm.vmas().len(), 2);
    m.mm.audit().unwrap();
}

#[test]
fn thp_leaves_move_whole_when_aligned_and_split_otherwise() {
    let m = Machine::new(64);
    let a = m.map(2 * NR, RW, MapFlags::PRIVATE);
    m.mm.madvise(a, 2 * PMD_SIZE, Advice::HugePage).unwrap();
    fill(&m, a, 2 * NR);
    let n =
        m.mm.mremap(a, 2 * PMD_SIZE, 2 * PMD_SIZE, MremapFlags::MAYMOVE, None)
            .unwrap();
    assert!(n.is_aligned(PMD_SIZE));
    assert_eq!(m.mm.stats().thp_split_pmd, 0);
    assert!(m
        .mm
        .pagemap(n, 2 * NR)
        .unwrap()
        .iter()
        .all(|e| e.order == 9));
    check(&m, n, (0..2 * NR).map(|i| (i, i)));
    m.mm.audit().unwrap();
    // Moving half a leaf, or to a misaligned place, splits.
    let dst = m.map(NR + 1, RW, MapFlags::PRIVATE);
    let dst = page(dst, 1);
    m.mm.mremap(
        n,
        PMD_SIZE,
        PMD_SIZE,
        MremapFlags::MAYMOVE | MremapFlags::FIXED,
        Some(dst),
    )
    .unwrap();
    assert_eq!(m.mm.stats().thp_split_pmd, 1);
    check(&m, dst, (0..NR).map(|i| (i, i)));
    let half = m.map(NR / 2, RW, MapFlags::PRIVATE);
    m.mm.mremap(
        page(n, NR),
        PMD_SIZE / 2,
        PMD_SIZE / 2,
        MremapFlags::MAYMOVE | MremapFlags::FIXED,
        Some(half),
    )
    .unwrap();
    assert_eq!(m.mm.stats().thp_split_pmd, 2);
    check(&m, half, (0..NR / 2).map(|i| (i, NR + i)));
    check(
        &m,
        page(n, NR + NR / 2),
        (0..NR / 2).map(|i| (i, NR + NR / 2 + i)),
    );
    m.mm.audit().unwrap();
}

#[test]
fn shared_memory_moves_and_stays_shared() {
    let m = Machine::new(16);
    let s = m.map(2, RW, MapFlags::SHARED);
    m.mm.write_val(s, 5u64).unwrap();
    let child = m.mm.fork().unwrap();
    let n =
        m.mm.mremap(
            s,
            2 * PAGE_SIZE,
            4 * PAGE_SIZE,
            MremapFlags::MAYMOVE,
            Some(s),
        )
        .unwrap();
    m.mm.write_val(n, 6u64).unwrap();
    assert_eq!(child.read_val::<u64>(s).unwrap(), 6);
    // The object keeps the size it was created with: past it is SIGBUS, as in Linux.
    assert_eq!(
        m.mm.write_val(page(n, 3), 7u64),
        Err(hmm::mm::FaultError::Bus { addr: page(n, 3) })
    );
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn mremap_bad_input_changes_nothing() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let b = m.map(4, RW, MapFlags::PRIVATE);
    fill(&m, a, 4);
    fill(&m, b, 4);
    let p = PAGE_SIZE;
    let mm = &m.mm;
    let f = MremapFlags::MAYMOVE | MremapFlags::FIXED;
    let cases: Vec<(Result<VirtAddr, MmError>, i32)> = vec![
        (
            mm.mremap(a.checked_add(1).unwrap(), p, p, MremapFlags::MAYMOVE, None),
            libc::EINVAL,
        ),
        (mm.mremap(a, p, 0, MremapFlags::MAYMOVE, None), libc::EINVAL),
        (mm.mremap(a, 0, p, MremapFlags::MAYMOVE, None), libc::EINVAL),
        (
            mm.mremap(a, p, p, MremapFlags::FIXED, Some(b)),
            libc::EINVAL,
        ),
        (
            mm.mremap(a, p, p, MremapFlags::DONTUNMAP, None),
            libc::EINVAL,
        ),
        (
            mm.mremap(
                a,
                p,
                2 * p,
                MremapFlags::MAYMOVE | MremapFlags::DONTUNMAP,
                None,
            ),
            libc::EINVAL,
        ),
        (mm.mremap(a, p, p, f, None), libc::EINVAL),
        (
            mm.mremap(a, 2 * p, 2 * p, f, Some(page(a, 1))),
            libc::EINVAL,
        ),
        (
            mm.mremap(a, p, p, f, Some(b.checked_add(8).unwrap())),
            libc::EINVAL,
        ),
        (
            mm.mremap(a, p, p, f, Some(VirtAddr::new(0x1000))),
            libc::EPERM,
        ),
        (
            mm.mremap(a, 5 * p, 6 * p, MremapFlags::MAYMOVE, None),
            libc::EFAULT,
        ),
        // A move must begin inside a VMA (one that begins inside and runs on into a
        // hole moves its part, since Linux 6.17).
        (
            mm.mremap(page(a, 4), 2 * p, 2 * p, f, Some(b)),
            libc::EFAULT,
        ),
        (
            mm.mremap(a, u64::MAX, p, MremapFlags::MAYMOVE, None),
            libc::EINVAL,
        ),
    ];
    for (i, (r, errno)) in cases.into_iter().enumerate() {
        assert_eq!(r.map_err(|e| e.errno()), Err(errno), "case {i}");
    }
    check(&m, a, (0..4).map(|i| (i, i)));
    check(&m, b, (0..4).map(|i| (i, i)));
    m.mm.audit().unwrap();
}

/// The kernel's `mremap_test.c` shrinks over holes: a shrink unmaps its tail as `munmap`
/// does, whatever the tail covers, and only what is kept of a range that moves must lie in
/// the VMA at the old address (`vma_to_resize`).
#[test]
fn a_shrink_unmaps_a_tail_with_holes_and_other_vmas() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    fill(&m, a, 8);
    m.mm.munmap(page(a, 5), PAGE_SIZE).unwrap();
    m.mm.mprotect(page(a, 7), PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(m.mm.vmas().len(), 3);
    m.events();
    let r =
        m.mm.mremap(a, 8 * PAGE_SIZE, 2 * PAGE_SIZE, MremapFlags::empty(), None)
            .unwrap();
    assert_eq!(r, a);
    assert_eq!(m.mm.vmas().len(), 1);
    assert_eq!(m.mm.vmas()[0].range().len_bytes(), 2 * PAGE_SIZE);
    assert!(m.events().iter().all(|e| e.0 == NotifierEvent::Unmap));
    check(&m, a, (0..2).map(|i| (i, i)));
    for i in 2..8 {
        assert!(m.mm.read_val::<u8>(page(a, i)).is_err(), "page {i}");
    }
    assert_eq!(m.phys.nr_in_use(), 2);
    // A range the same length needs nothing mapped after its first page.
    assert_eq!(
        m.mm.mremap(a, 8 * PAGE_SIZE, 8 * PAGE_SIZE, MremapFlags::empty(), None),
        Ok(a)
    );
    // Nothing mapped at the old address is EFAULT, even for a shrink.
    let hole = page(a, 4);
    assert_eq!(
        m.mm.mremap(hole, 2 * PAGE_SIZE, PAGE_SIZE, MremapFlags::empty(), None),
        Err(MmError::Fault { addr: hole })
    );
    m.mm.audit().unwrap();
}

#[test]
fn a_fixed_move_needs_only_the_kept_part_inside_one_vma() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let b = m.map(8, RW, MapFlags::PRIVATE);
    fill(&m, a, 8);
    m.mm.write_val(b, 7u8).unwrap();
    m.mm.munmap(page(a, 4), PAGE_SIZE).unwrap();
    let fixed = MremapFlags::MAYMOVE | MremapFlags::FIXED;
    // Keeping pages 0..5 crosses the hole: EFAULT, and the target is still mapped.
    assert_eq!(
        m.mm.mremap(a, 8 * PAGE_SIZE, 5 * PAGE_SIZE, fixed, Some(b)),
        Err(MmError::Fault { addr: a })
    );
    assert_eq!(m.mm.read_val::<u8>(b).unwrap(), 7);
    // So does growing a range with a hole in it.
    assert_eq!(
        m.mm.mremap(a, 8 * PAGE_SIZE, 9 * PAGE_SIZE, MremapFlags::MAYMOVE, None),
        Err(MmError::Fault { addr: a })
    );
    // Keeping pages 0..3 moves them; the rest, hole and all, is unmapped.
    let n =
        m.mm.mremap(a, 8 * PAGE_SIZE, 3 * PAGE_SIZE, fixed, Some(b))
            .unwrap();
    assert_eq!(n, b);
    check(&m, b, (0..3).map(|i| (i, i)));
    for i in 0..8 {
        assert!(m.mm.read_val::<u8>(page(a, i)).is_err(), "page {i}");
    }
    assert_eq!(m.phys.nr_in_use(), 3);
    m.mm.audit().unwrap();
}

/// `copy_vma`: a moved anonymous VMA that never had a page takes the offset of its new
/// place and merges with its neighbour there; one that had a page (even one since
/// dropped) keeps its offset, which its pages' reverse-map indexes use, and stays apart.
#[test]
fn a_never_faulted_anonymous_vma_is_rebased_when_moved_and_merges() {
    let move_next_to = |touch: fn(&Machine, VirtAddr)| {
        let m = Machine::new(16);
        let r = m.map(12, RW, MapFlags::PRIVATE);
        m.mm.munmap(page(r, 4), 8 * PAGE_SIZE).unwrap();
        let b = m.map(4, RW, MapFlags::PRIVATE);
        assert_ne!(b, page(r, 4), "b starts apart from a");
        touch(&m, b);
        let flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
        let to =
            m.mm.mremap(b, 4 * PAGE_SIZE, 4 * PAGE_SIZE, flags, Some(page(r, 4)))
                .unwrap();
        assert_eq!(to, page(r, 4));
        m.mm.audit().unwrap();
        let vmas: Vec<_> = m.mm.vmas().iter().map(|v| v.range()).collect();
        (m, r, vmas)
    };
    // Never faulted: one VMA of 8 pages.
    let (_, r, vmas) = move_next_to(|_, _| {});
    assert_eq!(vmas.len(), 1, "{vmas:?}");
    assert_eq!((vmas[0].start(), vmas[0].end()), (r, page(r, 8)));
    // Faulted: two VMAs, and the page moved with its bytes.
    let (m, r, vmas) = move_next_to(|m, b| m.mm.write_val(page(b, 1), 77u64).unwrap());
    assert_eq!(vmas.len(), 2, "{vmas:?}");
    assert_eq!(m.mm.read_val::<u64>(page(r, 5)).unwrap(), 77);
    // Faulted, then emptied: it had an anon_vma, so it keeps its offset, as in Linux.
    let (_, _, vmas) = move_next_to(|m, b| {
        m.mm.write_val(b, 1u64).unwrap();
        m.mm.madvise(b, 4 * PAGE_SIZE, Advice::DontNeed).unwrap();
    });
    assert_eq!(vmas.len(), 2, "{vmas:?}");
    // A read of a never-written page maps the zero page and makes no anon_vma.
    let (_, _, vmas) = move_next_to(|m, b| {
        m.mm.read_val::<u64>(b).unwrap();
    });
    assert_eq!(vmas.len(), 1, "{vmas:?}");
}

/// `remap_move` (Linux 6.17): a `MREMAP_FIXED` move that keeps the length may span several
/// VMAs and the holes between them; each VMA lands at its own offset in the target, and
/// what the target holds under the holes stays.
#[test]
fn a_fixed_move_of_the_same_length_takes_every_vma_in_the_range() {
    let setup = || {
        let m = Machine::new(16);
        let r = m.map(16, RW, MapFlags::PRIVATE);
        fill(&m, r, 9);
        m.mm.munmap(page(r, 4), 2 * PAGE_SIZE).unwrap();
        m.mm.munmap(page(r, 9), 7 * PAGE_SIZE).unwrap();
        m.mm.mprotect(page(r, 6), 3 * PAGE_SIZE, Prot::READ)
            .unwrap();
        let t = m.map(16, RW, MapFlags::PRIVATE);
        m.mm.write_val(page(t, 4), 0xeeu8).unwrap();
        m.mm.write_val(page(t, 12), 0xddu8).unwrap();
        (m, r, t)
    };
    let fixed = MremapFlags::MAYMOVE | MremapFlags::FIXED;

    let (m, r, t) = setup();
    assert_eq!(
        m.mm.mremap(r, 16 * PAGE_SIZE, 16 * PAGE_SIZE, fixed, Some(t)),
        Ok(t)
    );
    check(&m, t, (0..4).chain(6..9).map(|i| (i, i)));
    assert_eq!(
        m.mm.read_val::<u8>(page(t, 4)).unwrap(),
        0xee,
        "the target under a hole"
    );
    assert_eq!(
        m.mm.read_val::<u8>(page(t, 12)).unwrap(),
        0xdd,
        "and under the end"
    );
    assert!(
        m.mm.write_val(page(t, 7), 1u8).is_err(),
        "B is still read-only"
    );
    for i in 0..16 {
        assert!(m.mm.read_val::<u8>(page(r, i)).is_err(), "page {i} left");
    }
    m.mm.audit().unwrap();

    // With DONTUNMAP the source VMAs stay, empty.
    let (m, r, t) = setup();
    let flags = fixed | MremapFlags::DONTUNMAP;
    assert_eq!(
        m.mm.mremap(r, 16 * PAGE_SIZE, 16 * PAGE_SIZE, flags, Some(t)),
        Ok(t)
    );
    check(&m, t, (0..4).chain(6..9).map(|i| (i, i)));
    assert_eq!(m.mm.read_val::<u64>(page(r, 1)).unwrap(), 0);
    assert!(
        m.mm.read_val::<u8>(page(r, 4)).is_err(),
        "the hole stays a hole"
    );
    m.mm.audit().unwrap();

    // A range that begins in a hole is EFAULT, and nothing changes.
    let (m, r, t) = setup();
    let from_hole =
        m.mm.mremap(page(r, 4), 8 * PAGE_SIZE, 8 * PAGE_SIZE, fixed, Some(t));
    assert_eq!(from_hole, Err(MmError::Fault { addr: page(r, 4) }));
    check(&m, r, (0..4).chain(6..9).map(|i| (i, i)));
    assert_eq!(m.mm.read_val::<u8>(page(t, 4)).unwrap(), 0xee);
    // A length change is not a pure move: the old rule (one VMA) holds.
    let grow = m.mm.mremap(r, 8 * PAGE_SIZE, 9 * PAGE_SIZE, fixed, Some(t));
    assert_eq!(grow, Err(MmError::Fault { addr: r }));
    m.mm.audit().unwrap();
}
