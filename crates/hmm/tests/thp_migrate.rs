//! Device THP migration (`SELECT_COMPOUND`): PMD-sized units moved whole or split on the
//! way, in both directions, with their bytes, events, counters and frames checked.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{page, Machine, RW};
use hmm::addr::{DevicePfn, VirtAddr, PMD_NR, PMD_ORDER, PMD_SIZE};
use hmm::migrate::{
    migrate_device_range, migrate_vma_setup, MigratePfnFlags, MigrateVma, MigrateVmaFlags,
    Migration,
};
use hmm::mm::{Advice, GupFlags, MapFlags, SwapKind};
use hmm::notifier::{NotifierEvent, Owner};
use hmm::phys::{FrameFlags, FrameRef, LockedFolio};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

const NR: u64 = PMD_NR;
const SYS: MigrateVmaFlags = MigrateVmaFlags::SELECT_SYSTEM.union(MigrateVmaFlags::SELECT_COMPOUND);
const DEV: MigrateVmaFlags =
    MigrateVmaFlags::SELECT_DEVICE_PRIVATE.union(MigrateVmaFlags::SELECT_COMPOUND);

/// Counts what the core tells the driver: frames freed, folio splits.
#[derive(Default)]
struct Counting {
    freed: AtomicU64,
    split_tails: AtomicU64,
    split_heads: AtomicU64,
}

impl DevPagemapOps for Counting {
    fn folio_free(&self, _folio: FrameRef<'_>, order: u32) {
        self.freed.fetch_add(1 << order, Ordering::Relaxed);
    }

    fn folio_split(&self, head: FrameRef<'_>, tail: Option<FrameRef<'_>>) {
        assert_eq!(head.meta().order(), 0, "told after the split");
        match tail {
            Some(_) => self.split_tails.fetch_add(1, Ordering::Relaxed),
            None => self.split_heads.fetch_add(1, Ordering::Relaxed),
        };
    }
}

struct Rig {
    m: Machine,
    owner: Owner,
    dev: Arc<DevPagemap>,
    ops: Arc<Counting>,
}

fn rig() -> Rig {
    let m = Machine::new(64);
    let owner = Owner::new_unique();
    let ops = Arc::new(Counting::default());
    let dev = memremap_pages(
        &m.phys,
        PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner,
            size_bytes: 16 << 20,
        },
        ops.clone(),
    )
    .unwrap();
    Rig { m, owner, dev, ops }
}

/// A 2 MiB-aligned private mapping of `pmds` PMDs with MADV_HUGEPAGE.
fn huge_map(r: &Rig, pmds: u64) -> VirtAddr {
    let a = r.m.map(pmds * NR, RW, MapFlags::PRIVATE);
    assert!(a.is_aligned(PMD_SIZE));
    r.m.mm
        .madvise(a, pmds * PMD_SIZE, Advice::HugePage)
        .unwrap();
    a
}

/// Writes `tag + i` at the start of page `i` of `pages` pages (a THP per PMD on fault).
fn fill(r: &Rig, a: VirtAddr, pages: u64, tag: u64) {
    for i in 0..pages {
        r.m.mm.write_val(page(a, i), tag + i).unwrap();
    }
}

/// Checks the words `fill` wrote, through CPU reads (which fault device pages back).
fn check(r: &Rig, a: VirtAddr, pages: u64, tag: u64) {
    for i in 0..pages {
        assert_eq!(
            r.m.mm.read_val::<u64>(page(a, i)).unwrap(),
            tag + i,
            "page {i}"
        );
    }
}

/// The word at the start of device page `nr`.
fn device_word(r: &Rig, nr: u64) -> u64 {
    let mut b = [0u8; 8];
    r.m.phys.device_frame(DevicePfn::new(nr)).read(0, &mut b);
    u64::from_le_bytes(b)
}

fn args(r: &Rig, a: VirtAddr, pages: u64, flags: MigrateVmaFlags) -> MigrateVma {
    MigrateVma {
        start: a,
        end: page(a, pages),
        pgmap_owner: Some(r.owner),
        flags,
        fault_page: None,
    }
}

/// Where destinations come from, and how large.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dst {
    /// One folio of `order` (0 or 9) per unit, in device memory.
    Device(u32),
    /// Likewise in system memory.
    System(u32),
}

fn alloc<'a>(r: &'a Rig, dst: Dst, order: u32) -> LockedFolio<'a> {
    match dst {
        Dst::Device(_) => r.dev.alloc(order, FrameFlags::empty()).unwrap(),
        Dst::System(_) => r.m.phys.alloc(order, FrameFlags::empty()).unwrap().lock(),
    }
}

