//! `hmm`: the command-line front end of hmm-rs.
//!
//! `hmm demo` tells the seed story on the built-in simulated devices: a buffer migrated to
//! device 0, half of it read back by the CPU, the whole range migrated again (which must
//! cost no device invalidation and no copy for the pages already there), device 1 trying
//! the same range; it prints the notifier events and counters of each step and checks
//! every byte. `hmm selftest` runs the driver conformance scenarios; `hmm bench` measures.

#![forbid(unsafe_code)]

mod bench;
mod demo;
mod selftest;
mod stress;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use bench::plot::{plot, Figures};
use bench::progress::Progress;
use bench::{all, fault, machine, migrate, range_fault, walks};

/// hmm-rs: Linux HMM device-memory management as a real userspace system.
#[derive(Debug, Parser)]
#[command(name = "hmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The seed story: migrate to device 0, read half back, migrate again, device 1 tries.
    Demo {
        /// Print one JSON object instead of the narrated walk-through.
        #[arg(long)]
        json: bool,
        /// Pages in the demo buffer.
        #[arg(long, default_value_t = 512)]
        pages: u64,
    },
    /// Run the driver conformance scenarios on the built-in simulated devices (private and
    /// coherent); ends with `N passed, M failed` and fails if any failed.
    Selftest,
    /// Everything at once on real threads (CPU and device accesses, migrations, munmap,
    /// mprotect, mremap, fork and exit), with the invariants checked while it runs and at
    /// the end; fails if any is broken.
    Stress {
        /// How long the workload runs.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// CPU threads reading and writing (device, migration and churn threads come on
        /// top).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Seed of every thread's choice of operations.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Pages in the stressed region (rounded up to whole 16-page slots).
        #[arg(long, default_value_t = 1024)]
        pages: u64,
        /// Percent of RAM and device-memory allocations that fail (fault injection, 0 to
        /// 50): every operation must then fail cleanly or succeed, and no byte may be lost.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=50))]
        fail_alloc: u32,
        /// 2 MiB THP areas of slots besides `--pages`, moved whole between RAM and the
        /// devices as well as page by page.
        #[arg(long, default_value_t = 2)]
        thps: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Measure, against a baseline taken in the same run.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

/// How a benchmark reports.
#[derive(Debug, Args)]
struct Output {
    /// Print JSON instead of a table (the machine and build go to standard error).
    #[arg(long)]
    json: bool,
    /// Write charts (SVG and PNG) into this folder.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Migration throughput (system to device and back, 4 KiB pages and THPs) against
    /// memcpy of the same bytes.
    Migrate {
        #[command(flatten)]
        out: Output,
        /// Threads migrating slices of the region at once.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Sizes in KiB.
        #[arg(long, value_delimiter = ',', default_values_t = [512, 2048, 8192, 32768, 65536, 131072, 262144])]
        sizes_kib: Vec<u64>,
        /// Rounds per figure (the median is reported).
        #[arg(long, default_value_t = 3)]
        iters: usize,
    },
    /// Page-table passes and time per page to bring a range to a device when part of it
    /// must be faulted first: fault then migrate, migrate-fault-migrate, and one walk.
    Walks {
        #[command(flatten)]
        out: Output,
        /// Pages in the range.
        #[arg(long, default_value_t = 2048)]
        pages: u64,
        /// Fractions of the pages held by another device.
        #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.01, 0.1, 0.25, 0.5, 1.0])]
        fractions: Vec<f64>,
        /// Rounds per figure (the fastest and the median are reported, and the paired ratios).
        #[arg(long, default_value_t = 40)]
        iters: usize,
    },
    /// Fault latency: first-touch anonymous faults and the CPU fault on a device-private
    /// page (the `migrate_to_ram` round trip), against the host kernel's first-touch fault.
    Fault {
        #[command(flatten)]
        out: Output,
        /// Faults per 4 KiB scenario.
        #[arg(long, default_value_t = 4096)]
        pages: u64,
        /// THP faults (2 MiB each).
        #[arg(long, default_value_t = 64)]
        thps: u64,
    },
    /// `hmm_range_fault` in ns per page (snapshot and fault modes, 4 KiB and THP), against
    /// the host kernel's page-table walk (`/proc/self/pagemap`).
    RangeFault {
        #[command(flatten)]
        out: Output,
        /// Pages in the region.
        #[arg(long, default_value_t = 16384)]
        pages: u64,
        /// Rounds per figure (the median and the fastest are reported).
        #[arg(long, default_value_t = 9)]
        iters: usize,
    },
    /// Every scenario in turn, with the machine and the build named: the README's figures.
    All {
        #[command(flatten)]
        out: Output,
        /// Every scenario small: shows that it works, measures nothing worth quoting.
        #[arg(long)]
        quick: bool,
    },
}

/// Measures one scenario with a progress bar of `steps` (name, total), then prints its
/// rows as JSON or as a table headed by the machine and build, and plots them.
fn scenario<T: Serialize>(
    out: &Output,
    steps: (&str, u64),
    measure: impl FnOnce(&Progress) -> bench::Result<Vec<T>>,
    table: fn(&[T]),
    figures: fn(&[T]) -> Figures<'_>,
) -> bench::Result<()> {
    let bar = Progress::new(steps.0, steps.1);
    let rows = measure(&bar)?;
    drop(bar);
    if out.json {
        eprintln!("{}", machine::Machine::this().line());
        eprintln!("{}", machine::Build::this().line());
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        machine::print_header();
        table(&rows);
    }
    write_plots(out, &figures(&rows))
}

fn write_plots(out: &Output, figures: &Figures<'_>) -> bench::Result<()> {
    if let Some(dir) = &out.plot {
        for f in plot(dir, figures)? {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}

fn bench(what: Bench) -> bench::Result<()> {
    match what {
        Bench::Migrate {
            out,
            threads,
            sizes_kib,
            iters,
        } => {
            if threads == 0 || iters == 0 {
                return Err("--threads and --iters must be at least 1".into());
            }
            let sizes: Vec<u64> = sizes_kib.iter().map(|k| k << 10).collect();
            scenario(
                &out,
                ("migrate", 4 * sizes.len() as u64),
                |bar| {
                    migrate::migrate_rows(&sizes, threads, iters, |r| {
                        bar.doing(format!("{} bytes, thp {}", r.size_bytes(), r.thp()));
                        bar.step();
                    })
                },
                migrate::print_table,
                |migrate| Figures {
                    migrate,
                    ..Figures::default()
                },
            )
        }
        Bench::Walks {
            out,
            pages,
            fractions,
            iters,
        } => scenario(
            &out,
            ("walks", (walks::METHODS.len() * fractions.len()) as u64),
            |bar| {
                walks::walk_rows(pages, &fractions, iters, |r| {
                    bar.doing(format!("fraction {}", r.fraction()));
                    bar.step();
                })
            },
            walks::print_table,
            |walks| Figures {
                walks,
                ..Figures::default()
            },
        ),
        Bench::Fault { out, pages, thps } => scenario(
            &out,
            ("fault", fault::ROWS),
            |bar| {
                fault::fault_rows(pages, thps, |r| {
                    bar.doing(r.scenario());
                    bar.step();
                })
            },
            fault::print_table,
            |fault| Figures {
                fault,
                ..Figures::default()
            },
        ),
        Bench::RangeFault { out, pages, iters } => scenario(
            &out,
            ("range-fault", range_fault::ROWS),
            |bar| {
                range_fault::range_fault_rows(pages, iters, |r| {
                    bar.doing(r.scenario());
                    bar.step();
                })
            },
            range_fault::print_table,
            |range_fault| Figures {
                range_fault,
                ..Figures::default()
            },
        ),
        Bench::All { out, quick } => {
            let r = all::run(if quick {
                all::Plan::quick()
            } else {
                all::Plan::full()
            })?;
            if out.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                all::print(&r);
            }
            write_plots(
                &out,
                &Figures {
                    migrate: &r.migrate,
                    walks: &r.walks,
                    fault: &r.fault,
                    range_fault: &r.range_fault,
                },
            )
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { json, pages } => demo::run(pages, json),
        Command::Selftest => match selftest::run() {
            0 => Ok(()),
            n => Err(format!("{n} scenarios failed").into()),
        },
        Command::Bench { what } => bench(what),
        Command::Stress {
            seconds,
            threads,
            seed,
            pages,
            fail_alloc,
            thps,
            json,
        } => stress::run(stress::Config {
            seconds,
            threads,
            seed,
            pages,
            fail_alloc,
            thps,
            json,
        })
        .and_then(|r| {
            r.emit();
            if r.clean() {
                Ok(())
            } else {
                Err("the stress run broke an invariant".into())
            }
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hmm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
