//! `hmm bench range-fault`: `hmm_range_fault` in ns per page, against the host kernel's
//! page-table walk measured in the same run (a read of `/proc/self/pagemap` over the same
//! number of populated 4 KiB pages: `pagemap_read` walks the tables and writes one word
//! per page, which is what a snapshot does).
//!
//! | scenario | region | request |
//! |---|---|---|
//! | `snapshot_{4k,thp}` | populated | none: report what is there |
//! | `fault_populated_{4k,thp}` | populated | `REQ_FAULT \| REQ_WRITE`, already satisfied |
//! | `fault_read_empty_{4k,thp}` | empty | `REQ_FAULT`: every page (or 2 MiB unit) read-faulted to the zero page (or huge zero page) |
//! | `fault_write_empty_{4k,thp}` | empty | `REQ_FAULT \| REQ_WRITE`: every page allocated, zeroed and mapped |
//!
//! One call covers the whole region, as a driver with a big enough array would. Empty
//! regions are emptied (`MADV_DONTNEED`) before each round, untimed. Every call is
//! checked: each word must be valid, and writable where a write was requested.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange,
};
use hmm::phys::{PhysConfig, PhysMem};
use hmm::range_fault::{hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange};
use serde::Serialize;

use super::{host, median, ns_per, Result};
use crate::interrupt;
use crate::limits::{round_2m, Need, MIB};

/// One scenario.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RangeFaultRow {
    scenario: String,
    thp: bool,
    pages: u64,
    /// The median round, per page.
    ns_per_page: f64,
    /// The fastest round, per page.
    min_ns_per_page: f64,
    /// The host kernel's pagemap walk over as many populated pages, per page (`null` where
    /// this process may not read `/proc/self/pagemap`).
    kernel_pagemap_ns_per_page: Option<f64>,
    /// `ns_per_page / kernel_pagemap_ns_per_page`.
    ratio: Option<f64>,
}

impl RangeFaultRow {
    pub(crate) fn scenario(&self) -> &str {
        &self.scenario
    }

    pub(crate) fn ns_per_page(&self) -> f64 {
        self.ns_per_page
    }

    pub(crate) fn kernel_pagemap_ns_per_page(&self) -> Option<f64> {
        self.kernel_pagemap_ns_per_page
    }
}

/// The mirror's notifier: records every invalidation's sequence.
struct SetSeq;

impl IntervalNotifierOps for SetSeq {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
        sub.set_seq(seq);
        true
    }
}

struct Region {
    mm: Arc<Mm>,
    notifier: IntervalNotifier,
    base: VirtAddr,
    len: u64,
}

/// Simulated RAM for a region of `pages` pages.
fn ram_bytes(pages: u64) -> u64 {
    round_2m(pages * PAGE_SIZE) + 16 * MIB
}

/// What `pages` pages need: two regions' RAM at once (committed up front), the host's
/// own region for its walk, the result arrays; about 2.2 times the region measured,
/// counted as 3.
pub(crate) fn need(pages: u64) -> Need {
    Need {
        ram: ram_bytes(pages),
        host: 3 * pages * PAGE_SIZE + 16 * pages + 64 * MIB,
    }
}

impl Region {
    fn new(pages: u64, thp: bool) -> Result<Region> {
        let len = round_2m(pages * PAGE_SIZE);
        let phys = PhysMem::new(PhysConfig {
            size_bytes: ram_bytes(pages),
            prefault: true,
            per_cpu_lists: true,
        })?;
        let mm = Mm::new(phys);
        let base = mm.mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
        let advice = if thp {
            Advice::HugePage
        } else {
            Advice::NoHugePage
        };
        mm.madvise(base, len, advice)?;
        let notifier = mm.interval_notifier_insert(base, len, Arc::new(SetSeq))?;
        Ok(Region {
            mm,
            notifier,
            base,
            len: pages * PAGE_SIZE,
        })
    }

    fn populate(&self, thp: bool) -> Result<()> {
        let step = if thp { PMD_SIZE } else { PAGE_SIZE };
        for at in (0..self.len).step_by(step as usize) {
            self.mm
                .write_val(self.base.checked_add(at).ok_or("inside")?, 1u8)?;
        }
        Ok(())
    }

