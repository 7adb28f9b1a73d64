//! Migrate on fault at the core API: one walk faults and collects (`HMM_PFN_REQ_MIGRATE`,
//! `MIGRATE_VMA_FAULT`), counted; the words convert to `src`; errors put every collected
//! page back; the walk's own invalidations neither make it `Busy` nor block `read_begin`.

mod common;

use std::sync::Arc;

use common::{copy_to, device, fill, hmm_range as range, page, Machine, RW};
use hmm::addr::{DevicePfn, Pfn, VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::exclusive::make_device_exclusive;
use hmm::migrate::{
    hmm_range_fault_migrate, migrate_hmm_range_setup, migrate_vma_setup, HmmMigrate, MigratePfn,
    MigrateVma, MigrateVmaFlags,
};
use hmm::mm::{MapFlags, Mm, MmapReadGuard, Prot, SwapKind, ThpMode};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent,
    NotifierRange, Owner,
};
use hmm::range_fault::{hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange};
use hmm::stats::MmStats;
use parking_lot::Mutex;

/// A driver's notifier: records every event's sequence except its own MIGRATE, as a
/// driver with the owner filter does; counts what it recorded.
struct Mirror {
    owner: Owner,
    lock: Mutex<Vec<NotifierEvent>>,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &IntervalSub, r: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        if r.event == NotifierEvent::Migrate && r.owner == Some(self.owner) {
            return true;
        }
        let mut seen = self.lock.lock();
        sub.set_seq(cur_seq);
        seen.push(r.event);
        true
    }
}

fn watch(mm: &Mm, owner: Owner) -> (Arc<Mirror>, IntervalNotifier) {
    let mirror = Arc::new(Mirror {
        owner,
        lock: Mutex::new(Vec::new()),
    });
    let n = mm
        .interval_notifier_insert(VirtAddr::new(0), 1 << 47, mirror.clone())
        .unwrap();
    (mirror, n)
}

/// The bytes of the page at `a` if it is on a device, `None` if not.
fn device_page(m: &Machine, a: VirtAddr) -> Option<Vec<u8>> {
    let e = m.mm.pagemap(a, 1).unwrap()[0];
    (e.swap == Some(SwapKind::DevicePrivate)).then(|| {
        let mut b = vec![0u8; PAGE_SIZE as usize];
        m.phys
            .device_frame(DevicePfn::new(e.pfn.unwrap()))
            .read(0, &mut b);
        b
    })
}

/// Checks that the pages at `a` are mapped again, unlocked, hold `data`, and that the
/// address space audits clean: a collection that was put back left nothing behind.
#[track_caller]
fn assert_put_back(m: &Machine, a: VirtAddr, data: &[u8]) {
    let npages = data.len() as u64 / PAGE_SIZE;
    assert!(m.mm.pagemap(a, npages).unwrap().iter().all(|e| e.present));
    assert!(!any_locked(m, a, npages));
    let mut b = vec![0u8; data.len()];
    m.mm.read(a, &mut b).unwrap();
    assert_eq!(b, data);
    m.mm.audit().unwrap();
}

/// Whether any page of `[a, a + npages)` is locked (a collected page not put back).
fn any_locked(m: &Machine, a: VirtAddr, npages: u64) -> bool {
    m.mm.pagemap(a, npages).unwrap().iter().any(|e| {
        e.present
            && m.phys
                .frame(Pfn::new(e.pfn.unwrap()))
                .folio()
                .meta()
                .is_locked()
    })
}

/// One walk over `pfns.len()` pages at `a` watched by `n`: every page `REQ_FAULT |
/// REQ_MIGRATE`, system pages selected, `owner`'s device pages reported as they are; the
/// words are left in `pfns`.
fn one_walk<'g, 'a>(
    mmap: &'g MmapReadGuard<'a>,
    n: &IntervalSub,
    a: VirtAddr,
    pfns: &mut [HmmPfn],
    owner: Owner,
) -> HmmMigrate<'g, 'a> {
    let mut r = range(n, a, pfns, MIGRATE_FAULT, HmmPfnFlags::empty(), Some(owner));
    hmm_range_fault_migrate(mmap, &mut r, MigrateVmaFlags::SELECT_SYSTEM).expect("one walk")
}

fn delta(m: &Machine, before: &MmStats) -> MmStats {
    m.mm.stats().since(before)
}

const MIGRATE_FAULT: HmmPfnFlags = HmmPfnFlags::REQ_MIGRATE.union(HmmPfnFlags::REQ_FAULT);

