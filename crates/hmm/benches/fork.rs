//! `fork` of a populated 256 MiB private region: the model with 4 KiB pages and with THPs,
//! against this machine's kernel forking this process with the same region populated
//! (`fork` + `_exit` in the child; the parent's `fork` call is timed) in the same run.
//!
//! `cargo bench -p hmm --bench fork`. The kernel figure includes the rest of this process's
//! (small) address space; the region dominates it.
//!
//! The kernel baseline needs `mmap`/`fork`/`waitpid` from libc: each `unsafe` block has its
//! argument.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};

const REGION: u64 = 256 << 20;

/// A model address space with `REGION` bytes written, as 4 KiB pages or THPs.
fn populated(thp: bool) -> std::sync::Arc<Mm> {
    let phys = PhysMem::new(PhysConfig {
        size_bytes: REGION + (8 << 20),
        prefault: false,
        per_cpu_lists: true,
    })
    .expect("RAM");
    let mm = Mm::new(phys);
    let a = mm
        .mmap(None, REGION, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
        .expect("mmap");
    if thp {
        mm.madvise(a, REGION, Advice::HugePage).expect("madvise");
    }
    let step = if thp { PMD_SIZE } else { PAGE_SIZE };
    let mut at = 0;
    while at < REGION {
        mm.write_val(a.checked_add(at).expect("in region"), at)
            .expect("write");
        at += step;
    }
    mm
}

fn model(mm: &Mm, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        let child = mm.fork().expect("fork");
        total += t.elapsed();
        drop(child);
    }
    total
}

/// Forks this process `iters` times with a populated `REGION`; the child exits at once.
fn kernel(iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        // SAFETY: the child calls only the async-signal-safe `_exit`, so forking a
        // multi-threaded process is sound.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: terminates the child without running any destructor.
            unsafe { libc::_exit(0) };
        }
        total += t.elapsed();
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for the child just created; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    total
}

/// Maps and writes `REGION` bytes of 4 KiB pages in this process; never unmapped.
fn populate_host() {
    let len = REGION as usize;
    // SAFETY: a fresh private anonymous mapping; checked before use.
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
    for i in (0..len).step_by(PAGE_SIZE as usize) {
        // SAFETY: `i < len`, so the pointer stays inside the mapping.
        let b = unsafe { p.cast::<u8>().add(i) };
        // SAFETY: `b` points into the live, writable mapping.
        unsafe { std::ptr::write_volatile(b, 1) };
    }
}

fn fork_256m(c: &mut Criterion) {
    let mut g = c.benchmark_group("fork_256m");
    g.throughput(Throughput::Bytes(REGION));
    g.sample_size(10);
    populate_host();
    g.bench_function("kernel_4k", |b| b.iter_custom(kernel));
    let small = populated(false);
    g.bench_function("model_4k", |b| b.iter_custom(|n| model(&small, n)));
    drop(small);
    let huge = populated(true);
    g.bench_function("model_thp", |b| b.iter_custom(|n| model(&huge, n)));
    g.finish();
}

criterion_group!(benches, fork_256m);
criterion_main!(benches);
