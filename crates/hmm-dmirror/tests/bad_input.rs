//! Bad input to every public entry point, in one place: unaligned, zero, overflowing,
//! outside any VMA, another owner's, an exited process's. Each gets a typed error (the
//! kernel's errno where the kernel has the call) and changes nothing: the snapshot taken
//! before (VMAs, every page-table entry, every byte of every mapped frame, frames in use in
//! RAM and on each device, both device tables, the notifier events, the counters of the
//! operations that did not happen) is the snapshot taken after.
//!
//! | Entry point | unaligned | zero | overflow | outside a VMA | another owner | exited |
//! |---|---|---|---|---|---|---|
//! | `Mm::mmap`, `mmap_file`, `mmap_driver` | ✓ | ✓ | ✓ | (`MAP_FIXED` below the floor, past the top) | | |
//! | `Mm::munmap` | ✓ | ✓ | ✓ | ✓ | | |
//! | `Mm::mprotect`, `Mm::madvise` | ✓ | (no-op) | ✓ | ✓ | | |
//! | `Mm::mremap` | ✓ | ✓ | ✓ | ✓ | | |
//! | `Mm::read`, `write`, `handle_mm_fault` | | (no-op) | ✓ | ✓ | | |
//! | `Mm::pagemap` | ✓ | | ✓ | (reported as not present) | | |
//! | `get_user_pages`, `pin_user_pages` | ✓ | ✓ | ✓ | ✓ | | |
//! | `vm_insert_page` | ✓ | | | ✓ (and a VMA that is not the driver's) | | |
//! | `MemFile::pwrite`, `truncate` | | | ✓ | | | |
//! | `interval_notifier_insert`, `register_notifier` | | ✓ | ✓ | | | ✓ |
//! | `hmm_range_fault` | ✓ | ✓ | ✓ (reversed, wrong array length) | ✓ | ✓ (another mm's notifier) | |
//! | `hmm_range_fault_migrate` | ✓ | ✓ | | ✓ (`ERANGE`) | | |
//! | `migrate_vma_setup` | ✓ | ✓ | ✓ | ✓ (two VMAs, hugetlb) | ✓ (a fault page that is not locked or not the owner's) | |
//! | `migrate_device_range`, `migrate_device_pfns` | | ✓ | | ✓ (RAM, unregistered frames) | ✓ | |
//! | `make_device_exclusive` | ✓ | | | ✓ | | |
//! | `PhysMem::new`, `memremap_pages`, `FaultAttr::set` | ✓ | ✓ | ✓ | | | |
//! | dmirror: every command | ✓ | ✓ | ✓ | ✓ | ✓ (another device's pages) | ✓ |

mod common;

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use common::{page, rig, Rig, RW};
use hmm::addr::{DevicePfn, VirtAddr, PAGE_SIZE, PMD_SIZE, TASK_SIZE, USER_VA_END};
use hmm::exclusive::{make_device_exclusive, ExclusiveError};
use hmm::fault_inject::{FaultAttr, FaultConfig, FaultConfigError};
use hmm::migrate::{
    hmm_range_fault_migrate, migrate_device_pfns, migrate_device_range, migrate_vma_setup,
    MigrateError, MigrateVma, MigrateVmaFlags,
};
use hmm::mm::{
    Advice, FaultError, FaultFlags, GupFlags, MapFlags, MemFile, Mm, MmError, MremapFlags, Prot,
    SegvCause, UserPages, MMAP_MIN_ADDR,
};
use hmm::notifier::{
    IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierError, NotifierRange, Owner, Recorder,
};
use hmm::phys::{PhysConfig, PhysError, PhysMem, MAX_RAM_BYTES, MAX_SECTION_BYTES};
use hmm::range_fault::{hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange};
use hmm::zone_device::{memremap_pages, DevPagemapOps, MemoryType, PagemapConfig, PagemapError};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorError, HmmDmirrorCmd};

/// The process every case works on.
///
/// `a` (8 pages): 0..4 written, 4..6 holes, 6..8 written then migrated to device 0.
/// `ro` (2 pages, read-only) lies right below `a`, so a range over both crosses VMAs;
/// above `a` is a hole of 2 pages.
struct World {
    r: Rig,
    d: [Arc<Dmirror>; 2],
    rec: Arc<Recorder>,
    _rec_handle: hmm::notifier::MmuNotifierHandle,
    a: VirtAddr,
    ro: VirtAddr,
    /// An interval notifier over `a`, for the range-fault cases.
    sub: hmm::notifier::IntervalNotifier,
    /// The owner of device 0.
    owner: Owner,
}