#[test]
fn one_walk_faults_what_cannot_move_and_collects_everything() {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let watched = watch(&m.mm, owner);
    let a = m.map(16, RW, MapFlags::PRIVATE);
    // 0..4 written; 4..8 holes; 8..10 the zero page; 10..12 held exclusively by a device;
    // 12..16 written, then shared with a child (read-only, COW).
    let mut want = vec![0u8; 16 * PAGE_SIZE as usize];
    let pg = |i: usize| i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize;
    want[pg(0).start..pg(4).start].copy_from_slice(&fill(&m, a, 4, 1));
    m.mm.read(page(a, 8), &mut [0u8; 2 * PAGE_SIZE as usize])
        .unwrap();
    want[pg(10).start..pg(12).start].copy_from_slice(&fill(&m, page(a, 10), 2, 2));
    want[pg(12).start..pg(16).start].copy_from_slice(&fill(&m, page(a, 12), 4, 3));
    let child = m.mm.fork().unwrap();
    // After the fork (which would restore them), and after the COW faults it caused.
    m.mm.write(page(a, 10), &want[pg(10).start..pg(12).start])
        .unwrap();
    {
        let mmap = m.mm.mmap_read();
        drop(make_device_exclusive(&mmap, page(a, 10), None).unwrap());
        drop(make_device_exclusive(&mmap, page(a, 11), None).unwrap());
    }

    let before = m.mm.stats();
    let mmap = m.mm.mmap_read();
    let mut pfns = vec![HmmPfn::default(); 16];
    for w in &mut pfns[12..] {
        *w = HmmPfn::request(HmmPfnFlags::REQ_WRITE);
    }
    let mut r = range(
        &watched.1,
        a,
        &mut pfns,
        MIGRATE_FAULT,
        HmmPfnFlags::REQ_WRITE,
        Some(owner),
    );
    let collected = hmm_range_fault_migrate(&mmap, &mut r, MigrateVmaFlags::SELECT_SYSTEM)
        .expect("a migrating walk is never Busy");
    let seq = r.notifier_seq;

    // Every page collected: holes and zero pages empty, the rest with their frame; the
    // COW pages were write-faulted first, so they migrate writable.
    assert!(
        r.hmm_pfns.iter().all(|w| w.is_migrating()),
        "{:?}",
        r.hmm_pfns
    );
    for (i, w) in r.hmm_pfns.iter().enumerate() {
        assert_eq!(w.is_valid(), !(4..10).contains(&i), "page {i}: {w:?}");
        assert_eq!(MigratePfn::from_hmm(*w), collected.src()[i], "page {i}");
    }
    assert!(r.hmm_pfns[12..].iter().all(|w| w.is_writable()));
    assert_eq!(collected.cpages(), 16);

    // One pass, restarted once: the six faults (the exclusive entries' restores and the
    // COW breaks) are in one table, faulted together.
    let d = delta(&m, &before);
    assert_eq!((d.range_walks.hmm, d.range_walks.migrate), (1, 0));
    assert_eq!(d.range_walks.restarts, 1, "{:?}", d.range_walks);
    assert_eq!(d.faults.cow, 4);
    assert_eq!(d.faults.device_exclusive, 2);

    // The COW faults invalidated the caller's notifier: the sequence moved (so the
    // caller would not mirror plain words now), the walk did not give up on it, and its
    // own MIGRATE invalidation is over, so read_begin does not wait on it.
    assert!(watched.1.read_retry(seq));
    assert!(watched.0.lock.lock().contains(&NotifierEvent::Clear));
    let _ = watched.1.read_begin();

    let mig = migrate_hmm_range_setup(collected);
    assert_eq!(mig.cpages(), 16);
    assert_eq!(copy_to(&dev, mig), 16);
    drop(mmap);
    for i in 0..16 {
        let got = device_page(&m, page(a, i as u64)).expect("on the device");
        assert_eq!(got, want[pg(i)], "page {i}");
    }
    // The child kept its copies of the shared pages.
    let mut b = vec![0u8; 4 * PAGE_SIZE as usize];
    child.read(page(a, 12), &mut b).unwrap();
    assert_eq!(b, want[pg(12).start..pg(16).start]);
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn migrate_vma_fault_collects_what_a_plain_setup_skips() {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 4, 7);
    let exclusive = |m: &Machine| {
        let mmap = m.mm.mmap_read();
        drop(make_device_exclusive(&mmap, page(a, 1), None).unwrap());
    };
    let args = |flags| MigrateVma {
        start: a,
        end: page(a, 4),
        pgmap_owner: Some(owner),
        flags,
        fault_page: None,
    };
    exclusive(&m);
    let before = m.mm.stats();
    {
        let mmap = m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(MigrateVmaFlags::SELECT_SYSTEM)).unwrap();
        assert!(
            mig.src()[1].is_empty(),
            "an exclusive entry is not collected"
        );
        assert_eq!(mig.cpages(), 3);
    }
    let d = delta(&m, &before);
    assert_eq!((d.range_walks.migrate, d.faults.device_exclusive), (1, 0));

    let before = m.mm.stats();
    {
        let mmap = m.mm.mmap_read();
        let flags = MigrateVmaFlags::SELECT_SYSTEM | MigrateVmaFlags::FAULT;
        let mig = migrate_vma_setup(&mmap, args(flags)).unwrap();
        assert!(mig.src().iter().all(|w| w.is_valid() && w.is_migrating()));
        assert_eq!(copy_to(&dev, mig), 4);
    }
    let d = delta(&m, &before);
    assert_eq!((d.range_walks.migrate, d.range_walks.hmm), (1, 0));
    assert_eq!(d.faults.device_exclusive, 1);
    for i in 0..4u64 {
        let at = i as usize * PAGE_SIZE as usize;
        assert_eq!(
            device_page(&m, page(a, i)).unwrap(),
            data[at..at + PAGE_SIZE as usize]
        );
    }
    m.mm.audit().unwrap();
}

