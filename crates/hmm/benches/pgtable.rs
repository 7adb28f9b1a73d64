//! The page-table walk every operation goes through: a [`Cursor`] over 64 MiB of present
//! PTEs (16384 entries), one slot per PTE (a lock taken per table, each entry decoded) and
//! batched (one run per table, as `hmm_range_fault` walks), against a plain loop over a
//! flat array of the same 16384 words in the same run: what the tree, the locks and the
//! decoding cost above reading the words. Throughput in entries, so criterion's rate is
//! entries per second.
//!
//! `cargo bench -p hmm --bench pgtable`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm::addr::{Pfn, VaRange, VirtAddr, PAGE_SIZE};
use hmm::pgtable::{Huge, PageTable, Pte, PteFlags, Slot, WalkMode};

const REGION: u64 = 64 << 20;
const NPAGES: u64 = REGION / PAGE_SIZE;

fn pte(i: u64) -> Pte {
    Pte::Present {
        pfn: Pfn::new(0x1000 + i),
        flags: PteFlags::WRITE | PteFlags::YOUNG,
    }
}

fn bench(c: &mut Criterion) {
    let range = VaRange::from_len(VirtAddr::new(0x7f00_0000_0000), REGION).expect("range");
    let pt = PageTable::new();
    {
        let mut cur = pt.cursor(range, WalkMode::Populate);
        let mut i = 0;
        while let Some(slot) = cur.next() {
            let Slot::Pte(p) = slot else {
                panic!("a populated walk yields PTEs")
            };
            p.set(pte(i));
            i += 1;
        }
        assert_eq!(i, NPAGES);
    }
    let words: Vec<u64> = (0..NPAGES).map(|i| pte(i).encode(Huge::Pte)).collect();

    let mut g = c.benchmark_group("pgtable_walk_64m");
    g.throughput(Throughput::Elements(NPAGES));
    g.bench_function("cursor_per_pte", |b| {
        b.iter(|| {
            let mut cur = pt.cursor(range, WalkMode::Lookup);
            let mut present = 0u64;
            while let Some(slot) = cur.next() {
                if let Slot::Pte(p) = slot {
                    present += u64::from(p.get().is_accessible());
                }
            }
            assert_eq!(present, NPAGES);
        });
    });
    g.bench_function("cursor_batched", |b| {
        b.iter(|| {
            let mut cur = pt.cursor(range, WalkMode::Lookup);
            cur.set_batch(true);
            let mut present = 0u64;
            while let Some(slot) = cur.next() {
                if let Slot::Pte(p) = slot {
                    for k in 0..p.len() {
                        present += u64::from(p.get_at(k).is_accessible());
                    }
                }
            }
            assert_eq!(present, NPAGES);
        });
    });
    g.bench_function("flat_array_baseline", |b| {
        b.iter(|| {
            let present = black_box(&words)
                .iter()
                .filter(|w| Pte::decode(**w).is_accessible())
                .count() as u64;
            assert_eq!(present, NPAGES);
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
