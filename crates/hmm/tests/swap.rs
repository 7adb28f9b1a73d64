//! Swap and reclaim: pages written out by `MADV_PAGEOUT`, by the reclaim clock and by
//! kswapd, read back on a CPU fault, through fork, mremap, mprotect and munmap; what
//! `hmm_range_fault` and `migrate_vma` make of swap entries; the events mirrors see; the
//! uffd-wp bit on a swap entry; bytes, counters, slots and the audit checked each time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::migrate::{migrate_vma_setup, MigrateVma, MigrateVmaFlags};
use hmm::mm::userfaultfd::{PageFaultFlags, RegisterMode, UffdFeatures, UffdMsg, Userfaultfd};
use hmm::mm::{reclaim, Advice, Kswapd, MapFlags, MmError, MremapFlags, Prot, SwapKind, ThpMode};
use hmm::notifier::{
    IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent, NotifierRange,
};
use hmm::phys::SwapError;
use hmm::range_fault::{hmm_range_fault, HmmPfn, HmmPfnFlags, HmmRange};

fn swap_machine(mib: u64, swap_pages: u64) -> Machine {
    let m = Machine::new(mib);
    m.phys.swapon(swap_pages * PAGE_SIZE).unwrap();
    m
}

/// Writes `seed + i` at the start and the end of page `i`.
fn fill(m: &Machine, a: VirtAddr, pages: u64, seed: u64) {
    for i in 0..pages {
        m.mm.write_val(page(a, i), seed + i).unwrap();
        m.mm.write_val(page(a, i) + (PAGE_SIZE - 8), !(seed + i))
            .unwrap();
    }
}

fn check(mm: &hmm::mm::Mm, a: VirtAddr, pages: u64, seed: u64) {
    for i in 0..pages {
        assert_eq!(
            mm.read_val::<u64>(page(a, i)).unwrap(),
            seed + i,
            "page {i}"
        );
        assert_eq!(
            mm.read_val::<u64>(page(a, i) + (PAGE_SIZE - 8)).unwrap(),
            !(seed + i),
            "page {i}"
        );
    }
}

fn swapped(mm: &hmm::mm::Mm, a: VirtAddr, pages: u64) -> usize {
    mm.pagemap(a, pages)
        .unwrap()
        .iter()
        .filter(|e| e.swap == Some(SwapKind::Swap))
        .count()
}

#[test]
fn pageout_writes_pages_out_and_a_fault_reads_them_back() {
    let m = swap_machine(16, 256);
    let a = m.map(64, RW, MapFlags::PRIVATE);
    fill(&m, a, 64, 1000);
    let before = m.mm.stats();
    let used = m.phys.nr_in_use();
    m.mm.madvise(a, 64 * PAGE_SIZE, Advice::PageOut).unwrap();
    assert_eq!(swapped(&m.mm, a, 64), 64);
    assert_eq!(m.phys.nr_in_use(), used - 64, "the frames are free");
    let s = m.phys.swap().unwrap().stats();
    assert_eq!((s.used, s.swapped_out), (64, 64));
    // Each page's mapping went under a CLEAR invalidation.
    let d = m.mm.stats().since(&before);
    assert!(d.notifier.of(NotifierEvent::Clear) >= 1);
    let pm = m.mm.pagemap(a, 1).unwrap()[0];
    assert!(!pm.present && pm.pfn.is_some());
    assert_eq!(pm.to_bits() >> 62 & 1, 1, "PM_SWAP");
    m.mm.audit().unwrap();
    check(&m.mm, a, 64, 1000);
    let d = m.mm.stats().since(&before);
    assert_eq!(d.faults.swap_in, 64);
    let s = m.phys.swap().unwrap().stats();
    assert_eq!(
        (s.used, s.swapped_in),
        (0, 64),
        "every slot freed on the way in"
    );
    // Swapped in by a read, exclusive: the write that follows needs no copy.
    let allocated = m.mm.stats().frames_allocated;
    m.mm.write_val(page(a, 3), 7u64).unwrap();
    assert_eq!(m.mm.stats().frames_allocated, allocated);
    m.mm.audit().unwrap();
}

