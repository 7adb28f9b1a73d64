//! The kernel's `tools/testing/selftests/mm/khugepaged.c`, ported: its anonymous-memory
//! cases in the `khugepaged` context (two full scans of [`Mm::khugepaged_scan`] with the
//! default limits, the C's "wait for the second full scan") and the `madvise` context
//! (`MADV_COLLAPSE`, which ignores the scan limits), a test per case run in each context,
//! with the C's expected results, `fill_memory` /
//! `validate_memory` contents (`i + 0xdead0000` in the first word of page `i`) and
//! `check_huge` (how many PMD-mapped THPs the range holds). The machine has swap, as the
//! swap cases need. `docs/mm-selftests.md` lists what is not ported and why.
//!
//! `fork` is [`Mm::fork`](hmm::mm::Mm::fork) with the child's steps run on this thread
//! (or, for the CoW race, alongside the parent's writes on another).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::mm::{
    Advice, KhugepagedLimits, MapFlags, Mm, MmError, MremapFlags, MthpMode, SwapKind, ThpMode,
};

/// The C's `BASE_ADDR`.
const BASE: VirtAddr = VirtAddr::new(1 << 30);
/// The C's default `khugepaged/max_ptes_swap` and `max_ptes_shared`.
const MAX_PTES_SWAP: u64 = 64;
const MAX_PTES_SHARED: u64 = PMD_NR / 2;

fn machine() -> Machine {
    machine_of(96)
}

fn machine_of(mib: u64) -> Machine {
    let m = Machine::new(mib);
    m.phys.swapon(64 << 20).unwrap();
    // The C's default settings: THPs on fault only where MADV_HUGEPAGE asks.
    m.mm.set_thp_mode(ThpMode::Madvise);
    m
}

/// `alloc_mapping`/`anon_setup_area`: `nr` PMDs of private anonymous memory at `BASE`.
fn setup_area(m: &Machine, nr: u64) -> VirtAddr {
    let p =
        m.mm.mmap(
            Some(BASE),
            nr * PMD_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
        )
        .unwrap();
    assert_eq!(p, BASE);
    p
}

/// `fill_memory`/`anon_fault`: page `i` of `[start, end)` gets `i + 0xdead0000`.
fn fault(mm: &Mm, p: VirtAddr, start: u64, end: u64) {
    for i in start / PAGE_SIZE..end / PAGE_SIZE {
        mm.write_val(page(p, i), i as u32 + 0xdead_0000).unwrap();
    }
}

/// `validate_memory`.
fn validate(mm: &Mm, p: VirtAddr, start: u64, end: u64) {
    for i in start / PAGE_SIZE..end / PAGE_SIZE {
        let v = mm.read_val::<u32>(page(p, i)).unwrap();
        assert_eq!(v, i as u32 + 0xdead_0000, "page {i} is corrupted");
    }
}

/// `check_huge_anon`: the range holds exactly `nr` PMD-mapped THPs.
fn check_huge(mm: &Mm, p: VirtAddr, len: u64, nr: u64) -> bool {
    let huge = (0..len / PMD_SIZE)
        .filter(|k| {
            let e = mm.pagemap(p + k * PMD_SIZE, 1).unwrap()[0];
            e.present && e.order == 9
        })
        .count() as u64;
    huge == nr
}

/// The C's collapse contexts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// `khugepaged_collapse` with these limits.
    Khugepaged(KhugepagedLimits),
    /// `madvise_collapse`.
    Madvise,
}

const CONTEXTS: [Ctx; 2] = [
    Ctx::Khugepaged(KhugepagedLimits {
        max_ptes_none: 511,
        max_ptes_swap: MAX_PTES_SWAP,
        max_ptes_shared: MAX_PTES_SHARED,
    }),
    Ctx::Madvise,
];

impl Ctx {
    /// `enforce_pte_scan_limits`.
    fn enforces_limits(self) -> bool {
        matches!(self, Ctx::Khugepaged(_))
    }