/// Gives every migrating entry destinations as `dst` says (a unit one order-9 folio or
/// 512 pages; anything else one page), filled from the source; commits and finalizes.
fn migrate(r: &Rig, mut mig: Migration<'_, '_>, dst: Dst) -> u64 {
    let order = match dst {
        Dst::Device(o) | Dst::System(o) => o,
    };
    let mut i = 0;
    while i < mig.src().len() {
        let w = mig.src()[i];
        if !w.is_migrating() {
            i += 1;
            continue;
        }
        let unit = w.flags().contains(MigratePfnFlags::COMPOUND);
        let write = w.flags().contains(MigratePfnFlags::WRITE) || !w.is_valid();
        if unit && order == PMD_ORDER {
            let d = alloc(r, dst, PMD_ORDER);
            for k in 0..NR as usize {
                let p = d.folio_page(k as u64);
                match mig.src_page(i + k) {
                    Some(s) => p.copy_from(&s),
                    None => p.zero(),
                }
            }
            mig.set_dst(i, d, write).unwrap();
        } else {
            let n = if unit { NR as usize } else { 1 };
            for k in i..i + n {
                let d = alloc(r, dst, 0);
                match mig.src_page(k) {
                    Some(s) => d.copy_from(&s),
                    None => d.zero(),
                }
                mig.set_dst(k, d, write).unwrap();
            }
        }
        i += if unit { NR as usize } else { 1 };
    }
    mig.pages().finalize().migrated
}

/// Moves the THP at `a` to the device whole (one device THP).
fn to_device_whole(r: &Rig, a: VirtAddr) {
    let mmap = r.m.mm.mmap_read();
    let mig = migrate_vma_setup(&mmap, args(r, a, NR, SYS)).unwrap();
    assert_eq!(migrate(r, mig, Dst::Device(PMD_ORDER)), NR);
}

/// A 2 MiB area written by `fill` with `tag` and moved to the device whole; returns it
/// and the head of its device THP.
fn device_thp(r: &Rig, tag: u64) -> (VirtAddr, DevicePfn) {
    let a = huge_map(r, 1);
    fill(r, a, NR, tag);
    to_device_whole(r, a);
    let head = r.m.mm.pagemap(a, 1).unwrap()[0].pfn.unwrap();
    (a, DevicePfn::new(head))
}

/// The MIGRATE ranges recorded since the last look, with their owners.
fn migrate_events(r: &Rig) -> Vec<(u64, u64, Option<Owner>)> {
    r.m.rec
        .take()
        .iter()
        .filter(|e| e.event == NotifierEvent::Migrate)
        .map(|e| (e.start().as_u64(), e.end().as_u64(), e.owner))
        .collect()
}

/// Whether every page of `pages` from `a` is a device-private page mapped at `order`,
/// consecutive from the first.
fn on_device(r: &Rig, a: VirtAddr, pages: u64, order: u8) -> bool {
    let map = r.m.mm.pagemap(a, pages).unwrap();
    map.iter()
        .all(|e| e.swap == Some(SwapKind::DevicePrivate) && e.order == order)
        && (order == 0 || map.windows(2).all(|w| w[1].pfn == w[0].pfn.map(|p| p + 1)))
}

#[test]
fn a_thp_moves_to_the_device_whole_and_back() {
    let r = rig();
    let a = huge_map(&r, 2);
    let ram = r.m.phys.nr_in_use();
    fill(&r, a, 2 * NR, 100);
    assert_eq!(r.m.mm.stats().faults.thp_anon, 2);
    r.m.rec.take();
    let before = r.m.mm.stats();
    {
        let mmap = r.m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(&r, a, 2 * NR, SYS)).unwrap();
        // One word per unit, the next 511 empty; a unit counts once in cpages.
        assert_eq!((mig.cpages(), mig.npages()), (2, 2 * NR));
        let unit = MigratePfnFlags::VALID
            | MigratePfnFlags::MIGRATE
            | MigratePfnFlags::WRITE
            | MigratePfnFlags::COMPOUND;
        for h in [0, NR as usize] {
            assert_eq!(mig.src()[h].flags(), unit);
            assert!(mig.src()[h + 1..h + NR as usize]
                .iter()
                .all(|w| w.is_empty()));
        }
        let map = r.m.mm.pagemap(a, 2 * NR).unwrap();
        assert!(map
            .iter()
            .all(|e| e.swap == Some(SwapKind::Migration) && e.order == 9));
        assert_eq!(migrate(&r, mig, Dst::Device(PMD_ORDER)), 2 * NR);
    }
    // One MIGRATE range, carrying the owner; no split, nothing else.
    assert_eq!(
        migrate_events(&r),
        [(a.as_u64(), page(a, 2 * NR).as_u64(), Some(r.owner))]
    );
    let d = r.m.mm.stats().since(&before);
    assert_eq!(d.thp_split_folio, 0);
    assert_eq!(d.thp_split_pmd, 0);
    assert!(on_device(&r, a, 2 * NR, 9));
    let map = r.m.mm.pagemap(a, 2 * NR).unwrap();
    for i in 0..2 * NR {
        assert_eq!(device_word(&r, map[i as usize].pfn.unwrap()), 100 + i);
    }
    assert_eq!(r.m.phys.nr_in_use(), ram, "both THPs are freed");
    r.m.mm.audit().unwrap();

    // Back, whole: two system THPs mapped by PMDs again.
    {
        let mmap = r.m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(&r, a, 2 * NR, DEV)).unwrap();
        assert_eq!(mig.cpages(), 2);
        assert_eq!(migrate(&r, mig, Dst::System(PMD_ORDER)), 2 * NR);
    }
    let map = r.m.mm.pagemap(a, 2 * NR).unwrap();
    assert!(map.iter().all(|e| e.present && e.order == 9 && e.exclusive));
    let before = r.m.mm.stats();
    check(&r, a, 2 * NR, 100);
    fill(&r, a, 2 * NR, 7);
    assert_eq!(
        r.m.mm.stats().since(&before).faults.total(),
        0,
        "mapped writable"
    );
    assert_eq!(r.dev.nr_in_use(), 0);
    assert_eq!(r.ops.freed.load(Ordering::Relaxed), 2 * NR);
    assert_eq!(r.ops.split_tails.load(Ordering::Relaxed), 0);
    r.m.mm.audit().unwrap();
}

