//! `hmm`: the command-line front end of hmm-rs.
//!
//! `hmm demo` tells the seed story on the built-in simulated devices: a buffer migrated to
//! device 0, half of it read back by the CPU, the whole range migrated again (which must
//! cost no device invalidation and no copy for the pages already there), device 1 trying
//! the same range; it prints the notifier events and counters of each step and checks
//! every byte. `hmm selftest` runs the kernel's hmm-tests.c and the driver conformance
//! scenarios; `hmm stress` runs everything at once on real threads; `hmm bench` measures.
//!
//! Every argument is checked before any work starts ([`limits`]): a bad one is a one-line
//! usage error naming the option and its limit, with exit status 2. Output to a closed
//! pipe ends the command quietly ([`output`]); Ctrl-C during `stress` or `bench` prints
//! the partial report ([`interrupt`]).

#![deny(unsafe_code)]

/// `println!` that never panics: see [`output`].
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: see [`output`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::diagnostic(format_args!($($arg)*))
    };
}

mod bench;
mod charts;
mod demo;
#[allow(unsafe_code)]
mod interrupt;
mod limits;
mod output;
mod report;
mod run;
mod selftest;
mod stress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde::Serialize;

use bench::plot::{plot, Figures};
use bench::progress::Progress;
use bench::{all, driver, fault, machine, migrate, range_fault, scale, walks};
use limits::{
    fraction, seconds, size_kib, sized, whole, MAX_FAULT_PAGES, MAX_FAULT_THPS, MAX_ITERS,
    MAX_PAGES, MAX_THPS, MAX_THREADS,
};

/// `hmm --version`: the package version and the commit it was built from (`build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("HMM_BUILD_COMMIT"),
    ")"
);

