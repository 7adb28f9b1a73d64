//! What a figure was measured on: the machine (CPU model, cores, memory, kernel) and the
//! build (version, commit, compiler, profile). Every `hmm bench` table starts with these
//! lines and `hmm bench all --json` carries them, so figures from different machines or
//! builds are never compared by mistake.

use serde::Serialize;

/// The machine a run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    /// `model name` from `/proc/cpuinfo`.
    cpu: String,
    /// CPUs this process may run on.
    cores: usize,
    /// `MemTotal` from `/proc/meminfo`, in bytes.
    memory_bytes: u64,
    /// The host kernel's release (`/proc/sys/kernel/osrelease`).
    kernel: String,
    /// The host kernel's transparent hugepage mode (`always`, `madvise` or `never`), which
    /// decides whether its THP baselines are THPs.
    thp: String,
}

/// The build that ran.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Build {
    version: &'static str,
    commit: &'static str,
    rustc: &'static str,
    target: &'static str,
    profile: &'static str,
    opt_level: &'static str,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The value of the first `key: value` line of `text` whose key is `key`.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

impl Machine {
    /// This machine, as far as `/proc` and `/sys` tell; `unknown` where they do not.
    pub(crate) fn this() -> Machine {
        let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
        let meminfo = read("/proc/meminfo").unwrap_or_default();
        let thp = read("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        Machine {
            cpu: field(&cpuinfo, "model name")
                .unwrap_or("unknown")
                .to_owned(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb << 10),
            kernel: read("/proc/sys/kernel/osrelease")
                .map_or_else(|| "unknown".into(), |s| s.trim().to_owned()),
            // The selected mode is the bracketed one: `always [madvise] never`.
            thp: thp
                .split_once('[')
                .and_then(|(_, r)| r.split_once(']'))
                .map_or_else(|| "unknown".into(), |(m, _)| m.to_owned()),
        }
    }

    /// One line for a table header.
    pub(crate) fn line(&self) -> String {
        format!(
            "machine: {}, {} cores, {} GiB, Linux {}, THP {}",
            self.cpu,
            self.cores,
            self.memory_bytes >> 30,
            self.kernel,
            self.thp
        )
    }
}

impl Build {
    /// The running binary's build, recorded by the build script.
    pub(crate) fn this() -> Build {
        Build {
            version: env!("CARGO_PKG_VERSION"),
            commit: env!("HMM_BUILD_COMMIT"),
            rustc: env!("HMM_BUILD_RUSTC"),
            target: env!("HMM_BUILD_TARGET"),
            profile: env!("HMM_BUILD_PROFILE"),
            opt_level: env!("HMM_BUILD_OPT_LEVEL"),
        }
    }

    /// One line for a table header.
    pub(crate) fn line(&self) -> String {
        format!(
            "build: hmm {} ({}), {}, {}, {} profile, opt-level {}",
            self.version, self.commit, self.rustc, self.target, self.profile, self.opt_level
        )
    }
}

/// Prints the machine and build lines that head every table.
pub(crate) fn print_header() {
    outln!("{}", Machine::this().line());
    outln!("{}", Build::this().line());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_by_exact_key() {
        let text = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nmodel\t: 85\n";
        assert_eq!(field(text, "model name"), Some("Some CPU @ 2.0GHz"));
        assert_eq!(field(text, "model"), Some("85"));
        assert_eq!(field(text, "flags"), None);
    }

    #[test]
    fn this_machine_has_cores_and_memory() {
        let m = Machine::this();
        assert!(m.cores >= 1);
        assert!(m.memory_bytes > 0, "{m:?}");
        assert!(!Build::this().commit.is_empty());
    }
}
