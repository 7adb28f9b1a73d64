//! `hmm run`: a scenario file (or a shipped scenario) on the SVM driver under the
//! deterministic engine (`hmm-sim`), with its metrics as a table or one JSON object.
//! `--set key=value` overrides any field of the file; `--compare key=a,b,...` runs one
//! variant per value, on the host's cores at once, and prints them side by side. Each run
//! is one process's worth of work writing one object, so sweeps bigger than one machine
//! are farmed out by the usual tools (a Slurm array or GNU parallel running `hmm run --json`
//! with different `--set`s).

use std::path::Path;

use hmm_sim::engine::{run, run_with, Metrics, Outputs};
use hmm_sim::scenario::{parse, Scenario, SHIPPED};

use crate::bench::Result;

/// What `hmm run` was asked.
pub(crate) struct Request {
    pub(crate) scenario: Option<String>,
    pub(crate) list: bool,
    pub(crate) json: bool,
    pub(crate) set: Vec<String>,
    pub(crate) compare: Option<String>,
    /// Where the timeline goes (one run only).
    pub(crate) trace: Option<Box<dyn std::io::Write + Send>>,
    /// Where the charts go: the comparison's, or the run's.
    pub(crate) plot: Option<std::path::PathBuf>,
    /// Where the run's HTML report goes (one run only; created before the run).
    pub(crate) report: Option<(std::path::PathBuf, std::fs::File)>,
    /// Every agent on a thread of its own (`hmm_sim::threads`).
    pub(crate) threads: bool,
}

/// Runs `s` under the deterministic engine, or on real threads.
fn run_one(s: &Scenario, threads: bool) -> std::result::Result<Metrics, hmm_sim::engine::RunError> {
    if threads {
        hmm_sim::threads::run_threads(s)
    } else {
        run(s)
    }
}

/// Creates the report file at `path` (before the run, so a bad path fails at once).
pub(crate) fn open_report(path: &Path) -> std::result::Result<std::fs::File, String> {
    std::fs::File::create(path).map_err(|e| format!("--report {}: {e}", path.display()))
}

/// Creates the timeline file at `path` (before the run, so a bad path fails at once).
pub(crate) fn open_trace(
    path: &Path,
) -> std::result::Result<Box<dyn std::io::Write + Send>, String> {
    std::fs::File::create(path)
        .map(|f| Box::new(std::io::BufWriter::new(f)) as Box<dyn std::io::Write + Send>)
        .map_err(|e| format!("--trace-out {}: {e}", path.display()))
}

/// The text of `name_or_path`: a shipped scenario's, or a file's.
fn text_of(name_or_path: &str) -> std::result::Result<String, String> {
    if let Some(t) = hmm_sim::scenario::shipped(name_or_path) {
        return Ok(t.to_string());
    }
    std::fs::read_to_string(Path::new(name_or_path)).map_err(|e| {
        format!("{name_or_path}: {e} (not a file, nor a shipped scenario: see `hmm run --list`)")
    })
}

/// Reads and checks the scenario with `set`, or says why not (naming the file); refuses a
/// machine the host cannot hold `copies` of at once.
pub(crate) fn load(name_or_path: &str, set: &[String]) -> std::result::Result<Scenario, String> {
    let text = text_of(name_or_path)?;
    let s = parse(&text, set).map_err(|e| format!("{name_or_path}: {e}"))?;
    let need = host_bytes(&s);
    if let Some(avail) = crate::limits::mem_available() {
        if need > avail {
            return Err(format!(
                "{name_or_path}: the machine needs about {} of host memory and {} is available \
                 (MemAvailable in /proc/meminfo)",
                crate::limits::human(need),
                crate::limits::human(avail)
            ));
        }
    }
    Ok(s)
}

/// Host memory a run of `s` may commit: the RAM and device memory it touches (at most all
/// of them, at most the buffers and the zero pages), the metadata of those frames (48
/// bytes a page, committed as they are used), the allocators' block tables (72 bytes per
/// 2 MiB of the machine, allocated up front), and each buffer twice more (its shadow, and
/// the final read-back).
fn host_bytes(s: &Scenario) -> u64 {
    let mib = |m: u64| m << 20;
    let ram = mib(s.machine.ram_mib);
    let vram: u64 = s.machine.gpus.iter().map(|g| mib(g.vram_mib)).sum();
    let buffers: u64 = s.buffers.iter().map(|b| mib(b.mib)).sum();
    let touched = ram.min(buffers + (16 << 20)) + vram.min(buffers);
    let metadata = touched / 4096 * 48;
    let block_tables = (ram + vram) / (2 << 20) * 72;
    touched + metadata + block_tables + 2 * buffers
}

