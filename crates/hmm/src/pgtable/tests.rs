use super::*;
use crate::addr::{Pfn, PAGE_SIZE, PMD_SIZE, PUD_SIZE};

fn range(start: u64, len: u64) -> VaRange {
    VaRange::from_len(VirtAddr::new(start), len).unwrap()
}

fn present(pfn: u64) -> Pte {
    Pte::Present {
        pfn: Pfn::new(pfn),
        flags: PteFlags::WRITE,
    }
}

#[test]
fn lookup_walk_reports_holes_without_allocating() {
    let pt = PageTable::new();
    let mut c = pt.cursor(range(0x4000_0000, 3 * PMD_SIZE), WalkMode::Lookup);
    let mut holes = 0;
    while let Some(s) = c.next() {
        assert!(matches!(s, Slot::Hole(_)));
        holes += 1;
    }
    drop(c);
    // One hole per missing PUD-level table (the range sits inside one 1 GiB span).
    assert_eq!(holes, 1);
    let s = pt.stats();
    assert_eq!((s.walks, s.entries_visited, s.nr_pte_tables), (1, 1, 0));
}

#[test]
fn populate_then_lookup_matches_the_oracle() {
    let pt = PageTable::new();
    // Straddle a PMD boundary and a PUD boundary.
    let r = range((1 << 30) - 2 * PAGE_SIZE, 4 * PAGE_SIZE);
    let mut c = pt.cursor(r, WalkMode::Populate);
    let mut n = 0;
    while let Some(s) = c.next() {
        let Slot::Pte(p) = s else {
            panic!("populate yields PTEs")
        };
        p.set(present(100 + n));
        n += 1;
    }
    drop(c);
    assert_eq!(n, 4);
    let oracle = pt.reference_entries();
    assert_eq!(oracle.len(), 4);
    let mut c = pt.cursor(r, WalkMode::Lookup);
    let mut seen = Vec::new();
    while let Some(s) = c.next() {
        if let Slot::Pte(p) = s {
            seen.push((p.va(), Huge::Pte, p.get()));
        }
    }
    assert_eq!(seen, oracle);
    let s = pt.stats();
    assert_eq!(s.nr_pte_tables, 2);
    assert_eq!(s.nr_pmd_tables, 2);
    assert_eq!(s.nr_pud_tables, 1);
}

#[test]
fn pmd_leaves_are_yielded_once_and_walk_continues() {
    let pt = PageTable::new();
    // Install a table at 0, then turn slot 1 into a leaf by hand through a cursor.
    let r = range(0, 3 * PMD_SIZE);
    let mut c = pt.cursor(r, WalkMode::Populate);
    while c.next().is_some() {}
    drop(c);
    {
        // Replace the second PMD's table word with a leaf (the THP code of later issues
        // does this under the PMD lock).
        let pud = pt.pgd.tables[0].get().unwrap();
        let pmdt = pud.tables[0].get().unwrap();
        let _l = pmdt.lock.lock();
        pmdt.entries[1].store(
            Pte::Present {
                pfn: Pfn::new(512),
                flags: PteFlags::WRITE,
            }
            .encode(Huge::Pmd),
            std::sync::atomic::Ordering::Release,
        );
    }
    let mut c = pt.cursor(
        range(PMD_SIZE - PAGE_SIZE, PMD_SIZE + 2 * PAGE_SIZE),
        WalkMode::Lookup,
    );
    let mut kinds = Vec::new();
    while let Some(s) = c.next() {
        kinds.push(match s {
            Slot::Hole(_) => "hole",
            Slot::Pte(_) => "pte",
            Slot::Pud(_) => "pud",
            Slot::Pmd(p) => {
                assert_eq!(p.range(), range(PMD_SIZE, PMD_SIZE));
                assert_eq!(p.get().pfn(), Some(Pfn::new(512)));
                "pmd"
            }
        });
    }
    assert_eq!(kinds, ["pte", "pmd", "pte"]);
    let oracle = pt.reference_entries();
    assert_eq!(oracle.len(), 1);
    assert_eq!(oracle[0].1, Huge::Pmd);
}

