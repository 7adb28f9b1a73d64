//! `hmm bench scale`: costs that must not grow with the size of what is around them. Each
//! row times the same operation in a small and a large setting, in turns within every
//! round (small first in even rounds, large first in odd ones), and reports the median of
//! the rounds' large-over-small ratios with its 95% interval ([`PairedRatio`]):
//!
//! | row | operation | small | large |
//! |---|---|---|---|
//! | `notifier_lookup` | invalidating one page | 64 interval notifiers of 64 KiB and one over them all | 16384 and one |
//! | `rmap_fork_family` | evicting a process's own 64 pages from a device (each page's migration entries found and put back by a reverse-map walk) | a family of 1 | of 256 |
//! | `machine_size` | first writes of 4096 pages | 8 GiB of RAM | 2 TiB of RAM and eight 80 GiB devices |
//!
//! The machine row also reports the host memory the large machine committed for its
//! frames and their metadata after its round (`PhysMem::host_resident_bytes`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm::addr::{VaRange, VirtAddr, PAGE_SIZE};
use hmm::migrate::{migrate_device_range, migrate_vma_setup, MigrateVma, MigrateVmaFlags};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent,
    NotifierRange, Owner,
};
use hmm::phys::{FrameFlags, PhysConfig, PhysMem};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};
use serde::Serialize;

use super::paired::PairedRatio;
use super::{median, Result};
use crate::interrupt;

/// The rows, in order.
pub(crate) const ROWS: u64 = 3;

const GIB: u64 = 1 << 30;
const RW: Prot = Prot::READ.union(Prot::WRITE);

/// One row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScaleRow {
    scenario: &'static str,
    small: &'static str,
    large: &'static str,
    /// What one measurement is.
    unit: &'static str,
    /// The small setting's median round.
    small_ns: f64,
    /// The large setting's median round.
    large_ns: f64,
    /// Large over small, round by round.
    ratio: PairedRatio,
    /// For `machine_size`: host memory committed for the large machine's frames and their
    /// metadata after its last round.
    #[serde(skip_serializing_if = "Option::is_none")]
    large_host_resident_bytes: Option<u64>,
}

impl ScaleRow {
    pub(crate) fn scenario(&self) -> &'static str {
        self.scenario
    }
}

/// What a run commits on the host at most: the eviction families' RAM and the machine
/// row's touched pages and block tables, well under this.
pub(crate) const HOST_BYTES: u64 = 512 << 20;

/// A notifier that records the sequence, as a driver's does.
struct SetSeq;

impl IntervalNotifierOps for SetSeq {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
        sub.set_seq(seq);
        true
    }
}

/// A pagemap the benchmark migrates to and from itself.
struct Quiet;
impl DevPagemapOps for Quiet {}

/// `n` short notifiers and one long one over them all; `time` invalidates one page in
/// the middle `reps` times.
struct Notifiers {
    mm: Arc<Mm>,
    _subs: Vec<IntervalNotifier>,
    page: VaRange,
}

impl Notifiers {
    const SPAN: u64 = 64 << 10;
    const BASE: u64 = 0x7f00_0000_0000;

    fn new(n: u64) -> Result<Notifiers> {
        let phys = PhysMem::new(PhysConfig::with_size(4 << 20))?;
        let mm = Mm::new(phys);
        let ops: Arc<dyn IntervalNotifierOps> = Arc::new(SetSeq);
        let mut subs = Vec::new();
        for i in 0..n {
            let at = VirtAddr::new(Self::BASE + i * Self::SPAN);
            subs.push(mm.interval_notifier_insert(at, Self::SPAN, ops.clone())?);
        }
        subs.push(mm.interval_notifier_insert(
            VirtAddr::new(0),
            Self::BASE + (n + 1) * Self::SPAN,
            ops,
        )?);
        let page = VaRange::from_len(VirtAddr::new(Self::BASE + n / 2 * Self::SPAN), PAGE_SIZE)?;
        Ok(Notifiers {
            mm,
            _subs: subs,
            page,
        })
    }

    fn time(&self, reps: u32) -> Duration {
        let before = self.mm.stats().notifier.interval_callbacks;
        let t = Instant::now();
        for _ in 0..reps {
            self.mm
                .notifiers()
                .invalidate_range_start(NotifierRange::new(
                    self.mm.id(),
                    self.page,
                    NotifierEvent::Clear,
                    None,
                ))
                .end();
        }
        let took = t.elapsed() / reps;
        let calls = self.mm.stats().notifier.interval_callbacks - before;
        assert_eq!(
            calls,
            2 * u64::from(reps),
            "the short and the long notifier"
        );
        took
    }
}

