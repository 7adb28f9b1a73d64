//! Model checks of hmm's concurrency protocols with [shuttle](https://docs.rs/shuttle).
//!
//! Built with the `shuttle` feature, hmm's locks, condition variables and protocol atomics
//! (page-table entries, frame metadata and the folio lock, the interval sequence) are
//! shuttle's (see `hmm::sync`), so each operation is a scheduling point. Every check below
//! runs the real mm, notifier, fault and migration code on two or three threads, under
//! shuttle's random scheduler and its PCT scheduler (which is guaranteed to find, with a
//! known probability, any bug needing at most `depth` ordering constraints), and states its
//! invariant after every schedule:
//!
//! 1. the interval sequence protocol: a device mirror never keeps a PFN the CPU table no
//!    longer maps, whatever the interleaving of `read_begin` / walk / `read_retry` /
//!    commit with an invalidation (and a mirror that forgets `set_seq` is caught);
//! 2. a CPU fault against `migrate_vma` on the same page, both ways: no write is lost;
//! 3. migration against `munmap`: no frame (system or device) leaks, nothing stays locked;
//! 4. device-exclusive access against a CPU fault: the device's exclusive mapping is
//!    revoked before the CPU touches the page, and neither side's write is lost;
//! 5. a driver evicting its memory (`migrate_device_range`, no mmap lock) against `fork`:
//!    no migration entry is left behind in the child, whose copy the reverse-map walks
//!    must find (a missed one waits for ever on a freed page);
//! 6. a 1 GiB PUD leaf going in against walks populating PTEs under it: the leaf replaces
//!    only a table that maps nothing, and no walk writes into a table the leaf replaced
//!    (a PTE no walk can reach any more);
//! 7. pageout of a page a parent and its fork child share, against both reading it: the
//!    swap slot outlives the walk that installs its entries one address space at a time
//!    (a swap-in of the first must not free it before the second is installed).
//!
//! Every schedule ends with `Mm::audit` and a frame count. The budget per check is
//! `HMM_SHUTTLE_ITERS` schedules per scheduler (default 1000):
//!
//! ```text
//! cargo test --release -p hmm --features shuttle --test shuttle
//! HMM_SHUTTLE_ITERS=20000 cargo test --release -p hmm --features shuttle --test shuttle
//! ```

use std::sync::Arc;

