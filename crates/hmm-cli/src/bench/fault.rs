//! `hmm bench fault`: fault latency, one fault at a time, against the host kernel's
//! first-touch fault measured in the same run.
//!
//! | scenario | the model's fault | the kernel's baseline |
//! |---|---|---|
//! | `anon_write_4k` | first write to an empty anonymous page: allocate, zero, map | the same, `MADV_NOHUGEPAGE` |
//! | `anon_read_zero_page_4k` | first read: map the zero page | the same |
//! | `anon_write_thp` | first write to an empty 2 MiB unit under `MADV_HUGEPAGE`: allocate, zero and map a PMD | the same (`kernel_thp_mapped` says how many were THPs) |
//! | `device_private_read_4k` | CPU read of a page on device 0 (dmirror): the device-private entry sends the fault to the driver's `migrate_to_ram`, which migrates the page home (setup, copy, pages, finalize) and the read retries | the kernel's 4 KiB first-touch write (allocate, zero, map: the nearest the host can do without a device) |
//!
//! Each fault is timed alone (`Instant` around the access; its own cost, some 20 ns, is
//! in both sides), and the rows give the median, the 99th percentile and the mean, and
//! the ratio of the medians. Pages come in batches of fresh mappings; one untimed batch
//! of each model scenario runs first so the model's allocator is warm, as the host's is.
//! Every fault is checked: the counters must show one fault of the expected kind per
//! access, and a page brought home from the device must hold its bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, HmmDmirrorCmd};
use serde::Serialize;

use super::host::{self, Touch};
use super::{ns_per, percentile, Result};
use crate::interrupt;
use crate::limits::{Need, MIB};

/// 4 KiB pages per fresh mapping.
const BATCH: u64 = 1024;
/// 2 MiB units per fresh mapping.
const THP_BATCH: u64 = 16;

/// One scenario's latencies.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FaultRow {
    scenario: &'static str,
    /// Bytes one fault maps.
    unit_bytes: u64,
    faults: u64,
    median_ns: f64,
    p99_ns: f64,
    mean_ns: f64,
    /// Which host-kernel fault the baseline is.
    kernel_baseline: &'static str,
    kernel_median_ns: f64,
    kernel_p99_ns: f64,
    kernel_mean_ns: f64,
    /// For the THP baseline: how many of the kernel's faults mapped a THP.
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_thp_mapped: Option<u64>,
    /// `median_ns / kernel_median_ns`: how many times the kernel's fault the model's takes.
    ratio: f64,
}

impl FaultRow {
    pub(crate) fn scenario(&self) -> &'static str {
        self.scenario
    }

    pub(crate) fn median_ns(&self) -> f64 {
        self.median_ns
    }

    pub(crate) fn p99_ns(&self) -> f64 {
        self.p99_ns
    }

    pub(crate) fn kernel_median_ns(&self) -> f64 {
        self.kernel_median_ns
    }

    pub(crate) fn kernel_p99_ns(&self) -> f64 {
        self.kernel_p99_ns
    }
}

/// Median, 99th percentile and mean of `lat`, in ns.
fn summary(mut lat: Vec<Duration>) -> (f64, f64, f64) {
    lat.sort();
    let total: Duration = lat.iter().sum();
    (
        ns_per(percentile(&lat, 0.5), 1),
        ns_per(percentile(&lat, 0.99), 1),
        ns_per(total, lat.len() as u64),
    )
}

fn row(
    scenario: &'static str,
    unit_bytes: u64,
    model: Vec<Duration>,
    kernel_baseline: &'static str,
    kernel: Vec<Duration>,
    kernel_thp_mapped: Option<u64>,
) -> FaultRow {
    let faults = model.len() as u64;
    let (median_ns, p99_ns, mean_ns) = summary(model);
    let (kernel_median_ns, kernel_p99_ns, kernel_mean_ns) = summary(kernel);
    FaultRow {
        scenario,
        unit_bytes,
        faults,
        median_ns,
        p99_ns,
        mean_ns,
        kernel_baseline,
        kernel_median_ns,
        kernel_p99_ns,
        kernel_mean_ns,
        kernel_thp_mapped,
        ratio: median_ns / kernel_median_ns,
    }
}