#[test]
fn order_zero_destinations_split_the_unmapped_source_both_ways() {
    let r = rig();
    let a = huge_map(&r, 2);
    fill(&r, a, 2 * NR, 300);
    r.m.rec.take();
    let before = r.m.mm.stats();
    {
        // The first unit goes to 512 device pages, the second to one device THP.
        let mmap = r.m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(&r, a, NR, SYS)).unwrap();
        assert_eq!(migrate(&r, mig, Dst::Device(0)), NR);
        let mig = migrate_vma_setup(&mmap, args(&r, page(a, NR), NR, SYS)).unwrap();
        assert_eq!(migrate(&r, mig, Dst::Device(PMD_ORDER)), NR);
    }
    let d = r.m.mm.stats().since(&before);
    assert_eq!(d.thp_split_folio, 1, "the unmapped source THP was split");
    assert!(on_device(&r, a, NR, 0));
    assert!(on_device(&r, page(a, NR), NR, 9));
    // The split of the PMD migration entry is the only other event (a CLEAR, as in the
    // kernel's split_huge_pmd_address).
    let events = r.m.rec.take();
    assert!(events
        .iter()
        .all(|e| e.event == NotifierEvent::Migrate || e.event == NotifierEvent::Clear));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event == NotifierEvent::Migrate)
            .count(),
        2
    );
    r.m.mm.audit().unwrap();

    // Back to order-0 system pages: the 512 device pages one by one, the device THP
    // after a split of its folio (the driver is told of every new page).
    {
        let mmap = r.m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(&r, a, 2 * NR, DEV)).unwrap();
        assert_eq!(mig.cpages(), NR + 1, "512 pages and one unit");
        assert_eq!(migrate(&r, mig, Dst::System(0)), 2 * NR);
    }
    assert_eq!(r.ops.split_tails.load(Ordering::Relaxed), NR - 1);
    assert_eq!(r.ops.split_heads.load(Ordering::Relaxed), 1);
    let map = r.m.mm.pagemap(a, 2 * NR).unwrap();
    assert!(map.iter().all(|e| e.present && e.order == 0));
    check(&r, a, 2 * NR, 300);
    assert_eq!(r.dev.nr_in_use(), 0);
    assert_eq!(r.ops.freed.load(Ordering::Relaxed), 2 * NR);
    r.m.mm.audit().unwrap();
}

#[test]
fn an_empty_pmd_and_the_huge_zero_page_are_one_empty_unit() {
    let r = rig();
    let a = huge_map(&r, 3);
    // PMD 1 maps the huge zero page; PMDs 0 and 2 are empty.
    assert_eq!(r.m.mm.read_val::<u64>(page(a, NR + 3)).unwrap(), 0);
    r.m.rec.take();
    let mmap = r.m.mm.mmap_read();
    let mig = migrate_vma_setup(&mmap, args(&r, a, 3 * NR, SYS)).unwrap();
    assert_eq!(mig.cpages(), 3);
    for h in [0, NR, 2 * NR] {
        assert_eq!(
            mig.src()[h as usize].flags(),
            MigratePfnFlags::MIGRATE | MigratePfnFlags::COMPOUND
        );
    }
    // The collect changes nothing in the page table: the huge zero page stays mapped.
    assert!(r.m.mm.pagemap(page(a, NR), 1).unwrap()[0].present);
    // Units 0 and 1 get device THPs, unit 2 order-0 pages.
    let mut mig = mig;
    for (h, order) in [
        (0, PMD_ORDER),
        (NR as usize, PMD_ORDER),
        (2 * NR as usize, 0),
    ] {
        if order == PMD_ORDER {
            let d = r.dev.alloc(PMD_ORDER, FrameFlags::empty()).unwrap();
            (0..NR).for_each(|k| d.folio_page(k).zero());
            mig.set_dst(h, d, true).unwrap();
        } else {
            for k in h..h + NR as usize {
                let d = r.dev.alloc(0, FrameFlags::empty()).unwrap();
                d.zero();
                mig.set_dst(k, d, true).unwrap();
            }
        }
    }
    assert_eq!(mig.pages().finalize().migrated, 3 * NR);
    drop(mmap);
    // The collect's MIGRATE, and the second one from the first hole to the end.
    let end = page(a, 3 * NR).as_u64();
    assert_eq!(
        migrate_events(&r),
        [
            (a.as_u64(), end, Some(r.owner)),
            (a.as_u64(), end, Some(r.owner))
        ]
    );
    assert!(on_device(&r, a, 2 * NR, 9));
    assert!(on_device(&r, page(a, 2 * NR), NR, 0));
    r.m.mm.audit().unwrap();
    // The device sees zeros; back in system memory too.
    let map = r.m.mm.pagemap(a, 3 * NR).unwrap();
    assert!(map.iter().all(|e| device_word(&r, e.pfn.unwrap()) == 0));
    let mmap = r.m.mm.mmap_read();
    let mig = migrate_vma_setup(&mmap, args(&r, a, 3 * NR, DEV)).unwrap();
    assert_eq!(migrate(&r, mig, Dst::System(PMD_ORDER)), 3 * NR);
    drop(mmap);
    assert!((0..3 * NR).all(|i| r.m.mm.read_val::<u64>(page(a, i)).unwrap() == 0));
    r.m.mm.audit().unwrap();
}

