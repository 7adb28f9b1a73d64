//! `hmm selftest`: the kernel's `hmm-tests.c` (`hmm_dmirror::selftest`), every case in
//! both variants under the kselftest harness's names, then the project's driver
//! conformance scenarios (`hmm_dmirror::conformance`) on the private and coherent devices,
//! as TAP the way the kselftest harness prints it (`test_hmm.sh smoke`). `-t NAME` runs
//! the tests it names, `--list` lists them, `--json` prints one object instead. A test
//! that panics fails; the others still run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use hmm::zone_device::MemoryType;
use hmm_dmirror::conformance::{DmirrorFactory, Scenario, SCENARIOS};
use hmm_dmirror::selftest::{self, panic_message, Options, Outcome, Test};
use serde::Serialize;

/// The `schema_version` of `hmm selftest --json`.
const SCHEMA_VERSION: u32 = 1;

/// What `hmm selftest` was asked.
#[derive(Debug, Clone, Default)]
pub(crate) struct Args {
    /// `-t`: the tests to run (all when empty).
    pub(crate) tests: Vec<String>,
    /// `--list`.
    pub(crate) list: bool,
    /// `--json`.
    pub(crate) json: bool,
    /// `--quick`: the benchmark at small sizes only.
    pub(crate) quick: bool,
}

/// One test of the run: a kernel case in one variant, or a conformance scenario on one
/// kind of device.
enum Entry {
    Kernel(Test),
    Conformance(MemoryType, &'static Scenario),
}

impl Entry {
    fn name(&self) -> String {
        match self {
            Entry::Kernel(t) => t.name(),
            Entry::Conformance(kind, s) => format!("conformance.{}.{}", kind_name(*kind), s.name),
        }
    }

    fn matches(&self, pattern: &str) -> bool {
        match self {
            Entry::Kernel(t) => t.matches(pattern),
            Entry::Conformance(_, s) => {
                pattern == s.name
                    || pattern == self.name()
                    || pattern == format!("conformance.{}", s.name)
            }
        }
    }

    fn about(&self) -> &'static str {
        match self {
            Entry::Kernel(t) => t.case.about,
            Entry::Conformance(..) => "driver conformance scenario",
        }
    }

    fn run(&self, opts: &Options) -> (Outcome, Vec<String>) {
        match self {
            Entry::Kernel(t) => {
                let r = selftest::run(t, opts);
                (r.outcome, r.log)
            }
            Entry::Conformance(kind, s) => {
                let factory = DmirrorFactory::new(*kind);
                let r = catch_unwind(AssertUnwindSafe(|| (s.run)(&factory)))
                    .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&*p))));
                let outcome = match r {
                    Ok(()) => Outcome::Pass,
                    Err(why) => Outcome::Fail(why),
                };
                (outcome, Vec::new())
            }
        }
    }
}

fn kind_name(kind: MemoryType) -> &'static str {
    match kind {
        MemoryType::DeviceCoherent => "device_coherent",
        _ => "device_private",
    }
}

/// Every test, the kernel's first.
fn entries() -> Vec<Entry> {
    let kernel = selftest::tests().map(Entry::Kernel);
    let conformance = [MemoryType::DevicePrivate, MemoryType::DeviceCoherent]
        .into_iter()
        .flat_map(|k| SCENARIOS.iter().map(move |s| Entry::Conformance(k, s)));
    kernel.chain(conformance).collect()
}

/// One test's line in `--json`.
#[derive(Serialize)]
struct JsonTest {
    name: String,
    #[serde(flatten)]
    outcome: Outcome,
    seconds: f64,
    output: Vec<String>,
}

/// The totals line's counts.
#[derive(Serialize, Default)]
struct Totals {
    pass: usize,
    fail: usize,
    skip: usize,
}

/// Runs the tests `args` selects; returns the number that failed, or a usage error.
pub(crate) fn run(args: &Args) -> Result<usize, String> {
    let all = entries();
    let chosen: Vec<&Entry> = if args.tests.is_empty() {
        all.iter().collect()
    } else {
        for t in &args.tests {
            if !all.iter().any(|e| e.matches(t)) {
                return Err(format!(
                    "no test is named '{t}' (`hmm selftest --list` lists them)"
                ));
            }
        }
        all.iter()
            .filter(|e| args.tests.iter().any(|t| e.matches(t)))
            .collect()
    };
    if args.list {
        for e in &chosen {
            outln!("{:<56} {}", e.name(), e.about());
        }
        return Ok(0);
    }
    let opts = if args.quick {
        Options {
            bench_max_bytes: 4 * hmm::addr::PMD_SIZE,
        }
    } else {
        Options::default()
    };

    let mut totals = Totals::default();
    let mut json = Vec::new();
    if !args.json {
        outln!("TAP version 13");
        outln!("1..{}", chosen.len());
        outln!("# Starting {} tests.", chosen.len());
    }
    for (i, e) in chosen.iter().enumerate() {
        let name = e.name();
        if !args.json {
            outln!("#  RUN           {name} ...");
        }
        let t = Instant::now();
        let (outcome, log) = e.run(&opts);
        let seconds = t.elapsed().as_secs_f64();
        match &outcome {
            Outcome::Pass => totals.pass += 1,
            Outcome::Fail(_) => totals.fail += 1,
            Outcome::Skip(_) => totals.skip += 1,
        }
        if args.json {
            json.push(JsonTest {
                name,
                outcome,
                seconds,
                output: log,
            });
            continue;
        }
        for line in &log {
            outln!("# {line}");
        }
        let n = i + 1;
        match outcome {
            Outcome::Pass => {
                outln!("#            OK  {name}");
                outln!("ok {n} {name}");
            }
            Outcome::Skip(why) => {
                outln!("#      SKIP      {why}");
                outln!("#            OK  {name}");
                outln!("ok {n} {name} # SKIP {why}");
            }
            Outcome::Fail(why) => {
                outln!("# {why}");
                outln!("#          FAIL  {name}");
                outln!("not ok {n} {name}");
            }
        }
    }
    let ran = chosen.len();
    if args.json {
        let out = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "tests": json,
            "totals": totals,
        });
        outln!("{out}");
    } else {
        let verdict = if totals.fail == 0 { "PASSED" } else { "FAILED" };
        outln!(
            "# {verdict}: {} / {ran} tests passed.",
            totals.pass + totals.skip
        );
        outln!(
            "# Totals: pass:{} fail:{} xfail:0 xpass:0 skip:{} error:0",
            totals.pass,
            totals.fail,
            totals.skip
        );
    }
    Ok(totals.fail)
}
