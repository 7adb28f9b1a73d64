//! `hmm bench driver`: the SVM driver (`hmm-svm`) servicing GPU faults, evicting under
//! pressure, and the cost of its policies' hooks. Where bytes move, the same bytes copied
//! by `memcpy` in the same run are the baseline.
//!
//! | scenario | each GPU fault | reported |
//! |---|---|---|
//! | `fault_remote` | maps a 2 MiB range of system memory remotely (remote policy: no copy) | faults/s, pages mapped/s |
//! | `fault_migrate_page` | migrates one 4 KiB page (first touch, no prefetch) | faults/s, GB/s and memcpy's |
//! | `fault_migrate_range` | migrates a 2 MiB range, one device THP (first touch, THP memory) | faults/s, GB/s and memcpy's |
//! | `evict` | migrates a 2 MiB range into device memory a quarter of the buffer's size, evicting a chunk first | evictions/s, GB/s evicted |
//! | `hook_*` | (no fault) one call of a policy hook: the tree prefetcher, LRU's victim among 64 chunks, the first-touch placement, the thrashing detector | ns per call |
//!
//! A round is one GPU read of one byte of every page of the buffer, on one thread, through
//! the blocking access (fault, batch, service, replay); set-up (the machine, the buffer
//! written by the CPU) is untimed. Every round checks the bytes it read. The anchor for
//! the hooks: gpu_ext's `block_access` hook runs about 70k times a second on real
//! hardware, so a hook must cost well under a microsecond.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm::addr::{VaRange, VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice as MmAdvice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::fault::Access;
use hmm_svm::policy::eviction::{ChunkInfo, EvictionPolicy, Lru};
use hmm_svm::policy::prefetch::{
    BlockMask, BlockView, NoPrefetch, PrefetchPolicy, TreePrefetch, WholeRange, BLOCK_PAGES,
};
use hmm_svm::policy::thrashing::{PageHistory, ThrashingDetector};
use hmm_svm::policy::{Cause, FirstTouch, MigrationPolicy, Placement, PlacementQuery, RemoteMap};
use hmm_svm::{GpuConfig, GpuDevice, GpuPageSize, GpuVm, VmPolicies};
use serde::Serialize;

use super::{median, Result};
use crate::interrupt;
use crate::limits::{round_2m, Need, MIB};

/// Rows one run reports.
pub(crate) const ROWS: u64 = 8;

/// One scenario.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DriverRow {
    scenario: String,
    rounds: usize,
    /// Pages of the buffer (0 for a hook).
    pages: u64,
    /// GPU faults of one round, after coalescing (0 for a hook).
    faults: u64,
    /// The median round.
    seconds: f64,
    /// Faults serviced per second.
    faults_per_sec: Option<f64>,
    /// Pages mapped (or migrated) per second.
    pages_per_sec: Option<f64>,
    /// Chunks evicted per second.
    evictions_per_sec: Option<f64>,
    /// Bytes migrated (or evicted) per second, in GB/s.
    gbps: Option<f64>,
    /// memcpy of the same bytes in the same run, GB/s.
    memcpy_gbps: Option<f64>,
    /// `gbps / memcpy_gbps`.
    ratio: Option<f64>,
    /// A hook's cost.
    ns_per_call: Option<f64>,
}

impl DriverRow {
    pub(crate) fn scenario(&self) -> &str {
        &self.scenario
    }
}

/// Simulated RAM for a buffer of `pages`: the buffer, the same again for pages in flight,
/// and room for page tables and zero pages.
fn ram_bytes(pages: u64) -> u64 {
    2 * round_2m(pages * PAGE_SIZE) + 16 * MIB
}

/// What `pages` pages need: RAM, device memory as large as the buffer, the memcpy
/// buffers.
pub(crate) fn need(pages: u64) -> Need {
    let bytes = round_2m(pages * PAGE_SIZE);
    Need {
        ram: ram_bytes(pages),
        host: ram_bytes(pages) + bytes + 2 * bytes + 64 * MIB,
    }
}

/// A machine with a GPU of `vram` bytes, and a buffer of `pages` the CPU wrote.
struct Rig {
    mm: Arc<Mm>,
    gpu: Arc<GpuDevice>,
    a: VirtAddr,
    pages: u64,
}

impl Rig {
    fn new(pages: u64, vram: u64, thp: bool) -> Result<Rig> {
        let phys = PhysMem::new(PhysConfig {
            size_bytes: ram_bytes(pages),
            prefault: true,
            per_cpu_lists: true,
        })?;
        let gpu = GpuDevice::new(
            &phys,
            GpuConfig {
                vram_bytes: vram,
                ..GpuConfig::default()
            },
        )?;
        gpu.prefault();
        let mm = Mm::new(phys);
        let len = round_2m(pages * PAGE_SIZE);
        let a = mm.mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
        let advice = if thp {
            MmAdvice::HugePage
        } else {
            MmAdvice::NoHugePage
        };
        mm.madvise(a, len, advice)?;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for i in 0..pages {
            page[0] = i as u8;
            mm.write(a.checked_add(i * PAGE_SIZE).expect("inside"), &page)?;
        }
        Ok(Rig { mm, gpu, a, pages })
    }

