//! Exclusive access: `make_device_exclusive` through dmirror's EXCLUSIVE and
//! CHECK_EXCLUSIVE, revoked by any CPU access, restored across fork, refused where the
//! kernel refuses it.

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::exclusive::{make_device_exclusive, ExclusiveError};
use hmm::mm::{MapFlags, Mm, Prot, SwapKind};
use hmm::notifier::{NotifierEvent, Owner, Recorder};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, DmirrorError, HmmDmirrorCmd};

const RW: Prot = Prot::READ.union(Prot::WRITE);

struct Rig {
    _driver: DmirrorDriver,
    mm: Arc<Mm>,
    mirror: Arc<Dmirror>,
    buf: VirtAddr,
    rec: Arc<Recorder>,
    _h: hmm::notifier::MmuNotifierHandle,
}

fn rig() -> Rig {
    let phys = PhysMem::new(PhysConfig::with_size(32 << 20)).unwrap();
    let driver = DmirrorDriver::new(&phys, DmirrorConfig::default());
    let mm = Mm::new(phys);
    let mirror = Dmirror::open(driver.device(0), &mm).unwrap();
    let buf = mm
        .mmap(None, 16 * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap();
    let rec = Arc::new(Recorder::new());
    let h = mm.register_notifier(rec.clone()).unwrap();
    Rig {
        _driver: driver,
        mm,
        mirror,
        buf,
        rec,
        _h: h,
    }
}

fn run(r: &Rig, which: DmirrorCmd, addr: VirtAddr, npages: u64) -> Result<u64, DmirrorError> {
    let mut c = HmmDmirrorCmd {
        addr: addr.as_u64(),
        ptr: r.buf.as_u64(),
        npages,
        ..HmmDmirrorCmd::default()
    };
    r.mirror.ioctl(which, &mut c).map(|()| c.cpages)
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    a.checked_add(i * PAGE_SIZE).unwrap()
}

#[test]
fn exclusive_until_the_cpu_touches_it() {
    let r = rig();
    let a =
        r.mm.mmap(None, 4 * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 253) as u8).collect();
    r.mm.write(a, &data).unwrap();
    r.rec.take();
    assert_eq!(run(&r, DmirrorCmd::Exclusive, a, 4).unwrap(), 4);
    let mut back = vec![0u8; data.len()];
    r.mm.read(r.buf, &mut back).unwrap();
    assert_eq!(back, data, "the device reads through its atomic mappings");
    let events = r.rec.take();
    let excl: Vec<_> = events
        .iter()
        .filter(|e| e.event == NotifierEvent::Exclusive)
        .collect();
    assert_eq!(excl.len(), 4, "one EXCLUSIVE invalidation per page");
    assert!(excl
        .iter()
        .all(|e| e.owner.is_none() && e.range.npages() == 1));
    let pm = r.mm.pagemap(a, 4).unwrap();
    assert!(pm.iter().all(|e| e.swap == Some(SwapKind::DeviceExclusive)));
    assert_eq!(
        run(&r, DmirrorCmd::CheckExclusive, a, 4),
        Err(DmirrorError::Perm)
    );
    r.mm.audit().unwrap();
    // A CPU read of page 1 revokes that page only, with a one-page CLEAR.
    let before = r.mm.stats();
    assert_eq!(
        r.mm.read_val::<u8>(page(a, 1)).unwrap(),
        data[PAGE_SIZE as usize]
    );
    assert_eq!(r.mm.stats().since(&before).faults.device_exclusive, 1);
    let clear: Vec<_> = r
        .rec
        .take()
        .into_iter()
        .filter(|e| e.event == NotifierEvent::Clear)
        .collect();
    assert_eq!(clear.len(), 1);
    assert_eq!(clear[0].start(), page(a, 1));
    assert_eq!(run(&r, DmirrorCmd::CheckExclusive, page(a, 1), 1), Ok(0));
    assert_eq!(
        run(&r, DmirrorCmd::CheckExclusive, a, 4),
        Err(DmirrorError::Perm)
    );
    // CPU writes revoke the rest, and keep the bytes.
    for i in [0, 2, 3] {
        r.mm.write_val(page(a, i), 0xabu8).unwrap();
    }
    assert_eq!(run(&r, DmirrorCmd::CheckExclusive, a, 4), Ok(0));
    assert_eq!(r.mm.read_val::<u8>(page(a, 2)).unwrap(), 0xab);
    assert_eq!(
        r.mm.read_val::<u8>(page(a, 2).checked_add(1).unwrap())
            .unwrap(),
        data[2 * PAGE_SIZE as usize + 1]
    );
    r.mm.audit().unwrap();
}