    /// The same context with other limits (the C's `thp_push_settings`).
    fn with(self, f: impl FnOnce(&mut KhugepagedLimits)) -> Ctx {
        match self {
            Ctx::Khugepaged(mut l) => {
                f(&mut l);
                Ctx::Khugepaged(l)
            }
            Ctx::Madvise => Ctx::Madvise,
        }
    }

    /// `c->collapse`: no THP before, then the context's collapse; the THPs as `expect`
    /// says.
    fn collapse(self, mm: &Mm, msg: &str, p: VirtAddr, nr: u64, expect: bool) {
        let len = nr * PMD_SIZE;
        assert!(
            check_huge(mm, p, len, 0),
            "{self:?} {msg}: unexpected huge page"
        );
        match self {
            Ctx::Madvise => madvise_collapse(mm, msg, p, nr, expect),
            Ctx::Khugepaged(limits) => {
                // wait_for_scan: MADV_HUGEPAGE, then until the second full scan.
                mm.madvise(p, len, Advice::HugePage).unwrap();
                for _ in 0..2 {
                    mm.khugepaged_scan(&limits);
                }
                let want = if expect { nr } else { 0 };
                assert!(
                    check_huge(mm, p, len, want),
                    "khugepaged {msg}: check_huge()"
                );
            }
        }
    }
}

/// Runs `case` in each context, each on a fresh machine.
fn in_each_context(case: fn(Ctx)) {
    for c in CONTEXTS {
        case(c);
    }
}

/// `__madvise_collapse`.
fn madvise_collapse(mm: &Mm, msg: &str, p: VirtAddr, nr: u64, expect: bool) {
    let len = nr * PMD_SIZE;
    mm.madvise(p, len, Advice::HugePage).unwrap();
    let mut r = mm.madvise(p, len, Advice::Collapse);
    if matches!(r, Err(MmError::Again { .. })) {
        r = mm.madvise(p, len, Advice::Collapse);
    }
    assert_eq!(r.is_ok(), expect, "{msg}: bad return value {r:?}");
    let want = if expect { nr } else { 0 };
    assert!(check_huge(mm, p, len, want), "{msg}: check_huge()");
}

/// `alloc_hpage`: one PMD, faulted, collapsed into a THP, then `MADV_HUGEPAGE`.
fn alloc_hpage(m: &Machine) -> VirtAddr {
    let p = setup_area(m, 1);
    fault(&m.mm, p, 0, PMD_SIZE);
    m.mm.madvise(p, PMD_SIZE, Advice::Collapse).unwrap();
    assert!(check_huge(&m.mm, p, PMD_SIZE, 1), "allocate huge page");
    m.mm.madvise(p, PMD_SIZE, Advice::HugePage).unwrap();
    p
}

/// `swapout_range`: `MADV_PAGEOUT`, then every page must be swapped.
fn swapout(mm: &Mm, p: VirtAddr, len: u64) {
    mm.madvise(p, len, Advice::PageOut).unwrap();
    let map = mm.pagemap(p, len / PAGE_SIZE).unwrap();
    assert!(
        map.iter().all(|e| e.swap == Some(SwapKind::Swap)),
        "could not swap out"
    );
}

#[test]
fn alloc_at_fault() {
    let m = machine();
    m.mm.set_thp_mode(ThpMode::Always);
    let p = setup_area(&m, 1);
    m.mm.write_val(p, 1u8).unwrap();
    assert!(
        check_huge(&m.mm, p, PMD_SIZE, 1),
        "allocate huge page on fault"
    );
    m.mm.set_thp_mode(ThpMode::Madvise);
    m.mm.madvise(p, PAGE_SIZE, Advice::DontNeed).unwrap();
    assert!(
        check_huge(&m.mm, p, PMD_SIZE, 0),
        "split huge PMD on MADV_DONTNEED"
    );
}