/// hmm-rs: Linux HMM device-memory management as a real userspace system.
#[derive(Debug, Parser)]
#[command(name = "hmm", version = VERSION, about)]
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
        /// Pages in the demo buffer (at least 2).
        #[arg(long, default_value_t = 512, allow_hyphen_values = true,
              value_parser = sized::<u64>(2, MAX_PAGES, demo::need))]
        pages: u64,
    },
    /// Print a completion script for SHELL (bash, elvish, fish, powershell, zsh), e.g.
    /// `hmm completions bash > ~/.local/share/bash-completion/completions/hmm`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (`hmm man > hmm.1; man ./hmm.1`).
    Man,
    /// Run the kernel's hmm-tests.c, every case in the private and coherent variants under
    /// the kselftest names (hmm.hmm_device_private.anon_read, ...), then the driver
    /// conformance scenarios; TAP output as the kselftest harness prints it, and a failure
    /// if any test failed.
    Selftest {
        /// Run only this test: a full name, FIXTURE.CASE, or a case name (every variant);
        /// may be given more than once.
        #[arg(short = 't', long = "test", value_name = "NAME")]
        tests: Vec<String>,
        /// List the tests (name and what each checks) instead of running them.
        #[arg(short = 'l', long)]
        list: bool,
        /// Print one JSON object (schema_version, tests, totals) instead of TAP.
        #[arg(long)]
        json: bool,
        /// Run the THP migration benchmark at up to 8 MiB instead of the kernel's 256 MiB.
        #[arg(long)]
        quick: bool,
    },
    /// Everything at once on real threads (CPU and device accesses, migrations, munmap,
    /// mprotect, mremap, fork and exit, pageout, reclaim and swap-in), with the invariants
    /// checked while it runs and at the end; fails if any is broken. Ctrl-C stops it early
    /// with the report so far.
    Stress {
        /// How long the workload runs, in seconds (above 0, at most a year).
        #[arg(long, default_value_t = 10.0, allow_hyphen_values = true, value_parser = seconds)]
        seconds: f64,
        /// Go on after `--seconds` until every kind of operation ran at least this often
        /// (so that a run on a loaded host still covers them all; 0: stop on time).
        #[arg(long, default_value_t = 0, allow_hyphen_values = true,
              value_parser = whole::<u64>(0, 1_000_000))]
        min_each: u64,
        /// CPU threads reading and writing (device, migration and churn threads come on
        /// top).
        #[arg(long, default_value_t = 2, allow_hyphen_values = true,
              value_parser = whole::<usize>(1, MAX_THREADS))]
        threads: usize,
        /// Seed of every thread's choice of operations.
        #[arg(long, default_value_t = 1, allow_hyphen_values = true,
              value_parser = whole::<u64>(0, u64::MAX))]
        seed: u64,
        /// Pages in the stressed region (rounded up to whole 16-page slots).
        #[arg(long, default_value_t = 1024, allow_hyphen_values = true,
              value_parser = sized::<u64>(1, MAX_PAGES, |p| stress::need(p, 0)))]
        pages: u64,
        /// Percent of RAM and device-memory allocations that fail (fault injection, 0 to
        /// 50): every operation must then fail cleanly or succeed, and no byte may be lost.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true,
              value_parser = whole::<u32>(0, 50))]
        fail_alloc: u32,
        /// 2 MiB THP areas of slots besides `--pages`, moved whole between RAM and the
        /// devices as well as page by page (0 for none).
        #[arg(long, default_value_t = 2, allow_hyphen_values = true,
              value_parser = sized::<u64>(0, MAX_THPS, |t| stress::need(1, t)))]
        thps: u64,
        /// Multi-size THP in the page slots: every write fault to an empty 16, 32 or 64
        /// KiB there maps a folio of that size, which fork, migration, pageout and the
        /// churn then meet.
        #[arg(long)]
        mthp: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run a scenario (a TOML file, or a shipped scenario by name) on the SVM driver under
    /// the deterministic engine, and print its metrics; fails if a byte was lost or a frame
    /// leaked.
    Run {
        /// A scenario file, or the name of a shipped scenario (see --list).
        #[arg(required_unless_present = "list")]
        scenario: Option<String>,
        /// List the shipped scenarios, a line each.
        #[arg(long)]
        list: bool,
        /// Print one JSON object (an array with --compare).
        #[arg(long)]
        json: bool,
        /// Override a field of the scenario: `policy.eviction=fifo` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run one variant per value, on the host's cores at once, and print them side by
        /// side: `policy.eviction=lru,fifo,random`.
        #[arg(long, value_name = "KEY=A,B,...", conflicts_with = "trace_out")]
        compare: Option<String>,
        /// Write the run's timeline (Chrome trace-event JSON: open it in ui.perfetto.dev)
        /// to this file (created before the run).
        #[arg(long, value_name = "FILE")]
        trace_out: Option<std::path::PathBuf>,
        /// Draw into this folder (SVG and PNG): with --compare, the variants' simulated
        /// time and bytes moved (compare-SCENARIO); else the run's bytes migrated over
        /// simulated time, fault-batch sizes and each GPU's memory in use (bytes-,
        /// batches-, residency-SCENARIO).
        #[arg(long, value_name = "DIR")]
        plot: Option<PathBuf>,
        /// Write one self-contained HTML page of the run (scenario, metrics, charts) to
        /// this file (created before the run).
        #[arg(long, value_name = "FILE.html", conflicts_with = "compare")]
        report: Option<PathBuf>,
        /// Run every agent of a phase on a thread of its own, all at once, for races: the
        /// counters and simulated time may differ from run to run, the bytes may not.
        #[arg(long, conflicts_with_all = ["trace_out", "plot", "report"])]
        threads: bool,
    },
    /// Replay a recorded trace on a scenario's machine (its machine, buffers and policies)
    /// and print the metrics; fails if a byte was lost or a frame leaked.
    Replay {
        /// The trace file (read as a stream).
        file: std::path::PathBuf,
        /// `native` (CSV time_ns,agent,op,buffer,offset,len, or one JSON object a line),
        /// `uvm-eval` (UVM fault logs) or `gpu-ext` (gpu_ext chunk traces).
        #[arg(long, default_value = "native")]
        format: hmm_sim::trace::Format,
        /// The scenario whose machine runs the trace (a file or a shipped name).
        #[arg(long, default_value = "stream")]
        scenario: String,
        /// Override a field of the scenario (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Write the replay's timeline (Chrome trace-event JSON) to this file.
        #[arg(long, value_name = "FILE")]
        trace_out: Option<std::path::PathBuf>,
    },
    /// Measure, against a baseline taken in the same run. Ctrl-C stops after the round in
    /// hand and prints the rows measured so far.
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
    /// Write charts (SVG and PNG) into this folder (created if missing; checked before
    /// the run).
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
        /// Threads migrating slices of the region at once; each size must split into
        /// this many slices of whole 2 MiB units.
        #[arg(long, default_value_t = 1, allow_hyphen_values = true,
              value_parser = whole::<usize>(1, MAX_THREADS))]
        threads: usize,
        /// Sizes in KiB, comma-separated [default: 512,2048,8192,32768,65536,131072,262144;
        /// with `--threads N` above 1, each rounded up to a multiple of N × 2048 KiB].
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true, value_parser = size_kib(migrate::need))]
        sizes_kib: Option<Vec<u64>>,
        /// Rounds per figure (the median is reported; the ratios' intervals reach 95%
        /// from 6 rounds up).
        #[arg(long, default_value_t = 6, allow_hyphen_values = true,
              value_parser = whole::<usize>(1, MAX_ITERS))]
        iters: usize,
    },
    /// Page-table passes and time per page to bring a range to a device when part of it
    /// must be faulted first: fault then migrate, migrate-fault-migrate, and one walk.
    Walks {
        #[command(flatten)]
        out: Output,
        /// Pages in the range.
        #[arg(long, default_value_t = 2048, allow_hyphen_values = true,
              value_parser = sized::<u64>(1, MAX_PAGES, walks::need))]
        pages: u64,
        /// Fractions of the pages held by another device (each from 0 to 1).
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true, value_parser = fraction,
              default_values_t = [0.0, 0.01, 0.1, 0.25, 0.5, 1.0])]
        fractions: Vec<f64>,
        /// Rounds per figure (the fastest and the median are reported, and the paired ratios).
        #[arg(long, default_value_t = 40, allow_hyphen_values = true,
              value_parser = whole::<usize>(1, MAX_ITERS))]
        iters: usize,
    },
    /// Fault latency: first-touch anonymous faults and the CPU fault on a device-private
    /// page (the `migrate_to_ram` round trip), against the host kernel's first-touch fault.
    Fault {
        #[command(flatten)]
        out: Output,
        /// Faults per 4 KiB scenario.
        #[arg(long, default_value_t = 4096, allow_hyphen_values = true,
              value_parser = whole::<u64>(1, MAX_FAULT_PAGES))]
        pages: u64,
        /// THP faults (2 MiB each).
        #[arg(long, default_value_t = 64, allow_hyphen_values = true,
              value_parser = whole::<u64>(1, MAX_FAULT_THPS))]
        thps: u64,
    },
    /// `hmm_range_fault` in ns per page (snapshot and fault modes, 4 KiB and THP), against
    /// the host kernel's page-table walk (`/proc/self/pagemap`).
    RangeFault {
        #[command(flatten)]
        out: Output,
        /// Pages in the region.
        #[arg(long, default_value_t = 16384, allow_hyphen_values = true,
              value_parser = sized::<u64>(1, MAX_PAGES, range_fault::need))]
        pages: u64,
        /// Rounds per figure (the median and the fastest are reported).
        #[arg(long, default_value_t = 9, allow_hyphen_values = true,
              value_parser = whole::<usize>(1, MAX_ITERS))]
        iters: usize,
    },
    /// The SVM driver (hmm-svm): GPU faults serviced per second (remote mapping, and
    /// migrating a page or a 2 MiB range, against memcpy of the bytes moved), evictions per
    /// second under pressure, and the cost of each policy hook.
    Driver {
        #[command(flatten)]
        out: Output,
        /// Pages in the buffer (rounded up to whole 2 MiB).
        #[arg(long, default_value_t = 4096, allow_hyphen_values = true,
              value_parser = sized::<u64>(1, MAX_PAGES, driver::need))]
        pages: u64,
        /// Rounds per figure (the median is reported).
        #[arg(long, default_value_t = 3, allow_hyphen_values = true,
              value_parser = whole::<usize>(1, MAX_ITERS))]
        iters: usize,
    },
    /// Costs that must not grow with what is around them, each timed small and large in
    /// turns: one page's invalidation among 64 and 16384 interval notifiers (and one long
    /// one), evicting a process's own pages in a fork family of 1 and 256, first writes on
    /// an 8 GiB machine and on 2 TiB with eight 80 GiB devices.
    Scale {
        #[command(flatten)]
        out: Output,
        /// Rounds per row (the paired ratio's interval reaches 95% from 6 rounds up).
        #[arg(long, default_value_t = 9, allow_hyphen_values = true,
              value_parser = whole::<usize>(1, MAX_ITERS))]
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