#[test]
fn bad_arguments_are_typed_errors_and_change_nothing() {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let (_mirror, n) = watch(&m.mm, owner);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let b = m.map(4, Prot::READ, MapFlags::PRIVATE);
    assert_eq!(page(b, 4), a, "adjacent VMAs");
    fill(&m, a, 4, 1);
    m.phys.set_nr_hugepages(1);
    let h =
        m.mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB)
            .unwrap();
    let before = m.mm.stats();
    let mmap = m.mm.mmap_read();
    let sel = MigrateVmaFlags::SELECT_SYSTEM;
    let run = |start: VirtAddr, npages: u64, flags: MigrateVmaFlags| {
        let mut pfns = vec![HmmPfn::default(); npages as usize];
        let mut r = HmmRange {
            notifier: &n,
            notifier_seq: n.read_begin(),
            start,
            end: page(start, npages),
            hmm_pfns: &mut pfns,
            default_flags: MIGRATE_FAULT,
            pfn_flags_mask: HmmPfnFlags::empty(),
            dev_private_owner: Some(owner),
        };
        hmm_range_fault_migrate(&mmap, &mut r, flags).map(|c| c.cpages())
    };
    assert_eq!(run(b, 8, sel), Err(HmmError::Range { addr: a }));
    assert_eq!(
        run(VirtAddr::new(0x10000), 1, sel),
        Err(HmmError::Range {
            addr: VirtAddr::new(0x10000)
        })
    );
    assert!(matches!(run(h, 1, sel), Err(HmmError::Inval { .. })));
    assert!(matches!(
        run(a, 4, sel | MigrateVmaFlags::FAULT),
        Err(HmmError::Inval { .. })
    ));
    assert!(matches!(run(a, 0, sel), Err(HmmError::Inval { .. })));
    // A plain walk refuses migrate requests.
    let mut pfns = vec![HmmPfn::default(); 4];
    let mut r = range(&n, a, &mut pfns, MIGRATE_FAULT, HmmPfnFlags::empty(), None);
    assert!(matches!(
        hmm_range_fault(&mmap, &mut r),
        Err(HmmError::Inval { .. })
    ));
    drop(mmap);
    let d = delta(&m, &before);
    assert_eq!(d.range_walks.total(), 0, "no walk for bad arguments");
    assert_eq!(d.migrate.pages_collected, 0);
    assert!(!any_locked(&m, a, 4));
    m.mm.audit().unwrap();
}

#[test]
fn an_error_after_collecting_puts_every_page_back() {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let (_mirror, n) = watch(&m.mm, owner);
    // A written VMA made read-only: pages 0 and 1 collect, page 2 asks for write → EPERM.
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 4, 5);
    m.mm.mprotect(a, 4 * PAGE_SIZE, Prot::READ).unwrap();
    let before = m.mm.stats();
    let mmap = m.mm.mmap_read();
    let mut pfns = vec![HmmPfn::default(); 4];
    pfns[2] = HmmPfn::request(HmmPfnFlags::REQ_WRITE);
    let mut r = range(
        &n,
        a,
        &mut pfns,
        MIGRATE_FAULT,
        HmmPfnFlags::REQ_WRITE,
        Some(owner),
    );
    let e = hmm_range_fault_migrate(&mmap, &mut r, MigrateVmaFlags::SELECT_SYSTEM).unwrap_err();
    assert_eq!(e, HmmError::Perm { addr: page(a, 2) });
    drop(mmap);
    let d = delta(&m, &before);
    assert_eq!(d.range_walks.hmm, 1);
    assert_eq!(d.migrate.pages_restored, 2, "pages 0 and 1 were collected");
    assert_put_back(&m, a, &data);
}