#[test]
fn a_unit_not_wholly_inside_the_range_is_split_and_collected_by_page() {
    let r = rig();
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 5);
    let before = r.m.mm.stats();
    let mmap = r.m.mm.mmap_read();
    let mig = migrate_vma_setup(&mmap, args(&r, page(a, 1), NR - 1, SYS)).unwrap();
    assert_eq!(mig.cpages(), NR - 1);
    assert!(mig
        .src()
        .iter()
        .all(|w| !w.flags().contains(MigratePfnFlags::COMPOUND)));
    assert_eq!(migrate(&r, mig, Dst::Device(0)), NR - 1);
    drop(mmap);
    let d = r.m.mm.stats().since(&before);
    assert_eq!((d.thp_split_pmd, d.thp_split_folio), (1, 1));
    assert!(on_device(&r, page(a, 1), NR - 1, 0));
    assert_eq!(r.m.mm.read_val::<u64>(a).unwrap(), 5);
    r.m.mm.audit().unwrap();
}

#[test]
fn a_unit_without_a_destination_or_dropped_is_put_back_whole() {
    let r = rig();
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 9);
    let mmap = r.m.mm.mmap_read();
    let mig = migrate_vma_setup(&mmap, args(&r, a, NR, SYS)).unwrap();
    let out = mig.pages().finalize();
    assert_eq!((out.migrated, out.restored), (0, NR));
    drop(migrate_vma_setup(&mmap, args(&r, a, NR, SYS)).unwrap());
    drop(mmap);
    let map = r.m.mm.pagemap(a, NR).unwrap();
    assert!(map.iter().all(|e| e.present && e.order == 9 && e.exclusive));
    let before = r.m.mm.stats();
    check(&r, a, NR, 9);
    fill(&r, a, NR, 1);
    assert_eq!(
        r.m.mm.stats().since(&before).faults.total(),
        0,
        "writable again"
    );
    r.m.mm.audit().unwrap();
}

/// Takes a reference on a device folio when the first CLEAR reaches it: a transient
/// reference (an eviction's scan, a GUP) that lands between the split of a unit's PMD
/// migration entry and the split of its folio.
struct GrabOnClear {
    phys: Arc<hmm::phys::PhysMem>,
    head: DevicePfn,
    grabbed: std::sync::atomic::AtomicBool,
}

impl hmm::notifier::IntervalNotifierOps for GrabOnClear {
    fn invalidate(
        &self,
        sub: &hmm::notifier::IntervalSub,
        r: &hmm::notifier::NotifierRange,
        seq: hmm::notifier::InvalidateSeq,
    ) -> bool {
        sub.set_seq(seq);
        if r.event == NotifierEvent::Clear && !self.grabbed.swap(true, Ordering::Relaxed) {
            self.phys.device_frame(self.head).meta().get();
        }
        true
    }
}

#[test]
fn a_unit_whose_folio_split_fails_after_its_pmd_split_goes_back_whole() {
    let r = rig();
    let (a, head) = device_thp(&r, 70);
    let grab = Arc::new(GrabOnClear {
        phys: r.m.phys.clone(),
        head,
        grabbed: Default::default(),
    });
    let _sub =
        r.m.mm
            .interval_notifier_insert(a, PMD_SIZE, grab.clone())
            .unwrap();
    {
        let mmap = r.m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(&r, a, NR, DEV)).unwrap();
        assert_eq!(mig.cpages(), 1, "one unit");
        assert_eq!(
            migrate(&r, mig, Dst::System(0)),
            0,
            "the folio could not split"
        );
    }
    assert!(
        grab.grabbed.load(Ordering::Relaxed),
        "the PMD entry was split"
    );
    // Every page maps its device page again, as 512 PTEs of the whole device THP: none
    // is left behind a migration entry of an unlocked folio.
    let map = r.m.mm.pagemap(a, NR).unwrap();
    for (i, e) in map.iter().enumerate() {
        assert_eq!(e.swap, Some(SwapKind::DevicePrivate), "page {i}");
        assert_eq!(e.pfn, Some(head.as_u64() + i as u64), "page {i}");
    }
    assert_eq!(r.ops.split_tails.load(Ordering::Relaxed), 0);
    let _ = r.m.phys.device_frame(head).put();
    r.m.mm.audit().unwrap();
    // With the reference gone the same migration goes through.
    {
        let mmap = r.m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(&r, a, NR, DEV)).unwrap();
        assert_eq!(migrate(&r, mig, Dst::System(0)), NR);
    }
    check(&r, a, NR, 70);
    assert_eq!(r.dev.nr_in_use(), 0);
    r.m.mm.audit().unwrap();
}

