//! `hmm bench migrate`: migration throughput against plain memcpy of the same bytes, in
//! the same run.
//!
//! For each size, with 4 KiB pages or THPs: a private region is filled, migrated to a
//! device-private pagemap (`sys_to_dev`) and back (`dev_to_sys`) through `migrate_vma`
//! (setup, copy, pages, finalize, 512 pages per call as the reference driver does). THPs
//! migrate as units (`SELECT_COMPOUND`): each 2 MiB goes to one device THP and comes back
//! as one system THP. An untimed round trip comes first, so the device memory is as warm
//! as the baseline's buffers; every byte is checked after every round trip.
//!
//! The baseline is a plain `copy_from_slice` of the same number of bytes between two warm
//! buffers, timed in every round next to the migrations (before them in even rounds,
//! after them in odd ones). A row's `ratio` is the median over the rounds of memcpy's time
//! over the migration's time *in the same round*, with its interval ([`PairedRatio`]):
//! memcpy's own speed changes with the size on this host, and the shared machine's
//! interference changes from one moment to the next, so a ratio of medians taken at
//! different moments would measure the machine as much as the migration. `gbps` and
//! `memcpy_gbps` are the median rounds, for reference.
//!
//! Each row also says where a page's time goes: the time of each stage as a driver drives
//! it (`setup`: `migrate_vma_setup`; `alloc`: the destinations, handed over with `set_dst`;
//! `copy`: the batched copy; `pages`: `migrate_vma_pages`; `finalize`:
//! `migrate_vma_finalize`), summed over the timed rounds' calls (and threads) and divided
//! by the pages moved, beside memcpy's time for a page's bytes.
//!
//! `--threads N` migrates N slices of the region concurrently (and copies N slices for the
//! baseline); each round then also migrates the same region, and copies the same bytes, on
//! one thread, first or second in turn, and the row's `speedup` and `memcpy_speedup` are
//! the medians of the rounds' ratios of the one-thread time to the N-thread time, with
//! their intervals: the memcpy's says how far the machine itself scales.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_ORDER};
use hmm::migrate::{migrate_vma_setup, MigratePfnFlags, MigrateVma, MigrateVmaFlags, Migration};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::notifier::Owner;
use hmm::phys::{copy_folios, Frame, FrameFlags, PhysConfig, PhysMem};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};
use serde::Serialize;

use super::median;
use super::paired::PairedRatio;
use crate::interrupt;
use crate::limits::{round_2m, Need, MIB};

/// Pages per `migrate_vma` call.
const CHUNK_PAGES: u64 = 512;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MigrateRow {
    size_bytes: u64,
    thp: bool,
    direction: &'static str,
    threads: usize,
    /// The median round.
    gbps: f64,
    /// The median round of the memcpy baseline paired with this row's rounds.
    memcpy_gbps: f64,
    /// Migration's speed over memcpy's (memcpy's time over migration's), round by round:
    /// the median of the rounds and its interval.
    ratio: PairedRatio,
    /// With more than one thread: one thread's time over this row's, round by round on
    /// the same region (the median of the rounds and its interval).
    #[serde(skip_serializing_if = "Option::is_none")]
    speedup: Option<PairedRatio>,
    /// The same for the memcpy baseline: how far the machine itself scales.
    #[serde(skip_serializing_if = "Option::is_none")]
    memcpy_speedup: Option<PairedRatio>,
    /// Where a page's time goes, in ns per page (threads' times added).
    stages_ns_per_page: StageNs,
    /// The median memcpy round's time for one page's bytes, in ns.
    memcpy_ns_per_page: f64,
}

/// The time of each stage of a migration, summed over its `migrate_vma` calls.
#[derive(Debug, Clone, Copy, Default)]
struct Stages {
    setup: Duration,
    alloc: Duration,
    copy: Duration,
    pages: Duration,
    finalize: Duration,
}

impl std::ops::AddAssign for Stages {
    fn add_assign(&mut self, o: Stages) {
        self.setup += o.setup;
        self.alloc += o.alloc;
        self.copy += o.copy;
        self.pages += o.pages;
        self.finalize += o.finalize;
    }
}

/// [`Stages`] per page, in ns.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct StageNs {
    setup: f64,
    alloc: f64,
    copy: f64,
    pages: f64,
    finalize: f64,
}