/// The variants of `--compare key=a,b,...`: one `--set` each.
pub(crate) fn variants(compare: &str) -> std::result::Result<(String, Vec<String>), String> {
    let (key, values) = compare
        .split_once('=')
        .ok_or_else(|| format!("--compare {compare}: expected key=a,b,..."))?;
    let values: Vec<String> = values
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if values.len() < 2 {
        return Err(format!("--compare {compare}: give at least two values"));
    }
    Ok((key.trim().to_string(), values))
}

pub(crate) fn main(mut r: Request) -> Result<()> {
    if r.list {
        for (name, text) in SHIPPED {
            let about = parse(text, &[]).map(|s| s.about).unwrap_or_default();
            outln!("{name:<24} {about}");
        }
        return Ok(());
    }
    let name = r.scenario.expect("clap requires a scenario without --list");
    if r.compare.is_none() {
        let s = load(&name, &r.set)?;
        // Threads keep no timeline and no recording (clap refuses them together).
        let (m, rec) = if r.threads {
            (run_one(&s, true)?, None)
        } else {
            let out = Outputs {
                trace: r.trace.take(),
                record: r.plot.is_some() || r.report.is_some(),
            };
            run_with(&s, out)?
        };
        if let (Some(dir), Some(rec)) = (&r.plot, &rec) {
            for f in crate::charts::run(dir, &m, rec)? {
                errln!("wrote {}", f.display());
            }
        }
        if let (Some((path, mut file)), Some(rec)) = (r.report.take(), &rec) {
            let json = serde_json::to_string_pretty(&versioned(&m))?;
            let page = crate::report::page(&text_of(&name)?, &s.about, &r.set, &m, &json, rec)?;
            std::io::Write::write_all(&mut file, page.as_bytes())
                .map_err(|e| format!("--report {}: {e}", path.display()))?;
            errln!("wrote {}", path.display());
        }
        return report(r.json, &[(String::new(), m)], false);
    }
    let (key, values) = variants(r.compare.as_deref().expect("one run returned above"))?;
    let runs: Vec<(String, Scenario)> = values
        .iter()
        .map(|v| {
            let mut set = r.set.clone();
            set.push(format!("{key}={v}"));
            load(&name, &set).map(|s| (format!("{key}={v}"), s))
        })
        .collect::<std::result::Result<_, _>>()?;
    // The variants in parallel, at most one per core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut results: Vec<(String, Metrics)> = Vec::new();
    for group in runs.chunks(cores) {
        let done: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|(label, sc)| s.spawn(move || (label.clone(), run_one(sc, r.threads))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a run does not panic"))
                .collect()
        });
        for (label, m) in done {
            results.push((label, m?));
        }
    }
    if let Some(dir) = &r.plot {
        let scenario = results.first().map_or("", |(_, m)| m.scenario.as_str());
        for f in crate::charts::compare(dir, scenario, &results)? {
            errln!("wrote {}", f.display());
        }
    }
    report(r.json, &results, true)
}

/// The version of the `--json` objects' layout: raised when a field changes meaning or
/// goes away (fields may be added without it).
const SCHEMA_VERSION: u32 = 1;

/// A run's metrics as `--json` prints them: versioned.
#[derive(serde::Serialize)]
struct Versioned<'m> {
    schema_version: u32,
    #[serde(flatten)]
    metrics: &'m Metrics,
}

/// Prints `results` (one object, or an array for a comparison) and fails if any lost a
/// byte or leaked a frame.
/// `m` as `--json` prints it.
fn versioned(m: &Metrics) -> Versioned<'_> {
    Versioned {
        schema_version: SCHEMA_VERSION,
        metrics: m,
    }
}

