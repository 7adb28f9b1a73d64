//! What the `hmm` command accepts, checked before any work starts.
//!
//! Every numeric option has a value parser that refuses, in clap's one-line usage error
//! (exit status 2), anything but a number in its range, and names the range: zero,
//! negative, non-numeric, NaN and infinite values, and values past the most the model or
//! the command can use. Sizes that depend on several options (a region of `--pages` and
//! `--thps`, a buffer and its copies) are checked after parsing by [`check_ram`] and
//! [`check_host`]:
//! against the model's largest RAM ([`MAX_RAM`]: one section of the frame-number space,
//! the most a device pagemap can be, since the commands size device memory like RAM) and against the host's available memory (`MemAvailable` in
//! `/proc/meminfo`), with an estimate of what the command commits measured per command.
//! The refusal says which limit was hit and the largest value that fits it.

use std::path::Path;

use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use hmm::phys::MAX_SECTION_BYTES;

/// 1 MiB.
pub(crate) const MIB: u64 = 1 << 20;
/// The commands' largest simulated RAM (and device memory): one section of the model's
/// frame-number space, 2^26 frames of 4 KiB, 256 GiB (the model's RAM alone may be up to
/// `hmm::phys::MAX_RAM_BYTES`; its pagemaps are one section at most).
pub(crate) const MAX_RAM: u64 = MAX_SECTION_BYTES;
/// Pages in the largest RAM: no page count of any command can be more.
pub(crate) const MAX_PAGES: u64 = MAX_RAM / PAGE_SIZE;
/// 2 MiB units in the largest RAM.
pub(crate) const MAX_THPS: u64 = MAX_RAM / PMD_SIZE;
/// KiB in the largest RAM.
pub(crate) const MAX_KIB: u64 = MAX_RAM >> 10;
/// Threads of a command, at most.
pub(crate) const MAX_THREADS: u64 = 1024;
/// Rounds of a benchmark, at most.
pub(crate) const MAX_ITERS: u64 = 100_000;
/// Faults of each 4 KiB `bench fault` scenario, at most (each one is timed and kept).
pub(crate) const MAX_FAULT_PAGES: u64 = 1 << 24;
/// THP faults of `bench fault`, at most (each one zeroes 2 MiB, in the model and the host).
pub(crate) const MAX_FAULT_THPS: u64 = 1 << 16;
/// The longest stress run: a year.
pub(crate) const MAX_SECONDS: f64 = 365.0 * 86_400.0;

/// A clap value parser of whole numbers from `min` to `max`.
pub(crate) fn whole<T: TryFrom<u64> + 'static>(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|v| (min..=max).contains(v))
            .and_then(|v| T::try_from(v).ok())
            .ok_or_else(|| format!("must be a whole number from {min} to {max}"))
    }
}

/// A clap value parser of a size option (pages, THP areas) from `min` up to the largest
/// value, at most `hi`, whose simulated RAM (`need(v).ram`) the model can have: the
/// refusal names that value. What depends on other options too, and host memory, is
/// [`check_ram`]'s and [`check_host`]'s.
pub(crate) fn sized<T: TryFrom<u64> + 'static>(
    min: u64,
    hi: u64,
    need: fn(u64) -> Need,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let max = largest(hi, |v| need(v).ram <= MAX_RAM);
        s.parse::<u64>()
            .ok()
            .filter(|v| (min..=max).contains(v))
            .and_then(|v| T::try_from(v).ok())
            .ok_or_else(|| {
                format!(
                    "must be a whole number from {min} to {max} (the model's RAM is at most {})",
                    human(MAX_RAM)
                )
            })
    }
}

/// A clap value parser of a duration in seconds: finite, above 0, at most a year.
pub(crate) fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_SECONDS => Ok(v),
        _ => Err(format!(
            "must be a number of seconds above 0 and at most {MAX_SECONDS} (a year)"
        )),
    }
}

/// A clap value parser of a fraction from 0 to 1.
pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("must be a number from 0 to 1".into()),
    }
}