#[test]
fn a_pinned_thp_is_not_collected() {
    let r = rig();
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 3);
    let pin =
        r.m.mm
            .pin_user_pages(page(a, 7), 1, GupFlags::WRITE)
            .unwrap();
    let mmap = r.m.mm.mmap_read();
    let mig = migrate_vma_setup(&mmap, args(&r, a, NR, SYS)).unwrap();
    // The exclusive THP cannot be shared: the kernel splits it instead, and the split
    // of a pinned folio fails, so nothing is collected.
    assert_eq!(mig.cpages(), 0);
    drop(mig);
    drop(mmap);
    drop(pin);
    check(&r, a, NR, 3);
    r.m.mm.audit().unwrap();
}

#[test]
fn a_thp_shared_by_fork_moves_whole_in_both_address_spaces() {
    let r = rig();
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 40);
    let child = r.m.mm.fork().unwrap();
    assert_eq!(
        child.pagemap(a, 1).unwrap()[0].order,
        9,
        "fork shares the PMD"
    );
    {
        let mmap = r.m.mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(&r, a, NR, SYS)).unwrap();
        assert_eq!(mig.cpages(), 1);
        assert_eq!(migrate(&r, mig, Dst::Device(PMD_ORDER)), NR);
    }
    // Both map the device THP, read-only, by a PMD.
    for mm in [&r.m.mm, &child] {
        let map = mm.pagemap(a, NR).unwrap();
        assert!(map
            .iter()
            .all(|e| e.swap == Some(SwapKind::DevicePrivate) && e.order == 9));
        mm.audit().unwrap();
    }
    let head = r.m.mm.pagemap(a, 1).unwrap()[0].pfn.unwrap();
    let folio = r.m.phys.device_frame(DevicePfn::new(head));
    assert_eq!(folio.meta().entire_mapcount(), 2);
    assert_eq!(device_word(&r, head + 5), 45);
    // The child takes it back whole; the parent's PMD follows through the reverse map.
    {
        let mmap = child.mmap_read();
        let mut a2 = args(&r, a, NR, DEV);
        a2.pgmap_owner = Some(r.owner);
        let mig = migrate_vma_setup(&mmap, a2).unwrap();
        assert_eq!(mig.cpages(), 1);
        assert_eq!(migrate(&r, mig, Dst::System(PMD_ORDER)), NR);
    }
    for mm in [&r.m.mm, &child] {
        let map = mm.pagemap(a, NR).unwrap();
        assert!(map
            .iter()
            .all(|e| e.present && e.order == 9 && !e.exclusive));
        mm.audit().unwrap();
    }
    // A write in the child breaks COW; the parent keeps its bytes.
    child.write_val(page(a, 3), 0u64).unwrap();
    check(&r, a, NR, 40);
    assert_eq!(r.dev.nr_in_use(), 0);
}

/// Evicts every page of the device (`migrate_device_range`) to system memory, giving a
/// device THP one order-9 folio or, with `order` 0, 512 pages; returns pages migrated.
fn evict(r: &Rig, order: u32) -> u64 {
    let mut m = migrate_device_range(&r.m.phys, r.dev.frame(0), r.dev.nr_frames()).unwrap();
    let mut i = 0;
    while i < m.src().len() {
        let w = m.src()[i];
        if !w.is_migrating() {
            i += 1;
            continue;
        }
        let unit = w.flags().contains(MigratePfnFlags::COMPOUND);
        if unit && order == PMD_ORDER {
            let d = alloc(r, Dst::System(0), PMD_ORDER);
            for k in 0..NR {
                d.folio_page(k)
                    .copy_from(&m.src_page(i + k as usize).unwrap());
            }
            m.set_dst(i, d, true).unwrap();
        } else {
            for k in i..i + if unit { NR as usize } else { 1 } {
                let d = alloc(r, Dst::System(0), 0);
                d.copy_from(&m.src_page(k).unwrap());
                m.set_dst(k, d, true).unwrap();
            }
        }
        i += if unit { NR as usize } else { 1 };
    }
    m.pages().finalize().migrated
}