/// A fork family whose last member owns 64 pages that live on a device.
struct Family {
    phys: Arc<PhysMem>,
    dev: Arc<DevPagemap>,
    members: Vec<Arc<Mm>>,
    own: VirtAddr,
}

impl Family {
    const OWN: u64 = 64;

    fn new(size: usize) -> Result<Family> {
        let phys = PhysMem::new(PhysConfig::with_size(32 << 20))?;
        let dev = memremap_pages(
            &phys,
            PagemapConfig {
                kind: MemoryType::DevicePrivate,
                owner: Owner::new_unique(),
                size_bytes: 4 << 20,
            },
            Arc::new(Quiet),
        )?;
        let root = Mm::new(phys.clone());
        let shared = root.mmap(None, 64 * PAGE_SIZE, RW, MapFlags::PRIVATE)?;
        for i in 0..64 {
            root.write_val(shared.checked_add(i * PAGE_SIZE).ok_or("in")?, i)?;
        }
        let mut members = vec![root.clone()];
        for _ in 1..size {
            members.push(root.fork()?);
        }
        let owner = members.last().ok_or("a member")?.clone();
        let own = owner.mmap(None, Self::OWN * PAGE_SIZE, RW, MapFlags::PRIVATE)?;
        for i in 0..Self::OWN {
            owner.write_val(own.checked_add(i * PAGE_SIZE).ok_or("in")?, !i)?;
        }
        let f = Family {
            phys,
            dev,
            members,
            own,
        };
        f.to_device()?;
        Ok(f)
    }

    fn owner(&self) -> &Mm {
        self.members.last().expect("a member")
    }

    fn to_device(&self) -> Result<()> {
        let mmap = self.owner().mmap_read();
        let mut mig = migrate_vma_setup(
            &mmap,
            MigrateVma {
                start: self.own,
                end: self.own.checked_add(Self::OWN * PAGE_SIZE).ok_or("end")?,
                pgmap_owner: Some(self.dev.owner()),
                flags: MigrateVmaFlags::SELECT_SYSTEM,
                fault_page: None,
            },
        )?;
        for i in 0..mig.src().len() {
            let d = self.dev.alloc(0, FrameFlags::empty())?;
            d.copy_from(&mig.src_page(i).ok_or("a written page")?);
            mig.set_dst(i, d, true).map_err(|e| e.to_string())?;
        }
        let moved = mig.pages().finalize().migrated;
        if moved != Self::OWN {
            return Err(format!("{moved} of {} pages reached the device", Self::OWN).into());
        }
        Ok(())
    }

    /// Times one eviction of the device's pages, then sends them back, untimed.
    fn time(&self) -> Result<Duration> {
        let t = Instant::now();
        let mut mig = migrate_device_range(&self.phys, self.dev.frame(0), self.dev.nr_frames())?;
        for i in 0..mig.src().len() {
            if !mig.src()[i].is_migrating() {
                continue;
            }
            let d = self.phys.alloc(0, FrameFlags::empty())?.lock();
            d.copy_from(&mig.src_page(i).ok_or("a device page")?);
            mig.set_dst(i, d, true).map_err(|e| e.to_string())?;
        }
        let moved = mig.pages().finalize().migrated;
        let took = t.elapsed();
        if moved != Self::OWN {
            return Err(format!("{moved} of {} pages came home", Self::OWN).into());
        }
        let last = self
            .own
            .checked_add((Self::OWN - 1) * PAGE_SIZE)
            .ok_or("in")?;
        if self.owner().read_val::<u64>(last)? != !(Self::OWN - 1) {
            return Err("an evicted page lost its bytes".into());
        }
        self.to_device()?;
        Ok(took / Self::OWN as u32)
    }
}

/// Pages written in each machine-size round.
const TOUCHED: u64 = 4096;