#[test]
fn current_relocks_the_same_slot_in_one_walk() {
    let pt = PageTable::new();
    let mut c = pt.cursor(range(0x10000, PAGE_SIZE), WalkMode::Populate);
    let va = match c.next() {
        Some(Slot::Pte(p)) => {
            p.set(present(9));
            p.va()
        }
        _ => panic!(),
    };
    c.unlock();
    match c.current() {
        Some(Slot::Pte(p)) => {
            assert_eq!(p.va(), va);
            assert_eq!(p.replace(Pte::None), present(9));
        }
        _ => panic!(),
    }
    assert!(c.next().is_none());
    drop(c);
    assert_eq!(pt.stats().walks, 1);
}

#[test]
fn free_tables_only_frees_empty_covered_spans() {
    let mut pt = PageTable::new();
    let r = range(0, 2 * PMD_SIZE);
    let mut c = pt.cursor(r, WalkMode::Populate);
    while let Some(Slot::Pte(p)) = c.next() {
        if p.va() == VirtAddr::new(PMD_SIZE) {
            p.set(present(1));
        }
    }
    drop(c);
    assert_eq!(pt.stats().nr_pte_tables, 2);
    // The range does not cover the 1 GiB span, so upper tables stay; the non-empty PTE
    // table stays.
    assert_eq!(pt.free_tables(r), 1);
    assert_eq!(pt.stats().nr_pte_tables, 1);
    let mut c = pt.cursor(range(PMD_SIZE, PAGE_SIZE), WalkMode::Lookup);
    if let Some(Slot::Pte(p)) = c.next() {
        p.set(Pte::None);
    }
    drop(c);
    // Covering everything frees the rest, up to the top.
    assert_eq!(
        pt.free_tables(
            VaRange::new(VirtAddr::ZERO, VirtAddr::new(crate::addr::USER_VA_END)).unwrap()
        ),
        3
    );
    let s = pt.stats();
    assert_eq!(
        (s.nr_pte_tables, s.nr_pmd_tables, s.nr_pud_tables),
        (0, 0, 0)
    );
    assert!(pt.reference_entries().is_empty());
}

#[test]
fn concurrent_populate_installs_each_table_once() {
    let pt = PageTable::new();
    let r = range(0, 8 * PMD_SIZE);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let pt = &pt;
            s.spawn(move || {
                let mut c = pt.cursor(r, WalkMode::Populate);
                while let Some(slot) = c.next() {
                    if let Slot::Pte(p) = slot {
                        // Both threads race to fill; each slot ends non-none.
                        if p.get().is_none() {
                            p.set(present(t + 1));
                        }
                    }
                }
            });
        }
    });
    assert_eq!(pt.stats().nr_pte_tables, 8);
    assert_eq!(pt.reference_entries().len() as u64, 8 * 512);
}

fn gigantic(pfn: u64) -> Pte {
    Pte::Present {
        pfn: Pfn::new(pfn),
        flags: PteFlags::WRITE,
    }
}

#[test]
fn pud_leaves_are_yielded_once_between_tables() {
    let pt = PageTable::new();
    // Small pages in the first and third GiB, a PUD leaf in the second.
    for va in [PUD_SIZE - PAGE_SIZE, 2 * PUD_SIZE] {
        let mut c = pt.cursor(range(va, PAGE_SIZE), WalkMode::Populate);
        let Some(Slot::Pte(p)) = c.next() else {
            panic!("populate yields a PTE")
        };
        p.set(present(7));
    }
    let pud = pt
        .lock_pud(VirtAddr::new(PUD_SIZE), WalkMode::Lookup)
        .unwrap();
    assert_eq!(pud.get(), PudEntry::None);
    assert!(pud.set_leaf(gigantic(1 << 18)));
    assert_eq!(pud.get(), PudEntry::Leaf(gigantic(1 << 18)));
    drop(pud);
    // A PMD lock under a PUD leaf does not exist.
    assert!(pt
        .lock_pmd(VirtAddr::new(PUD_SIZE + PMD_SIZE), WalkMode::Populate)
        .is_none());
    let walks = pt.stats().walks;
    let mut c = pt.cursor(
        range(PUD_SIZE - PAGE_SIZE, PUD_SIZE + 2 * PAGE_SIZE),
        WalkMode::Populate,
    );
    let mut seen = Vec::new();
    while let Some(s) = c.next() {
        seen.push(match s {
            Slot::Pte(p) => (p.va().as_u64(), Huge::Pte),
            Slot::Pud(p) => {
                assert_eq!(p.range(), range(PUD_SIZE, PUD_SIZE));
                assert_eq!(p.level(), Huge::Pud);
                assert_eq!(p.get(), gigantic(1 << 18));
                (p.range().start().as_u64(), Huge::Pud)
            }
            other => panic!("unexpected {other:?}"),
        });
    }
    drop(c);
    assert_eq!(
        seen,
        [
            (PUD_SIZE - PAGE_SIZE, Huge::Pte),
            (PUD_SIZE, Huge::Pud),
            (2 * PUD_SIZE, Huge::Pte)
        ]
    );
    assert_eq!(pt.stats().walks, walks + 1);
    let oracle = pt.reference_entries();
    assert_eq!(oracle.len(), 3);
    assert_eq!(
        oracle[1],
        (VirtAddr::new(PUD_SIZE), Huge::Pud, gigantic(1 << 18))
    );
    // The populating walk allocated nothing under the leaf.
    assert_eq!(pt.stats().nr_pmd_tables, 2);
}