#[test]
fn eviction_moves_a_device_thp_whole_or_split_wherever_it_is_mapped() {
    for order in [PMD_ORDER, 0] {
        let r = rig();
        let (a, _) = device_thp(&r, 60);
        let child = r.m.mm.fork().unwrap();
        assert!(on_device(&r, a, NR, 9));
        assert_eq!(evict(&r, order), NR, "order {order}");
        assert_eq!(r.dev.nr_in_use(), 0);
        for mm in [&r.m.mm, &child] {
            let map = mm.pagemap(a, NR).unwrap();
            let want = if order == PMD_ORDER { 9 } else { 0 };
            assert!(
                map.iter().all(|e| e.present && e.order == want),
                "order {order}"
            );
            mm.audit().unwrap();
        }
        let splits = if order == PMD_ORDER { 0 } else { NR - 1 };
        assert_eq!(r.ops.split_tails.load(Ordering::Relaxed), splits);
        check(&r, a, NR, 60);
        child.write_val(page(a, 1), 0u64).unwrap();
        check(&r, a, NR, 60);
    }
}

/// A device THP that cannot be split (someone took a reference after it was collected)
/// goes back whole when an eviction gave its pages 4 KiB destinations, and the 511
/// destinations of its tail pages go back to their allocator (they were leaked: found by
/// review).
#[test]
fn an_eviction_that_cannot_split_a_device_thp_frees_every_destination() {
    let r = rig();
    let (a, head) = device_thp(&r, 90);
    let before = r.m.phys.nr_in_use();
    let mut m = migrate_device_range(&r.m.phys, r.dev.frame(0), r.dev.nr_frames()).unwrap();
    let i = m.src().iter().position(|w| w.is_migrating()).unwrap();
    assert!(m.src()[i].flags().contains(MigratePfnFlags::COMPOUND));
    for k in i..i + NR as usize {
        let d = alloc(&r, Dst::System(0), 0);
        d.copy_from(&m.src_page(k).unwrap());
        m.set_dst(k, d, true).unwrap();
    }
    assert_eq!(r.m.phys.nr_in_use(), before + NR);
    let held = r.dev.device_frame(head).get();
    assert_eq!(
        m.pages().finalize().migrated,
        0,
        "referenced: not split, not moved"
    );
    assert_eq!(r.m.phys.nr_in_use(), before, "every destination went back");
    drop(held);
    assert!(on_device(&r, a, NR, 9));
    assert_eq!(evict(&r, 0), NR);
    check(&r, a, NR, 90);
    r.m.mm.audit().unwrap();
}

#[test]
fn eviction_takes_a_device_thp_only_with_all_its_pages_asked_for() {
    let r = rig();
    let (a, head) = device_thp(&r, 70);
    let head = head.as_u64();
    assert_eq!(
        head % NR,
        0,
        "device THPs are 2 MiB aligned in frame numbers"
    );
    let pfns = |list: &[u64]| list.iter().map(|&p| DevicePfn::new(p)).collect::<Vec<_>>();
    // A range ending inside the THP, a list with the head but not its pages after it, a
    // list with them out of order: nothing collected, nothing moved, nothing lost.
    let partial = migrate_device_range(&r.m.phys, r.dev.frame(0), NR - 1).unwrap();
    assert!(partial.src().iter().all(|w| w.is_empty()));
    drop(partial);
    let mut list: Vec<u64> = (head..head + NR).collect();
    list.swap(5, 6);
    for l in [vec![head, head + 1], vec![head], list] {
        let m = hmm::migrate::migrate_device_pfns(&r.m.phys, &pfns(&l));
        assert!(m.src().iter().all(|w| w.is_empty()), "{} pfns", l.len());
    }
    assert!(on_device(&r, a, NR, 9));
    r.m.mm.audit().unwrap();
    // The head followed by its pages, in a longer list: one unit, the tails' words 0, and
    // every page of it reachable through `src_page`.
    let mut l: Vec<u64> = (head..head + NR).collect();
    l.push(head + NR);
    let m = hmm::migrate::migrate_device_pfns(&r.m.phys, &pfns(&l));
    assert_eq!(m.src()[0].npages(), NR);
    assert!(m.src()[1..].iter().all(|w| w.is_empty()));
    for k in 0..NR as usize {
        assert_eq!(
            device_word(&r, m.src_page(k).unwrap().device_pfn().as_u64()),
            70 + k as u64
        );
    }
    assert!(m.src_page(NR as usize).is_none());
    drop(m);
    assert_eq!(evict(&r, 0), NR);
    check(&r, a, NR, 70);
    r.m.mm.audit().unwrap();
}

