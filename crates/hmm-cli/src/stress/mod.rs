//! `hmm stress`: everything at once on real threads, with the invariants checked while it
//! runs and at the end.
//!
//! One process maps a region of slots (16 pages each, every page carrying its index and a
//! version, see [`region`]), mirrored by two dmirror devices. Then, for `--seconds` (and on
//! until every kind of operation ran `--min-each` times):
//!
//! - `--threads` CPU threads read pages (all 4096 bytes compared with the version the
//!   page must have) and write them (the next version);
//! - one thread per device reads runs of pages through the device (dmirror READ) and
//!   writes them (dmirror WRITE), checking and bumping versions the same way;
//! - a migration thread moves runs of pages to either device (MIGRATE_TO_DEV and
//!   MIGRATE_ON_FAULT_TO_DEV) and back (MIGRATE_TO_SYS), racing every access;
//! - with `--mthp`, a write fault to an empty 16, 32 or 64 KiB of the page slots maps a
//!   multi-size THP of that size, which the other threads then meet: copies on write
//!   after fork, migrations and pageout that split it, partial unmaps;
//! - with `--thps N`, N more 2 MiB of slots sit in a THP-enabled mapping: the CPU and
//!   device threads use their pages like any other (splitting THPs, faulting device THPs
//!   back 2 MiB at a time), and the migration thread also moves each 2 MiB whole
//!   (`SELECT_COMPOUND`: a device THP there, a THP back, or 512 pages when memory is
//!   short); fork shares them; the churn thread leaves them alone, so they stay aligned;
//! - a churn thread takes a slot for itself and write-protects it (a CPU store must
//!   fail), moves it (`mremap`), unmaps and re-maps it (rewriting its pages), or forks the
//!   process, checks the slot in the child, writes there, and exits the child;
//! - now and then the migration thread removes a device's memory instead (RELEASE: every
//!   page of the device is evicted to RAM and its chunks unregistered, as device removal
//!   or module unload does), while the other threads go on using it;
//! - the machine has swap as large as the region, and the migration thread also writes
//!   runs of pages out (`MADV_PAGEOUT`) or runs the reclaim clock over the whole machine
//!   (which unmaps pages a fork's child shares too, under CLEAR invalidations the mirrors
//!   see); every access to such a page reads it back (swap-in, counted).
//!
//! With `--fail-alloc P`, P percent of RAM and device-memory allocations fail (fault
//! injection, see [`hmm::fault_inject`]). An operation may then fail for lack of memory,
//! and only that way; what it leaves must still check out: a CPU store or read that fails
//! changed nothing, a device WRITE that fails leaves each page at its old or its new
//! version, a migration or removal that fails leaves every page where its bytes are
//! intact. The harness's own accesses (checks, rewrites of a re-mapped slot) retry.
//!
//! Every ~second the checker stops the world (every operation holds the world lock for
//! reading) and checks: that no device maps a frame the CPU page table does not map at
//! the same address (a frame freed or reused while a mirror still maps it would show
//! here), that the address space's [`audit`](hmm::mm::Mm::audit) passes, that every
//! allocated frame is referenced by the address space (allocated = mapped + free; nothing
//! is in flight while the world is stopped), and that every page holds its bytes. At the
//! end the devices and the process are torn down and every frame must be free again. A
//! watchdog (see [`watchdog`]) reports threads that stop making progress.
//!
//! The run is seeded: `--seed` fixes each thread's choice of operations (the interleaving
//! is the machine's). A Ctrl-C ends the workload early (see [`crate::interrupt`]): the
//! threads finish their operation in hand, the final check and the teardown run, and the
//! report says `interrupted`. A deadlock is reported and ends the process with status 1.

mod region;
mod watchdog;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_ORDER, PMD_SIZE};
use hmm::fault_inject::{FaultAttr, FaultConfig};
use hmm::mm::{Advice, FaultError, GupFlags, MapFlags, Mm, MmError, MremapFlags, Prot, SwapKind};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, DmirrorError, HmmDmirrorCmd};
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use serde::Serialize;

use crate::interrupt;
use crate::limits::{round_2m, Need, MAX_SECONDS, MIB};
use region::{content, mix, page_va, wrong_bytes, Region, SLOT_BYTES, SLOT_PAGES};
use watchdog::Heart;

const RW: Prot = Prot::READ.union(Prot::WRITE);
const PAGE: usize = PAGE_SIZE as usize;
/// Pages one device command or migration covers at most.
const RUN: u64 = 8;
/// How long a thread may make no progress before it counts as deadlocked.
const STALL: Duration = Duration::from_secs(20);
/// Out-of-memory failures in a row after which a harness access gives up.
const OOM_RETRIES: u32 = 1000;
/// Time between stop-the-world checks.
const CHECK_EVERY: Duration = Duration::from_millis(1000);

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Config {
    pub(crate) seconds: f64,
    /// After `seconds`, the run goes on until every kind of operation ran this often.
    pub(crate) min_each: u64,
    pub(crate) threads: usize,
    pub(crate) seed: u64,
    pub(crate) pages: u64,
    /// Percent of allocations made to fail.
    pub(crate) fail_alloc: u32,
    /// 2 MiB THP areas of slots, after the `pages`.
    pub(crate) thps: u64,
    /// Multi-size THPs of 16 to 64 KiB in the page slots.
    pub(crate) mthp: bool,
    /// Print JSON (also what a deadlock report is printed as).
    #[serde(skip)]
    pub(crate) json: bool,
}

/// The version of the `--json` object's layout: raised when a field changes meaning or
/// goes away (fields may be added without it).
const SCHEMA_VERSION: u32 = 1;