/// Fresh private anonymous mapping of `len` bytes with `advice`.
fn map(mm: &Mm, len: u64, advice: Advice) -> Result<VirtAddr> {
    let a = mm.mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
    mm.madvise(a, len, advice)?;
    Ok(a)
}

/// The model's first-touch faults on `n` 4 KiB pages, each timed.
fn model_first_touch(mm: &Mm, touch: Touch, n: u64) -> Result<Vec<Duration>> {
    let before = mm.stats().faults;
    let mut lat = Vec::with_capacity(n as usize);
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        let a = map(mm, k * PAGE_SIZE, Advice::NoHugePage)?;
        for i in 0..k {
            let at = a.checked_add(i * PAGE_SIZE).ok_or("inside the mapping")?;
            let t = Instant::now();
            match touch {
                Touch::Write => mm.write_val(at, 1u8)?,
                Touch::Read => {
                    std::hint::black_box(mm.read_val::<u8>(at)?);
                }
            }
            lat.push(t.elapsed());
        }
        mm.munmap(a, k * PAGE_SIZE)?;
        left -= k;
    }
    let after = mm.stats().faults;
    let counted = match touch {
        Touch::Write => after.anon_write - before.anon_write,
        Touch::Read => after.anon_read_zero - before.anon_read_zero,
    };
    if counted != n {
        return Err(format!("{counted} first-touch faults counted for {n} touches").into());
    }
    Ok(lat)
}

/// The model's THP first-touch write faults on `n` 2 MiB units, each timed.
fn model_first_touch_thp(mm: &Mm, n: u64) -> Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(n as usize);
    let mut left = n;
    while left > 0 {
        let k = left.min(THP_BATCH);
        let a = map(mm, k * PMD_SIZE, Advice::HugePage)?;
        for i in 0..k {
            let at = a.checked_add(i * PMD_SIZE).ok_or("inside the mapping")?;
            let t = Instant::now();
            mm.write_val(at, 1u8)?;
            lat.push(t.elapsed());
            if mm.pagemap(at, 1)?[0].order != 9 {
                return Err("the model did not map a THP".into());
            }
        }
        mm.munmap(a, k * PMD_SIZE)?;
        left -= k;
    }
    Ok(lat)
}

/// CPU reads of `n` pages that device 0 holds, each a `migrate_to_ram` round trip.
fn model_device_private(mm: &Arc<Mm>, d0: &Dmirror, n: u64) -> Result<Vec<Duration>> {
    // MIGRATE_TO_DEV reads the pages back into a user buffer, as the kernel's does.
    let buf = map(mm, BATCH * PAGE_SIZE, Advice::NoHugePage)?;
    let before = mm.stats().faults.device_private;
    let mut lat = Vec::with_capacity(n as usize);
    let mut left = n;
    let byte = |i: u64| (i.wrapping_mul(131) >> 3) as u8 | 1;
    while left > 0 {
        let k = left.min(BATCH);
        let a = map(mm, k * PAGE_SIZE, Advice::NoHugePage)?;
        for i in 0..k {
            let page = vec![byte(i); PAGE_SIZE as usize];
            mm.write(a.checked_add(i * PAGE_SIZE).ok_or("inside")?, &page)?;
        }
        let mut cmd = HmmDmirrorCmd {
            addr: a.as_u64(),
            ptr: buf.as_u64(),
            npages: k,
            ..HmmDmirrorCmd::default()
        };
        d0.ioctl(DmirrorCmd::MigrateToDev, &mut cmd)?;
        if cmd.cpages != k {
            return Err(format!("{} of {k} pages reached the device", cmd.cpages).into());
        }
        for i in 0..k {
            let at = a.checked_add(i * PAGE_SIZE).ok_or("inside")?;
            let t = Instant::now();
            let got = mm.read_val::<u8>(at)?;
            lat.push(t.elapsed());
            if got != byte(i) {
                return Err(format!("page {i} came home with {got:#x}").into());
            }
        }
        mm.munmap(a, k * PAGE_SIZE)?;
        left -= k;
    }
    let counted = mm.stats().faults.device_private - before;
    if counted != n {
        return Err(format!("{counted} device-private faults for {n} reads").into());
    }
    mm.munmap(buf, BATCH * PAGE_SIZE)?;
    Ok(lat)
}

/// Rows measured per [`fault_rows`] call.
pub(crate) const ROWS: u64 = 4;

