//! First-touch faults: per 4 KiB page, the model's write fault (allocate + zero + map) and
//! zero-page read fault; per 2 MiB, the model's THP write fault (allocate + zero 2 MiB +
//! map a PMD leaf). Each against this machine's kernel doing the same (anonymous `mmap` +
//! touch, with `MADV_NOHUGEPAGE` or `MADV_HUGEPAGE`) in the same run.
//!
//! `cargo bench -p hmm --bench fault`. The model's RAM is prefaulted on the host first, so
//! the model's figures do not include the host's own first-touch of the arena.
//!
//! The kernel baseline needs `mmap`/`madvise`/`munmap` from libc: the only `unsafe` outside
//! the frame arena, each block with its argument.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};

const BATCH: u64 = 1024;
/// THPs per fresh mapping.
const THP_BATCH: u64 = 16;

#[derive(Clone, Copy)]
enum Touch {
    Write,
    Read,
}

/// Times `iters` first-touch faults in the model, `BATCH` pages per fresh mapping.
fn model(mm: &Mm, touch: Touch, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let a = mm
            .mmap(
                None,
                n * PAGE_SIZE,
                Prot::READ | Prot::WRITE,
                MapFlags::PRIVATE,
            )
            .expect("mmap");
        let t = Instant::now();
        for i in 0..n {
            let at = a.checked_add(i * PAGE_SIZE).expect("in mapping");
            match touch {
                Touch::Write => mm.write_val(at, 1u8).expect("write"),
                Touch::Read => {
                    black_box(mm.read_val::<u8>(at).expect("read"));
                }
            }
        }
        total += t.elapsed();
        mm.munmap(a, n * PAGE_SIZE).expect("munmap");
        left -= n;
    }
    total
}

/// Times `iters` first-touch faults of the host kernel, `BATCH` pages per fresh mapping.
fn kernel(touch: Touch, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH) as usize;
        let len = n * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping with no address hint; the result is
        // checked before use and unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap failed");
        // SAFETY: `p`/`len` is the mapping just created; the advice only affects THP.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        let base = p.cast::<u8>();
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: `i * PAGE_SIZE < len`, so the pointer stays inside the mapping.
            let b = unsafe { base.add(i * PAGE_SIZE as usize) };
            match touch {
                // SAFETY: `b` points into the live, writable mapping.
                Touch::Write => unsafe { std::ptr::write_volatile(b, 1) },
                Touch::Read => {
                    // SAFETY: `b` points into the live, readable mapping.
                    black_box(unsafe { std::ptr::read_volatile(b) });
                }
            }
        }
        total += t.elapsed();
        // SAFETY: unmaps exactly the mapping created above; no reference into it remains.
        unsafe { libc::munmap(p, len) };
        left -= n as u64;
    }
    total
}

/// Times `iters` THP first-touch write faults in the model, `THP_BATCH` per mapping.
fn model_thp(mm: &Mm, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(THP_BATCH);
        let len = n * PMD_SIZE;
        let a = mm
            .mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
            .expect("mmap");
        mm.madvise(a, len, Advice::HugePage).expect("madvise");
        let t = Instant::now();
        for i in 0..n {
            let at = a.checked_add(i * PMD_SIZE).expect("in mapping");
            mm.write_val(at, 1u8).expect("write");
        }
        total += t.elapsed();
        assert_eq!(mm.pagemap(a, 1).expect("pagemap")[0].order, 9, "got a THP");
        mm.munmap(a, len).expect("munmap");
        left -= n;
    }
    total
}

/// Times `iters` THP first-touch write faults of the host kernel, `THP_BATCH` per
/// 2 MiB-aligned `MADV_HUGEPAGE` mapping. Returns the time and the THPs the kernel
/// actually mapped (from `/proc/self/smaps_rollup`), so a fallback to 4 KiB is visible.
fn kernel_thp(iters: u64) -> (Duration, u64) {
    let mut total = Duration::ZERO;
    let mut huge = 0;
    let mut left = iters;
    let pmd = PMD_SIZE as usize;
    while left > 0 {
        let n = left.min(THP_BATCH) as usize;
        let len = n * pmd;
        // SAFETY: a fresh private anonymous mapping one PMD larger than needed, so that a
        // 2 MiB-aligned range of `len` lies inside it; checked before use, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + pmd,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap failed");
        let skip = (pmd - (p as usize) % pmd) % pmd;
        // SAFETY: `skip < pmd`, so the aligned start and `len` bytes after it are inside.
        let base = unsafe { p.cast::<u8>().add(skip) };
        // SAFETY: `base`/`len` lies inside the mapping; the advice only affects THP.
        unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: `i * pmd < len`, so the pointer stays inside the mapping.
            let b = unsafe { base.add(i * pmd) };
            // SAFETY: `b` points into the live, writable mapping.
            unsafe { std::ptr::write_volatile(b, 1) };
        }
        total += t.elapsed();
        huge += anon_huge_bytes() / PMD_SIZE;
        // SAFETY: unmaps exactly the mapping created above; no reference into it remains.
        unsafe { libc::munmap(p, len + pmd) };
        left -= n as u64;
    }
    (total, huge)
}

/// `AnonHugePages` of this process, in bytes.
fn anon_huge_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn first_touch(c: &mut Criterion) {
    let phys = PhysMem::new(PhysConfig {
        size_bytes: 64 << 20,
        prefault: true,
        per_cpu_lists: true,
    })
    .expect("RAM");
    let mm = Mm::new(phys);
    // Warm the model's allocator and arena once.
    model(&mm, Touch::Write, 4 * BATCH);
    let mut g = c.benchmark_group("first_touch_fault_4k");
    g.throughput(Throughput::Elements(1));
    g.bench_function("model_write", |b| {
        b.iter_custom(|iters| model(&mm, Touch::Write, iters))
    });
    g.bench_function("kernel_write", |b| {
        b.iter_custom(|iters| kernel(Touch::Write, iters))
    });
    g.bench_function("model_read_zero_page", |b| {
        b.iter_custom(|iters| model(&mm, Touch::Read, iters))
    });
    g.bench_function("kernel_read_zero_page", |b| {
        b.iter_custom(|iters| kernel(Touch::Read, iters))
    });
    g.finish();
}

fn first_touch_thp(c: &mut Criterion) {
    let phys = PhysMem::new(PhysConfig {
        size_bytes: (THP_BATCH + 2) * PMD_SIZE,
        prefault: true,
        per_cpu_lists: true,
    })
    .expect("RAM");
    let mm = Mm::new(phys);
    model_thp(&mm, THP_BATCH);
    let (_, got) = kernel_thp(THP_BATCH);
    if got < THP_BATCH {
        eprintln!("note: the host kernel mapped {got} of {THP_BATCH} THPs (fallback to 4 KiB)");
    }
    let mut g = c.benchmark_group("first_touch_fault_2m");
    g.throughput(Throughput::Bytes(PMD_SIZE));
    g.bench_function("model_thp_write", |b| {
        b.iter_custom(|iters| model_thp(&mm, iters))
    });
    g.bench_function("kernel_thp_write", |b| {
        b.iter_custom(|iters| kernel_thp(iters).0)
    });
    g.finish();
}

criterion_group!(benches, first_touch, first_touch_thp);
criterion_main!(benches);
