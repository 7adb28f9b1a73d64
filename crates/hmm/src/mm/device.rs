//! CPU faults on device-private entries: the device-private branch of `do_swap_page`,
//! which hands the page to its owner's [`migrate_to_ram`](crate::zone_device::DevPagemapOps::migrate_to_ram).
//!
//! # Protocol
//!
//! Under the page-table lock the entry is read and the device folio's lock is tried. If it
//! is held (a migration of the page is under way), the fault takes a reference, drops the
//! page-table lock, sleeps until the folio is unlocked and returns, so the access retries
//! and finds whatever the migration left. (The kernel returns at once and lets the access
//! fault again; sleeping on the folio lock is the same outcome without spinning.)
//! Otherwise it takes a reference, drops the page-table lock and calls the owner's
//! `migrate_to_ram` with the folio locked and the mmap lock still held for reading; then it
//! unlocks the folio and drops the reference. `Ok` retries the access; the driver's
//! `Sigbus`/`Oom` become the access's error.

use crate::addr::{DevicePfn, VirtAddr, PAGE_SIZE, PMD_SIZE};
use crate::migrate::{MigrateVma, MigrateVmaFlags};
use crate::notifier::Owner;
use crate::pgtable::{Cursor, Huge};
use crate::stats::FaultKind;

use super::driver::VmFault;
use super::error::FaultError;
use super::fault::FaultFlags;
use super::vma::Vma;
use super::{Mm, MmState, MmapReadGuard};

/// The fault a driver's `migrate_to_ram` is asked to resolve (the kernel's `struct
/// vm_fault` as that callback sees it).
#[doc(alias = "vm_fault")]
pub struct DeviceFault<'a> {
    mmap: MmapReadGuard<'a>,
    vma: &'a Vma,
    address: VirtAddr,
    page: DevicePfn,
    level: Huge,
    flags: FaultFlags,
}

impl<'a> DeviceFault<'a> {
    /// The mmap lock the faulting access holds, for the driver's `migrate_vma_*` calls.
    pub fn mmap(&self) -> &MmapReadGuard<'a> {
        &self.mmap
    }

    /// The VMA of the faulting address.
    pub fn vma(&self) -> &'a Vma {
        self.vma
    }

    /// The faulting address.
    pub fn address(&self) -> VirtAddr {
        self.address
    }

    /// The device-private page the entry refers to (`vmf->page`): locked by the fault
    /// path, and referenced for the duration of the call.
    pub fn page(&self) -> DevicePfn {
        self.page
    }

    /// Whether the entry is a PTE, or a PMD mapping a whole device THP (the kernel calls
    /// `migrate_to_ram` with `vmf->pte == NULL` then, and the driver migrates the 2 MiB).
    pub fn level(&self) -> Huge {
        self.level
    }

    /// Why the access faulted.
    pub fn flags(&self) -> FaultFlags {
        self.flags
    }

    /// The [`migrate_vma_setup`](crate::migrate::migrate_vma_setup) arguments a
    /// `migrate_to_ram` handler uses to send the faulting unit home: the faulting page, or
    /// for a PMD entry the whole 2 MiB device THP (`SELECT_COMPOUND`), selecting the
    /// device-private pages of `owner` (the device's pagemap owner), with
    /// [`page`](Self::page) as the fault page that the migration neither locks nor
    /// unlocks.
    pub fn migrate_args(&self, owner: Owner) -> MigrateVma {
        let (start, len, flags) = match self.level {
            Huge::Pte => (
                self.address.page_down(),
                PAGE_SIZE,
                MigrateVmaFlags::SELECT_DEVICE_PRIVATE,
            ),
            Huge::Pmd => (
                self.address.align_down(PMD_SIZE),
                PMD_SIZE,
                MigrateVmaFlags::SELECT_DEVICE_PRIVATE | MigrateVmaFlags::SELECT_COMPOUND,
            ),
            Huge::Pud => unreachable!("device-private memory is never mapped by a PUD"),
        };
        MigrateVma {
            start,
            end: start
                .checked_add(len)
                .expect("a mapped unit lies inside the address space"),
            pgmap_owner: Some(owner),
            flags,
            fault_page: Some(self.page),
        }
    }
}

