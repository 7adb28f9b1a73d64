//! The `hmm` command never panics, aborts or hangs on an argument: every bad value of
//! every option is a one-line usage error naming the option and its limit, with exit
//! status 2, before any work starts; a closed pipe ends the output quietly; Ctrl-C during
//! `stress` or `bench` prints the partial report.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn hmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hmm"))
}

/// Runs `hmm args` and checks a clean refusal: status 2 (not a panic's 101 or an abort's
/// 134, nor a signal), nothing on standard output, and one `error:` line on standard
/// error naming `option` and saying `limit`; returns that line.
#[track_caller]
fn refused(args: &[&str], option: &str, limit: &str) -> String {
    let out = hmm().args(args).output().expect("run hmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: {}: {stderr}",
        out.status
    );
    assert!(out.stdout.is_empty(), "{args:?} printed a report");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
    let line = errors[0];
    assert!(
        line.contains(option),
        "{args:?} does not name {option}: {line}"
    );
    assert!(
        line.contains(limit),
        "{args:?} does not say {limit:?}: {line}"
    );
    line.to_owned()
}

/// Waits up to `limit` for `child`; kills it and fails if it is still running.
#[track_caller]
fn wait_for(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for hmm") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hmm still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `child` wrote on standard error.
fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut s).expect("read standard error");
    }
    s
}

/// Whole-number limits shared by several options.
const PAGES: &str = "must be a whole number from";
const RAM: &str = "the model's RAM is at most 256 GiB";
const HOST: &str = "of host memory";

#[test]
fn demo_refuses_bad_sizes() {
    for bad in [
        "0",
        "1",
        "-1",
        "abc",
        "",
        "1.5",
        "18446744073709551615",
        "18446744073709551616",
    ] {
        refused(&["demo", "--pages", bad], "--pages", PAGES);
    }
    // Past the model's largest RAM: the limit named is the RAM's, not "a multiple of 2 MiB".
    let line = refused(&["demo", "--pages", "100000000"], "--pages", RAM);
    assert!(line.contains("from 2 to 22368768"), "{line}");
    // Under it, but more host memory than any machine this runs on has.
    refused(&["demo", "--pages", "20000000"], "--pages", HOST);
}

#[test]
fn stress_refuses_bad_durations_counts_and_sizes() {
    for bad in ["0", "-1", "inf", "-inf", "NaN", "1e20", "abc", ""] {
        refused(
            &["stress", "--seconds", bad],
            "--seconds",
            "above 0 and at most 31536000",
        );
    }
    for bad in ["0", "-1", "100000", "18446744073709551615"] {
        refused(&["stress", "--threads", bad], "--threads", "from 1 to 1024");
    }
    for bad in ["0", "-5", "18446744073709551615", "60000000"] {
        refused(&["stress", "--pages", bad], "--pages", PAGES);
    }
    for bad in ["-1", "100000", "18446744073709551615"] {
        refused(&["stress", "--thps", bad], "--thps", RAM);
    }
    for bad in ["-1", "51", "100", "x"] {
        refused(
            &["stress", "--fail-alloc", bad],
            "--fail-alloc",
            "from 0 to 50",
        );
    }
    for bad in ["-1", "18446744073709551616", "seven"] {
        refused(&["stress", "--seed", bad], "--seed", PAGES);
    }
    // Each fits alone; together the region is past the model's RAM.
    refused(
        &["stress", "--pages", "30000000", "--thps", "30000"],
        "--thps 30000 needs",
        RAM,
    );
    refused(&["stress", "--thps", "60000"], "--thps 60000 needs", HOST);
}

