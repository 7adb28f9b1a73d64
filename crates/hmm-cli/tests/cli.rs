//! The `hmm` command end to end: `selftest` reports and exits as documented,
//! `bench walks` counts one pass for one walk and more for the two-step recipes, and
//! compares the recipes' times with one walk's round by round, and `run` lists, runs and
//! compares scenarios and refuses bad ones naming the line.

use std::process::Command;

fn hmm(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hmm"))
        .args(args)
        .output()
        .expect("run hmm");
    (
        out.status.success(),
        String::from_utf8(out.stdout).expect("utf-8 output"),
    )
}

#[test]
fn selftest_passes_and_says_so() {
    // The whole run is `hmm_dmirror`'s test and a CI step in release; here, a sample of
    // each kind of test.
    let (ok, out) = hmm(&[
        "selftest",
        "-t",
        "hmm.open_close",
        "-t",
        "anon_read",
        "-t",
        "hmm2.migrate_mixed",
        "-t",
        "userfaultfd_read",
        "-t",
        "conformance.hugetlb_pages",
    ]);
    assert!(ok, "{out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("TAP version 13"));
    let n: usize = lines
        .next()
        .and_then(|l| l.strip_prefix("1.."))
        .and_then(|n| n.parse().ok())
        .expect("the plan");
    let last = out.lines().last().expect("a totals line");
    assert!(last.starts_with("# Totals: pass:"), "{last}");
    assert!(last.contains(" fail:0 "), "{last}");
    // One result line per test, numbered in order, the kernel's names first.
    let results: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .collect();
    assert_eq!(results.len(), n);
    assert_eq!(results[0], "ok 1 hmm.hmm_device_private.open_close");
    assert!(out.contains("\nok 2 hmm.hmm_device_private.anon_read\n"));
    assert!(out.contains(" hmm2.hmm2_device_coherent.migrate_mixed\n"));
    assert!(out.contains(" conformance.device_private.hugetlb_pages\n"));
    // linux-mm's case, served by a userfaultfd handler thread.
    assert!(
        out.contains(" hmm.hmm_device_private.userfaultfd_read\n"),
        "{out}"
    );
    assert!(!out.contains("# SKIP"), "{out}");
}

#[test]
fn selftest_runs_one_test_by_name_lists_and_prints_json() {
    let (ok, out) = hmm(&["selftest", "-t", "hmm.hmm_device_coherent.migrate"]);
    assert!(ok, "{out}");
    assert!(out.contains("1..1\n"), "{out}");
    assert!(
        out.contains("ok 1 hmm.hmm_device_coherent.migrate\n"),
        "{out}"
    );

    let (ok, out) = hmm(&["selftest", "--list"]);
    assert!(ok);
    assert!(
        out.starts_with("hmm.hmm_device_private.open_close "),
        "{out}"
    );
    assert!(out.contains("hmm.hmm_device_coherent.benchmark_thp_migration "));

    let (ok, out) = hmm(&[
        "selftest",
        "--json",
        "-t",
        "snapshot",
        "-t",
        "userfaultfd_read",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["tests"].as_array().unwrap().len(), 4);
    assert_eq!(
        v["tests"][0]["name"],
        "hmm.hmm_device_private.userfaultfd_read"
    );
    assert_eq!(v["tests"][0]["result"], "pass");
    assert_eq!(v["totals"]["pass"], 4);
    assert_eq!(v["totals"]["skip"], 0);
    assert_eq!(v["totals"]["fail"], 0);
}

#[test]
fn selftest_refuses_a_name_that_names_no_test() {
    let out = Command::new(env!("CARGO_BIN_EXE_hmm"))
        .args(["selftest", "-t", "hmm.nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no test is named 'hmm.nosuch'"), "{err}");
}

#[test]
fn bench_walks_counts_one_pass_for_one_walk() {
    let (ok, out) = hmm(&[
        "bench",
        "walks",
        "--pages",
        "128",
        "--fractions",
        "0,0.25",
        "--iters",
        "1",
        "--json",
    ]);
    assert!(ok, "{out}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("a JSON array");
    assert_eq!(rows.len(), 6);
    for r in &rows {
        assert_eq!(r["schema_version"], 2, "every row is versioned");
        let fraction = r["nonpresent_fraction"].as_f64().unwrap();
        let walks = r["walks"].as_u64().unwrap();
        assert_eq!(r["pages_migrated"], 128, "{r}");
        assert!(r["ns_per_page"].as_f64().unwrap() > 0.0);
        let (least, two_step) = match r["method"].as_str().unwrap() {
            "fault_then_migrate" => (2, true),
            "migrate_fault_migrate" => (if fraction > 0.0 { 3 } else { 1 }, true),
            "one_walk" => (1, false),
            m => panic!("unknown method {m}"),
        };
        let ratio = &r["one_walk_time_ratio"];
        if two_step {
            // Plus one pass per Busy retry.
            assert_eq!(walks, least + r["busy_retries"].as_u64().unwrap(), "{r}");
            // Compared with one_walk round by round: one round here.
            assert_eq!(ratio["rounds"], 1, "{r}");
            let [lo, mid, hi] = ["low", "median", "high"].map(|k| ratio[k].as_f64().unwrap());
            assert!(0.0 < lo && lo <= mid && mid <= hi, "{r}");
        } else {
            assert_eq!(walks, 1, "{r}");
            assert!(ratio.is_null(), "{r}");
        }
    }
    // Bad input is an error, not a panic.
    let (ok, _) = hmm(&["bench", "walks", "--fractions", "1.5", "--iters", "1"]);
    assert!(!ok);
}

#[test]
fn bench_all_quick_reports_every_scenario_and_plots_it() {
    let dir = std::env::temp_dir().join(format!("hmm-cli-plots-{}", std::process::id()));
    let (ok, out) = hmm(&[
        "bench",
        "all",
        "--quick",
        "--json",
        "--plot",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!r["machine"]["cpu"].as_str().unwrap().is_empty());
    assert!(!r["build"]["commit"].as_str().unwrap().is_empty());
    assert_eq!(r["build"]["version"], env!("CARGO_PKG_VERSION"));

    let migrate = r["migrate"].as_array().unwrap();
    // Two sizes on one thread and one on two, each 4 KiB and THP, both directions.
    assert_eq!(migrate.len(), 12);
    for row in migrate {
        let (g, m) = (
            row["gbps"].as_f64().unwrap(),
            row["memcpy_gbps"].as_f64().unwrap(),
        );
        assert!(g > 0.0 && m > 0.0, "{row}");
        // The ratio to memcpy is paired round by round, as are the speedups of the
        // two-thread rows (one-thread rows have none); the quick plan runs one round.
        let ratio = &row["ratio"];
        assert_eq!(ratio["rounds"], 1, "{row}");
        let median = ratio["median"].as_f64().unwrap();
        assert!(median > 0.0 && ratio["low"] == ratio["high"], "{row}");
        // Where a page's time goes: every stage timed, and their sum most of the
        // migration's wall time (threads' times added).
        let st = &row["stages_ns_per_page"];
        let stage = |k: &str| st[k].as_f64().unwrap();
        let total: f64 = ["setup", "alloc", "copy", "pages", "finalize"]
            .iter()
            .map(|k| stage(k))
            .sum();
        assert!(stage("copy") > 0.0 && stage("setup") > 0.0, "{row}");
        let wall_ns = 4096.0 / g;
        assert!(
            total * 1.05 >= wall_ns * row["threads"].as_f64().unwrap() / 2.0,
            "{row}"
        );
        assert!(row["memcpy_ns_per_page"].as_f64().unwrap() > 0.0, "{row}");
        for key in ["speedup", "memcpy_speedup"] {
            if row["threads"] == 1 {
                assert!(row[key].is_null(), "{row}");
            } else {
                assert_eq!(row[key]["rounds"], 1, "{row}");
                assert!(row[key]["median"].as_f64().unwrap() > 0.0, "{row}");
            }
        }
    }
    assert!(migrate.iter().any(|row| row["threads"] == 2));

    let walks = r["walks"].as_array().unwrap();
    assert_eq!(walks.len(), 6);
    for row in walks.iter().filter(|w| w["method"] == "one_walk") {
        assert_eq!(row["walks"], 1, "{row}");
    }

    let fault = r["fault"].as_array().unwrap();
    let scenarios: Vec<&str> = fault
        .iter()
        .map(|f| f["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        scenarios,
        [
            "anon_write_4k",
            "anon_read_zero_page_4k",
            "anon_write_thp",
            "device_private_read_4k"
        ]
    );
    for row in fault {
        let (median, p99) = (
            row["median_ns"].as_f64().unwrap(),
            row["p99_ns"].as_f64().unwrap(),
        );
        assert!(median > 0.0 && p99 >= median, "{row}");
        assert!(row["kernel_median_ns"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert_eq!(fault[2]["faults"], 4);
    assert_eq!(fault[0]["faults"], 256);

    let range = r["range_fault"].as_array().unwrap();
    assert_eq!(range.len(), 8);
    for row in range {
        assert_eq!(row["pages"], 1024);
        assert!(row["ns_per_page"].as_f64().unwrap() >= row["min_ns_per_page"].as_f64().unwrap());
    }

    // The scale rows: each a large setting against a small one, paired.
    let scale = r["scale"].as_array().unwrap();
    let names: Vec<&str> = scale
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["notifier_lookup", "rmap_fork_family", "machine_size"]
    );
    for row in scale {
        assert!(row["small_ns"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["large_ns"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["ratio"]["median"].as_f64().unwrap() > 0.0, "{row}");
    }
    // The 2.6 TiB machine committed a few MiB on the host.
    let resident = scale[2]["large_host_resident_bytes"].as_u64().unwrap();
    assert!(resident > 0 && resident < 256 << 20, "{resident}");

    for name in [
        "migrate-threads-1",
        "migrate-threads-2",
        "walks",
        "fault",
        "range-fault",
    ] {
        let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).expect("an SVG");
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{name}.svg");
        let png = std::fs::read(dir.join(format!("{name}.png"))).expect("a PNG");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name}.png");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_tables_name_the_machine_and_the_build() {
    let (ok, out) = hmm(&["bench", "range-fault", "--pages", "64", "--iters", "1"]);
    assert!(ok, "{out}");
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("machine: "), "{out}");
    assert!(lines.next().unwrap().starts_with("build: hmm "), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("_4k") || l.contains("_thp"))
            .count(),
        8
    );
}

#[test]
fn bench_bad_arguments_are_errors() {
    for args in [
        &["bench", "fault", "--pages", "0"][..],
        &["bench", "fault", "--thps", "0"],
        &["bench", "range-fault", "--iters", "0"],
        &["bench", "migrate", "--sizes-kib", "3"],
        // Two threads would share the one THP.
        &["bench", "migrate", "--threads", "2", "--sizes-kib", "2048"],
        &["bench", "walks", "--pages", "0"],
    ] {
        let (ok, out) = hmm(args);
        assert!(!ok, "{args:?} succeeded: {out}");
    }
}

#[test]
fn stress_runs_every_operation_and_breaks_nothing_even_when_allocations_fail() {
    // A clean run: `hmm stress` fails when an invariant breaks.
    let stress = |extra: &[&str]| -> serde_json::Value {
        // `--min-each 1`: however loaded the host, every kind of operation runs.
        let mut args = vec![
            "stress",
            "--seconds",
            "2",
            "--min-each",
            "1",
            "--seed",
            "7",
            "--pages",
            "256",
        ];
        args.extend(extra);
        args.push("--json");
        let (ok, out) = hmm(&args);
        assert!(ok, "{out}");
        serde_json::from_str(&out).expect("one JSON object")
    };
    let r = stress(&["--fail-alloc", "10", "--threads", "2"]);
    for key in [
        "corrupted_bytes",
        "leaked_frames",
        "stale_mirror_entries",
        "invariant_failures",
        "unexpected_errors",
        "deadlocks",
    ] {
        assert_eq!(r[key], 0, "{key}: {r}");
    }
    assert!(r["checks"].as_u64().unwrap() >= 2, "{r}");
    for key in ["injected_failures", "oom_failures"] {
        assert!(r[key].as_u64().unwrap() > 0, "{key}: {r}");
    }
    let kinds = r["ops_by_kind"].as_object().unwrap();
    assert_eq!(kinds.len(), 17);
    for (kind, n) in kinds {
        assert!(n.as_u64().unwrap() > 0, "no {kind} in {r}");
    }
    assert_eq!(
        r["ops"].as_u64().unwrap(),
        kinds.values().map(|n| n.as_u64().unwrap()).sum::<u64>()
    );
    assert_eq!(r["config"]["seed"], 7);

    // Without injected failures, the THP areas are collapsed again and again, and split.
    // (How many reach a device whole depends on the interleaving: forks and the writes
    // after them split THPs too; `tests/thp_migrate.rs` moves them whole
    // deterministically.)
    let r = stress(&[]);
    for key in ["thp_collapses", "thp_splits"] {
        assert!(r[key].as_u64().unwrap() > 0, "{key}: {r}");
    }

    for args in [
        &["stress", "--threads", "0"][..],
        &["stress", "--seconds", "0"],
        &["stress", "--seconds", "-1"],
        &["stress", "--fail-alloc", "51"],
        &["stress", "--fail-alloc", "-1"],
    ] {
        let (ok, out) = hmm(args);
        assert!(!ok, "{args:?} succeeded: {out}");
    }
}

/// The binary, to run with arguments of its own.
fn cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hmm"))
}

#[test]
fn run_lists_runs_and_compares_scenarios() {
    let out = cmd().args(["run", "--list"]).output().unwrap();
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    for name in [
        "stream",
        "stream-oversubscribed",
        "random",
        "cpu-gpu-pingpong",
    ] {
        assert!(list.lines().any(|l| l.starts_with(name)), "{list}");
    }
    let out = cmd()
        .args(["run", "stream", "--json", "--set", "buffer.0.mib=4"])
        .output()
        .unwrap();
    // An array index is not a key: the override is refused as a bad argument.
    assert_eq!(out.status.code(), Some(2));
    let out = cmd().args(["run", "stream", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    for key in [
        "scenario",
        "seed",
        "sim_time_ns",
        "wall_seconds",
        "events",
        "events_per_second",
        "gpu_faults",
        "fault_batches",
        "bytes_h2d",
        "bytes_d2h",
        "bytes_d2d",
        "evictions",
        "prefetched_pages",
        "thrash_detections",
        "remote_accesses",
        "corrupted_bytes",
        "leaked_frames",
    ] {
        assert!(v.get(key).is_some(), "{key} missing");
    }
    assert_eq!(v["corrupted_bytes"], 0);
    assert_eq!(v["leaked_frames"], 0);
    let out = cmd()
        .args([
            "run",
            "stream-oversubscribed",
            "--json",
            "--compare",
            "policy.eviction=lru,random",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.len(), 2);
    assert_ne!(
        v[0]["evictions"], v[1]["evictions"],
        "the eviction policies differ"
    );
}

#[test]
fn run_compares_peer_policies_and_draws_them() {
    let dir = std::env::temp_dir().join(format!("hmm-run-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Two GPUs of one group take turns on one buffer.
    let file = dir.join("peers.toml");
    std::fs::write(
        &file,
        "name = \"peers\"\n[machine]\nram_mib = 32\n\
         gpus = [{ vram_mib = 4, group = \"x\" }, { vram_mib = 4, group = \"x\" }]\n\
         [policy]\nprefetch = \"none\"\n[[buffer]]\nname = \"a\"\nmib = 2\n\
         [[phase]]\nagents = [{ on = \"gpu0\", buffer = \"a\", access = \"write\" }]\n\
         [[phase]]\nagents = [{ on = \"gpu1\", buffer = \"a\", passes = 2 }]\n",
    )
    .unwrap();
    let out = cmd()
        .arg("run")
        .arg(&file)
        .args([
            "--json",
            "--compare",
            "policy.peer=copy,bounce,remote",
            "--plot",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let field = |i: usize, k: &str| v[i][k].as_u64().unwrap();
    assert!(
        field(0, "bytes_d2d") > 0 && field(0, "bytes_bounced") == 0,
        "copy"
    );
    assert!(
        field(1, "bytes_d2d") == 0 && field(1, "bytes_bounced") > 0,
        "bounce"
    );
    assert!(
        field(2, "bytes_d2d") == 0 && field(2, "peer_accesses") > 0,
        "remote"
    );
    assert!(v[0]["bytes_by_link"]["gpu0-gpu1"].as_u64().unwrap() > 0);
    for ext in ["svg", "png"] {
        let f = dir.join(format!("compare-peers.{ext}"));
        assert!(
            std::fs::metadata(&f).unwrap().len() > 1000,
            "{}",
            f.display()
        );
    }
    let svg = std::fs::read_to_string(dir.join("compare-peers.svg")).unwrap();
    for label in ["copy", "bounce", "remote", "GPU to GPU", "simulated time"] {
        assert!(svg.contains(label), "the chart names {label}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // A report is of one run.
    let out = cmd()
        .args(["run", "stream", "--compare", "seed=1,2", "--report"])
        .arg(dir.join("r.html"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Headless Chromium as Debian packages it, with the flags a closed network needs; `None`
/// when it is not installed (CI installs it and sets `HMM_REQUIRE_CHROMIUM`, which makes
/// its absence a failure).
fn chromium() -> Option<std::process::Command> {
    let path = std::path::Path::new("/usr/bin/chromium");
    if !path.exists() {
        assert!(
            std::env::var_os("HMM_REQUIRE_CHROMIUM").is_none(),
            "HMM_REQUIRE_CHROMIUM is set and /usr/bin/chromium is missing"
        );
        eprintln!("skipped: no /usr/bin/chromium (apt-get install chromium)");
        return None;
    }
    let profile = std::env::temp_dir().join(format!("hmm-chromium-{}", std::process::id()));
    let mut c = std::process::Command::new(path);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    Some(c)
}

#[test]
fn run_draws_its_charts_and_a_report_a_browser_shows() {
    let dir = std::env::temp_dir().join(format!("hmm-run-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("small.toml");
    std::fs::write(
        &file,
        "name = \"small <&>\"\nabout = \"a GPU and the CPU on one buffer\"\n\
         [machine]\nram_mib = 32\ngpus = [{ vram_mib = 2 }]\n\
         [[buffer]]\nname = \"a\"\nmib = 4\n\
         [[phase]]\nagents = [{ on = \"gpu0\", buffer = \"a\", access = \"rw\" },\
         { on = \"cpu\", buffer = \"a\", pattern = \"strided\", stride = 65536 }]\n",
    )
    .unwrap();
    let report = dir.join("report.html");
    let out = cmd()
        .arg("run")
        .arg(&file)
        .arg("--json")
        .arg("--plot")
        .arg(&dir)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for chart in ["bytes", "batches", "residency"] {
        for ext in ["svg", "png"] {
            // The name's characters that are no file name's become `_`.
            let f = dir.join(format!("{chart}-small____.{ext}"));
            assert!(
                std::fs::metadata(&f).unwrap().len() > 1000,
                "{}",
                f.display()
            );
        }
    }
    let html = std::fs::read_to_string(&report).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "three charts inline");
    assert!(
        html.contains("<h1>small &lt;&amp;&gt;</h1>"),
        "the name is escaped"
    );
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "self-contained: nothing is fetched"
    );
    let Some(mut browser) = chromium() else {
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    };
    // What the page shows once its script has run: the metrics table it builds.
    let dom = browser
        .arg("--dump-dom")
        .arg(format!("file://{}", report.display()))
        .output()
        .unwrap();
    assert!(dom.status.success());
    let dom = String::from_utf8(dom.stdout).unwrap();
    let row = |key: &str| {
        let at = dom
            .find(&format!("id=\"metric-{key}\""))
            .unwrap_or_else(|| panic!("the page shows no {key}"));
        let end = at + dom[at..].find("</tr>").unwrap();
        dom[at..end].to_string()
    };
    let faults = m["gpu_faults"].as_u64().unwrap();
    assert!(faults > 0);
    let shown = row("gpu_faults");
    let digits: String = shown
        .rsplit("<td")
        .next()
        .unwrap()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    assert_eq!(digits, faults.to_string(), "{shown}");
    assert!(row("corrupted_bytes").contains(">0</td>"));
    assert!(row("scenario").contains("small &lt;&amp;&gt;"));
    assert!(dom.contains("every byte checked, no frame leaked"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_on_real_threads_keeps_every_byte() {
    let out = cmd()
        .args(["run", "cpu-gpu-pingpong", "--threads", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (m["corrupted_bytes"].as_u64(), m["leaked_frames"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(m["events"], 20480, "every access of both agents");
    // Threads have no one timeline, recording or report.
    for extra in ["--trace-out", "--plot", "--report"] {
        let out = cmd()
            .args(["run", "cpu-gpu-pingpong", "--threads", extra, "/tmp/x"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra}");
    }
}

#[test]
fn rust_log_turns_on_the_logs_of_the_main_paths() {
    let run = |log: Option<&str>| {
        let mut c = cmd();
        c.args([
            "run",
            "peer-eviction",
            "--json",
            "--set",
            "policy.evict_to=peer",
        ]);
        c.env_remove("RUST_LOG");
        if let Some(l) = log {
            c.env("RUST_LOG", l);
        }
        let out = c.output().unwrap();
        assert!(out.status.success());
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            m["corrupted_bytes"], 0,
            "the logs go to stderr, not into the JSON"
        );
        String::from_utf8(out.stderr).unwrap()
    };
    assert_eq!(run(None), "", "no log without RUST_LOG");
    let logs = run(Some("hmm_svm=debug"));
    for line in [
        "hmm_svm::fault: fault batch",
        "hmm_svm::migrate: to device",
        "hmm_svm::evict: evict chunk",
    ] {
        assert!(logs.contains(line), "{line} missing");
    }
    assert!(
        !logs.contains("hmm::notifier"),
        "the filter keeps other targets out"
    );
}

#[test]
fn run_refuses_bad_scenarios_naming_the_line() {
    let dir = std::env::temp_dir().join(format!("hmm-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "name = \"x\"\n[machine]\nram_mib = 64\n[[buffer]]\nname = \"a\"\nmib = 2\n\
         [[phase]]\nagents = [{ on = \"gpu0\", buffer = \"a\" }]\n",
    )
    .unwrap();
    let out = cmd().arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("line 8") && err.contains("phase[0].agents[0].on"),
        "{err}"
    );
    for args in [
        vec!["run", "no-such-scenario"],
        vec!["run", "stream", "--compare", "seed"],
        vec!["run", "stream", "--compare", "seed=1"],
        vec!["run", "stream", "--set", "policy.eviction=mru"],
        vec!["run"],
    ] {
        let out = cmd().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn replay_runs_a_native_trace_and_names_a_bad_line() {
    let dir = std::env::temp_dir().join(format!("hmm-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.csv");
    let lines: String = (0..500u64)
        .map(|i| {
            let agent = if i % 4 == 0 { "cpu" } else { "gpu0" };
            format!("{},{agent},w,a,{},64\n", i * 50, (i * 31 % 4096) * 4096)
        })
        .collect();
    std::fs::write(
        &good,
        format!("time_ns,agent,op,buffer,offset,len\n{lines}"),
    )
    .unwrap();
    let out = cmd()
        .arg("replay")
        .arg(&good)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["events"], 500);
    assert_eq!(v["corrupted_bytes"], 0);
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "0,gpu0,r,a,0,64\n10,gpu0,r,a,0\n").unwrap();
    let out = cmd().arg("replay").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("line 2") && err.contains("expected 6 fields"),
        "{err}"
    );
    let out = cmd()
        .args(["replay", "/no/such/trace.csv"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The subcommands `hmm --help` lists.
const COMMANDS: [&str; 9] = [
    "demo",
    "completions",
    "man",
    "selftest",
    "stress",
    "run",
    "replay",
    "bench",
    "help",
];

#[test]
fn version_names_the_commit_and_completions_and_the_manual_name_every_command() {
    let (ok, v) = hmm(&["--version"]);
    assert!(ok);
    let commit = v
        .trim()
        .strip_prefix(concat!("hmm ", env!("CARGO_PKG_VERSION"), " (commit "))
        .and_then(|c| c.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        commit == "unknown"
            || commit.trim_end_matches("-dirty").len() == 12
                && commit[..12].bytes().all(|b| b.is_ascii_hexdigit()),
        "{commit}"
    );
    for shell in ["bash", "elvish", "fish", "powershell", "zsh"] {
        let (ok, script) = hmm(&["completions", shell]);
        assert!(ok, "{shell}");
        for c in COMMANDS {
            assert!(script.contains(c), "{shell} does not complete {c}");
        }
    }
    let (ok, man) = hmm(&["man"]);
    assert!(ok);
    assert!(man.contains(".TH hmm 1"), "{man}");
    for c in COMMANDS {
        assert!(
            man.contains(&format!("hmm\\-{c}")),
            "the manual does not name {c}"
        );
    }
}

#[test]
fn the_demo_explains_each_step_and_names_counters_and_owners() {
    let (ok, out) = hmm(&["demo", "--pages", "64"]);
    assert!(ok, "{out}");
    // Eight numbered steps, each with why it matters, printed as they happen.
    for n in 1..=8 {
        assert!(out.contains(&format!("== {n}. ")), "step {n}: {out}");
    }
    assert_eq!(out.matches("   why: ").count(), 8, "{out}");
    assert!(out.contains("a \"walk\" is one pass"), "{out}");
    assert!(out.contains("owner of device 0"), "{out}");
    assert!(out.contains("as expected"), "device 1's refusal: {out}");
    assert!(out.contains("migrate_to_ram"), "{out}");

    let (ok, out) = hmm(&["demo", "--pages", "64", "--json"]);
    assert!(ok, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(r["schema_version"], 2);
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 8);
    assert!(steps.iter().all(|s| !s["why"].as_str().unwrap().is_empty()));
    // Counters by event name, every event present.
    let total = &r["total"]["notifier"]["invalidations"];
    assert!(total["MMU_NOTIFY_MIGRATE"].as_u64().unwrap() > 0, "{total}");
    assert_eq!(total.as_object().unwrap().len(), 8, "{total}");
    // Device 0's migration raised MIGRATE events carrying its owner, named as device 0.
    let owners = r["device_owners"].as_array().unwrap();
    assert!(owners.len() >= 2, "{owners:?}");
    let migrate = &steps[1]["events"].as_array().unwrap()[0];
    assert_eq!(migrate["event"], "MMU_NOTIFY_MIGRATE");
    assert_eq!(migrate["owner_device"], 0);
    assert_eq!(migrate["owner"], owners[0]);
    assert_eq!(r["remigrate_device_invalidations"], 0);
    assert_eq!(r["corrupted_bytes"], 0);
}