/// What `pages` faults of each 4 KiB scenario and `thps` THP faults need: the model's
/// RAM is the same for any count (fresh mappings come in batches), the host's memory grows
/// with the latencies kept (some 26 bytes per fault measured, counted as 80).
pub(crate) fn need(pages: u64, thps: u64) -> Need {
    Need {
        ram: RAM_BYTES,
        host: 80 * pages + 80 * thps + 256 * MIB,
    }
}

/// The model's RAM: room for a batch of either kind twice, and some to spare.
const RAM_BYTES: u64 = const_max(BATCH * PAGE_SIZE, THP_BATCH * PMD_SIZE) * 2 + 32 * MIB;

const fn const_max(a: u64, b: u64) -> u64 {
    if a > b {
        a
    } else {
        b
    }
}

/// `hmm bench fault`: `pages` faults of each 4 KiB scenario and `thps` of the THP one;
/// `progress` sees each row as it is measured. After a Ctrl-C ([`interrupt`]), no more
/// rows are measured.
pub(crate) fn fault_rows(
    pages: u64,
    thps: u64,
    mut progress: impl FnMut(&FaultRow),
) -> Result<Vec<FaultRow>> {
    if pages == 0 || thps == 0 {
        return Err("--pages and --thps must be at least 1".into());
    }
    let phys = PhysMem::new(PhysConfig {
        size_bytes: RAM_BYTES,
        prefault: true,
        per_cpu_lists: true,
    })?;
    let driver = DmirrorDriver::new(
        &phys,
        DmirrorConfig {
            chunk_bytes: BATCH * PAGE_SIZE,
            max_chunks: 2,
        },
    );
    let mm = Mm::new(phys);
    let d0 = Dmirror::open(driver.device(0), &mm)?;
    // Warm the model's allocator and every path once, untimed.
    model_first_touch(&mm, Touch::Write, BATCH)?;
    model_first_touch_thp(&mm, THP_BATCH.min(thps))?;
    model_device_private(&mm, &d0, BATCH.min(pages))?;

    let kernel_write = host::first_touch(Touch::Write, pages, BATCH)?;
    let mut rows = Vec::with_capacity(ROWS as usize);
    for k in 0..ROWS {
        if interrupt::requested() {
            break;
        }
        let r = match k {
            0 => row(
                "anon_write_4k",
                PAGE_SIZE,
                model_first_touch(&mm, Touch::Write, pages)?,
                "first_touch_write_4k",
                kernel_write.clone(),
                None,
            ),
            1 => row(
                "anon_read_zero_page_4k",
                PAGE_SIZE,
                model_first_touch(&mm, Touch::Read, pages)?,
                "first_touch_read_4k",
                host::first_touch(Touch::Read, pages, BATCH)?,
                None,
            ),
            2 => {
                let (kernel_thp, mapped) = host::first_touch_thp(thps, THP_BATCH)?;
                row(
                    "anon_write_thp",
                    PMD_SIZE,
                    model_first_touch_thp(&mm, thps)?,
                    "first_touch_write_thp",
                    kernel_thp,
                    Some(mapped),
                )
            }
            _ => row(
                "device_private_read_4k",
                PAGE_SIZE,
                model_device_private(&mm, &d0, pages)?,
                "first_touch_write_4k",
                kernel_write.clone(),
                None,
            ),
        };
        progress(&r);
        rows.push(r);
    }
    Ok(rows)
}

/// Prints rows as a table.
pub(crate) fn print_table(rows: &[FaultRow]) {
    outln!(
        "{:>24} {:>7} {:>10} {:>10} {:>10} {:>22} {:>10} {:>10} {:>6}",
        "scenario",
        "faults",
        "median ns",
        "p99 ns",
        "mean ns",
        "kernel baseline",
        "median ns",
        "p99 ns",
        "ratio"
    );
    for r in rows {
        outln!(
            "{:>24} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>22} {:>10.0} {:>10.0} {:>6.2}",
            r.scenario,
            r.faults,
            r.median_ns,
            r.p99_ns,
            r.mean_ns,
            r.kernel_baseline,
            r.kernel_median_ns,
            r.kernel_p99_ns,
            r.ratio
        );
        if let Some(m) = r.kernel_thp_mapped {
            if m < r.faults {
                outln!("  note: the host kernel mapped {m} of {} as THPs", r.faults);
            }
        }
    }
}