impl StageNs {
    fn new(s: Stages, pages: u64) -> StageNs {
        let ns = |d: Duration| d.as_nanos() as f64 / pages.max(1) as f64;
        StageNs {
            setup: ns(s.setup),
            alloc: ns(s.alloc),
            copy: ns(s.copy),
            pages: ns(s.pages),
            finalize: ns(s.finalize),
        }
    }

    fn total(&self) -> f64 {
        self.setup + self.alloc + self.copy + self.pages + self.finalize
    }
}

impl MigrateRow {
    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub(crate) fn thp(&self) -> bool {
        self.thp
    }

    pub(crate) fn direction(&self) -> &'static str {
        self.direction
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    pub(crate) fn gbps(&self) -> f64 {
        self.gbps
    }

    pub(crate) fn memcpy_gbps(&self) -> f64 {
        self.memcpy_gbps
    }
}

/// The device of the benchmark: memory only, no CPU faults expected.
struct BenchDevice;

impl DevPagemapOps for BenchDevice {}

struct Setup {
    mm: Arc<Mm>,
    dev: Arc<DevPagemap>,
    base: VirtAddr,
    size: u64,
}

/// Simulated RAM for a region of `size` bytes: the region, room to bring it back from
/// the device, and some to spare.
fn ram_bytes(size: u64) -> u64 {
    round_2m(size) * 2 + 16 * MIB
}

/// What one size needs: the RAM and the device memory (both committed up front), the
/// data and its read-back, and the memcpy baseline's two buffers; about 5 times the
/// size measured, counted as 7.
pub(crate) fn need(size: u64) -> Need {
    Need {
        ram: ram_bytes(size),
        host: 7 * size + 64 * MIB,
    }
}

/// Whether a region of `size` bytes splits into `threads` slices of whole 2 MiB units
/// (threads sharing a THP would race to split it, and the loser would skip pages).
pub(crate) fn splits(size: u64, threads: usize) -> bool {
    threads == 1 || ((size / PAGE_SIZE).div_ceil(threads as u64) * PAGE_SIZE) % (2 << 20) == 0
}

fn setup(size: u64, thp: bool) -> Result<Setup, Box<dyn Error>> {
    let rounded = round_2m(size);
    let phys = PhysMem::new(PhysConfig {
        size_bytes: ram_bytes(size),
        prefault: true,
        per_cpu_lists: true,
    })?;
    let dev = memremap_pages(
        &phys,
        PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner: Owner::new_unique(),
            size_bytes: rounded + (4 << 20),
        },
        Arc::new(BenchDevice),
    )?;
    dev.prefault();
    let mm = Mm::new(phys);
    let base = mm.mmap(None, size, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
    let advice = if thp {
        Advice::HugePage
    } else {
        Advice::NoHugePage
    };
    mm.madvise(base, size, advice)?;
    Ok(Setup {
        mm,
        dev,
        base,
        size,
    })
}

fn byte(i: u64) -> u8 {
    (i ^ (i >> 12).wrapping_mul(31)) as u8
}

/// Migrates `[start, start + len)` to the device (`to_device`) or back, in chunks; returns
/// the pages moved and the time of each stage.
fn migrate(
    s: &Setup,
    start: VirtAddr,
    len: u64,
    to_device: bool,
) -> Result<(u64, Stages), Box<dyn Error>> {
    let mut stages = Stages::default();
    let mmap = s.mm.mmap_read();
    let phys = s.mm.phys();
    let mut moved = 0;
    let end = start.checked_add(len).ok_or("range overflows")?;
    let mut at = start;
    while at < end {
        let next = at
            .checked_add(CHUNK_PAGES * PAGE_SIZE)
            .map_or(end, |n| n.min(end));
        let flags = MigrateVmaFlags::SELECT_COMPOUND
            | if to_device {
                MigrateVmaFlags::SELECT_SYSTEM
            } else {
                MigrateVmaFlags::SELECT_DEVICE_PRIVATE
            };
        let t = Instant::now();
        let m = migrate_vma_setup(
            &mmap,
            MigrateVma {
                start: at,
                end: next,
                pgmap_owner: Some(s.dev.owner()),
                flags,
                fault_page: None,
            },
        )?;
        stages.setup += t.elapsed();
        moved += copy_and_commit_timed(m, phys, to_device.then_some(&*s.dev), &mut stages)?;
        at = next;
    }
    Ok((moved, stages))
}