impl std::fmt::Debug for DeviceFault<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceFault")
            .field("address", &self.address)
            .field("page", &self.page)
            .field("level", &self.level)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// Handles a fault on the device-private entry for `page` that the cursor `c` yielded
/// (at PTE or PMD `level`, still locked).
#[allow(clippy::too_many_arguments)]
pub(super) fn do_device_private_fault(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    address: VirtAddr,
    flags: FaultFlags,
    c: &mut Cursor<'_>,
    page: DevicePfn,
    level: Huge,
) -> Result<(), FaultError> {
    let phys = mm.phys();
    let pgmap = phys
        .pagemap_of(page.as_u64())
        .filter(|p| p.is_private())
        .expect("a device-private entry names a device-private frame");
    let frame = pgmap.device_frame(page);
    // The entry holds a reference, and the page-table lock keeps the entry: get() is safe.
    let held = frame.get();
    let folio = held.folio();
    if level == Huge::Pte && folio.meta().order() > 0 && !folio.meta().is_locked() {
        // A page of a device THP mapped by PTEs (after a partial munmap, mprotect or
        // mremap): split the folio first, so that `migrate_to_ram` always gets an order-0
        // page for a PTE fault, then let the access fault again. (The kernel splits it
        // inside the driver's `migrate_vma_setup`, moving the fault path's page lock to
        // the new folio; splitting here, with no page locked, needs no such hand-over.)
        c.unlock();
        super::thp::split_folio(mm, st, held);
        return Ok(());
    }
    if !folio.meta().trylock() {
        c.unlock();
        folio.meta().wait_unlocked();
        drop(held);
        return Ok(());
    }
    c.unlock();
    mm.counters.fault(FaultKind::DevicePrivate);
    let vmf = DeviceFault {
        mmap: MmapReadGuard::held(mm, st),
        vma,
        address,
        page,
        level,
        flags,
    };
    let result = pgmap.ops().migrate_to_ram(&vmf);
    folio.meta().unlock();
    drop(held);
    result.map_err(|e| match e {
        VmFault::Sigbus => FaultError::Bus { addr: address },
        VmFault::Oom => FaultError::Oom { addr: address },
    })
}

#[cfg(test)]
mod tests {
    //! The dispatch, tested with device-private entries installed by hand (migration, which
    //! creates them for real, is built on top of this).

    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    use crate::sync::Mutex;

    use super::*;
    use crate::addr::{VaRange, PAGE_SIZE};
    use crate::mm::{MapFlags, Prot};
    use crate::notifier::Owner;
    use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
    use crate::phys::{FrameFlags, FrameRef, PhysConfig, PhysMem};
    use crate::zone_device::{
        memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig,
    };

