//! userfaultfd: missing-page and write-protect faults resolved by a handler thread, the
//! fills and moves, the non-cooperative events, the uffd-wp bit through every change of
//! an entry that keeps the mapping, and the bad arguments, each with bytes, counters and
//! the audit checked.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::mm::userfaultfd::{
    CopyMode, MoveMode, PageFaultFlags, RegisterMode, UffdError, UffdFeatures, UffdIoctls, UffdMsg,
    Userfaultfd,
};
use hmm::mm::{
    Advice, FaultError, FaultFlags, GupFlags, MapFlags, MemFile, MmError, MremapFlags, Prot,
};
use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange};
use hmm::range_fault::{
    hmm_range_fault, hmm_range_fault_unlocked_timeout, HmmError, HmmPfn, HmmPfnFlags, HmmRange,
};

const PG: usize = PAGE_SIZE as usize;

/// A handler thread: answers every page fault with `UFFDIO_COPY` of a page of
/// `fill(page)` until `stop`, and counts what it answered.
fn serve<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    uffd: &'s Userfaultfd,
    stop: &'s AtomicBool,
    fill: impl Fn(VirtAddr) -> u8 + Send + 's,
) -> std::thread::ScopedJoinHandle<'s, Vec<(VirtAddr, PageFaultFlags)>> {
    s.spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let Some(msg) = uffd.read_timeout(Duration::from_millis(5)) else {
                continue;
            };
            let UffdMsg::PageFault { address, flags } = msg else {
                panic!("unexpected {msg:?}")
            };
            seen.push((address, flags));
            if flags.contains(PageFaultFlags::WP) {
                uffd.writeprotect(address, PAGE_SIZE, false, false).unwrap();
            } else {
                match uffd.copy(address, &[fill(address); PG], CopyMode::empty()) {
                    // Two threads faulted on the page: the first copy served both.
                    Ok(_) | Err(UffdError::Exists { .. }) => {}
                    Err(e) => panic!("copy: {e}"),
                }
            }
        }
        seen
    })
}

fn missing(m: &Machine, pages: u64) -> (VirtAddr, Userfaultfd) {
    let a = m.map(pages, RW, MapFlags::PRIVATE);
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    let ioctls = uffd
        .register(a, pages * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    assert!(ioctls.contains(UffdIoctls::COPY | UffdIoctls::ZEROPAGE | UffdIoctls::WAKE));
    assert!(!ioctls.contains(UffdIoctls::WRITEPROTECT));
    (a, uffd)
}

#[test]
fn cpu_reads_and_writes_of_missing_pages_wait_for_the_handler() {
    let m = Machine::new(16);
    let (a, uffd) = missing(&m, 8);
    let stop = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let h = serve(s, &uffd, &stop, |va| (va.as_u64() / PAGE_SIZE) as u8);
        // A read across four pages, then a write to a fifth.
        let mut buf = vec![0u8; 4 * PG];
        m.mm.read(a, &mut buf).unwrap();
        for (i, chunk) in buf.chunks(PG).enumerate() {
            let want = (page(a, i as u64).as_u64() / PAGE_SIZE) as u8;
            assert!(chunk.iter().all(|&b| b == want), "page {i}");
        }
        m.mm.write_val(page(a, 5) + 8, 0xfeed_u64).unwrap();
        stop.store(true, Ordering::Release);
        h.join().unwrap()
    });
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[4], (page(a, 5), PageFaultFlags::WRITE));
    assert!(seen[..4].iter().all(|(_, f)| f.is_empty()));
    // The write landed on the handler's page.
    let mut p5 = vec![0u8; PG];
    m.mm.read(page(a, 5), &mut p5).unwrap();
    let want = (page(a, 5).as_u64() / PAGE_SIZE) as u8;
    assert_eq!(&p5[8..16], &0xfeed_u64.to_le_bytes());
    assert!(p5[..8].iter().chain(&p5[16..]).all(|&b| b == want));
    let st = m.mm.stats();
    assert_eq!((st.uffd.faults, st.uffd.filled), (5, 5));
    // No zero page and no fresh page: every page came from the handler.
    assert_eq!(st.faults.anon_read_zero + st.faults.anon_write, 0);
    assert_eq!(uffd.waiting(), 0);
    m.mm.audit().unwrap();
}

