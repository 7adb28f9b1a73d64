//! `hmm_range_fault`: snapshot and fault modes on every kind of CPU entry, per-page
//! requests, the errors and their causes, the sequence protocol and the driver loop.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot, ThpMode};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange,
};
use hmm::range_fault::{
    fault_and_commit, hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange,
    HMM_RANGE_DEFAULT_TIMEOUT,
};
use parking_lot::Mutex;

/// A mirror whose invalidate takes its lock and records the sequence, as a driver's does.
#[derive(Default)]
struct Mirror {
    lock: Mutex<u64>,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &IntervalSub, _r: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        let mut n = self.lock.lock();
        *n += 1;
        sub.set_seq(cur_seq);
        true
    }
}

fn watch(mm: &Mm) -> (Arc<Mirror>, IntervalNotifier) {
    let mirror = Arc::new(Mirror::default());
    let n = mm
        .interval_notifier_insert(VirtAddr::new(0), 1 << 47, mirror.clone())
        .unwrap();
    (mirror, n)
}

/// A range over `pfns.len()` pages from `start`, every page asking for `default_flags`,
/// with a fresh notifier sequence.
fn range<'a>(
    n: &'a IntervalSub,
    start: VirtAddr,
    pfns: &'a mut [HmmPfn],
    default_flags: HmmPfnFlags,
) -> HmmRange<'a> {
    common::hmm_range(n, start, pfns, default_flags, HmmPfnFlags::empty(), None)
}

/// Mirrors `npages` from `start` with the given requests through the driver loop, which
/// retries when a fault the call ran invalidates the range itself (a COW does).
fn run(
    mm: &Mm,
    (mirror, n): &(Arc<Mirror>, IntervalNotifier),
    start: VirtAddr,
    npages: u64,
    default_flags: HmmPfnFlags,
) -> Result<Vec<HmmPfn>, HmmError> {
    let mut pfns = vec![HmmPfn::default(); npages as usize];
    let mut range = range(n, start, &mut pfns, default_flags);
    fault_and_commit(
        mm,
        &mut range,
        HMM_RANGE_DEFAULT_TIMEOUT,
        &mirror.lock,
        |_, _| (),
    )?;
    Ok(pfns)
}

/// One `hmm_range_fault` call over `npages` from `start` with the given requests.
fn run_once(
    mm: &Mm,
    n: &IntervalNotifier,
    start: VirtAddr,
    npages: u64,
    default_flags: HmmPfnFlags,
) -> Result<Vec<HmmPfn>, HmmError> {
    let mut pfns = vec![HmmPfn::default(); npages as usize];
    let mut range = range(n, start, &mut pfns, default_flags);
    let mmap = mm.mmap_read();
    hmm_range_fault(&mmap, &mut range)?;
    Ok(pfns)
}

const SNAP: HmmPfnFlags = HmmPfnFlags::empty();
const READ: HmmPfnFlags = HmmPfnFlags::REQ_FAULT;
const WRITE: HmmPfnFlags = HmmPfnFlags::REQ_FAULT.union(HmmPfnFlags::REQ_WRITE);

#[test]
fn snapshot_reports_each_entry_kind_without_faulting() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    m.mm.read_val::<u8>(page(a, 1)).unwrap(); // zero page
    m.mm.write_val(page(a, 2), 7u8).unwrap(); // writable anon page
    let before = m.mm.stats();
    let out = run_once(&m.mm, &w.1, a, 4, SNAP).unwrap();
    let d = m.mm.stats().since(&before);
    assert_eq!(d.faults.total(), 0, "a snapshot never faults");
    assert_eq!(d.walk.walks, 1);
    assert_eq!(out[0], HmmPfn::default(), "none: 0 (faultable)");
    assert_eq!(out[1].flags(), HmmPfnFlags::VALID);
    assert_eq!(out[1].frame_nr(), m.phys.zero_pfn().as_u64());
    assert_eq!(out[2].flags(), HmmPfnFlags::VALID | HmmPfnFlags::WRITE);
    assert_eq!(out[2].map_order(), 0);
    let mut b = [0u8];
    out[2].frame(&m.phys).unwrap().read(0, &mut b);
    assert_eq!(b, [7], "the word names the page the CPU maps");
    assert_eq!(out[3], HmmPfn::default());
}