/// Ends the process with clap's usage error (status 2) saying `msg`, with the usage of
/// the subcommand at `path` (`["bench", "migrate"]`): for limits that depend on several
/// options or on the host, found after parsing and before any work.
fn usage_error(path: &[&str], msg: impl std::fmt::Display) -> ! {
    let mut cli = Cli::command();
    cli.build();
    let mut cmd = &cli;
    for name in path {
        if let Some(sub) = cmd.find_subcommand(name) {
            cmd = sub;
        }
    }
    cmd.clone().error(ErrorKind::ValueValidation, msg).exit()
}

/// Exits with a usage error of the subcommand at `path` if `check` refused.
fn require(path: &[&str], check: Result<(), String>) {
    if let Err(msg) = check {
        usage_error(path, msg);
    }
}

/// Checks a benchmark's `--plot` folder before the run.
fn check_output(path: &[&str], out: &Output) {
    if let Some(dir) = &out.plot {
        require(path, limits::check_plot_dir(dir));
    }
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
        errln!("{}", machine::Machine::this().line());
        errln!("{}", machine::Build::this().line());
        // Every row names the layout it follows, as `bench all`'s object does.
        let mut json = serde_json::to_value(&rows)?;
        for row in json.as_array_mut().into_iter().flatten() {
            if let Some(row) = row.as_object_mut() {
                row.insert("schema_version".into(), all::SCHEMA_VERSION.into());
            }
        }
        outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        machine::print_header();
        table(&rows);
    }
    write_plots(out, &figures(&rows))
}