/// A machine of `ram` bytes (and, when `devices`, eight 80 GiB pagemaps): the time of
/// `TOUCHED` first writes per page, and the host memory the machine then held.
fn first_touch(ram: u64, devices: bool) -> Result<(Duration, u64)> {
    let phys = PhysMem::new(PhysConfig::with_size(ram))?;
    let _devs = (0..if devices { 8 } else { 0 })
        .map(|_| {
            memremap_pages(
                &phys,
                PagemapConfig {
                    kind: MemoryType::DevicePrivate,
                    owner: Owner::new_unique(),
                    size_bytes: 80 * GIB,
                },
                Arc::new(Quiet),
            )
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mm = Mm::new(phys.clone());
    let a = mm.mmap(None, TOUCHED * PAGE_SIZE, RW, MapFlags::PRIVATE)?;
    let t = Instant::now();
    for i in 0..TOUCHED {
        mm.write_val(a.checked_add(i * PAGE_SIZE).ok_or("in")?, i)?;
    }
    let took = t.elapsed() / TOUCHED as u32;
    Ok((took, phys.host_resident_bytes()))
}

/// Times `small` and `large` in turns for `iters` rounds; returns both series.
fn paired(
    iters: usize,
    mut small: impl FnMut() -> Result<Duration>,
    mut large: impl FnMut() -> Result<Duration>,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut s, mut l) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for round in 0..iters {
        if round > 0 && interrupt::requested() {
            break;
        }
        if round % 2 == 0 {
            s.push(small()?);
            l.push(large()?);
        } else {
            l.push(large()?);
            s.push(small()?);
        }
    }
    Ok((s, l))
}

#[allow(clippy::too_many_arguments)]
fn row(
    scenario: &'static str,
    small: &'static str,
    large: &'static str,
    unit: &'static str,
    (s, l): (Vec<Duration>, Vec<Duration>),
    large_host_resident_bytes: Option<u64>,
) -> Result<ScaleRow> {
    let ns = |v: &[Duration]| median(v.to_vec()).as_secs_f64() * 1e9;
    Ok(ScaleRow {
        scenario,
        small,
        large,
        unit,
        small_ns: ns(&s),
        large_ns: ns(&l),
        ratio: PairedRatio::new(&l, &s).ok_or("no rounds")?,
        large_host_resident_bytes,
    })
}

/// `hmm bench scale`: the three rows, `iters` rounds each.
pub(crate) fn scale_rows(
    iters: usize,
    mut progress: impl FnMut(&ScaleRow),
) -> Result<Vec<ScaleRow>> {
    if iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let mut rows = Vec::new();
    let (few, many) = (Notifiers::new(64)?, Notifiers::new(16384)?);
    rows.push(row(
        "notifier_lookup",
        "64 notifiers + 1 long",
        "16384 notifiers + 1 long",
        "ns per one-page invalidation",
        paired(iters, || Ok(few.time(20_000)), || Ok(many.time(20_000)))?,
        None,
    )?);
    progress(rows.last().expect("pushed"));
    drop((few, many));

    if !interrupt::requested() {
        let (alone, family) = (Family::new(1)?, Family::new(256)?);
        rows.push(row(
            "rmap_fork_family",
            "family of 1",
            "family of 256",
            "ns per evicted page",
            paired(iters, || alone.time(), || family.time())?,
            None,
        )?);
        progress(rows.last().expect("pushed"));
    }

    if !interrupt::requested() {
        let mut resident = 0;
        let times = paired(
            iters,
            || Ok(first_touch(8 * GIB, false)?.0),
            || {
                let (t, r) = first_touch(2048 * GIB, true)?;
                resident = r;
                Ok(t)
            },
        )?;
        rows.push(row(
            "machine_size",
            "8 GiB RAM",
            "2 TiB RAM + 8 x 80 GiB devices",
            "ns per first write of a page",
            times,
            Some(resident),
        )?);
        progress(rows.last().expect("pushed"));
    }
    Ok(rows)
}

/// Prints rows as a table.
pub(crate) fn print_table(rows: &[ScaleRow]) {
    outln!(
        "{:>17} {:>26} {:>11} {:>32} {:>11}  {:<26} unit",
        "scenario",
        "small",
        "ns",
        "large",
        "ns",
        "large / small"
    );
    for r in rows {
        outln!(
            "{:>17} {:>26} {:>11.1} {:>32} {:>11.1}  {:<26} {}{}",
            r.scenario,
            r.small,
            r.small_ns,
            r.large,
            r.large_ns,
            format!("{:.2}", r.ratio),
            r.unit,
            r.large_host_resident_bytes
                .map_or(String::new(), |b| format!(
                    " (large machine: {} KiB on the host)",
                    b >> 10
                ))
        );
    }
}