    /// What the test driver does when a CPU faults on one of its pages.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(super) enum Mode {
        Sigbus,
        /// Copy the page back into a new system page and map it (the one mapping).
        CopyBack,
    }

    /// What a `migrate_to_ram` call saw: address, page, level, flags, page locked.
    pub(super) type Call = (VirtAddr, DevicePfn, Huge, FaultFlags, bool);

    pub(super) struct TestOps {
        mode: Mutex<Mode>,
        pub(super) calls: Mutex<Vec<Call>>,
        freed: AtomicU64,
    }

    impl DevPagemapOps for TestOps {
        fn folio_free(&self, _folio: FrameRef<'_>, order: u32) {
            self.freed.fetch_add(1 << order, Ordering::Relaxed);
        }

        fn migrate_to_ram(&self, vmf: &DeviceFault<'_>) -> Result<(), VmFault> {
            let mm = vmf.mmap().mm();
            let dev = mm.phys().device_frame(vmf.page());
            self.calls.lock().push((
                vmf.address(),
                vmf.page(),
                vmf.level(),
                vmf.flags(),
                dev.meta().is_locked(),
            ));
            if *self.mode.lock() == Mode::Sigbus {
                return Err(VmFault::Sigbus);
            }
            let sys = mm
                .phys()
                .alloc(0, FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE)
                .map_err(|_| VmFault::Oom)?;
            sys.copy_from(&dev);
            mm.new_anon_rmap(&sys, vmf.vma(), vmf.address());
            let st = vmf.mmap().state();
            let mut c = st
                .pt
                .cursor(VaRange::page_of(vmf.address()), WalkMode::Lookup);
            let Some(Slot::Pte(p)) = c.next() else {
                panic!("no PTE")
            };
            let Pte::DevicePrivate { pfn, flags } = p.get() else {
                panic!("entry changed")
            };
            sys.meta().inc_mapcount();
            p.set(Pte::Present {
                pfn: sys.into_raw(),
                flags: PteFlags::YOUNG | (flags & PteFlags::WRITE),
            });
            drop(c);
            dev.meta().dec_mapcount();
            let _ = mm.phys().device_frame(pfn).put();
            Ok(())
        }
    }

    pub(super) struct Rig {
        pub(super) mm: Arc<Mm>,
        pub(super) ops: Arc<TestOps>,
        pub(super) pgmap: Arc<DevPagemap>,
        pub(super) buf: VirtAddr,
    }

    pub(super) fn rig(mode: Mode) -> Rig {
        let phys = PhysMem::new(PhysConfig::with_size(8 << 20)).unwrap();
        let ops = Arc::new(TestOps {
            mode: Mutex::new(mode),
            calls: Mutex::default(),
            freed: AtomicU64::new(0),
        });
        let pgmap = memremap_pages(
            &phys,
            PagemapConfig {
                kind: MemoryType::DevicePrivate,
                owner: Owner::new_unique(),
                size_bytes: 2 << 20,
            },
            ops.clone(),
        )
        .unwrap();
        let mm = Mm::new(phys);
        let buf = mm
            .mmap(
                None,
                4 * PAGE_SIZE,
                Prot::READ | Prot::WRITE,
                MapFlags::PRIVATE,
            )
            .unwrap();
        Rig {
            mm,
            ops,
            pgmap,
            buf,
        }
    }

    /// Moves the page at `addr` (written first) into a fresh device page by hand: what a
    /// migration to the device leaves behind.
    pub(super) fn to_device(r: &Rig, addr: VirtAddr, fill: u8) -> DevicePfn {
        r.mm.write(addr, &[fill; PAGE_SIZE as usize]).unwrap();
        let dev = r
            .pgmap
            .alloc(0, FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE)
            .unwrap();
        let guard = r.mm.mmap_read();
        let st = guard.state();
        let vma = st.vmas.find(addr).unwrap();
        r.mm.new_anon_rmap(&dev, vma, addr);
        let mut c = st.pt.cursor(VaRange::page_of(addr), WalkMode::Lookup);
        let Some(Slot::Pte(p)) = c.next() else {
            panic!("no PTE")
        };
        let Pte::Present { pfn, .. } = p.get() else {
            panic!("not present")
        };
        let sys = r.mm.phys().frame(pfn);
        dev.copy_from(&sys);
        dev.meta().inc_mapcount();
        let dpfn = dev.unlock().into_raw_device();
        p.set(Pte::DevicePrivate {
            pfn: dpfn,
            flags: PteFlags::WRITE,
        });
        drop(c);
        sys.meta().dec_mapcount();
        let _ = sys.put();
        dpfn
    }

    #[test]
    fn cpu_access_calls_the_owners_migrate_to_ram() {
        let r = rig(Mode::CopyBack);
        let addr = r.buf.checked_add(PAGE_SIZE).unwrap();
        let dpfn = to_device(&r, addr, 0x5a);
        r.mm.audit().unwrap();
        let before = r.mm.stats();
        let at = addr.checked_add(10).unwrap();
        assert_eq!(r.mm.read_val::<u8>(at).unwrap(), 0x5a);
        let calls = r.ops.calls.lock().clone();
        assert_eq!(calls.len(), 1);
        let (a, page, level, flags, locked) = calls[0];
        assert_eq!((a, page, level), (at, dpfn, Huge::Pte));
        assert!(!flags.contains(FaultFlags::WRITE));
        assert!(locked, "the fault path locks the device page");
        let d = r.mm.stats().since(&before);
        assert_eq!(d.faults.device_private, 1);
        assert_eq!(r.ops.freed.load(Ordering::Relaxed), 1, "device page freed");
        assert!(!r.mm.phys().device_frame(dpfn).meta().is_locked());
        r.mm.audit().unwrap();
        // The entry is a normal writable page now: the write needs no fault.
        r.mm.write_val(at, 1u8).unwrap();
        assert_eq!(r.mm.stats().since(&before).faults.total(), 1);
    }

    #[test]
    fn a_refusing_driver_gives_sigbus_and_changes_nothing() {
        let r = rig(Mode::Sigbus);
        let dpfn = to_device(&r, r.buf, 1);
        let e = r.mm.write_val(r.buf, 2u8).unwrap_err();
        assert_eq!(e, FaultError::Bus { addr: r.buf });
        assert!(r.ops.calls.lock()[0].3.contains(FaultFlags::WRITE));
        assert_eq!(r.pgmap.nr_in_use(), 1);
        assert!(!r.mm.phys().device_frame(dpfn).meta().is_locked());
        assert_eq!(
            r.mm.pagemap(r.buf, 1).unwrap()[0].swap,
            Some(crate::mm::SwapKind::DevicePrivate)
        );
        r.mm.audit().unwrap();
    }

    #[test]
    fn munmap_frees_device_pages_without_a_flush() {
        let r = rig(Mode::Sigbus);
        to_device(&r, r.buf, 1);
        let before = r.mm.stats();
        r.mm.munmap(r.buf, PAGE_SIZE).unwrap();
        assert_eq!(r.ops.freed.load(Ordering::Relaxed), 1);
        assert_eq!(r.pgmap.nr_in_use(), 0);
        assert_eq!(r.mm.stats().since(&before).tlb_flush_ops, 0);
        assert!(r.ops.calls.lock().is_empty());
    }

    /// Puts a device THP behind a device-private PMD (writable) at a 2 MiB-aligned address
    /// of a fresh mapping, by hand, page `i` starting with byte `i`: what a compound
    /// migration to the device will leave behind.
    fn device_thp(r: &Rig) -> (VirtAddr, DevicePfn) {
        use crate::addr::PMD_ORDER;
        let base = aligned_2mib(r);
        let dev = r
            .pgmap
            .alloc(PMD_ORDER, FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE)
            .unwrap();
        for i in 0..crate::addr::PMD_NR {
            r.mm.phys().frame_nr(dev.nr() + i).write(0, &[i as u8]);
        }
        let guard = r.mm.mmap_read();
        let st = guard.state();
        r.mm.new_anon_rmap(&dev, st.vmas.find(base).unwrap(), base);
        dev.meta().inc_entire_mapcount();
        let dpfn = dev.unlock().into_raw_device();
        st.pt
            .lock_pmd(base, WalkMode::Populate)
            .unwrap()
            .set_leaf(Pte::DevicePrivate {
                pfn: dpfn,
                flags: PteFlags::WRITE,
            });
        (base, dpfn)
    }

    /// A 2 MiB-aligned address with 2 MiB of a fresh private mapping behind it.
    fn aligned_2mib(r: &Rig) -> VirtAddr {
        use crate::addr::PMD_SIZE;
        let area =
            r.mm.mmap(
                None,
                2 * PMD_SIZE,
                Prot::READ | Prot::WRITE,
                MapFlags::PRIVATE,
            )
            .unwrap();
        area.align_up(PMD_SIZE).unwrap()
    }

    /// The PMD slot at `base` of `mm`.
    fn pmd_at(mm: &Mm, base: VirtAddr) -> crate::pgtable::PmdEntry {
        let guard = mm.mmap_read();
        let pmd = guard.state().pt.lock_pmd(base, WalkMode::Lookup).unwrap();
        pmd.get()
    }

    #[test]
    fn a_partial_munmap_splits_a_device_thp_mapping_into_device_private_ptes() {
        use crate::pgtable::PmdEntry;
        let r = rig(Mode::CopyBack);
        let (base, dpfn) = device_thp(&r);
        r.mm.audit().unwrap();
        let head = r.mm.phys().device_frame(dpfn);
        let page = |i: u64| base.checked_add(i * PAGE_SIZE).unwrap();

        r.mm.munmap(page(1), PAGE_SIZE).unwrap();
        assert_eq!(pmd_at(&r.mm, base), PmdEntry::Table);
        let map = r.mm.pagemap(base, 3).unwrap();
        assert_eq!(map[0].swap, Some(crate::mm::SwapKind::DevicePrivate));
        assert_eq!(map[0].pfn, Some(dpfn.as_u64()));
        assert_eq!(map[1].swap, None);
        assert_eq!(map[2].pfn, Some(dpfn.as_u64() + 2));
        // 511 PTE mappings, each holding a reference on the folio, which stays whole.
        assert_eq!(head.meta().entire_mapcount(), 0);
        assert_eq!(head.meta().refcount(), 511);
        assert_eq!(head.meta().order(), crate::addr::PMD_ORDER);
        r.mm.audit().unwrap();
        assert_eq!(r.ops.freed.load(Ordering::Relaxed), 0);

        // A CPU access now splits the folio (the unmapped page 1 is freed), then faults
        // one page back (a PTE-level migrate_to_ram of an order-0 page).
        assert_eq!(r.mm.read_val::<u8>(page(2)).unwrap(), 2);
        assert_eq!(r.ops.calls.lock().len(), 1);
        assert_eq!(r.ops.calls.lock()[0].2, Huge::Pte);
        assert_eq!(head.meta().order(), 0);
        assert_eq!(head.meta().refcount(), 1);
        assert_eq!(r.ops.freed.load(Ordering::Relaxed), 2);
        assert_eq!(r.mm.read_val::<u8>(page(511)).unwrap(), 255);
        r.mm.audit().unwrap();

        r.mm.munmap(base, 2 << 20).unwrap();
        assert_eq!(r.ops.freed.load(Ordering::Relaxed), 512);
        assert_eq!(r.pgmap.nr_in_use(), 0);
    }

    #[test]
    fn mremap_moves_a_device_thp_whole_and_a_partial_mprotect_splits_it() {
        use crate::addr::PMD_SIZE;
        use crate::mm::MremapFlags;
        use crate::pgtable::PmdEntry;
        let r = rig(Mode::Sigbus);
        let (base, dpfn) = device_thp(&r);
        let to = aligned_2mib(&r);
        let moved =
            r.mm.mremap(
                base,
                PMD_SIZE,
                PMD_SIZE,
                MremapFlags::MAYMOVE | MremapFlags::FIXED,
                Some(to),
            )
            .unwrap();
        assert_eq!(moved, to);
        // Moved entries are soft-dirty (move_soft_dirty_pte).
        let writable = Pte::DevicePrivate {
            pfn: dpfn,
            flags: PteFlags::WRITE | PteFlags::SOFT_DIRTY,
        };
        assert_eq!(pmd_at(&r.mm, to), PmdEntry::Leaf(writable));
        r.mm.audit().unwrap();

        r.mm.mprotect(to, PAGE_SIZE, Prot::READ).unwrap();
        assert_eq!(pmd_at(&r.mm, to), PmdEntry::Table);
        let guard = r.mm.mmap_read();
        let mut c = guard.page_table().cursor(
            VaRange::from_len(to, 2 * PAGE_SIZE).unwrap(),
            WalkMode::Lookup,
        );
        let mut entries = Vec::new();
        while let Some(Slot::Pte(p)) = c.next() {
            let Pte::DevicePrivate { pfn, flags } = p.get() else {
                panic!("not device-private: {:?}", p.get())
            };
            entries.push(Pte::DevicePrivate {
                pfn,
                flags: flags - PteFlags::SOFT_DIRTY,
            });
        }
        drop(c);
        drop(guard);
        assert_eq!(
            entries,
            [
                Pte::DevicePrivate {
                    pfn: dpfn,
                    flags: PteFlags::empty()
                },
                Pte::DevicePrivate {
                    pfn: DevicePfn::new(dpfn.as_u64() + 1),
                    flags: PteFlags::WRITE
                },
            ]
        );
        r.mm.audit().unwrap();
        assert!(r.ops.calls.lock().is_empty(), "nothing faulted");
    }

    #[test]
    fn fork_shares_a_device_thp_read_only() {
        use crate::pgtable::PmdEntry;
        let r = rig(Mode::Sigbus);
        let (base, dpfn) = device_thp(&r);
        let child = r.mm.fork().unwrap();
        let read_only = PmdEntry::Leaf(Pte::DevicePrivate {
            pfn: dpfn,
            flags: PteFlags::empty(),
        });
        for mm in [&r.mm, &child] {
            assert_eq!(pmd_at(mm, base), read_only);
            mm.audit().unwrap();
        }
        let meta = r.mm.phys().device_frame(dpfn).meta();
        assert_eq!((meta.refcount(), meta.entire_mapcount()), (2, 2));
        assert!(!meta.flags().contains(FrameFlags::ANON_EXCLUSIVE));
        assert_eq!(crate::mm::device_folio_mappings(r.mm.phys(), dpfn).len(), 2);

        // The child splits its own mapping; the parent keeps the PMD.
        child.munmap(base, PAGE_SIZE).unwrap();
        assert_eq!(pmd_at(&child, base), PmdEntry::Table);
        assert_eq!(pmd_at(&r.mm, base), read_only);
        assert_eq!((meta.refcount(), meta.entire_mapcount()), (1 + 511, 1));
        child.audit().unwrap();
        r.mm.audit().unwrap();
        drop(child);
        assert_eq!((meta.refcount(), meta.entire_mapcount()), (1, 1));
        drop(r.mm);
        assert_eq!(
            r.ops.freed.load(Ordering::Relaxed),
            512,
            "exit frees the device THP"
        );
    }

    #[test]
    fn fork_shares_device_pages_read_only() {
        let r = rig(Mode::Sigbus);
        let dpfn = to_device(&r, r.buf, 3);
        let child = r.mm.fork().unwrap();
        for mm in [&r.mm, &child] {
            let e = mm.pagemap(r.buf, 1).unwrap()[0];
            assert_eq!(e.swap, Some(crate::mm::SwapKind::DevicePrivate));
            let guard = mm.mmap_read();
            let mut c = guard
                .page_table()
                .cursor(VaRange::page_of(r.buf), WalkMode::Lookup);
            let Some(Slot::Pte(p)) = c.next() else {
                panic!()
            };
            assert_eq!(
                p.get(),
                Pte::DevicePrivate {
                    pfn: dpfn,
                    flags: PteFlags::empty()
                }
            );
        }
        let meta = r.mm.phys().device_frame(dpfn).meta();
        assert_eq!((meta.refcount(), meta.mapcount()), (2, 2));
        assert!(!meta.flags().contains(FrameFlags::ANON_EXCLUSIVE));
        assert_eq!(crate::mm::device_folio_mappings(r.mm.phys(), dpfn).len(), 2);
        r.mm.audit().unwrap();
        child.audit().unwrap();
        drop(child);
        assert_eq!((meta.refcount(), meta.mapcount()), (1, 1));
        drop(r.mm);
        assert_eq!(
            r.ops.freed.load(Ordering::Relaxed),
            1,
            "exit frees the device page"
        );
    }

    #[test]
    fn a_locked_device_page_makes_the_access_wait() {
        let r = rig(Mode::CopyBack);
        let dpfn = to_device(&r, r.buf, 9);
        let meta = r.mm.phys().device_frame(dpfn).meta();
        assert!(meta.trylock(), "a migration holds the page");
        let waiting = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                waiting.store(1, Ordering::Release);
                r.mm.read_val::<u8>(r.buf).unwrap()
            });
            while waiting.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(
                r.ops.calls.lock().is_empty(),
                "no call while the page is locked"
            );
            meta.unlock();
            assert_eq!(t.join().unwrap(), 9);
        });
        assert_eq!(r.ops.calls.lock().len(), 1);
        r.mm.audit().unwrap();
    }
}

