//! `hmm demo`: the CPU side of an address space, step by step.

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::{
    IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent, NotifierRange, Recorder,
};
use hmm::phys::{PhysConfig, PhysMem};
use hmm::stats::MmStats;
use serde::Serialize;

/// A minimal mirror: an interval notifier that records the seq on every invalidation, as
/// a device driver would before dropping its device mappings.
#[derive(Default)]
struct Mirror {
    invalidations: AtomicU64,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &IntervalSub, _range: &NotifierRange, cur: InvalidateSeq) -> bool {
        sub.set_seq(cur);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[derive(Serialize)]
struct Event {
    event: &'static str,
    start: String,
    end: String,
    pages: u64,
}

#[derive(Serialize)]
struct Step {
    step: &'static str,
    events: Vec<Event>,
    cost: MmStats,
}

#[derive(Serialize)]
struct Report {
    pages: u64,
    steps: Vec<Step>,
    mirror_invalidations: u64,
    mirror_read_retry_after_mprotect: bool,
    bytes_verified: u64,
    corrupted_bytes: u64,
    frames_in_use_after_munmap: u64,
    total: MmStats,
}

fn pattern(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x4855_4D00
}

pub(crate) fn run(pages: u64, json: bool) -> Result<(), Box<dyn Error>> {
    if pages == 0 {
        return Err("--pages must be at least 1".into());
    }
    let ram = (pages * PAGE_SIZE).div_ceil(2 << 20) * (2 << 20) + (8 << 20);
    let phys = PhysMem::new(PhysConfig::with_size(ram))?;
    let mm = Mm::new(phys.clone());
    let rec = Arc::new(Recorder::new());
    let _rec_handle = mm.register_notifier(rec.clone())?;
    let len = pages * PAGE_SIZE;
    let mut steps = Vec::new();
    let mut last = mm.stats();
    let mut step = |name: &'static str, mm: &Mm| {
        let now = mm.stats();
        let events = rec
            .take()
            .into_iter()
            .map(|r| Event {
                event: r.event.kernel_name(),
                start: format!("{:#x}", r.start().as_u64()),
                end: format!("{:#x}", r.end().as_u64()),
                pages: r.range.npages(),
            })
            .collect();
        steps.push(Step {
            step: name,
            events,
            cost: now.since(&last),
        });
        last = now;
    };

    let buf = mm.mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
    let mirror = Arc::new(Mirror::default());
    let sub = mm.interval_notifier_insert(buf, len, mirror.clone())?;
    step("mmap", &mm);

    let mut sum = 0u64;
    for i in 0..pages {
        sum = sum.wrapping_add(mm.read_val::<u64>(at(buf, i))?);
    }
    if sum != 0 {
        return Err("fresh anonymous memory did not read as zero".into());
    }
    step("read fault (zero page)", &mm);

    for i in 0..pages {
        mm.write_val(at(buf, i), pattern(i))?;
    }
    step("write fault (copy from zero page)", &mm);

    let seq = sub.read_begin();
    mm.mprotect(buf, len / 2, Prot::READ)?;
    let retry = sub.read_retry(seq);
    step("mprotect first half read-only", &mm);

    let refused = mm.write_val(buf, 1u64).is_err();
    let mut verified = 0u64;
    let mut corrupted = 0u64;
    for i in 0..pages {
        let mut bytes = [0u8; PAGE_SIZE as usize];
        mm.read(at(buf, i), &mut bytes)?;
        let mut expect = [0u8; PAGE_SIZE as usize];
        expect[..8].copy_from_slice(&pattern(i).to_le_bytes());
        corrupted += bytes.iter().zip(&expect).filter(|(a, b)| a != b).count() as u64;
        verified += PAGE_SIZE;
    }
    step("verify every byte", &mm);

    mm.munmap(buf, len)?;
    step("munmap", &mm);
    let in_use = phys.nr_in_use();
    let report = Report {
        pages,
        steps,
        mirror_invalidations: mirror.invalidations.load(Ordering::Relaxed),
        mirror_read_retry_after_mprotect: retry,
        bytes_verified: verified,
        corrupted_bytes: corrupted,
        frames_in_use_after_munmap: in_use,
        total: mm.stats(),
    };
    drop(sub);

    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, buf, refused);
    }
    if corrupted != 0 || in_use != 0 || !refused || !retry {
        return Err("demo invariants failed".into());
    }
    Ok(())
}

fn at(buf: VirtAddr, i: u64) -> VirtAddr {
    buf.checked_add(i * PAGE_SIZE).expect("inside the buffer")
}

fn print_report(r: &Report, buf: VirtAddr, refused: bool) {
    println!(
        "hmm demo: one address space, {} pages ({} KiB) at {buf}\n",
        r.pages,
        r.pages * PAGE_SIZE / 1024
    );
    for s in &r.steps {
        let c = &s.cost;
        println!("== {}", s.step);
        const SHOWN: usize = 3;
        for e in s.events.iter().take(SHOWN) {
            println!(
                "   notifier: {:<27} [{}, {}) {} pages",
                e.event, e.start, e.end, e.pages
            );
        }
        if s.events.len() > SHOWN {
            println!("   notifier: ... and {} more", s.events.len() - SHOWN);
        }
        println!(
            "   cost: {} walks, {} entries, {} faults (zero {}, alloc {}, cow {}), {} TLB flushes \
             ({} pages), {} frames allocated, {} freed",
            c.walk.walks,
            c.walk.entries_visited,
            c.faults.total(),
            c.faults.anon_read_zero,
            c.faults.anon_write,
            c.faults.cow,
            c.tlb_flush_ops,
            c.tlb_flush_pages,
            c.frames_allocated,
            c.frames_freed,
        );
    }
    println!();
    println!(
        "mirror: {} invalidations seen by its interval notifier; read_retry after mprotect: {}",
        r.mirror_invalidations, r.mirror_read_retry_after_mprotect
    );
    println!("write to the read-only half refused with SIGSEGV: {refused}");
    let t = &r.total;
    let by_event: Vec<String> = NotifierEvent::ALL
        .iter()
        .filter(|e| t.notifier.of(**e) > 0)
        .map(|e| format!("{} {}", e.kernel_name(), t.notifier.of(*e)))
        .collect();
    println!("invalidations by event: {}", by_event.join(", "));
    println!(
        "bytes verified: {}, corrupted: {}, frames in use after munmap: {}",
        r.bytes_verified, r.corrupted_bytes, r.frames_in_use_after_munmap
    );
}