/// Gives every migrating entry of `m` a destination, on `device` or (`None`) in system
/// memory, holding the source's bytes (zeros for a hole), then commits and finalizes;
/// returns the pages migrated. A unit (`COMPOUND`) gets one order-9 folio.
pub(crate) fn copy_and_commit(
    m: Migration<'_, '_>,
    phys: &PhysMem,
    device: Option<&DevPagemap>,
) -> Result<u64, Box<dyn Error>> {
    copy_and_commit_timed(m, phys, device, &mut Stages::default())
}

/// [`copy_and_commit`], adding the time of each stage after the setup to `stages`.
fn copy_and_commit_timed(
    mut m: Migration<'_, '_>,
    phys: &PhysMem,
    device: Option<&DevPagemap>,
    stages: &mut Stages,
) -> Result<u64, Box<dyn Error>> {
    let t = Instant::now();
    // The pages' destinations in one bulk allocation (`alloc_pages_bulk`), the units'
    // one by one.
    let small = m
        .src()
        .iter()
        .filter(|w| w.is_migrating() && w.npages() == 1)
        .count();
    let mut pages = match device {
        Some(dev) => dev.alloc_bulk(small, FrameFlags::empty()),
        None => phys
            .alloc_bulk(small, FrameFlags::empty())
            .into_iter()
            .map(Frame::lock)
            .collect(),
    }
    .into_iter();
    let mut alloc = |order| -> Result<_, Box<dyn Error>> {
        Ok(match (order, device) {
            (0, _) => pages.next().ok_or("out of memory for 4 KiB destinations")?,
            (_, Some(dev)) => dev.alloc(order, FrameFlags::empty())?,
            (_, None) => phys.alloc(order, FrameFlags::empty())?.lock(),
        })
    };
    // One batched copy of the sources (whole folios: a page or a unit's head), as a
    // driver hands its copy engine one list, done before the migration commits.
    let mut pairs = Vec::new();
    for i in 0..m.src().len() {
        let w = m.src()[i];
        if !w.is_migrating() {
            continue;
        }
        let dst = alloc(if w.npages() > 1 { PMD_ORDER } else { 0 })?;
        match m.src_page(i) {
            Some(src) => pairs.push((*dst, src)),
            None => (0..w.npages()).for_each(|k| dst.folio_page(k).zero()),
        }
        m.set_dst(
            i,
            dst,
            w.flags().contains(MigratePfnFlags::WRITE) || !w.is_valid(),
        )
        .map_err(|e| e.to_string())?;
    }
    let t = lap(t, &mut stages.alloc);
    copy_folios(&pairs);
    let t = lap(t, &mut stages.copy);
    let p = m.pages();
    let t = lap(t, &mut stages.pages);
    let migrated = p.finalize().migrated;
    lap(t, &mut stages.finalize);
    Ok(migrated)
}

/// Adds the time since `t` to `into`; returns now.
fn lap(t: Instant, into: &mut Duration) -> Instant {
    let now = Instant::now();
    *into += now - t;
    now
}