#[test]
fn bench_migrate_refuses_bad_sizes_threads_and_rounds() {
    for bad in [
        "0",
        "3",
        "6",
        "-4",
        "",
        "1073741824",
        "18446744073709551615",
    ] {
        refused(
            &["bench", "migrate", "--sizes-kib", bad],
            "--sizes-kib",
            "multiple of 4",
        );
    }
    refused(
        &["bench", "migrate", "--sizes-kib", "4,"],
        "--sizes-kib",
        "KiB",
    );
    refused(
        &["bench", "migrate", "--sizes-kib", "268435456"],
        "--sizes-kib",
        RAM,
    );
    refused(
        &["bench", "migrate", "--sizes-kib", "67108864"],
        "--sizes-kib 67108864 needs",
        HOST,
    );
    for bad in ["0", "-2", "100000"] {
        refused(
            &["bench", "migrate", "--threads", bad],
            "--threads",
            "from 1 to 1024",
        );
    }
    for bad in ["0", "-3", "18446744073709551615"] {
        refused(
            &["bench", "migrate", "--iters", bad],
            "--iters",
            "from 1 to 100000",
        );
    }
    // In KiB, as the option is, with the sizes that would do.
    let line = refused(
        &["bench", "migrate", "--threads", "3", "--sizes-kib", "4096"],
        "--sizes-kib 4096",
        "multiples of 6144 KiB",
    );
    assert!(line.contains("--threads 3"), "{line}");
}

#[test]
fn bench_walks_fault_and_range_fault_refuse_bad_arguments() {
    for bad in ["0", "-1", "30000000", "x"] {
        refused(&["bench", "walks", "--pages", bad], "--pages", PAGES);
    }
    refused(&["bench", "walks", "--pages", "10000000"], "--pages", HOST);
    for bad in ["-0.5", "1.5", "nan", "inf", "-inf", "", "0,x"] {
        refused(
            &["bench", "walks", "--fractions", bad],
            "--fractions",
            "from 0 to 1",
        );
    }
    for bad in ["0", "100001"] {
        refused(
            &["bench", "walks", "--iters", bad],
            "--iters",
            "from 1 to 100000",
        );
    }
    for bad in ["0", "-1", "16777217", "18446744073709551615"] {
        refused(
            &["bench", "fault", "--pages", bad],
            "--pages",
            "from 1 to 16777216",
        );
    }
    for bad in ["0", "65537", "100000000"] {
        refused(
            &["bench", "fault", "--thps", bad],
            "--thps",
            "from 1 to 65536",
        );
    }
    for bad in ["0", "-1", "100000000"] {
        refused(&["bench", "range-fault", "--pages", bad], "--pages", PAGES);
    }
    refused(
        &["bench", "range-fault", "--pages", "20000000"],
        "--pages",
        HOST,
    );
    for bad in ["0", "18446744073709551615"] {
        refused(
            &["bench", "range-fault", "--iters", bad],
            "--iters",
            "from 1 to 100000",
        );
    }
    for bad in ["0", "-1", "100000000"] {
        refused(&["bench", "driver", "--pages", bad], "--pages", PAGES);
    }
    refused(&["bench", "driver", "--pages", "20000000"], "--pages", HOST);
    for bad in ["0", "nan", "18446744073709551615"] {
        refused(
            &["bench", "driver", "--iters", bad],
            "--iters",
            "from 1 to 100000",
        );
    }
}

#[test]
fn a_plot_folder_that_cannot_be_written_is_refused_before_the_run() {
    let file = std::env::temp_dir().join(format!("hmm-bad-args-{}", std::process::id()));
    std::fs::write(&file, b"not a folder").unwrap();
    let not_a_dir = file.to_str().unwrap();
    let under_a_file = file.join("plots");
    let under_a_file = under_a_file.to_str().unwrap();
    for dir in [not_a_dir, under_a_file, "/proc/hmm-no-such-folder"] {
        for bench in ["walks", "fault", "range-fault", "migrate", "driver", "all"] {
            // Refused before the run, which would take seconds to minutes.
            let line = refused(&["bench", bench, "--plot", dir], "--plot", dir);
            assert!(line.contains("cannot create the folder"), "{line}");
        }
        let run = ["run", "stream", "--compare", "seed=1,2", "--plot", dir];
        let line = refused(&run, "--plot", dir);
        assert!(line.contains("cannot create the folder"), "{line}");
        // The report's file is created before the run too.
        let page = format!("{dir}/report.html");
        refused(&["run", "stream", "--report", &page], "--report", &page);
    }
    refused(&["bench", "all", "--plot", ""], "--plot", "");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn help_names_every_command() {
    let out = hmm().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let about = help.lines().next().unwrap();
    for command in ["demo", "selftest", "stress", "bench"] {
        assert!(about.contains(command), "{about}");
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} is not listed: {help}"
        );
    }
}

