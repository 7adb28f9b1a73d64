//! The deterministic engine's speed on accesses that hit resident pages: a scenario whose
//! buffer is prefetched to the GPU and then read four times, in events per second, for the
//! phases alone (`hmm_run_events`: the time each run reports as `wall_seconds`, without the
//! machine's set-up and the final checks) and for a whole run (`hmm_run`); and, as the
//! baseline, the same accesses made by a bare loop of `GpuVm::try_access` (what the engine
//! adds is its scheduling, its patterns, its cost model and its shadow).
//!
//! `cargo bench -p hmm-sim --bench engine`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_sim::engine::run;
use hmm_sim::scenario::parse;
use hmm_svm::{GpuConfig, GpuDevice, GpuVm, VmPolicies};

const HITS: &str = r#"
name = "hits"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 16 }]
[[buffer]]
name = "a"
mib = 4
[[phase]]
prefetch = [{ buffer = "a", to = "gpu0" }]
agents = [{ on = "gpu0", buffer = "a", access_bytes = 64, passes = 4 }]
"#;

/// Accesses of one run: 4 MiB in 64-byte reads, four times.
const EVENTS: u64 = 4 * (4 << 20) / 64;

fn engine(c: &mut Criterion) {
    let s = parse(HITS, &[]).expect("a valid scenario");
    let mut g = c.benchmark_group("engine_hits");
    g.throughput(Throughput::Elements(EVENTS));
    g.sample_size(10);
    g.bench_function("hmm_run_events", |b| {
        b.iter_custom(|iters| {
            let mut phases = std::time::Duration::ZERO;
            for _ in 0..iters {
                let m = run(&s).expect("the run");
                assert_eq!((m.events, m.corrupted_bytes), (EVENTS, 0));
                phases += std::time::Duration::from_secs_f64(m.wall_seconds);
            }
            phases
        })
    });
    g.bench_function("hmm_run", |b| {
        b.iter(|| {
            let m = run(&s).expect("the run");
            assert_eq!((m.events, m.corrupted_bytes), (EVENTS, 0));
        })
    });
    // The baseline: the same reads, a bare loop over the driver.
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).expect("RAM");
    let gpu = GpuDevice::new(
        &phys,
        GpuConfig {
            vram_bytes: 16 << 20,
            ..GpuConfig::default()
        },
    )
    .expect("a GPU");
    let mm = Mm::new(Arc::clone(&phys));
    let vm = GpuVm::with_policies(&gpu, &mm, VmPolicies::plain());
    let a = mm
        .mmap(None, 4 << 20, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
        .expect("a buffer");
    mm.write(a, &vec![1u8; 4 << 20]).expect("filled");
    vm.prefetch(a, 4 << 20).expect("resident");
    g.bench_function("bare_try_access_baseline", |b| {
        let mut buf = [0u8; 64];
        b.iter(|| {
            for _ in 0..4 {
                for k in 0..(4u64 << 20) / 64 {
                    let at = a.checked_add(k * 64).expect("inside");
                    let r = vm.try_access(at, false, &mut buf).expect("an access");
                    assert!(r.fault().is_none());
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