#[test]
fn a_pud_leaf_replaces_only_a_table_that_maps_nothing() {
    let mut pt = PageTable::new();
    let base = VirtAddr::new(PUD_SIZE);
    // A populating walk leaves a PMD table and an empty PTE table under the slot.
    let mut c = pt.cursor(range(PUD_SIZE, PAGE_SIZE), WalkMode::Populate);
    let Some(Slot::Pte(p)) = c.next() else {
        panic!()
    };
    p.set(present(3));
    drop(c);
    let pud = pt.lock_pud(base, WalkMode::Lookup).unwrap();
    assert_eq!(pud.get(), PudEntry::Table);
    assert!(!pud.set_leaf(gigantic(1 << 18)), "the table maps a page");
    assert_eq!(pud.get(), PudEntry::Table);
    drop(pud);
    let mut c = pt.cursor(range(PUD_SIZE, PAGE_SIZE), WalkMode::Lookup);
    let Some(Slot::Pte(p)) = c.next() else {
        panic!("the page is still mapped")
    };
    assert_eq!(p.replace(Pte::None), present(3));
    drop(c);
    let pud = pt.lock_pud(base, WalkMode::Lookup).unwrap();
    assert!(pud.set_leaf(gigantic(1 << 18)));
    drop(pud);
    assert_eq!(
        pt.reference_entries(),
        [(base, Huge::Pud, gigantic(1 << 18))]
    );
    // The replaced tables stay until the leaf is gone and free_pgtables runs.
    let all = VaRange::new(VirtAddr::ZERO, VirtAddr::new(crate::addr::USER_VA_END)).unwrap();
    assert_eq!(pt.free_tables(all), 0);
    let pud = pt.lock_pud(base, WalkMode::Lookup).unwrap();
    assert!(pud.set_leaf(Pte::None));
    drop(pud);
    assert_eq!(pt.free_tables(all), 3);
    let s = pt.stats();
    assert_eq!(
        (s.nr_pte_tables, s.nr_pmd_tables, s.nr_pud_tables),
        (0, 0, 0)
    );
}

#[test]
fn walkers_racing_a_pud_leaf_never_work_under_it() {
    // One thread keeps populating and clearing a page in the second GiB; the other keeps
    // installing and removing a PUD leaf there. Whenever the leaf is in, the walker's
    // page must not be (the leaf replaced only an empty table), and every walk sees
    // either the leaf or a PTE.
    let pt = PageTable::new();
    let base = VirtAddr::new(PUD_SIZE);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..2000 {
                let pud = pt.lock_pud(base, WalkMode::Populate).unwrap();
                if pud.set_leaf(gigantic(1 << 18)) {
                    assert!(pud.set_leaf(Pte::None));
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Release);
        });
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let mut c = pt.cursor(range(PUD_SIZE + PMD_SIZE, PAGE_SIZE), WalkMode::Populate);
                match c.next() {
                    Some(Slot::Pte(p)) => {
                        assert!(p.get().is_none());
                        p.set(present(5));
                        assert_eq!(p.replace(Pte::None), present(5));
                    }
                    Some(Slot::Pud(p)) => assert_eq!(p.get(), gigantic(1 << 18)),
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
    });
    assert!(pt.reference_entries().is_empty());
}