struct Quiet;
impl IntervalNotifierOps for Quiet {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        sub.set_seq(cur_seq);
        true
    }
}
impl DevPagemapOps for Quiet {}

fn world() -> World {
    let r = rig();
    let d = [r.open(0), r.open(1)];
    let a = r.map(10);
    r.mm.munmap(page(a, 8), 2 * PAGE_SIZE).unwrap();
    let ro =
        r.mm.mmap(
            Some(page(a, 0).checked_sub(2 * PAGE_SIZE).unwrap()),
            2 * PAGE_SIZE,
            Prot::READ,
            MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
        )
        .unwrap();
    for i in (0..4).chain(6..8) {
        r.mm.write_val(page(a, i), 0x1000 + i).unwrap();
    }
    r.run(&d[0], DmirrorCmd::MigrateToDev, page(a, 6), 2)
        .unwrap();
    let rec = Arc::new(Recorder::new());
    let rec_handle = r.mm.register_notifier(rec.clone()).unwrap();
    let sub =
        r.mm.interval_notifier_insert(a, 8 * PAGE_SIZE, Arc::new(Quiet))
            .unwrap();
    let owner = r.driver.device(0).owner();
    World {
        r,
        d,
        rec,
        _rec_handle: rec_handle,
        a,
        ro,
        sub,
        owner,
    }
}

/// Everything a rejected call must leave as it was.
struct Snapshot {
    vmas: String,
    entries: Vec<String>,
    /// A hash of the bytes of every mapped frame, in address order.
    bytes: u64,
    ram_in_use: u64,
    device_in_use: [u64; 2],
    device_tables: [usize; 2],
    faults: u64,
    migrate_setups: u64,
}

impl Snapshot {
    /// The fields that differ from `other`, by name.
    fn diff(&self, other: &Snapshot) -> Vec<&'static str> {
        let mut d = Vec::new();
        let mut check = |name, same: bool| {
            if !same {
                d.push(name);
            }
        };
        check("vmas", self.vmas == other.vmas);
        check("page-table entries", self.entries == other.entries);
        check("bytes", self.bytes == other.bytes);
        check("RAM in use", self.ram_in_use == other.ram_in_use);
        check(
            "device memory in use",
            self.device_in_use == other.device_in_use,
        );
        check("device tables", self.device_tables == other.device_tables);
        check("faults", self.faults == other.faults);
        check(
            "migrate setups",
            self.migrate_setups == other.migrate_setups,
        );
        d
    }
}

impl World {
    fn snapshot(&self) -> Snapshot {
        let mm = &self.r.mm;
        let mut entries = Vec::new();
        let mut bytes = std::collections::hash_map::DefaultHasher::new();
        for v in mm.vmas() {
            for e in mm.pagemap(v.start(), v.range().npages()).unwrap() {
                entries.push(format!("{e:?}"));
                if let Some(nr) = e.pfn {
                    let mut b = vec![0u8; PAGE_SIZE as usize];
                    mm.phys().frame_nr(nr).read(0, &mut b);
                    b.hash(&mut bytes);
                }
            }
        }
        let s = mm.stats();
        Snapshot {
            vmas: format!("{:?}", mm.vmas()),
            entries,
            bytes: bytes.finish(),
            ram_in_use: self.r.phys.nr_in_use(),
            device_in_use: [0, 1].map(|i| self.r.driver.device(i).nr_in_use()),
            device_tables: [0, 1].map(|i| self.d[i].nr_mapped()),
            faults: s.faults.total(),
            migrate_setups: s.migrate.setups,
        }
    }

    /// Runs `f` and checks that nothing changed and no notifier fired.
    #[track_caller]
    fn unchanged(&self, f: impl FnOnce()) {
        self.rec.take();
        let before = self.snapshot();
        f();
        let changed = self.snapshot().diff(&before);
        assert!(changed.is_empty(), "a rejected call changed {changed:?}");
        assert!(
            self.rec.take().is_empty(),
            "a rejected call raised an invalidation"
        );
        self.r.mm.audit().unwrap();
    }