#[test]
fn fork_restores_exclusive_entries_first() {
    let r = rig();
    let a =
        r.mm.mmap(None, 2 * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    r.mm.write_val(a, 7u64).unwrap();
    run(&r, DmirrorCmd::Exclusive, a, 2).unwrap();
    let child = r.mm.fork().unwrap();
    assert!(r.mm.pagemap(a, 2).unwrap().iter().all(|e| e.swap.is_none()));
    assert_eq!(child.read_val::<u64>(a).unwrap(), 7);
    assert_eq!(run(&r, DmirrorCmd::CheckExclusive, a, 2), Ok(0));
    r.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn exclusive_is_refused_where_the_kernel_refuses_it() {
    let r = rig();
    let shared = r.mm.mmap(None, PAGE_SIZE, RW, MapFlags::SHARED).unwrap();
    assert_eq!(
        run(&r, DmirrorCmd::Exclusive, shared, 1),
        Err(DmirrorError::NotSupported)
    );
    let ro =
        r.mm.mmap(None, PAGE_SIZE, Prot::READ, MapFlags::PRIVATE)
            .unwrap();
    assert_eq!(
        run(&r, DmirrorCmd::Exclusive, ro, 1),
        Err(DmirrorError::Fault)
    );
    {
        let mmap = r.mm.mmap_read();
        let e = make_device_exclusive(&mmap, VirtAddr::new(0x10000), Some(Owner::new_unique()));
        assert!(matches!(e, Err(ExclusiveError::Fault { .. })));
    }
    r.mm.audit().unwrap();
}

#[test]
fn the_owner_rides_on_the_exclusive_event_and_thp_is_split_first() {
    let r = rig();
    r.mm.set_thp_mode(hmm::mm::ThpMode::Always);
    let t = r.mm.mmap(None, 2 << 20, RW, MapFlags::PRIVATE).unwrap();
    r.mm.write_val(t, 1u8).unwrap();
    assert_eq!(r.mm.stats().faults.thp_anon, 1);
    r.rec.take();
    let owner = Owner::new_unique();
    {
        let mmap = r.mm.mmap_read();
        let p = make_device_exclusive(&mmap, page(t, 5), Some(owner)).unwrap();
        assert!(p.page().folio().meta().is_locked(), "returned locked");
    }
    let ev: Vec<_> = r.rec.take();
    assert!(ev
        .iter()
        .any(|e| e.event == NotifierEvent::Exclusive && e.owner == Some(owner)));
    assert_eq!(r.mm.stats().thp_split_pmd, 1);
    assert_eq!(
        r.mm.pagemap(page(t, 5), 1).unwrap()[0].swap,
        Some(SwapKind::DeviceExclusive)
    );
    assert_eq!(r.mm.read_val::<u8>(t).unwrap(), 1);
    r.mm.audit().unwrap();
}

/// The device writes only through WRITE entries (`dmirror_do_write`): writing a page it
/// holds for atomics faults it writable, which revokes the exclusive entry first. (Found
/// by the differential fuzzer: dmirror used to write through the atomic mapping.)
#[test]
fn a_device_write_faults_its_atomic_page_writable_first() {
    let r = rig();
    let a =
        r.mm.mmap(None, 2 * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap();
    r.mm.write(a, &[1u8; 2 * PAGE_SIZE as usize]).unwrap();
    assert_eq!(run(&r, DmirrorCmd::Exclusive, a, 2).unwrap(), 2);
    r.mm.write(r.buf, &[9u8; PAGE_SIZE as usize]).unwrap();
    assert_eq!(run(&r, DmirrorCmd::Write, a, 1).unwrap(), 1);
    let pm = r.mm.pagemap(a, 2).unwrap();
    assert!(pm[0].present, "the write faulted page 0 back: {:?}", pm[0]);
    assert_eq!(pm[1].swap, Some(SwapKind::DeviceExclusive));
    assert_eq!(run(&r, DmirrorCmd::CheckExclusive, a, 1), Ok(0));
    assert_eq!(
        run(&r, DmirrorCmd::CheckExclusive, a, 2),
        Err(DmirrorError::Perm)
    );
    assert_eq!(r.mm.read_val::<u8>(a).unwrap(), 9);
    r.mm.audit().unwrap();
}

/// As in Linux, the page is faulted in writable first and only then must be anonymous: a
/// private file mapping's page becomes its anonymous COW copy and is made exclusive; the
/// file does not change. (Found by the differential fuzzer.)
#[test]
fn a_private_file_mappings_cow_copy_can_be_exclusive() {
    let r = rig();
    let file = hmm::mm::MemFile::new(r.mm.phys());
    file.truncate(PAGE_SIZE).unwrap();
    file.pwrite(0, &[5u8; PAGE_SIZE as usize]).unwrap();
    let a =
        r.mm.mmap_file(None, PAGE_SIZE, RW, MapFlags::PRIVATE, &file, 0)
            .unwrap();
    assert_eq!(run(&r, DmirrorCmd::Exclusive, a, 1).unwrap(), 1);
    assert_eq!(
        r.mm.pagemap(a, 1).unwrap()[0].swap,
        Some(SwapKind::DeviceExclusive)
    );
    r.mm.write_val(a, 6u8).unwrap();
    let mut f = [0u8; 1];
    file.pread(0, &mut f).unwrap();
    assert_eq!(f[0], 5, "the file page never changed");
    r.mm.audit().unwrap();
}