#[test]
fn swap_entries_go_through_fork_mremap_mprotect_and_munmap() {
    let m = swap_machine(16, 256);
    let a = m.map(16, RW, MapFlags::PRIVATE);
    fill(&m, a, 16, 1);
    m.mm.madvise(a, 16 * PAGE_SIZE, Advice::PageOut).unwrap();
    // fork: the slots are shared (count 2), the entries no longer exclusive.
    let child = m.mm.fork().unwrap();
    assert_eq!(swapped(&child, a, 16), 16);
    m.mm.audit().unwrap();
    child.audit().unwrap();
    // Each side reads its own copy; a write in one is not seen by the other.
    child.write_val(page(a, 2), 99u64).unwrap();
    check(&m.mm, a, 2, 1);
    assert_eq!(m.mm.read_val::<u64>(page(a, 2)).unwrap(), 3);
    assert_eq!(child.read_val::<u64>(page(a, 2)).unwrap(), 99);
    // mprotect and mremap keep the entries; the bytes come back at the new place.
    m.mm.mprotect(a, 16 * PAGE_SIZE, Prot::READ).unwrap();
    m.mm.mprotect(a, 16 * PAGE_SIZE, RW).unwrap();
    let to =
        m.mm.mremap(
            a,
            16 * PAGE_SIZE,
            16 * PAGE_SIZE,
            MremapFlags::MAYMOVE | MremapFlags::FIXED,
            Some(VirtAddr::new(0x6000_0000_0000)),
        )
        .unwrap();
    assert!(swapped(&m.mm, to, 16) >= 13);
    check(&m.mm, to, 16, 1);
    m.mm.audit().unwrap();
    // munmap of the child frees its counts: every slot is free at the end.
    child.munmap(a, 16 * PAGE_SIZE).unwrap();
    assert_eq!(m.phys.swap().unwrap().stats().used, 0);
    child.audit().unwrap();
}

#[test]
fn the_clock_writes_cold_pages_first() {
    let m = swap_machine(16, 256);
    let hot = m.map(32, RW, MapFlags::PRIVATE);
    let cold = m.map(32, RW, MapFlags::PRIVATE);
    fill(&m, hot, 32, 0);
    fill(&m, cold, 32, 500);
    m.mm.madvise(cold, 32 * PAGE_SIZE, Advice::Cold).unwrap();
    let r = reclaim(&m.phys, 32);
    assert_eq!(r.reclaimed, 32);
    assert_eq!(swapped(&m.mm, cold, 32), 32, "{r:?}");
    assert_eq!(swapped(&m.mm, hot, 32), 0, "{r:?}");
    // The hot pages were aged on the way: with no access since, they go next.
    let r = reclaim(&m.phys, 32);
    assert_eq!(r.reclaimed, 32, "{r:?}");
    assert_eq!(swapped(&m.mm, hot, 32), 32);
    check(&m.mm, hot, 32, 0);
    check(&m.mm, cold, 32, 500);
    m.mm.audit().unwrap();
    // Nothing to write without a swap device.
    let plain = Machine::new(16);
    let p = plain.map(4, RW, MapFlags::PRIVATE);
    fill(&plain, p, 4, 0);
    assert_eq!(reclaim(&plain.phys, 4).reclaimed, 0);
    plain.mm.madvise(p, 4 * PAGE_SIZE, Advice::PageOut).unwrap();
    assert_eq!(swapped(&plain.mm, p, 4), 0);
}

#[test]
fn thps_are_split_and_written_out() {
    let m = swap_machine(32, 1024);
    m.mm.set_thp_mode(ThpMode::Always);
    let a =
        m.mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let a = a.align_up(PMD_SIZE).unwrap();
    fill(&m, a, PMD_NR, 77);
    assert_eq!(m.mm.pagemap(a, 1).unwrap()[0].order, 9);
    m.mm.madvise(a, PMD_SIZE, Advice::PageOut).unwrap();
    assert_eq!(swapped(&m.mm, a, PMD_NR), PMD_NR as usize);
    assert!(m.mm.stats().thp_split_folio >= 1);
    check(&m.mm, a, PMD_NR, 77);
    m.mm.audit().unwrap();
}