/// A CPU access to a device THP that is migrating back waits on its PMD migration entry
/// and then reads the bytes from the new THP (the wait once released the device folio's
/// reference as if it were a CPU frame, and panicked; found by `hmm stress`).
#[test]
fn a_cpu_access_waits_on_a_device_thps_pmd_migration_entry() {
    let r = rig();
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 80);
    let mut waited = false;
    // The reader must reach the entry while the migration holds it: try a few times.
    for _ in 0..5 {
        to_device_whole(&r, a);
        assert!(on_device(&r, a, NR, 9));
        let audit = r.m.mm.audit().unwrap();
        assert_eq!(
            (audit.frames_referenced, audit.device_frames_referenced),
            (0, NR),
            "a device THP is 512 device frames"
        );
        let before = r.m.mm.stats().faults.migration_wait;
        std::thread::scope(|s| {
            let mmap = r.m.mm.mmap_read();
            let mig = migrate_vma_setup(&mmap, args(&r, a, NR, DEV)).unwrap();
            assert_eq!(mig.src()[0].npages(), NR);
            let reader = s.spawn(|| r.m.mm.read_val::<u64>(page(a, 3)).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(migrate(&r, mig, Dst::System(PMD_ORDER)), NR);
            drop(mmap);
            assert_eq!(reader.join().unwrap(), 83);
        });
        waited |= r.m.mm.stats().faults.migration_wait > before;
        if waited {
            break;
        }
    }
    assert!(waited, "the reader never met the migration entry");
    check(&r, a, NR, 80);
    assert_eq!(r.dev.nr_in_use(), 0);
    let audit = r.m.mm.audit().unwrap();
    assert_eq!(
        (audit.frames_referenced, audit.device_frames_referenced),
        (NR, 0),
        "a THP is 512 frames of RAM"
    );
}