use hmm::addr::{Pfn, VaRange, VirtAddr, PAGE_SIZE, PMD_SIZE, PUD_SIZE};
use hmm::exclusive::make_device_exclusive;
use hmm::migrate::{
    migrate_device_range, migrate_vma_setup, MigratePfnFlags, MigrateVma, MigrateVmaFlags,
    Migration,
};
use hmm::mm::{Advice, DeviceFault, MapFlags, Mm, Prot, SwapKind, VmFault};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent,
    NotifierRange, Owner,
};
use hmm::pgtable::{PageTable, Pte, PteFlags, Slot, WalkMode};
use hmm::phys::{FrameFlags, FrameRef, PhysConfig, PhysMem};
use hmm::range_fault::{fault_and_commit, HmmPfn, HmmPfnFlags, HmmRange};
use hmm::sync::Mutex;
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};
use shuttle::scheduler::{PctScheduler, RandomScheduler, Scheduler};
use shuttle::{thread, Config, Runner};

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn iterations() -> usize {
    std::env::var("HMM_SHUTTLE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

fn run_with(scheduler: impl Scheduler + 'static, f: impl Fn() + Send + Sync + 'static) {
    let mut config = Config::new();
    config.silence_warnings = true;
    // The mm code runs on shuttle's coroutine stacks.
    config.stack_size = 1 << 20;
    Runner::new(scheduler, config).run(f);
}

/// Runs `f` under the random scheduler and under PCT with depth 3.
fn explore(f: impl Fn() + Send + Sync + Clone + 'static) {
    let n = iterations();
    run_with(RandomScheduler::new(n), f.clone());
    run_with(PctScheduler::new(3, n), f);
}

/// One address space over 4 MiB of RAM, with a device-private pagemap of 2 MiB whose
/// `migrate_to_ram` migrates the faulting page back, as a driver's does.
struct World {
    phys: Arc<PhysMem>,
    mm: Arc<Mm>,
    dev: Arc<DevPagemap>,
    owner: Owner,
}

/// The driver side of the pagemap: CPU faults on its pages migrate them back.
struct BackToRam {
    owner: Owner,
}

impl DevPagemapOps for BackToRam {
    fn migrate_to_ram(&self, vmf: &DeviceFault<'_>) -> Result<(), VmFault> {
        let start = vmf.address().page_down();
        let args = MigrateVma {
            start,
            end: start.checked_add(PAGE_SIZE).ok_or(VmFault::Sigbus)?,
            pgmap_owner: Some(self.owner),
            flags: MigrateVmaFlags::SELECT_DEVICE_PRIVATE,
            fault_page: Some(vmf.page()),
        };
        let mig = migrate_vma_setup(vmf.mmap(), args).map_err(|_| VmFault::Sigbus)?;
        copy_into(mig, || system_page(vmf.mmap().mm().phys()));
        Ok(())
    }
}

impl World {
    fn new() -> World {
        let phys = PhysMem::new(PhysConfig::with_size(4 << 20)).unwrap();
        let owner = Owner::new_unique();
        let dev = memremap_pages(
            &phys,
            PagemapConfig {
                kind: MemoryType::DevicePrivate,
                owner,
                size_bytes: 2 << 20,
            },
            Arc::new(BackToRam { owner }),
        )
        .unwrap();
        let mm = Mm::new(Arc::clone(&phys));
        World {
            phys,
            mm,
            dev,
            owner,
        }
    }

    /// Maps `npages` and writes `page index + 1` to the first word of each.
    fn buffer(&self, npages: u64) -> VirtAddr {
        let a = self
            .mm
            .mmap(None, npages * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
        for i in 0..npages {
            self.mm.write_val(page(a, i), i + 1).unwrap();
        }
        a
    }

    /// Migrates `[a, a + npages)` to the device (system pages only); returns the pages
    /// migrated, 0 when the range is gone.
    fn to_device(&self, a: VirtAddr, npages: u64) -> u64 {
        self.migrate(a, npages, MigrateVmaFlags::SELECT_SYSTEM, || {
            self.dev.alloc(0, FrameFlags::empty()).ok()
        })
    }

    /// Migrates the device's pages of `[a, a + npages)` back to system memory.
    fn to_system(&self, a: VirtAddr, npages: u64) -> u64 {
        self.migrate(a, npages, MigrateVmaFlags::SELECT_DEVICE_PRIVATE, || {
            system_page(&self.phys)
        })
    }

    fn migrate<'p>(
        &self,
        a: VirtAddr,
        npages: u64,
        flags: MigrateVmaFlags,
        alloc: impl FnMut() -> Option<hmm::phys::LockedFolio<'p>>,
    ) -> u64 {
        let mmap = self.mm.mmap_read();
        migrate_vma_setup(&mmap, self.args(a, npages, flags)).map_or(0, |m| copy_into(m, alloc))
    }

    /// The arguments of a migration of `[a, a + npages)` by this device's driver.
    fn args(&self, a: VirtAddr, npages: u64, flags: MigrateVmaFlags) -> MigrateVma {
        MigrateVma {
            start: a,
            end: page(a, npages),
            pgmap_owner: Some(self.owner),
            flags,
            fault_page: None,
        }
    }

    /// The invariants every schedule ends with, once the buffer at `a` is unmapped: the
    /// address space audits clean and every frame is free again.
    fn teardown(self, a: VirtAddr, npages: u64) {
        self.mm.audit().unwrap();
        let _ = self.mm.munmap(a, npages * PAGE_SIZE);
        self.mm.audit().unwrap();
        assert_eq!(self.dev.nr_in_use(), 0, "a device frame leaked");
        assert_eq!(self.phys.nr_in_use(), 0, "a system frame leaked");
    }
}

/// A fresh system page, locked, as a migration destination must be.
fn system_page(phys: &PhysMem) -> Option<hmm::phys::LockedFolio<'_>> {
    let page = phys.alloc(0, FrameFlags::empty()).ok()?.lock();
    Some(page)
}

#[track_caller]
fn page(base: VirtAddr, i: u64) -> VirtAddr {
    base.checked_add(i * PAGE_SIZE).unwrap()
}

/// Gives every migrating entry a page from `alloc` holding the source's bytes, commits
/// and finalizes; returns the pages migrated.
fn copy_into<'p>(
    mut mig: Migration<'_, '_>,
    alloc: impl FnMut() -> Option<hmm::phys::LockedFolio<'p>>,
) -> u64 {
    fill_dst(&mut mig, alloc);
    mig.pages().finalize().migrated
}