#[test]
fn shared_and_pinned_pages_stay() {
    let m = swap_machine(16, 256);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    fill(&m, a, 4, 0);
    let pinned = m.mm.pin_user_pages(a, 1, hmm::mm::GupFlags::WRITE).unwrap();
    let child = m.mm.fork().unwrap();
    // Page 0 is pinned (copied at fork, still pinned); pages 1-3 are shared with the
    // child: MADV_PAGEOUT leaves both kinds.
    m.mm.madvise(a, 4 * PAGE_SIZE, Advice::PageOut).unwrap();
    assert_eq!(swapped(&m.mm, a, 4), 0);
    // Global reclaim writes shared pages out of both address spaces at once.
    drop(pinned);
    let r = reclaim(&m.phys, 1000);
    assert!(r.reclaimed >= 3, "{r:?}");
    assert_eq!(swapped(&child, page(a, 1), 3), 3);
    check(&child, a, 4, 0);
    check(&m.mm, a, 4, 0);
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn hmm_range_fault_reads_swap_entries_as_not_present_or_faults_them_in() {
    struct Seq;
    impl IntervalNotifierOps for Seq {
        fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
            sub.set_seq(seq);
            true
        }
    }
    let m = swap_machine(16, 64);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    fill(&m, a, 8, 5);
    let n =
        m.mm.interval_notifier_insert(a, 8 * PAGE_SIZE, Arc::new(Seq))
            .unwrap();
    m.mm.madvise(a, 4 * PAGE_SIZE, Advice::PageOut).unwrap();
    let mut pfns = [HmmPfn::default(); 8];
    let mut range = HmmRange {
        notifier: &n,
        notifier_seq: n.read_begin(),
        start: a,
        end: page(a, 8),
        hmm_pfns: &mut pfns,
        default_flags: HmmPfnFlags::empty(),
        pfn_flags_mask: HmmPfnFlags::empty(),
        dev_private_owner: None,
    };
    hmm_range_fault(&m.mm.mmap_read(), &mut range).unwrap();
    let valid: Vec<bool> = range.hmm_pfns.iter().map(|w| w.is_valid()).collect();
    assert_eq!(valid, [false, false, false, false, true, true, true, true]);
    assert_eq!(m.mm.stats().faults.swap_in, 0);
    range.default_flags = HmmPfnFlags::REQ_FAULT;
    range.notifier_seq = n.read_begin();
    hmm_range_fault(&m.mm.mmap_read(), &mut range).unwrap();
    assert!(range.hmm_pfns.iter().all(|w| w.is_valid()));
    assert_eq!(m.mm.stats().faults.swap_in, 4);
    check(&m.mm, a, 8, 5);
}

#[test]
fn migrate_vma_leaves_swap_entries_alone() {
    let m = swap_machine(16, 64);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    fill(&m, a, 8, 5);
    m.mm.madvise(a, 4 * PAGE_SIZE, Advice::PageOut).unwrap();
    let guard = m.mm.mmap_read();
    let mig = migrate_vma_setup(
        &guard,
        MigrateVma {
            start: a,
            end: page(a, 8),
            pgmap_owner: None,
            flags: MigrateVmaFlags::SELECT_SYSTEM,
            fault_page: None,
        },
    )
    .unwrap();
    let migrating: Vec<bool> = mig.src().iter().map(|w| w.is_migrating()).collect();
    assert_eq!(
        migrating,
        [false, false, false, false, true, true, true, true]
    );
    assert_eq!(mig.cpages(), 4);
    drop(mig);
    drop(guard);
    assert_eq!(swapped(&m.mm, a, 8), 4);
    check(&m.mm, a, 8, 5);
    m.mm.audit().unwrap();
}

#[test]
fn the_write_protect_bit_survives_a_trip_through_swap() {
    let m = swap_machine(16, 64);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    fill(&m, a, 4, 40);
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    uffd.register(a, 4 * PAGE_SIZE, RegisterMode::WP).unwrap();
    uffd.writeprotect(a, 4 * PAGE_SIZE, true, false).unwrap();
    m.mm.madvise(a, 4 * PAGE_SIZE, Advice::PageOut).unwrap();
    let pm = m.mm.pagemap(a, 4).unwrap();
    assert!(pm
        .iter()
        .all(|e| e.swap == Some(SwapKind::Swap) && e.uffd_wp));
    m.mm.audit().unwrap();
    // A write faults the page in (write-protected still), then traps to the handler.
    std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.write_val(page(a, 1), 1u64));
        let UffdMsg::PageFault { address, flags } = uffd.read() else {
            panic!()
        };
        assert_eq!(address, page(a, 1));
        assert!(flags.contains(PageFaultFlags::WP));
        uffd.writeprotect(address, PAGE_SIZE, false, false).unwrap();
        h.join().unwrap().unwrap();
    });
    assert_eq!(m.mm.read_val::<u64>(page(a, 1)).unwrap(), 1);
    check(&m.mm, page(a, 2), 2, 42);
    m.mm.audit().unwrap();
}

