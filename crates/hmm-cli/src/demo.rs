//! `hmm demo`: the seed story on the built-in simulated devices.
//!
//! A process fills a buffer; it is migrated to device 0; the CPU reads half of it back
//! (each page faults into device 0's `migrate_to_ram`); the whole range is migrated to
//! device 0 again (OpenCL's `clEnqueueSVMMigrateMem` called twice: seed 002), which must
//! neither invalidate nor copy the half still on the device; device 1 then tries the same
//! range, leaves device 0's pages alone, and reads them through faults. Every byte is
//! checked. The same story with device 0's owner filter off (the behaviour before the seed
//! series) gives the baseline invalidation count.
//!
//! Each step is printed as it happens, with one line on why it matters and what its
//! counters show; owners are named by device. `--json` prints one object at the end,
//! versioned by `schema_version`, with every counter named (notifier invalidations by the
//! kernel's event name).

use std::error::Error;
use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::{NotifierEvent, Recorder};
use hmm::phys::{PhysConfig, PhysMem};
use hmm::stats::MmStats;
use hmm_dmirror::{Dmirror, DmirrorConfig, DmirrorDriver, MirrorStats};
use serde::Serialize;

use crate::limits::{round_2m, Need, MIB};

/// The version of the `--json` object's layout: raised when a field changes meaning or
/// goes away (fields may be added without it).
const SCHEMA_VERSION: u32 = 2;

#[derive(Serialize)]
struct Event {
    event: &'static str,
    owner: Option<u64>,
    /// The device whose owner cookie `owner` is, if one of the demo's.
    owner_device: Option<usize>,
    start: String,
    end: String,
    pages: u64,
}

#[derive(Serialize)]
struct Step {
    step: &'static str,
    /// What the step's command reported, if it ran one.
    outcome: String,
    /// Why the step matters, with the figures that show it.
    why: String,
    events: Vec<Event>,
    cost: MmStats,
    /// Device 0's mirror counters over the step.
    device0: MirrorStats,
}

#[derive(Serialize)]
struct Report {
    schema_version: u32,
    pages: u64,
    /// The devices' owner cookies, as the events' `owner` carries them.
    device_owners: Vec<u64>,
    steps: Vec<Step>,
    /// Device 0 mirror pages invalidated by the second migration (all of them were
    /// already on device 0 or came back from the CPU).
    remigrate_device_invalidations: u64,
    /// Pages already on device 0 that the second migration copied (or moved).
    remigrate_pages_copied: u64,
    /// Pages the second migration copied to device 0 (the half the CPU had taken back).
    remigrate_pages_migrated: u64,
    /// The same second migration with the owner filter off: device 0 pages invalidated.
    baseline_device_invalidations: u64,
    /// Device 1's migration of the range: pages it could read back, and its error.
    device1_migrate: String,
    bytes_verified: u64,
    corrupted_bytes: u64,
    frames_in_use_after_munmap: u64,
    device_pages_in_use_after_munmap: u64,
    total: MmStats,
}

/// The byte at offset `i` of the buffer.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i as u8)
}

/// A machine with the dmirror driver, one process, its buffer and a user buffer for
/// device data.
struct Stage {
    phys: Arc<PhysMem>,
    driver: DmirrorDriver,
    mm: Arc<Mm>,
    buf: VirtAddr,
    user: VirtAddr,
    pages: u64,
}

/// Simulated RAM for a buffer of `pages` pages: the buffer, the user buffer the device
/// reads into, room for the pages coming back, and some to spare.
fn ram_bytes(pages: u64) -> u64 {
    round_2m(pages * PAGE_SIZE) * 3 + 8 * MIB
}

/// What a demo of `pages` pages needs: the buffer and the user buffer in RAM, device 0's
/// copy, and the pattern and read-backs the check compares; about 5.2 times the buffer
/// measured, counted as 6.
pub(crate) fn need(pages: u64) -> Need {
    Need {
        ram: ram_bytes(pages),
        host: 6 * pages * PAGE_SIZE + 64 * MIB,
    }
}