/// Gives every migrating entry a page from `alloc` holding the source's bytes.
fn fill_dst<'p>(
    mig: &mut Migration<'_, '_>,
    mut alloc: impl FnMut() -> Option<hmm::phys::LockedFolio<'p>>,
) {
    for i in 0..mig.src().len() {
        let w = mig.src()[i];
        if !w.is_migrating() {
            continue;
        }
        let Some(d) = alloc() else { continue };
        match mig.src_page(i) {
            Some(s) => d.copy_from(&s),
            None => d.zero(),
        }
        let write = w.flags().contains(MigratePfnFlags::WRITE) || !w.is_valid();
        mig.set_dst(i, d, write).unwrap();
    }
}

/// What a device mirror holds for the one page it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    None,
    /// A read or write mapping of a system frame.
    Mapped(u64),
    /// Exclusive access to a system frame (device atomics allowed).
    Exclusive(u64),
}

/// How a mirror's `invalidate` treats the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Records it on every event it does not ignore, its own MIGRATE events included
    /// (hmm-rs's dmirror).
    Full,
    /// Never records it (a broken driver: the negative control).
    NoSetSeq,
    /// Returns at once from its own MIGRATE events, as the kernel's `test_hmm.c` does.
    IgnoreOwnMigrate,
}

/// A one-page device mirror whose `invalidate` follows `protocol`: under its lock,
/// `set_seq`, then drop the mapping, except on its own MIGRATE events (its migrations map
/// the new page themselves). Its own EXCLUSIVE events it ignores altogether, as nouveau
/// does (the frame stays the same, and recording the sequence would make its own atomic
/// loop retry for ever).
struct Mirror {
    owner: Owner,
    pt: Mutex<Mapping>,
    protocol: Protocol,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &IntervalSub, range: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        let own = range.owner == Some(self.owner);
        let own_migration = own && range.event == NotifierEvent::Migrate;
        if own && range.event == NotifierEvent::Exclusive
            || own_migration && self.protocol == Protocol::IgnoreOwnMigrate
        {
            return true;
        }
        let mut pt = self.pt.lock();
        if self.protocol != Protocol::NoSetSeq {
            sub.set_seq(cur_seq);
        }
        if !own_migration {
            *pt = Mapping::None;
        }
        true
    }
}

fn mirror(w: &World, a: VirtAddr, protocol: Protocol) -> (Arc<Mirror>, IntervalNotifier) {
    let m = Arc::new(Mirror {
        owner: w.owner,
        pt: Mutex::new(Mapping::None),
        protocol,
    });
    let n =
        w.mm.interval_notifier_insert(a, PAGE_SIZE, m.clone())
            .unwrap();
    (m, n)
}