#[cfg(test)]
mod range_fault_tests {
    //! `hmm_range_fault` on device-private entries: the owner's pages are reported, other
    //! owners' pages are faulted back through their `migrate_to_ram`.

    use std::sync::Arc;

    use super::tests::{rig, to_device, Mode};
    use crate::addr::{VirtAddr, PAGE_SIZE};
    use crate::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange, Owner};
    use crate::range_fault::{hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange};

    struct SetSeq;

    impl IntervalNotifierOps for SetSeq {
        fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
            sub.set_seq(seq);
            true
        }
    }

    fn mirror(
        mm: &crate::mm::Mm,
        addr: VirtAddr,
        owner: Option<Owner>,
        flags: HmmPfnFlags,
    ) -> Result<HmmPfn, HmmError> {
        let n = mm
            .interval_notifier_insert(VirtAddr::new(0), 1 << 47, Arc::new(SetSeq))
            .unwrap();
        let mut pfns = [HmmPfn::default()];
        let mut range = HmmRange {
            notifier: &n,
            notifier_seq: n.read_begin(),
            start: addr,
            end: addr.checked_add(PAGE_SIZE).unwrap(),
            hmm_pfns: &mut pfns,
            default_flags: flags,
            pfn_flags_mask: HmmPfnFlags::empty(),
            dev_private_owner: owner,
        };
        hmm_range_fault(&mm.mmap_read(), &mut range)?;
        Ok(pfns[0])
    }

    #[test]
    fn the_owners_device_pages_are_reported_without_a_fault() {
        let r = rig(Mode::Sigbus);
        let dpfn = to_device(&r, r.buf, 4);
        let owner = Some(r.pgmap.owner());
        for flags in [
            HmmPfnFlags::empty(),
            HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE,
        ] {
            let p = mirror(&r.mm, r.buf, owner, flags).unwrap();
            assert_eq!(p.flags(), HmmPfnFlags::VALID | HmmPfnFlags::WRITE);
            assert_eq!(p.frame_nr(), dpfn.as_u64());
            let mut b = [0u8];
            p.frame(r.mm.phys()).unwrap().read(0, &mut b);
            assert_eq!(b, [4], "the word names the device page holding the data");
        }
        assert!(r.ops.calls.lock().is_empty());
        assert_eq!(r.mm.stats().faults.device_private, 0);
    }

    #[test]
    fn another_owners_device_pages_are_faulted_back() {
        let r = rig(Mode::CopyBack);
        let dpfn = to_device(&r, r.buf, 6);
        let stranger = Some(Owner::new_unique());
        assert_eq!(
            mirror(&r.mm, r.buf, stranger, HmmPfnFlags::empty()).unwrap(),
            HmmPfn::default(),
            "a snapshot sees a page it cannot use as not present"
        );
        assert_eq!(
            mirror(&r.mm, r.buf, None, HmmPfnFlags::empty()).unwrap(),
            HmmPfn::default()
        );
        let p = mirror(&r.mm, r.buf, stranger, HmmPfnFlags::REQ_FAULT).unwrap();
        assert_eq!(
            r.ops.calls.lock().len(),
            1,
            "migrate_to_ram of the owning device"
        );
        assert!(p.is_valid());
        assert_ne!(p.frame_nr(), dpfn.as_u64());
        let mut b = [0u8];
        p.frame(r.mm.phys()).unwrap().read(0, &mut b);
        assert_eq!(b, [6]);
        r.mm.audit().unwrap();
    }

    #[test]
    fn a_device_that_cannot_give_the_page_back_is_efault() {
        let r = rig(Mode::Sigbus);
        to_device(&r, r.buf, 1);
        let e = mirror(&r.mm, r.buf, None, HmmPfnFlags::REQ_FAULT).unwrap_err();
        assert_eq!(e, HmmError::Fault { addr: r.buf });
    }
}