/// A clap value parser of a size in KiB: a whole number of 4 KiB pages, from 4 KiB up to
/// the largest size whose simulated RAM (`need(bytes).ram`) the model can have.
pub(crate) fn size_kib(
    need: fn(u64) -> Need,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let max = largest(MAX_KIB, |k| need(k << 10).ram <= MAX_RAM) / 4 * 4;
        s.parse::<u64>()
            .ok()
            .filter(|v| (4..=max).contains(v) && v % 4 == 0)
            .ok_or_else(|| {
                format!(
                    "must be a whole number of KiB from 4 to {max}, a multiple of 4 (whole pages; the model's RAM is at most {})",
                    human(MAX_RAM)
                )
            })
    }
}

/// `n` rounded up to a multiple of 2 MiB.
pub(crate) fn round_2m(n: u64) -> u64 {
    n.div_ceil(PMD_SIZE) * PMD_SIZE
}

/// What a run needs for one value of the option that sizes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need {
    /// Simulated RAM the model is given, in bytes.
    pub(crate) ram: u64,
    /// Host memory the run commits at most, in bytes: an estimate from measured runs,
    /// rounded up.
    pub(crate) host: u64,
}

/// Checks that `option` at `value` (the other options as given) needs no more simulated
/// RAM than the model has ([`check_ram`]) and no more host memory than is available
/// ([`check_host`]).
pub(crate) fn check_memory(
    option: &str,
    value: u64,
    step: u64,
    need: impl Fn(u64) -> Need,
) -> Result<(), String> {
    check_ram(option, value, step, &need)?;
    check_host(option, value, step, &need)
}

/// Checks that `option` at `value` (the other options as given) needs no more simulated
/// RAM than the model has; `need` says what a value of `option` needs and must grow with
/// it. The refusal names the limit and the largest value of `option` that fits it, a
/// multiple of `step`.
pub(crate) fn check_ram(
    option: &str,
    value: u64,
    step: u64,
    need: impl Fn(u64) -> Need,
) -> Result<(), String> {
    let ram = need(value).ram;
    if ram <= MAX_RAM {
        return Ok(());
    }
    let most = largest(value, |v| need(v).ram <= MAX_RAM) / step * step;
    Err(format!(
        "{option} {value} needs {} of simulated RAM, and the model's RAM is at most {} ({option} at most {most} here)",
        human(ram),
        human(MAX_RAM)
    ))
}

/// Checks that `option` at `value` (the other options as given) needs no more host memory
/// than is available, as [`check_ram`] does for the model's RAM. Passes where the host
/// does not say.
pub(crate) fn check_host(
    option: &str,
    value: u64,
    step: u64,
    need: impl Fn(u64) -> Need,
) -> Result<(), String> {
    let Some(available) = mem_available() else {
        return Ok(());
    };
    let host = need(value).host;
    if host <= available {
        return Ok(());
    }
    let most = largest(value, |v| need(v).host <= available) / step * step;
    Err(format!(
        "{option} {value} needs about {} of host memory, and {} is available (MemAvailable in /proc/meminfo; {option} at most {most} here)",
        human(host),
        human(available)
    ))
}

/// The largest `v` in `0..=hi` for which `fits(v)` holds (`fits` holds up to some value
/// and not above it); 0 if none.
fn largest(hi: u64, fits: impl Fn(u64) -> bool) -> u64 {
    let (mut lo, mut hi) = (0, hi);
    if !fits(0) {
        return 0;
    }
    // `fits(lo)` holds; find the last such value up to `hi`.
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// The host's available memory (`MemAvailable` in `/proc/meminfo`), in bytes; `None`
/// where it does not say.
pub(crate) fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
}

