//! `TEST_F_TIMEOUT(hmm, benchmark_thp_migration, 120)`: migration to the device and back,
//! with and without THP, at sizes from a quarter of a THP to 128 THPs; it prints the
//! kernel's table. Beyond the C, each run ends by checking every byte came back.

use std::time::Instant;

use hmm::addr::PMD_SIZE;
use hmm::mm::Advice;

use super::harness::{expect, fill, migrate_dev_to_sys, migrate_sys_to_dev, PRIVATE, RW};
use super::{Fixture, Stop};

/// `struct benchmark_results`: milliseconds per migration and GiB/s, each way.
#[derive(Debug, Default, Clone, Copy)]
struct Results {
    sys_to_dev_ms: f64,
    dev_to_sys_ms: f64,
    throughput_s2d: f64,
    throughput_d2s: f64,
}

/// `run_migration_benchmark`: a warm-up round, then `iterations` timed rounds.
fn run_migration_benchmark(
    s: &Fixture,
    use_thp: bool,
    buffer_size: u64,
    iterations: u32,
) -> Result<Results, Stop> {
    let npages = buffer_size / s.page_size;
    let ptr = check_ok!(s.mm.mmap(None, buffer_size, RW, PRIVATE));
    let mut b = s.buffer(ptr, buffer_size, buffer_size, 0xFF)?;
    let advice = if use_thp {
        Advice::HugePage
    } else {
        Advice::NoHugePage
    };
    check_ok!(s.mm.madvise(b.ptr, buffer_size, advice));
    let ints = buffer_size / 4;
    fill(&s.mm, b.ptr, 0..ints, |i| (i & 0xFF) as i32)?;

    // Warm-up.
    check_eq!(migrate_sys_to_dev(s.fd(), &mut b, npages), 0);
    check_eq!(migrate_dev_to_sys(s.fd(), &mut b, npages), 0);

    let (mut s2d, mut d2s) = (0.0, 0.0);
    for _ in 0..iterations {
        let t = Instant::now();
        check_eq!(migrate_sys_to_dev(s.fd(), &mut b, npages), 0);
        s2d += t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        check_eq!(migrate_dev_to_sys(s.fd(), &mut b, npages), 0);
        d2s += t.elapsed().as_secs_f64() * 1e3;
    }
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| (i & 0xFF) as i32)?;
    s.free(b)?;

    let gib = buffer_size as f64 / (1u64 << 30) as f64;
    let n = f64::from(iterations);
    let (s2d, d2s) = (s2d / n, d2s / n);
    Ok(Results {
        sys_to_dev_ms: s2d,
        dev_to_sys_ms: d2s,
        throughput_s2d: gib / (s2d / 1e3),
        throughput_d2s: gib / (d2s / 1e3),
    })
}

/// `print_benchmark_results`.
fn print_results(s: &mut Fixture, name: &str, size: u64, thp: &Results, regular: &Results) {
    let better_time = |t: f64, r: f64| (r - t) / r * 100.0;
    let better_rate = |t: f64, r: f64| (t - r) / r * 100.0;
    s.print(String::new());
    s.print(format!(
        "=== {name} ({:.1} MB) ===",
        size as f64 / (1024.0 * 1024.0)
    ));
    s.print("                     | With THP        | Without THP     | Improvement".into());
    s.print("---------------------------------------------------------------------".into());
    s.print(format!(
        "Sys->Dev Migration   | {:.3} ms        | {:.3} ms        | {:.1}%",
        thp.sys_to_dev_ms,
        regular.sys_to_dev_ms,
        better_time(thp.sys_to_dev_ms, regular.sys_to_dev_ms)
    ));
    s.print(format!(
        "Dev->Sys Migration   | {:.3} ms        | {:.3} ms        | {:.1}%",
        thp.dev_to_sys_ms,
        regular.dev_to_sys_ms,
        better_time(thp.dev_to_sys_ms, regular.dev_to_sys_ms)
    ));
    s.print(format!(
        "S->D Throughput      | {:.2} GB/s      | {:.2} GB/s      | {:.1}%",
        thp.throughput_s2d,
        regular.throughput_s2d,
        better_rate(thp.throughput_s2d, regular.throughput_s2d)
    ));
    s.print(format!(
        "D->S Throughput      | {:.2} GB/s      | {:.2} GB/s      | {:.1}%",
        thp.throughput_d2s,
        regular.throughput_d2s,
        better_rate(thp.throughput_d2s, regular.throughput_d2s)
    ));
}

/// The benchmark. Sizes above [`Options::bench_max_bytes`](super::Options) are left out
/// and said so.
pub(super) fn benchmark_thp_migration(s: &mut Fixture) -> Result<(), Stop> {
    let thp = PMD_SIZE;
    let iterations = 5;
    s.print(String::new());
    s.print("HMM THP Migration Benchmark".into());
    s.print("---------------------------".into());
    s.print(format!("System page size: {} bytes", s.page_size));

    let tests = [
        ("Small Buffer", thp / 4),
        ("Half THP Size", thp / 2),
        ("Single THP Size", thp),
        ("Two THP Size", thp * 2),
        ("Four THP Size", thp * 4),
        ("Eight THP Size", thp * 8),
        ("One twenty eight THP Size", thp * 128),
    ];
    for (name, size) in tests {
        if size > s.bench_max_bytes {
            s.print(format!(
                "(sizes from {} MiB on left out: the run is capped at {} MiB)",
                size >> 20,
                s.bench_max_bytes >> 20
            ));
            break;
        }
        let with = run_migration_benchmark(s, true, size, iterations)?;
        let without = run_migration_benchmark(s, false, size, iterations)?;
        print_results(s, name, size, &with, &without);
    }
    Ok(())
}
