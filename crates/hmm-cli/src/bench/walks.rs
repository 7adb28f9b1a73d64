//! `hmm bench walks`: what migrate-on-fault saves. A driver (device 0) wants a range on
//! its device, but a fraction of the pages is held by another device (device 1, dmirror):
//! those cannot migrate until a CPU-side fault brings them home (device 1's
//! `migrate_to_ram`). Three ways to get every page over, timed on the same range:
//!
//! - `fault_then_migrate`: `hmm_range_fault` (`REQ_FAULT`) over the range, then
//!   `migrate_vma` (two passes);
//! - `migrate_fault_migrate`: `migrate_vma`, then `hmm_range_fault` on the pages that did
//!   not move (per-page `REQ_FAULT`), then `migrate_vma` again (three passes);
//! - `one_walk`: `hmm_range_fault_migrate` (`REQ_FAULT | REQ_MIGRATE`), then
//!   `migrate_hmm_range_setup` (one pass).
//!
//! `hmm_range_fault` runs in the driver loop: a `Busy` return starts it again from
//! `read_begin`, and each of those calls is a pass too. Device 1's migrations back to RAM
//! invalidate device 0's notifier (their MIGRATE events carry device 1's owner), so the
//! two-step methods pay `Busy` retries; the migrating walk has no collision check to fail
//! (see `hmm::migrate::on_fault`). `walks` is the passes counted by the address space
//! ([`RangeWalkStats::total`](hmm::stats::RangeWalkStats::total)); device 1's own
//! fault-handler migrations are not in it.
//!
//! Every round starts from the same state (the range filled with a fresh pattern, the
//! chosen pages moved to device 1), times the method alone (faults, copies, walks), then
//! checks that every page is on device 0 with its bytes, and moves everything back
//! untimed. Methods take turns round by round, each round starting with the next method
//! so that none always runs first; `ns_per_page` is the fastest round (the median is given
//! too), and `one_walk_time_ratio` compares `one_walk` with the row's method round by
//! round ([`PairedRatio`]), which cancels most of the shared machine's noise.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm::addr::{DevicePfn, VirtAddr, PAGE_SIZE};
use hmm::migrate::{
    hmm_range_fault_migrate, migrate_hmm_range_setup, migrate_vma_setup, MigrateVma,
    MigrateVmaFlags,
};
use hmm::mm::{Advice, MapFlags, Mm, Prot, SwapKind};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent,
    NotifierRange, Owner,
};
use hmm::phys::{PhysConfig, PhysMem};
use hmm::range_fault::{hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, HmmDmirrorCmd};
use parking_lot::Mutex;
use serde::Serialize;

use super::median;
use super::migrate::copy_and_commit;
use super::paired::PairedRatio;
use crate::interrupt;
use crate::limits::{round_2m, Need, MIB};

/// The methods, in the order they take turns.
pub(crate) const METHODS: [&str; 3] = ["fault_then_migrate", "migrate_fault_migrate", "one_walk"];

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WalkRow {
    method: &'static str,
    nonpresent_fraction: f64,
    /// Passes over the range (Busy retries of `hmm_range_fault` included).
    walks: u64,
    /// `hmm_range_fault` calls that returned `Busy` and were started again.
    busy_retries: u64,
    /// CPU faults on device 1's pages (each one a `migrate_to_ram` copy home).
    faults: u64,
    pages_migrated: u64,
    /// Pages copied: device 1's copies home plus the copies to device 0.
    copies: u64,
    /// The fastest round, per page: the work is the same every round, so slower rounds
    /// measure the shared machine's interference, not the method.
    ns_per_page: f64,
    /// The median round, per page.
    median_ns_per_page: f64,
    /// The baseline of the same run: one pass (`hmm_range_fault` snapshot) over the range,
    /// all pages present, per page: what each extra walk costs.
    pass_ns_per_page: f64,
    /// `one_walk`'s time over this method's in the same round (below 1: `one_walk` is
    /// faster), the median of the rounds with its 95% interval; absent on `one_walk`'s row.
    #[serde(skip_serializing_if = "Option::is_none")]
    one_walk_time_ratio: Option<PairedRatio>,
}