#[test]
fn exact_address_reports_the_faulting_byte() {
    let m = Machine::new(16);
    let a = m.map(2, RW, MapFlags::PRIVATE);
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::EXACT_ADDRESS).unwrap();
    uffd.register(a, 2 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.read_val::<u32>(page(a, 1) + 100).unwrap());
        let UffdMsg::PageFault { address, .. } = uffd.read() else {
            panic!()
        };
        assert_eq!(address, page(a, 1) + 100);
        uffd.zeropage(page(a, 1), PAGE_SIZE, CopyMode::empty())
            .unwrap();
        assert_eq!(h.join().unwrap(), 0);
    });
    // The zero page, read-only: a write faults again, now as a normal COW.
    let pm = m.mm.pagemap(page(a, 1), 1).unwrap()[0];
    assert_eq!(pm.pfn, Some(m.phys.zero_pfn().as_u64()));
    m.mm.write_val(page(a, 1), 7u8).unwrap();
    assert_eq!(m.mm.stats().uffd.faults, 1);
    m.mm.audit().unwrap();
}

#[test]
fn shared_memory_fills_go_into_the_object_and_cached_pages_never_fault() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::SHARED);
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    uffd.register(a, 4 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    // A page put there before registration is in the object: no fault for it.
    uffd.copy(page(a, 0), &[0x11; PG], CopyMode::empty())
        .unwrap();
    m.mm.madvise(page(a, 0), PAGE_SIZE, Advice::DontNeed)
        .unwrap();
    assert_eq!(m.mm.read_val::<u8>(page(a, 0)).unwrap(), 0x11);
    assert_eq!(m.mm.stats().uffd.faults, 0);
    // A child sharing the object sees the handler's page.
    let child = m.mm.fork().unwrap();
    uffd.zeropage(page(a, 1), PAGE_SIZE, CopyMode::empty())
        .unwrap();
    assert_eq!(child.read_val::<u8>(page(a, 0)).unwrap(), 0x11);
    assert_eq!(
        uffd.copy(page(a, 1), &[1; PG], CopyMode::empty()),
        Err(UffdError::Exists { addr: page(a, 1) })
    );
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn copy_and_zeropage_refuse_bad_arguments_and_stop_at_a_populated_page() {
    let m = Machine::new(16);
    let (a, uffd) = missing(&m, 4);
    let other = m.map(1, RW, MapFlags::PRIVATE);
    let inval = |r: Result<u64, UffdError>| matches!(r, Err(UffdError::Inval { .. }));
    assert!(inval(uffd.copy(a + 1, &[0; PG], CopyMode::empty())));
    assert!(inval(uffd.copy(a, &[0; 100], CopyMode::empty())));
    assert!(inval(uffd.copy(a, &[], CopyMode::empty())));
    assert!(inval(uffd.zeropage(a, PAGE_SIZE, CopyMode::WP)));
    assert!(inval(uffd.copy(a, &[0; PG], CopyMode::WP)));
    assert!(inval(uffd.copy(
        VirtAddr::new(hmm::addr::TASK_SIZE - PAGE_SIZE),
        &[0; 2 * PG],
        CopyMode::empty()
    )));
    assert!(matches!(
        uffd.copy(other, &[0; PG], CopyMode::empty()),
        Err(UffdError::NoEnt { .. })
    ));
    // Past the VMA's end.
    assert!(matches!(
        uffd.copy(page(a, 3), &[0; 2 * PG], CopyMode::empty()),
        Err(UffdError::NoEnt { .. })
    ));
    // Page 2 populated: a copy of 0..4 does two pages, then stops.
    assert_eq!(
        uffd.zeropage(page(a, 2), PAGE_SIZE, CopyMode::empty()),
        Ok(PAGE_SIZE)
    );
    let r = uffd.copy(a, &[5; 4 * PG], CopyMode::empty());
    assert_eq!(
        r,
        Err(UffdError::Again {
            done: 2 * PAGE_SIZE
        })
    );
    assert_eq!(r.unwrap_err().errno(), libc::EAGAIN);
    assert_eq!(
        uffd.copy(page(a, 2), &[5; PG], CopyMode::empty()),
        Err(UffdError::Exists { addr: page(a, 2) })
    );
    assert_eq!(m.mm.read_val::<u8>(page(a, 1)).unwrap(), 5);
    m.mm.audit().unwrap();
}

#[test]
fn registration_checks_the_memory_and_the_owner() {
    let m = Machine::new(32);
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let inval = |r: Result<UffdIoctls, UffdError>| matches!(r, Err(UffdError::Inval { .. }));
    assert!(inval(uffd.register(a, 0, RegisterMode::MISSING)));
    assert!(inval(uffd.register(
        a + 1,
        PAGE_SIZE,
        RegisterMode::MISSING
    )));
    assert!(inval(uffd.register(a, PAGE_SIZE, RegisterMode::empty())));
    // Nothing mapped there.
    assert!(inval(uffd.register(
        VirtAddr::new(0x1000_0000),
        PAGE_SIZE,
        RegisterMode::MISSING
    )));
    // Shared memory takes missing mode only; hugetlb none.
    let sh = m.map(2, RW, MapFlags::SHARED);
    assert!(inval(uffd.register(sh, 2 * PAGE_SIZE, RegisterMode::WP)));
    uffd.register(sh, 2 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    // A second userfaultfd cannot take a registered range.
    let second = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    uffd.register(page(a, 1), PAGE_SIZE, RegisterMode::WP)
        .unwrap();
    assert!(matches!(
        second.register(a, 4 * PAGE_SIZE, RegisterMode::MISSING),
        Err(UffdError::Busy { .. })
    ));
    // Registration split the VMA at the page; unregistering merges it back.
    let around_a = |m: &Machine| {
        m.mm.vmas()
            .into_iter()
            .find(|v| v.range().contains(a))
            .unwrap()
            .range()
    };
    assert_eq!(around_a(&m).end(), page(a, 1));
    let before = m.mm.vmas().len();
    uffd.unregister(a, 4 * PAGE_SIZE).unwrap();
    assert!(m.mm.vmas().len() < before);
    assert_eq!(around_a(&m).end(), page(a, 4));
    second
        .register(a, 4 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    m.mm.audit().unwrap();
}

#[test]
fn the_locked_hmm_range_fault_fails_where_the_unlocked_one_waits() {
    struct Seq;
    impl IntervalNotifierOps for Seq {
        fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
            sub.set_seq(seq);
            true
        }
    }
    let m = Machine::new(16);
    let (a, uffd) = missing(&m, 4);
    let n =
        m.mm.interval_notifier_insert(a, 4 * PAGE_SIZE, Arc::new(Seq))
            .unwrap();
    let mut pfns = [HmmPfn::default(); 4];
    let mut range = HmmRange {
        notifier: &n,
        notifier_seq: n.read_begin(),
        start: a,
        end: page(a, 4),
        hmm_pfns: &mut pfns,
        default_flags: HmmPfnFlags::REQ_FAULT,
        pfn_flags_mask: HmmPfnFlags::empty(),
        dev_private_owner: None,
    };
    // hmm_range_fault holds the mmap lock: the fault may not wait (SIGBUS, -EFAULT).
    assert_eq!(
        hmm_range_fault(&m.mm.mmap_read(), &mut range),
        Err(HmmError::Fault { addr: a })
    );
    assert_eq!(uffd.waiting(), 0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = serve(s, &uffd, &stop, |_| 0xab);
        hmm_range_fault_unlocked_timeout(&m.mm, &mut range, Duration::ZERO).unwrap();
        stop.store(true, Ordering::Release);
        assert_eq!(h.join().unwrap().len(), 4);
    });
    assert!(!n.read_retry(range.notifier_seq));
    assert!(range.hmm_pfns.iter().all(|w| w.is_valid()));
    let mut buf = vec![0u8; 4 * PG];
    m.mm.read(a, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    // The same through GUP, which takes the lock itself: it waits too.
    let b = m.map(2, RW, MapFlags::PRIVATE);
    uffd.register(b, 2 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = serve(s, &uffd, &stop, |_| 0xcd);
        let pages = m.mm.pin_user_pages(b, 2, GupFlags::WRITE).unwrap();
        let mut one = [0u8; 1];
        pages.read(1, 0, &mut one);
        assert_eq!(one[0], 0xcd);
        drop(pages);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    m.mm.audit().unwrap();
}

#[test]
fn closing_the_userfaultfd_lets_the_waiting_fault_go_on_without_it() {
    let m = Machine::new(16);
    let (a, uffd) = missing(&m, 2);
    std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.read_val::<u64>(a));
        while uffd.waiting() == 0 {
            std::thread::yield_now();
        }
        drop(uffd);
        // Unregistered now: the retried fault maps the zero page.
        assert_eq!(h.join().unwrap(), Ok(0));
    });
    assert!(m
        .mm
        .vmas()
        .iter()
        .all(|v| !v.flags().intersects(hmm::prot::VmFlags::UFFD)));
    m.mm.audit().unwrap();
}