    /// One timed round: a GPU read of the first byte of every page, checked.
    fn round(&self, vm: &GpuVm) -> Result<Duration> {
        let mut b = [0u8; 1];
        let start = Instant::now();
        for i in 0..self.pages {
            vm.read(self.a.checked_add(i * PAGE_SIZE).expect("inside"), &mut b)?;
            if b[0] != i as u8 {
                return Err(format!("page {i} read {} on the GPU", b[0]).into());
            }
        }
        Ok(start.elapsed())
    }
}

/// memcpy of `bytes`, the median of `iters` rounds (at least 5), in GB/s.
fn memcpy_gbps(bytes: u64, iters: usize) -> f64 {
    let n = bytes as usize;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src);
    let times: Vec<Duration> = (0..iters.max(5))
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
            t.elapsed()
        })
        .collect();
    bytes as f64 / median(times).as_secs_f64() / 1e9
}

/// Runs `iters` rounds of a fault scenario, each on a fresh machine.
fn fault_row(
    scenario: &str,
    pages: u64,
    iters: usize,
    thp: bool,
    vram: u64,
    policies: impl Fn() -> VmPolicies,
) -> Result<DriverRow> {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..iters {
        let rig = Rig::new(pages, vram, thp)?;
        let vm = GpuVm::with_policies(&rig.gpu, &rig.mm, policies());
        times.push(rig.round(&vm)?);
        last = Some(vm.stats());
        if interrupt::requested() {
            break;
        }
    }
    let s = last.expect("at least one round");
    let seconds = median(times.clone()).as_secs_f64();
    let moved = s.pages_h2d.max(s.evicted_pages);
    let bytes = moved * PAGE_SIZE;
    let copies = moved > 0;
    let memcpy = copies.then(|| memcpy_gbps(bytes, iters));
    let gbps = copies.then(|| bytes as f64 / seconds / 1e9);
    let mapped = s.local_mapped_pages + s.remote_mapped_pages;
    Ok(DriverRow {
        scenario: scenario.to_string(),
        rounds: times.len(),
        pages,
        faults: s.gpu_faults - s.duplicate_faults,
        seconds,
        faults_per_sec: Some((s.gpu_faults - s.duplicate_faults) as f64 / seconds),
        pages_per_sec: Some(mapped as f64 / seconds),
        evictions_per_sec: (s.evictions > 0).then(|| s.evictions as f64 / seconds),
        gbps,
        memcpy_gbps: memcpy,
        ratio: gbps.zip(memcpy).map(|(g, m)| g / m),
        ns_per_call: None,
    })
}

/// ns per call of `f`, the median of `iters` rounds of `calls` calls.
fn hook_row(name: &str, iters: usize, calls: u64, mut f: impl FnMut(u64)) -> DriverRow {
    let times: Vec<Duration> = (0..iters.max(3))
        .map(|_| {
            let t = Instant::now();
            for k in 0..calls {
                f(k);
            }
            t.elapsed()
        })
        .collect();
    let seconds = median(times).as_secs_f64();
    DriverRow {
        scenario: name.to_string(),
        rounds: iters.max(3),
        pages: 0,
        faults: 0,
        seconds,
        faults_per_sec: None,
        pages_per_sec: None,
        evictions_per_sec: None,
        gbps: None,
        memcpy_gbps: None,
        ratio: None,
        ns_per_call: Some(seconds * 1e9 / calls as f64),
    }
}

fn plain(migration: Box<dyn MigrationPolicy>, prefetch: Box<dyn PrefetchPolicy>) -> VmPolicies {
    VmPolicies {
        migration,
        prefetch,
        ..VmPolicies::plain()
    }
}