impl WalkRow {
    pub(crate) fn method(&self) -> &'static str {
        self.method
    }

    pub(crate) fn fraction(&self) -> f64 {
        self.nonpresent_fraction
    }

    pub(crate) fn walks(&self) -> u64 {
        self.walks
    }

    pub(crate) fn pass_ns_per_page(&self) -> f64 {
        self.pass_ns_per_page
    }

    pub(crate) fn one_walk_time_ratio(&self) -> Option<&PairedRatio> {
        self.one_walk_time_ratio.as_ref()
    }
}

/// Device 0's notifier: records every event's sequence under its lock, except its own
/// MIGRATE events (the seed series' owner filter).
struct Driver {
    owner: Owner,
    lock: Mutex<()>,
}

impl IntervalNotifierOps for Driver {
    fn invalidate(&self, sub: &IntervalSub, r: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        if r.event == NotifierEvent::Migrate && r.owner == Some(self.owner) {
            return true;
        }
        let _g = self.lock.lock();
        sub.set_seq(cur_seq);
        true
    }
}

/// Device 0's memory: the benchmark migrates to it and back itself, no CPU faults.
struct Memory;

impl DevPagemapOps for Memory {}

struct Rig {
    phys: Arc<PhysMem>,
    mm: Arc<Mm>,
    _driver: DmirrorDriver,
    d1: Arc<Dmirror>,
    dev0: Arc<DevPagemap>,
    notifier: IntervalNotifier,
    base: VirtAddr,
    npages: u64,
    /// The user buffer of device 1's commands.
    buf: VirtAddr,
}

/// Simulated RAM for a range of `npages` pages: the range, device 1's copies coming
/// home, device 0's migrations back, and some to spare.
fn ram_bytes(npages: u64) -> u64 {
    3 * round_2m(npages * PAGE_SIZE) + 32 * MIB
}

/// What a range of `npages` pages needs: the RAM and device 0's memory (committed up
/// front), device 1's, and a round's patterns; about 5.7 times the range measured,
/// counted as 7.
pub(crate) fn need(npages: u64) -> Need {
    Need {
        ram: ram_bytes(npages),
        host: 7 * npages * PAGE_SIZE + 96 * MIB,
    }
}

impl Rig {
    fn new(npages: u64) -> Result<Rig, Box<dyn Error>> {
        let bytes = npages * PAGE_SIZE;
        let chunk = round_2m(bytes);
        let phys = PhysMem::new(PhysConfig {
            size_bytes: ram_bytes(npages),
            prefault: true,
            per_cpu_lists: true,
        })?;
        let driver = DmirrorDriver::new(
            &phys,
            DmirrorConfig {
                chunk_bytes: chunk,
                max_chunks: 2,
            },
        );
        let owner = Owner::new_unique();
        let dev0 = memremap_pages(
            &phys,
            PagemapConfig {
                kind: MemoryType::DevicePrivate,
                owner,
                size_bytes: chunk + (4 << 20),
            },
            Arc::new(Memory),
        )?;
        dev0.prefault();
        let mm = Mm::new(phys.clone());
        let base = mm.mmap(None, bytes, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
        mm.madvise(base, bytes, Advice::NoHugePage)?;
        let buf = mm.mmap(None, bytes, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
        let notifier = mm.interval_notifier_insert(
            base,
            bytes,
            Arc::new(Driver {
                owner,
                lock: Mutex::new(()),
            }),
        )?;
        let d1 = Dmirror::open(driver.device(1), &mm)?;
        Ok(Rig {
            phys,
            mm,
            _driver: driver,
            d1,
            dev0,
            notifier,
            base,
            npages,
            buf,
        })
    }

    fn page(&self, i: u64) -> VirtAddr {
        self.base
            .checked_add(i * PAGE_SIZE)
            .expect("inside the range")
    }

    fn end(&self) -> VirtAddr {
        self.page(self.npages)
    }

    fn owner(&self) -> Owner {
        self.dev0.owner()
    }

    /// A migration of the whole range by device 0 with `flags`.
    fn args(&self, flags: MigrateVmaFlags) -> MigrateVma {
        MigrateVma {
            start: self.base,
            end: self.end(),
            pgmap_owner: Some(self.owner()),
            flags,
            fault_page: None,
        }
    }

    /// The whole range with device 0's notifier, owner and a fresh sequence.
    fn range<'a>(
        &'a self,
        pfns: &'a mut [HmmPfn],
        default_flags: HmmPfnFlags,
        pfn_flags_mask: HmmPfnFlags,
    ) -> HmmRange<'a> {
        HmmRange {
            notifier: &self.notifier,
            notifier_seq: self.notifier.read_begin(),
            start: self.base,
            end: self.end(),
            hmm_pfns: pfns,
            default_flags,
            pfn_flags_mask,
            dev_private_owner: Some(self.owner()),
        }
    }

