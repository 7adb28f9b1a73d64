//! What the `tracing` events in the main paths cost.
//!
//! * `callsite_off`: one `debug!` event with two fields when nothing listens (no
//!   subscriber: the callsite's interest is cached as "never", one relaxed load);
//! * `fault_round_trip/*`: one GPU fault that migrates a 4 KiB page to device memory and
//!   the CPU write that takes it back (`migrate_to_ram`): about ten events and spans on the
//!   way (fault batch, make resident, migrate_vma_setup, invalidations, to device,
//!   migrate_to_ram), with no subscriber (`off`), with a subscriber whose filter drops them
//!   all (`filtered`), and with one that formats every event into a sink (`debug`).
//!
//! `off` against `filtered` and `debug`, in the same run, is the cost of the logging when
//! it is off and when it is on; `callsite_off` times ten is the most `off` can cost over a
//! build without the events at all.
//!
//! ```text
//! cargo bench -p hmm-svm --bench tracing
//! ```

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::policy::prefetch::NoPrefetch;
use hmm_svm::{GpuConfig, GpuDevice, GpuVm, VmPolicies};

/// Pages the round trip cycles through.
const PAGES: u64 = 256;

struct Rig {
    mm: Arc<Mm>,
    vm: Arc<GpuVm>,
    a: VirtAddr,
    next: u64,
}

impl Rig {
    fn new() -> Rig {
        let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).unwrap();
        let gpu = GpuDevice::new(
            &phys,
            GpuConfig {
                vram_bytes: 16 << 20,
                ..GpuConfig::default()
            },
        )
        .unwrap();
        let mm = Mm::new(phys);
        let policies = VmPolicies {
            prefetch: Box::new(NoPrefetch),
            ..VmPolicies::plain()
        };
        let vm = GpuVm::with_policies(&gpu, &mm, policies);
        let len = PAGES * PAGE_SIZE;
        let a = mm
            .mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
            .unwrap();
        mm.madvise(a, len, Advice::NoHugePage).unwrap();
        mm.write(a, &vec![1u8; len as usize]).unwrap();
        Rig { mm, vm, a, next: 0 }
    }

    /// The GPU reads the next page (a fault that migrates it), then the CPU writes it (a
    /// fault that migrates it home).
    fn round_trip(&mut self) {
        let p = self.a.checked_add(self.next * PAGE_SIZE).unwrap();
        self.next = (self.next + 1) % PAGES;
        let mut b = [0u8; 8];
        self.vm.read(p, &mut b).unwrap();
        self.mm.write(p, &b).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    c.bench_function("tracing/callsite_off", |b| {
        b.iter(|| {
            tracing::debug!(
                target: "hmm_svm::fault",
                faults = black_box(1u64),
                blocks = black_box(1usize),
                "fault batch"
            )
        })
    });
    let mut g = c.benchmark_group("tracing/fault_round_trip");
    let mut rig = Rig::new();
    g.bench_function("off", |b| b.iter(|| rig.round_trip()));
    let filtered = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("off"))
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(filtered, || {
        g.bench_function("filtered", |b| b.iter(|| rig.round_trip()));
    });
    let on = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "hmm=trace,hmm_svm=trace",
        ))
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(on, || {
        g.bench_function("debug", |b| b.iter(|| rig.round_trip()));
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