/// The device faults the page in writable and maps it, through the documented loop.
fn device_fault(w: &World, (m, n): &(Arc<Mirror>, IntervalNotifier), a: VirtAddr) {
    let mut pfns = [HmmPfn::default()];
    let mut range = HmmRange {
        notifier: n,
        notifier_seq: n.read_begin(),
        start: a,
        end: page(a, 1),
        hmm_pfns: &mut pfns,
        default_flags: HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE,
        pfn_flags_mask: HmmPfnFlags::empty(),
        dev_private_owner: Some(w.owner),
    };
    fault_and_commit(
        &w.mm,
        &mut range,
        std::time::Duration::from_secs(60),
        &m.pt,
        |pt, r| {
            *pt = Mapping::Mapped(r.hmm_pfns[0].frame_nr());
        },
    )
    .unwrap();
}

/// The CPU's entry for `a`: (present frame, or the kind and frame of a swap entry).
fn cpu_entry(w: &World, a: VirtAddr) -> (Option<SwapKind>, Option<u64>) {
    let e = w.mm.pagemap(a, 1).unwrap()[0];
    (e.swap, e.pfn.filter(|_| e.present || e.swap.is_some()))
}

/// The mirror's mapping agrees with the CPU table: a mapped frame is the one the CPU
/// maps (or the device page its device-private entry names), an exclusive frame is still
/// under the CPU's device-exclusive entry.
fn assert_coherent(w: &World, m: &Mirror, a: VirtAddr) {
    let pt = m.pt.lock();
    match *pt {
        Mapping::None => {}
        Mapping::Mapped(pfn) => {
            let (swap, cpu) = cpu_entry(w, a);
            assert!(
                matches!(swap, None | Some(SwapKind::DevicePrivate)) && cpu == Some(pfn),
                "stale mirror: it maps {pfn:#x}, the CPU entry is {swap:?} {cpu:x?}"
            );
        }
        Mapping::Exclusive(pfn) => assert_eq!(
            cpu_entry(w, a),
            (Some(SwapKind::DeviceExclusive), Some(pfn)),
            "the CPU touched a page the device still holds exclusively"
        ),
    }
}

fn interval_seq_protocol(protocol: Protocol) {
    let w = Arc::new(World::new());
    let a = w.buffer(1);
    let mir = Arc::new(mirror(&w, a, protocol));
    let device = {
        let (w, mir) = (Arc::clone(&w), Arc::clone(&mir));
        thread::spawn(move || device_fault(&w, &mir, a))
    };
    // The CPU drops the page, another page takes the freed frame (whichever the allocator
    // hands out), and the CPU faults a new one in: a mirror that kept the old frame would
    // now see another page's bytes.
    let other = w.mm.mmap(None, PAGE_SIZE, RW, MapFlags::PRIVATE).unwrap();
    w.mm.madvise(a, PAGE_SIZE, Advice::DontNeed).unwrap();
    w.mm.write_val(other, 9u64).unwrap();
    w.mm.write_val(a, 7u64).unwrap();
    device.join().unwrap();
    assert_coherent(&w, &mir.0, a);
    drop(Arc::into_inner(mir).unwrap());
    w.mm.munmap(other, PAGE_SIZE).unwrap();
    Arc::into_inner(w).unwrap().teardown(a, 1);
}

#[test]
fn interval_seq_protocol_keeps_mirrors_coherent() {
    explore(|| interval_seq_protocol(Protocol::Full));
}

/// Asserts that [`explore`] finds a schedule where `f` fails with a panic message
/// containing `failure`: the negative controls, without which a passing check would prove
/// nothing.
fn assert_caught(what: &str, failure: &str, f: impl Fn() + Send + Sync + Clone + 'static) {
    let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| explore(f))) else {
        panic!("shuttle did not catch {what}");
    };
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(
        msg.contains(failure),
        "{what}: caught another failure: {msg}"
    );
}

#[test]
fn a_mirror_that_forgets_set_seq_is_caught() {
    assert_caught("a mirror without set_seq", "stale mirror", || {
        interval_seq_protocol(Protocol::NoSetSeq)
    });
}

