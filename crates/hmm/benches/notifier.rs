//! Notifier fan-out: one invalidation (`invalidate_range_start` + `end`) in an address
//! space with N interval notifiers (N = 1, 64, 1024, each over its own 64 KiB), when the
//! range covers all of them (every callback runs: a driver's `set_seq` under its lock)
//! and when it covers one (the interval tree finds it among N). The baseline in the same
//! run is the callbacks' own work alone: N times taking the same driver lock and counting
//! (all of the callback but `set_seq`'s one atomic store). A second group invalidates one
//! page among N = 64, 1024, 16384 short notifiers and one long one spanning them all
//! (compare the rows with each other: the lookup is `O(log N + k)`).
//!
//! `cargo bench -p hmm --bench notifier`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hmm::addr::{VaRange, VirtAddr};
use hmm::mm::Mm;
use hmm::notifier::{
    IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent, NotifierRange,
};
use hmm::phys::{PhysConfig, PhysMem};
use parking_lot::Mutex;

const SPAN: u64 = 64 << 10;
const BASE: VirtAddr = VirtAddr::new(0x7f00_0000_0000);

/// A driver's callback: record the sequence under the driver lock.
struct Driver {
    lock: Mutex<u64>,
}

impl IntervalNotifierOps for Driver {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
        let mut calls = self.lock.lock();
        *calls += 1;
        sub.set_seq(seq);
        true
    }
}

fn bench(c: &mut Criterion) {
    let phys = PhysMem::new(PhysConfig {
        size_bytes: 4 << 20,
        prefault: false,
        per_cpu_lists: true,
    })
    .expect("RAM");
    let mut g = c.benchmark_group("notifier_fanout");
    for n in [1u64, 64, 1024] {
        let mm = Mm::new(phys.clone());
        let driver = Arc::new(Driver {
            lock: Mutex::new(0),
        });
        let subs: Vec<IntervalNotifier> = (0..n)
            .map(|i| {
                let at = BASE.checked_add(i * SPAN).expect("in range");
                mm.interval_notifier_insert(at, SPAN, driver.clone())
                    .expect("insert")
            })
            .collect();
        let all = VaRange::from_len(BASE, n * SPAN).expect("range");
        let one =
            VaRange::from_len(BASE.checked_add(n / 2 * SPAN).expect("in"), SPAN).expect("range");
        let invalidate = |range: VaRange| {
            mm.notifiers()
                .invalidate_range_start(NotifierRange::new(
                    mm.id(),
                    range,
                    NotifierEvent::Clear,
                    None,
                ))
                .end();
        };
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::new("covering_all", n), |b| {
            b.iter(|| invalidate(all));
        });
        g.bench_function(BenchmarkId::new("callbacks_alone", n), |b| {
            b.iter(|| {
                for s in &subs {
                    let mut calls = driver.lock.lock();
                    *calls += 1;
                    std::hint::black_box(s);
                }
            });
        });
        g.throughput(Throughput::Elements(1));
        // Checked before timing it, so a filter that skips the bench skips nothing else.
        let before = *driver.lock.lock();
        invalidate(one);
        assert_eq!(
            *driver.lock.lock(),
            before + 1,
            "the covered notifier was called"
        );
        g.bench_function(BenchmarkId::new("covering_one", n), |b| {
            b.iter(|| invalidate(one));
        });
    }
    g.finish();

    // One long notifier (a whole-address-space mirror) among N short ones: the lookup of
    // a 4 KiB range must stay O(log N + k), not scan the short ones the long one spans.
    let mut g = c.benchmark_group("notifier_lookup_with_long");
    for n in [64u64, 1024, 16384] {
        let mm = Mm::new(phys.clone());
        let driver = Arc::new(Driver {
            lock: Mutex::new(0),
        });
        let _subs: Vec<IntervalNotifier> = (0..n)
            .map(|i| {
                let at = BASE.checked_add(i * SPAN).expect("in range");
                mm.interval_notifier_insert(at, SPAN, driver.clone())
                    .expect("insert")
            })
            .chain(std::iter::once(
                mm.interval_notifier_insert(
                    VirtAddr::new(0),
                    BASE.as_u64() + (n + 1) * SPAN,
                    driver.clone(),
                )
                .expect("insert the long one"),
            ))
            .collect();
        let page =
            VaRange::from_len(BASE.checked_add(n / 2 * SPAN).expect("in"), 4096).expect("range");
        let invalidate = || {
            mm.notifiers()
                .invalidate_range_start(NotifierRange::new(
                    mm.id(),
                    page,
                    NotifierEvent::Clear,
                    None,
                ))
                .end();
        };
        let before = *driver.lock.lock();
        invalidate();
        assert_eq!(
            *driver.lock.lock(),
            before + 2,
            "the short and the long one were called"
        );
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("one_page", n), |b| b.iter(invalidate));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
