//! `hmm bench all`: every scenario in turn, on one machine and one build, with one report.
//!
//! The full plan takes a few minutes on a 2-core machine (the budget is 10):
//! migration from 512 KiB to 256 MiB on one thread and from 64 MiB up on two, the walks
//! at six fractions, 4096 faults of each 4 KiB kind and 64 THP faults, and
//! `hmm_range_fault` over 64 MiB, the driver, and the scale rows. `--quick` runs every
//! scenario small, as CI does, to show that it works, not to measure. `--json` prints one
//! object: `{machine, build, plan, seconds, migrate, walks, fault, range_fault, driver,
//! scale}`, the last six being the row arrays of the single scenarios.

use std::time::Instant;

use serde::Serialize;

use super::driver::{self, DriverRow};
use super::fault::{self, FaultRow};
use super::machine::{Build, Machine};
use super::migrate::{self, MigrateRow};
use super::progress::Progress;
use super::range_fault::{self, RangeFaultRow};
use super::scale::{self, ScaleRow};
use super::walks::{self, WalkRow, METHODS};
use super::Result;
use crate::interrupt;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// What `bench all` measures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    migrate_sizes: Vec<u64>,
    /// Sizes also measured on two threads (the scaling goal).
    migrate_sizes_two_threads: Vec<u64>,
    migrate_iters: usize,
    /// Rounds on two threads: each also runs one thread, and the paired speedup's
    /// interval needs six rounds or more for 95%.
    migrate_iters_two_threads: usize,
    walk_pages: u64,
    walk_fractions: Vec<f64>,
    walk_iters: usize,
    fault_pages: u64,
    fault_thps: u64,
    range_fault_pages: u64,
    range_fault_iters: usize,
    driver_pages: u64,
    driver_iters: usize,
    scale_iters: usize,
}

impl Plan {
    /// The documented run behind the README's figures.
    pub(crate) fn full() -> Plan {
        Plan {
            migrate_sizes: vec![
                512 * KIB,
                2 * MIB,
                8 * MIB,
                32 * MIB,
                64 * MIB,
                128 * MIB,
                256 * MIB,
            ],
            migrate_sizes_two_threads: vec![64 * MIB, 128 * MIB, 256 * MIB],
            migrate_iters: 6,
            migrate_iters_two_threads: 9,
            walk_pages: 2048,
            walk_fractions: vec![0.0, 0.01, 0.1, 0.25, 0.5, 1.0],
            walk_iters: 40,
            fault_pages: 4096,
            fault_thps: 64,
            range_fault_pages: 16384,
            range_fault_iters: 9,
            driver_pages: 4096,
            driver_iters: 3,
            scale_iters: 9,
        }
    }

    /// Every scenario, small: a smoke run.
    pub(crate) fn quick() -> Plan {
        Plan {
            migrate_sizes: vec![512 * KIB, 2 * MIB],
            migrate_sizes_two_threads: vec![4 * MIB],
            migrate_iters: 1,
            migrate_iters_two_threads: 1,
            walk_pages: 256,
            walk_fractions: vec![0.0, 0.5],
            walk_iters: 1,
            fault_pages: 256,
            fault_thps: 4,
            range_fault_pages: 1024,
            range_fault_iters: 1,
            driver_pages: 1024,
            driver_iters: 1,
            scale_iters: 1,
        }
    }

    /// Rows the plan measures, for the progress bar.
    fn rows(&self) -> u64 {
        4 * (self.migrate_sizes.len() + self.migrate_sizes_two_threads.len()) as u64
            + (METHODS.len() * self.walk_fractions.len()) as u64
            + fault::ROWS
            + range_fault::ROWS
            + driver::ROWS
            + scale::ROWS
    }
}

/// The version of the `--json` object's layout: raised when a field changes meaning or
/// goes away (fields may be added without it). 2: migration rows' `ratio` is a paired
/// ratio (an object), and the `scale` rows.
pub(crate) const SCHEMA_VERSION: u32 = 2;