#[test]
fn a_fatal_signal_ends_the_wait() {
    let m = Machine::new(16);
    let (a, uffd) = missing(&m, 2);
    std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.read_val::<u64>(page(a, 1)));
        while uffd.waiting() == 0 {
            std::thread::yield_now();
        }
        m.mm.kill();
        assert_eq!(
            h.join().unwrap(),
            Err(FaultError::Killed { addr: page(a, 1) })
        );
    });
    assert_eq!(
        m.mm.fixup_user_fault(a, FaultFlags::empty()),
        Err(FaultError::Killed { addr: a })
    );
    assert!(matches!(
        m.mm.pin_user_pages(a, 1, GupFlags::empty()),
        Err(MmError::Intr { .. })
    ));
    drop(uffd);
}

#[test]
fn write_protect_traps_writes_until_the_handler_releases_the_page() {
    let m = Machine::new(16);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    for i in 0..4 {
        m.mm.write_val(page(a, i), i).unwrap();
    }
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    let ioctls = uffd.register(a, 4 * PAGE_SIZE, RegisterMode::WP).unwrap();
    assert!(ioctls.contains(UffdIoctls::WRITEPROTECT));
    assert!(matches!(
        uffd.writeprotect(a, PAGE_SIZE, true, true),
        Err(UffdError::Inval { .. })
    ));
    let before = m.mm.stats();
    uffd.writeprotect(a, 4 * PAGE_SIZE, true, false).unwrap();
    let d = m.mm.stats().since(&before);
    assert_eq!(
        d.notifier.of(hmm::notifier::NotifierEvent::ProtectionVma),
        1
    );
    assert!(m.mm.pagemap(a, 4).unwrap().iter().all(|e| e.uffd_wp));
    // Reads go on; a write waits for the handler.
    assert_eq!(m.mm.read_val::<u64>(page(a, 2)).unwrap(), 2);
    let stop = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let h = serve(s, &uffd, &stop, |_| 0);
        m.mm.write_val(page(a, 2), 42u64).unwrap();
        stop.store(true, Ordering::Release);
        h.join().unwrap()
    });
    assert_eq!(
        seen,
        vec![(page(a, 2), PageFaultFlags::WRITE | PageFaultFlags::WP)]
    );
    assert_eq!(m.mm.read_val::<u64>(page(a, 2)).unwrap(), 42);
    let pm = m.mm.pagemap(a, 4).unwrap();
    assert_eq!(
        pm.iter().map(|e| e.uffd_wp).collect::<Vec<_>>(),
        [true, true, false, true]
    );
    // Released, the exclusive page was made writable again: no COW, no new frame.
    assert_eq!(m.mm.stats().since(&before).frames_allocated, 0);
    // Unregistering clears the bits; writes go through.
    uffd.unregister(a, 4 * PAGE_SIZE).unwrap();
    assert!(m.mm.pagemap(a, 4).unwrap().iter().all(|e| !e.uffd_wp));
    m.mm.write_val(page(a, 0), 1u64).unwrap();
    m.mm.audit().unwrap();
}

