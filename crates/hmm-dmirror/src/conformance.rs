//! A driver conformance suite: scenarios any mirror implementation must pass, written
//! against two small traits so they run on any driver, not only dmirror.
//!
//! A driver under test implements [`DeviceMirror`] (what a device does to a process's
//! memory: read, write, snapshot) and [`MirrorFactory`] (a fresh machine and a mirror of a
//! process on it). [`SCENARIOS`] lists the checks; [`run_all`] runs them and reports each.
//! Every scenario checks bytes both ways (device against CPU) and the kernel's errors.
//!
//! ```
//! use hmm_dmirror::conformance::{run_all, DmirrorFactory};
//! use hmm::zone_device::MemoryType;
//!
//! let report = run_all(&DmirrorFactory::new(MemoryType::DevicePrivate));
//! assert!(report.iter().all(|(_, r)| r.is_ok()), "{report:?}");
//! ```

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, MemFile, Mm, Prot, ThpMode};
use hmm::phys::{PhysConfig, PhysMem};
use hmm::zone_device::MemoryType;

use crate::{prot, Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, DmirrorError};

/// What a device can do to the memory of the process it mirrors.
pub trait DeviceMirror {
    /// The device reads `npages` pages at `addr`.
    fn read(&self, addr: VirtAddr, npages: u64) -> Result<Vec<u8>, DmirrorError>;
    /// The device writes `data` (whole pages) at `addr`.
    fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), DmirrorError>;
    /// One `HMM_DMIRROR_PROT_*` byte per page at `addr`.
    fn snapshot(&self, addr: VirtAddr, npages: u64) -> Result<Vec<u8>, DmirrorError>;
}

/// Makes machines and mirrors for the scenarios.
pub trait MirrorFactory {
    /// A fresh machine of at least `mib` MiB of RAM with one process on it.
    fn machine(&self, mib: u64) -> (Arc<PhysMem>, Arc<Mm>);
    /// A mirror of `mm` by device `device` (0 or 1; the two have different owners).
    fn open(&self, phys: &Arc<PhysMem>, mm: &Arc<Mm>, device: usize) -> Box<dyn DeviceMirror>;
}

/// One check.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name.
    pub name: &'static str,
    /// Runs it; `Err` says what went wrong.
    pub run: fn(&dyn MirrorFactory) -> Result<(), String>,
}

/// Every scenario.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "device_read_sees_cpu_writes",
        run: device_read_sees_cpu_writes,
    },
    Scenario {
        name: "device_read_of_untouched_memory_is_zero",
        run: device_read_of_untouched_memory_is_zero,
    },
    Scenario {
        name: "cpu_sees_device_writes",
        run: cpu_sees_device_writes,
    },
    Scenario {
        name: "write_to_read_only_memory_is_eperm",
        run: write_to_read_only_memory_is_eperm,
    },
    Scenario {
        name: "unmapped_memory_is_efault",
        run: unmapped_memory_is_efault,
    },
    Scenario {
        name: "munmap_drops_device_mappings",
        run: munmap_drops_device_mappings,
    },
    Scenario {
        name: "mprotect_read_only_stops_device_writes",
        run: mprotect_read_only_stops_device_writes,
    },
    Scenario {
        name: "fork_cow_keeps_parent_and_child_apart",
        run: fork_cow_keeps_parent_and_child_apart,
    },
    Scenario {
        name: "dontneed_then_device_read_is_zero",
        run: dontneed_then_device_read_is_zero,
    },
    Scenario {
        name: "snapshot_bytes",
        run: snapshot_bytes,
    },
    Scenario {
        name: "thp_snapshot_and_access",
        run: thp_snapshot_and_access,
    },
    Scenario {
        name: "shared_memory_is_coherent",
        run: shared_memory_is_coherent,
    },
    Scenario {
        name: "two_devices_mirror_independently",
        run: two_devices_mirror_independently,
    },
    Scenario {
        name: "file_mappings_are_coherent_with_the_file",
        run: file_mappings_are_coherent_with_the_file,
    },
    Scenario {
        name: "hugetlb_pages",
        run: hugetlb_pages,
    },
];