impl Stage {
    fn new(pages: u64) -> Result<Stage, Box<dyn Error>> {
        let len = pages * PAGE_SIZE;
        let phys = PhysMem::new(PhysConfig::with_size(ram_bytes(pages)))?;
        let chunk = round_2m(len);
        let driver = DmirrorDriver::new(
            &phys,
            DmirrorConfig {
                chunk_bytes: chunk,
                max_chunks: 2,
            },
        );
        let mm = Mm::new(phys.clone());
        let rw = Prot::READ | Prot::WRITE;
        let buf = mm.mmap(None, len, rw, MapFlags::PRIVATE)?;
        let user = mm.mmap(None, len, rw, MapFlags::PRIVATE)?;
        Ok(Stage {
            phys,
            driver,
            mm,
            buf,
            user,
            pages,
        })
    }

    fn fill(&self) -> Result<(), Box<dyn Error>> {
        let data: Vec<u8> = (0..self.pages * PAGE_SIZE).map(pattern).collect();
        self.mm.write(self.buf, &data)?;
        Ok(())
    }

    /// The CPU reads the first `npages` pages back (faulting them out of device memory).
    fn cpu_read(&self, npages: u64) -> Result<Vec<u8>, Box<dyn Error>> {
        let mut b = vec![0u8; (npages * PAGE_SIZE) as usize];
        self.mm.read(self.buf, &mut b)?;
        Ok(b)
    }

    /// Device 0's frame for every page (`None` where it maps nothing).
    fn device_frames(&self, d: &Dmirror) -> Vec<Option<u64>> {
        (0..self.pages)
            .map(|i| {
                let va = self.buf.checked_add(i * PAGE_SIZE).expect("in the buffer");
                d.lookup(va).map(|e| e.frame_nr)
            })
            .collect()
    }
}

/// The second migration's device 0 invalidations with the owner filter off: the
/// behaviour before the seed series, on a machine of its own.
fn baseline_invalidations(pages: u64) -> Result<u64, Box<dyn Error>> {
    let s = Stage::new(pages)?;
    let d0 = Dmirror::open(s.driver.device(0), &s.mm)?;
    d0.set_owner_filter(false);
    s.fill()?;
    d0.migrate_to_dev(s.buf, pages, s.user)?;
    s.cpu_read(pages / 2)?;
    let before = d0.stats();
    // Without the filter the device loses its mappings of the pages it already had, so the
    // read-back fails with ENOENT; only the count matters here.
    let _ = d0.migrate_to_dev(s.buf, pages, s.user);
    Ok(d0.stats().since(&before).pages_invalidated)
}