#[test]
fn collapse_full() {
    in_each_context(collapse_full_in);
}

fn collapse_full_in(c: Ctx) {
    let m = machine();
    let p = setup_area(&m, 4);
    fault(&m.mm, p, 0, 4 * PMD_SIZE);
    c.collapse(
        &m.mm,
        "Collapse multiple fully populated PTE table",
        p,
        4,
        true,
    );
    validate(&m.mm, p, 0, 4 * PMD_SIZE);
    m.mm.audit().unwrap();
}

#[test]
fn collapse_empty() {
    in_each_context(collapse_empty_in);
}

fn collapse_empty_in(c: Ctx) {
    let m = machine();
    let p = setup_area(&m, 1);
    c.collapse(&m.mm, "Do not collapse empty PTE table", p, 1, false);
}

#[test]
fn collapse_single_pte_entry() {
    in_each_context(collapse_single_pte_entry_in);
}

fn collapse_single_pte_entry_in(c: Ctx) {
    let m = machine();
    let p = setup_area(&m, 1);
    fault(&m.mm, p, 0, PAGE_SIZE);
    c.collapse(
        &m.mm,
        "Collapse PTE table with single PTE entry present",
        p,
        1,
        true,
    );
    validate(&m.mm, p, 0, PAGE_SIZE);
    m.mm.audit().unwrap();
}

#[test]
fn collapse_max_ptes_none() {
    in_each_context(collapse_max_ptes_none_in);
}

fn collapse_max_ptes_none_in(c: Ctx) {
    let max_ptes_none = PMD_NR / 2;
    let c = c.with(|l| l.max_ptes_none = max_ptes_none);
    let m = machine();
    let mut p = setup_area(&m, 1);
    let n = PMD_NR - max_ptes_none - 1;
    fault(&m.mm, p, 0, n * PAGE_SIZE);
    let msg = "Maybe collapse with max_ptes_none exceeded";
    c.collapse(&m.mm, msg, p, 1, !c.enforces_limits());
    validate(&m.mm, p, 0, n * PAGE_SIZE);
    if c.enforces_limits() {
        m.mm.munmap(p, PMD_SIZE).unwrap();
        p = setup_area(&m, 1);
        fault(&m.mm, p, 0, (n + 1) * PAGE_SIZE);
        c.collapse(&m.mm, "Collapse with max_ptes_none PTEs empty", p, 1, true);
        validate(&m.mm, p, 0, (n + 1) * PAGE_SIZE);
    }
    m.mm.audit().unwrap();
}

#[test]
fn collapse_swapin_single_pte() {
    in_each_context(collapse_swapin_single_pte_in);
}

fn collapse_swapin_single_pte_in(c: Ctx) {
    let m = machine();
    let p = setup_area(&m, 1);
    fault(&m.mm, p, 0, PMD_SIZE);
    swapout(&m.mm, p, PAGE_SIZE);
    c.collapse(
        &m.mm,
        "Collapse with swapping in single PTE entry",
        p,
        1,
        true,
    );
    validate(&m.mm, p, 0, PMD_SIZE);
    m.mm.audit().unwrap();
}

#[test]
fn collapse_max_ptes_swap() {
    in_each_context(collapse_max_ptes_swap_in);
}

fn collapse_max_ptes_swap_in(c: Ctx) {
    let m = machine();
    let p = setup_area(&m, 1);
    fault(&m.mm, p, 0, PMD_SIZE);
    swapout(&m.mm, p, (MAX_PTES_SWAP + 1) * PAGE_SIZE);
    let msg = "Maybe collapse with max_ptes_swap exceeded";
    c.collapse(&m.mm, msg, p, 1, !c.enforces_limits());
    validate(&m.mm, p, 0, PMD_SIZE);
    if c.enforces_limits() {
        fault(&m.mm, p, 0, PMD_SIZE);
        swapout(&m.mm, p, MAX_PTES_SWAP * PAGE_SIZE);
        c.collapse(
            &m.mm,
            "Collapse with max_ptes_swap pages swapped out",
            p,
            1,
            true,
        );
        validate(&m.mm, p, 0, PMD_SIZE);
    }
    m.mm.audit().unwrap();
}