    fn cmd(
        &self,
        dev: usize,
        which: DmirrorCmd,
        addr: u64,
        npages: u64,
    ) -> Result<(), DmirrorError> {
        self.cmd_with_buffer(dev, which, addr, npages, self.r.buf.as_u64())
            .map(|_| ())
    }

    /// Runs a command with `ptr` as its user buffer; a failed command must leave its
    /// command block as it was. Returns the block the command filled in.
    fn cmd_with_buffer(
        &self,
        dev: usize,
        which: DmirrorCmd,
        addr: u64,
        npages: u64,
        ptr: u64,
    ) -> Result<HmmDmirrorCmd, DmirrorError> {
        let mut c = HmmDmirrorCmd {
            addr,
            ptr,
            npages,
            ..HmmDmirrorCmd::default()
        };
        let before = c;
        let r = self.d[dev].ioctl(which, &mut c);
        if r.is_err() {
            assert_eq!(c, before, "a failed {which:?} wrote to its command block");
        }
        r.map(|()| c)
    }

    fn range<'a>(&'a self, start: VirtAddr, end: VirtAddr, pfns: &'a mut [HmmPfn]) -> HmmRange<'a> {
        HmmRange {
            notifier: &self.sub,
            notifier_seq: self.sub.read_begin(),
            start,
            end,
            hmm_pfns: pfns,
            default_flags: HmmPfnFlags::REQ_FAULT,
            pfn_flags_mask: HmmPfnFlags::empty(),
            dev_private_owner: None,
        }
    }
}

#[track_caller]
fn errno<T: std::fmt::Debug>(r: Result<T, MmError>) -> i32 {
    r.unwrap_err().errno()
}