#[test]
fn fault_mode_faults_what_the_request_needs() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let before = m.mm.stats();
    let out = run(&m.mm, &w, a, 4, READ).unwrap();
    assert!(out.iter().all(|p| p.flags() == HmmPfnFlags::VALID));
    assert!(out
        .iter()
        .all(|p| p.frame_nr() == m.phys.zero_pfn().as_u64()));
    let d = m.mm.stats().since(&before);
    assert_eq!(d.faults.anon_read_zero, 4);
    // No page table yet: the hole is faulted whole (hmm_vma_fault), then one more walk
    // writes the output. Each fault looks its entry up with a walk of its own.
    assert_eq!(d.walk.walks, 2 + d.faults.total());

    let before = m.mm.stats();
    let out = run(&m.mm, &w, a, 8, WRITE).unwrap();
    assert!(out
        .iter()
        .all(|p| p.flags() == HmmPfnFlags::VALID | HmmPfnFlags::WRITE));
    let d = m.mm.stats().since(&before);
    assert_eq!((d.faults.cow, d.faults.anon_write), (4, 4));
    // The CPU sees what the device would.
    out[5].frame(&m.phys).unwrap().write(0, &[0xab]);
    assert_eq!(m.mm.read_val::<u8>(page(a, 5)).unwrap(), 0xab);
    // Nothing left to fault: one walk.
    let before = m.mm.stats();
    run_once(&m.mm, &w.1, a, 8, WRITE).unwrap();
    assert_eq!(m.mm.stats().since(&before).walk.walks, 1);
    m.mm.audit().unwrap();
}

#[test]
fn per_page_requests_through_pfn_flags_mask() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    // Populate the page table, then empty the entries: a hole would be faulted whole.
    m.mm.write_val(a, 1u8).unwrap();
    m.mm.madvise(a, 4 * PAGE_SIZE, Advice::DontNeed).unwrap();
    let before = m.mm.stats();
    let mut pfns = vec![
        HmmPfn::request(HmmPfnFlags::empty()),
        HmmPfn::request(HmmPfnFlags::REQ_FAULT),
        HmmPfn::request(HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE),
        HmmPfn::request(HmmPfnFlags::DMA_MAPPED),
    ];
    let mut range = HmmRange {
        notifier: &w.1,
        notifier_seq: w.1.read_begin(),
        start: a,
        end: page(a, 4),
        hmm_pfns: &mut pfns,
        default_flags: HmmPfnFlags::empty(),
        pfn_flags_mask: HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE,
        dev_private_owner: None,
    };
    hmm_range_fault(&m.mm.mmap_read(), &mut range).unwrap();
    assert_eq!(pfns[0], HmmPfn::default());
    assert_eq!(pfns[1].flags(), HmmPfnFlags::VALID);
    assert_eq!(pfns[2].flags(), HmmPfnFlags::VALID | HmmPfnFlags::WRITE);
    assert_eq!(
        pfns[3].flags(),
        HmmPfnFlags::DMA_MAPPED,
        "sticky bits are kept"
    );
    let d = m.mm.stats().since(&before);
    assert_eq!((d.faults.anon_read_zero, d.faults.anon_write), (1, 1));
}

#[test]
fn holes_and_unreadable_vmas_are_errors_or_efault() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let a = m.map(3, RW, MapFlags::PRIVATE);
    m.mm.munmap(page(a, 1), PAGE_SIZE).unwrap();
    let out = run(&m.mm, &w, a, 3, SNAP).unwrap();
    assert_eq!(out[0], HmmPfn::default());
    assert_eq!(out[1].flags(), HmmPfnFlags::ERROR, "no VMA");
    assert_eq!(out[2], HmmPfn::default());
    assert_eq!(
        run(&m.mm, &w, a, 3, READ).unwrap_err(),
        HmmError::Fault { addr: page(a, 1) }
    );

    let none = m.map(2, Prot::NONE, MapFlags::PRIVATE);
    let out = run(&m.mm, &w, none, 2, SNAP).unwrap();
    assert!(out.iter().all(|p| p.flags() == HmmPfnFlags::ERROR));
    assert_eq!(
        run(&m.mm, &w, none, 2, READ).unwrap_err(),
        HmmError::Fault { addr: none }
    );

    let ro = m.map(2, Prot::READ, MapFlags::PRIVATE);
    assert_eq!(
        run(&m.mm, &w, ro, 2, WRITE).unwrap_err(),
        HmmError::Perm { addr: ro }
    );
    let out = run(&m.mm, &w, ro, 2, READ).unwrap();
    assert!(out.iter().all(|p| p.flags() == HmmPfnFlags::VALID));
    m.mm.audit().unwrap();
}

#[test]
fn mprotect_none_entries_read_as_not_present() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 1u8).unwrap();
    m.mm.mprotect(a, 2 * PAGE_SIZE, Prot::NONE).unwrap();
    let out = run(&m.mm, &w, a, 2, SNAP).unwrap();
    assert!(out.iter().all(|p| p.flags() == HmmPfnFlags::ERROR));
}