/// Every walker meets a PMD migration entry: a THP is collected for migration (one PMD
/// migration entry) on another thread, which holds it a while and then puts it back
/// (`migrate_vma_finalize` with no destination); meanwhile a walker runs on this thread.
/// Walkers under the mmap read lock meet the entry (or wait on it: a fault, GUP); those
/// that need the lock for writing run once the migration let go. Bytes, audit and frames
/// are checked after each.
#[test]
fn every_walker_meets_a_pmd_migration_entry() {
    use hmm::mm::{MremapFlags, Prot};
    use std::sync::mpsc;
    use std::time::Duration;
    /// Where the bytes are afterwards: (start, pages, first page's index), or `None`
    /// when the walker dropped them.
    type Walker = fn(&Rig, VirtAddr) -> Option<(VirtAddr, u64, u64)>;
    let walkers: [(&str, Walker); 17] = [
        ("pagemap", |r, a| {
            let map = r.m.mm.pagemap(a, NR).unwrap();
            // The entry, or the THP again if the migration let go first.
            assert!(map
                .iter()
                .all(|e| e.present || e.swap == Some(SwapKind::Migration)));
            Some((a, NR, 0))
        }),
        ("MADV_FREE, then lazy-free reclaim", |r, a| {
            r.m.mm.madvise(a, PMD_SIZE, Advice::Free).unwrap();
            r.m.mm.reclaim_lazyfree();
            None
        }),
        ("MADV_DONTNEED", |r, a| {
            r.m.mm.madvise(a, PMD_SIZE, Advice::DontNeed).unwrap();
            None
        }),
        ("MADV_POPULATE_READ", |r, a| {
            r.m.mm.madvise(a, PMD_SIZE, Advice::PopulateRead).unwrap();
            Some((a, NR, 0))
        }),
        ("MADV_POPULATE_WRITE", |r, a| {
            r.m.mm.madvise(a, PMD_SIZE, Advice::PopulateWrite).unwrap();
            Some((a, NR, 0))
        }),
        ("get_user_pages", |r, a| {
            drop(r.m.mm.get_user_pages(a, NR, GupFlags::empty()).unwrap());
            Some((a, NR, 0))
        }),
        ("clear_refs (soft-dirty)", |r, a| {
            r.m.mm.clear_soft_dirty();
            Some((a, NR, 0))
        }),
        ("mprotect read-only and back", |r, a| {
            r.m.mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
            r.m.mm.mprotect(a, PMD_SIZE, RW).unwrap();
            Some((a, NR, 0))
        }),
        ("mprotect of one half", |r, a| {
            r.m.mm.mprotect(a, PMD_SIZE / 2, Prot::READ).unwrap();
            Some((a, NR, 0))
        }),
        ("fork, the child reads", |r, a| {
            let child = r.m.mm.fork().unwrap();
            for i in 0..NR {
                assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), 300 + i);
            }
            child.audit().unwrap();
            Some((a, NR, 0))
        }),
        ("mremap to another place", |r, a| {
            let to =
                r.m.mm
                    .mremap(a, PMD_SIZE, PMD_SIZE, MremapFlags::MAYMOVE, None)
                    .unwrap();
            Some((to, NR, 0))
        }),
        ("munmap of one half", |r, a| {
            r.m.mm.munmap(a, PMD_SIZE / 2).unwrap();
            Some((page(a, NR / 2), NR / 2, NR / 2))
        }),
        ("MADV_NOHUGEPAGE and MADV_HUGEPAGE", |r, a| {
            r.m.mm.madvise(a, PMD_SIZE, Advice::NoHugePage).unwrap();
            r.m.mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
            Some((a, NR, 0))
        }),
        ("MADV_COLD", |r, a| {
            r.m.mm.madvise(a, PMD_SIZE, Advice::Cold).unwrap();
            Some((a, NR, 0))
        }),
        ("MADV_PAGEOUT", |r, a| {
            // The migration holds the folio locked: nothing is written until it is back.
            r.m.mm.madvise(a, PMD_SIZE, Advice::PageOut).unwrap();
            Some((a, NR, 0))
        }),
        ("reclaim", |r, _| {
            hmm::mm::reclaim(&r.m.phys, 2 * NR);
            None
        }),
        ("userfaultfd registration and write-protect", |r, a| {
            use hmm::mm::userfaultfd::{RegisterMode, UffdFeatures, Userfaultfd};
            let uffd = Userfaultfd::new(&r.m.mm, UffdFeatures::empty()).unwrap();
            uffd.register(a, PMD_SIZE, RegisterMode::WP).unwrap();
            // Meets the PMD migration entry (or the THP once it is back): the bit goes on
            // the entry and comes back with the mapping.
            uffd.writeprotect(a, PMD_SIZE, true, false).unwrap();
            let map = r.m.mm.pagemap(a, NR).unwrap();
            assert!(map.iter().all(|e| e.uffd_wp));
            r.m.mm.audit().unwrap();
            drop(uffd);
            assert!(r.m.mm.pagemap(a, NR).unwrap().iter().all(|e| !e.uffd_wp));
            Some((a, NR, 0))
        }),
    ];
    for (name, walk) in walkers {
        let r = rig();
        r.m.phys.swapon(4 * PMD_SIZE).unwrap();
        let a = huge_map(&r, 1);
        fill(&r, a, NR, 300);
        assert!(r
            .m
            .mm
            .pagemap(a, NR)
            .unwrap()
            .iter()
            .all(|e| e.present && e.order == 9));
        let (tx, rx) = mpsc::channel();
        let kept = std::thread::scope(|s| {
            let r = &r;
            s.spawn(move || {
                let mmap = r.m.mm.mmap_read();
                let mig = migrate_vma_setup(&mmap, args(r, a, NR, SYS)).unwrap();
                assert_eq!(mig.src()[0].npages(), NR, "{name}: one unit");
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                // No destination: the THP goes back where it was.
                assert_eq!(mig.pages().finalize().restored, NR, "{name}");
            });
            rx.recv().unwrap();
            walk(r, a)
        });
        r.m.mm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
        match kept {
            Some((at, pages, first)) => check(&r, at, pages, 300 + first),
            None if name == "reclaim" => check(&r, a, NR, 300),
            None => {
                // Dropped, or kept if the walker ran after the THP was back and free
                // (MADV_FREE's pages are discarded only when clean).
                let v = r.m.mm.read_val::<u64>(a).unwrap();
                let dropped = name == "MADV_DONTNEED";
                assert!(v == 0 || (v == 300 && !dropped), "{name}: {v}");
            }
        }
        r.m.mm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The 2026 fix to `page_vma_mapped_walk`: it found a device-private PMD, locked it and
/// returned it without checking it was still the same PMD, so a walk racing a split (or a
/// zap) of that PMD worked on an entry that had changed. Here the reverse-map walks of an
/// eviction (`migrate_device_range` of the device THP, in this address space and a fork
/// child's) race another thread that splits the same device PMD (mprotect of half of it),
/// moves it (mremap back and forth) or zaps half of it, round after round: every walk
/// must act on the entry it read under the lock, so no byte, frame or map count is lost.
#[test]
fn an_eviction_racing_changes_of_the_device_pmd_loses_nothing() {
    use hmm::mm::{MremapFlags, Prot};
    for round in 0..12u64 {
        let r = rig();
        let (a, _) = device_thp(&r, 500 + round);
        let child = r.m.mm.fork().unwrap();
        let spare =
            r.m.mm
                .mmap(None, 2 * PMD_SIZE, RW, MapFlags::PRIVATE)
                .unwrap();
        let spare = spare.align_up(PMD_SIZE).unwrap();
        let moved = std::thread::scope(|s| {
            let r = &r;
            let changer = s.spawn(move || match round % 3 {
                0 => {
                    r.m.mm.mprotect(a, PMD_SIZE / 2, Prot::READ).unwrap();
                    a
                }
                1 => {
                    r.m.mm
                        .mremap(
                            a,
                            PMD_SIZE,
                            PMD_SIZE,
                            MremapFlags::MAYMOVE | MremapFlags::FIXED,
                            Some(spare),
                        )
                        .unwrap()
                }
                _ => {
                    r.m.mm.munmap(page(a, NR / 2), PMD_SIZE / 2).unwrap();
                    a
                }
            });
            let evicted = evict(r, if round % 2 == 0 { PMD_ORDER } else { 0 });
            assert!(evicted <= NR);
            changer.join().unwrap()
        });
        r.m.mm
            .audit()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        child
            .audit()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let kept = if round % 3 == 2 { NR / 2 } else { NR };
        check(&r, moved, kept, 500 + round);
        for i in 0..NR {
            assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), 500 + round + i);
        }
        drop(child);
        let Rig { m, dev, .. } = r;
        drop(m.mm);
        assert_eq!(dev.nr_in_use(), 0, "round {round}: device frames");
    }
}