#[test]
fn dropping_the_collected_pages_puts_them_back() {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let (_mirror, n) = watch(&m.mm, owner);
    let a = m.map(8, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 8, 9);
    {
        let mmap = m.mm.mmap_read();
        let mut pfns = vec![HmmPfn::default(); 8];
        let c = one_walk(&mmap, &n, a, &mut pfns, owner);
        assert_eq!(c.cpages(), 8);
        assert!(m.mm.pagemap(a, 8).unwrap().iter().all(|e| !e.present));
    }
    assert_put_back(&m, a, &data);
}

#[test]
fn pages_the_walk_does_not_select_get_plain_words() {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let (_mirror, n) = watch(&m.mm, owner);
    let a = m.map(4, RW, MapFlags::PRIVATE);
    let data = fill(&m, a, 4, 11);
    // Pages 0 and 1 are already on the device; page 2 is pinned (an anon-exclusive pinned
    // page is not collected); page 3 has a GUP reference (collected, then put back by the
    // pin check).
    {
        let mmap = m.mm.mmap_read();
        let mig = migrate_vma_setup(
            &mmap,
            MigrateVma {
                start: a,
                end: page(a, 2),
                pgmap_owner: Some(owner),
                flags: MigrateVmaFlags::SELECT_SYSTEM,
                fault_page: None,
            },
        )
        .unwrap();
        assert_eq!(copy_to(&dev, mig), 2);
    }
    let pin =
        m.mm.pin_user_pages(page(a, 2), 1, hmm::mm::GupFlags::empty())
            .unwrap();
    let gup =
        m.mm.get_user_pages(page(a, 3), 1, hmm::mm::GupFlags::empty())
            .unwrap();
    let mmap = m.mm.mmap_read();
    let mut pfns = vec![HmmPfn::default(); 4];
    let c = one_walk(&mmap, &n, a, &mut pfns, owner);
    // The device's own pages are reported as they are, for the caller to keep mapped.
    for w in &pfns[..2] {
        assert!(w.is_valid() && !w.is_migrating(), "{w:?}");
        assert!(m.phys.contains_device(DevicePfn::new(w.frame_nr())));
    }
    assert!(pfns[2].is_valid() && !pfns[2].is_migrating());
    assert!(pfns[3].is_migrating());
    // The pin check runs in migrate_hmm_range_setup: the referenced page goes back there.
    assert_eq!(c.cpages(), 1);
    let mig = migrate_hmm_range_setup(c);
    assert_eq!(mig.cpages(), 0);
    assert!(mig.src()[3].is_empty());
    assert_eq!(copy_to(&dev, mig), 0);
    drop(mmap);
    drop((pin, gup));
    for i in 0..2u64 {
        let at = i as usize * PAGE_SIZE as usize;
        assert_eq!(
            device_page(&m, page(a, i)).unwrap(),
            data[at..at + PAGE_SIZE as usize]
        );
    }
    assert!(m
        .mm
        .pagemap(page(a, 2), 2)
        .unwrap()
        .iter()
        .all(|e| e.present));
    assert!(!any_locked(&m, page(a, 2), 2));
    m.mm.audit().unwrap();
}

/// A THP that cannot be split (a pin) is left alone to the end of its PMD, as
/// `migrate_vma_collect_skip` does, and the one walk goes on collecting in the next PMD.
#[test]
fn an_unsplittable_thp_ends_collection_in_its_pmd_only() {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let dev = device(&m, owner);
    let (_mirror, n) = watch(&m.mm, owner);
    m.mm.set_thp_mode(ThpMode::Always);
    let t =
        m.mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let data = fill(&m, t, 1024, 12);
    let pin =
        m.mm.pin_user_pages(page(t, 300), 1, hmm::mm::GupFlags::empty())
            .unwrap();
    let a = page(t, 504);
    let mmap = m.mm.mmap_read();
    let mut pfns = vec![HmmPfn::default(); 16];
    let before = m.mm.stats();
    let c = one_walk(&mmap, &n, a, &mut pfns, owner);
    for (i, w) in pfns.iter().enumerate() {
        assert!(w.is_valid(), "page {i}: {w:?}");
        assert_eq!(w.is_migrating(), i >= 8, "page {i}: {w:?}");
    }
    assert_eq!(delta(&m, &before).range_walks.total(), 1, "one walk");
    let mig = migrate_hmm_range_setup(c);
    assert_eq!(copy_to(&dev, mig), 8);
    drop(mmap);
    drop(pin);
    let at = |k: u64| (k * PAGE_SIZE) as usize;
    for k in 512..520 {
        assert_eq!(device_page(&m, page(t, k)).unwrap(), data[at(k)..at(k + 1)]);
    }
    let mut b = vec![0u8; at(512)];
    m.mm.read(t, &mut b).unwrap();
    assert!(b == data[..at(512)], "the pinned THP's bytes");
    m.mm.audit().unwrap();
}