    /// Fills the range with round `round`'s bytes and moves the pages `held` picks to
    /// device 1.
    fn prepare(&self, round: u64, held: &[bool]) -> Result<(), Box<dyn Error>> {
        self.mm.write(self.base, &pattern(self.npages, round))?;
        let mut i = 0;
        while i < self.npages {
            if !held[i as usize] {
                i += 1;
                continue;
            }
            let run = (i..self.npages).take_while(|&j| held[j as usize]).count() as u64;
            let mut c = HmmDmirrorCmd {
                addr: self.page(i).as_u64(),
                ptr: self.buf.as_u64(),
                npages: run,
                ..HmmDmirrorCmd::default()
            };
            self.d1.ioctl(DmirrorCmd::MigrateToDev, &mut c)?;
            i += run;
        }
        Ok(())
    }

    /// Checks that every page is on device 0 with round `round`'s bytes; returns the
    /// pages there.
    fn verify(&self, round: u64) -> Result<u64, Box<dyn Error>> {
        let want = pattern(self.npages, round);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut on_dev0 = 0;
        for (i, e) in self.mm.pagemap(self.base, self.npages)?.iter().enumerate() {
            let at = i * PAGE_SIZE as usize;
            let pfn = match (e.swap, e.pfn) {
                (Some(SwapKind::DevicePrivate), Some(pfn)) => DevicePfn::new(pfn),
                _ => return Err(format!("page {i} is not on a device").into()),
            };
            if self.phys.pagemap_of(pfn.as_u64()).map(|p| p.id()) != Some(self.dev0.id()) {
                return Err(format!("page {i} is on another device").into());
            }
            self.phys.device_frame(pfn).read(0, &mut page);
            if page != want[at..at + PAGE_SIZE as usize] {
                return Err(format!("page {i} has the wrong bytes").into());
            }
            on_dev0 += 1;
        }
        Ok(on_dev0)
    }

    /// Brings every page of device 0 back to system memory.
    fn reset(&self) -> Result<(), Box<dyn Error>> {
        let mmap = self.mm.mmap_read();
        let m = migrate_vma_setup(&mmap, self.args(MigrateVmaFlags::SELECT_DEVICE_PRIVATE))?;
        copy_and_commit(m, &self.phys, None)?;
        Ok(())
    }