#[test]
fn completions_refuse_an_unknown_shell_naming_the_ones_there_are() {
    let out = hmm().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("bash, elvish, fish, powershell, zsh"), "{err}");
    assert!(hmm().arg("completions").output().unwrap().status.code() == Some(2));
}

/// Whether `status` is a quiet end after a closed pipe: success, or SIGPIPE.
fn quiet(status: ExitStatus) -> bool {
    status.success() || status.signal() == Some(libc::SIGPIPE)
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    // The reader takes one line and goes away; `selftest` goes on printing a line per
    // scenario into the closed pipe.
    for args in [&["demo", "--pages", "64"][..], &["selftest"]] {
        let mut child = hmm()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty(), "{args:?} printed nothing");
        let status = wait_for(&mut child, Duration::from_secs(60));
        let stderr = stderr_of(&mut child);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(quiet(status), "{args:?}: {status}: {stderr}");
    }
    // The reader is gone before the first line: every write fails.
    for args in [
        &["demo", "--pages", "64"][..],
        &["demo", "--json", "--pages", "64"],
        &["stress", "--seconds", "0.3", "--pages", "16", "--thps", "0"],
        &[
            "stress",
            "--seconds",
            "0.3",
            "--pages",
            "16",
            "--thps",
            "0",
            "--json",
        ],
        &["man"],
        &["completions", "zsh"],
    ] {
        let mut child = hmm()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let status = wait_for(&mut child, Duration::from_secs(60));
        let stderr = stderr_of(&mut child);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(quiet(status), "{args:?}: {status}: {stderr}");
    }
}

/// Starts `hmm args`, sends it SIGINT after `after`, and returns its exit status and
/// output.
fn interrupted(args: &[&str], after: Duration) -> (ExitStatus, String, String) {
    let mut child = hmm()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read standard output as it comes, so that a full pipe never blocks the child.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    std::thread::sleep(after);
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: `kill` has no memory-safety preconditions; `pid` is our child, not yet
    // waited for, so the id has not been reused.
    let sent = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(sent, 0, "kill failed");
    let status = wait_for(&mut child, Duration::from_secs(20));
    let stderr = stderr_of(&mut child);
    (status, reader.join().unwrap(), stderr)
}

#[test]
fn ctrl_c_stops_stress_with_its_report() {
    let (status, out, err) = interrupted(
        &[
            "stress",
            "--seconds",
            "30",
            "--pages",
            "64",
            "--thps",
            "1",
            "--threads",
            "1",
        ],
        Duration::from_millis(1500),
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(130), "{status}: {err}");
    assert!(out.contains("(interrupted)"), "{out}");
    assert!(out.contains("corrupted bytes 0"), "{out}");
    assert!(err.contains("interrupted"), "{err}");
}

#[test]
fn ctrl_c_stops_a_bench_with_the_rows_so_far() {
    let (status, out, err) = interrupted(
        &[
            "bench",
            "walks",
            "--pages",
            "32",
            "--fractions",
            "0.5,1",
            "--iters",
            "100000",
            "--json",
        ],
        Duration::from_millis(1500),
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(130), "{status}: {err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("a JSON array");
    // The first fraction's three methods, measured over the rounds done (none if the
    // signal came before the first round, on a very slow machine).
    assert!(rows.len() == 3 || rows.is_empty(), "{out}");
    for r in &rows {
        assert_eq!(r["nonpresent_fraction"], 0.5, "{r}");
    }
    assert!(err.contains("interrupted"), "{err}");
}
