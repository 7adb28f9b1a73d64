use super::*;
use crate::addr::{Pfn, PAGE_SIZE, PMD_SIZE};

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
