//! First-touch faults per 4 KiB page: the model's write fault (allocate + zero + map) and
//! zero-page read fault, against this machine's kernel doing the same (anonymous `mmap` +
//! touch) in the same run.
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
use hmm::addr::PAGE_SIZE;
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};

const BATCH: u64 = 1024;

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

fn first_touch(c: &mut Criterion) {
    let phys = PhysMem::new(PhysConfig {
        size_bytes: 64 << 20,
        prefault: true,
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

criterion_group!(benches, first_touch);
criterion_main!(benches);