/// The report of `bench all`.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    schema_version: u32,
    machine: Machine,
    build: Build,
    plan: Plan,
    /// Wall-clock time of the whole run.
    seconds: f64,
    /// Whether a Ctrl-C cut the run short: the rows are those measured before it.
    interrupted: bool,
    pub(crate) migrate: Vec<MigrateRow>,
    pub(crate) walks: Vec<WalkRow>,
    pub(crate) fault: Vec<FaultRow>,
    pub(crate) range_fault: Vec<RangeFaultRow>,
    pub(crate) driver: Vec<DriverRow>,
    pub(crate) scale: Vec<ScaleRow>,
}

/// Runs `plan`, showing progress on a terminal. After a Ctrl-C ([`interrupt`]) the
/// scenario in hand stops early and the others are skipped.
pub(crate) fn run(plan: Plan) -> Result<Report> {
    let start = Instant::now();
    let bar = Progress::new("bench all", plan.rows());
    let mut migrate = Vec::new();
    for (threads, sizes, iters) in [
        (1, &plan.migrate_sizes, plan.migrate_iters),
        (
            2,
            &plan.migrate_sizes_two_threads,
            plan.migrate_iters_two_threads,
        ),
    ] {
        bar.doing(format!("migrate, {threads} thread(s)"));
        migrate.extend(migrate::migrate_rows(sizes, threads, iters, |_| {
            bar.step()
        })?);
    }
    // Each scenario sets up before it checks for an interrupt: skip it instead.
    let go = || !interrupt::requested();
    bar.doing("walks");
    let walks = if go() {
        walks::walk_rows(
            plan.walk_pages,
            &plan.walk_fractions,
            plan.walk_iters,
            |_| bar.step(),
        )?
    } else {
        Vec::new()
    };
    let fault = if go() {
        fault::fault_rows(plan.fault_pages, plan.fault_thps, |r| {
            bar.doing(format!("fault: {}", r.scenario()));
            bar.step();
        })?
    } else {
        Vec::new()
    };
    let range_fault = if go() {
        range_fault::range_fault_rows(plan.range_fault_pages, plan.range_fault_iters, |r| {
            bar.doing(format!("range-fault: {}", r.scenario()));
            bar.step();
        })?
    } else {
        Vec::new()
    };
    let driver = if go() {
        driver::driver_rows(plan.driver_pages, plan.driver_iters, |r| {
            bar.doing(format!("driver: {}", r.scenario()));
            bar.step();
        })?
    } else {
        Vec::new()
    };
    let scale = if go() {
        scale::scale_rows(plan.scale_iters, |r| {
            bar.doing(format!("scale: {}", r.scenario()));
            bar.step();
        })?
    } else {
        Vec::new()
    };
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        machine: Machine::this(),
        build: Build::this(),
        plan,
        seconds: start.elapsed().as_secs_f64(),
        interrupted: interrupt::requested(),
        migrate,
        walks,
        fault,
        range_fault,
        driver,
        scale,
    })
}

/// Prints every table of `report`, headed by the machine and the build.
pub(crate) fn print(report: &Report) {
    outln!("{}", report.machine.line());
    outln!("{}", report.build.line());
    if report.interrupted {
        outln!(
            "run took {:.0} s, interrupted: the rows are those measured before\n",
            report.seconds
        );
    } else {
        outln!("run took {:.0} s\n", report.seconds);
    }
    outln!("== migrate: migrate_vma against memcpy of the same bytes");
    migrate::print_table(&report.migrate);
    outln!("\n== walks: bringing a partly-faulted range to a device");
    walks::print_table(&report.walks);
    outln!("\n== fault: latency against the host kernel's first-touch fault");
    fault::print_table(&report.fault);
    outln!("\n== range-fault: hmm_range_fault against the host kernel's pagemap walk");
    range_fault::print_table(&report.range_fault);
    outln!("\n== driver: the SVM driver's GPU faults, evictions and policy hooks");
    driver::print_table(&report.driver);
    outln!("\n== scale: costs in a large setting against a small one");
    scale::print_table(&report.scale);
}