fn write_plots(out: &Output, figures: &Figures<'_>) -> bench::Result<()> {
    if let Some(dir) = &out.plot {
        for f in plot(dir, figures)? {
            errln!("wrote {}", f.display());
        }
    }
    Ok(())
}

/// The sizes of `bench migrate`, in bytes: those given, each of which must split into
/// `threads` slices of whole 2 MiB units, or the default ones rounded up so that they do.
fn migrate_sizes(sizes_kib: Option<Vec<u64>>, threads: usize) -> Vec<u64> {
    const DEFAULT_KIB: [u64; 7] = [512, 2048, 8192, 32768, 65536, 131072, 262144];
    let unit_kib = 2048 * threads as u64;
    let Some(given) = sizes_kib else {
        let mut sizes: Vec<u64> = DEFAULT_KIB
            .iter()
            .map(|&k| {
                let kib = if threads > 1 {
                    k.div_ceil(unit_kib) * unit_kib
                } else {
                    k
                };
                kib << 10
            })
            .collect();
        sizes.dedup();
        return sizes;
    };
    for &k in &given {
        if !migrate::splits(k << 10, threads) {
            usage_error(
                &["bench", "migrate"],
                format!(
                    "--sizes-kib {k} does not split into {threads} slices of whole 2 MiB units \
                 (with --threads {threads}, use multiples of {unit_kib} KiB)"
                ),
            );
        }
    }
    given.iter().map(|k| k << 10).collect()
}