/// Runs every scenario; each result names its scenario.
pub fn run_all(factory: &dyn MirrorFactory) -> Vec<(&'static str, Result<(), String>)> {
    SCENARIOS
        .iter()
        .map(|s| (s.name, (s.run)(factory)))
        .collect()
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn map(mm: &Mm, npages: u64, prot: Prot, flags: MapFlags) -> Result<VirtAddr, String> {
    mm.mmap(None, npages * PAGE_SIZE, prot, flags)
        .map_err(|e| format!("mmap: {e}"))
}

/// Page `i` of a pattern that names the page and a version.
fn pattern(npages: u64, version: u8) -> Vec<u8> {
    (0..npages * PAGE_SIZE)
        .map(|i| ((i / PAGE_SIZE) as u8).wrapping_mul(31) ^ (i as u8) ^ version)
        .collect()
}

fn cpu_read(mm: &Mm, addr: VirtAddr, len: usize) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; len];
    mm.read(addr, &mut b)
        .map_err(|e| format!("CPU read: {e}"))?;
    Ok(b)
}

fn device_read_sees_cpu_writes(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 16, RW, MapFlags::PRIVATE)?;
    let data = pattern(16, 1);
    mm.write(a, &data).map_err(|e| e.to_string())?;
    ensure!(
        d.read(a, 16).map_err(|e| e.to_string())? == data,
        "device read differs"
    );
    // In-place CPU writes to pages the device maps are seen without a new fault.
    let data2 = pattern(16, 2);
    mm.write(a, &data2).map_err(|e| e.to_string())?;
    ensure!(
        d.read(a, 16).map_err(|e| e.to_string())? == data2,
        "second read differs"
    );
    mm.audit().map_err(|e| e.to_string())?;
    Ok(())
}

fn device_read_of_untouched_memory_is_zero(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 8, RW, MapFlags::PRIVATE)?;
    let got = d.read(a, 8).map_err(|e| e.to_string())?;
    ensure!(got.iter().all(|&b| b == 0), "untouched memory is not zero");
    let snap = d.snapshot(a, 8).map_err(|e| e.to_string())?;
    ensure!(
        snap.iter().all(|&b| b == prot::ZERO | prot::READ),
        "a read fault maps the zero page: {snap:x?}"
    );
    Ok(())
}

fn cpu_sees_device_writes(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 16, RW, MapFlags::PRIVATE)?;
    // Half the pages read first (zero page), so the write must upgrade them.
    d.read(a, 8).map_err(|e| e.to_string())?;
    let data = pattern(16, 3);
    d.write(a, &data).map_err(|e| e.to_string())?;
    ensure!(
        cpu_read(&mm, a, data.len())? == data,
        "CPU does not see the device's write"
    );
    let snap = d.snapshot(a, 16).map_err(|e| e.to_string())?;
    ensure!(
        snap.iter().all(|&b| b == prot::WRITE),
        "written pages are writable: {snap:x?}"
    );
    mm.audit().map_err(|e| e.to_string())?;
    Ok(())
}

fn write_to_read_only_memory_is_eperm(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 4, Prot::READ, MapFlags::PRIVATE)?;
    let r = d.write(a, &pattern(4, 4));
    ensure!(
        r == Err(DmirrorError::Perm),
        "write to PROT_READ memory: {r:?}"
    );
    ensure!(
        cpu_read(&mm, a, 4 * PAGE_SIZE as usize)?
            .iter()
            .all(|&b| b == 0),
        "a refused write changed memory"
    );
    ensure!(d.read(a, 4).is_ok(), "read of PROT_READ memory fails");
    Ok(())
}