/// What a run did and found.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    schema_version: u32,
    config: Config,
    /// Wall-clock time of the workload (set-up and teardown excluded).
    seconds: f64,
    /// Whether a Ctrl-C stopped the workload before `--seconds` (the checks still ran).
    interrupted: bool,
    ops: u64,
    ops_by_kind: BTreeMap<&'static str, u64>,
    /// Stop-the-world checks run (the final one included).
    checks: u64,
    /// Bytes that differed from what the page had to hold, over every read and check.
    corrupted_bytes: u64,
    /// Frames still allocated after the process and the devices were torn down.
    leaked_frames: u64,
    /// Device mappings of a frame the CPU did not map at that address, or left behind.
    stale_mirror_entries: u64,
    /// Audit and frame-accounting failures at the checks.
    invariant_failures: u64,
    /// Operations that failed where they must not have.
    unexpected_errors: u64,
    /// Allocations made to fail (RAM and both devices' memory).
    injected_failures: u64,
    /// Operations that failed for lack of memory, each checked to have lost nothing: with
    /// `--fail-alloc`, the injected failures; without, only if the simulated RAM or a
    /// device's memory ran out (the harness sizes them to hold everything, so 0).
    oom_failures: u64,
    /// `MADV_COLLAPSE` calls on a THP area that found no free 2 MiB block of RAM for the
    /// THP (the 4 KiB pages of the other threads fragment RAM, as in the kernel, where
    /// the call fails with `ENOMEM` too) or whose allocation was failed by injection. Not
    /// in `oom_failures`: they happen without `--fail-alloc`.
    thp_collapse_no_memory: u64,
    /// Device commands that gave up with `Busy` after the range-fault timeout, each
    /// checked to have lost nothing.
    busy_failures: u64,
    /// THP-area migrations to a device after which the area was one device THP.
    thp_areas_moved_whole: u64,
    /// THPs made by `MADV_COLLAPSE`, and large folios split (the address space's counters).
    thp_collapses: u64,
    thp_splits: u64,
    /// Write faults that mapped a multi-size THP (with `--mthp`).
    mthp_faults: u64,
    deadlocks: u64,
    /// The first failures, in words.
    failures: Vec<String>,
}

impl Report {
    /// Whether the run found nothing wrong.
    pub(crate) fn clean(&self) -> bool {
        self.corrupted_bytes == 0
            && self.leaked_frames == 0
            && self.stale_mirror_entries == 0
            && self.invariant_failures == 0
            && self.unexpected_errors == 0
            && self.deadlocks == 0
    }

    /// Prints the report: one JSON object, or lines for a person.
    pub(crate) fn emit(&self) {
        if self.config.json {
            outln!(
                "{}",
                serde_json::to_string_pretty(self).expect("a report serializes")
            );
        } else {
            self.print();
        }
    }

    fn print(&self) {
        outln!(
            "{} ops in {:.1} s{} on {} CPU threads, 2 device threads, a migrator and a churner (seed {})",
            self.ops,
            self.seconds,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            self.config.threads,
            self.config.seed
        );
        for (kind, n) in &self.ops_by_kind {
            outln!("  {kind:>18} {n}");
        }
        outln!(
            "{} checks; {} allocations failed by injection, {} operations failed for lack of memory, {} device commands timed out on invalidations",
            self.checks, self.injected_failures, self.oom_failures, self.busy_failures
        );
        outln!(
            "THP areas moved whole to a device {}, THPs collapsed {} ({} collapses found no free 2 MiB block), multi-size THPs faulted in {}, large folios split {}",
            self.thp_areas_moved_whole,
            self.thp_collapses,
            self.thp_collapse_no_memory,
            self.mthp_faults,
            self.thp_splits
        );
        outln!(
            "corrupted bytes {}, leaked frames {}, stale mirror entries {}, invariant failures {}, unexpected errors {}, deadlocks {}",
            self.corrupted_bytes,
            self.leaked_frames,
            self.stale_mirror_entries,
            self.invariant_failures,
            self.unexpected_errors,
            self.deadlocks
        );
        for f in &self.failures {
            outln!("  {f}");
        }
    }
}

/// The operations, for counting.
#[derive(Debug, Clone, Copy)]
enum Op {
    CpuRead,
    CpuWrite,
    DeviceRead,
    DeviceWrite,
    MigrateToDev,
    MigrateOnFault,
    MigrateToSys,
    MigrateThp,
    Collapse,
    Release,
    Mprotect,
    Mremap,
    Remap,
    ForkExit,
    PageOut,
    Reclaim,
    SwapIn,
}

const OPS: [(&str, Op); 17] = [
    ("cpu_read", Op::CpuRead),
    ("cpu_write", Op::CpuWrite),
    ("device_read", Op::DeviceRead),
    ("device_write", Op::DeviceWrite),
    ("migrate_to_dev", Op::MigrateToDev),
    ("migrate_on_fault", Op::MigrateOnFault),
    ("migrate_to_sys", Op::MigrateToSys),
    ("migrate_thp", Op::MigrateThp),
    ("thp_collapse", Op::Collapse),
    ("device_removal", Op::Release),
    ("mprotect", Op::Mprotect),
    ("mremap", Op::Mremap),
    ("munmap_mmap", Op::Remap),
    ("fork_exit", Op::ForkExit),
    ("pageout", Op::PageOut),
    ("reclaim", Op::Reclaim),
    ("swap_in", Op::SwapIn),
];

/// A seeded generator (SplitMix64): each thread its own, so a seed fixes every thread's
/// choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, thread: u64) -> Rng {
        Rng(mix(seed ^ mix(thread + 1)))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0) % n
    }
}

/// Everything the threads share.
struct Shared {
    phys: Arc<PhysMem>,
    mm: Arc<Mm>,
    /// The pins on the transfer buffers (see `build`).
    buffer_pins: Vec<hmm::mm::UserPages>,
    devs: [Arc<Dmirror>; 2],
    region: Region,
    /// Slots below this one are the churn thread's to move; the rest are the THP areas.
    churn_slots: usize,
    /// The first THP area (2 MiB aligned) and how many follow it.
    thp_base: VirtAddr,
    thps: u64,
    /// Multi-size THPs in the page slots (`--mthp`).
    mthp: bool,
    /// THP-area migrations to a device after which the area was one device THP.
    thps_whole: AtomicU64,
    world: RwLock<()>,
    stop: AtomicBool,
    ops: [AtomicU64; OPS.len()],
    corrupted: AtomicU64,
    stale: AtomicU64,
    invariants: AtomicU64,
    errors: AtomicU64,
    /// Operations that failed for lack of memory.
    oom: AtomicU64,
    /// `MADV_COLLAPSE` calls that found no memory for the THP.
    collapse_no_memory: AtomicU64,
    /// Device commands that timed out on colliding invalidations.
    busy: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Frames allocated before the process existed (the zero pages).
    baseline_allocated: u64,
    /// Per page (global index), who wrote its current version, for the failure messages.
    last_writer: Vec<Mutex<&'static str>>,
}