#[test]
fn the_uffd_wp_bit_survives_mprotect_thp_splits_fork_and_mremap() {
    let m = Machine::new(64);
    m.mm.set_thp_mode(hmm::mm::ThpMode::Always);
    // Two PMDs: a THP and small pages.
    let a =
        m.mm.mmap(None, 3 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let a = a.align_up(PMD_SIZE).unwrap();
    m.mm.munmap(a + 2 * PMD_SIZE, PMD_SIZE).ok();
    for i in 0..2 * PMD_NR {
        m.mm.write_val(page(a, i), i).unwrap();
    }
    let feats = UffdFeatures::EVENT_FORK | UffdFeatures::EVENT_REMAP;
    let uffd = Userfaultfd::new(&m.mm, feats).unwrap();
    uffd.register(a, 2 * PMD_SIZE, RegisterMode::WP).unwrap();
    uffd.writeprotect(a, 2 * PMD_SIZE, true, false).unwrap();
    let all_wp = |mm: &hmm::mm::Mm, at: VirtAddr, n: u64| {
        mm.pagemap(at, n).unwrap().iter().all(|e| e.uffd_wp)
    };
    assert!(all_wp(&m.mm, a, 2 * PMD_NR));
    // mprotect read-only and back: still write-protected, never writable.
    m.mm.mprotect(a, 2 * PMD_SIZE, Prot::READ).unwrap();
    m.mm.mprotect(a, 2 * PMD_SIZE, RW).unwrap();
    assert!(all_wp(&m.mm, a, 2 * PMD_NR));
    m.mm.audit().unwrap();
    // mprotect of one page of the THP splits its PMD: every PTE keeps the bit.
    m.mm.mprotect(page(a, 3), PAGE_SIZE, Prot::READ).unwrap();
    m.mm.mprotect(page(a, 3), PAGE_SIZE, RW).unwrap();
    assert!(m.mm.stats().thp_split_pmd >= 1);
    assert!(all_wp(&m.mm, a, 2 * PMD_NR));
    m.mm.audit().unwrap();
    // Fork with fork events: the child keeps the bits, and its own userfaultfd arrives.
    let (child, child_uffd) = std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.fork().unwrap());
        let UffdMsg::Fork { child } = uffd.read() else {
            panic!()
        };
        (h.join().unwrap(), child)
    });
    assert!(all_wp(&child, a, 2 * PMD_NR));
    child.audit().unwrap();
    // A write in the child goes to the child's userfaultfd.
    std::thread::scope(|s| {
        let h = s.spawn(|| child.write_val(page(a, 7), 7u64));
        let UffdMsg::PageFault { address, flags } = child_uffd.read() else {
            panic!()
        };
        assert_eq!(
            (address, flags),
            (page(a, 7), PageFaultFlags::WRITE | PageFaultFlags::WP)
        );
        child_uffd
            .writeprotect(page(a, 7), PAGE_SIZE, false, false)
            .unwrap();
        h.join().unwrap().unwrap();
    });
    assert_eq!(uffd.try_read().unwrap_err(), UffdError::Again { done: 0 });
    // Without fork events the child's entries lose the bit.
    let plain = Userfaultfd::new(&child, UffdFeatures::empty()).unwrap();
    drop(child_uffd);
    plain.register(a, PMD_SIZE, RegisterMode::WP).unwrap();
    plain.writeprotect(a, PMD_SIZE, true, false).unwrap();
    let grandchild = child.fork().unwrap();
    assert!(grandchild
        .pagemap(a, PMD_NR)
        .unwrap()
        .iter()
        .all(|e| !e.uffd_wp));
    grandchild.audit().unwrap();
    // mremap with remap events: the moved entries keep the bit, and the handler is told.
    let to = VirtAddr::new(0x5000_0000_0000);
    let moved = std::thread::scope(|s| {
        let h = s.spawn(|| {
            m.mm.mremap(
                page(a, PMD_NR),
                16 * PAGE_SIZE,
                16 * PAGE_SIZE,
                MremapFlags::MAYMOVE | MremapFlags::FIXED,
                Some(to),
            )
        });
        let UffdMsg::Remap { from, to: got, len } = uffd.read() else {
            panic!()
        };
        assert_eq!((from, got, len), (page(a, PMD_NR), to, 16 * PAGE_SIZE));
        h.join().unwrap().unwrap()
    });
    assert!(all_wp(&m.mm, moved, 16));
    assert_eq!(m.mm.read_val::<u64>(moved).unwrap(), PMD_NR);
    m.mm.audit().unwrap();
    // Without remap events the moved VMA leaves the userfaultfd and the bits go.
    let to2 = VirtAddr::new(0x5100_0000_0000);
    plain.writeprotect(a, PMD_SIZE, true, false).unwrap();
    child
        .mremap(
            a,
            16 * PAGE_SIZE,
            16 * PAGE_SIZE,
            MremapFlags::MAYMOVE | MremapFlags::FIXED,
            Some(to2),
        )
        .unwrap();
    assert!(child.pagemap(to2, 16).unwrap().iter().all(|e| !e.uffd_wp));
    child.write_val(to2, 1u64).unwrap();
    child.audit().unwrap();
}