/// The device faults the page while its own driver migrates it to the device and maps the
/// device page: the fault's snapshot of the system page must not overwrite that mapping.
fn fault_against_own_migration(protocol: Protocol) {
    let w = Arc::new(World::new());
    let a = w.buffer(1);
    let mir = Arc::new(mirror(&w, a, protocol));
    let device = {
        let (w, mir) = (Arc::clone(&w), Arc::clone(&mir));
        thread::spawn(move || device_fault(&w, &mir, a))
    };
    {
        let mmap = w.mm.mmap_read();
        let args = w.args(a, 1, MigrateVmaFlags::SELECT_SYSTEM);
        let mut mig = migrate_vma_setup(&mmap, args).unwrap();
        fill_dst(&mut mig, || w.dev.alloc(0, FrameFlags::empty()).ok());
        let pages = mig.pages();
        // dmirror_migrate_finalize_and_map: the driver maps what it migrated.
        if pages.src()[0].is_migrating() && !pages.dst()[0].is_empty() {
            *mir.0.pt.lock() = Mapping::Mapped(pages.dst()[0].frame_nr());
        }
        pages.finalize();
    }
    device.join().unwrap();
    assert_coherent(&w, &mir.0, a);
    drop(Arc::into_inner(mir).unwrap());
    Arc::into_inner(w).unwrap().teardown(a, 1);
}

#[test]
fn own_migrate_events_that_record_the_sequence_keep_mirrors_coherent() {
    explore(|| fault_against_own_migration(Protocol::Full));
}

/// What `hmm stress` found in the kernel's way (see DESIGN.md, "dmirror"): a mirror that
/// returns from its own MIGRATE events without `set_seq` lets a racing device fault map
/// the old system page.
#[test]
fn own_migrate_events_ignored_outright_are_caught() {
    assert_caught(
        "a mirror ignoring its own MIGRATE events",
        "stale mirror",
        || fault_against_own_migration(Protocol::IgnoreOwnMigrate),
    );
}

#[test]
fn cpu_fault_against_migrate_vma_loses_no_write() {
    explore(|| {
        let w = Arc::new(World::new());
        let a = w.buffer(2);
        let migrator = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                w.to_device(a, 2);
                w.to_system(a, 2);
                w.to_device(a, 2);
            })
        };
        // One store races the migrations (a migration entry makes it wait; a device-private
        // entry sends it through migrate_to_ram); the other page is only read.
        w.mm.write_val(a, 0xabcd_u64).unwrap();
        assert_eq!(w.mm.read_val::<u64>(a).unwrap(), 0xabcd);
        assert_eq!(w.mm.read_val::<u64>(page(a, 1)).unwrap(), 2);
        migrator.join().unwrap();
        assert_eq!(
            w.mm.read_val::<u64>(a).unwrap(),
            0xabcd,
            "a CPU write was lost"
        );
        assert_eq!(w.mm.read_val::<u64>(page(a, 1)).unwrap(), 2);
        Arc::into_inner(w).unwrap().teardown(a, 2);
    });
}

#[test]
fn migration_against_munmap_leaks_nothing() {
    explore(|| {
        let w = Arc::new(World::new());
        let a = w.buffer(2);
        let migrator = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                w.to_device(a, 2);
                w.to_system(a, 2);
            })
        };
        // Half the range first, then the rest.
        w.mm.munmap(page(a, 1), PAGE_SIZE).unwrap();
        w.mm.munmap(a, PAGE_SIZE).unwrap();
        migrator.join().unwrap();
        assert!(w.mm.vmas().is_empty());
        for i in 0..w.dev.nr_frames() {
            assert!(
                !w.dev.frame(i).meta().is_locked(),
                "a device page stayed locked"
            );
        }
        Arc::into_inner(w).unwrap().teardown(a, 2);
    });
}