fn unmapped_memory_is_efault(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 4, RW, MapFlags::PRIVATE)?;
    mm.munmap(a, 4 * PAGE_SIZE).map_err(|e| e.to_string())?;
    let r = d.read(a, 4).map(|v| v.len());
    ensure!(
        r == Err(DmirrorError::Fault),
        "read of unmapped memory: {r:?}"
    );
    let snap = d.snapshot(a, 4).map_err(|e| e.to_string())?;
    ensure!(snap.iter().all(|&b| b == prot::ERROR), "no VMA: {snap:x?}");
    let none = map(&mm, 2, Prot::NONE, MapFlags::PRIVATE)?;
    let r = d.read(none, 2).map(|v| v.len());
    ensure!(
        r == Err(DmirrorError::Fault),
        "read of PROT_NONE memory: {r:?}"
    );
    Ok(())
}

fn munmap_drops_device_mappings(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 8, RW, MapFlags::PRIVATE)?;
    mm.write(a, &pattern(8, 5)).map_err(|e| e.to_string())?;
    d.read(a, 8).map_err(|e| e.to_string())?;
    mm.munmap(a, 8 * PAGE_SIZE).map_err(|e| e.to_string())?;
    // New memory at the same address must not show the old pages to the device.
    let b = mm
        .mmap(
            Some(a),
            8 * PAGE_SIZE,
            RW,
            MapFlags::PRIVATE | MapFlags::FIXED,
        )
        .map_err(|e| e.to_string())?;
    let got = d.read(b, 8).map_err(|e| e.to_string())?;
    ensure!(
        got.iter().all(|&x| x == 0),
        "device saw stale data after munmap"
    );
    mm.audit().map_err(|e| e.to_string())?;
    Ok(())
}

fn mprotect_read_only_stops_device_writes(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 4, RW, MapFlags::PRIVATE)?;
    let data = pattern(4, 6);
    d.write(a, &data).map_err(|e| e.to_string())?;
    mm.mprotect(a, 4 * PAGE_SIZE, Prot::READ)
        .map_err(|e| e.to_string())?;
    let r = d.write(a, &pattern(4, 7));
    ensure!(
        r == Err(DmirrorError::Perm),
        "write after mprotect(READ): {r:?}"
    );
    ensure!(cpu_read(&mm, a, data.len())? == data, "memory changed");
    ensure!(
        d.read(a, 4).map_err(|e| e.to_string())? == data,
        "read after mprotect"
    );
    Ok(())
}

fn fork_cow_keeps_parent_and_child_apart(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 4, RW, MapFlags::PRIVATE)?;
    let before = pattern(4, 8);
    d.write(a, &before).map_err(|e| e.to_string())?;
    let child = mm.fork().map_err(|e| e.to_string())?;
    // The device writes the parent after fork: it must copy, not write the shared page.
    let after = pattern(4, 9);
    d.write(a, &after).map_err(|e| e.to_string())?;
    ensure!(
        cpu_read(&mm, a, after.len())? == after,
        "parent lost the device write"
    );
    ensure!(
        cpu_read(&child, a, before.len())? == before,
        "the child saw the parent's device write"
    );
    // And the parent's CPU write after fork is what the device reads.
    let cpu = pattern(4, 10);
    mm.write(a, &cpu).map_err(|e| e.to_string())?;
    ensure!(
        d.read(a, 4).map_err(|e| e.to_string())? == cpu,
        "device read stale data"
    );
    mm.audit().map_err(|e| e.to_string())?;
    child.audit().map_err(|e| e.to_string())?;
    Ok(())
}

fn dontneed_then_device_read_is_zero(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 4, RW, MapFlags::PRIVATE)?;
    d.write(a, &pattern(4, 11)).map_err(|e| e.to_string())?;
    mm.madvise(a, 4 * PAGE_SIZE, Advice::DontNeed)
        .map_err(|e| e.to_string())?;
    let got = d.read(a, 4).map_err(|e| e.to_string())?;
    ensure!(got.iter().all(|&b| b == 0), "device read freed pages");
    Ok(())
}