#[test]
fn remove_and_unmap_events_come_before_fills_go_on() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let uffd = Userfaultfd::new(
        &m.mm,
        UffdFeatures::EVENT_REMOVE | UffdFeatures::EVENT_UNMAP,
    )
    .unwrap();
    uffd.register(a, 8 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    uffd.copy(a, &[3; 8 * PG], CopyMode::empty()).unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.madvise(a, 2 * PAGE_SIZE, Advice::DontNeed));
        while !uffd.poll() {
            std::thread::yield_now();
        }
        // An event is unread: fills wait for the handler to see it (mmap_changing).
        assert_eq!(
            uffd.copy(page(a, 6), &[0; PG], CopyMode::empty()),
            Err(UffdError::Again { done: 0 })
        );
        let UffdMsg::Remove { start, end } = uffd.read() else {
            panic!()
        };
        assert_eq!((start, end), (a, page(a, 2)));
        h.join().unwrap().unwrap();
    });
    // Dropped pages are missing again: the next fault goes to the handler.
    uffd.copy(a, &[4; PG], CopyMode::empty()).unwrap();
    assert_eq!(m.mm.read_val::<u8>(a).unwrap(), 4);
    std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.munmap(page(a, 4), 4 * PAGE_SIZE));
        let UffdMsg::Unmap { start, end } = uffd.read() else {
            panic!()
        };
        assert_eq!((start, end), (page(a, 4), page(a, 8)));
        h.join().unwrap().unwrap();
    });
    m.mm.audit().unwrap();
}

