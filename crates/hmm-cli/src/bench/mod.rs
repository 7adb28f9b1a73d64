//! `hmm bench`: every figure against a baseline taken in the same run.
//!
//! | scenario | what is timed | baseline |
//! |---|---|---|
//! | [`migrate`] | `migrate_vma` to a device-private pagemap and back | `memcpy` of the same bytes |
//! | [`walks`] | bringing a partly-faulted range to a device, three ways | one snapshot pass |
//! | [`fault`] | first-touch faults and the device-private fault (`migrate_to_ram`) | the host kernel's first-touch fault |
//! | [`range_fault`] | `hmm_range_fault` per page | the host kernel's `/proc/self/pagemap` walk |
//! | [`driver`] | the SVM driver: GPU faults serviced, evictions, policy hooks | `memcpy` of the bytes moved |
//! | [`scale`] | a notifier lookup, a fork family's eviction, first writes, each in a large setting | the same in a small one |
//!
//! [`all`] runs them in turn and names the machine and the build ([`machine`]); [`plot`]
//! draws the charts; [`paired`] compares two methods round by round; [`progress`] is the
//! progress bar shown on a terminal. This machine is shared and noisy, so each scenario
//! reports a ratio to its baseline next to the raw figure, and the rows say how many
//! rounds they took.

pub(crate) mod all;
pub(crate) mod driver;
pub(crate) mod fault;
pub(crate) mod host;
pub(crate) mod machine;
pub(crate) mod migrate;
pub(crate) mod paired;
pub(crate) mod plot;
pub(crate) mod progress;
pub(crate) mod range_fault;
pub(crate) mod scale;
pub(crate) mod walks;

use std::time::Duration;

/// The result of every scenario.
pub(crate) type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The median of `v` (the upper one of an even count); `v` must not be empty.
pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The `p`-th percentile (`0.0..=1.0`, nearest rank) of sorted `v`; `v` must not be empty.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `d` in nanoseconds, per `n` items.
pub(crate) fn ns_per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_nanos).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_nanos(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_nanos(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_nanos(100));
        assert_eq!(percentile(&v, 0.0), Duration::from_nanos(1));
        assert_eq!(median(v), Duration::from_nanos(51));
    }
}