/// Every scenario with a buffer of `pages` (rounded up to whole 2 MiB) and `iters` rounds,
/// calling `row_done` after each.
pub(crate) fn driver_rows(
    pages: u64,
    iters: usize,
    mut row_done: impl FnMut(&DriverRow),
) -> Result<Vec<DriverRow>> {
    let pages = round_2m(pages * PAGE_SIZE) / PAGE_SIZE;
    let bytes = pages * PAGE_SIZE;
    let mut rows = Vec::new();
    let mut push = |r: DriverRow, rows: &mut Vec<DriverRow>| {
        row_done(&r);
        rows.push(r);
    };
    type Scenario = (&'static str, bool, u64, fn() -> VmPolicies);
    let scenarios: [Scenario; 4] = [
        ("fault_remote", false, bytes, || {
            plain(Box::new(RemoteMap), Box::new(WholeRange))
        }),
        ("fault_migrate_page", false, bytes, || {
            plain(Box::new(FirstTouch), Box::new(NoPrefetch))
        }),
        ("fault_migrate_range", true, bytes, || {
            plain(Box::new(FirstTouch), Box::new(WholeRange))
        }),
        (
            "evict",
            true,
            (bytes / 4).max(PMD_SIZE) / PMD_SIZE * PMD_SIZE,
            || plain(Box::new(FirstTouch), Box::new(WholeRange)),
        ),
    ];
    for (name, thp, vram, policies) in scenarios {
        if interrupt::requested() {
            return Ok(rows);
        }
        let r = fault_row(name, pages, iters, thp, vram, policies)?;
        push(r, &mut rows);
    }
    // The hooks, on inputs of the size they get in a run.
    let calls = 100_000;
    let mut resident = BlockMask::EMPTY;
    (0..BLOCK_PAGES).step_by(3).for_each(|p| resident.set(p));
    let tree = TreePrefetch::default();
    push(
        hook_row("hook_tree_prefetch", iters, calls / 10, |k| {
            let mut faulted = BlockMask::EMPTY;
            faulted.set((k as usize * 7) % BLOCK_PAGES);
            let view = BlockView {
                resident,
                faulted,
                range: BlockMask::range(0, BLOCK_PAGES),
            };
            black_box(tree.region(black_box(&view)));
        }),
        &mut rows,
    );
    let chunks: Vec<ChunkInfo> = (0..64u32)
        .map(|i| ChunkInfo {
            index: i,
            allocated_at: u64::from(i * 7 % 64),
            last_used: u64::from(i * 13 % 64),
            uses: u64::from(i % 5),
            pages_in_use: 512,
        })
        .collect();
    push(
        hook_row("hook_lru_victim_64", iters, calls, |_| {
            black_box(Lru.victim(black_box(&chunks)));
        }),
        &mut rows,
    );
    let q = PlacementQuery {
        range: VaRange::from_len(VirtAddr::new(PMD_SIZE), PMD_SIZE).expect("a range"),
        size: GpuPageSize::Size2M,
        access: Access::Read,
        cause: Cause::Fault,
        advice: None,
        vram_free_pages: 1,
    };
    push(
        hook_row("hook_first_touch_place", iters, calls, |_| {
            black_box(FirstTouch.place(black_box(&q)) == Placement::Device);
        }),
        &mut rows,
    );
    let detector = ThrashingDetector::default();
    let mut h = PageHistory::default();
    push(
        hook_row("hook_thrashing_event", iters, calls, |k| {
            black_box(detector.on_migration(&mut h, k * 1000));
        }),
        &mut rows,
    );
    Ok(rows)
}

/// Prints the rows as a table.
pub(crate) fn print_table(rows: &[DriverRow]) {
    let f = |v: Option<f64>, w: usize| v.map_or(format!("{:>w$}", "-"), |x| format!("{x:>w$.1}"));
    outln!(
        "{:<22} {:>7} {:>7} {:>12} {:>12} {:>10} {:>8} {:>8} {:>6} {:>9}",
        "scenario",
        "pages",
        "faults",
        "faults/s",
        "pages/s",
        "evict/s",
        "GB/s",
        "memcpy",
        "ratio",
        "ns/call"
    );
    for r in rows {
        outln!(
            "{:<22} {:>7} {:>7} {} {} {} {} {} {} {}",
            r.scenario,
            r.pages,
            r.faults,
            f(r.faults_per_sec, 12),
            f(r.pages_per_sec, 12),
            f(r.evictions_per_sec, 10),
            r.gbps
                .map_or(format!("{:>8}", "-"), |x| format!("{x:>8.2}")),
            r.memcpy_gbps
                .map_or(format!("{:>8}", "-"), |x| format!("{x:>8.2}")),
            r.ratio
                .map_or(format!("{:>6}", "-"), |x| format!("{x:>6.2}")),
            f(r.ns_per_call, 9),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_runs_and_checks_its_bytes() {
        let rows = driver_rows(1024, 1, |_| {}).unwrap();
        assert_eq!(rows.len() as u64, ROWS);
        let by = |n: &str| rows.iter().find(|r| r.scenario == n).unwrap();
        assert_eq!(by("fault_remote").faults, 2, "one fault per 2 MiB range");
        assert_eq!(by("fault_migrate_page").faults, 1024, "one fault per page");
        assert_eq!(by("fault_migrate_range").faults, 2);
        assert!(by("evict").evictions_per_sec.is_some());
        assert!(rows.iter().all(|r| r.seconds > 0.0));
        assert!(by("hook_lru_victim_64").ns_per_call.unwrap() > 0.0);
    }
}