#[test]
fn move_pages_moves_frames_and_refuses_shared_ones() {
    let m = Machine::new(16);
    let src = m.map(4, RW, MapFlags::PRIVATE);
    let (dst, uffd) = missing(&m, 8);
    for i in 0..3 {
        m.mm.write_val(page(src, i), 100 + i).unwrap();
    }
    let frames: Vec<_> =
        m.mm.pagemap(src, 3)
            .unwrap()
            .iter()
            .map(|e| e.pfn)
            .collect();
    let before = m.mm.stats();
    // Page 3 of the source is a hole.
    assert!(matches!(
        uffd.move_pages(dst, src, 4 * PAGE_SIZE, MoveMode::empty()),
        Err(UffdError::Again { done }) if done == 3 * PAGE_SIZE
    ));
    let d = m.mm.stats().since(&before);
    assert_eq!((d.uffd.moved, d.frames_allocated), (3, 0));
    assert_eq!(d.notifier.of(hmm::notifier::NotifierEvent::Clear), 3);
    let moved: Vec<_> =
        m.mm.pagemap(dst, 3)
            .unwrap()
            .iter()
            .map(|e| e.pfn)
            .collect();
    assert_eq!(moved, frames);
    for i in 0..3 {
        assert_eq!(m.mm.read_val::<u64>(page(dst, i)).unwrap(), 100 + i);
    }
    assert!(m.mm.pagemap(src, 3).unwrap().iter().all(|e| !e.present));
    m.mm.audit().unwrap();
    // Holes allowed: counted as moved.
    m.mm.write_val(page(src, 1), 7u64).unwrap();
    assert_eq!(
        uffd.move_pages(page(dst, 4), src, 2 * PAGE_SIZE, MoveMode::ALLOW_SRC_HOLES),
        Ok(2 * PAGE_SIZE)
    );
    assert_eq!(m.mm.read_val::<u64>(page(dst, 5)).unwrap(), 7);
    // A populated destination; overlapping ranges; a source shared with a child.
    m.mm.write_val(page(src, 2), 9u64).unwrap();
    assert_eq!(
        uffd.move_pages(dst, page(src, 2), PAGE_SIZE, MoveMode::empty()),
        Err(UffdError::Exists { addr: dst })
    );
    assert!(matches!(
        uffd.move_pages(dst, page(dst, 1), 2 * PAGE_SIZE, MoveMode::empty()),
        Err(UffdError::Inval { .. })
    ));
    let child = m.mm.fork().unwrap();
    assert!(matches!(
        uffd.move_pages(page(dst, 6), page(src, 2), PAGE_SIZE, MoveMode::empty()),
        Err(UffdError::Busy { .. })
    ));
    drop(child);
    m.mm.audit().unwrap();
}