#[test]
fn thp_and_hugetlb_pages_carry_the_pmd_order() {
    let m = Machine::new(32);
    let w = watch(&m.mm);
    m.mm.set_thp_mode(ThpMode::Always);
    let t = m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE).unwrap();
    m.mm.write_val(t, 1u8).unwrap();
    assert_eq!(m.mm.stats().faults.thp_anon, 1);
    // A range starting inside the leaf.
    let out = run(&m.mm, &w, page(t, 3), PMD_NR - 3, SNAP).unwrap();
    let head = out[0].frame_nr() - 3;
    for (k, p) in out.iter().enumerate() {
        assert_eq!(p.flags(), HmmPfnFlags::VALID | HmmPfnFlags::WRITE);
        assert_eq!(p.map_order(), 9);
        assert_eq!(p.frame_nr(), head + 3 + k as u64);
    }
    // Huge zero page on read.
    let z = m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE).unwrap();
    let out = run(&m.mm, &w, z, 2, READ).unwrap();
    assert_eq!(m.mm.stats().faults.thp_zero, 1);
    assert!(out
        .iter()
        .all(|p| p.flags() == HmmPfnFlags::VALID && p.map_order() == 9));
    assert!(m
        .phys
        .is_huge_zero_pfn(hmm::addr::Pfn::new(out[1].frame_nr())));

    assert_eq!(m.phys.set_nr_hugepages(1), 1);
    let h =
        m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB)
            .unwrap();
    let out = run(&m.mm, &w, h, 4, WRITE).unwrap();
    assert!(out
        .iter()
        .all(|p| p.map_order() == 9 && p.flags() == HmmPfnFlags::VALID | HmmPfnFlags::WRITE));
    assert_eq!(m.mm.stats().faults.hugetlb, 1);
}

#[test]
fn gigantic_hugetlb_pages_carry_the_pud_order() {
    // A 1 GiB hugetlb page (hmm_vma_walk_hugetlb_entry reports huge_page_order).
    let m = Machine::new(3 << 10);
    let w = watch(&m.mm);
    let gig = hmm::phys::HugetlbSize::Size1G;
    assert_eq!(m.phys.set_nr_hugepages_of(gig, 1), 1);
    let flags = MapFlags::PRIVATE | MapFlags::HUGETLB | MapFlags::HUGE_1GB;
    let h = m.mm.mmap(None, 1 << 30, RW, flags).unwrap();
    // Not present yet: a snapshot reports nothing, and faults nothing in.
    let out = run(&m.mm, &w, page(h, 5), 2, SNAP).unwrap();
    assert!(out.iter().all(|p| p.flags().is_empty()));
    assert_eq!(m.mm.stats().faults.hugetlb, 0);
    // A read fault maps the whole page read-only; a range across a 2 MiB boundary inside
    // it reports consecutive frames of the one folio.
    let at = page(h, PMD_NR - 2);
    let out = run(&m.mm, &w, at, 4, READ).unwrap();
    assert_eq!(m.mm.stats().faults.hugetlb, 1);
    let first = out[0].frame_nr();
    for (k, p) in out.iter().enumerate() {
        assert_eq!((p.flags(), p.map_order()), (HmmPfnFlags::VALID, 18));
        assert_eq!(p.frame_nr(), first + k as u64);
    }
    // A write request makes it writable: the private page is exclusive, so it is reused.
    let out = run(&m.mm, &w, at, 4, WRITE).unwrap();
    assert!(out
        .iter()
        .all(|p| p.map_order() == 18 && p.flags() == HmmPfnFlags::VALID | HmmPfnFlags::WRITE));
    assert_eq!(out[0].frame_nr(), first);
    assert_eq!(m.mm.stats().faults.wp_reuse, 1);
}

#[test]
fn fork_cow_pages_are_read_only_until_a_write_fault() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let (mirror, n) = (&w.0, &w.1);
    let a = m.map(1, RW, MapFlags::PRIVATE);
    m.mm.write_val(a, 5u8).unwrap();
    let child = m.mm.fork().unwrap();
    let out = run(&m.mm, &w, a, 1, SNAP).unwrap();
    assert_eq!(
        out[0].flags(),
        HmmPfnFlags::VALID,
        "write-protected by fork"
    );
    let shared = out[0].frame_nr();
    let invalidations = *mirror.lock.lock();
    // The write fault copies the page under a CLEAR invalidation, which hits the caller's
    // own notifier: the call that faulted reports Busy, as the kernel's does.
    assert_eq!(run_once(&m.mm, n, a, 1, WRITE).unwrap_err(), HmmError::Busy);
    let out = run(&m.mm, &w, a, 1, WRITE).unwrap();
    assert_eq!(out[0].flags(), HmmPfnFlags::VALID | HmmPfnFlags::WRITE);
    assert_ne!(out[0].frame_nr(), shared, "the write fault copied the page");
    assert!(
        *mirror.lock.lock() > invalidations,
        "the COW invalidated the mirror"
    );
    assert_eq!(child.read_val::<u8>(a).unwrap(), 5);
    m.mm.audit().unwrap();
}