    /// The driver loop's fault step: `hmm_range_fault` with `requests` until it is not
    /// `Busy`; the result is not mirrored (the pages are about to migrate), so no
    /// `read_retry`. Returns the Busy retries.
    fn fault(&self, requests: &[HmmPfn]) -> Result<u64, Box<dyn Error>> {
        let mut pfns = requests.to_vec();
        let mut retries = 0;
        loop {
            pfns.copy_from_slice(requests);
            let mut range = self.range(&mut pfns, HmmPfnFlags::empty(), HmmPfnFlags::REQ_FAULT);
            let mmap = self.mm.mmap_read();
            match hmm_range_fault(&mmap, &mut range) {
                Ok(()) => return Ok(retries),
                Err(HmmError::Busy) => retries += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `migrate_vma` of the whole range to device 0; returns the pages migrated and the
    /// indices of the pages that did not move.
    fn migrate(&self) -> Result<(u64, Vec<usize>), Box<dyn Error>> {
        let mmap = self.mm.mmap_read();
        let m = migrate_vma_setup(&mmap, self.args(MigrateVmaFlags::SELECT_SYSTEM))?;
        let left: Vec<usize> = (0..m.src().len())
            .filter(|&i| !m.src()[i].is_migrating())
            .collect();
        Ok((copy_and_commit(m, &self.phys, Some(&self.dev0))?, left))
    }

    /// The median time of one snapshot pass over the range (no faults), per page.
    fn pass_ns_per_page(&self, iters: usize) -> Result<f64, Box<dyn Error>> {
        self.mm.write(self.base, &pattern(self.npages, 0))?;
        let mut pfns = vec![HmmPfn::default(); self.npages as usize];
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let mut range = self.range(&mut pfns, HmmPfnFlags::empty(), HmmPfnFlags::empty());
            let mmap = self.mm.mmap_read();
            let t = Instant::now();
            hmm_range_fault(&mmap, &mut range)?;
            times.push(t.elapsed());
        }
        Ok(median(times).as_nanos() as f64 / self.npages as f64)
    }

    /// Runs `method`; returns the Busy retries.
    fn run(&self, method: &str) -> Result<u64, Box<dyn Error>> {
        match method {
            "fault_then_migrate" => {
                let all = vec![HmmPfn::request(HmmPfnFlags::REQ_FAULT); self.npages as usize];
                let retries = self.fault(&all)?;
                self.migrate()?;
                Ok(retries)
            }
            "migrate_fault_migrate" => {
                let (_, left) = self.migrate()?;
                if left.is_empty() {
                    return Ok(0);
                }
                let mut requests = vec![HmmPfn::default(); self.npages as usize];
                for i in left {
                    requests[i] = HmmPfn::request(HmmPfnFlags::REQ_FAULT);
                }
                let retries = self.fault(&requests)?;
                self.migrate()?;
                Ok(retries)
            }
            "one_walk" => {
                let mut pfns = vec![HmmPfn::default(); self.npages as usize];
                let mmap = self.mm.mmap_read();
                let mut range = self.range(
                    &mut pfns,
                    HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_MIGRATE,
                    HmmPfnFlags::empty(),
                );
                let collected =
                    hmm_range_fault_migrate(&mmap, &mut range, MigrateVmaFlags::SELECT_SYSTEM)?;
                copy_and_commit(
                    migrate_hmm_range_setup(collected),
                    &self.phys,
                    Some(&self.dev0),
                )?;
                Ok(0)
            }
            other => Err(format!("unknown method {other}").into()),
        }
    }
}

/// Round `round`'s bytes for `npages` pages.
fn pattern(npages: u64, round: u64) -> Vec<u8> {
    (0..npages * PAGE_SIZE)
        .map(|i| (i ^ (i >> 12).wrapping_mul(131) ^ round.wrapping_mul(29)) as u8)
        .collect()
}

/// Which pages device 1 holds: `fraction` of them, spread evenly.
fn held(npages: u64, fraction: f64) -> Vec<bool> {
    (0..npages)
        .map(|i| ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor())
        .collect()
}

/// One method's measurements at one fraction.
#[derive(Default)]
struct Tally {
    times: Vec<Duration>,
    walks: u64,
    busy_retries: u64,
    faults: u64,
    migrated: u64,
}

/// `hmm bench walks`: one row per fraction and method. After a Ctrl-C ([`interrupt`]),
/// the fraction in hand ends after the round in hand and no more are measured.
pub(crate) fn walk_rows(
    npages: u64,
    fractions: &[f64],
    iters: usize,
    mut progress: impl FnMut(&WalkRow),
) -> Result<Vec<WalkRow>, Box<dyn Error>> {
    if npages == 0 || iters == 0 {
        return Err("--pages and --iters must be at least 1".into());
    }
    if let Some(f) = fractions.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        return Err(format!("fraction {f} is not between 0 and 1").into());
    }
    let rig = Rig::new(npages)?;
    let pass_ns = rig.pass_ns_per_page(iters.max(9))?;
    let mut rows = Vec::new();
    let mut round = 0;
    for &fraction in fractions {
        if interrupt::requested() {
            break;
        }
        let held = held(npages, fraction);
        let mut tallies: Vec<Tally> = METHODS.iter().map(|_| Tally::default()).collect();
        // One untimed round of each method first (warm caches, device memory touched).
        for r in 0..=iters {
            // Every method has at least one timed round.
            if r > 1 && interrupt::requested() {
                break;
            }
            for k in 0..METHODS.len() {
                let m = (r + k) % METHODS.len();
                let tally = &mut tallies[m];
                round += 1;
                rig.prepare(round, &held)?;
                let before = rig.mm.stats();
                let t = Instant::now();
                let retries = rig.run(METHODS[m])?;
                let elapsed = t.elapsed();
                let d = rig.mm.stats().since(&before);
                let migrated = rig.verify(round)?;
                rig.reset()?;
                if r > 0 {
                    tally.times.push(elapsed);
                    tally.walks = d.range_walks.total();
                    tally.busy_retries = retries;
                    tally.faults = d.faults.device_private;
                    tally.migrated = migrated;
                }
            }
        }
        let one_walk = &tallies[METHODS.len() - 1].times;
        for (method, tally) in METHODS.iter().zip(&tallies) {
            let row = WalkRow {
                method,
                nonpresent_fraction: fraction,
                walks: tally.walks,
                busy_retries: tally.busy_retries,
                faults: tally.faults,
                pages_migrated: tally.migrated,
                copies: tally.migrated + tally.faults,
                ns_per_page: tally.times.iter().min().expect("iters > 0").as_nanos() as f64
                    / npages as f64,
                median_ns_per_page: median(tally.times.clone()).as_nanos() as f64 / npages as f64,
                pass_ns_per_page: pass_ns,
                one_walk_time_ratio: (*method != "one_walk")
                    .then(|| PairedRatio::new(one_walk, &tally.times))
                    .flatten(),
            };
            progress(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Prints rows as a table.
pub(crate) fn print_table(rows: &[WalkRow]) {
    outln!(
        "{:>22} {:>9} {:>6} {:>6} {:>7} {:>9} {:>7} {:>8} {:>8}  one_walk/this [95%]",
        "method",
        "fraction",
        "walks",
        "busy",
        "faults",
        "migrated",
        "copies",
        "ns/page",
        "median",
    );
    for r in rows {
        let ratio = r
            .one_walk_time_ratio
            .map_or(String::new(), |p| format!("{p:.3}"));
        outln!(
            "{:>22} {:>9.2} {:>6} {:>6} {:>7} {:>9} {:>7} {:>8.0} {:>8.0}  {}",
            r.method,
            r.nonpresent_fraction,
            r.walks,
            r.busy_retries,
            r.faults,
            r.pages_migrated,
            r.copies,
            r.ns_per_page,
            r.median_ns_per_page,
            ratio
        );
    }
    if let Some(r) = rows.first() {
        outln!(
            "one pass over the range, all pages present: {:.1} ns/page",
            r.pass_ns_per_page
        );
    }
}