#[test]
fn many_threads_fault_one_handler_serves() {
    let m = Machine::new(64);
    let pages = 256;
    let (a, uffd) = missing(&m, pages);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = serve(s, &uffd, &stop, |va| (va.as_u64() / PAGE_SIZE) as u8 ^ 0x5a);
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let mm = &m.mm;
                s.spawn(move || {
                    // Every thread touches every page, in its own order.
                    for k in 0..pages {
                        let i = (k * 7 + t * 61) % pages;
                        let want = (page(a, i).as_u64() / PAGE_SIZE) as u8 ^ 0x5a;
                        assert_eq!(mm.read_val::<u8>(page(a, i) + t).unwrap(), want);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        let seen = h.join().unwrap();
        assert!(seen.len() as u64 >= pages);
    });
    assert_eq!(m.mm.stats().uffd.filled, pages);
    assert_eq!(uffd.waiting(), 0);
    m.mm.audit().unwrap();
}

#[test]
fn private_file_mappings_fill_anonymous_pages_and_collapse_skips_armed_ranges() {
    let m = Machine::new(64);
    let f = MemFile::new(&m.phys);
    f.pwrite(0, &[1; 2 * PG]).unwrap();
    f.truncate(4 * PAGE_SIZE).unwrap();
    let a =
        m.mm.mmap_file(None, 4 * PAGE_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    uffd.register(a, 4 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    // Pages 0-1 are in the file: no fault. Page 2 is missing: a private copy fills it.
    assert_eq!(m.mm.read_val::<u8>(page(a, 1)).unwrap(), 1);
    uffd.copy(page(a, 2), &[2; PG], CopyMode::empty()).unwrap();
    assert_eq!(m.mm.read_val::<u8>(page(a, 2)).unwrap(), 2);
    let mut back = [0u8; 1];
    f.pread(2 * PAGE_SIZE, &mut back).unwrap();
    assert_eq!(back[0], 0, "the file did not get the private page");
    m.mm.audit().unwrap();
    // MADV_COLLAPSE leaves an armed VMA's missing pages to the handler.
    let b =
        m.mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let b = b.align_up(PMD_SIZE).unwrap();
    m.mm.write_val(b, 1u8).unwrap();
    uffd.register(b, PMD_SIZE, RegisterMode::MISSING).unwrap();
    assert!(matches!(
        m.mm.madvise(b, PMD_SIZE, Advice::Collapse),
        Err(MmError::Busy { .. })
    ));
}

/// Real threads against one handler: writers read and bump per-page versions (faulting
/// missing pages in, trapping on write-protected ones), a dropper makes pages missing
/// again with `MADV_DONTNEED` (a `Remove` event each), a protector write-protects pages,
/// and a pinner reads pages through GUP. The handler serves faults and events in any
/// order, retrying fills that meet an unread event (`EAGAIN`). Every read checks the
/// page's version; at the end nothing waits and the audit is clean. Iterations:
/// `HMM_STRESS_ITERS` (default 300 per thread).
#[test]
fn stress_faults_events_and_write_protection_against_one_handler() {
    use std::sync::Mutex;
    let iters: u64 = std::env::var("HMM_STRESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let pages = 32u64;
    let m = Machine::new(32);
    let a = m.map(pages, RW, MapFlags::PRIVATE);
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::EVENT_REMOVE).unwrap();
    uffd.register(
        a,
        pages * PAGE_SIZE,
        RegisterMode::MISSING | RegisterMode::WP,
    )
    .unwrap();
    // What page i must hold: its version; a missing page comes back at version 0.
    let versions: Vec<Mutex<u64>> = (0..pages).map(|_| Mutex::new(0)).collect();
    let content = |i: u64, v: u64| -> Vec<u8> {
        let mut b = vec![(i as u8) ^ (v as u8); PG];
        b[..8].copy_from_slice(&v.to_le_bytes());
        b
    };
    let stop = AtomicBool::new(false);
    let rng = |seed: u64| {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    };
    std::thread::scope(|s| {
        // The handler.
        s.spawn(|| {
            // Faults to fill and to release: a fill or a release that meets an unread
            // event (EAGAIN) waits until the handler has read it, so both wait here
            // while the handler goes on reading.
            let mut pending: Vec<VirtAddr> = Vec::new();
            let mut pending_wp: Vec<VirtAddr> = Vec::new();
            while !stop.load(Ordering::Acquire) || uffd.waiting() > 0 {
                if let Some(msg) = uffd.read_timeout(Duration::from_millis(2)) {
                    match msg {
                        UffdMsg::PageFault { address, flags }
                            if flags.contains(PageFaultFlags::WP) =>
                        {
                            pending_wp.push(address)
                        }
                        UffdMsg::PageFault { address, .. } => pending.push(address),
                        UffdMsg::Remove { .. } => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                pending_wp.retain(|&va| match uffd.writeprotect(va, PAGE_SIZE, false, false) {
                    Ok(()) => false,
                    Err(UffdError::Again { .. }) => true,
                    Err(e) => panic!("writeprotect: {e}"),
                });
                pending.retain(|&va| {
                    let i = (va.as_u64() - a.as_u64()) / PAGE_SIZE;
                    match uffd.copy(va, &content(i, 0), CopyMode::empty()) {
                        Ok(_) | Err(UffdError::Exists { .. }) => false,
                        Err(UffdError::Again { done: 0 }) => true,
                        Err(e) => panic!("copy: {e}"),
                    }
                });
            }
        });
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let (m, versions, uffd, content) = (&m, &versions, &uffd, &content);
                s.spawn(move || {
                    let mut r = rng(t + 1);
                    for _ in 0..iters {
                        let i = r(pages);
                        let va = page(a, i);
                        let mut v = versions[i as usize].lock().unwrap();
                        match (t, r(4)) {
                            // The dropper: the page is missing again, at version 0.
                            (0, 0) => {
                                m.mm.madvise(va, PAGE_SIZE, Advice::DontNeed).unwrap();
                                *v = 0;
                            }
                            // The protector.
                            (1, 0) => loop {
                                match uffd.writeprotect(va, PAGE_SIZE, true, false) {
                                    Err(UffdError::Again { .. }) => std::thread::yield_now(),
                                    r => break r.unwrap(),
                                }
                            },
                            // The pinner reads through GUP.
                            (2, 0) => {
                                let p = m.mm.pin_user_pages(va, 1, GupFlags::empty()).unwrap();
                                let mut b = vec![0u8; PG];
                                p.read(0, 0, &mut b);
                                assert_eq!(b, content(i, *v), "pinned page {i}");
                            }
                            _ => {
                                let mut b = vec![0u8; PG];
                                m.mm.read(va, &mut b).unwrap();
                                assert_eq!(b, content(i, *v), "page {i}");
                                *v += 1;
                                m.mm.write(va, &content(i, *v)).unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Release);
    });
    // Present pages hold their versions (a missing one would wait for the handler, gone).
    for i in 0..pages {
        let v = *versions[i as usize].lock().unwrap();
        if m.mm.pagemap(page(a, i), 1).unwrap()[0].present {
            let mut b = vec![0u8; PG];
            m.mm.read(page(a, i), &mut b).unwrap();
            assert_eq!(b, content(i, v), "page {i} at the end");
        }
    }
    assert_eq!(uffd.waiting(), 0);
    m.mm.audit().unwrap();
}

/// A `MADV_DONTNEED` that fails its checks (a hole) tells the handler nothing; one that
/// passes sends a `Remove` per VMA, clipped to it.
#[test]
fn remove_events_follow_the_checks_and_the_vmas() {
    let m = Machine::new(16);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::EVENT_REMOVE).unwrap();
    uffd.register(a, 8 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    m.mm.munmap(page(a, 4), PAGE_SIZE).unwrap();
    assert!(matches!(
        m.mm.madvise(a, 8 * PAGE_SIZE, Advice::DontNeed),
        Err(MmError::NoMem { .. })
    ));
    assert!(!uffd.poll(), "no event for a call that changed nothing");
    // Filled again by an unregistered VMA: the two registered ones get an event each.
    m.mm.mmap(
        Some(page(a, 4)),
        PAGE_SIZE,
        RW,
        MapFlags::PRIVATE | MapFlags::FIXED,
    )
    .unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| m.mm.madvise(a, 8 * PAGE_SIZE, Advice::DontNeed));
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(UffdMsg::Remove { start, end }) =
                uffd.read_timeout(Duration::from_millis(50))
            {
                got.push((start, end));
            }
        }
        h.join().unwrap().unwrap();
        assert_eq!(got, [(a, page(a, 4)), (page(a, 5), page(a, 8))]);
    });
}

#[test]
fn unregister_over_the_start_of_a_hugetlb_vma_leaves_its_page_whole() {
    // An anonymous VMA registered, a 2 MiB hugetlb VMA right after it: unregistering a
    // range that ends inside the hugetlb page must not split its PMD leaf.
    let m = Machine::new(32);
    assert_eq!(m.phys.set_nr_hugepages(1), 1);
    let h =
        m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB)
            .unwrap();
    let a = h.checked_sub(4 * PAGE_SIZE).unwrap();
    let fixed = MapFlags::PRIVATE | MapFlags::FIXED;
    assert_eq!(m.mm.mmap(Some(a), 4 * PAGE_SIZE, RW, fixed).unwrap(), a);
    m.mm.write_val(page(h, 3), 3u64).unwrap();
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    uffd.register(a, 4 * PAGE_SIZE, RegisterMode::MISSING)
        .unwrap();
    uffd.unregister(a, 4 * PAGE_SIZE + 8 * PAGE_SIZE).unwrap();
    let e = m.mm.pagemap(page(h, 3), 1).unwrap()[0];
    assert_eq!((e.present, e.order), (true, 9));
    assert_eq!(m.mm.stats().thp_split_pmd, 0);
    assert_eq!(m.mm.read_val::<u64>(page(h, 3)).unwrap(), 3);
    m.mm.audit().unwrap();
}