fn report(json: bool, results: &[(String, Metrics)], array: bool) -> Result<()> {
    if json {
        if array {
            let all: Vec<Versioned<'_>> = results.iter().map(|(_, m)| versioned(m)).collect();
            outln!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            outln!(
                "{}",
                serde_json::to_string_pretty(&versioned(&results[0].1))?
            );
        }
    } else {
        print_table(results);
    }
    let bad: Vec<&str> = results
        .iter()
        .filter(|(_, m)| m.corrupted_bytes > 0 || m.leaked_frames > 0)
        .map(|(l, _)| l.as_str())
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        errln!("hmm: corrupted bytes or leaked frames in {bad:?}");
        Err("a run lost bytes or leaked frames".into())
    }
}

/// `hmm replay`: the trace from `input` on `s`'s machine.
pub(crate) fn replay(
    s: &Scenario,
    path: &Path,
    input: impl std::io::BufRead,
    format: hmm_sim::trace::Format,
    json: bool,
    trace: Option<Box<dyn std::io::Write + Send>>,
) -> Result<()> {
    let out = Outputs {
        trace,
        record: false,
    };
    let (m, _) = hmm_sim::trace::replay(s, input, format, out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    report(json, &[(String::new(), m)], false)
}

/// The metrics of each run in a column.
fn print_table(results: &[(String, Metrics)]) {
    type Row = (&'static str, fn(&Metrics) -> String);
    let rows: [Row; 19] = [
        ("scenario", |m| m.scenario.clone()),
        ("sim time (ms)", |m| {
            format!("{:.3}", m.sim_time_ns as f64 / 1e6)
        }),
        ("wall time (s)", |m| format!("{:.3}", m.wall_seconds)),
        ("events", |m| m.events.to_string()),
        ("events/s", |m| format!("{:.0}", m.events_per_second)),
        ("gpu faults", |m| m.gpu_faults.to_string()),
        ("fault batches", |m| m.fault_batches.to_string()),
        ("MiB host->device", |m| {
            format!("{:.1}", m.bytes_h2d as f64 / 1048576.0)
        }),
        ("MiB device->host", |m| {
            format!("{:.1}", m.bytes_d2h as f64 / 1048576.0)
        }),
        ("MiB device->device", |m| {
            format!("{:.1}", m.bytes_d2d as f64 / 1048576.0)
        }),
        ("MiB bounced", |m| {
            format!("{:.1}", m.bytes_bounced as f64 / 1048576.0)
        }),
        ("evictions", |m| m.evictions.to_string()),
        ("prefetched pages", |m| m.prefetched_pages.to_string()),
        ("thrashing", |m| m.thrash_detections.to_string()),
        ("remote accesses", |m| m.remote_accesses.to_string()),
        ("peer accesses", |m| m.peer_accesses.to_string()),
        ("policy", |m| {
            format!(
                "{}/{}/{}/{}",
                m.policy.migration, m.policy.prefetch, m.policy.eviction, m.policy.peer
            )
        }),
        ("corrupted bytes", |m| m.corrupted_bytes.to_string()),
        ("leaked frames", |m| m.leaked_frames.to_string()),
    ];
    let mut names: Vec<String> = rows.iter().map(|(n, _)| n.to_string()).collect();
    let mut cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, f)| results.iter().map(|(_, m)| f(m)).collect())
        .collect();
    // Bytes per link, where a machine has more than one GPU's links.
    let links: std::collections::BTreeSet<&String> = results
        .iter()
        .flat_map(|(_, m)| m.bytes_by_link.keys())
        .collect();
    if links
        .iter()
        .any(|l| !matches!(l.as_str(), "host-gpu0" | "gpu0-host"))
    {
        for l in links {
            names.push(format!("MiB {l}"));
            cells.push(
                results
                    .iter()
                    .map(|(_, m)| {
                        let b = m.bytes_by_link.get(l).copied().unwrap_or(0);
                        format!("{:.1}", b as f64 / 1048576.0)
                    })
                    .collect(),
            );
        }
    }
    let width = results
        .iter()
        .map(|(l, _)| l.len())
        .chain(cells.iter().flatten().map(String::len))
        .max()
        .unwrap_or(0)
        + 2;
    if results.len() > 1 {
        let head: Vec<String> = results
            .iter()
            .map(|(l, _)| format!("{l:>width$}"))
            .collect();
        outln!("{:<18}{}", "", head.join(""));
    }
    for (name, row) in names.iter().zip(&cells) {
        let row: Vec<String> = row.iter().map(|c| format!("{c:>width$}")).collect();
        outln!("{name:<18}{}", row.join(""));
    }
}
