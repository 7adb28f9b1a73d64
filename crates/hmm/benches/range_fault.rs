//! `hmm_range_fault` over a populated 256 MiB private region, in snapshot mode (no
//! requests) and fault mode (`REQ_FAULT | REQ_WRITE` on pages that already satisfy it), with
//! 4 KiB pages and with THPs; and fault mode on an empty region (every page faulted in).
//! Throughput is in pages, so criterion's element rate gives ns per page.
//!
//! `cargo bench -p hmm --bench range_fault`. The calls go through the range in the
//! driver-sized chunks a driver would use (the whole region in one call here: 65536 words).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange,
};
use hmm::phys::{PhysConfig, PhysMem};
use hmm::range_fault::{hmm_range_fault, HmmPfn, HmmPfnFlags, HmmRange};

const REGION: u64 = 256 << 20;
const NPAGES: u64 = REGION / PAGE_SIZE;

struct SetSeq;

impl IntervalNotifierOps for SetSeq {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
        sub.set_seq(seq);
        true
    }
}

struct Setup {
    mm: Arc<Mm>,
    notifier: IntervalNotifier,
    base: VirtAddr,
}

/// A region of `REGION` bytes, written (populated) or not, as 4 KiB pages or THPs.
fn setup(thp: bool, populate: bool) -> Setup {
    let phys = PhysMem::new(PhysConfig {
        size_bytes: REGION + (16 << 20),
        prefault: true,
        per_cpu_lists: true,
    })
    .expect("RAM");
    let mm = Mm::new(phys);
    let base = mm
        .mmap(None, REGION, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
        .expect("mmap");
    let advice = if thp {
        Advice::HugePage
    } else {
        Advice::NoHugePage
    };
    mm.madvise(base, REGION, advice).expect("madvise");
    if populate {
        let step = if thp { PMD_SIZE } else { PAGE_SIZE };
        for at in (0..REGION).step_by(step as usize) {
            mm.write_val(base.checked_add(at).expect("in region"), 1u8)
                .expect("write");
        }
    }
    let notifier = mm
        .interval_notifier_insert(base, REGION, Arc::new(SetSeq))
        .expect("notifier");
    Setup { mm, notifier, base }
}

fn run(s: &Setup, pfns: &mut [HmmPfn], flags: HmmPfnFlags) {
    let mut range = HmmRange {
        notifier: &s.notifier,
        notifier_seq: s.notifier.read_begin(),
        start: s.base,
        end: s.base.checked_add(REGION).expect("end"),
        hmm_pfns: pfns,
        default_flags: flags,
        pfn_flags_mask: HmmPfnFlags::empty(),
        dev_private_owner: None,
    };
    hmm_range_fault(&s.mm.mmap_read(), &mut range).expect("hmm_range_fault");
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hmm_range_fault_256m");
    g.throughput(Throughput::Elements(NPAGES));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    let write = HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE;
    let mut pfns = vec![HmmPfn::default(); NPAGES as usize];
    for (name, thp) in [("4k", false), ("thp", true)] {
        let s = setup(thp, true);
        g.bench_function(format!("snapshot_{name}"), |b| {
            b.iter(|| run(&s, &mut pfns, HmmPfnFlags::empty()));
        });
        g.bench_function(format!("fault_populated_{name}"), |b| {
            b.iter(|| run(&s, &mut pfns, write));
        });
    }
    // Every page faulted in (read faults map the zero page, or the huge zero page).
    for (name, thp) in [("4k", false), ("thp", true)] {
        let s = setup(thp, false);
        g.bench_function(format!("fault_read_empty_{name}"), |b| {
            b.iter_batched(
                || {
                    s.mm.madvise(s.base, REGION, Advice::DontNeed)
                        .expect("dontneed");
                },
                |()| run(&s, &mut pfns, HmmPfnFlags::REQ_FAULT),
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