/// Runs `work(k)` for `k` in `0..n` on `n` threads started together (a barrier), and
/// returns the slowest thread's time measured from the barrier (thread start-up is not
/// timed) and the results.
fn timed_parallel<T: Send>(n: usize, work: impl Fn(usize) -> T + Sync) -> (Duration, Vec<T>) {
    let barrier = std::sync::Barrier::new(n);
    let out: Vec<(Duration, T)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|k| {
                let (work, barrier) = (&work, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let r = work(k);
                    (t.elapsed(), r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let slowest = out.iter().map(|(t, _)| *t).max().unwrap_or_default();
    (slowest, out.into_iter().map(|(_, r)| r).collect())
}

/// Migrates the region in `threads` equal page-aligned slices at once.
fn migrate_all(
    s: &Setup,
    threads: usize,
    to_device: bool,
) -> Result<(Duration, u64, Stages), Box<dyn Error>> {
    let pages = s.size / PAGE_SIZE;
    let per = pages.div_ceil(threads as u64);
    let (t, results) = timed_parallel(threads, |k| {
        let first = (k as u64 * per).min(pages);
        let n = per.min(pages - first);
        if n == 0 {
            return Ok((0, Stages::default()));
        }
        let start = s.base.checked_add(first * PAGE_SIZE).expect("inside");
        migrate(s, start, n * PAGE_SIZE, to_device).map_err(|e| e.to_string())
    });
    let (mut total, mut stages) = (0, Stages::default());
    for r in results {
        let (moved, st) = r?;
        total += moved;
        stages += st;
    }
    Ok((t, total, stages))
}

/// The baseline: `size` bytes copied between two warm buffers, in `threads` slices at
/// once (one per thread) or all on one thread.
struct Memcpy {
    src: Vec<u8>,
    per: usize,
    dst: Vec<std::sync::Mutex<Vec<u8>>>,
}

impl Memcpy {
    fn new(size: u64, threads: usize) -> Memcpy {
        let src: Vec<u8> = (0..size).map(byte).collect();
        let per = (size as usize).div_ceil(threads);
        let dst = src
            .chunks(per)
            .map(|c| std::sync::Mutex::new(vec![1u8; c.len()]))
            .collect();
        Memcpy { src, per, dst }
    }

    fn copy(&self, k: usize) {
        let mut d = self.dst[k].lock().expect("one thread per slice");
        let len = d.len();
        d.copy_from_slice(&self.src[k * self.per..k * self.per + len]);
        std::hint::black_box(&mut *d);
    }

    /// Times one copy of everything on `threads` threads (the slices) or one.
    fn time(&self, threads: usize) -> Duration {
        if threads == 1 {
            timed_parallel(1, |_| (0..self.dst.len()).for_each(|k| self.copy(k))).0
        } else {
            timed_parallel(self.dst.len(), |k| self.copy(k)).0
        }
    }
}

/// The thread counts of a round, in order: `threads` alone, or `threads` and one, the
/// first of them alternating from round to round.
fn runs(threads: usize, round: usize) -> Vec<usize> {
    match (threads, round % 2) {
        (1, _) => vec![1],
        (_, 0) => vec![threads, 1],
        _ => vec![1, threads],
    }
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// `hmm bench migrate`: one row per size, page kind and direction. After a Ctrl-C
/// ([`interrupt`]), the row in hand ends after the round in hand and no more are measured.
pub(crate) fn migrate_rows(
    sizes: &[u64],
    threads: usize,
    iters: usize,
    mut progress: impl FnMut(&MigrateRow),
) -> Result<Vec<MigrateRow>, Box<dyn Error>> {
    let mut rows = Vec::new();
    if threads == 0 || iters == 0 {
        return Err("--threads and --iters must be at least 1".into());
    }
    for &size in sizes {
        if interrupt::requested() {
            break;
        }
        let kib = size >> 10;
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(format!("size {kib} KiB is not a positive multiple of 4 KiB").into());
        }
        if !splits(size, threads) {
            return Err(format!(
                "size {kib} KiB does not split into {threads} slices of whole 2 MiB units"
            )
            .into());
        }
        let copier = Memcpy::new(size, threads);
        copier.time(threads); // warms both buffers
        for thp in [false, true] {
            // Per direction and for the memcpy, the times of every round on `threads`
            // threads and (when more) on one, each memcpy paired with the migrations of
            // its round.
            let mut to_dev = (Vec::new(), Vec::new());
            let mut to_sys = (Vec::new(), Vec::new());
            let mut copies = (Vec::new(), Vec::new());
            // The stages of the timed migrations on `threads` threads, and their pages.
            let (mut dev_stages, mut sys_stages, mut staged) =
                (Stages::default(), Stages::default(), 0);
            for round in 0..iters {
                if round > 0 && interrupt::requested() {
                    break;
                }
                let s = setup(size, thp)?;
                let data: Vec<u8> = (0..size).map(byte).collect();
                s.mm.write(s.base, &data)?;
                // One untimed round trip first, so device memory is as warm as the memcpy
                // buffers are.
                migrate_all(&s, threads, true)?;
                migrate_all(&s, threads, false)?;
                for n in runs(threads, round) {
                    // The memcpy goes before the migrations in even rounds, after them in
                    // odd ones, so neither always runs on a cache the other warmed.
                    let memcpy_first = round % 2 == 0;
                    let copy_before = memcpy_first.then(|| copier.time(n));
                    let (t, moved, st_dev) = migrate_all(&s, n, true)?;
                    if moved != size / PAGE_SIZE {
                        return Err(format!(
                            "{moved} of {} pages reached the device",
                            size / PAGE_SIZE
                        )
                        .into());
                    }
                    let (t_back, moved, st_sys) = migrate_all(&s, n, false)?;
                    if moved != size / PAGE_SIZE {
                        return Err(
                            format!("{moved} of {} pages came back", size / PAGE_SIZE).into()
                        );
                    }
                    let copy = copy_before.unwrap_or_else(|| copier.time(n));
                    if n == threads {
                        dev_stages += st_dev;
                        sys_stages += st_sys;
                        staged += moved;
                    }
                    let (dev, sys, cp) = if n == threads {
                        (&mut to_dev.0, &mut to_sys.0, &mut copies.0)
                    } else {
                        (&mut to_dev.1, &mut to_sys.1, &mut copies.1)
                    };
                    dev.push(t);
                    sys.push(t_back);
                    cp.push(copy);
                }
                let mut back = vec![0u8; size as usize];
                s.mm.read(s.base, &mut back)?;
                if back != data {
                    return Err("bytes changed across a round trip".into());
                }
            }
            let memcpy_time = median(copies.0.clone());
            let memcpy = gbps(size, memcpy_time);
            let memcpy_ns_per_page =
                memcpy_time.as_nanos() as f64 / (size / PAGE_SIZE) as f64 * threads as f64;
            let memcpy_speedup = PairedRatio::new(&copies.1, &copies.0);
            for (direction, (times, one), stages) in [
                ("sys_to_dev", to_dev, dev_stages),
                ("dev_to_sys", to_sys, sys_stages),
            ] {
                let row = MigrateRow {
                    size_bytes: size,
                    thp,
                    direction,
                    threads,
                    gbps: gbps(size, median(times.clone())),
                    memcpy_gbps: memcpy,
                    ratio: PairedRatio::new(&copies.0, &times).ok_or("no rounds")?,
                    speedup: PairedRatio::new(&one, &times),
                    memcpy_speedup,
                    stages_ns_per_page: StageNs::new(stages, staged),
                    memcpy_ns_per_page,
                };
                progress(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Prints rows as a table.
pub(crate) fn print_table(rows: &[MigrateRow]) {
    outln!(
        "{:>10} {:>5} {:>11} {:>7} {:>9} {:>11}  {:<24} {:<26} memcpy's speedup",
        "size",
        "thp",
        "direction",
        "threads",
        "GB/s",
        "memcpy GB/s",
        "ratio to memcpy",
        "speedup over 1 thread"
    );
    let show = |p: Option<PairedRatio>| p.map_or(String::new(), |p| format!("{p:.2}"));
    for r in rows {
        outln!(
            "{:>10} {:>5} {:>11} {:>7} {:>9.2} {:>11.2}  {:<24} {:<26} {}",
            human(r.size_bytes),
            r.thp,
            r.direction,
            r.threads,
            r.gbps,
            r.memcpy_gbps,
            format!("{:.2}", r.ratio),
            show(r.speedup),
            show(r.memcpy_speedup)
        );
    }
    outln!();
    outln!(
        "where a page's time goes, ns per page (the timed rounds' stages, threads' times added):"
    );
    outln!(
        "{:>10} {:>5} {:>11} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7}",
        "size",
        "thp",
        "direction",
        "threads",
        "setup",
        "alloc",
        "copy",
        "pages",
        "finalize",
        "total",
        "memcpy"
    );
    for r in rows {
        let st = &r.stages_ns_per_page;
        outln!(
            "{:>10} {:>5} {:>11} {:>7} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>8.0} {:>7.0} {:>7.0}",
            human(r.size_bytes),
            r.thp,
            r.direction,
            r.threads,
            st.setup,
            st.alloc,
            st.copy,
            st.pages,
            st.finalize,
            st.total(),
            r.memcpy_ns_per_page
        );
    }
}

pub(crate) fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}