pub(crate) fn run(pages: u64, json: bool) -> Result<(), Box<dyn Error>> {
    if pages < 2 {
        return Err("--pages must be at least 2".into());
    }
    let baseline = baseline_invalidations(pages)?;

    let s = Stage::new(pages)?;
    let rec = Arc::new(Recorder::new());
    let _rec_handle = s.mm.register_notifier(rec.clone())?;
    let d0 = Dmirror::open(s.driver.device(0), &s.mm)?;
    let d1 = Dmirror::open(s.driver.device(1), &s.mm)?;
    let owners: Vec<u64> = s
        .driver
        .devices()
        .iter()
        .map(|d| d.owner().as_u64())
        .collect();
    let device_of = |owner: Option<u64>| owner.and_then(|o| owners.iter().position(|&d| d == o));
    if !json {
        outln!(
            "hmm demo: the seed story, {} pages ({} KiB) of one process, devices 0 and 1 (device-private memory)",
            pages,
            pages * PAGE_SIZE / 1024
        );
        outln!(
            "(a \"walk\" is one pass of a page-table walker over the range; the seed series is about making fewer of them)\n"
        );
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut last = s.mm.stats();
    let mut last_d0 = d0.stats();
    let mut step = |name: &'static str,
                    outcome: String,
                    s: &Stage,
                    why: &dyn Fn(&MmStats, &MirrorStats) -> String| {
        let now = s.mm.stats();
        let now_d0 = d0.stats();
        let events = rec
            .take()
            .into_iter()
            .map(|r| Event {
                event: r.event.kernel_name(),
                owner: r.owner.map(|o| o.as_u64()),
                owner_device: device_of(r.owner.map(|o| o.as_u64())),
                start: format!("{:#x}", r.start().as_u64()),
                end: format!("{:#x}", r.end().as_u64()),
                pages: r.range.npages(),
            })
            .collect();
        let cost = now.since(&last);
        let device0 = now_d0.since(&last_d0);
        let st = Step {
            step: name,
            outcome,
            why: why(&cost, &device0),
            events,
            cost,
            device0,
        };
        if !json {
            print_step(steps.len() + 1, &st);
        }
        steps.push(st);
        last = now;
        last_d0 = now_d0;
    };

    s.fill()?;
    step("CPU fills the buffer", String::new(), &s, &|c, _| {
        format!(
            "the buffer's pages now exist in system RAM ({} write faults); no device has seen them",
            c.faults.total()
        )
    });
    let c = d0.migrate_to_dev(s.buf, pages, s.user)?;
    step(
        "migrate to device 0",
        format!("cpages {}", c.cpages),
        &s,
        &|c, d| {
            format!(
                "migrate_vma moved {} pages into device 0's private memory in {} walk(s); the CPU page table now holds device-private entries, and device 0 skipped its own MIGRATE invalidation ({} skipped)",
                c.migrate.pages_migrated,
                c.range_walks.total(),
                d.migrate_skips
            )
        },
    );
    let half = pages / 2;
    s.cpu_read(half)?;
    step(
        "CPU reads the first half back",
        String::new(),
        &s,
        &|c, d| {
            format!(
            "the CPU cannot read device-private memory: each of its {} reads of a device page faulted, and device 0's migrate_to_ram copied that page home ({} copied out)",
            c.faults.device_private, d.pages_copied_to_system
        )
        },
    );
    let frames = s.device_frames(&d0);
    let before = d0.stats();
    let c = d0.migrate_to_dev(s.buf, pages, s.user)?;
    let again = d0.stats().since(&before);
    let moved = frames
        .iter()
        .zip(&s.device_frames(&d0))
        .filter(|(b, a)| b.is_some() && b != a)
        .count() as u64;
    step(
        "migrate to device 0 again",
        format!("cpages {}", c.cpages),
        &s,
        &|_, d| {
            format!(
                "the seed series' point: the {} pages still on device 0 were neither invalidated ({}) nor copied ({}); only the {} the CPU took back moved",
                pages - half,
                d.pages_invalidated,
                moved,
                d.pages_copied_to_device + d.pages_zero_filled
            )
        },
    );
    let device1_migrate = match d1.migrate_to_dev(s.buf, pages, s.user) {
        Ok(c) => format!("cpages {}", c.cpages),
        Err(e) => format!("{e} ({}), as expected", e.ret()),
    };
    step(
        "device 1 migrates the range",
        device1_migrate.clone(),
        &s,
        &|c, d| {
            format!(
                "device 1 selects system pages and its own, and every page is device 0's (owner of device 0), so none moved ({} migrated) and its read-back found none of its own; device 0 still lost its mappings of the range ({} pages invalidated), since device 1's MIGRATE event carries device 1's owner, not its own",
                c.migrate.pages_migrated, d.pages_invalidated
            )
        },
    );
    let c = d1.read(s.buf, pages, s.user)?;
    let mut via_d1 = vec![0u8; (pages * PAGE_SIZE) as usize];
    s.mm.read(s.user, &mut via_d1)?;
    step(
        "device 1 reads the range",
        format!("cpages {}, faults {}", c.cpages, c.faults),
        &s,
        &|c, d| {
            format!(
                "device 1 cannot map device 0's private pages: its hmm_range_fault faulted them, and each fault ran device 0's migrate_to_ram, which sent the page home ({} CPU-side faults on device pages, {} pages copied out of device 0)",
                c.faults.device_private, d.pages_copied_to_system
            )
        },
    );
    let cpu = s.cpu_read(pages)?;
    step("CPU reads the whole range", String::new(), &s, &|c, _| {
        format!(
            "every page is in system RAM again, so the reads fault nothing ({} faults)",
            c.faults.total()
        )
    });
    let mut corrupted = 0u64;
    for (i, (a, b)) in cpu.iter().zip(&via_d1).enumerate() {
        let want = pattern(i as u64);
        corrupted += u64::from(*a != want) + u64::from(*b != want);
    }
    let verified = 2 * pages * PAGE_SIZE;
    s.mm.munmap(s.buf, pages * PAGE_SIZE)?;
    s.mm.munmap(s.user, pages * PAGE_SIZE)?;
    step("munmap", String::new(), &s, &|c, _| {
        format!(
            "the buffers go away: {} frames freed, and nothing may be left on either device",
            c.frames_freed
        )
    });
    let device_in_use: u64 = s.driver.devices().iter().map(|d| d.nr_in_use()).sum();
    let report = Report {
        schema_version: SCHEMA_VERSION,
        pages,
        device_owners: owners,
        steps,
        remigrate_device_invalidations: again.pages_invalidated,
        remigrate_pages_copied: moved,
        remigrate_pages_migrated: again.pages_copied_to_device + again.pages_zero_filled,
        baseline_device_invalidations: baseline,
        device1_migrate,
        bytes_verified: verified,
        corrupted_bytes: corrupted,
        frames_in_use_after_munmap: s.phys.nr_in_use(),
        device_pages_in_use_after_munmap: device_in_use,
        total: s.mm.stats(),
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    if report.corrupted_bytes != 0
        || report.frames_in_use_after_munmap != 0
        || report.device_pages_in_use_after_munmap != 0
        || report.remigrate_device_invalidations != 0
        || report.remigrate_pages_copied != 0
    {
        return Err("demo invariants failed".into());
    }
    Ok(())
}

/// Prints step `n` as it happens.
fn print_step(n: usize, s: &Step) {
    let c = &s.cost;
    let d = &s.device0;
    if s.outcome.is_empty() {
        outln!("== {n}. {}", s.step);
    } else {
        outln!("== {n}. {}: {}", s.step, s.outcome);
    }
    outln!("   why: {}", s.why);
    const SHOWN: usize = 3;
    for e in s.events.iter().take(SHOWN) {
        let owner = match (e.owner_device, e.owner) {
            (Some(dev), _) => format!(", owner of device {dev}"),
            (None, Some(o)) => format!(", owner {o:#x}"),
            (None, None) => String::new(),
        };
        outln!(
            "   notifier: {:<22} [{}, {}) {} pages{owner}",
            e.event,
            e.start,
            e.end,
            e.pages
        );
    }
    if s.events.len() > SHOWN {
        outln!("   notifier: ... and {} more", s.events.len() - SHOWN);
    }
    outln!(
        "   cpu: {} walks, {} faults ({} on device pages), {} TLB flushes; migrate: {} collected, {} migrated, {} restored",
        c.range_walks.total(),
        c.faults.total(),
        c.faults.device_private,
        c.tlb_flush_ops,
        c.migrate.pages_collected,
        c.migrate.pages_migrated,
        c.migrate.pages_restored,
    );
    outln!(
        "   device 0: {} invalidations ({} pages), {} own MIGRATE skipped, {} pages copied in, {} out, {} zero-filled",
        d.invalidations,
        d.pages_invalidated,
        d.migrate_skips,
        d.pages_copied_to_device,
        d.pages_copied_to_system,
        d.pages_zero_filled,
    );
}

/// Prints what the story showed, after the steps.
fn print_summary(r: &Report) {
    outln!();
    outln!(
        "second migration: {} pages migrated; pages already on device 0: {} invalidated, {} copied (baseline without the owner filter: {} invalidated)",
        r.remigrate_pages_migrated,
        r.remigrate_device_invalidations,
        r.remigrate_pages_copied,
        r.baseline_device_invalidations
    );
    let t = &r.total;
    let by_event: Vec<String> = NotifierEvent::ALL
        .iter()
        .filter(|e| t.notifier.of(**e) > 0)
        .map(|e| format!("{} {}", e.kernel_name(), t.notifier.of(*e)))
        .collect();
    outln!("invalidations by event: {}", by_event.join(", "));
    outln!(
        "bytes verified: {}, corrupted: {}, frames in use after munmap: {} (device: {})",
        r.bytes_verified,
        r.corrupted_bytes,
        r.frames_in_use_after_munmap,
        r.device_pages_in_use_after_munmap
    );
}