/// The device takes exclusive access through the protocol and does an atomic add of 100 on
/// the page's first word.
fn device_atomic(w: &World, (m, n): &(Arc<Mirror>, IntervalNotifier), a: VirtAddr) {
    loop {
        let seq = n.read_begin();
        let mmap = w.mm.mmap_read();
        let page = make_device_exclusive(&mmap, a, Some(w.owner)).unwrap();
        let mut pt = m.pt.lock();
        if n.read_retry(seq) {
            continue;
        }
        let frame: FrameRef<'_> = page.page();
        *pt = Mapping::Exclusive(frame.pfn().as_u64());
        let mut word = [0u8; 8];
        frame.read(0, &mut word);
        frame.write(0, &(u64::from_le_bytes(word) + 100).to_le_bytes());
        return;
    }
}

#[test]
fn exclusive_access_is_revoked_before_the_cpu_touches_the_page() {
    explore(|| {
        let w = Arc::new(World::new());
        let a = w.buffer(1);
        let mir = Arc::new(mirror(&w, a, Protocol::Full));
        let device = {
            let (w, mir) = (Arc::clone(&w), Arc::clone(&mir));
            thread::spawn(move || device_atomic(&w, &mir, a))
        };
        // A CPU store to another word of the same page, racing the device's atomic.
        w.mm.write_val(page(a, 0).checked_add(8).unwrap(), 7u64)
            .unwrap();
        device.join().unwrap();
        assert_coherent(&w, &mir.0, a);
        // Any CPU access now revokes what the device holds.
        assert_eq!(
            w.mm.read_val::<u64>(a).unwrap(),
            101,
            "the device's add was lost"
        );
        assert_eq!(
            *mir.0.pt.lock(),
            Mapping::None,
            "a CPU access left the device exclusive"
        );
        assert_eq!(cpu_entry(&w, a).0, None);
        assert_eq!(
            w.mm.read_val::<u64>(a.checked_add(8).unwrap()).unwrap(),
            7,
            "the CPU store was lost"
        );
        drop(Arc::into_inner(mir).unwrap());
        Arc::into_inner(w).unwrap().teardown(a, 1);
    });
}

/// Evicts every page of the device to system memory, as a driver removing its memory
/// does; returns the pages evicted.
fn evict(w: &World) -> u64 {
    let mut m = migrate_device_range(&w.phys, w.dev.frame(0), w.dev.nr_frames()).unwrap();
    for i in 0..m.src().len() {
        let Some(src) = m.src_page(i) else { continue };
        let page = system_page(&w.phys).expect("RAM for the eviction");
        page.copy_from(&src);
        m.set_dst(i, page, true).unwrap();
    }
    m.pages().finalize().migrated
}

#[test]
fn device_eviction_against_fork_leaves_no_migration_entry() {
    explore(|| {
        let w = Arc::new(World::new());
        let a = w.buffer(1);
        assert_eq!(w.to_device(a, 1), 1);
        let evictor = {
            let w = Arc::clone(&w);
            thread::spawn(move || evict(&w))
        };
        let child = w.mm.fork().unwrap();
        evictor.join().unwrap();
        for mm in [&w.mm, &child] {
            let e = mm.pagemap(a, 1).unwrap()[0];
            assert_ne!(
                e.swap,
                Some(SwapKind::Migration),
                "a migration entry outlived the eviction"
            );
            assert_eq!(mm.read_val::<u64>(a).unwrap(), 1);
        }
        child.audit().unwrap();
        drop(child);
        Arc::into_inner(w).unwrap().teardown(a, 1);
    });
}