#[test]
fn mapping_calls() {
    let w = world();
    let mm = &w.r.mm;
    let a = w.a;
    let odd = a.checked_add(1).unwrap();
    w.unchanged(|| {
        // mmap: zero, no type, both types, unaligned fixed, fixed without an address,
        // too long, past the top, below the floor, over a mapping with NOREPLACE.
        assert_eq!(errno(mm.mmap(None, 0, RW, MapFlags::PRIVATE)), libc::EINVAL);
        assert_eq!(
            errno(mm.mmap(None, PAGE_SIZE, RW, MapFlags::empty())),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mmap(None, PAGE_SIZE, RW, MapFlags::PRIVATE | MapFlags::SHARED)),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mmap(
                Some(odd),
                PAGE_SIZE,
                RW,
                MapFlags::PRIVATE | MapFlags::FIXED
            )),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mmap(None, PAGE_SIZE, RW, MapFlags::PRIVATE | MapFlags::FIXED)),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mmap(None, u64::MAX, RW, MapFlags::PRIVATE)),
            libc::ENOMEM
        );
        assert_eq!(
            errno(mm.mmap(None, TASK_SIZE + PAGE_SIZE, RW, MapFlags::PRIVATE)),
            libc::ENOMEM
        );
        assert_eq!(
            errno(mm.mmap(
                Some(VirtAddr::new(TASK_SIZE)),
                PAGE_SIZE,
                RW,
                MapFlags::PRIVATE | MapFlags::FIXED
            )),
            libc::ENOMEM
        );
        assert_eq!(
            errno(mm.mmap(
                Some(VirtAddr::new(MMAP_MIN_ADDR - PAGE_SIZE)),
                PAGE_SIZE,
                RW,
                MapFlags::PRIVATE | MapFlags::FIXED
            )),
            libc::EPERM
        );
        assert_eq!(
            mm.mmap(
                Some(a),
                PAGE_SIZE,
                RW,
                MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE
            ),
            Err(MmError::Exists { addr: a })
        );
        // mmap_file: an unaligned offset, an offset past the largest file.
        let file = MemFile::new(mm.phys());
        assert_eq!(
            errno(mm.mmap_file(None, PAGE_SIZE, RW, MapFlags::SHARED, &file, 1)),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mmap_file(
                None,
                PAGE_SIZE,
                RW,
                MapFlags::SHARED,
                &file,
                u64::MAX - PAGE_SIZE + 1
            )),
            libc::EINVAL
        );
        // The file itself: writes and sizes past the largest file.
        assert_eq!(errno(file.pwrite(u64::MAX, &[1])), libc::EINVAL);
        assert_eq!(errno(file.truncate(u64::MAX)), libc::EINVAL);
        // munmap: unaligned, zero, overflowing, past the top.
        for (addr, len) in [
            (odd, PAGE_SIZE),
            (a, 0),
            (a, u64::MAX),
            (VirtAddr::new(TASK_SIZE), 2 * PAGE_SIZE),
            (VirtAddr::new(USER_VA_END), PAGE_SIZE),
        ] {
            assert_eq!(
                errno(mm.munmap(addr, len)),
                libc::EINVAL,
                "munmap {addr} {len}"
            );
        }
        // mprotect: unaligned, overflowing, running into a hole, no VMA at all; zero is a
        // no-op.
        assert_eq!(errno(mm.mprotect(odd, PAGE_SIZE, Prot::READ)), libc::EINVAL);
        assert_eq!(
            errno(mm.mprotect(a, u64::MAX - 100, Prot::READ)),
            libc::ENOMEM
        );
        assert_eq!(
            errno(mm.mprotect(a, 9 * PAGE_SIZE, Prot::READ)),
            libc::ENOMEM
        );
        assert_eq!(
            errno(mm.mprotect(VirtAddr::new(0x10000), PAGE_SIZE, Prot::READ)),
            libc::ENOMEM
        );
        mm.mprotect(a, 0, Prot::NONE).unwrap();
        // madvise: the same, for each kind of advice.
        for advice in [
            Advice::DontNeed,
            Advice::Free,
            Advice::DontFork,
            Advice::HugePage,
        ] {
            assert_eq!(errno(mm.madvise(odd, PAGE_SIZE, advice)), libc::EINVAL);
            assert_eq!(errno(mm.madvise(a, u64::MAX, advice)), libc::EINVAL);
            assert_eq!(errno(mm.madvise(a, 9 * PAGE_SIZE, advice)), libc::ENOMEM);
            mm.madvise(a, 0, advice).unwrap();
        }
        // mremap: unaligned, zero new length, overflowing, not mapped, FIXED without
        // MAYMOVE, a target overlapping the source.
        let mv = MremapFlags::MAYMOVE;
        assert_eq!(
            errno(mm.mremap(odd, PAGE_SIZE, PAGE_SIZE, mv, None)),
            libc::EINVAL
        );
        assert_eq!(errno(mm.mremap(a, PAGE_SIZE, 0, mv, None)), libc::EINVAL);
        assert_eq!(
            errno(mm.mremap(a, u64::MAX, PAGE_SIZE, mv, None)),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mremap(a, PAGE_SIZE, u64::MAX, mv, None)),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mremap(VirtAddr::new(0x10000), PAGE_SIZE, PAGE_SIZE, mv, None)),
            libc::EFAULT
        );
        assert_eq!(
            errno(mm.mremap(
                a,
                PAGE_SIZE,
                PAGE_SIZE,
                MremapFlags::FIXED,
                Some(page(a, 20))
            )),
            libc::EINVAL
        );
        assert_eq!(
            errno(mm.mremap(
                a,
                2 * PAGE_SIZE,
                2 * PAGE_SIZE,
                mv | MremapFlags::FIXED,
                Some(page(a, 1))
            )),
            libc::EINVAL
        );
    });
}

#[test]
fn cpu_accesses_and_faults() {
    let w = world();
    let mm = &w.r.mm;
    let mut buf = [0u8; 16];
    w.unchanged(|| {
        let hole = VirtAddr::new(0x10000);
        assert!(matches!(
            mm.read(hole, &mut buf),
            Err(FaultError::Segv {
                cause: SegvCause::MapErr,
                ..
            })
        ));
        assert!(matches!(
            mm.write(hole, &buf),
            Err(FaultError::Segv {
                cause: SegvCause::MapErr,
                ..
            })
        ));
        // The read-only VMA refuses a store.
        assert!(matches!(
            mm.write(w.ro, &buf),
            Err(FaultError::Segv {
                cause: SegvCause::AccErr,
                ..
            })
        ));
        // A store that starts in a VMA and runs past it into a hole writes nothing, and
        // leaves the device page it starts on where it is.
        let tail = page(w.a, 8).checked_sub(4).unwrap();
        assert_eq!(
            mm.write(tail, &[0xff; 8]),
            Err(FaultError::Segv {
                addr: page(w.a, 8),
                cause: SegvCause::MapErr
            })
        );
        // An access that wraps the address space.
        let top = VirtAddr::new(USER_VA_END - 8);
        assert!(mm.read(top, &mut buf).is_err());
        // Zero bytes: nothing to do anywhere.
        mm.read(hole, &mut []).unwrap();
        mm.write(hole, &[]).unwrap();
        // The fault handler itself.
        assert!(matches!(
            mm.mmap_read().handle_mm_fault(hole, FaultFlags::WRITE),
            Err(FaultError::Segv {
                cause: SegvCause::MapErr,
                ..
            })
        ));
        assert!(matches!(
            mm.mmap_read().handle_mm_fault(w.ro, FaultFlags::WRITE),
            Err(FaultError::Segv {
                cause: SegvCause::AccErr,
                ..
            })
        ));
        // pagemap: unaligned, overflowing; unmapped pages are reported, not refused.
        assert_eq!(
            errno(mm.pagemap(w.a.checked_add(1).unwrap(), 1)),
            libc::EINVAL
        );
        assert_eq!(errno(mm.pagemap(w.a, u64::MAX)), libc::EINVAL);
        assert!(mm
            .pagemap(hole, 2)
            .unwrap()
            .iter()
            .all(|e| !e.present && e.pfn.is_none()));
    });
}