impl Shared {
    fn count(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether every kind of operation ran at least `n` times.
    fn each_ran(&self, n: u64) -> bool {
        self.ops.iter().all(|c| c.load(Ordering::Relaxed) >= n)
    }

    fn note(&self, what: String) {
        let mut f = self.failures.lock();
        if f.len() < 20 {
            f.push(what);
        }
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.note(what);
    }

    /// Compares `got` with page `index` at `version`.
    fn check(&self, got: &[u8], index: u64, version: u64, by: &str) {
        let bad = wrong_bytes(got, index, version);
        if bad > 0 {
            self.corrupted.fetch_add(bad, Ordering::Relaxed);
            let (gi, gv) = (word(got, 0), word(got, 1));
            let writer = *self.last_writer[index as usize].lock();
            self.note(format!(
                "{by}: page {index} v{version} (written by {writer}) has {bad} wrong bytes (it reads as page {gi} v{gv})"
            ));
        }
    }

    /// Runs a harness access again while it fails for lack of memory (injected), up to
    /// [`OOM_RETRIES`] times in a row: memory that stays short that long is not injected.
    fn retry_oom<T>(&self, mut op: impl FnMut() -> Result<T, FaultError>) -> Result<T, FaultError> {
        let mut tries = 0;
        loop {
            match op() {
                Err(FaultError::Oom { .. }) if tries < OOM_RETRIES => {
                    self.oom.fetch_add(1, Ordering::Relaxed);
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    /// Whether a device command's error is one it may give: out of memory (counted as
    /// such), or `Busy`, invalidations colliding with its range fault for the whole
    /// timeout (`HMM_RANGE_DEFAULT_TIMEOUT`, as the kernel's driver), which THP-area
    /// migrations and collapses can cause for a command that shares their 2 MiB.
    fn gave_up(&self, e: DmirrorError) -> bool {
        if e == DmirrorError::Busy {
            self.busy.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.out_of_memory(e == DmirrorError::NoMem)
    }

    /// Counts an operation's failure for lack of memory; false for any other error.
    fn out_of_memory(&self, oom: bool) -> bool {
        if oom {
            self.oom.fetch_add(1, Ordering::Relaxed);
        }
        oom
    }

    /// The fault-injection points: RAM's and each device's.
    fn fault_attrs(&self) -> [&FaultAttr; 3] {
        [
            self.phys.fail_page_alloc(),
            self.devs[0].device().fail_alloc(),
            self.devs[1].device().fail_alloc(),
        ]
    }

    fn allocated(&self) -> u64 {
        let s = self.phys.stats();
        s.nr_frames - s.nr_free
    }
}

fn word(page: &[u8], k: usize) -> u64 {
    u64::from_le_bytes(page[k * 8..k * 8 + 8].try_into().expect("8 bytes"))
}

/// A CPU thread: single-page reads and writes.
fn cpu(sh: &Shared, heart: &Heart, mut rng: Rng) {
    let mut buf = vec![0u8; PAGE];
    while !sh.stop.load(Ordering::Relaxed) {
        let _world = sh.world.read();
        let s = rng.below(sh.region.slots.len() as u64) as usize;
        let k = rng.below(SLOT_PAGES);
        let slot = &sh.region.slots[s];
        let base = slot.base.read();
        let mut v = slot.pages[k as usize].lock();
        let (va, index) = (page_va(*base, k), Region::index(s, k));
        if rng.below(2) == 0 {
            heart.doing("cpu write");
            match sh.mm.write(va, &content(index, *v + 1)) {
                Ok(()) => {
                    *v += 1;
                    *sh.last_writer[index as usize].lock() = "a cpu write";
                }
                // The store faulted and found no memory: nothing was written.
                Err(e) if sh.out_of_memory(matches!(e, FaultError::Oom { .. })) => {}
                Err(e) => sh.error(format!("cpu write of page {index}: {e}")),
            }
            sh.count(Op::CpuWrite);
        } else {
            heart.doing("cpu read");
            match sh.mm.read(va, &mut buf) {
                Ok(()) => sh.check(&buf, index, *v, "cpu read"),
                Err(e) if sh.out_of_memory(matches!(e, FaultError::Oom { .. })) => {}
                Err(e) => sh.error(format!("cpu read of page {index}: {e}")),
            }
            sh.count(Op::CpuRead);
        }
        heart.beat();
    }
}

/// A device thread: dmirror READ and WRITE of runs of pages, through a buffer of the
/// process at `buf`.
fn device(sh: &Shared, d: usize, buf: VirtAddr, heart: &Heart, mut rng: Rng) {
    let dev = &sh.devs[d];
    let mut bytes = vec![0u8; (RUN * PAGE_SIZE) as usize];
    while !sh.stop.load(Ordering::Relaxed) {
        let _world = sh.world.read();
        let s = rng.below(sh.region.slots.len() as u64) as usize;
        let n = 1 + rng.below(RUN);
        let k0 = rng.below(SLOT_PAGES - n + 1);
        let slot = &sh.region.slots[s];
        let base = slot.base.read();
        let mut versions: Vec<_> = (k0..k0 + n)
            .map(|k| slot.pages[k as usize].lock())
            .collect();
        let data = &mut bytes[..(n * PAGE_SIZE) as usize];
        let mut cmd = HmmDmirrorCmd {
            addr: page_va(*base, k0).as_u64(),
            ptr: buf.as_u64(),
            npages: n,
            ..HmmDmirrorCmd::default()
        };
        if rng.below(2) == 0 {
            heart.doing("device write");
            for (j, v) in versions.iter().enumerate() {
                let index = Region::index(s, k0 + j as u64);
                data[j * PAGE..(j + 1) * PAGE].copy_from_slice(&content(index, **v + 1));
            }
            let writer = if d == 0 {
                "a device 0 write"
            } else {
                "a device 1 write"
            };
            let r = sh
                .retry_oom(|| sh.mm.write(buf, data))
                .map_err(|e| e.to_string())
                .map(|()| dev.ioctl(DmirrorCmd::Write, &mut cmd));
            match r {
                Ok(Ok(())) => {
                    for (j, v) in versions.iter_mut().enumerate() {
                        **v += 1;
                        let index = Region::index(s, k0 + j as u64);
                        *sh.last_writer[index as usize].lock() = writer;
                    }
                }
                Ok(Err(e)) if sh.gave_up(e) => {
                    // The write stopped at a page it could not fault in (or whose range
                    // kept being invalidated); the pages before it may hold the new
                    // version.
                    for (j, v) in versions.iter_mut().enumerate() {
                        let k = k0 + j as u64;
                        let index = Region::index(s, k);
                        let mut got = vec![0u8; PAGE];
                        match sh.retry_oom(|| sh.mm.read(page_va(*base, k), &mut got)) {
                            Ok(()) if wrong_bytes(&got, index, **v + 1) == 0 => {
                                **v += 1;
                                *sh.last_writer[index as usize].lock() = writer;
                            }
                            Ok(()) => sh.check(&got, index, **v, "after a failed device write"),
                            Err(e) => sh.error(format!("read of page {index}: {e}")),
                        }
                    }
                }
                Ok(Err(e)) => sh.error(format!("device {d} write of slot {s}: {e}")),
                Err(e) => sh.error(format!("device {d} write of slot {s}: {e}")),
            }
            sh.count(Op::DeviceWrite);
        } else {
            heart.doing("device read");
            let r = dev.ioctl(DmirrorCmd::Read, &mut cmd).map(|()| {
                sh.retry_oom(|| sh.mm.read(buf, data))
                    .map_err(|e| e.to_string())
            });
            match r {
                Ok(Ok(())) => {
                    for (j, v) in versions.iter().enumerate() {
                        let index = Region::index(s, k0 + j as u64);
                        sh.check(&data[j * PAGE..(j + 1) * PAGE], index, **v, "device read");
                    }
                }
                Err(e) if sh.gave_up(e) => {}
                Err(e) => sh.error(format!("device {d} read of slot {s}: {e}")),
                Ok(Err(e)) => sh.error(format!("device {d} read of slot {s}: {e}")),
            }
            sh.count(Op::DeviceRead);
        }
        heart.beat();
    }
}

/// The migration thread: runs of pages to a device and back, racing every access.
fn migrator(sh: &Shared, buf: VirtAddr, heart: &Heart, mut rng: Rng) {
    while !sh.stop.load(Ordering::Relaxed) {
        let _world = sh.world.read();
        if sh.thps > 0 && rng.below(4) == 0 {
            migrate_thp(sh, buf, heart, &mut rng);
            continue;
        }
        let s = rng.below(sh.region.slots.len() as u64) as usize;
        let n = 1 + rng.below(RUN);
        let k0 = rng.below(SLOT_PAGES - n + 1);
        let base = sh.region.slots[s].base.read();
        let d = rng.below(2) as usize;
        let (which, op) = match rng.below(57) {
            0 => (DmirrorCmd::Release, Op::Release),
            1..=16 => (DmirrorCmd::MigrateToDev, Op::MigrateToDev),
            17..=32 => (DmirrorCmd::MigrateOnFaultToDev, Op::MigrateOnFault),
            49..=56 => {
                reclaim_some(sh, heart, &mut rng, page_va(*base, k0), n);
                continue;
            }
            _ => (DmirrorCmd::MigrateToSys, Op::MigrateToSys),
        };
        heart.doing(match op {
            Op::MigrateToSys => "migrate to system",
            Op::Release => "remove a device's memory",
            _ => "migrate to a device",
        });
        migration_command(sh, d, which, page_va(*base, k0), n, buf, || {
            format!("slot {s}")
        });
        sh.count(op);
        heart.beat();
    }
}

/// Writes pages to swap: the run of `npages` from `addr` (`MADV_PAGEOUT`, which leaves
/// pages on a device, shared with a fork's child or pinned), or the coldest pages of the
/// whole machine (the reclaim clock, which unmaps shared pages everywhere). The pages come
/// back when the CPU or a device touches them; the swap-ins are counted from the address
/// space's counters.
fn reclaim_some(sh: &Shared, heart: &Heart, rng: &mut Rng, addr: VirtAddr, npages: u64) {
    if rng.below(2) == 0 {
        heart.doing("MADV_PAGEOUT");
        if let Err(e) = sh.mm.madvise(addr, npages * PAGE_SIZE, Advice::PageOut) {
            sh.error(format!("MADV_PAGEOUT of {npages} pages at {addr}: {e}"));
        }
        sh.count(Op::PageOut);
    } else {
        heart.doing("reclaim");
        hmm::mm::reclaim(&sh.phys, RUN);
        sh.count(Op::Reclaim);
    }
    let swap_ins = sh.mm.stats().faults.swap_in;
    sh.ops[Op::SwapIn as usize].fetch_max(swap_ins, Ordering::Relaxed);
    heart.beat();
}

/// Device `d` runs the migration (or removal) command `which` over `npages` pages from
/// `addr`; an error it may give is counted, any other is reported with `what` (the pages'
/// name).
fn migration_command(
    sh: &Shared,
    d: usize,
    which: DmirrorCmd,
    addr: VirtAddr,
    npages: u64,
    buf: VirtAddr,
    what: impl Fn() -> String,
) {
    let mut cmd = HmmDmirrorCmd {
        addr: addr.as_u64(),
        ptr: buf.as_u64(),
        npages,
        ..HmmDmirrorCmd::default()
    };
    match sh.devs[d].ioctl(which, &mut cmd) {
        // A CPU access may take pages back before the read-back: ENOENT, as the kernel's
        // test driver says.
        Ok(()) | Err(DmirrorError::NoEnt) => {}
        // A page the migration (or the eviction) found no memory for stays where it is,
        // bytes intact.
        Err(e) if sh.gave_up(e) => {}
        Err(e) => sh.error(format!("device {d} {which:?} of {}: {e}", what())),
    }
}

/// One THP area moved whole: to a device (MIGRATE_TO_DEV or MIGRATE_ON_FAULT_TO_DEV) or
/// back (MIGRATE_TO_SYS). Half the time the area is first brought back to RAM and
/// collapsed into one THP again (MADV_COLLAPSE; 4 KiB accesses and migrations split it,
/// and nothing else makes it whole), then moved to a device. Its slots never move, so no
/// slot lock is taken.
fn migrate_thp(sh: &Shared, buf: VirtAddr, heart: &Heart, rng: &mut Rng) {
    let u = rng.below(sh.thps);
    let area = sh
        .thp_base
        .checked_add(u * PMD_SIZE)
        .expect("inside the THP areas");
    let d = rng.below(2) as usize;
    let what = || format!("THP area {u}");
    let to_dev = if rng.below(2) == 0 {
        DmirrorCmd::MigrateToDev
    } else {
        DmirrorCmd::MigrateOnFaultToDev
    };
    let which = if rng.below(2) == 0 {
        heart.doing("gather and collapse a THP area");
        migration_command(sh, d, DmirrorCmd::MigrateToSys, area, PMD_NR, buf, what);
        sh.count(Op::MigrateThp);
        // Fails while a page of it is on a device again, locked or pinned by a migration
        // or a fork, or memory is short.
        match sh.mm.madvise(area, PMD_SIZE, Advice::Collapse) {
            Ok(()) | Err(MmError::Inval { .. } | MmError::Again { .. }) => {}
            // No free 2 MiB block: fragmentation, counted apart (see the report).
            Err(MmError::NoMem { .. }) => {
                sh.collapse_no_memory.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => sh.error(format!("collapse of {}: {e}", what())),
        }
        sh.count(Op::Collapse);
        to_dev
    } else if rng.below(3) == 0 {
        DmirrorCmd::MigrateToSys
    } else {
        to_dev
    };
    heart.doing("migrate a THP area");
    migration_command(sh, d, which, area, PMD_NR, buf, what);
    sh.count(Op::MigrateThp);
    // Whether the area is one device THP now (it may have come back already).
    if which != DmirrorCmd::MigrateToSys
        && sh.mm.pagemap(area, 1).is_ok_and(|e| {
            e[0].order == PMD_ORDER as u8 && e[0].swap == Some(SwapKind::DevicePrivate)
        })
    {
        sh.thps_whole.fetch_add(1, Ordering::Relaxed);
    }
    heart.beat();
}

/// Reads every page of slot `s` at `base` in `mm` and checks it.
fn check_slot(sh: &Shared, mm: &Mm, s: usize, base: VirtAddr, versions: &[u64], by: &str) {
    let mut buf = vec![0u8; PAGE];
    for (k, v) in versions.iter().enumerate() {
        let index = Region::index(s, k as u64);
        match sh.retry_oom(|| mm.read(page_va(base, k as u64), &mut buf)) {
            Ok(()) => sh.check(&buf, index, *v, by),
            Err(e) => sh.error(format!(
                "{by}: read of page {index}: {e} ({:?})",
                sh.phys.stats()
            )),
        }
    }
}

/// The churn thread: takes one slot for itself and changes its mapping.
fn churn(sh: &Shared, heart: &Heart, mut rng: Rng) {
    while !sh.stop.load(Ordering::Relaxed) {
        let _world = sh.world.read();
        let s = rng.below(sh.churn_slots as u64) as usize;
        let slot = &sh.region.slots[s];
        let mut base = slot.base.write();
        let versions: Vec<u64> = slot.pages.iter().map(|v| *v.lock()).collect();
        let r: Result<Op, String> = match rng.below(4) {
            0 => {
                heart.doing("mprotect");
                (|| {
                    sh.mm
                        .mprotect(*base, SLOT_BYTES, Prot::READ)
                        .map_err(|e| e.to_string())?;
                    if sh.mm.write_val(*base, 0u8).is_ok() {
                        return Err(format!("a store to read-only slot {s} succeeded"));
                    }
                    check_slot(sh, &sh.mm, s, *base, &versions, "read-only slot");
                    sh.mm
                        .mprotect(*base, SLOT_BYTES, RW)
                        .map_err(|e| e.to_string())?;
                    Ok(Op::Mprotect)
                })()
            }
            1 => {
                heart.doing("mremap");
                (|| {
                    // A free place to move to: map it, then move over it.
                    let to = sh
                        .mm
                        .mmap(None, SLOT_BYTES, RW, MapFlags::PRIVATE)
                        .map_err(|e| e.to_string())?;
                    *base = sh
                        .mm
                        .mremap(
                            *base,
                            SLOT_BYTES,
                            SLOT_BYTES,
                            MremapFlags::MAYMOVE | MremapFlags::FIXED,
                            Some(to),
                        )
                        .map_err(|e| e.to_string())?;
                    Ok(Op::Mremap)
                })()
            }
            2 => {
                heart.doing("munmap and mmap");
                (|| {
                    sh.mm.munmap(*base, SLOT_BYTES).map_err(|e| e.to_string())?;
                    let at = sh
                        .mm
                        .mmap(None, SLOT_BYTES, RW, MapFlags::PRIVATE)
                        .map_err(|e| e.to_string())?;
                    if !sh.mthp {
                        sh.mm
                            .madvise(at, SLOT_BYTES, Advice::NoHugePage)
                            .map_err(|e| e.to_string())?;
                    }
                    *base = at;
                    for (k, v) in versions.iter().enumerate() {
                        let index = Region::index(s, k as u64);
                        sh.retry_oom(|| sh.mm.write(page_va(at, k as u64), &content(index, *v)))
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(Op::Remap)
                })()
            }
            _ => {
                heart.doing("fork and exit");
                (|| {
                    let child = sh.mm.fork().map_err(|e| e.to_string())?;
                    check_slot(sh, &child, s, *base, &versions, "forked child");
                    // The child's store is its own: the parent's page keeps its bytes.
                    sh.retry_oom(|| child.write(*base, &[0xee; 64]))
                        .map_err(|e| e.to_string())?;
                    drop(child);
                    Ok(Op::ForkExit)
                })()
            }
        };
        match r {
            Ok(op) => {
                check_slot(sh, &sh.mm, s, *base, &versions, "churned slot");
                sh.count(op);
            }
            Err(e) => sh.error(format!("churn of slot {s}: {e}")),
        }
        heart.beat();
    }
}

/// The stop-the-world check, under the world lock held for writing. Returns nothing;
/// failures are counted in `sh`.
fn check_world(sh: &Shared, _world: RwLockWriteGuard<'_, ()>) {
    // Mirrors first: reading the pages below brings device pages home.
    let bases: Vec<VirtAddr> = sh.region.slots.iter().map(|s| *s.base.read()).collect();
    for (d, dev) in sh.devs.iter().enumerate() {
        let mut found = 0;
        for (s, base) in bases.iter().enumerate() {
            let map = match sh.mm.pagemap(*base, SLOT_PAGES) {
                Ok(m) => m,
                Err(e) => {
                    sh.error(format!("pagemap of slot {s}: {e}"));
                    continue;
                }
            };
            for (k, cpu) in map.iter().enumerate() {
                let Some(e) = dev.lookup(page_va(*base, k as u64)) else {
                    continue;
                };
                found += 1;
                let same = cpu.pfn == Some(e.frame_nr)
                    && (cpu.present || cpu.swap == Some(SwapKind::DevicePrivate));
                if !same {
                    sh.stale.fetch_add(1, Ordering::Relaxed);
                    sh.note(format!(
                        "device {d} maps frame {} at page {} of slot {s}, the CPU maps {:?}",
                        e.frame_nr, k, cpu.pfn
                    ));
                }
            }
        }
        let all = dev.nr_mapped() as u64;
        if all != found {
            sh.stale.fetch_add(all - found.min(all), Ordering::Relaxed);
            sh.note(format!(
                "device {d} maps {all} pages, {found} of them inside the region"
            ));
        }
    }
    match sh.mm.audit() {
        Ok(report) => {
            // Device-private pages are the devices' memory, not RAM.
            let allocated = sh.allocated() - sh.baseline_allocated;
            let in_ram = report.frames_referenced;
            if allocated != in_ram {
                sh.invariants.fetch_add(1, Ordering::Relaxed);
                sh.note(format!(
                    "{allocated} frames of RAM allocated, {in_ram} referenced by the process ({report:?})"
                ));
            }
        }
        Err(e) => {
            sh.invariants.fetch_add(1, Ordering::Relaxed);
            sh.note(format!("audit: {e}"));
        }
    }
    for (s, (slot, base)) in sh.region.slots.iter().zip(&bases).enumerate() {
        let versions: Vec<u64> = slot.pages.iter().map(|v| *v.lock()).collect();
        check_slot(sh, &sh.mm, s, *base, &versions, "check");
    }
}

/// The report of the run so far.
fn report(sh: &Shared, config: Config, checks: u64, started: Instant, stuck: &[String]) -> Report {
    let ops_by_kind: BTreeMap<&'static str, u64> = OPS
        .iter()
        .map(|(name, op)| (*name, sh.ops[*op as usize].load(Ordering::Relaxed)))
        .collect();
    let mut failures = sh.failures.lock().clone();
    failures.extend(stuck.iter().map(|s| format!("stuck: {s}")));
    Report {
        schema_version: SCHEMA_VERSION,
        config,
        seconds: started.elapsed().as_secs_f64(),
        ops: ops_by_kind.values().sum(),
        ops_by_kind,
        checks,
        corrupted_bytes: sh.corrupted.load(Ordering::Relaxed),
        leaked_frames: 0,
        stale_mirror_entries: sh.stale.load(Ordering::Relaxed),
        invariant_failures: sh.invariants.load(Ordering::Relaxed),
        unexpected_errors: sh.errors.load(Ordering::Relaxed),
        injected_failures: sh.fault_attrs().iter().map(|a| a.stats().injected).sum(),
        oom_failures: sh.oom.load(Ordering::Relaxed),
        thp_collapse_no_memory: sh.collapse_no_memory.load(Ordering::Relaxed),
        busy_failures: sh.busy.load(Ordering::Relaxed),
        thp_areas_moved_whole: sh.thps_whole.load(Ordering::Relaxed),
        thp_collapses: sh.mm.stats().thp_collapse,
        thp_splits: sh.mm.stats().thp_split_folio,
        mthp_faults: sh.mm.stats().faults.mthp_anon,
        interrupted: interrupt::requested(),
        deadlocks: u64::from(!stuck.is_empty()),
        failures,
    }
}

/// The slots for `pages` pages and `thps` THP areas: those the churn thread moves (at
/// least one), and all of them.
fn slots(pages: u64, thps: u64) -> (u64, u64) {
    let churn_slots = pages.div_ceil(SLOT_PAGES).max(1);
    (churn_slots, churn_slots + thps * (PMD_NR / SLOT_PAGES))
}

/// Simulated RAM for a region of `bytes`: the region, as much again for forks' copies and
/// pages coming back from the devices, and some to spare.
fn ram_bytes(bytes: u64) -> u64 {
    round_2m(2 * bytes) + 64 * MIB
}

/// What a run over `pages` pages and `thps` THP areas needs: the region in RAM and on the
/// devices, forks' copies, the harness's records; about 2.4 times the region measured,
/// counted as 4.
pub(crate) fn need(pages: u64, thps: u64) -> Need {
    let bytes = slots(pages, thps).1 * SLOT_BYTES;
    Need {
        ram: ram_bytes(bytes),
        host: 4 * bytes + 128 * MIB,
    }
}

/// The process, its region (every page at version 0), the two devices mirroring it and
/// the buffers of the device and migration threads.
fn build(
    cfg: &Config,
) -> Result<(Shared, DmirrorDriver, Vec<VirtAddr>), Box<dyn std::error::Error>> {
    let (churn_slots, nslots) = slots(cfg.pages, cfg.thps);
    let bytes = nslots * SLOT_BYTES;
    let phys = PhysMem::new(PhysConfig::with_size(ram_bytes(bytes)))?;
    // Swap as large as the region: reclaim can write every page of it out.
    phys.swapon(round_2m(bytes))?;
    let baseline_allocated = {
        let s = phys.stats();
        s.nr_frames - s.nr_free
    };
    let driver = DmirrorDriver::new(
        &phys,
        DmirrorConfig {
            // Room for the whole region and as much again, so that free 2 MiB blocks
            // for device THPs remain among the scattered 4 KiB pages.
            chunk_bytes: 2 * round_2m(bytes),
            max_chunks: 2,
        },
    );
    let mm = Mm::new(phys.clone());
    let small = churn_slots * SLOT_BYTES;
    let base = mm.mmap(None, small, RW, MapFlags::PRIVATE)?;
    if cfg.mthp {
        // Folios of up to a slot (64 KiB): the address space's PMD-size mode is madvise,
        // and these slots are not MADV_HUGEPAGE, so no 2 MiB THP forms here.
        for order in 2..=4 {
            mm.set_mthp_mode(order, hmm::mm::MthpMode::Always)?;
        }
    } else {
        mm.madvise(base, small, Advice::NoHugePage)?;
    }
    // A mapping of at least 2 MiB is 2 MiB aligned; one more page keeps it non-empty.
    let thp_bytes = cfg.thps * PMD_SIZE;
    let thp_base = mm.mmap(None, thp_bytes.max(PAGE_SIZE), RW, MapFlags::PRIVATE)?;
    if cfg.thps > 0 {
        assert!(thp_base.is_aligned(PMD_SIZE), "THP areas are 2 MiB aligned");
        mm.madvise(thp_base, thp_bytes, Advice::HugePage)?;
    }
    let at = |b: VirtAddr, s: u64| b.checked_add(s * SLOT_BYTES).expect("inside");
    let bases = (0..churn_slots)
        .map(|s| at(base, s))
        .chain((0..nslots - churn_slots).map(|s| at(thp_base, s)));
    let region = Region::new(nslots, bases);
    for (s, slot) in region.slots.iter().enumerate() {
        for k in 0..SLOT_PAGES {
            mm.write(
                page_va(*slot.base.read(), k),
                &content(Region::index(s, k), 0),
            )?;
        }
    }
    // One buffer per device thread and one for the migrator, left out of forks
    // (`MADV_DONTFORK`, as drivers ask of their transfer buffers) and pinned (as a driver
    // registers a DMA buffer): neither a fork nor reclaim makes the driver's copy to or
    // from them fault, so they never run out of memory.
    // The migrator's is large enough for the read-back of a whole THP area.
    let lens = [RUN, RUN, if cfg.thps > 0 { PMD_NR } else { RUN }].map(|n| n * PAGE_SIZE);
    let bufs: Vec<VirtAddr> = lens
        .iter()
        .map(|&len| mm.mmap(None, len, RW, MapFlags::PRIVATE))
        .collect::<Result<_, _>>()?;
    for (b, len) in bufs.iter().zip(lens) {
        mm.madvise(*b, len, Advice::NoHugePage)?;
        mm.madvise(*b, len, Advice::DontFork)?;
        mm.write(*b, &vec![0u8; len as usize])?;
    }
    let buffer_pins = bufs
        .iter()
        .zip(lens)
        .map(|(b, len)| {
            mm.pin_user_pages(*b, len / PAGE_SIZE, GupFlags::WRITE | GupFlags::LONGTERM)
        })
        .collect::<Result<_, _>>()?;
    let devs = [
        Dmirror::open(driver.device(0), &mm)?,
        Dmirror::open(driver.device(1), &mm)?,
    ];
    let sh = Shared {
        phys,
        mm,
        buffer_pins,
        devs,
        region,
        churn_slots: churn_slots as usize,
        thp_base,
        thps: cfg.thps,
        mthp: cfg.mthp,
        thps_whole: AtomicU64::new(0),
        world: RwLock::new(()),
        stop: AtomicBool::new(false),
        ops: Default::default(),
        corrupted: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        invariants: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        oom: AtomicU64::new(0),
        collapse_no_memory: AtomicU64::new(0),
        busy: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        baseline_allocated,
        last_writer: (0..nslots * SLOT_PAGES)
            .map(|_| Mutex::new("set-up"))
            .collect(),
    };

    Ok((sh, driver, bufs))
}

/// Runs the stress for `cfg`; returns its report (`Err` only if set-up fails).
pub(crate) fn run(cfg: Config) -> Result<Report, Box<dyn std::error::Error>> {
    if cfg.threads == 0 || !(cfg.seconds > 0.0 && cfg.seconds <= MAX_SECONDS) {
        return Err("--threads and --seconds must be positive (--seconds at most a year)".into());
    }
    if cfg.fail_alloc > 50 {
        return Err("--fail-alloc is a percent from 0 to 50".into());
    }
    let (sh, driver, bufs) = build(&cfg)?;
    if cfg.fail_alloc > 0 {
        for (i, attr) in sh.fault_attrs().into_iter().enumerate() {
            attr.set(FaultConfig::random(
                cfg.fail_alloc,
                mix(cfg.seed ^ i as u64),
            ))?;
        }
    }
    let phys = sh.phys.clone();
    let baseline_allocated = sh.baseline_allocated;
    let mut hearts: Vec<Heart> = (0..cfg.threads)
        .map(|t| Heart::new(format!("cpu {t}")))
        .collect();
    hearts.extend(["device 0", "device 1", "migrator", "churn", "checker"].map(Heart::new));
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let mut checks = 0u64;
    let stuck = std::thread::scope(|scope| {
        let (sh, hearts, done) = (&sh, &hearts, &done);
        let dog = std::thread::Builder::new()
            .spawn_scoped(scope, move || watchdog::watch(hearts, done, STALL))?;
        let t = cfg.threads;
        let mut jobs: Vec<Box<dyn FnOnce() + Send + '_>> = Vec::new();
        for (i, heart) in hearts[..t].iter().enumerate() {
            jobs.push(Box::new(move || {
                cpu(sh, heart, Rng::new(cfg.seed, i as u64))
            }));
        }
        for d in 0..2 {
            let buf = bufs[d];
            jobs.push(Box::new(move || {
                device(
                    sh,
                    d,
                    buf,
                    &hearts[t + d],
                    Rng::new(cfg.seed, (t + d) as u64),
                )
            }));
        }
        let mbuf = bufs[2];
        jobs.push(Box::new(move || {
            migrator(sh, mbuf, &hearts[t + 2], Rng::new(cfg.seed, (t + 2) as u64))
        }));
        jobs.push(Box::new(move || {
            churn(sh, &hearts[t + 3], Rng::new(cfg.seed, (t + 3) as u64))
        }));
        // A thread the host will not start stops the run before it begins: the
        // threads already started finish their operation in hand and are joined.
        let mut workers = Vec::new();
        let mut refused = None;
        for job in jobs {
            match std::thread::Builder::new().spawn_scoped(scope, job) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let checker = &hearts[t + 4];
        let deadline = match refused {
            None => started + Duration::from_secs_f64(cfg.seconds),
            Some(_) => started,
        };
        let mut next = Instant::now() + CHECK_EVERY;
        let running =
            || Instant::now() < deadline || (refused.is_none() && !sh.each_ran(cfg.min_each));
        while running() && !dog.is_finished() && !interrupt::requested() {
            std::thread::sleep(Duration::from_millis(50));
            checker.beat();
            if Instant::now() >= next {
                checker.doing("stop-the-world check");
                // Waits for the world in slices, so that a thread stuck while holding
                // it for reading is reported by the watchdog instead of hanging here.
                if let Some(world) = sh.world.try_write_for(Duration::from_millis(100)) {
                    check_world(sh, world);
                    checks += 1;
                    next = Instant::now() + CHECK_EVERY;
                }
            }
        }
        sh.stop.store(true, Ordering::Relaxed);
        // The workers finish their operation in hand; one that never does (or already
        // did not) is the watchdog's to report, so wait for either.
        while !workers.iter().all(|w| w.is_finished()) {
            if dog.is_finished() {
                // Deadlocked threads can be neither joined nor torn down: report and
                // leave (or wait for a debugger).
                let stuck = dog.join().expect("watchdog");
                report(sh, cfg.clone(), checks, started, &stuck).emit();
                if std::env::var_os("HMM_STRESS_HOLD").is_some() {
                    errln!("holding process {} for a debugger", std::process::id());
                    loop {
                        std::thread::park();
                    }
                }
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for w in workers {
            w.join().expect("a stress thread panicked");
        }
        if let Some(e) = refused {
            done.store(true, Ordering::Release);
            dog.join().expect("watchdog");
            return Err(e);
        }
        // The final check and the teardown run with every allocation succeeding.
        for attr in sh.fault_attrs() {
            attr.disable();
        }
        checker.doing("final check");
        check_world(sh, sh.world.write());
        checks += 1;
        done.store(true, Ordering::Release);
        Ok(dog.join().expect("watchdog"))
    })
    .map_err(|e| {
        format!(
            "cannot start the {} threads of the run (--threads {} and 5 more): {e}",
            cfg.threads + 5,
            cfg.threads
        )
    })?;
    debug_assert!(stuck.is_empty(), "a deadlock exits above");
    let mut report = report(&sh, cfg, checks, started, &stuck);
    // Teardown: the mirrors, the process, the devices' memory; then every frame must be
    // free again.
    let Shared {
        mm,
        devs,
        buffer_pins,
        ..
    } = sh;
    drop(buffer_pins);
    drop(devs);
    drop(mm);
    drop(driver);
    let s = phys.stats();
    report.leaked_frames = (s.nr_frames - s.nr_free).saturating_sub(baseline_allocated);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_finds_a_corrupted_page_and_an_unaccounted_frame() {
        let cfg = Config {
            seconds: 1.0,
            min_each: 0,
            threads: 1,
            seed: 1,
            pages: 32,
            fail_alloc: 0,
            thps: 1,
            // The page slots start as multi-size THPs: the checks see through them.
            mthp: true,
            json: false,
        };
        let (sh, _driver, _bufs) = build(&cfg).unwrap();
        assert!(sh.mm.stats().faults.mthp_anon > 0);
        check_world(&sh, sh.world.write());
        assert_eq!(sh.corrupted.load(Ordering::Relaxed), 0);
        assert_eq!(sh.invariants.load(Ordering::Relaxed), 0);
        assert_eq!(sh.stale.load(Ordering::Relaxed), 0);

        // A byte changed behind the harness's back.
        let page = page_va(*sh.region.slots[1].base.read(), 3);
        sh.mm
            .write_val(page.checked_add(100).unwrap(), 0x5au8)
            .unwrap();
        check_world(&sh, sh.world.write());
        assert_eq!(sh.corrupted.load(Ordering::Relaxed), 1);

        // A frame allocated that nothing maps.
        let held = sh.phys.alloc(0, hmm::phys::FrameFlags::empty()).unwrap();
        check_world(&sh, sh.world.write());
        assert_eq!(sh.invariants.load(Ordering::Relaxed), 1);
        drop(held);
        assert!(sh.failures.lock().len() >= 2);
    }
}