/// Check 6: `PudGuard::set_leaf` against two populating walks in the same GiB, one into
/// the PTE table a walk left there before, one into a PMD slot with no table yet.
#[test]
fn a_pud_leaf_never_hides_a_pte_written_under_it() {
    explore(|| {
        let pt = Arc::new(PageTable::new());
        let base = VirtAddr::new(PUD_SIZE);
        let old = base + PAGE_SIZE;
        let new = base + 3 * PMD_SIZE;
        let present = |n| Pte::Present {
            pfn: Pfn::new(n),
            flags: PteFlags::WRITE,
        };
        // A populating walk that left an empty PTE table behind.
        {
            let mut c = pt.cursor(VaRange::page_of(old), WalkMode::Populate);
            assert!(matches!(c.next(), Some(Slot::Pte(_))));
        }
        let leaf = present(1 << 18);
        let placer = {
            let pt = pt.clone();
            thread::spawn(move || {
                let pud = pt.lock_pud(base, WalkMode::Populate).unwrap();
                pud.set_leaf(leaf)
            })
        };
        let writers: Vec<_> = [old, new]
            .into_iter()
            .map(|va| {
                let pt = pt.clone();
                thread::spawn(move || {
                    let mut c = pt.cursor(VaRange::page_of(va), WalkMode::Populate);
                    match c.next() {
                        Some(Slot::Pte(p)) => {
                            p.set(present(7));
                            true
                        }
                        Some(Slot::Pud(p)) => {
                            assert_eq!(p.get(), leaf);
                            false
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                })
            })
            .collect();
        let placed = placer.join().unwrap();
        let wrote: Vec<bool> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        assert!(
            !(placed && wrote.iter().any(|&w| w)),
            "a PTE was written under the PUD leaf: placed {placed}, wrote {wrote:?}"
        );
        // What a walk finds now agrees with what each side did.
        for (va, wrote) in [old, new].into_iter().zip(wrote) {
            let mut c = pt.cursor(VaRange::page_of(va), WalkMode::Lookup);
            match c.next() {
                Some(Slot::Pud(p)) => assert!(placed && p.get() == leaf),
                Some(Slot::Pte(p)) => {
                    assert!(!placed);
                    assert_eq!(p.get(), if wrote { present(7) } else { Pte::None });
                }
                Some(Slot::Hole(_)) => assert!(!placed && !wrote),
                other => panic!("unexpected {other:?}"),
            }
        }
    });
}

/// Check 7: reclaim of a page shared with a fork child (`MADV_PAGEOUT` leaves shared
/// pages; the reclaim clock takes them, and its walk installs a swap entry in each address
/// space in turn) against the parent and the child reading it (a swap-in frees the slot's
/// counts it holds). `hmm stress` found the slot freed under the walk when the walk held
/// no count of its own.
#[test]
fn pageout_of_a_shared_page_against_swap_ins_keeps_the_slot() {
    explore(|| {
        let w = World::new();
        w.phys.swapon(16 * PAGE_SIZE).unwrap();
        let a = w.buffer(1);
        let child = w.mm.fork().unwrap();
        // Old in both, so the clock takes it at its first look.
        w.mm.madvise(a, PAGE_SIZE, Advice::Cold).unwrap();
        child.madvise(a, PAGE_SIZE, Advice::Cold).unwrap();
        let pageout = {
            let phys = w.phys.clone();
            thread::spawn(move || {
                hmm::mm::reclaim(&phys, 1);
            })
        };
        let readers: Vec<_> = [w.mm.clone(), child.clone()]
            .into_iter()
            .map(|mm| thread::spawn(move || mm.read_val::<u64>(a).unwrap()))
            .collect();
        pageout.join().unwrap();
        for r in readers {
            assert_eq!(r.join().unwrap(), 1);
        }
        assert_eq!(w.mm.read_val::<u64>(a).unwrap(), 1);
        assert_eq!(child.read_val::<u64>(a).unwrap(), 1);
        w.mm.audit().unwrap();
        child.audit().unwrap();
        drop(child);
        w.mm.munmap(a, PAGE_SIZE).unwrap();
        let swap = w.phys.swap().unwrap().stats();
        assert_eq!(swap.used, 0, "a swap slot leaked: {swap:?}");
    });
}