fn snapshot_bytes(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 4, RW, MapFlags::PRIVATE)?;
    mm.read_val::<u8>(a.checked_add(PAGE_SIZE).expect("page 1"))
        .map_err(|e| e.to_string())?;
    mm.write_val(a.checked_add(2 * PAGE_SIZE).expect("page 2"), 1u8)
        .map_err(|e| e.to_string())?;
    let ro = map(&mm, 1, Prot::READ, MapFlags::PRIVATE)?;
    mm.read_val::<u8>(ro).map_err(|e| e.to_string())?;
    let snap = d.snapshot(a, 4).map_err(|e| e.to_string())?;
    let want = [prot::NONE, prot::ZERO | prot::READ, prot::WRITE, prot::NONE];
    ensure!(snap == want, "snapshot {snap:x?}, want {want:x?}");
    let snap = d.snapshot(ro, 1).map_err(|e| e.to_string())?;
    ensure!(snap == [prot::ZERO | prot::READ], "read-only: {snap:x?}");
    let child = mm.fork().map_err(|e| e.to_string())?;
    let snap = d.snapshot(a, 4).map_err(|e| e.to_string())?;
    ensure!(
        snap[2] == prot::READ,
        "after fork the page is read-only: {snap:x?}"
    );
    drop(child);
    Ok(())
}

fn thp_snapshot_and_access(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(32);
    let d = f.open(&phys, &mm, 0);
    mm.set_thp_mode(ThpMode::Always);
    let a = mm
        .mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE)
        .map_err(|e| e.to_string())?;
    let n = PMD_SIZE / PAGE_SIZE;
    let data = pattern(n, 12);
    d.write(a, &data).map_err(|e| e.to_string())?;
    ensure!(cpu_read(&mm, a, data.len())? == data, "THP bytes");
    let snap = d.snapshot(a, n).map_err(|e| e.to_string())?;
    ensure!(
        snap.iter().all(|&b| b == prot::WRITE | prot::PMD),
        "a THP is PMD-mapped: {:x?}",
        &snap[..4]
    );
    Ok(())
}

fn shared_memory_is_coherent(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let a = map(&mm, 4, RW, MapFlags::SHARED)?;
    let data = pattern(4, 13);
    d.write(a, &data).map_err(|e| e.to_string())?;
    let child = mm.fork().map_err(|e| e.to_string())?;
    ensure!(
        cpu_read(&child, a, data.len())? == data,
        "child misses shared data"
    );
    let data2 = pattern(4, 14);
    child.write(a, &data2).map_err(|e| e.to_string())?;
    ensure!(
        d.read(a, 4).map_err(|e| e.to_string())? == data2,
        "device misses child write"
    );
    Ok(())
}

fn two_devices_mirror_independently(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d0 = f.open(&phys, &mm, 0);
    let d1 = f.open(&phys, &mm, 1);
    let a = map(&mm, 8, RW, MapFlags::PRIVATE)?;
    let data = pattern(8, 15);
    d0.write(a, &data).map_err(|e| e.to_string())?;
    ensure!(
        d1.read(a, 8).map_err(|e| e.to_string())? == data,
        "device 1 read"
    );
    let data2 = pattern(8, 16);
    d1.write(a, &data2).map_err(|e| e.to_string())?;
    ensure!(
        d0.read(a, 8).map_err(|e| e.to_string())? == data2,
        "device 0 read"
    );
    mm.audit().map_err(|e| e.to_string())?;
    Ok(())
}

