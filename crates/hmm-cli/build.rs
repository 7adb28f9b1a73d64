//! Records what the `hmm` binary was built from, so that `hmm bench` can name the build
//! next to its figures: the git commit (with `-dirty` for uncommitted changes), the
//! compiler, the target and the profile. Outside a git checkout the commit is `unknown`.

use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    let commit = output("git", &["rev-parse", "--short=12", "HEAD"]).map(|c| {
        match output("git", &["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{c}-dirty"),
            _ => c,
        }
    });
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = output(&rustc, &["--version"]);
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "unknown".into());
    println!(
        "cargo:rustc-env=HMM_BUILD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
    println!(
        "cargo:rustc-env=HMM_BUILD_RUSTC={}",
        rustc.as_deref().unwrap_or("unknown")
    );
    println!("cargo:rustc-env=HMM_BUILD_TARGET={}", env("TARGET"));
    println!("cargo:rustc-env=HMM_BUILD_PROFILE={}", env("PROFILE"));
    println!("cargo:rustc-env=HMM_BUILD_OPT_LEVEL={}", env("OPT_LEVEL"));
    // The commit changes with HEAD (and its log, appended to on every commit), the dirty
    // mark with the index and the sources. Only paths that exist are named: cargo reruns
    // the script on every build for a missing one.
    println!("cargo:rerun-if-changed=src");
    if let Some(git) = output("git", &["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "logs/HEAD", "index"] {
            let p = std::path::Path::new(&git).join(f);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}