#[test]
fn gup_and_driver_pages() {
    let w = world();
    let mm = &w.r.mm;
    let odd = w.a.checked_add(1).unwrap();
    w.unchanged(|| {
        type Gup = fn(&Mm, VirtAddr, u64, GupFlags) -> Result<UserPages, MmError>;
        let gups: [(Gup, GupFlags); 2] = [
            (Mm::get_user_pages, GupFlags::empty()),
            (Mm::pin_user_pages, GupFlags::PIN),
        ];
        for (gup, pin) in gups {
            assert_eq!(errno(gup(mm, odd, 1, pin).map(|_| ())), libc::EINVAL);
            assert_eq!(errno(gup(mm, w.a, 0, pin).map(|_| ())), libc::EINVAL);
            assert_eq!(errno(gup(mm, w.a, u64::MAX, pin).map(|_| ())), libc::EINVAL);
            assert_eq!(
                errno(gup(mm, VirtAddr::new(0x10000), 1, pin).map(|_| ())),
                libc::EFAULT
            );
            // From a hole into a VMA: nothing is taken from the VMA either.
            let below = w.ro.checked_sub(PAGE_SIZE).unwrap();
            assert_eq!(errno(gup(mm, below, 2, pin).map(|_| ())), libc::EFAULT);
            // A write to read-only memory.
            assert_eq!(
                errno(gup(mm, w.ro, 1, pin | GupFlags::WRITE).map(|_| ())),
                libc::EFAULT
            );
        }
        // LONGTERM needs PIN.
        assert_eq!(
            errno(mm.get_user_pages(w.a, 1, GupFlags::LONGTERM).map(|_| ())),
            libc::EINVAL
        );
        // vm_insert_page: unaligned, no VMA, a VMA that is not a driver's.
        let zero = mm.phys().zero_pfn();
        assert_eq!(errno(mm.vm_insert_page(odd, zero)), libc::EINVAL);
        assert_eq!(
            errno(mm.vm_insert_page(VirtAddr::new(0x10000), zero)),
            libc::EINVAL
        );
        assert_eq!(errno(mm.vm_insert_page(page(w.a, 4), zero)), libc::EINVAL);
    });
}