fn file_mappings_are_coherent_with_the_file(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    let file = MemFile::new(&phys);
    let data = pattern(4, 17);
    file.pwrite(0, &data).map_err(|e| e.to_string())?;
    let len = 4 * PAGE_SIZE;
    let shared = mm
        .mmap_file(None, len, RW, MapFlags::SHARED, &file, 0)
        .map_err(|e| e.to_string())?;
    ensure!(
        d.read(shared, 4).map_err(|e| e.to_string())? == data,
        "device read of file"
    );
    let data2 = pattern(4, 18);
    d.write(shared, &data2).map_err(|e| e.to_string())?;
    let mut back = vec![0u8; data2.len()];
    file.pread(0, &mut back).map_err(|e| e.to_string())?;
    ensure!(back == data2, "the file misses the device's write");
    // A private mapping: the device's write copies, the file keeps its contents.
    let private = mm
        .mmap_file(None, len, RW, MapFlags::PRIVATE, &file, 0)
        .map_err(|e| e.to_string())?;
    let snap = d.snapshot(private, 4).map_err(|e| e.to_string())?;
    ensure!(
        snap.iter().all(|&b| b == prot::NONE),
        "not faulted yet: {snap:x?}"
    );
    ensure!(
        d.read(private, 4).map_err(|e| e.to_string())? == data2,
        "private read"
    );
    let snap = d.snapshot(private, 4).map_err(|e| e.to_string())?;
    ensure!(
        snap.iter().all(|&b| b == prot::READ),
        "private file pages are read-only"
    );
    d.write(private, &data).map_err(|e| e.to_string())?;
    file.pread(0, &mut back).map_err(|e| e.to_string())?;
    ensure!(back == data2, "a private write reached the file");
    ensure!(cpu_read(&mm, private, data.len())? == data, "private copy");
    // Truncation drops the device's mappings with the CPU's.
    file.truncate(0).map_err(|e| e.to_string())?;
    let r = d.read(shared, 1).map(|v| v.len());
    ensure!(r == Err(DmirrorError::Fault), "read past EOF: {r:?}");
    mm.audit().map_err(|e| e.to_string())?;
    Ok(())
}

fn hugetlb_pages(f: &dyn MirrorFactory) -> Result<(), String> {
    let (phys, mm) = f.machine(16);
    let d = f.open(&phys, &mm, 0);
    ensure!(phys.set_nr_hugepages(1) == 1, "no hugetlb page");
    let a = mm
        .mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE | MapFlags::HUGETLB)
        .map_err(|e| e.to_string())?;
    let data = pattern(4, 19);
    d.write(a, &data).map_err(|e| e.to_string())?;
    ensure!(cpu_read(&mm, a, data.len())? == data, "hugetlb bytes");
    let snap = d.snapshot(a, 4).map_err(|e| e.to_string())?;
    ensure!(
        snap.iter().all(|&b| b == prot::WRITE | prot::PMD),
        "hugetlb is PMD-mapped: {snap:x?}"
    );
    mm.munmap(a, PMD_SIZE).map_err(|e| e.to_string())?;
    ensure!(phys.hugetlb().free == 1, "the page went back to the pool");
    Ok(())
}

/// The scenarios' adapter for [`Dmirror`]: devices of one memory kind, commands through
/// [`Dmirror::ioctl`] with a bounce buffer in the process itself (as the kernel's tests
/// pass a user pointer). One driver is loaded per machine.
#[derive(Debug)]
pub struct DmirrorFactory {
    kind: MemoryType,
    drivers: parking_lot::Mutex<Vec<Arc<DmirrorDriver>>>,
}

impl DmirrorFactory {
    /// Mirrors on the driver's devices of `kind` (0 and 1 private, 2 and 3 coherent).
    pub fn new(kind: MemoryType) -> Self {
        DmirrorFactory {
            kind,
            drivers: parking_lot::Mutex::default(),
        }
    }
}

/// Bytes of the user buffer each adapter maps once at open, so scenarios' own mappings
/// never land where a bounce buffer was.
const BOUNCE_BYTES: u64 = 2 * PMD_SIZE;

struct DmirrorUnderTest {
    mirror: Arc<Dmirror>,
    mm: Arc<Mm>,
    bounce: VirtAddr,
    // The driver lives as long as its mirrors.
    _driver: Arc<DmirrorDriver>,
}