#[test]
fn kswapd_keeps_the_free_frames_above_the_low_mark() {
    // 16 MiB: 4096 frames; marks at 1024 and 1536 free.
    let m = swap_machine(16, 8192);
    m.phys.watermarks().set(1024, 1536);
    let kswapd = Kswapd::start(m.phys.clone());
    // Write more than fits above the low mark.
    let pages = m.phys.nr_free() - 512;
    let a = m.map(pages, RW, MapFlags::PRIVATE);
    let mut i = 0;
    while i < pages {
        match m.mm.write_val(page(a, i), i) {
            Ok(()) => i += 1,
            // kswapd is behind: give it a moment, as an allocation would wait in reclaim.
            Err(hmm::mm::FaultError::Oom { .. }) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("{e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.phys.nr_free() < 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = kswapd.stop();
    assert!(r.reclaimed > 0, "{r:?}");
    assert!(m.phys.nr_free() >= 1024, "free {}", m.phys.nr_free());
    for i in (0..pages).step_by(7) {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), i);
    }
    m.mm.audit().unwrap();
}

#[test]
fn bad_arguments_are_typed_errors() {
    let m = Machine::new(16);
    assert_eq!(m.phys.swapon(0), Err(SwapError::Inval));
    assert_eq!(m.phys.swapon(100), Err(SwapError::Inval));
    m.phys.swapon(PAGE_SIZE).unwrap();
    assert_eq!(m.phys.swapon(PAGE_SIZE), Err(SwapError::Busy));
    let a = m.map(4, RW, MapFlags::PRIVATE);
    fill(&m, a, 4, 0);
    // A one-slot device: one page goes, the others stay.
    m.mm.madvise(a, 4 * PAGE_SIZE, Advice::PageOut).unwrap();
    assert_eq!(swapped(&m.mm, a, 4), 1);
    check(&m.mm, a, 4, 0);
    assert!(matches!(
        m.mm.madvise(page(a, 2), 8 * PAGE_SIZE, Advice::PageOut),
        Err(MmError::NoMem { .. })
    ));
    assert_eq!(m.phys.set_nr_hugepages(1), 1);
    let h =
        m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB)
            .unwrap();
    for advice in [Advice::Cold, Advice::PageOut] {
        assert!(matches!(
            m.mm.madvise(h, PMD_SIZE, advice),
            Err(MmError::Inval { .. })
        ));
    }
    m.mm.audit().unwrap();
}

/// `khugepaged.c`'s swap cases in the `MADV_COLLAPSE` context (`collapse_swapin_single_pte`,
/// `collapse_max_ptes_swap`, which has no limit there): the swapped-out pages are read
/// back and the range becomes one THP, every byte kept.
#[test]
fn madv_collapse_reads_swapped_pages_back() {
    let m = swap_machine(32, 1024);
    m.mm.set_thp_mode(ThpMode::Madvise);
    let a =
        m.mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let a = a.align_up(PMD_SIZE).unwrap();
    fill(&m, a, PMD_NR, 9);
    for (out, first) in [(1, 0), (65, 100)] {
        m.mm.madvise(page(a, first), out * PAGE_SIZE, Advice::PageOut)
            .unwrap();
        // Only the pages asked for: the THP is split, the rest stay in memory.
        assert_eq!(swapped(&m.mm, a, PMD_NR), out as usize);
        m.mm.madvise(a, PMD_SIZE, Advice::Collapse).unwrap();
        let map = m.mm.pagemap(a, PMD_NR).unwrap();
        assert!(
            map.iter().all(|e| e.present && e.order == 9),
            "{out} swapped"
        );
        check(&m.mm, a, PMD_NR, 9);
        m.mm.audit().unwrap();
        // Split it again for the next round.
        m.mm.mprotect(a, PAGE_SIZE, Prot::READ).unwrap();
        m.mm.mprotect(a, PAGE_SIZE, RW).unwrap();
    }
    assert_eq!(m.phys.swap().unwrap().stats().used, 0);
}

/// `MADV_PAGEOUT` of exactly one 2 MiB leaves the THP after it alone: only leaves the
/// range covers in part are split.
#[test]
fn pageout_of_one_thp_leaves_the_next_one_whole() {
    let m = swap_machine(32, 1024);
    m.mm.set_thp_mode(ThpMode::Always);
    let a =
        m.mm.mmap(None, 3 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let a = a.align_up(PMD_SIZE).unwrap();
    fill(&m, a, 2 * PMD_NR, 3);
    m.mm.madvise(a, PMD_SIZE, Advice::PageOut).unwrap();
    assert_eq!(swapped(&m.mm, a, PMD_NR), PMD_NR as usize);
    let next = m.mm.pagemap(a + PMD_SIZE, PMD_NR).unwrap();
    assert!(next.iter().all(|e| e.present && e.order == 9));
    check(&m.mm, a, 2 * PMD_NR, 3);
    m.mm.audit().unwrap();
}