#[test]
fn notifiers_and_exited_processes() {
    let w = world();
    let mm = &w.r.mm;
    w.unchanged(|| {
        let overflow =
            |r: Result<_, NotifierError>| matches!(r, Err(NotifierError::Overflow { .. }));
        assert!(overflow(mm.interval_notifier_insert(
            w.a,
            0,
            Arc::new(Quiet)
        )));
        assert!(overflow(mm.interval_notifier_insert(
            VirtAddr::new(USER_VA_END - PAGE_SIZE),
            2 * PAGE_SIZE,
            Arc::new(Quiet)
        )));
        assert!(overflow(mm.interval_notifier_insert(
            w.a,
            u64::MAX,
            Arc::new(Quiet)
        )));
    });
    // An exited process: its notifier list refuses new subscriptions, and a mirror of it
    // refuses every command.
    let child = mm.fork().unwrap();
    let notifiers = Arc::clone(child.notifiers());
    let mirror = Dmirror::open(w.r.driver.device(1), &child).unwrap();
    drop(child);
    w.unchanged(|| {
        assert!(matches!(
            notifiers.register(Arc::new(Recorder::new())),
            Err(NotifierError::Released)
        ));
        assert!(matches!(
            notifiers.interval_insert(w.a, PAGE_SIZE, Arc::new(Quiet)),
            Err(NotifierError::Released)
        ));
        for which in DmirrorCmd::ALL {
            let mut c = HmmDmirrorCmd {
                addr: w.a.as_u64(),
                ptr: w.r.buf.as_u64(),
                npages: 1,
                ..HmmDmirrorCmd::default()
            };
            let r = mirror.ioctl(which, &mut c);
            match which {
                // None of these needs the process (CHECK_EXCLUSIVE reads only the
                // device's table, as dmirror_check_atomic does).
                DmirrorCmd::Flags | DmirrorCmd::Release | DmirrorCmd::CheckExclusive => {}
                _ => assert!(
                    matches!(r, Err(DmirrorError::Inval { .. })),
                    "{which:?} after exit: {r:?}"
                ),
            }
        }
    });
}

#[test]
fn range_faults() {
    let w = world();
    let a = w.a;
    let mut pfns = [HmmPfn::default(); 8];
    let inval = |r: Result<(), HmmError>| matches!(r, Err(HmmError::Inval { .. }));
    w.unchanged(|| {
        let mmap = w.r.mm.mmap_read();
        assert!(inval(hmm_range_fault(
            &mmap,
            &mut w.range(a.checked_add(1).unwrap(), page(a, 1), &mut pfns[..1])
        )));
        assert!(inval(hmm_range_fault(
            &mmap,
            &mut w.range(a, a, &mut pfns[..0])
        )));
        assert!(inval(hmm_range_fault(
            &mmap,
            &mut w.range(page(a, 2), a, &mut pfns[..2])
        )));
        assert!(inval(hmm_range_fault(
            &mmap,
            &mut w.range(a, page(a, 2), &mut pfns[..1])
        )));
        // Another process's notifier.
        let other = Mm::new(w.r.phys.clone());
        let foreign = other
            .interval_notifier_insert(a, PAGE_SIZE, Arc::new(Quiet))
            .unwrap();
        let mut r = w.range(a, page(a, 1), &mut pfns[..1]);
        r.notifier = &foreign;
        r.notifier_seq = foreign.read_begin();
        assert!(inval(hmm_range_fault(&mmap, &mut r)));
        // Outside any VMA, asked to be faulted: EFAULT.
        let mut r = w.range(page(a, 8), page(a, 10), &mut pfns[..2]);
        r.default_flags = HmmPfnFlags::REQ_FAULT;
        assert!(matches!(
            hmm_range_fault(&mmap, &mut r),
            Err(HmmError::Fault { .. })
        ));
        // Migrate-on-fault walks: the same, plus a range that leaves its VMA.
        let migrate = |start: VirtAddr, end: VirtAddr, n: usize, flags: MigrateVmaFlags| {
            let mut pfns = vec![HmmPfn::default(); n];
            let mut r = w.range(start, end, &mut pfns);
            r.default_flags = HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_MIGRATE;
            r.dev_private_owner = Some(w.owner);
            hmm_range_fault_migrate(&mmap, &mut r, flags).map(|c| c.cpages())
        };
        let sel = MigrateVmaFlags::SELECT_SYSTEM;
        assert!(matches!(
            migrate(a.checked_add(1).unwrap(), page(a, 1), 1, sel),
            Err(HmmError::Inval { .. })
        ));
        assert!(matches!(migrate(a, a, 0, sel), Err(HmmError::Inval { .. })));
        assert!(matches!(
            migrate(a, page(a, 2), 2, sel | MigrateVmaFlags::FAULT),
            Err(HmmError::Inval { .. })
        ));
        assert_eq!(
            migrate(page(a, 7), page(a, 9), 2, sel),
            Err(HmmError::Range { addr: page(a, 8) })
        );
    });
}