impl DmirrorUnderTest {
    fn bounce(&self, len: u64) -> Result<VirtAddr, DmirrorError> {
        if len > BOUNCE_BYTES {
            return Err(DmirrorError::NoMem);
        }
        Ok(self.bounce)
    }

    fn run(
        &self,
        which: DmirrorCmd,
        addr: VirtAddr,
        npages: u64,
        ptr: VirtAddr,
    ) -> Result<(), DmirrorError> {
        let done = self.mirror.run(which, addr, npages, ptr)?;
        assert_eq!(
            done.cpages, npages,
            "a successful command processes every page"
        );
        Ok(())
    }

    fn done(&self, ptr: VirtAddr, len: u64) {
        // Drop the buffer's pages so it costs no RAM between commands.
        self.mm
            .madvise(ptr, len.max(1), hmm::mm::Advice::DontNeed)
            .expect("bounce buffer is mapped");
    }
}

impl DeviceMirror for DmirrorUnderTest {
    fn read(&self, addr: VirtAddr, npages: u64) -> Result<Vec<u8>, DmirrorError> {
        let len = npages * PAGE_SIZE;
        let ptr = self.bounce(len)?;
        let r = self.run(DmirrorCmd::Read, addr, npages, ptr).map(|()| {
            let mut b = vec![0u8; len as usize];
            self.mm.read(ptr, &mut b).expect("bounce buffer reads");
            b
        });
        self.done(ptr, len);
        r
    }

    fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), DmirrorError> {
        let len = data.len() as u64;
        let ptr = self.bounce(len)?;
        self.mm.write(ptr, data).expect("bounce buffer writes");
        let r = self.run(DmirrorCmd::Write, addr, len / PAGE_SIZE, ptr);
        self.done(ptr, len);
        r
    }

    fn snapshot(&self, addr: VirtAddr, npages: u64) -> Result<Vec<u8>, DmirrorError> {
        let ptr = self.bounce(npages)?;
        let r = self.run(DmirrorCmd::Snapshot, addr, npages, ptr).map(|()| {
            let mut b = vec![0u8; npages as usize];
            self.mm.read(ptr, &mut b).expect("bounce buffer reads");
            b
        });
        self.done(ptr, npages);
        r
    }
}

impl MirrorFactory for DmirrorFactory {
    fn machine(&self, mib: u64) -> (Arc<PhysMem>, Arc<Mm>) {
        let phys = PhysMem::new(PhysConfig::with_size(mib << 20)).expect("RAM");
        let config = DmirrorConfig {
            chunk_bytes: 8 << 20,
            max_chunks: 2,
        };
        let mut drivers = self.drivers.lock();
        // Machines of finished scenarios go with their drivers.
        drivers.retain(|d| Arc::strong_count(d.device(0).phys()) > 1 + d.devices().len());
        drivers.push(Arc::new(DmirrorDriver::new(&phys, config)));
        let mm = Mm::new(Arc::clone(&phys));
        (phys, mm)
    }

    fn open(&self, phys: &Arc<PhysMem>, mm: &Arc<Mm>, device: usize) -> Box<dyn DeviceMirror> {
        let driver = self
            .drivers
            .lock()
            .iter()
            .find(|d| Arc::ptr_eq(d.device(0).phys(), phys))
            .cloned()
            .expect("a machine made by this factory");
        let minor = match self.kind {
            MemoryType::DevicePrivate => device,
            MemoryType::DeviceCoherent => 2 + device,
        };
        let mirror = Dmirror::open(driver.device(minor), mm).expect("open");
        let bounce = mm
            .mmap(None, BOUNCE_BYTES, RW, MapFlags::PRIVATE)
            .expect("bounce buffer");
        Box::new(DmirrorUnderTest {
            mirror,
            mm: Arc::clone(mm),
            bounce,
            _driver: driver,
        })
    }
}