#[test]
fn collapse_single_pte_entry_compound() {
    in_each_context(collapse_single_pte_entry_compound_in);
}

fn collapse_single_pte_entry_compound_in(c: Ctx) {
    let m = machine();
    let p = alloc_hpage(&m);
    m.mm.madvise(p, PMD_SIZE, Advice::NoHugePage).unwrap();
    m.mm.madvise(p + PAGE_SIZE, PMD_SIZE - PAGE_SIZE, Advice::DontNeed)
        .unwrap();
    assert!(
        check_huge(&m.mm, p, PMD_SIZE, 0),
        "split huge page leaving single PTE mapping compound page"
    );
    c.collapse(
        &m.mm,
        "Collapse PTE table with single PTE mapping compound page",
        p,
        1,
        true,
    );
    validate(&m.mm, p, 0, PAGE_SIZE);
    m.mm.audit().unwrap();
}

#[test]
fn collapse_full_of_compound() {
    in_each_context(collapse_full_of_compound_in);
}

fn collapse_full_of_compound_in(c: Ctx) {
    let m = machine();
    let p = alloc_hpage(&m);
    m.mm.madvise(p, PAGE_SIZE, Advice::NoHugePage).unwrap();
    m.mm.madvise(p, PMD_SIZE, Advice::NoHugePage).unwrap();
    assert!(
        check_huge(&m.mm, p, PMD_SIZE, 0),
        "split huge page leaving single PTE page table full of compound pages"
    );
    c.collapse(
        &m.mm,
        "Collapse PTE table full of compound pages",
        p,
        1,
        true,
    );
    validate(&m.mm, p, 0, PMD_SIZE);
    m.mm.audit().unwrap();
}

/// The model has no compaction: a page left of each THP keeps its 2 MiB block from the
/// next THP, so the machine has a block for each of the 512 (the kernel compacts).
#[test]
fn collapse_compound_extreme() {
    in_each_context(collapse_compound_extreme_in);
}

fn collapse_compound_extreme_in(c: Ctx) {
    let m = machine_of(2 * PMD_NR + 64);
    let mm = &m.mm;
    let mut p = setup_area(&m, 1);
    let fixed = MremapFlags::MAYMOVE | MremapFlags::FIXED;
    // A PTE table full of pages of 512 different PTE-mapped THPs.
    for i in 0..PMD_NR {
        mm.madvise(BASE, PMD_SIZE, Advice::HugePage).unwrap();
        fault(mm, BASE, 0, PMD_SIZE);
        assert!(
            check_huge(mm, BASE, PMD_SIZE, 1),
            "failed to allocate huge page {i}"
        );
        mm.madvise(BASE, PMD_SIZE, Advice::NoHugePage).unwrap();
        let from = BASE - i * PAGE_SIZE;
        let tmp = BASE + 2 * PMD_SIZE;
        p = mm
            .mremap(
                from,
                i * PAGE_SIZE + PMD_SIZE,
                (i + 1) * PAGE_SIZE,
                fixed,
                Some(tmp),
            )
            .unwrap();
        p = mm
            .mremap(
                p,
                (i + 1) * PAGE_SIZE,
                (i + 1) * PAGE_SIZE + PMD_SIZE,
                fixed,
                Some(BASE - (i + 1) * PAGE_SIZE),
            )
            .unwrap();
    }
    mm.munmap(BASE, PMD_SIZE).unwrap();
    fault(mm, p, 0, PMD_SIZE);
    assert!(check_huge(mm, p, PMD_SIZE, 0));
    c.collapse(
        mm,
        "Collapse PTE table full of different compound pages",
        p,
        1,
        true,
    );
    validate(mm, p, 0, PMD_SIZE);
    mm.audit().unwrap();
}