#[test]
fn shared_and_file_mappings() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let s = m.map(2, RW, MapFlags::SHARED);
    let out = run(&m.mm, &w, s, 2, READ).unwrap();
    // A shared read fault maps the page writable unless soft-dirty tracking needs the
    // first write; a fresh VMA tracks nothing.
    assert!(out.iter().all(|p| p.is_valid()));
    m.mm.write_val(s, 3u8).unwrap();
    let out = run(&m.mm, &w, s, 1, WRITE).unwrap();
    let mut b = [0u8];
    out[0].frame(&m.phys).unwrap().read(0, &mut b);
    assert_eq!(b, [3]);
}

#[test]
fn a_collision_before_the_walk_is_busy() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    let seq = w.1.read_begin();
    m.mm.madvise(a, PAGE_SIZE, Advice::DontNeed).unwrap();
    let mut pfns = vec![HmmPfn::default(); 2];
    let mut range = range(&w.1, a, &mut pfns, READ);
    // The sequence read before the invalidation, not the fresh one.
    range.notifier_seq = seq;
    assert_eq!(
        hmm_range_fault(&m.mm.mmap_read(), &mut range).unwrap_err(),
        HmmError::Busy
    );
}

#[test]
fn the_driver_loop_commits_only_consistent_results() {
    // A thread keeps dropping the pages while the loop mirrors them; every committed
    // result must name exactly the pages the CPU maps at commit time (checked under the
    // driver lock, which the invalidation takes before any entry changes).
    let m = Machine::new(32);
    let (mirror, n) = watch(&m.mm);
    let a = m.map(16, RW, MapFlags::PRIVATE);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                m.mm.write_val(page(a, i % 16), i as u8).unwrap();
                if i % 7 == 0 {
                    m.mm.madvise(a, 16 * PAGE_SIZE, Advice::DontNeed).unwrap();
                }
                i += 1;
            }
        });
        let mut committed = 0;
        for _ in 0..200 {
            let mut pfns = vec![HmmPfn::default(); 16];
            let mut range = range(&n, a, &mut pfns, WRITE);
            let r = fault_and_commit(
                &m.mm,
                &mut range,
                HMM_RANGE_DEFAULT_TIMEOUT,
                &mirror.lock,
                |_, r| {
                    // Under the driver lock: the CPU table still maps these pages.
                    let now = m.mm.pagemap(a, 16).unwrap();
                    for (k, p) in r.hmm_pfns.iter().enumerate() {
                        assert!(p.is_valid() && p.is_writable());
                        assert_eq!(now[k].pfn, Some(p.frame_nr()), "page {k}");
                    }
                },
            );
            match r {
                Ok(()) => committed += 1,
                Err(HmmError::Busy) => {}
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(committed > 0);
    });
    m.mm.audit().unwrap();
}

#[test]
fn the_driver_loop_gives_up_with_busy_after_its_timeout() {
    // The deadline is checked before every attempt, as the kernel's loop does: a zero
    // timeout gives Busy before anything is faulted.
    let m = Machine::new(16);
    let (mirror, n) = watch(&m.mm);
    let a = m.map(1, RW, MapFlags::PRIVATE);
    let mut pfns = vec![HmmPfn::default(); 1];
    let mut range = range(&n, a, &mut pfns, WRITE);
    let r = fault_and_commit(&m.mm, &mut range, Duration::ZERO, &mirror.lock, |_, _| ());
    assert_eq!(r, Err(HmmError::Busy));
    assert_eq!(m.mm.stats().faults.total(), 0);
}

/// A timeout too long to be added to the clock (`Duration::MAX`) means "no timeout"; it
/// used to overflow `Instant + Duration` and panic.
#[test]
fn a_timeout_too_long_to_represent_never_expires() {
    let m = Machine::new(16);
    let w = watch(&m.mm);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let mut pfns = vec![HmmPfn::default(); 4];
    let mut r = range(&w.1, a, &mut pfns, HmmPfnFlags::REQ_FAULT);
    fault_and_commit(&m.mm, &mut r, Duration::MAX, &w.0.lock, |_, r| {
        assert!(r.hmm_pfns.iter().all(|p| p.is_valid()));
    })
    .unwrap();
}
