//! The `hmm` command end to end: `selftest` reports and exits as documented, and
//! `bench walks` counts one pass for one walk and more for the two-step recipes.

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
    let (ok, out) = hmm(&["selftest"]);
    let last = out.lines().last().expect("a summary line");
    assert!(ok, "{out}");
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    let n: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(n, out.lines().filter(|l| l.starts_with("ok ")).count());
    assert!(n > 0);
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
        if two_step {
            // Plus one pass per Busy retry.
            assert_eq!(walks, least + r["busy_retries"].as_u64().unwrap(), "{r}");
        } else {
            assert_eq!(walks, 1, "{r}");
        }
    }
    // Bad input is an error, not a panic.
    let (ok, _) = hmm(&["bench", "walks", "--fractions", "1.5", "--iters", "1"]);
    assert!(!ok);
}