/// Bytes for a person: `256 GiB`, `1.5 GiB`, `80 MiB`, `12 KiB`.
pub(crate) fn human(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes >= GIB {
        let g = bytes as f64 / GIB as f64;
        if bytes % GIB == 0 || g >= 100.0 {
            format!("{g:.0} GiB")
        } else {
            format!("{g:.1} GiB")
        }
    } else if bytes >= MIB {
        format!("{} MiB", bytes.div_ceil(MIB))
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// Checks that the charts can be written into `dir` (`--plot DIR`): creates it if it is
/// missing, and writes and removes a file there. The refusal names the folder.
pub(crate) fn check_plot_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("--plot {}: cannot create the folder: {e}", dir.display()))?;
    let probe = dir.join(format!(".hmm-plot-check-{}", std::process::id()));
    std::fs::write(&probe, b"hmm")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("--plot {}: cannot write in the folder: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_refuse_with_the_range() {
        let pages = whole::<u64>(2, 10);
        assert_eq!(pages("2"), Ok(2));
        assert_eq!(pages("10"), Ok(10));
        for bad in ["1", "11", "-1", "abc", "", "1e3", "18446744073709551616"] {
            assert_eq!(
                pages(bad),
                Err("must be a whole number from 2 to 10".into())
            );
        }
        assert_eq!(whole::<usize>(1, 4)("3"), Ok(3usize));
        assert_eq!(seconds("0.5"), Ok(0.5));
        for bad in ["0", "-1", "inf", "-inf", "NaN", "1e20", "x"] {
            assert!(seconds(bad).unwrap_err().contains("above 0"), "{bad}");
        }
        for bad in ["-0.5", "1.5", "nan", "inf"] {
            assert!(fraction(bad).is_err(), "{bad}");
        }
        assert_eq!(fraction("1"), Ok(1.0));
        let need = |bytes| Need {
            ram: 2 * bytes,
            host: 0,
        };
        let size_kib = size_kib(need);
        assert_eq!(size_kib("2048"), Ok(2048));
        assert_eq!(size_kib("134217728"), Ok(134217728));
        for bad in ["0", "3", "6", "134217732", "1073741824", "-4"] {
            let e = size_kib(bad).unwrap_err();
            assert!(
                e.contains("from 4 to 134217728, a multiple of 4"),
                "{bad}: {e}"
            );
        }
        let pages = sized::<u64>(1, MAX_PAGES, |p| Need {
            ram: 4 * p * PAGE_SIZE,
            host: 0,
        });
        assert_eq!(pages("16777216"), Ok(16777216));
        let e = pages("16777217").unwrap_err();
        assert_eq!(
            e,
            "must be a whole number from 1 to 16777216 (the model's RAM is at most 256 GiB)"
        );
    }

    #[test]
    fn the_largest_fitting_value_is_found() {
        assert_eq!(largest(1000, |v| v <= 37), 37);
        assert_eq!(largest(1000, |v| v <= 5000), 1000);
        assert_eq!(largest(1000, |_| false), 0);
        assert_eq!(largest(u64::MAX, |v| v < u64::MAX), u64::MAX - 1);
    }

    #[test]
    fn memory_refusals_name_the_limit() {
        let e = check_memory("--pages", 1 << 30, 1, |p| Need {
            ram: p * PAGE_SIZE,
            host: 0,
        })
        .unwrap_err();
        assert!(
            e.contains("--pages 1073741824 needs 4096 GiB of simulated RAM"),
            "{e}"
        );
        assert!(
            e.contains("at most 256 GiB (--pages at most 67108864 here)"),
            "{e}"
        );
        if let Some(avail) = mem_available() {
            let e = check_memory("--pages", 1 << 20, 1, |p| Need {
                ram: 0,
                host: p * avail,
            })
            .unwrap_err();
            assert!(e.contains("MemAvailable"), "{e}");
            assert!(e.contains("--pages at most 1 here"), "{e}");
        }
        assert!(check_memory("--pages", 1, 1, |_| Need { ram: 0, host: 0 }).is_ok());
        // Fits up to 1022: the hint rounds down to a multiple of the step.
        let e = check_memory("--sizes-kib", 2000, 4, |k| Need {
            ram: k * (MAX_RAM / 1022),
            host: 0,
        })
        .unwrap_err();
        assert!(e.contains("(--sizes-kib at most 1020 here)"), "{e}");
        assert_eq!(human(MAX_RAM), "256 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
