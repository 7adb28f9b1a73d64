//! What swap and userfaultfd cost, each against a baseline in the same run:
//!
//! - `swap/pageout_and_swap_in`: 256 pages (1 MiB) written out by `MADV_PAGEOUT` and read
//!   back by CPU faults, against `memcpy` of the same bytes out and back (the two copies
//!   the round trip makes);
//! - `uffd/missing_fault`: a CPU read of a page a userfaultfd handler thread supplies
//!   (queue the message, drop the mmap lock, wake the handler, `UFFDIO_COPY`, wake the
//!   fault, retry), against an ordinary first-touch write fault.
//!
//! `cargo bench -p hmm --bench reclaim`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::userfaultfd::{CopyMode, RegisterMode, UffdFeatures, UffdMsg, Userfaultfd};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};

const PAGES: u64 = 256;
const RW: Prot = Prot::READ.union(Prot::WRITE);

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    a.checked_add(i * PAGE_SIZE).expect("in mapping")
}

fn swap(c: &mut Criterion) {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).expect("RAM");
    phys.swapon(16 << 20).expect("swapon");
    let mm = Mm::new(phys);
    let a = mm
        .mmap(None, PAGES * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .expect("mmap");
    mm.madvise(a, PAGES * PAGE_SIZE, Advice::NoHugePage)
        .expect("madvise");
    mm.write(a, &vec![0x5a; (PAGES * PAGE_SIZE) as usize])
        .expect("write");
    let mut g = c.benchmark_group("swap");
    g.throughput(Throughput::Bytes(PAGES * PAGE_SIZE));
    g.bench_function("pageout_and_swap_in", |b| {
        b.iter(|| {
            mm.madvise(a, PAGES * PAGE_SIZE, Advice::PageOut)
                .expect("pageout");
            for i in 0..PAGES {
                black_box(mm.read_val::<u8>(page(a, i)).expect("swap-in"));
            }
        })
    });
    let src = vec![0x5au8; (PAGES * PAGE_SIZE) as usize];
    let mut slot = vec![0u8; src.len()];
    let mut back = vec![0u8; src.len()];
    g.bench_function("memcpy_out_and_back", |b| {
        b.iter(|| {
            slot.copy_from_slice(black_box(&src));
            back.copy_from_slice(black_box(&slot));
        })
    });
    g.finish();
}

/// Times `iters` faults: `PAGES` pages per fresh mapping, each touched once; with `uffd`,
/// the mapping is registered and a handler thread supplies every page.
fn faults(mm: &Mm, uffd: Option<&Userfaultfd>, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(PAGES);
        let a = mm
            .mmap(None, n * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .expect("mmap");
        if let Some(u) = uffd {
            u.register(a, n * PAGE_SIZE, RegisterMode::MISSING)
                .expect("register");
        }
        let t = Instant::now();
        for i in 0..n {
            match uffd {
                Some(_) => {
                    black_box(mm.read_val::<u8>(page(a, i)).expect("read"));
                }
                None => mm.write_val(page(a, i), 1u8).expect("write"),
            }
        }
        total += t.elapsed();
        mm.munmap(a, n * PAGE_SIZE).expect("munmap");
        left -= n;
    }
    total
}

fn uffd(c: &mut Criterion) {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).expect("RAM");
    let mm = Mm::new(phys);
    let uffd = Userfaultfd::new(&mm, UffdFeatures::empty()).expect("userfaultfd");
    let stop = AtomicBool::new(false);
    let mut g = c.benchmark_group("uffd");
    g.throughput(Throughput::Elements(1));
    std::thread::scope(|s| {
        s.spawn(|| {
            let bytes = [0xabu8; PAGE_SIZE as usize];
            while !stop.load(Ordering::Acquire) {
                if let Some(UffdMsg::PageFault { address, .. }) =
                    uffd.read_timeout(Duration::from_millis(10))
                {
                    uffd.copy(address, &bytes, CopyMode::empty()).expect("copy");
                }
            }
        });
        g.bench_function("missing_fault", |b| {
            b.iter_custom(|iters| faults(&mm, Some(&uffd), iters))
        });
        g.bench_function("anon_write_fault", |b| {
            b.iter_custom(|iters| faults(&mm, None, iters))
        });
        stop.store(true, Ordering::Release);
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = swap, uffd
}
criterion_main!(benches);