#[test]
fn collapse_fork() {
    in_each_context(collapse_fork_in);
}

fn collapse_fork_in(c: Ctx) {
    let m = machine();
    let p = setup_area(&m, 1);
    fault(&m.mm, p, 0, PAGE_SIZE);
    assert!(check_huge(&m.mm, p, PMD_SIZE, 0), "allocate small page");
    let child = m.mm.fork().unwrap();
    assert!(
        check_huge(&child, p, PMD_SIZE, 0),
        "share small page over fork()"
    );
    fault(&child, p, PAGE_SIZE, 2 * PAGE_SIZE);
    c.collapse(
        &child,
        "Collapse PTE table with single page shared with parent process",
        p,
        1,
        true,
    );
    validate(&child, p, 0, PAGE_SIZE);
    child.audit().unwrap();
    drop(child);
    assert!(
        check_huge(&m.mm, p, PMD_SIZE, 0),
        "parent still has small page"
    );
    validate(&m.mm, p, 0, PAGE_SIZE);
    m.mm.audit().unwrap();
}

#[test]
fn collapse_fork_compound() {
    in_each_context(collapse_fork_compound_in);
}

fn collapse_fork_compound_in(c: Ctx) {
    let m = machine();
    let p = alloc_hpage(&m);
    let child = m.mm.fork().unwrap();
    assert!(
        check_huge(&child, p, PMD_SIZE, 1),
        "share huge page over fork()"
    );
    child.madvise(p, PAGE_SIZE, Advice::NoHugePage).unwrap();
    child.madvise(p, PMD_SIZE, Advice::NoHugePage).unwrap();
    assert!(
        check_huge(&child, p, PMD_SIZE, 0),
        "split huge page PMD in child"
    );
    fault(&child, p, 0, PAGE_SIZE);
    let c = c.with(|l| l.max_ptes_shared = PMD_NR - 1);
    c.collapse(
        &child,
        "Collapse PTE table full of compound pages in child",
        p,
        1,
        true,
    );
    validate(&child, p, 0, PMD_SIZE);
    child.audit().unwrap();
    drop(child);
    assert!(
        check_huge(&m.mm, p, PMD_SIZE, 1),
        "parent still has huge page"
    );
    validate(&m.mm, p, 0, PMD_SIZE);
    m.mm.audit().unwrap();
}

#[test]
fn collapse_max_ptes_shared() {
    in_each_context(collapse_max_ptes_shared_in);
}

fn collapse_max_ptes_shared_in(c: Ctx) {
    let m = machine();
    let p = alloc_hpage(&m);
    let child = m.mm.fork().unwrap();
    assert!(
        check_huge(&child, p, PMD_SIZE, 1),
        "share huge page over fork()"
    );
    let n = PMD_NR - MAX_PTES_SHARED - 1;
    fault(&child, p, 0, n * PAGE_SIZE);
    assert!(
        check_huge(&child, p, PMD_SIZE, 0),
        "trigger CoW on page {n}"
    );
    let msg = "Maybe collapse with max_ptes_shared exceeded";
    c.collapse(&child, msg, p, 1, !c.enforces_limits());
    if c.enforces_limits() {
        fault(&child, p, 0, (n + 1) * PAGE_SIZE);
        c.collapse(
            &child,
            "Collapse with max_ptes_shared PTEs shared",
            p,
            1,
            true,
        );
    }
    validate(&child, p, 0, PMD_SIZE);
    child.audit().unwrap();
    drop(child);
    assert!(
        check_huge(&m.mm, p, PMD_SIZE, 1),
        "parent still has huge page"
    );
    validate(&m.mm, p, 0, PMD_SIZE);
    m.mm.audit().unwrap();
}

