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
mod walks;

use clap::{Parser, Subcommand};

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
    /// Measure, against a baseline taken in the same run.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Migration throughput (system to device and back, 4 KiB pages and THPs) against
    /// memcpy of the same bytes.
    Migrate {
        /// Print a JSON array of rows instead of a table.
        #[arg(long)]
        json: bool,
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
        /// Print a JSON array of rows instead of a table.
        #[arg(long)]
        json: bool,
        /// Pages in the range.
        #[arg(long, default_value_t = 2048)]
        pages: u64,
        /// Fractions of the pages held by another device.
        #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.01, 0.1, 0.25, 0.5, 1.0])]
        fractions: Vec<f64>,
        /// Rounds per figure (the median is reported).
        #[arg(long, default_value_t = 15)]
        iters: usize,
    },
}

fn bench_migrate(
    json: bool,
    threads: usize,
    sizes_kib: &[u64],
    iters: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    if threads == 0 || iters == 0 {
        return Err("--threads and --iters must be at least 1".into());
    }
    let sizes: Vec<u64> = sizes_kib.iter().map(|k| k << 10).collect();
    let rows = bench::migrate_rows(&sizes, threads, iters, |r| {
        if !json {
            eprintln!(
                "measured {} bytes, thp {}, {}",
                r.size_bytes(),
                r.thp(),
                r.direction()
            );
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        bench::print_table(&rows);
    }
    Ok(())
}

fn bench_walks(
    json: bool,
    pages: u64,
    fractions: &[f64],
    iters: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let rows = walks::walk_rows(pages, fractions, iters, |r| {
        if !json {
            eprintln!("measured {} at fraction {}", r.method(), r.fraction());
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        walks::print_table(&rows);
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { json, pages } => demo::run(pages, json),
        Command::Selftest => match selftest::run() {
            0 => Ok(()),
            n => Err(format!("{n} scenarios failed").into()),
        },
        Command::Bench {
            what:
                Bench::Migrate {
                    json,
                    threads,
                    sizes_kib,
                    iters,
                },
        } => bench_migrate(json, threads, &sizes_kib, iters),
        Command::Bench {
            what:
                Bench::Walks {
                    json,
                    pages,
                    fractions,
                    iters,
                },
        } => bench_walks(json, pages, &fractions, iters),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hmm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