#[test]
fn migrations_and_exclusive_access() {
    let w = world();
    let a = w.a;
    let args = |start: VirtAddr, end: VirtAddr| MigrateVma {
        start,
        end,
        pgmap_owner: Some(w.owner),
        flags: MigrateVmaFlags::SELECT_SYSTEM,
        fault_page: None,
    };
    let inval = |r: Result<u64, MigrateError>| matches!(r, Err(MigrateError::Inval { .. }));
    w.unchanged(|| {
        let mmap = w.r.mm.mmap_read();
        let setup = |m: MigrateVma| migrate_vma_setup(&mmap, m).map(|m| m.cpages());
        assert!(inval(setup(args(a.checked_add(1).unwrap(), page(a, 1)))));
        assert!(inval(setup(args(a, a))));
        assert!(inval(setup(args(page(a, 2), a))));
        assert!(inval(setup(args(w.ro, page(a, 1)))), "two VMAs");
        assert!(
            inval(setup(args(VirtAddr::new(0x10000), VirtAddr::new(0x11000)))),
            "no VMA"
        );
        assert!(inval(setup(args(
            VirtAddr::new(USER_VA_END - PAGE_SIZE),
            VirtAddr::new(USER_VA_END)
        ))));
        // A fault page that is not locked, and one that is not in the range's owner's
        // memory (device 1's page, device 0's owner).
        let f = w.r.driver.device(0).alloc(0).unwrap();
        let mut m = args(page(a, 6), page(a, 7));
        m.flags = MigrateVmaFlags::SELECT_DEVICE_PRIVATE;
        m.fault_page = Some(f.device_pfn());
        let f = f.unlock();
        assert!(inval(setup(m)), "unlocked fault page");
        drop(f);
        // make_device_exclusive: unaligned is rounded by the kernel's callers, not here.
        assert!(matches!(
            make_device_exclusive(&mmap, VirtAddr::new(0x10000), Some(w.owner)),
            Err(ExclusiveError::Fault { .. })
        ));
        assert!(matches!(
            make_device_exclusive(&mmap, w.ro, Some(w.owner)),
            Err(ExclusiveError::Fault { .. })
        ));
    });
    // VMA-less eviction: a range that is not device memory, or runs past its pagemap, is
    // refused before any array is allocated; pfns that are not in-use device memory
    // collect nothing.
    let phys = &w.r.phys;
    let dev_page = w.r.driver.device(0).alloc(0).unwrap().unlock();
    let pgmap = phys.pagemap_of(dev_page.device_pfn().as_u64()).unwrap();
    w.unchanged(|| {
        let ram = phys.frame(phys.zero_pfn());
        assert!(matches!(
            migrate_device_range(phys, ram, 4),
            Err(MigrateError::Inval { .. })
        ));
        for (start, n) in [
            (0, u64::MAX),
            (0, 1 << 40),
            (0, pgmap.nr_frames() + 1),
            (pgmap.nr_frames() - 1, 2),
        ] {
            assert!(
                matches!(
                    migrate_device_range(phys, pgmap.frame(start), n),
                    Err(MigrateError::Inval { .. })
                ),
                "{start} + {n}"
            );
        }
        let m = migrate_device_pfns(phys, &[DevicePfn::new(12345), DevicePfn::new(1)]);
        assert!(m.src().iter().all(|s| !s.is_migrating()));
        drop(m);
        let m = migrate_device_pfns(phys, &[]);
        assert!(m.src().is_empty());
    });
    drop(dev_page);
}

#[test]
fn machines_pagemaps_and_fault_injection() {
    for size in [
        0,
        1 << 20,
        (4 << 20) + 4096,
        MAX_RAM_BYTES + PMD_SIZE,
        u64::MAX - (PMD_SIZE - 1),
    ] {
        let e = PhysMem::new(PhysConfig::with_size(size)).unwrap_err();
        assert!(matches!(e, PhysError::Inval { .. }), "{size}");
        // The message names every limit, the one hit included.
        let msg = e.to_string();
        assert!(
            msg.contains("2 MiB") && msg.contains("4 MiB") && msg.contains("4096 GiB"),
            "{msg}"
        );
    }
    let w = world();
    w.unchanged(|| {
        for size in [
            0,
            PAGE_SIZE,
            PMD_SIZE + PAGE_SIZE,
            MAX_SECTION_BYTES + PMD_SIZE,
            u64::MAX,
        ] {
            let config = PagemapConfig {
                kind: MemoryType::DevicePrivate,
                owner: Owner::new_unique(),
                size_bytes: size,
            };
            assert!(
                matches!(
                    memremap_pages(&w.r.phys, config, Arc::new(Quiet)),
                    Err(PagemapError::Inval { .. })
                ),
                "{size}"
            );
        }
        let attr = FaultAttr::new();
        assert_eq!(
            attr.set(FaultConfig::random(101, 0)),
            Err(FaultConfigError::Probability(101))
        );
        assert_eq!(
            attr.set(FaultConfig {
                interval: 0,
                ..FaultConfig::ALWAYS
            }),
            Err(FaultConfigError::Interval)
        );
        assert!(!attr.is_enabled());
    });
}