fn bench(what: Bench) -> bench::Result<()> {
    match what {
        Bench::Migrate {
            out,
            threads,
            sizes_kib,
            iters,
        } => {
            const PATH: &[&str] = &["bench", "migrate"];
            let sizes = migrate_sizes(sizes_kib, threads);
            let largest = sizes.iter().copied().max().unwrap_or(0);
            require(
                PATH,
                limits::check_memory("--sizes-kib", largest >> 10, 4, |k| migrate::need(k << 10)),
            );
            check_output(PATH, &out);
            interrupt::catch();
            scenario(
                &out,
                ("migrate", 4 * sizes.len() as u64),
                |bar| {
                    migrate::migrate_rows(&sizes, threads, iters, |r| {
                        bar.doing(format!("{} KiB, thp {}", r.size_bytes() >> 10, r.thp()));
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
        } => {
            const PATH: &[&str] = &["bench", "walks"];
            require(PATH, limits::check_memory("--pages", pages, 1, walks::need));
            check_output(PATH, &out);
            interrupt::catch();
            scenario(
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
            )
        }
        Bench::Fault { out, pages, thps } => {
            const PATH: &[&str] = &["bench", "fault"];
            require(
                PATH,
                limits::check_memory("--pages", pages, 1, |p| fault::need(p, 1)),
            );
            require(
                PATH,
                limits::check_memory("--thps", thps, 1, |t| fault::need(pages, t)),
            );
            check_output(PATH, &out);
            interrupt::catch();
            scenario(
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
            )
        }
        Bench::RangeFault { out, pages, iters } => {
            const PATH: &[&str] = &["bench", "range-fault"];
            require(
                PATH,
                limits::check_memory("--pages", pages, 1, range_fault::need),
            );
            check_output(PATH, &out);
            interrupt::catch();
            scenario(
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
            )
        }
        Bench::Driver { out, pages, iters } => {
            const PATH: &[&str] = &["bench", "driver"];
            require(
                PATH,
                limits::check_memory("--pages", pages, 1, driver::need),
            );
            check_output(PATH, &out);
            interrupt::catch();
            scenario(
                &out,
                ("driver", driver::ROWS),
                |bar| {
                    driver::driver_rows(pages, iters, |r| {
                        bar.doing(r.scenario());
                        bar.step();
                    })
                },
                driver::print_table,
                |_| Figures::default(),
            )
        }
        Bench::Scale { out, iters } => {
            const PATH: &[&str] = &["bench", "scale"];
            if let Some(available) = limits::mem_available().filter(|&a| a < scale::HOST_BYTES) {
                usage_error(
                    PATH,
                    format!(
                        "the scale rows need about {} of host memory, and {} is available",
                        limits::human(scale::HOST_BYTES),
                        limits::human(available)
                    ),
                );
            }
            check_output(PATH, &out);
            interrupt::catch();
            scenario(
                &out,
                ("scale", scale::ROWS),
                |bar| {
                    scale::scale_rows(iters, |r| {
                        bar.doing(r.scenario());
                        bar.step();
                    })
                },
                scale::print_table,
                |_| Figures::default(),
            )
        }
        Bench::All { out, quick } => {
            check_output(&["bench", "all"], &out);
            interrupt::catch();
            let r = all::run(if quick {
                all::Plan::quick()
            } else {
                all::Plan::full()
            })?;
            if out.json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
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

fn stress(cfg: stress::Config) -> bench::Result<()> {
    // The region alone first, so that a refusal of --thps is about the THP areas; the
    // model's limit before the host's, which depends on the machine.
    const PATH: &[&str] = &["stress"];
    let pages = |p| stress::need(p, 0);
    let thps = |t| stress::need(cfg.pages, t);
    require(PATH, limits::check_ram("--pages", cfg.pages, 1, pages));
    require(PATH, limits::check_ram("--thps", cfg.thps, 1, thps));
    require(PATH, limits::check_host("--pages", cfg.pages, 1, pages));
    require(PATH, limits::check_host("--thps", cfg.thps, 1, thps));
    interrupt::catch();
    let r = stress::run(cfg)?;
    r.emit();
    if r.clean() {
        Ok(())
    } else {
        Err("the stress run broke an invariant".into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs of the main paths (fault batches, migrations, evictions, invalidations) on
    // stderr, filtered by RUST_LOG (`RUST_LOG=hmm_svm=debug`); none without it.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match cli.command {
        Command::Demo { json, pages } => {
            require(
                &["demo"],
                limits::check_memory("--pages", pages, 1, demo::need),
            );
            demo::run(pages, json)
        }
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hmm", &mut buf);
            output::bytes(&buf);
            Ok(())
        }
        Command::Man => {
            let mut buf = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut buf) {
                Ok(()) => {
                    output::bytes(&buf);
                    Ok(())
                }
                Err(e) => Err(format!("cannot render the manual page: {e}").into()),
            }
        }
        Command::Selftest {
            tests,
            list,
            json,
            quick,
        } => {
            let args = selftest::Args {
                tests,
                list,
                json,
                quick,
            };
            match selftest::run(&args) {
                Ok(0) => Ok(()),
                Ok(n) => Err(format!("{n} tests failed").into()),
                Err(e) => usage_error(&["selftest"], e),
            }
        }
        Command::Bench { what } => bench(what),
        Command::Replay {
            file,
            format,
            scenario,
            set,
            json,
            trace_out,
        } => {
            let s = run::load(&scenario, &set).unwrap_or_else(|e| usage_error(&["replay"], e));
            let trace = trace_out
                .as_deref()
                .map(|p| run::open_trace(p).unwrap_or_else(|e| usage_error(&["replay"], e)));
            let f = std::fs::File::open(&file)
                .unwrap_or_else(|e| usage_error(&["replay"], format!("{}: {e}", file.display())));
            run::replay(&s, &file, std::io::BufReader::new(f), format, json, trace)
        }
        Command::Run {
            scenario,
            list,
            json,
            set,
            compare,
            trace_out,
            plot,
            report,
            threads,
        } => {
            // Every scenario error is the user's input: refused like a bad argument.
            if let Some(name) = scenario.as_deref().filter(|_| !list) {
                if let Some(c) = &compare {
                    if let Err(e) = run::variants(c) {
                        usage_error(&["run"], e);
                    }
                }
                if let Err(e) = run::load(name, &set) {
                    usage_error(&["run"], e);
                }
            }
            let trace = trace_out
                .as_deref()
                .map(|p| run::open_trace(p).unwrap_or_else(|e| usage_error(&["run"], e)));
            if let Some(dir) = &plot {
                require(&["run"], limits::check_plot_dir(dir));
            }
            let report = report.map(|p| {
                let f = run::open_report(&p).unwrap_or_else(|e| usage_error(&["run"], e));
                (p, f)
            });
            run::main(run::Request {
                scenario,
                list,
                json,
                set,
                compare,
                trace,
                plot,
                report,
                threads,
            })
        }
        Command::Stress {
            seconds,
            min_each,
            threads,
            seed,
            pages,
            fail_alloc,
            thps,
            mthp,
            json,
        } => stress(stress::Config {
            seconds,
            min_each,
            threads,
            seed,
            pages,
            fail_alloc,
            thps,
            mthp,
            json,
        }),
    };
    match result {
        Ok(()) if interrupt::requested() => {
            errln!("hmm: interrupted: the report above is partial");
            ExitCode::from(interrupt::EXIT_STATUS)
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("hmm: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_migrate_sizes_split_for_any_thread_count() {
        let one = migrate_sizes(None, 1);
        assert_eq!(one.len(), 7);
        assert_eq!(one[0], 512 << 10);
        for threads in 1..=16 {
            let sizes = migrate_sizes(None, threads);
            assert!(!sizes.is_empty());
            for size in sizes {
                assert!(migrate::splits(size, threads), "{size} on {threads}");
            }
        }
        assert_eq!(
            migrate_sizes(None, 2),
            [4, 8, 32, 64, 128, 256].map(|m: u64| m << 20)
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