/// The parent writes the fork-shared range while the child collapses it: copy-on-write
/// keeps the two apart.
#[test]
fn collapse_fork_cow_race() {
    in_each_context(collapse_fork_cow_race_in);
}

fn collapse_fork_cow_race_in(c: Ctx) {
    let m = machine();
    let n = 64;
    let p = setup_area(&m, 1);
    fault(&m.mm, p, 0, n * PAGE_SIZE);
    let child = m.mm.fork().unwrap();
    fault(&child, p, n * PAGE_SIZE, PMD_SIZE);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let parent = s.spawn(|| {
            let mut i = 0;
            while !done.load(Ordering::Acquire) {
                if i < n {
                    m.mm.write_val(page(p, i), i as u32 + 0xbeef_0000).unwrap();
                }
                i += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            for i in i.min(n)..n {
                m.mm.write_val(page(p, i), i as u32 + 0xbeef_0000).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(1));
        c.collapse(
            &child,
            "Collapse a range the parent is writing to",
            p,
            1,
            true,
        );
        done.store(true, Ordering::Release);
        parent.join().unwrap();
    });
    validate(&child, p, 0, PMD_SIZE);
    for i in 0..n {
        let v = m.mm.read_val::<u32>(page(p, i)).unwrap();
        assert_eq!(v, i as u32 + 0xbeef_0000, "parent page {i}");
    }
    child.audit().unwrap();
    m.mm.audit().unwrap();
}

#[test]
fn madvise_collapse_existing_thps() {
    let m = machine();
    let p = setup_area(&m, 1);
    fault(&m.mm, p, 0, PMD_SIZE);
    Ctx::Madvise.collapse(&m.mm, "Collapse fully populated PTE table...", p, 1, true);
    validate(&m.mm, p, 0, PMD_SIZE);
    madvise_collapse(&m.mm, "Re-collapse PMD-mapped hugepage", p, 1, true);
    validate(&m.mm, p, 0, PMD_SIZE);
    m.mm.audit().unwrap();
}

/// What `__madvise_collapse`'s "Clear VM_NOHUGEPAGE" relies on: `MADV_COLLAPSE` ignores the
/// THP mode but refuses a `MADV_NOHUGEPAGE` range (`EINVAL`, `vma_thp_disabled`).
#[test]
fn madvise_collapse_refuses_a_nohugepage_range() {
    let m = machine();
    m.mm.set_thp_mode(ThpMode::Never);
    let p = setup_area(&m, 1);
    fault(&m.mm, p, 0, PMD_SIZE);
    m.mm.madvise(p, PMD_SIZE, Advice::NoHugePage).unwrap();
    assert!(matches!(
        m.mm.madvise(p, PMD_SIZE, Advice::Collapse),
        Err(MmError::Inval { .. })
    ));
    madvise_collapse(&m.mm, "Collapse with THPs off", p, 1, true);
    validate(&m.mm, p, 0, PMD_SIZE);
}

// The `mthp_khugepaged` context (Nico Pache's mTHP khugepaged series): each case runs
// for every collapse order below the PMD that anonymous memory allows (2 to 8, the C's
// default `-c`), with that order alone enabled, for `MADV_HUGEPAGE` only, and the PMD
// size off (`mthp_push_target_order`). `khugepaged_full_pass` is one full scan.

/// A machine set up as `mthp_push_target_order` leaves it for `order`.
fn mthp_machine(order: u32) -> Machine {
    let m = machine();
    m.mm.set_thp_mode(ThpMode::Never);
    m.mm.set_mthp_mode(order, MthpMode::Madvise).unwrap();
    m
}

/// `is_range_backed_by_order`: every page of `[p, p + len)` is mapped and its folio is of
/// `order`, each folio whole and aligned in the range.
fn all_windows_at_order(m: &Machine, p: VirtAddr, len: u64, order: u32) -> bool {
    let n = 1u64 << order;
    (0..len / PAGE_SIZE).step_by(n as usize).all(|i| {
        let map = m.mm.pagemap(page(p, i), n).unwrap();
        let Some(head) = map[0].pfn.filter(|_| map[0].present) else {
            return false;
        };
        head % n == 0
            && map
                .iter()
                .enumerate()
                .all(|(k, e)| e.present && e.pfn == Some(head + k as u64))
            && m.phys.frame(hmm::addr::Pfn::new(head)).meta().order() == order
    })
}

/// `any_window_at_order`.
fn any_window_at_order(m: &Machine, p: VirtAddr, len: u64, order: u32) -> bool {
    let window = PAGE_SIZE << order;
    (0..len / window).any(|k| all_windows_at_order(m, p + k * window, window, order))
}

const MTHP_COLLAPSE_ORDERS: std::ops::RangeInclusive<u32> = 2..=8;

/// `khugepaged_full_pass` with the given `max_ptes_none`.
fn full_pass(m: &Machine, max_ptes_none: u64) -> hmm::mm::KhugepagedStats {
    m.mm.khugepaged_scan(&KhugepagedLimits {
        max_ptes_none,
        ..KhugepagedLimits::default()
    })
}

#[test]
fn mthp_collapse_order_single_window() {
    for order in MTHP_COLLAPSE_ORDERS {
        let m = mthp_machine(order);
        let window = PAGE_SIZE << order;
        let p = setup_area(&m, 1);
        fault(&m.mm, p, window, 2 * window);
        assert!(
            !any_window_at_order(&m, p, PMD_SIZE, order),
            "order {order}: large folio after fault"
        );
        m.mm.madvise(p, PMD_SIZE, Advice::HugePage).unwrap();
        let s = full_pass(&m, 511);
        assert_eq!(s.mthp_collapsed, 1, "order {order}");
        assert!(
            all_windows_at_order(&m, p + window, window, order),
            "order {order}"
        );
        assert!(!any_window_at_order(&m, p, window, order));
        assert!(!any_window_at_order(
            &m,
            p + 2 * window,
            PMD_SIZE - 2 * window,
            order
        ));
        validate(&m.mm, p, window, 2 * window);
        m.mm.audit().unwrap();
    }
}

#[test]
fn mthp_collapse_order_partial_window() {
    for order in MTHP_COLLAPSE_ORDERS {
        let m = mthp_machine(order);
        let p = setup_area(&m, 1);
        fault(&m.mm, p, 0, PAGE_SIZE);
        assert!(!any_window_at_order(&m, p, PMD_SIZE, order));
        m.mm.madvise(p, PMD_SIZE, Advice::HugePage).unwrap();
        full_pass(&m, 511);
        // One page present is enough at the default max_ptes_none (511, scaled).
        assert!(
            all_windows_at_order(&m, p, PAGE_SIZE << order, order),
            "order {order}"
        );
        validate(&m.mm, p, 0, PAGE_SIZE);
        // The rest of the window reads zeros.
        let rest = m.mm.read_val::<u32>(page(p, 1)).unwrap();
        assert_eq!(rest, 0);
        m.mm.audit().unwrap();
    }
}

#[test]
fn mthp_collapse_order_max_ptes_none() {
    for order in MTHP_COLLAPSE_ORDERS {
        let m = mthp_machine(order);
        let window = PAGE_SIZE << order;
        let p = setup_area(&m, 1);
        fault(&m.mm, p, 0, 2 * window - PAGE_SIZE);
        assert!(!any_window_at_order(&m, p, PMD_SIZE, order));
        m.mm.madvise(p, PMD_SIZE, Advice::HugePage).unwrap();
        full_pass(&m, 0);
        assert!(
            all_windows_at_order(&m, p, window, order),
            "order {order}: full window"
        );
        assert!(
            !any_window_at_order(&m, p + window, window, order),
            "order {order}: the window missing a page"
        );
        validate(&m.mm, p, 0, 2 * window - PAGE_SIZE);
        m.mm.audit().unwrap();
    }
}

#[test]
fn mthp_collapse_order_mixed_sources() {
    for order in MTHP_COLLAPSE_ORDERS {
        // The C's source order: `-s`, or the smallest mTHP order; skipped when not below.
        let source = 2;
        if source >= order {
            continue;
        }
        let m = mthp_machine(order);
        m.mm.set_mthp_mode(source, MthpMode::Always).unwrap();
        let p = setup_area(&m, 1);
        fault(&m.mm, p, 0, PMD_SIZE);
        m.mm.set_mthp_mode(source, MthpMode::Never).unwrap();
        assert!(
            all_windows_at_order(&m, p, PMD_SIZE, source),
            "order-{source} sources"
        );
        m.mm.madvise(p, PMD_SIZE, Advice::HugePage).unwrap();
        full_pass(&m, 511);
        assert!(
            all_windows_at_order(&m, p, PMD_SIZE, order),
            "order {order}"
        );
        validate(&m.mm, p, 0, PMD_SIZE);
        m.mm.audit().unwrap();
    }
}

/// A source folio that straddles a collapsed window (PTEs `mremap` moved off their
/// alignment) is left mapped in part when the next window stays: it goes on the
/// deferred-split queue and is split, as a zap of part of it would have it.
#[test]
fn mthp_collapse_splits_a_source_folio_it_maps_in_part() {
    let m = mthp_machine(3);
    m.mm.set_mthp_mode(2, MthpMode::Always).unwrap();
    // Four order-2 folios at the start of the second PMD of a 4 MiB VMA, which then moves
    // one page up: they sit at pages 1..17 of a whole PMD of the moved VMA.
    let raw =
        m.mm.mmap(None, 3 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let src = raw.align_up(PMD_SIZE).unwrap();
    m.mm.munmap(raw, 3 * PMD_SIZE).unwrap();
    let src =
        m.mm.mmap(
            Some(src),
            2 * PMD_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        )
        .unwrap();
    fault(&m.mm, src + PMD_SIZE, 0, 16 * PAGE_SIZE);
    m.mm.set_mthp_mode(2, MthpMode::Never).unwrap();
    let raw =
        m.mm.mmap(None, 4 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let d = raw.align_up(PMD_SIZE).unwrap();
    m.mm.munmap(raw, 4 * PMD_SIZE).unwrap();
    let flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
    let moved = page(d, 1);
    assert_eq!(
        m.mm.mremap(src, 2 * PMD_SIZE, 2 * PMD_SIZE, flags, Some(moved)),
        Ok(moved)
    );
    let p = d + PMD_SIZE;
    // The folio at pages 5..9 straddles the windows 0..8 and 8..16; a pin on page 12
    // keeps the second window as it is.
    let pins =
        m.mm.pin_user_pages(page(p, 12), 1, hmm::mm::GupFlags::WRITE)
            .unwrap();
    m.mm.madvise(p, PMD_SIZE, Advice::HugePage).unwrap();
    let s = full_pass(&m, 511);
    assert!(s.mthp_collapsed >= 1);
    assert!(
        all_windows_at_order(&m, p, 8 * PAGE_SIZE, 3),
        "the first window collapsed"
    );
    let e = m.mm.pagemap(page(p, 8), 1).unwrap()[0];
    let order = m
        .phys
        .frame(hmm::addr::Pfn::new(e.pfn.unwrap()))
        .folio()
        .meta()
        .order();
    assert_eq!(order, 0, "the straddling folio was split");
    drop(pins);
    // `fault` wrote page `i` of the source's second PMD with `i + 0xdead0000`.
    for i in 1..17 {
        let v = m.mm.read_val::<u32>(page(p, i)).unwrap();
        assert_eq!(v, (i - 1) as u32 + 0xdead_0000, "page {i}");
    }
    m.mm.audit().unwrap();
}