#[test]
fn dmirror_commands() {
    let w = world();
    let a = w.a.as_u64();
    let p = PAGE_SIZE;
    let none =
        w.r.mm
            .mmap(None, 2 * p, Prot::NONE, MapFlags::PRIVATE)
            .unwrap()
            .as_u64();
    w.unchanged(|| {
        for which in DmirrorCmd::ALL {
            if matches!(which, DmirrorCmd::Flags | DmirrorCmd::Release) {
                continue;
            }
            let inval = |r: Result<(), DmirrorError>| matches!(r, Err(DmirrorError::Inval { .. }));
            assert!(inval(w.cmd(1, which, a + 1, 1)), "{which:?} unaligned");
            assert!(inval(w.cmd(1, which, a, 0)), "{which:?} zero pages");
            assert!(
                inval(w.cmd(1, which, a, u64::MAX / p)),
                "{which:?} overflow"
            );
            assert!(
                inval(w.cmd(1, which, USER_VA_END - p, 2)),
                "{which:?} past the top"
            );
            assert!(
                inval(w.cmd(1, which, u64::MAX - p + 1, 1)),
                "{which:?} not an address"
            );
            assert!(w.d[1]
                .ioctl_raw(which.ioctl() ^ 0x40, &mut HmmDmirrorCmd::default())
                .is_err());
        }
        // Outside any VMA: the commands that fault say EFAULT, the migrations EINVAL (the
        // kernel's vma_lookup), the snapshot reports no page.
        let hole = 0x10000;
        assert_eq!(
            w.cmd(1, DmirrorCmd::Read, hole, 1),
            Err(DmirrorError::Fault)
        );
        assert_eq!(
            w.cmd(1, DmirrorCmd::Write, hole, 1),
            Err(DmirrorError::Fault)
        );
        for which in [
            DmirrorCmd::MigrateToDev,
            DmirrorCmd::MigrateOnFaultToDev,
            DmirrorCmd::MigrateToSys,
        ] {
            assert!(
                matches!(w.cmd(1, which, hole, 1), Err(DmirrorError::Inval { .. })),
                "{which:?}"
            );
        }
        // A VMA the process may not read: every migration refuses it.
        for which in [DmirrorCmd::MigrateToDev, DmirrorCmd::MigrateOnFaultToDev] {
            assert!(
                matches!(w.cmd(1, which, none, 2), Err(DmirrorError::Inval { .. })),
                "{which:?}"
            );
        }
        // A WRITE from a user buffer outside any VMA: EFAULT before the device
        // touches anything.
        assert_eq!(
            w.cmd_with_buffer(1, DmirrorCmd::Write, a, 1, 0x10000),
            Err(DmirrorError::Fault)
        );
    });
    // A READ into a user buffer outside any VMA is EFAULT too, but only once the device
    // has read (and mirrored) the page, as dmirror_read's copy_to_user comes last.
    assert_eq!(
        w.cmd_with_buffer(1, DmirrorCmd::Read, a, 1, 0x10000),
        Err(DmirrorError::Fault)
    );
    // Another device's pages: device 1's MIGRATE_TO_SYS selects only its own pages, so
    // device 0's stay where they are (its MIGRATE event, which is not device 0's own,
    // still clears device 0's table, as the collect walk always announces the range).
    let before = w.r.mm.pagemap(page(w.a, 6), 2).unwrap();
    let c = w
        .cmd_with_buffer(
            1,
            DmirrorCmd::MigrateToSys,
            page(w.a, 6).as_u64(),
            2,
            w.r.buf.as_u64(),
        )
        .unwrap();
    assert_eq!(c.cpages, 0, "device 1 moved device 0's pages");
    assert_eq!(w.r.mm.pagemap(page(w.a, 6), 2).unwrap(), before);
    assert_eq!(w.r.driver.device(0).nr_in_use(), 2);
}