    /// One timed `hmm_range_fault` over the region with `flags` on every page, retried
    /// on `Busy` (nothing else runs, so it never is); checks every word.
    fn run(&self, pfns: &mut [HmmPfn], flags: HmmPfnFlags) -> Result<Duration> {
        let end = self.base.checked_add(self.len).ok_or("region end")?;
        loop {
            let mut range = HmmRange {
                notifier: &self.notifier,
                notifier_seq: self.notifier.read_begin(),
                start: self.base,
                end,
                hmm_pfns: pfns,
                default_flags: flags,
                pfn_flags_mask: HmmPfnFlags::empty(),
                dev_private_owner: None,
            };
            let mmap = self.mm.mmap_read();
            let t = Instant::now();
            match hmm_range_fault(&mmap, &mut range) {
                Ok(()) => {
                    let took = t.elapsed();
                    drop(mmap);
                    let write = flags.contains(HmmPfnFlags::REQ_WRITE);
                    if let Some(i) = pfns.iter().position(|p| {
                        !p.flags().contains(HmmPfnFlags::VALID)
                            || (write && !p.flags().contains(HmmPfnFlags::WRITE))
                    }) {
                        return Err(format!("word {i} does not satisfy {flags:?}").into());
                    }
                    return Ok(took);
                }
                Err(HmmError::Busy) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Scenarios per page size.
const SCENARIOS: [(&str, bool, HmmPfnFlags); 4] = [
    ("snapshot", true, HmmPfnFlags::empty()),
    (
        "fault_populated",
        true,
        HmmPfnFlags::REQ_FAULT.union(HmmPfnFlags::REQ_WRITE),
    ),
    ("fault_read_empty", false, HmmPfnFlags::REQ_FAULT),
    (
        "fault_write_empty",
        false,
        HmmPfnFlags::REQ_FAULT.union(HmmPfnFlags::REQ_WRITE),
    ),
];

/// Rows measured per [`range_fault_rows`] call.
pub(crate) const ROWS: u64 = 2 * SCENARIOS.len() as u64;

/// `hmm bench range-fault`: every scenario over `pages` pages, `iters` rounds each. After
/// a Ctrl-C ([`interrupt`]), the scenario in hand ends after the round in hand and no more
/// are measured.
pub(crate) fn range_fault_rows(
    pages: u64,
    iters: usize,
    mut progress: impl FnMut(&RangeFaultRow),
) -> Result<Vec<RangeFaultRow>> {
    if pages == 0 || iters == 0 {
        return Err("--pages and --iters must be at least 1".into());
    }
    let kernel = host::pagemap_walk(pages, iters)?.map(|t| ns_per(t, pages));
    let mut pfns = vec![HmmPfn::default(); pages as usize];
    let mut rows = Vec::with_capacity(ROWS as usize);
    for thp in [false, true] {
        if interrupt::requested() {
            break;
        }
        let populated = Region::new(pages, thp)?;
        populated.populate(thp)?;
        let empty = Region::new(pages, thp)?;
        for (name, on_populated, flags) in SCENARIOS {
            if interrupt::requested() {
                break;
            }
            let scenario = format!("{name}_{}", if thp { "thp" } else { "4k" });
            let region = if on_populated { &populated } else { &empty };
            let mut times = Vec::with_capacity(iters);
            // One untimed round first: caches and the model's allocator warm.
            for r in 0..=iters {
                // At least one timed round.
                if r > 1 && interrupt::requested() {
                    break;
                }
                let timed = r > 0;
                if !on_populated {
                    region
                        .mm
                        .madvise(region.base, region.len, Advice::DontNeed)?;
                }
                let t = region.run(&mut pfns, flags)?;
                if timed {
                    times.push(t);
                }
            }
            let min = *times.iter().min().expect("iters > 0");
            let ns = ns_per(median(times), pages);
            rows.push(RangeFaultRow {
                scenario,
                thp,
                pages,
                ns_per_page: ns,
                min_ns_per_page: ns_per(min, pages),
                kernel_pagemap_ns_per_page: kernel,
                ratio: kernel.map(|k| ns / k),
            });
            progress(rows.last().expect("just pushed"));
        }
    }
    Ok(rows)
}

/// Prints rows as a table.
pub(crate) fn print_table(rows: &[RangeFaultRow]) {
    outln!(
        "{:>22} {:>8} {:>9} {:>9} {:>16} {:>7}",
        "scenario",
        "pages",
        "ns/page",
        "min",
        "kernel pagemap",
        "ratio"
    );
    for r in rows {
        let (k, ratio) = match (r.kernel_pagemap_ns_per_page, r.ratio) {
            (Some(k), Some(x)) => (format!("{k:.1}"), format!("{x:.2}")),
            _ => ("n/a".into(), "n/a".into()),
        };
        outln!(
            "{:>22} {:>8} {:>9.1} {:>9.1} {:>16} {:>7}",
            r.scenario,
            r.pages,
            r.ns_per_page,
            r.min_ns_per_page,
            k,
            ratio
        );
    }
}
